"""Accuracy vs cost: the formation-energy deviation on known answers, GPAW settings compared on real
calculations, and ``matdisc tradeoff`` on EMT reference data (recorded, shown by status)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase.build import bulk
from conftest import emt_config

from matdisc.budget.tradeoff import dft_tradeoff, formation_deviation, parse_size, reference_options, spread_held_out
from matdisc.cli import main
from matdisc.config import CampaignConfig, ReferenceConfig
from matdisc.dft import run_reference, run_static, settings_hash
from matdisc.errors import UserError
from matdisc.generate import prototype_candidates
from matdisc.round import record_run
from matdisc.stages.generate import add_candidates, candidate_atoms
from matdisc.stages.verify import perturbed_seed_jobs, record_reference
from matdisc.store import CampaignWriter, open_campaign


def _structures():
    al, si = bulk("Al", "fcc", a=4.05), bulk("Si", "diamond", a=5.43)
    b2 = bulk("AlSi", "cesiumchloride", a=3.0)
    b2_big = b2 * (2, 1, 1)  # the same composition twice: a shift cannot absorb opposite errors
    return [al, si, b2, b2_big]


def test_formation_deviation_ignores_per_element_shifts_and_sees_the_rest():
    structures = _structures()
    reference = np.array([-4.1, -5.4, -4.6, -4.6])
    x_al = np.array([1.0, 0.0, 0.5, 0.5])
    shifted = reference + 0.3 * x_al - 0.1 * (1 - x_al)  # every Al 300 meV up, every Si 100 meV down
    assert formation_deviation(shifted, reference, structures) == pytest.approx(0.0, abs=1e-9)
    # +20 meV/atom on one AlSi, -20 on the other: the elements' shifts stay 0, residuals 0, 0, 20, 20
    wrong = reference + np.array([0.0, 0.0, 0.02, -0.02])
    assert formation_deviation(wrong, reference, structures) == pytest.approx(10.0)
    # as many structures as elements: any difference could be a shift, so no error can be measured
    assert np.isnan(formation_deviation(wrong[:2], reference[:2], structures[:2]))


def test_sizes_and_presets_are_checked_before_any_work():
    assert parse_size("16x0e") == (16, 0) and parse_size("32x1o") == (32, 1) and parse_size(" 8x2 ") == (8, 2)
    for bad in ("x16", "16", "2x0e", "16x4e"):
        with pytest.raises(UserError, match="bad model size"):
            parse_size(bad)
    cfg = CampaignConfig(name="t", chemsys=["Al", "Si"], reference={"calculator": "gpaw", "ecut": 200.0})
    options = reference_options(cfg, ["accurate", "fast"])
    assert list(options) == ["fast", "accurate"]  # cheapest first: errors are measured against the last
    assert options["accurate"].resolved().ecut == 520.0 and options["fast"].resolved().max_steps == 0
    with pytest.raises(UserError, match="unknown reference preset 'tight'"):
        reference_options(cfg, ["fast", "tight"])


def test_held_out_structures_spread_over_cell_sizes():
    frames = [bulk("Cu", "fcc", a=3.6) * (n, 1, 1) for n in (1, 1, 2, 2, 3, 3, 4, 4)]
    groups = ["a1", "b1", "a2", "b2", "a3", "b3", "a4", "b4"]
    frames, groups = frames + frames[:1], groups + ["a1"]  # a structure's frames count once
    assert spread_held_out(frames, groups) == {"a2", "a4"}


def test_gpaw_settings_are_compared_on_the_same_structures(tmp_path):
    """A coarse and a finer GPAW setting on 4 Al-Si cells: the finer one is the reference (error 0),
    the coarse one deviates by a finite amount, and costs less per calculation."""
    coarse = ReferenceConfig(calculator="gpaw", ecut=200.0, kpoint_density=1.5, max_steps=0, isolate=False)
    fine = ReferenceConfig(calculator="gpaw", ecut=350.0, kpoint_density=3.0, max_steps=0, isolate=False)
    structures = [(f"s{i}", a) for i, a in enumerate(_structures()[:3])] + [("s3", bulk("Al", "bcc", a=3.25))]
    out = {o.option: o for o in dft_tradeoff(structures, {"coarse": coarse, "fine": fine}, tmp_path)}
    assert out["fine"].error_mev_per_atom == 0.0 and out["fine"].against == "fine"
    assert 0.1 < out["coarse"].error_mev_per_atom < 500  # meV/atom: a real but bounded discretisation error
    assert out["coarse"].failed == out["fine"].failed == 0
    assert out["coarse"].seconds < out["fine"].seconds
    assert out["coarse"].relative_cost == 1.0 and out["fine"].relative_cost > 1.0


def _emt_reference_store(tmp_path: Path) -> CampaignConfig:
    """Cu-Pd prototypes of 1-4 atoms relaxed with EMT and rattled copies of them (real calculations,
    recorded as a cold start records them): what ``matdisc tradeoff`` reads of a campaign.
    (Not the session campaign: its test group already holds the suite's longest tests.)"""
    cfg = CampaignConfig.model_validate(emt_config(tmp_path))
    cands = [c for c in prototype_candidates(cfg.chemsys, cfg.generation,
                                             names=["fcc", "bcc", "hcp", "B2", "L1_0", "L1_2", "D0_19"])
             if len(c.structure) <= 4]
    settings = settings_hash(cfg.reference)
    with CampaignWriter(cfg.store_path) as w:
        record_run(w, cfg)
        add_candidates(w, cands, 0, "prototype")
        for cid, atoms in candidate_atoms(w):
            res = run_reference(atoms, cfg.reference, id=cid, workdir=w.path / "calculations" / "r0")
            assert res.ok, res.reason
            record_reference(w, 0, res, settings, verified=True)
        for jid, atoms in perturbed_seed_jobs(w, cfg):  # rattled statics: frames with forces, as a cold start
            res = run_static(atoms, cfg.reference, id=jid, workdir=w.path / "calculations" / "r0")
            record_reference(w, 0, res, settings, verified=False)
    return cfg


def test_tradeoff_command_measures_records_and_status_shows_it(tmp_path, capsys):
    cfg = _emt_reference_store(tmp_path)
    store = cfg.store_path
    data = cfg.model_dump(mode="json")
    data["mlip"]["training"]["max_num_epochs"] = 4  # a quick comparison
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(data))
    before = {t: len(open_campaign(store).table(t)) for t in ("dft", "frames", "candidates", "models")}

    assert main(["tradeoff", str(path), "--sizes", "8x0e,12x0e", "--structures", "4", "--json"]) == 0
    rows = {(r["kind"], r["option"]): r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {("dft", "fast"), ("dft", "accurate"), ("mlip", "8x0e"), ("mlip", "12x0e")}
    # EMT has no cutoff or k-points: both presets give the same energies, a true error of zero
    assert rows[("dft", "fast")]["error_mev_per_atom"] == pytest.approx(0.0, abs=1e-6)
    assert rows[("dft", "fast")]["n_structures"] == 4
    for size in ("8x0e", "12x0e"):
        r = rows[("mlip", size)]
        # held out: structures of every size, so forces are measured too (one-atom cells have none)
        assert 0 < r["error_mev_per_atom"] < 1000 and 1e-4 < r["forces_rmse"] < 10 and r["seconds"] > 0
        assert r["infer_us_per_atom"] >= 0
    assert min(rows[("mlip", s)]["relative_cost"] for s in ("8x0e", "12x0e")) == 1.0

    after = open_campaign(store)
    assert {t: len(after.table(t)) for t in before} == before  # only the tradeoffs table is written
    assert len(after.table("tradeoffs")) == 4
    assert main(["status", str(store), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["tradeoffs"]
    assert {(r["kind"], r["option"]) for r in shown} == set(rows)


def test_tradeoff_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "chemsys": ["Cu"], "store": str(tmp_path / "none.zarr")}))
    assert main(["tradeoff", str(path)]) == 2
    assert "no campaign store" in capsys.readouterr().err
    Path(tmp_path / "none.zarr").mkdir()
    assert main(["tradeoff", str(path), "--structures", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["matdisc: --structures: must be at least 2"]
