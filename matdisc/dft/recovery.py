"""What to do when the SCF does not converge: a ladder of ever more conservative settings.

Like custodian's error handlers, each rung is a documented change of calculator
parameters, applied on top of the previous rungs, and tried only after the rung before
failed to converge. GPAW's built-in ladder:

0. as configured;
1. conservative density mixing (Pulay, beta 0.05, 8 old densities, metric weight 100)
   and up to 500 SCF iterations;
2. 50 % more bands than occupied;
3. twice the Fermi-Dirac smearing.

Rungs 1-2 change only how the SCF gets there, so the energy stays in the campaign's
reference set; rung 3 changes an energy-defining setting, so its result carries its own
settings hash and is not mixed into the reference hull (see :mod:`matdisc.dft.calculators`).
Other calculators get the rungs configured in ``reference.recovery`` (e.g. for VASP:
``[{algo: All}, {amix: 0.1, bmix: 0.0001}]``); none by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from matdisc.config import ReferenceConfig


@dataclass(frozen=True)
class Rung:
    """One step of the ladder: its name and the (cumulative) parameter overrides."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


def ladder(cfg: ReferenceConfig) -> list[Rung]:
    """The rungs for this calculator, rung 0 (as configured) first."""
    ref = cfg.resolved()
    rungs = [Rung("as configured")]
    if ref.recovery is not None:
        steps = [(f"recovery rung {i}", dict(r)) for i, r in enumerate(ref.recovery, 1)]
    elif ref.calculator == "gpaw":
        occupations = dict(ref.parameters.get("occupations", {"name": "fermi-dirac", "width": ref.smearing}))
        occupations["width"] = 2 * float(occupations.get("width", ref.smearing or 0.1))
        steps = [
            ("conservative mixing", {"mixer": {"beta": 0.05, "nmaxold": 8, "weight": 100.0}, "maxiter": 500}),
            ("more bands", {"nbands": "150%"}),
            (f"smearing {occupations['width']:g} eV", {"occupations": occupations}),
        ]
    else:
        steps = []
    merged: dict[str, Any] = {}
    for name, update in steps:
        merged = {**merged, **update}
        rungs.append(Rung(name, dict(merged)))
    return rungs


def is_scf_failure(err: BaseException) -> bool:
    """An SCF that did not converge (worth a recovery rung), as opposed to any other failure."""
    from ase.calculators.calculator import SCFError

    if isinstance(err, SCFError):
        return True
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & {"KohnShamConvergenceError", "ConvergenceError"}:
        return True
    text = str(err).lower()
    return "scf" in text and "converge" in text
