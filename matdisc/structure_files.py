"""The user's structure files: CIF, POSCAR/CONTCAR, extxyz, or a JSON list of pymatgen
``ComputedStructureEntry``/``Structure``, named by a file, a folder or a glob pattern; and their
labelled frames (extxyz with energies and forces) for training.

Known phases, candidates from files and substitution parents all read them here, so every source
accepts the same formats and a bad file gets the same one-line error naming it and its problem
(prefixed with the setting that named it: ``known_phases``, ``generation.from_files``, ...).
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pymatgen.core import Structure

if TYPE_CHECKING:
    from ase import Atoms

from matdisc.errors import UserError

#: File suffixes a folder is read for; POSCAR and CONTCAR files are read by name.
SUFFIXES = (".cif", ".extxyz", ".xyz", ".json", ".vasp", ".poscar")


class StructureFileError(UserError):
    """A structure file that cannot be used: names the setting, the file and the problem."""


@dataclass
class FileStructure:
    """One structure from a file; ``energy`` (eV, whole cell) only when its ``settings_hash`` says
    it was computed with some settings (an entry may then be reused as it is)."""

    id: str  # e.g. phases.cif:0, or an entry's / extxyz frame's own id
    structure: Structure
    source: str  # the file (or a service, for known phases)
    energy: float | None = None
    settings_hash: str = ""

    @property
    def formula(self) -> str:
        return self.structure.composition.reduced_formula


def _is_poscar(path: Path) -> bool:
    return path.suffix.lower() in (".vasp", ".poscar") or path.name.upper().startswith(("POSCAR", "CONTCAR"))


def files_of(spec: str | Path) -> list[Path]:
    """The files one entry names: a file, a folder (its structure files, sorted) or a glob pattern."""
    text = str(spec)
    if any(ch in text for ch in "*?["):
        return [Path(p) for p in sorted(glob.glob(text)) if Path(p).is_file()]
    path = Path(text)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and (p.suffix.lower() in SUFFIXES or _is_poscar(p)))
    return [path] if path.is_file() else []


def read_file(path: Path, setting: str) -> list[FileStructure]:
    """Every structure in one file; raises :class:`StructureFileError` naming ``setting`` and the file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            found = _read_json(path, setting)
        elif suffix in (".extxyz", ".xyz"):
            found = _read_extxyz(path)
        elif suffix == ".cif":
            found = _read_cif(path, setting)
        elif _is_poscar(path):
            found = _read_poscar(path)
        else:
            raise ValueError(
                f"unknown format {suffix or '(no suffix)'}: use .cif, POSCAR/CONTCAR (.vasp), .extxyz or .json"
            )
    except StructureFileError:
        raise
    except Exception as err:  # noqa: BLE001 - any parser failure is the file's problem, said in one line
        msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise StructureFileError(f"{setting}: {path}: cannot be read ({msg})") from None
    if not found:
        raise StructureFileError(f"{setting}: {path}: holds no structures")
    return found


def read_all(
    specs: Sequence[str | Path], chemsys: Sequence[str], setting: str, *, check_elements: bool = True
) -> list[FileStructure]:
    """The structures of every entry, checked against ``chemsys`` (unless ``check_elements`` is
    false: substitution parents are of other chemistries); an entry that names no file is an error,
    as is a structure outside the system or a disordered one."""
    out = []
    for spec in specs:
        paths = files_of(spec)
        if not paths:
            what = (
                "matches no file"
                if any(ch in str(spec) for ch in "*?[")
                else ("is a folder with no structure file" if Path(spec).is_dir() else "does not exist")
            )
            raise StructureFileError(f"{setting}: {spec} {what}")
        for path in paths:
            found = read_file(path, setting)
            check(found, chemsys if check_elements else None, setting)
            out += found
    return out


def check(found: Iterable[FileStructure], chemsys: Sequence[str] | None, setting: str) -> None:
    """Every structure ordered and inside the chemical system (None: any elements); raises naming
    the file."""
    for p in found:
        if not p.structure.is_ordered:
            raise StructureFileError(
                f"{setting}: {p.source}: {p.id} ({p.structure.composition.formula}) is "
                "disordered (partial occupancies): give an ordered cell"
            )
        outside = sorted({str(el) for el in p.structure.composition.elements} - set(chemsys or ()))
        if chemsys is not None and outside:
            raise StructureFileError(
                f"{setting}: {p.source}: {p.id} ({p.formula}) has {', '.join(outside)}, "
                f"outside the chemical system {'-'.join(chemsys)}"
            )


