"""A campaign's results in the formats other tools read: tables (CSV, parquet), structures (extxyz
with energies, forces and stress; CIF; POSCAR), pymatgen ``ComputedStructureEntry`` JSON for
phase-diagram tools, and a matbench-discovery-style prediction table (the MLIP's prediction
beside the DFT truth). The store is only read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from matdisc.errors import UserError
from matdisc.store import Campaign, open_campaign

#: format -> what it writes: a file (with this suffix) or a folder of one file per structure.
FORMATS = {
    "csv": ".csv",
    "parquet": ".parquet",
    "extxyz": ".extxyz",
    "entries": ".json",
    "matbench": ".csv",
    "cif": "/",
    "poscar": "/",
}
STAGES = ("initial", "mlip", "dft")


def export(
    store: str | Path, fmt: str, out: str | Path | None = None, *, stage: str = "dft", hits: bool = False
) -> tuple[Path, int]:
    """Write the campaign's candidates (``hits``: only the verified stable ones) in ``fmt``;
    returns (where it was written, how many candidates)."""
    if fmt not in FORMATS:
        raise UserError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if stage not in STAGES:
        raise UserError(f"--stage: {stage!r} is not one of {', '.join(STAGES)}")
    camp = open_campaign(store)
    cand = camp.candidates()
    if hits:
        cand = cand[cand["is_hit"].fillna(False).astype(bool)]
    suffix = FORMATS[fmt]
    name = Path(str(camp.location).rstrip("/")).name.removesuffix(".zarr")
    default = f"{name}-{stage + '-' if fmt in ('extxyz', 'cif', 'poscar') else ''}{fmt}"
    path = Path(out) if out else Path.cwd() / (default + ("" if suffix == "/" else suffix))
    if fmt == "csv":
        cand.to_csv(path, index=False)
    elif fmt == "parquet":
        cand.to_parquet(path, index=False)
    elif fmt == "matbench":
        matbench_table(cand).to_csv(path, index=False)
    elif fmt == "entries":
        entries = computed_entries(camp, cand)
        path.write_text(json.dumps([e.as_dict() for e in entries]))
        return path, len(entries)
    elif fmt == "extxyz":
        atoms = labelled_structures(camp, cand, stage)
        from ase.io import write

        write(path, atoms, format="extxyz")
        return path, len(atoms)
    else:
        return path, _structure_files(camp, cand, stage, path, fmt)
    return path, len(cand)


def matbench_table(cand: pd.DataFrame) -> pd.DataFrame:
    """One row per candidate: the MLIP's prediction and the DFT truth (eV/atom), as
    matbench-discovery compares them (``e_form_per_atom_mlip`` vs ``e_form_per_atom_dft``)."""
    return pd.DataFrame(
        {
            "material_id": cand["id"],
            "formula": cand["formula"],
            "e_form_per_atom_mlip": cand["e_form_mlip"],
            "e_above_hull_mlip": cand["e_hull_mlip"],
            "e_form_per_atom_dft": cand["e_form_dft"].where(cand["dft_status"] == "ok"),
            "e_above_hull_dft": cand["e_hull_dft"].where(cand["dft_status"] == "ok"),
            "mlip_status": cand["mlip_status"],
            "dft_status": cand["dft_status"],
        }
    )


def computed_entries(camp: Campaign, cand: pd.DataFrame) -> list:
    """pymatgen ComputedStructureEntry of every DFT-verified candidate: its relaxed structure and
    total energy, with the settings hash and the campaign's calculator in ``parameters``."""
    from pymatgen.entries.computed_entries import ComputedStructureEntry
    from pymatgen.io.ase import AseAtomsAdaptor

    ok = cand[cand["dft_status"] == "ok"]
    structures = camp.structures("dft")
    runs = camp.runs()
    calculator = json.loads(runs["calculator"].iloc[-1]) if not runs.empty else {}
    entries = []
    for row in ok.to_dict("records"):
        atoms = structures[row["id"]]
        entries.append(
            ComputedStructureEntry(
                AseAtomsAdaptor.get_structure(atoms),
                float(row["e_dft_per_atom"]) * len(atoms),
                parameters={"settings_hash": row["settings_hash"], "calculator": calculator},
                data={"e_above_hull": row["e_hull_dft"], "source": row["source"], "round": int(row["round"])},
                entry_id=row["id"],
            )
        )
    return entries


def labelled_structures(camp: Campaign, cand: pd.DataFrame, stage: str) -> list:
    """Each candidate's ``stage`` structure as ASE Atoms; ``mlip`` carries the committee's
    energy, ``dft`` the DFT energy, forces and stress of the calculation's last configuration
    (its relaxed structure), from the training frames of the campaign's reference settings."""
    from ase.calculators.singlepoint import SinglePointCalculator

    out = []
    if stage == "dft":
        frames_table = camp.table("frames")
        frames = camp.frames("frames") if not frames_table.empty else None
        latest = {key: i for i, key in enumerate(zip(frames_table["id"], frames_table["settings_hash"]))}
        last = {
            row["id"]: latest[(row["id"], row["settings_hash"])]
            for row in cand[cand["dft_status"] == "ok"].to_dict("records")
            if (row["id"], row["settings_hash"]) in latest
        }
        for row in cand[cand["id"].isin(list(last))].to_dict("records"):
            i = last[row["id"]]
            assert frames is not None
            atoms = frames.atoms(i)
            atoms.calc = SinglePointCalculator(
                atoms,
                energy=float(frames_table["energy"].iloc[i]),
                forces=frames.forces_of(i),
                stress=np.asarray(frames_table["stress"].iloc[i], dtype=float),
            )
            atoms.info.update(id=row["id"], formula=row["formula"], e_form_per_atom=float(row["e_form_dft"]))
            out.append(atoms)
        return out
    structures = camp.structures(stage)
    for row in cand[cand["id"].isin(list(structures))].to_dict("records"):
        atoms = structures[row["id"]]
        if stage == "mlip" and np.isfinite(row["e_mlip_per_atom"]):
            atoms.calc = SinglePointCalculator(atoms, energy=float(row["e_mlip_per_atom"]) * len(atoms))
        atoms.info.update(id=row["id"], formula=row["formula"])
        out.append(atoms)
    return out


def _structure_files(camp: Campaign, cand: pd.DataFrame, stage: str, folder: Path, fmt: str) -> int:
    """One CIF or POSCAR per candidate with a ``stage`` structure (``folder/<id>.cif``, ``.vasp``)."""
    from matdisc.analysis import export_structures
    from matdisc.store.campaign import STAGES

    have = set(camp.table(STAGES[stage])["id"])
    return len(export_structures(camp, [c for c in cand["id"] if c in have], folder, fmt, stage))
