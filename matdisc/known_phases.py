"""Known phases: structures already known for a chemical system, computed into the campaign's hull.

A campaign that judges its hits only against its own hull cannot tell a discovery from a
rediscovery, and a known phase it never generated leaves a hole in the hull that nobody
sees. ``known_phases`` gives it the phases already known for its system, from files (CIF,
extxyz, a JSON list of pymatgen ``ComputedStructureEntry``/``Structure``) and from the
Materials Project (mp-api, when ``materials_project.enabled`` and an API key is set).

Only structures come in: every known phase is computed with the campaign's own reference
settings (an energy from other settings would not belong on the same hull), except an entry
whose ``parameters["settings_hash"]`` is the campaign's own, which is taken as it is. Each
verified candidate is then compared with the known phases (StructureMatcher, relaxed
structures): a hit that matches none is ``novel``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path

from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from matdisc.structure_files import FileStructure, StructureFileError, check, read_all


class KnownPhasesError(StructureFileError):
    """A known-phases source that cannot be used: names the file (or service) and the problem."""


#: One known structure and where it came from (a file, or the Materials Project).
KnownPhase = FileStructure


def from_files(specs: Sequence[str | Path], chemsys: Sequence[str]) -> list[KnownPhase]:
    """The known phases of every ``known_phases.files`` entry, checked against ``chemsys``."""
    return read_all(specs, chemsys, "known_phases")


# -- the Materials Project ------------------------------------------------------------------------
def subsystems(chemsys: Sequence[str]) -> list[str]:
    """Every chemical subsystem, as the Materials Project writes them: Al, Li, Al-Li."""
    els = sorted(chemsys)
    return ["-".join(c) for r in range(1, len(els) + 1) for c in combinations(els, r)]


def from_materials_project(
    chemsys: Sequence[str], *, endpoint: str, api_key: str, max_e_above_hull: float
) -> list[KnownPhase]:
    """The structures the Materials Project holds for every subsystem within ``max_e_above_hull``
    of its own hull (its energies stay behind: they belong to other settings)."""
    try:
        from mp_api.client import MPRester
    except ImportError:
        raise KnownPhasesError(
            "known_phases.materials_project: needs the mp-api package (pip install mp-api)"
        ) from None
    try:
        with MPRester(api_key=api_key, endpoint=endpoint, use_document_model=False) as mpr:
            docs = mpr.materials.summary.search(
                chemsys=subsystems(chemsys),
                energy_above_hull=(0.0, float(max_e_above_hull)),
                fields=["material_id", "structure", "formula_pretty", "energy_above_hull"],
            )
    except Exception as err:  # noqa: BLE001 - the service's refusal or absence, in one line
        msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise KnownPhasesError(f"known_phases.materials_project: {endpoint}: {msg}") from None
    out = []
    for doc in docs:
        struct = doc["structure"]
        struct = struct if isinstance(struct, Structure) else Structure.from_dict(struct)
        out.append(KnownPhase(str(doc["material_id"]), struct, "materials_project"))
    out.sort(key=lambda p: p.id)
    return out


def load(cfg, chemsys: Sequence[str], environ: Mapping[str, str] | None = None) -> list[KnownPhase]:
    """Every configured known phase (``cfg``: a :class:`matdisc.config.KnownPhasesConfig`)."""
    phases = from_files(cfg.files, chemsys)
    mp = cfg.materials_project
    if mp.enabled:
        key = (environ if environ is not None else os.environ).get(mp.api_key_env, "")
        if not key:
            raise KnownPhasesError(
                f"known_phases.materials_project: enabled, but {mp.api_key_env} is not set "
                "(your Materials Project API key)"
            )
        fetched = from_materials_project(
            chemsys, endpoint=mp.endpoint, api_key=key, max_e_above_hull=mp.max_e_above_hull
        )
        check(fetched, chemsys, "known_phases")
        phases += fetched
    return phases


# -- novelty --------------------------------------------------------------------------------------
def matches(
    structures: Mapping[str, Structure], known: Mapping[str, Structure], matcher: StructureMatcher | None = None
) -> dict[str, str]:
    """id -> the id of the first known structure (by id) StructureMatcher calls the same ("" for none)."""
    matcher = matcher or StructureMatcher()
    by_formula: dict[str, list[tuple[str, Structure]]] = {}
    for kid in sorted(known):
        by_formula.setdefault(known[kid].composition.reduced_formula, []).append((kid, known[kid]))
    out = {}
    for cid, s in structures.items():
        out[cid] = next((kid for kid, k in by_formula.get(s.composition.reduced_formula, ()) if matcher.fit(s, k)), "")
    return out
