"""``matdisc export``: the session's EMT campaign in each format, read back with the tool that
format is for (pandas, ASE, pymatgen), and compared with the store."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from ase.calculators.emt import EMT
from ase.io import read

from matdisc.cli import main
from matdisc.store import open_campaign


def test_tables_read_back_with_pandas_with_every_candidate_column(campaign_store, tmp_path, capsys):
    cfg, _ = campaign_store
    cand = open_campaign(cfg.store_path).candidates()
    assert main(["export", str(cfg.store_path), "--format", "csv", "--out", str(tmp_path / "c.csv")]) == 0
    assert f"{len(cand)} candidate(s) written" in capsys.readouterr().out
    back = pd.read_csv(tmp_path / "c.csv", keep_default_na=False, na_values=[""])
    assert list(back.columns) == list(cand.columns) and list(back["id"]) == list(cand["id"])
    assert np.allclose(back["e_dft_per_atom"], cand["e_dft_per_atom"].astype(float), equal_nan=True)
    assert main(["export", str(cfg.store_path), "--format", "parquet", "--hits", "--out", str(tmp_path / "h.pq")]) == 0
    hits = pd.read_parquet(tmp_path / "h.pq")
    assert len(hits) >= 1 and set(hits["id"]) == set(cand["id"][cand["is_hit"].astype(bool)])
    # the prediction table: the MLIP's formation energy beside the DFT truth, truth only where DFT is ok
    assert main(["export", str(cfg.store_path), "--format", "matbench", "--out", str(tmp_path / "m.csv")]) == 0
    mb = pd.read_csv(tmp_path / "m.csv").set_index("material_id")
    ok = cand.set_index("id")["dft_status"] == "ok"
    assert mb["e_form_per_atom_dft"][~ok].isna().all() and mb["e_form_per_atom_dft"][ok].notna().all()
    assert np.allclose(mb["e_form_per_atom_mlip"], cand.set_index("id")["e_form_mlip"].astype(float), equal_nan=True)


def test_structures_carry_the_dft_energy_forces_and_stress_and_read_back_with_ase(campaign_store, tmp_path):
    """The extxyz of the DFT stage: each verified candidate's last DFT configuration with its energy,
    forces and stress. EMT is the campaign's reference, so recomputing EMT on the structure read
    back must give those numbers."""
    cfg, _ = campaign_store
    cand = open_campaign(cfg.store_path).candidates().set_index("id")
    out = tmp_path / "dft.extxyz"
    assert main(["export", str(cfg.store_path), "--format", "extxyz", "--out", str(out)]) == 0
    frames = read(out, index=":")
    assert {a.info["id"] for a in frames} == set(cand.index[cand["dft_status"] == "ok"])
    for atoms in frames[:6]:
        energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = EMT()
        assert energy == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
        assert np.allclose(forces, atoms.get_forces(), atol=1e-5) and np.allclose(stress, atoms.get_stress(), atol=1e-6)
        # the relaxed structure DFT ended at is the one the store reports per atom
        assert energy / len(atoms) == pytest.approx(cand.loc[atoms.info["id"], "e_dft_per_atom"], abs=1e-6)
    # CIF and POSCAR folders of the MLIP-relaxed structures read back with pymatgen
    from pymatgen.core import Structure

    assert main(["export", str(cfg.store_path), "--format", "cif", "--stage", "mlip", "--out", str(tmp_path / "cif")]) == 0
    cifs = sorted((tmp_path / "cif").glob("*.cif"))
    relaxed = cand.index[cand["mlip_status"].fillna("") != ""]
    assert len(cifs) == len(relaxed) and Structure.from_file(cifs[0]).composition.reduced_formula
    assert main(["export", str(cfg.store_path), "--format", "poscar", "--stage", "initial", "--out",
                 str(tmp_path / "poscar")]) == 0
    assert len(list((tmp_path / "poscar").glob("*.vasp"))) == len(cand)


def test_entries_feed_pymatgen_phase_diagram_tools_with_the_campaigns_hull(campaign_store, tmp_path):
    """ComputedStructureEntry JSON: pymatgen's PhaseDiagram built from it puts the same candidates
    on the hull, at the same distances, as the campaign's own DFT hull."""
    from pymatgen.analysis.phase_diagram import PhaseDiagram
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    cfg, _ = campaign_store
    cand = open_campaign(cfg.store_path).candidates().set_index("id")
    out = tmp_path / "entries.json"
    assert main(["export", str(cfg.store_path), "--format", "entries", "--out", str(out)]) == 0
    entries = [ComputedStructureEntry.from_dict(d) for d in json.loads(out.read_text())]
    assert {e.entry_id for e in entries} == set(cand.index[cand["dft_status"] == "ok"])
    assert all(len(e.parameters["settings_hash"]) > 0 for e in entries)
    pd_ = PhaseDiagram(entries)
    for e in entries:
        assert pd_.get_e_above_hull(e) == pytest.approx(cand.loc[e.entry_id, "e_hull_dft"], abs=1e-6), e.entry_id


def test_a_bad_export_request_is_one_line(campaign_store, tmp_path, capsys):
    cfg, _ = campaign_store
    (tmp_path / "afile").write_text("x")
    for args, words in ((["--format", "xlsx"], "--format: 'xlsx' is not one of"),
                        (["--format", "extxyz", "--stage", "final"], "--stage: 'final' is not one of"),
                        (["--format", "cif", "--out", str(tmp_path / "afile" / "cifs")], "--out: ")):
        assert main(["export", str(cfg.store_path), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
