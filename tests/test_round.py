"""The round without an engine: the in-process executor runs the same campaign the Prefect + Dask
flow runs, and stores the same science."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from matdisc.config import CampaignConfig
from matdisc.executor import InProcess
from matdisc.round import run_campaign
from matdisc.store import open_campaign


def test_an_in_process_campaign_stores_what_the_prefect_dask_flow_stores(campaign_store, tmp_path):
    """Rounds 1 and 2 of the session's EMT Cu-Pd campaign, run again from its round-0 state by the
    in-process executor: the same candidates, committees, energies, picks and hull as the flow's.
    (Round 0 runs the same stage functions; starting after it keeps this test to half a campaign.)"""
    from conftest import store_after_cold_start

    cfg, flow_summary = campaign_store
    store_after_cold_start(cfg.store_path, tmp_path / "in-process.zarr")
    data = cfg.model_dump(mode="json")
    data["store"] = str(tmp_path / "in-process.zarr")
    here = CampaignConfig.model_validate(data)
    executor = InProcess()
    summary = run_campaign(here, executor)

    # every kind of job a round has ran, on the kind of worker the flow routes it to
    assert set(executor.jobs) == {
        ("dft", "reference"), ("mlip", "relax"), ("mlip", "rescore"), ("mlip", "train"), ("mlip", "evaluate"),
        ("mlip", "hessians")}
    flow, mine = open_campaign(cfg.store_path), open_campaign(here.store_path)
    a, b = flow.candidates().set_index("id").sort_index(), mine.candidates().set_index("id").sort_index()
    assert list(a.index) == list(b.index) and set(a["round"]) == {0, 1, 2}
    for col in ("formula", "round", "source", "prototype", "mlip_status", "dft_status", "is_hit"):
        assert list(a[col]) == list(b[col]), col
    # training is deterministic for a seed on one thread: the same committees, so the same energies
    assert list(flow.models()["sha256"]) == list(mine.models()["sha256"]) and len(flow.models()) == 3
    for col in ("e_mlip_per_atom", "sigma", "e_dft_per_atom", "e_hull_dft"):
        assert np.allclose(a[col].astype(float), b[col].astype(float), atol=1e-6, equal_nan=True), col
    sel_a, sel_b = flow.table("selections"), mine.table("selections")
    assert list(sel_a["id"]) == list(sel_b["id"]) and len(sel_a) == 6  # the same picks, in order
    cols = ["round", "candidates", "relaxed", "dft_verified", "hits", "model_sha256", "hull_phases"]
    pd.testing.assert_frame_equal(flow.rounds()[cols], mine.rounds()[cols])
    assert summary["hits"] == flow_summary["hits"]
    # the engine is the only difference: this run has no Prefect id (the copied round-0 run has)
    assert mine.runs()["orchestrator_run"].iloc[-1] == "" and flow.runs()["orchestrator_run"].iloc[-1] != ""


def test_a_failing_job_is_recorded_and_the_stage_goes_on(tmp_path):
    """A job that raises (a worker lost for good, a bug) is the job's failure: recorded with its
    reason, and the other calculations of the stage still land."""
    from ase.build import bulk
    from conftest import emt_config

    from matdisc import jobs
    from matdisc.stages.context import Run
    from matdisc.stages.verify import reference_stage
    from matdisc.store import CampaignWriter

    class Flaky(InProcess):
        def submit(self, fn, *args, resource):
            if fn is jobs.reference and args[0] == "ag":
                fn = _lost_worker
            return super().submit(fn, *args, resource=resource)

    cfg = CampaignConfig.model_validate(emt_config(tmp_path))
    picks = [("cu", bulk("Cu", "fcc", a=3.6)), ("ag", bulk("Ag", "fcc", a=4.1)), ("pd", bulk("Pd", "fcc", a=3.9))]
    with CampaignWriter(cfg.store_path) as w:
        reference_stage(Run(w, cfg, Flaky()).round(1), picks, verified=True)
    dft = open_campaign(cfg.store_path).table("dft").set_index("id")
    assert list(dft.index) == ["cu", "ag", "pd"]
    assert list(dft["status"]) == ["ok", "error", "ok"]
    assert "worker lost" in dft.loc["ag", "reason"]


def _lost_worker(*args):
    raise RuntimeError("worker lost three times")


@pytest.mark.parametrize("name", ["relax", "reference", "statics", "evaluate", "train"])
def test_every_job_has_its_prefect_task(name):
    """The engine side routes every job function the round submits (a job without a task would
    fail only when a campaign first reaches it)."""
    from matdisc import jobs
    from matdisc_flows.tasks import TASKS

    assert getattr(jobs, name) in TASKS


def test_a_failed_mlip_job_is_recorded_and_retried_by_the_next_run_up_to_a_bound(campaign_store, tmp_path):
    """An MLIP job that raises (a worker lost for good, a bug) does not stop the stage: its structures
    are recorded as ``error`` with the job's reason, the other batches land, and the next run retries
    them (a new commit key), at most ``MLIP_ATTEMPTS`` times; a resume never crashes on it."""
    import shutil

    from ase.build import bulk
    from pymatgen.io.ase import AseAtomsAdaptor

    from matdisc import jobs
    from matdisc.generate import Candidate
    from matdisc.stages.context import Run
    from matdisc.stages.generate import add_candidates
    from matdisc.stages.registry import current_model
    from matdisc.stages.relax import MLIP_ATTEMPTS, pending_relaxations, relax_stage
    from matdisc.store import CampaignWriter

    class Flaky(InProcess):
        """Loses the worker of every MLIP job holding a candidate named in ``bad``."""

        def __init__(self, bad: set[str]):
            super().__init__()
            self.bad = bad

        def submit(self, fn, *args, resource):
            if fn is jobs.relax and any(cid in self.bad for cid, _ in args[0]):
                fn = _lost_worker
            return super().submit(fn, *args, resource=resource)

    cfg, _ = campaign_store
    shutil.copytree(cfg.store_path, tmp_path / "copy.zarr")
    data = cfg.model_dump(mode="json")
    data["store"], data["mlip"]["structures_per_task"] = str(tmp_path / "copy.zarr"), 2
    cfg = CampaignConfig.model_validate(data)
    new = []
    for i, a in enumerate([3.60, 3.62, 3.86, 3.88]):
        atoms = bulk("Cu" if i < 2 else "Pd", "fcc", a=a, cubic=True)
        new.append(Candidate(AseAtomsAdaptor.get_structure(atoms), "prototype", "A1", seed=i))
    with CampaignWriter(cfg.store_path) as w:
        model = current_model(w)  # the latest committee: it has scored nothing yet
        relax_stage(Run(w, cfg, InProcess()).round(9), model)
        add_candidates(w, new, 9, "generated")
        ids = [cid for cid, _ in pending_relaxations(w, model.sha256)]
        assert len(ids) == 4  # the new ones: everything else is scored by this committee now
        relax_stage(Run(w, cfg, Flaky({ids[0]})).round(9), model)  # batches of 2: one is lost
        mine = w.table("mlip")[lambda t: t["model_sha256"] == model.sha256].set_index("id")
        assert set(mine.loc[ids[:2], "status"]) == {"error"}
        assert mine.loc[ids[0], "reason"] == "relax job failed: RuntimeError: worker lost three times"
        assert set(mine.loc[ids[2:], "status"]) <= {"ok", "symmetry_changed"}  # the other batch landed
        assert [cid for cid, _ in pending_relaxations(w, model.sha256)] == ids[:2]
        relax_stage(Run(w, cfg, InProcess()).round(9), model)  # the next run: retried, and it works
        assert pending_relaxations(w, model.sha256) == []
        last = w.table("mlip").drop_duplicates("id", keep="last").set_index("id")
        assert set(last.loc[ids, "status"]) <= {"ok", "symmetry_changed"}
        assert w.candidates().set_index("id").loc[ids[0], "mlip_status"] in ("ok", "symmetry_changed")

        more = [Candidate(AseAtomsAdaptor.get_structure(bulk("Cu", "bcc", a=2.87)), "prototype", "A2", seed=9)]
        add_candidates(w, more, 10, "generated")
        (bcc,) = [cid for cid, _ in pending_relaxations(w, model.sha256)]
        for _ in range(MLIP_ATTEMPTS):  # a job that always fails is tried a bounded number of times
            relax_stage(Run(w, cfg, Flaky({bcc})).round(10), model)
        assert pending_relaxations(w, model.sha256) == []
        errors = w.table("mlip")[lambda t: t["id"] == bcc]
        assert list(errors["status"]) == ["error"] * MLIP_ATTEMPTS


def test_infrastructure_errors_are_computed_again_by_the_next_run_and_matdisc_retry_asks_for_any(tmp_path, capsys):
    """A lost worker is an infrastructure ``error``, not a verdict on the structure: the next run
    computes it again (a new attempt, its own key) up to three results; a physics outcome stands
    until ``matdisc retry`` asks for it, which writes a request the next run carries out."""
    from ase.build import bulk
    from conftest import emt_config
    from pymatgen.core import Structure

    from matdisc import jobs
    from matdisc.cli import main
    from matdisc.dft import settings_hash
    from matdisc.generate import Candidate
    from matdisc.round import record_run
    from matdisc.stages.context import Run
    from matdisc.stages.generate import add_candidates
    from matdisc.stages.verify import REFERENCE_ATTEMPTS, dft_done, reference_stage, retry_references, to_retry
    from matdisc.store import CampaignWriter

    lost = {"times": 0}

    class Flaky(InProcess):
        def submit(self, fn, *args, resource):
            if fn is jobs.reference and "Pd" in args[0] and lost["times"]:
                lost["times"] -= 1
                fn = _lost_worker
            return super().submit(fn, *args, resource=resource)

    cfg = CampaignConfig.model_validate(emt_config(tmp_path))
    settings = settings_hash(cfg.reference)
    cands = [Candidate(Structure.from_ase_atoms(bulk(el, "fcc", a=a)), "prototype", "A1") for el, a in
             (("Cu", 3.6), ("Pd", 3.9))]
    with CampaignWriter(cfg.store_path) as w:
        record_run(w, cfg)
        add_candidates(w, cands, 1, "hand")
        cu, pd_ = "r1-0000-Cu-A1", "r1-0001-Pd-A1"
        run = Run(w, cfg, Flaky())
        lost["times"] = 1
        reference_stage(run.round(1), [(c, bulk(c.split("-")[2], "fcc", a=3.7)) for c in (cu, pd_)], verified=True)
        assert list(w.table("dft")["status"]) == ["ok", "error"] and "worker lost" in w.table("dft")["reason"].iloc[1]
        pending = to_retry(w, settings)
        assert pending == {pd_: (1, 1)} and dft_done(w, settings) == {cu}
        # the next run: lost again twice, then the bound: three results, the last an error, and it stands
        lost["times"] = 5
        for _ in range(3):
            retry_references(run, to_retry(w, settings))
        dft = w.table("dft")
        assert list(dft["status"][dft["id"] == pd_]) == ["error"] * REFERENCE_ATTEMPTS
        assert to_retry(w, settings) == {} and dft_done(w, settings) == {cu, pd_}
        keys = [c.key for c in w.tables.commits("dft")]
        assert keys[1:] == [f"r1/{pd_}/{settings}"] + [f"r1/{pd_}/{settings}/attempt{n}" for n in (2, 3)]

    # matdisc retry: bad requests change nothing; a good one is carried out by the next run
    store = str(cfg.store_path)
    before = {p: p.read_bytes() for p in cfg.store_path.rglob("*") if p.is_file()}
    for args, words in ((["--status", "lost"], "--status: unknown lost"),
                        (["--status", "timeout"], "has status timeout"),
                        (["--ids", "nosuch"], "has status error among nosuch")):
        assert main(["retry", store, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert {p: p.read_bytes() for p in cfg.store_path.rglob("*") if p.is_file()} == before
    assert main(["retry", store, "--status", "error,ok"]) == 0
    assert "2 reference calculation(s) will be computed again" in capsys.readouterr().out
    with CampaignWriter(cfg.store_path) as w:
        assert to_retry(w, settings) == {cu: (1, 1), pd_: (1, 3)}
        lost["times"] = 0
        retry_references(Run(w, cfg, Flaky()), to_retry(w, settings))
        latest = w.table("dft").drop_duplicates("id", keep="last").set_index("id")
        assert list(latest.loc[[cu, pd_], "status"]) == ["ok", "ok"] and to_retry(w, settings) == {}
        assert len(w.table("dft")) == 6  # 1 + 1 for Cu, 3 + 1 for Pd
