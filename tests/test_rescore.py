"""Rescore, do not re-relax: a new committee evaluates every candidate an earlier one relaxed where
that relaxation left it, and relaxes again only those that could be picked."""

from __future__ import annotations

import shutil

import numpy as np
from pymatgen.core.structure_matcher import StructureMatcher
from pymatgen.io.ase import AseAtomsAdaptor

from matdisc.config import CampaignConfig
from matdisc.executor import InProcess
from matdisc.records import USABLE, RelaxResult
from matdisc.round import run_campaign
from matdisc.stages.generate import candidate_atoms
from matdisc.stages.relax import record_relaxations, relax_again, split_pending
from matdisc.store import CampaignWriter, open_campaign


def test_the_split_relaxes_new_and_unusable_candidates_and_rescores_the_rest(campaign_store, tmp_path):
    cfg, _ = campaign_store
    shutil.copytree(cfg.store_path, tmp_path / "copy.zarr")
    with CampaignWriter(tmp_path / "copy.zarr") as w:
        pending = candidate_atoms(w)  # as a new committee sees them: nothing scored by it yet
        pending.append(("new-candidate", pending[0][1].copy()))  # and one no committee has relaxed
        relax, rescore = split_pending(w, True, pending)
        everything, none = split_pending(w, False, pending)
        frames, row_of = w.latest_frames("mlip")
        mlip = w.table("mlip")
    assert len(relax) + len(rescore) == len(pending) and rescore and ("new-candidate", pending[-1][1]) in relax
    assert len(everything) == len(pending) and none == []
    for cid, atoms, (status, _) in rescore:
        assert status == mlip["status"].iloc[row_of[cid]] and status in USABLE
        assert np.allclose(atoms.positions, frames.atoms(row_of[cid]).positions)  # its last relaxed structure
    for cid, _ in relax:
        assert cid == "new-candidate" or mlip["status"].iloc[row_of[cid]] not in USABLE


def test_a_new_committee_relaxes_again_only_rescored_candidates_ranked_where_the_round_could_pick_them(
    campaign_store, tmp_path
):
    """A committee that rescored every candidate at its last energy: it relaxes again exactly the
    open candidates among the lowest optimistic e_hull (the scores table's, computed by the score
    stage from the same energies), relax_again_per_pick x the DFT budget of them, each from its
    MLIP structure unless that left its generated type."""
    cfg, _ = campaign_store
    shutil.copytree(cfg.store_path, tmp_path / "copy.zarr")
    data = cfg.model_dump(mode="json")
    data["mlip"]["relax_again_per_pick"] = 2
    cfg = CampaignConfig.model_validate(data)
    sha = "f" * 64
    with CampaignWriter(tmp_path / "copy.zarr") as w:
        cand = w.candidates().set_index("id")
        frames, row_of = w.latest_frames("mlip")
        usable = [cid for cid in cand.index if cand.loc[cid, "mlip_status"] in USABLE]
        results = []
        for cid in usable:
            r = RelaxResult(cid, str(cand.loc[cid, "mlip_status"]), "", frames.atoms(row_of[cid]))
            r.energy = float(cand.loc[cid, "e_mlip_per_atom"]) * len(r.atoms)
            r.sigma = float(cand.loc[cid, "sigma"])
            results.append(r)
        record_relaxations(w, "r3/mlip/test-rescore", 3, results, sha, "rescore")
        again = dict(relax_again(w, cfg, sha, 3))
        initial = dict(candidate_atoms(w))
    n = 2 * cfg.active_learning.dft_budget
    optimistic = cand["e_hull_pred"] - cfg.active_learning.kappa * cand["sigma"].fillna(0)
    open_ = cand[(cand["dft_status"] == "") & np.isfinite(optimistic)].index
    ranked = optimistic[open_].sort_values(kind="stable")
    assert len(ranked) > n  # the rule has something to leave out
    assert set(again) == set(ranked.index[:n]) & set(usable)
    assert ranked[list(again)].max() <= ranked.iloc[n:].min()

    def same(x, y) -> bool:
        return len(x) == len(y) and np.allclose(x.cell.array, y.cell.array) and np.allclose(x.positions, y.positions)

    starts = [
        "mlip" if same(atoms, frames.atoms(row_of[cid])) else "initial" if same(atoms, initial[cid]) else "?"
        for cid, atoms in again.items()
    ]
    assert "?" not in starts, starts
    matcher = StructureMatcher()
    for cid, start in zip(again, starts):  # the generated structure only where the MLIP one left it
        moved = abs(frames.atoms(row_of[cid]).get_volume() / initial[cid].get_volume() - 1) > 0.2 or not matcher.fit(
            AseAtomsAdaptor.get_structure(initial[cid]), AseAtomsAdaptor.get_structure(frames.atoms(row_of[cid]))
        )
        assert (start == "initial") == moved, cid


def test_rescoring_keeps_the_hull_of_relaxing_everything_for_less_work(campaign_store, tmp_path):
    """The session's campaign (rescoring, through the flow) against the same rounds 1-2 relaxing
    every candidate again (in-process, from the same round-0 store): the same DFT hull and hits,
    every pick of round 2 relaxed by round 2's committee (none rests on a rescore alone), and less
    MLIP work (atom-steps) in round 2."""
    from conftest import store_after_cold_start

    cfg, summary = campaign_store
    store_after_cold_start(cfg.store_path, tmp_path / "rerelax.zarr")
    data = cfg.model_dump(mode="json")
    data["store"] = str(tmp_path / "rerelax.zarr")
    data["mlip"]["rescore"] = False
    rerelax = run_campaign(CampaignConfig.model_validate(data), InProcess())

    rescored, everything = open_campaign(cfg.store_path), open_campaign(tmp_path / "rerelax.zarr")
    assert rescored.rounds()["hull_phases"].iloc[-1] == everything.rounds()["hull_phases"].iloc[-1]
    assert sorted(h["id"] for h in summary["hits"]) == sorted(h["id"] for h in rerelax["hits"])

    def round2(camp):
        m = camp.table("mlip")
        return m[m["round"] == 2]

    a, b = round2(rescored), round2(everything)
    assert (a["kind"] == "rescore").sum() > 0 and (b["kind"] == "rescore").sum() == 0
    assert (a[a["kind"] == "rescore"]["n_steps"] == 0).all()
    again = set(a["id"][a["kind"] == "rescore"]) & set(a["id"][a["kind"] == "relax"])
    assert again, "round 2 relaxed none of its rescored candidates again"
    sel = rescored.table("selections")
    picks = sel[(sel["round"] == 2) & sel["kind"].isin(["exploit", "explore"])]["id"]
    assert len(picks) and set(picks) <= set(a["id"][a["kind"] == "relax"])
    work = {
        name: float((m["n_steps"] * camp_atoms(camp, m)).sum())
        for name, m, camp in (("rescored", a, rescored), ("everything", b, everything))
    }
    assert work["rescored"] < work["everything"], work


def camp_atoms(camp, rows) -> np.ndarray:
    n = dict(zip(camp.table("candidates")["id"], camp.table("candidates")["n_atoms"]))
    return np.array([n[c] for c in rows["id"]])
