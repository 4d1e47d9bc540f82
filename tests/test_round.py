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
        ("dft", "reference"), ("mlip", "relax"), ("mlip", "rescore"), ("mlip", "train"), ("mlip", "evaluate")}
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
    assert list(dft["status"]) == ["ok", "failed", "ok"]
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
