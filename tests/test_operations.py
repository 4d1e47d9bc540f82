"""Operations with real processes: kill -9 mid-round, resume from a served deployment, compare.

One campaign (the conftest EMT campaign, one round) runs as ``matdisc run`` in its own
process group against the session's Prefect API. Mid-round its Dask workers are killed
(their nannies restart them, the batch in flight is redone), then the whole process group
gets SIGKILL. A scheduled-style deployment (``matdisc deploy``, served in another process)
is then triggered through the Prefect API and finishes the round. The store must equal
the uninterrupted run's store (the session fixture ran the same campaign without faults):
same candidates, energies, DFT results, models (bit for bit), no duplicates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from matdisc.store import open_campaign
from conftest import emt_config

ROOT = Path(__file__).resolve().parents[1]


def _commit_keys(store: Path, table: str) -> list[str]:
    log = store / "_commits" / f"{table}.jsonl"
    if not log.exists():
        return []
    return [json.loads(line)["key"] for line in log.read_text().splitlines() if line.strip().endswith("}")]


def _wait_for(what: str, check, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        if proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def _worker_pids(pid: int) -> list[int]:
    """Dask worker processes the run's nannies spawned (children of the run process)."""
    import psutil

    return [c.pid for c in psutil.Process(pid).children()
            if any("spawn_main" in part for part in c.cmdline())]


@pytest.fixture()
def api_env(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "MATDISC_HOME": str(tmp_path / "home"),
            "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_killed_campaign_resumes_from_a_deployment_run_to_the_uninterrupted_store(campaign_store, api_env, tmp_path):
    reference_cfg, _ = campaign_store
    cfg = emt_config(tmp_path)
    cfg["active_learning"] = {**cfg["active_learning"], "rounds": 1}
    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump(cfg))
    store = Path(cfg["store"])
    log = tmp_path / "run.log"

    with open(log, "w") as out:
        run = subprocess.Popen([sys.executable, "-m", "matdisc.cli", "run", str(config)], cwd=ROOT, env=api_env,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # 1. a Dask worker killed mid-batch: round 1 has committed one MLIP batch, the next is running
        _wait_for("round 1's first MLIP batch", lambda: any(k.startswith("r1/") for k in _commit_keys(store, "mlip")),
                  run, 400, log)
        workers = _worker_pids(run.pid)
        assert len(workers) == 2, workers  # one MLIP, one DFT worker
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        _wait_for("the nannies to restart both workers", lambda: len(set(_worker_pids(run.pid)) - set(workers)) == 2,
                  run, 60, log)
        # meanwhile a second writer is refused at once, with the holder named, exit 2
        second = subprocess.run([sys.executable, "-m", "matdisc.cli", "run", str(config)], cwd=ROOT, env=api_env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and f"pid {run.pid}" in second.stderr, second.stderr
        # 2. the whole run (flow process and its workers) killed once round 1 verifies with DFT
        _wait_for("round 1's first DFT result", lambda: any(k.startswith("r1/") for k in _commit_keys(store, "dft")),
                  run, 400, log)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == -signal.SIGKILL
    killed = open_campaign(store)
    assert killed.rounds()["round"].max() == 0  # round 1 was cut short: not recorded

    # 3. the next run comes from a served deployment, triggered through the Prefect API
    serve_log = tmp_path / "serve.log"
    with open(serve_log, "w") as out:
        serve = subprocess.Popen([sys.executable, "-m", "matdisc.cli", "deploy", str(config), "--cron", "0 3 * * *"],
                                 cwd=tmp_path, env=api_env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        deployment = _served_deployment(serve, serve_log)
        assert deployment.global_concurrency_limit.limit == 1
        assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
        assert deployment.parameters == {"config_path": str(config), "more_rounds": 1, "store": str(store)}
        from prefect.deployments import run_deployment

        flow_run = run_deployment(f"matdisc-continue-campaign/{deployment.name}", timeout=600)
        assert flow_run.state.is_completed(), (flow_run.state, serve_log.read_text()[-3000:])
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)

    _assert_same_campaign(open_campaign(store), open_campaign(reference_cfg.store_path), last_round=1)


def _served_deployment(serve: subprocess.Popen, log: Path):
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name("matdisc-continue-campaign/cu-pd-emt")

    deadline = time.time() + 120
    while time.time() < deadline:
        if serve.poll() is not None:
            pytest.fail(f"matdisc deploy exited ({serve.returncode}):\n{log.read_text()[-3000:]}")
        try:
            return asyncio.run(read())
        except Exception:  # noqa: BLE001 - not registered yet
            time.sleep(0.5)
    pytest.fail(f"the deployment did not appear:\n{log.read_text()[-3000:]}")


def _assert_same_campaign(resumed, reference, last_round: int) -> None:
    """Rows up to ``last_round`` equal the uninterrupted store's; nothing lost, nothing twice."""
    def rows(camp, table):
        df = camp.table(table)
        return df[df["round"] <= last_round].reset_index(drop=True)

    cand, ref_cand = rows(resumed, "candidates"), rows(reference, "candidates")
    assert cand["id"].is_unique
    assert sorted(cand["id"]) == sorted(ref_cand["id"])
    models, ref_models = rows(resumed, "models"), rows(reference, "models")
    assert list(models["round"]) == list(range(last_round + 1))
    assert list(models["sha256"]) == list(ref_models["sha256"])  # the same training, bit for bit
    for table, energy in (("mlip", "e_mlip_per_atom"), ("dft", "e_dft_per_atom")):
        got, ref = rows(resumed, table), rows(reference, table)
        keys = ["id", "model_sha256"] if table == "mlip" else ["id"]
        assert not got.duplicated(keys).any(), f"{table}: a record written twice"
        merged = got.merge(ref, on=keys, how="outer", suffixes=("", "_ref"), indicator=True)
        assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"][keys]
        assert list(merged["status"]) == list(merged["status_ref"])
        np.testing.assert_allclose(merged[energy], merged[f"{energy}_ref"], atol=1e-6, equal_nan=True)
    sel, ref_sel = rows(resumed, "selections"), rows(reference, "selections")
    assert list(sel["id"]) == list(ref_sel["id"])
    rounds, ref_rounds = rows(resumed, "rounds"), rows(reference, "rounds")
    for col in ("round", "candidates", "dft_verified", "hits", "model_sha256", "trained_model_sha256"):
        assert list(rounds[col]) == list(ref_rounds[col]), col
