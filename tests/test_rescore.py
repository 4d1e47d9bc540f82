"""Rescore, do not re-relax: a new committee relaxes again only what can change the round's picks,
and evaluates every other candidate where its last relaxation left it."""

from __future__ import annotations

import numpy as np

from matdisc.config import CampaignConfig
from matdisc.executor import InProcess
from matdisc.records import USABLE
from matdisc.round import run_campaign
from matdisc.store import CampaignWriter, open_campaign


def test_the_split_relaxes_new_unusable_and_near_hull_candidates_and_rescores_the_rest(campaign_store, tmp_path):
    import shutil

    from matdisc.stages.generate import candidate_atoms
    from matdisc.stages.relax import split_pending

    cfg, _ = campaign_store
    shutil.copytree(cfg.store_path, tmp_path / "copy.zarr")
    with CampaignWriter(tmp_path / "copy.zarr") as w:
        pending = candidate_atoms(w)  # as a new committee sees them: nothing scored by it yet
        relax, rescore = split_pending(w, 0.1, pending)
        everything, none = split_pending(w, None, pending)
        frames, row_of = w.latest_frames("mlip")
        mlip, cand = w.table("mlip"), w.candidates().set_index("id")
    assert len(relax) + len(rescore) == len(pending) and rescore and relax
    assert len(everything) == len(pending) and none == []
    for cid, atoms, (status, _) in rescore:
        assert cand.loc[cid, "e_hull_pred"] > 0.1
        assert status == mlip["status"].iloc[row_of[cid]] and status in USABLE
        assert np.allclose(atoms.positions, frames.atoms(row_of[cid]).positions)  # its last relaxed structure
    for cid, atoms in relax:
        usable = mlip["status"].iloc[row_of[cid]] in USABLE
        assert not usable or not cand.loc[cid, "e_hull_pred"] > 0.1


def test_rescoring_keeps_the_hull_of_relaxing_everything_for_less_work(campaign_store, tmp_path):
    """The session's campaign (rescoring beyond 0.1 eV/atom, through the flow) against the same
    rounds 1-2 relaxing every candidate again (in-process, from the same round-0 store): the same
    DFT hull and hits, and round 2's MLIP work (atom-steps) is smaller with rescoring."""
    from conftest import store_after_cold_start

    cfg, summary = campaign_store
    store_after_cold_start(cfg.store_path, tmp_path / "rerelax.zarr")
    data = cfg.model_dump(mode="json")
    data["store"] = str(tmp_path / "rerelax.zarr")
    data["mlip"]["rescore_window"] = None
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
    work = {name: float((m["n_steps"] * camp_atoms(camp, m)).sum()) for name, m, camp in
            (("rescored", a, rescored), ("everything", b, everything))}
    assert work["rescored"] < work["everything"], work


def camp_atoms(camp, rows) -> np.ndarray:
    n = dict(zip(camp.table("candidates")["id"], camp.table("candidates")["n_atoms"]))
    return np.array([n[c] for c in rows["id"]])