def _read_cif(path: Path, setting: str) -> list[FileStructure]:
    import warnings

    from pymatgen.io.cif import CifParser

    names = re.findall(r"^\s*data_(\S*)", path.read_text(errors="replace"), flags=re.MULTILINE)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # pymatgen keeps one block per name: the others would be lost without a word
        raise StructureFileError(
            f"{setting}: {path}: data block name repeated ({', '.join(repeated)}): "
            "give each structure its own data_ name"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns about every rounded occupancy
        structures = CifParser(path).parse_structures(primitive=False)
    return [FileStructure(f"{path.name}:{i}", s, str(path)) for i, s in enumerate(structures)]


def _read_poscar(path: Path) -> list[FileStructure]:
    from pymatgen.io.vasp import Poscar

    return [FileStructure(f"{path.name}:0", Poscar.from_file(path, check_for_potcar=False).structure, str(path))]


def _read_extxyz(path: Path) -> list[FileStructure]:
    from ase.io import read
    from pymatgen.io.ase import AseAtomsAdaptor

    out = []
    for i, atoms in enumerate(read(path, index=":", format="extxyz")):
        name = atoms.info.get("material_id") or atoms.info.get("id") or f"{path.name}:{i}"
        out.append(FileStructure(str(name), AseAtomsAdaptor.get_structure(atoms), str(path)))
    return out


def _read_json(path: Path, setting: str) -> list[FileStructure]:
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
                FileStructure(
                    str(entry.entry_id or f"{path.name}:{i}"),
                    entry.structure,
                    str(path),
                    float(entry.uncorrected_energy) if settings else None,
                    settings,
                )
            )
        elif kind == "Structure":
            out.append(FileStructure(f"{path.name}:{i}", Structure.from_dict(item), str(path)))
        else:
            raise StructureFileError(
                f"{setting}: {path}: item {i} is neither a pymatgen ComputedStructureEntry nor a Structure "
                f"(its @class is {kind!r})"
            )
    return out


def labelled_frames(file: str | Path, weight: float, chemsys: Sequence[str]) -> list[Atoms]:
    """``mlip.training.extra_data``: an extxyz's frames labelled for MACE (``REF_*`` and
    ``config_weight``: ``weight``); one line naming the file and frame when one cannot be used."""
    import numpy as np
    from ase import Atoms
    from ase.io import read

    path = Path(file)
    where = f"mlip.training.extra_data: {path}"
    if not path.is_file():
        raise StructureFileError(f"{where}: does not exist")
    try:
        frames = read(path, index=":", format="extxyz")
    except Exception as err:  # noqa: BLE001 - any parser failure is the file's problem, said in one line
        msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise StructureFileError(f"{where}: cannot be read as extxyz ({msg})") from None
    if not frames:
        raise StructureFileError(f"{where}: holds no frames")
    out = []
    for i, a in enumerate(frames):
        results = a.calc.results if a.calc is not None else {}
        energy = results.get("energy", a.info.get("REF_energy"))
        forces = results.get("forces", a.arrays.get("REF_forces"))
        stress = results.get("stress", a.info.get("REF_stress"))
        outside = sorted(set(a.get_chemical_symbols()) - set(chemsys))
        if outside:
            raise StructureFileError(f"{where}: frame {i} has {', '.join(outside)}, outside {'-'.join(chemsys)}")
        if energy is None or forces is None:
            raise StructureFileError(f"{where}: frame {i} has no {'energy' if energy is None else 'forces'}")
        if not np.isfinite(energy) or not np.all(np.isfinite(forces)):
            raise StructureFileError(f"{where}: frame {i} has a non-finite energy or force")
        b = Atoms(a.numbers, positions=a.positions, cell=a.cell, pbc=a.pbc)
        b.info.update(REF_energy=float(energy), config_weight=float(weight))
        b.arrays["REF_forces"] = np.asarray(forces, dtype=float)
        if stress is not None:
            b.info["REF_stress"] = np.asarray(stress, dtype=float)
        out.append(b)
    return out
