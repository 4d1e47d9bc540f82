"""``matdisc init CHEMSYS``: a starter campaign file for a chemical system, every setting a new user
is likely to change written out with a comment saying what it does (the rest keep their defaults:
``docs/configuration.md`` lists them all)."""

from __future__ import annotations

import re

from matdisc.errors import UserError

_TEMPLATE = """\
# {name}: a discovery campaign over {system}, written by `matdisc init` ({date}).
# Check it: matdisc validate {file}    Preview round 1: matdisc candidates {file}
# Cost per round before running: matdisc plan {file}    Run: matdisc run {file}
name: {name}
chemsys: [{elements}]
store: runs/{name}.zarr            # a path, or an fsspec URL (s3://bucket/{name}.zarr)

generation:
  max_atoms: 8                     # largest cell a candidate may have
  seed: 0
  prototype: {{library: aflow}}      # decorations of the AFLOW prototype library (pymatgen's copy)
  substitution: {{per_round: 100}}   # data-mined ionic substitution into known compounds and hits
  random: {{per_round: 20}}          # PyXtal random symmetric crystals per round
  # from_files: [my-structures/]   # your own CIF/POSCAR/extxyz files as candidates

mlip:
  model: cold-start                # or a mace_mp foundation name (medium-mpa-0) or a .model file
  ensemble: 3                      # committee members: their spread is the uncertainty acquisition uses
  device: auto                     # cuda when a GPU is visible, else cpu
  fmax: 0.05                       # eV/A, MLIP relaxation force criterion

reference:                         # what verifies the hits
  calculator: {calculator}{calculator_note}
  preset: fast                     # fast: quick PBE settings; accurate: converged ones
  fmax: 0.05                       # eV/A, reference relaxation force criterion

active_learning:
  rounds: 4
  dft_budget: 8                    # reference calculations per round
  acquisition: uncertainty         # greedy and random are the baselines
  max_dft_total: 32                # stop once this many are spent (or after `patience` rounds without a hit)

# known_phases: [known/]           # phases already known for the system: hits are judged against them
compute: {{scheduler: local}}        # slurm: Dask workers as Slurm jobs (compute.slurm: queue, walltime, ...)
"""


def parse_chemsys(text: str) -> list[str]:
    """``Al-Li``, ``Al,Li`` or ``AlLi`` -> ["Al", "Li"]; one line naming what is not an element."""
    from pymatgen.core import Element

    parts = [p for p in re.split(r"[-,\s]+", text.strip()) if p]
    if len(parts) == 1 and len(re.findall(r"[A-Z]", parts[0])) > 1:
        parts = re.findall(r"[A-Z][a-z]?", parts[0])
    if not parts:
        raise UserError("CHEMSYS: give the elements, e.g. Al-Li")
    for p in parts:
        if not Element.is_valid_symbol(p):
            raise UserError(f"CHEMSYS: {p!r} is not an element symbol")
    if len(set(parts)) != len(parts):
        raise UserError(f"CHEMSYS: {text!r} names an element twice")
    return parts


def starter(chemsys: list[str], file: str, calculator: str) -> str:
    """The campaign file's text."""
    import datetime

    from ase.calculators.emt import parameters

    name = "-".join(chemsys).lower()
    note = ""
    if calculator == "emt":
        missing = [el for el in chemsys if el not in parameters]
        if missing:
            raise UserError(f"--calculator emt: EMT has no parameters for {', '.join(missing)}")
        note = "                   # ASE's EMT: instant, for trying the loop on metal alloys"
    elif calculator == "gpaw":
        note = "                  # GPAW plane waves; any ASE calculator as module:Class"
    return _TEMPLATE.format(
        name=name,
        system="-".join(chemsys),
        elements=", ".join(chemsys),
        file=file,
        calculator=calculator,
        calculator_note=note,
        date=datetime.date.today().isoformat(),
    )
