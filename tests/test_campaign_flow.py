"""The whole campaign flow: Prefect (test harness) + Dask LocalCluster + EMT + tiny MACE."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from matdisc.store import open_campaign


def test_store_holds_candidates_mlip_and_dft(campaign_store):
    cfg, _ = campaign_store
    camp = open_campaign(cfg.store_path)
    cand = camp.candidates()
    assert len(cand) >= 15
    assert set(cand["round"]) == {0, 1, 2}  # seeds in round 0, generated in rounds 1 and 2
    # the library is exhausted in round 1 (dedup against the store); round 2 is random search
    # and substitution into round 1's hits, each candidate with its provenance
    assert set(cand[cand["round"] == 0]["source"]) == {"seed", "known"}  # known: B32 CuPd (test_known_phases)
    assert set(cand[cand["round"] == 2]["source"]) <= {"random", "substitution"}
    assert (cand[cand["source"] == "random"]["spacegroup"] >= 2).all()
    verified = cand[cand["dft_status"] == "ok"]
    assert len(verified) >= len(cand[cand["round"] == 0])  # every seed, plus the picks
    assert verified["e_dft_per_atom"].notna().all()
    relaxed = cand[cand["mlip_status"].isin(["ok", "symmetry_changed"])]
    assert relaxed["e_mlip_per_atom"].notna().all() and len(relaxed) >= 0.8 * len(cand)
    # a two-member committee: every relaxed candidate carries its energy and force spread; forces
    # vanish by symmetry in high-symmetry cells for every member, so only some have a force spread
    assert (relaxed["sigma"] > 0).all() and (relaxed["force_std"] >= 0).all()
    assert (relaxed["force_std"] > 1e-4).sum() >= 5
    # a verified candidate has MLIP and DFT energies; the relaxed DFT structure reads back
    cid = verified[verified["round"] == 1]["id"].iloc[0]
    s = camp.structure(cid, "dft")
    assert s.composition.reduced_formula == verified.set_index("id").loc[cid, "formula"]


def test_a_retrained_model_per_round_with_sha256(campaign_store):
    cfg, _ = campaign_store
    camp = open_campaign(cfg.store_path)
    models = camp.models()
    assert list(models["round"]) == [0, 1, 2]
    assert models["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert models["sha256"].nunique() == 3
    assert (models["n_train_frames"].diff().dropna() > 0).all()  # DFT frames join the training set
    # round 0 trains from scratch, later rounds fine-tune the previous model; held-out errors recorded
    assert list(models["mode"]) == ["scratch", "naive", "naive"]
    assert (models["forces_rmse"] > 0).all() and (models["forces_rmse"] < 0.5).all()
    assert (models["elements"] == '["Cu", "Pd"]').all() and (models["r_max"] == 4.5).all()
    for paths in models["paths"]:
        assert len(json.loads(paths)) == 2  # committee members
        for p in json.loads(paths):
            assert (cfg.store_path / p).is_file()
    rounds = camp.rounds()
    assert list(rounds["round"]) == [0, 1, 2]
    sha = list(models["sha256"])
    assert list(rounds["model_sha256"]) == [sha[0], sha[0], sha[1]]  # round r is screened by model r-1
    assert list(rounds["trained_model_sha256"]) == sha  # ... and ends by training model r
    assert np.allclose(rounds["trained_forces_rmse"][1:], models["forces_rmse"][1:])
    mlip = camp.table("mlip")
    assert set(mlip[mlip["round"] == 2]["model_sha256"]) == {sha[1]}  # every result names its model


def test_a_verified_compound_lies_on_the_emt_hull_below_the_elements(campaign_store):
    cfg, summary = campaign_store
    cand = open_campaign(cfg.store_path).candidates()
    hits = cand[cand["is_hit"]]
    assert len(hits) >= 1
    assert (hits["e_hull_dft"] <= 1e-9).all() and (hits["e_form_dft"] < 0).all()
    # independent check of one hit against EMT itself
    from ase.calculators.emt import EMT
    from pymatgen.io.ase import AseAtomsAdaptor

    camp = open_campaign(cfg.store_path)
    hit = hits.iloc[0]
    atoms = AseAtomsAdaptor.get_atoms(camp.structure(hit["id"], "dft"))
    atoms.calc = EMT()
    assert np.isclose(atoms.get_potential_energy() / len(atoms), hit["e_dft_per_atom"], atol=1e-6)
    assert {h["formula"] for h in summary["hits"]} == set(hits["formula"])


def test_status_json_reports_the_store_counts(campaign_store):
    cfg, _ = campaign_store
    out = subprocess.run([sys.executable, "-m", "matdisc.cli", "status", str(cfg.store_path), "--json"],
                         capture_output=True, text=True, check=True)
    status = json.loads(out.stdout)
    camp = open_campaign(cfg.store_path)
    cand, mlip, dft = camp.candidates(), camp.table("mlip"), camp.table("dft")
    for row in status["rounds"]:
        r = row["round"]
        assert row["candidates"] == int((cand["round"] == r).sum())
        assert row["dft_verified"] == int(((dft["round"] == r) & (dft["status"] == "ok")).sum())
        usable = mlip["status"].isin(["ok", "symmetry_changed"])
        assert row["relaxed"] == int(((mlip["round"] == r) & usable).sum())
        # every MLIP result of the flow came from the batched engine, and status says so
        n_mlip = int((mlip["round"] == r).sum())
        assert row["mlip_engines"] == ({"torch-sim": n_mlip} if n_mlip else {})
    assert len(status["hits"]) == int(cand["is_hit"].sum())
    assert status["rounds"][-1]["hits"] == int(cand["is_hit"].sum())
    r1 = status["rounds"][1]
    assert r1["mae_mev_per_atom"] is not None and r1["mae_mev_per_atom"] >= 0


def test_discovery_metrics_per_round(campaign_store):
    cfg, _ = campaign_store
    camp = open_campaign(cfg.store_path)
    rounds = camp.rounds().set_index("round")
    sel = camp.table("selections")
    assert set(sel["strategy"]) == {"uncertainty"} and sel["e_hull_pred"].notna().all()
    for r in (1, 2):
        picks = sel[sel["round"] == r]
        assert 0 < len(picks) <= cfg.active_learning.dft_budget
        assert rounds.loc[r, "dft_calls"] == len(picks)
        assert picks["id"].nunique() == len(picks)
        assert rounds.loc[r, "dft_calls_total"] == int((sel["round"] <= r).sum())
        # the screening and the retrained committee, on the round's new DFT structures
        assert rounds.loc[r, "mae_before_mev"] >= 0 and rounds.loc[r, "mae_after_mev"] >= 0
        assert 0 <= rounds.loc[r, "hit_rate"] <= 1
        assert json.loads(rounds.loc[r, "hull_phases"]) == sorted(json.loads(rounds.loc[r, "hull_phases"]))
    # hull changes chain up: each round's hull is the last one plus new minus removed phases
    prev: set[str] = set(json.loads(rounds.loc[0, "hull_phases"]))
    for r in (1, 2):
        now = set(json.loads(rounds.loc[r, "hull_phases"]))
        assert now == (prev | set(json.loads(rounds.loc[r, "new_phases"]))) - set(json.loads(rounds.loc[r, "removed_phases"]))
        prev = now
    cand = camp.candidates()
    assert prev == set(cand["formula"][cand["is_hit"]])
    status = camp.summary()["rounds"]  # what `matdisc status --json` prints
    assert [r["dft_calls"] for r in status] == [int(rounds.loc[r, "dft_calls"]) for r in (0, 1, 2)]
    assert status[-1]["hull_phases"] == sorted(prev)


def test_campaign_hull_matches_the_exhaustive_emt_hull(campaign_store, tmp_path):
    """Relax every candidate the campaign generated with the same EMT protocol: the campaign's
    verified hull must hold exactly the phases of that exhaustive hull, at the same energies."""
    from pymatgen.core import Composition
    from pymatgen.io.ase import AseAtomsAdaptor

    from matdisc.dft import run_reference
    from matdisc.thermo import hull_energies

    cfg, _ = campaign_store
    camp = open_campaign(cfg.store_path)
    cand = camp.candidates()
    energies = []
    for cid in cand["id"]:
        res = run_reference(AseAtomsAdaptor.get_atoms(camp.structure(cid, "initial")), cfg.reference, id=cid,
                            workdir=tmp_path)
        energies.append(res.energy_per_atom if res.status == "ok" else np.nan)
    e_form, e_hull = hull_energies(list(cand["formula"]), energies, cfg.chemsys)
    compound = np.array([len(Composition(f).elements) > 1 for f in cand["formula"]])
    on_hull = compound & (e_form < 0) & (e_hull <= 1e-4)
    true_phases = set(cand["formula"][on_hull])
    assert len(true_phases) >= 2
    hits = cand[cand["is_hit"]]
    assert set(hits["formula"]) == true_phases
    best = {f: min(e for e, ff, ok in zip(energies, cand["formula"], on_hull) if ok and ff == f) for f in true_phases}
    for f, e in zip(hits["formula"], hits["e_dft_per_atom"]):
        assert e == pytest.approx(best[f], abs=2e-3)
    assert len(cand[cand["dft_status"] != ""]) < len(cand)  # found without verifying everything


def test_task_runs_are_named_by_stage_and_candidate(campaign_store):
    """The Prefect UI lists task runs by name: each says its stage and the candidate it computed
    (a batch: its first candidate and how many more), not only the task's name."""
    import asyncio

    from prefect.client.orchestration import get_client

    cfg, _ = campaign_store

    async def names() -> list[str]:
        found: list[str] = []
        async with get_client() as client:
            while page := await client.read_task_runs(limit=200, offset=len(found)):
                found += [t.name for t in page]
        return found

    runs = asyncio.run(names())
    camp = open_campaign(cfg.store_path)
    assert {f"dft {cid}" for cid in camp.table("dft")["id"]} <= set(runs)  # a reference run per verified candidate
    ids = set(camp.table("mlip")["id"])
    relax = [n for n in runs if n.startswith("relax ") and n.split()[1] in ids]
    assert relax and all(len(n.split()) == 2 or n.split()[2][1:].isdigit() for n in relax)
    assert any(len(n.split()) == 3 for n in relax)  # a batch says how many more it relaxed


def test_the_flow_takes_a_typed_config_so_the_ui_shows_a_form():
    """The flow's parameter is the config model: Prefect's parameter schema (what the UI renders as a
    form for a custom run) has every section and field with its description, not an untyped dict."""
    from prefect.utilities.callables import parameter_schema

    from matdisc.config import CampaignConfig, MLIPConfig
    from matdisc_flows.campaign import campaign_flow

    schema = parameter_schema(campaign_flow.fn).model_dump()
    assert schema["properties"]["config"]["$ref"] == "#/definitions/CampaignConfig"
    assert schema["required"] == ["config"]
    mlip = schema["definitions"]["MLIPConfig"]["properties"]
    assert set(mlip) == set(MLIPConfig.model_fields)
    assert mlip["ensemble"]["description"] == MLIPConfig.model_fields["ensemble"].description
    assert set(schema["definitions"]["CampaignConfig"]["properties"]) == set(CampaignConfig.model_fields)
