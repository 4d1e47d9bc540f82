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

import glob
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from matdisc.errors import UserError

#: File suffixes a known-phases folder is read for.
SUFFIXES = (".cif", ".extxyz", ".xyz", ".json")


class KnownPhasesError(UserError):
    """A known-phases source that cannot be used: names the file (or service) and the problem."""


@dataclass
class KnownPhase:
    """One known structure and where it came from; ``energy`` (eV, whole cell) only when its
    ``settings_hash`` says it was computed with some settings (then it may be reused as is)."""

    id: str  # e.g. mp-1234, or phases.cif:0
    structure: Structure
    source: str  # the file, or materials_project
    energy: float | None = None
    settings_hash: str = ""

    @property
    def formula(self) -> str:
        return self.structure.composition.reduced_formula


# -- files ----------------------------------------------------------------------------------------
def files_of(spec: str | Path) -> list[Path]:
    """The files one ``known_phases.files`` entry names: a file, a folder (its CIF/extxyz/JSON
    files, sorted) or a glob pattern."""
    text = str(spec)
    if any(ch in text for ch in "*?["):
        return [Path(p) for p in sorted(glob.glob(text)) if Path(p).is_file()]
    path = Path(text)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    return [path] if path.is_file() else []


def read_file(path: Path) -> list[KnownPhase]:
    """Every structure in one file; raises :class:`KnownPhasesError` naming the file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            phases = _read_json(path)
        elif suffix in (".extxyz", ".xyz"):
            phases = _read_extxyz(path)
        elif suffix == ".cif":
            phases = _read_cif(path)
        else:
            raise ValueError(f"unknown format {suffix or '(no suffix)'}: use .cif, .extxyz or .json")
    except KnownPhasesError:
        raise
    except Exception as err:  # noqa: BLE001 - any parser failure is the file's problem, said in one line
        msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise KnownPhasesError(f"known_phases: {path}: cannot be read ({msg})") from None
    if not phases:
        raise KnownPhasesError(f"known_phases: {path}: holds no structures")
    return phases


def _read_cif(path: Path) -> list[KnownPhase]:
    import warnings

    from pymatgen.io.cif import CifParser

    names = re.findall(r"^\s*data_(\S*)", path.read_text(errors="replace"), flags=re.MULTILINE)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # pymatgen keeps one block per name: the others would be lost without a word
        raise KnownPhasesError(
            f"known_phases: {path}: data block name repeated ({', '.join(repeated)}): "
            "give each structure its own data_ name"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns about every rounded occupancy
        structures = CifParser(path).parse_structures(primitive=False)
    return [KnownPhase(f"{path.name}:{i}", s, str(path)) for i, s in enumerate(structures)]


def _read_extxyz(path: Path) -> list[KnownPhase]:
    from ase.io import read
    from pymatgen.io.ase import AseAtomsAdaptor

    out = []
    for i, atoms in enumerate(read(path, index=":", format="extxyz")):
        name = atoms.info.get("material_id") or atoms.info.get("id") or f"{path.name}:{i}"
        out.append(KnownPhase(str(name), AseAtomsAdaptor.get_structure(atoms), str(path)))
    return out


def _read_json(path: Path) -> list[KnownPhase]:
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    data = json.loads(path.read_text())
    items = data if isinstance(data, list) else [data]
    out = []
    for i, item in enumerate(items):
        kind = item.get("@class") if isinstance(item, dict) else None
        if kind == "ComputedStructureEntry":
            entry = ComputedStructureEntry.from_dict(item)
            settings = str((entry.parameters or {}).get("settings_hash", ""))
            out.append(
                KnownPhase(
                    str(entry.entry_id or f"{path.name}:{i}"),
                    entry.structure,
                    str(path),
                    float(entry.uncorrected_energy) if settings else None,
                    settings,
                )
            )
        elif kind == "Structure":
            out.append(KnownPhase(f"{path.name}:{i}", Structure.from_dict(item), str(path)))
        else:
            raise KnownPhasesError(
                f"known_phases: {path}: item {i} is neither a pymatgen ComputedStructureEntry "
                "nor a Structure (its @class is "
                f"{kind!r})"
            )
    return out


def check(phases: Iterable[KnownPhase], chemsys: Sequence[str]) -> None:
    """Every known phase ordered and inside the chemical system; raises naming the file."""
    allowed = set(chemsys)
    for p in phases:
        if not p.structure.is_ordered:
            raise KnownPhasesError(
                f"known_phases: {p.source}: {p.id} ({p.structure.composition.formula}) is "
                "disordered (partial occupancies): give an ordered cell"
            )
        outside = sorted({str(el) for el in p.structure.composition.elements} - allowed)
        if outside:
            raise KnownPhasesError(
                f"known_phases: {p.source}: {p.id} ({p.formula}) has {', '.join(outside)}, "
                f"outside the chemical system {'-'.join(chemsys)}"
            )


def from_files(specs: Sequence[str | Path], chemsys: Sequence[str]) -> list[KnownPhase]:
    """The known phases of every ``known_phases.files`` entry, checked against ``chemsys``."""
    out = []
    for spec in specs:
        paths = files_of(spec)
        if not paths:
            what = (
                "matches no file"
                if any(ch in str(spec) for ch in "*?[")
                else ("is a folder with no .cif, .extxyz or .json file" if Path(spec).is_dir() else "does not exist")
            )
            raise KnownPhasesError(f"known_phases: {spec} {what}")
        for path in paths:
            phases = read_file(path)
            check(phases, chemsys)
            out += phases
    return out


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
        check(fetched, chemsys)
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
