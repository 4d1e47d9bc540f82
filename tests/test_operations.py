"""Operations with real processes: kill -9 mid-round, resume from a served deployment, compare.

The session fixture ran the conftest EMT campaign without faults. This test starts from
that store as it stood after the cold start (the store is append-only with a commit log,
so that state is the log's round-0 prefix) and runs round 1 again as ``matdisc run`` in its
own process group, with the Prefect server ``matdisc run`` starts. Mid-round its Dask workers
are killed (their nannies restart them, the batch in flight is redone), then the Prefect
server is killed (the run stops by itself, with a one-line reason), then a second ``matdisc
run`` has its whole process group killed once the round's retrained
model is registered but before the round is recorded. A scheduled-style deployment (``matdisc deploy``, served in another process) is
then triggered through the Prefect API and finishes the round without training again.
Round 1 must equal the uninterrupted run's: same candidates, energies, DFT results, picks,
the same retrained model bit for bit, no duplicates.
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
from conftest import ANSI, emt_config, run_in_terminal, stop_process_group, store_after_cold_start

from matdisc.store import open_campaign
from matdisc.store.remote import mirror_dir

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
    """Live Dask worker processes the run's nannies spawned (children of the run process)."""
    import psutil

    pids = []
    for child in psutil.Process(pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and any("spawn_main" in p for p in child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:  # exited (or a zombie) between the listing and the look
            continue
    return pids


@pytest.fixture()
def api_env(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "MATDISC_HOME": str(tmp_path / "home"),
            "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _own_server_env(api_env: dict) -> dict:
    """``matdisc run`` without PREFECT_API_URL: it starts its own Prefect server (and after a kill,
    a new one on the same port and database). One client retry: an API that is gone fails fast."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in api_env.items() if k != "PREFECT_API_URL"}
    return {**env, "MATDISC_PREFECT_PORT": str(port), "PREFECT_CLIENT_MAX_RETRIES": "1"}


def _server_pid(env: dict) -> int:
    return int(json.loads((Path(env["MATDISC_HOME"]) / "prefect-server.json").read_text())["pid"])


def test_killed_campaign_resumes_from_a_deployment_run_to_the_uninterrupted_store(campaign_store, api_env, tmp_path):
    reference_cfg, _ = campaign_store
    cfg = emt_config(tmp_path)
    cfg["active_learning"] = {**cfg["active_learning"], "rounds": 1}
    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump(cfg))
    store = Path(cfg["store"])
    store_after_cold_start(reference_cfg.store_path, store)
    assert list(open_campaign(store).rounds()["round"]) == [0] and open_campaign(store).table("mlip").empty
    log = tmp_path / "run.log"

    own = _own_server_env(api_env)
    with open(log, "w") as out:
        run = subprocess.Popen([sys.executable, "-m", "matdisc.cli", "run", str(config)], cwd=ROOT, env=own,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    servers: list[int] = []
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
        # 2. the Prefect server killed mid-round: the run stops by itself, saying why, keeping what it committed
        servers.append(_server_pid(own))
        os.killpg(servers[0], signal.SIGKILL)
        run.wait(300)
        assert run.returncode == 1, log.read_text()[-3000:]
        assert "matdisc: lost the Prefect API" in log.read_text() and "run again to resume" in log.read_text()
        assert open_campaign(store).rounds()["round"].max() == 0
        # 3. run again (on the session's API: a server start less); this whole run (flow process and
        #    workers) is killed once round 1's committee is trained and registered, before the round
        #    is recorded: the resumed run must not train it again
        log = tmp_path / "run-2.log"
        with open(log, "w") as out:
            run = subprocess.Popen([sys.executable, "-m", "matdisc.cli", "run", str(config)], cwd=ROOT, env=api_env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for("round 1's model", lambda: "r1/model" in _commit_keys(store, "models"), run, 400, log)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        for pid in servers:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert run.returncode == -signal.SIGKILL
    killed = open_campaign(store)
    assert killed.rounds()["round"].max() == 0  # round 1 was cut short: not recorded
    trained = list(killed.models()["sha256"])

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
        assert flow_run.name == "cu-pd-emt +1 round"
        states = _flow_run_states("cu-pd-emt round 1")
        assert [s for s, _ in states].count("COMPLETED") == 1  # the subflow, named by round
        # the run killed in 3. was still Running: the resumed run, holding the writer lock, marked it
        # Crashed at once (the harness runs no zombie automation), naming the run that took over
        crashed = [m for s, m in states if s == "CRASHED"]
        assert len(crashed) == 1 and "RUNNING" not in [s for s, _ in states], states
        assert crashed[0].startswith("its process died: flow run ") and str(store) in crashed[0]
    finally:
        stop_process_group(serve)

    resumed = open_campaign(store)
    assert list(resumed.models()["sha256"]) == trained  # the registered model was reused, not retrained
    assert not (store / "_commits" / "models.jsonl").read_text().count("r1/model") > 1
    _assert_same_campaign(resumed, open_campaign(reference_cfg.store_path), last_round=1)


def _flow_run_states(name: str) -> list[tuple[str, str | None]]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))

    return [(r.state.type.value, r.state.message) for r in asyncio.run(read())]


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


def test_round_plan_counts_from_the_last_completed_round(campaign_store):
    from matdisc.errors import UserError
    from matdisc_flows.deployment import round_plan, run_name

    cfg, _ = campaign_store  # rounds 0, 1, 2 complete
    assert round_plan(cfg, more_rounds=1) == (3, 3)
    assert run_name(cfg, *round_plan(cfg, more_rounds=2)) == "cu-pd-emt rounds 3-4"
    assert run_name(cfg, *round_plan(cfg)) == "cu-pd-emt (rounds 1-2 done)"  # the configured 2: nothing to do
    fresh = cfg.model_copy(update={"store": cfg.store_path.parent / "none.zarr"})
    assert round_plan(fresh, more_rounds=1) == (1, 1) and run_name(fresh, 1, 0) == "cu-pd-emt cold start"
    with pytest.raises(UserError):
        round_plan(cfg, rounds=3, more_rounds=1)
    with pytest.raises(UserError):
        round_plan(cfg, more_rounds=0)


def test_the_ui_gets_progress_tables_and_figures_per_round(campaign_store):
    """Artifacts the flow created in the session's Prefect API, for the fixture's campaign."""
    import asyncio
    import base64
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    cfg, summary = campaign_store
    keys = ["cu-pd-emt-r0-reference-calculations", "cu-pd-emt-r1-mlip-relaxations", "cu-pd-emt-r2-mlip-relaxations",
            "cu-pd-emt-r2-mace-training-epochs", "cu-pd-emt-r2-generation",
            "cu-pd-emt-candidates-r2", "cu-pd-emt-hull-r2", "cu-pd-emt-parity-r2", "cu-pd-emt-costs"]

    async def latest():
        async with get_client() as client:
            found = await client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
        return {a.key: a for a in found}

    art = asyncio.run(latest())
    assert set(art) == set(keys)
    for key in keys[:5]:  # progress bars end full
        assert art[key].type == "progress" and float(art[key].data) == 100.0
    table = art["cu-pd-emt-candidates-r2"].data
    rows = json.loads(table) if isinstance(table, str) else table
    hits = {h["id"] for h in summary["hits"]}
    assert {r["id"] for r in rows if r["is_hit"]} == hits  # every verified hit, then the best predicted
    predicted = [r["e_hull_pred"] for r in rows if not r["is_hit"] and r["e_hull_pred"] is not None]
    assert predicted == sorted(predicted) and 0 < len(predicted) <= 25
    for key in ("cu-pd-emt-hull-r2", "cu-pd-emt-parity-r2"):  # the figure inline: a browser shows it
        data = art[key].data
        inline = re.search(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", data)[1]
        png = Path(re.search(r"`([^`]+\.png)`", data)[1])
        assert art[key].type == "markdown" and base64.b64decode(inline) == png.read_bytes()
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # predicted vs actual seconds per round and stage (the latest version: this campaign's last round)
    costs = art["cu-pd-emt-costs"].data
    costs = json.loads(costs) if isinstance(costs, str) else costs
    assert {(r["round"], r["stage"]) for r in costs} >= {(0, "dft"), (0, "train"), (1, "relax"), (1, "dft"),
                                                          (1, "train"), (1, "generate")}
    assert all(r["actual_s"] > 0 and r["predicted_s"] > 0 for r in costs if r["stage"] in ("relax", "train"))


@pytest.mark.parametrize("error,retry", [(MemoryError(), True), (OSError("stale file handle"), True),
                                         (RuntimeError("CUDA out of memory. Tried to allocate"), True),
                                         (ValueError("bad structure"), False), (KeyError("x"), False)])
def test_tasks_retry_only_transient_failures(error, retry):
    from prefect.states import Failed

    from matdisc_flows.tasks import reference_task, relax_task, transient_failure

    for t in (relax_task, reference_task):
        assert t.retries == 2 and t.retry_condition_fn is transient_failure
        assert t.retry_delay_seconds == [5, 30]  # backoff
    assert transient_failure(relax_task, None, Failed(data=error)) is retry


def test_a_killed_matdisc_server_is_started_again_on_its_port_with_its_database(tmp_path, monkeypatch):
    """What the next ``matdisc run`` does after its Prefect server was killed: ``ensure_api``
    finds the recorded server dead and starts a new one on the same 127.0.0.1 port, on the same
    SQLite database (the flow runs of the killed server stay visible in the UI)."""
    import httpx

    from matdisc_flows import server

    env = _own_server_env({**os.environ, "MATDISC_HOME": str(tmp_path / "home")})
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    for key in ("MATDISC_HOME", "MATDISC_PREFECT_PORT"):
        monkeypatch.setenv(key, env[key])
    pids = []
    try:
        url = server.ensure_api(timeout=120)
        pids.append(_server_pid(env))
        assert url == f"http://127.0.0.1:{env['MATDISC_PREFECT_PORT']}/api"
        # the server requires the auth string matdisc generated and keeps where only its owner reads it
        state = tmp_path / "home" / "prefect-server.json"
        assert state.stat().st_mode & 0o777 == 0o600
        assert os.environ["PREFECT_API_AUTH_STRING"] == json.loads(state.read_text())["auth"]
        assert httpx.post(f"{url}/flows/", json={"name": "stranger"}, timeout=30).status_code == 401
        assert server.healthy(url)  # the health probe needs no auth
        flow = httpx.post(f"{url}/flows/", json={"name": "before-the-kill"}, headers=server.auth_headers(),
                          timeout=30).json()
        os.killpg(pids[0], signal.SIGKILL)
        deadline = time.time() + 30
        while server.healthy(url) and time.time() < deadline:
            time.sleep(0.2)
        assert not server.healthy(url)

        monkeypatch.delenv("PREFECT_API_URL", raising=False)  # a new process: nothing inherited
        assert server.ensure_api(timeout=120) == url
        pids.append(_server_pid(env))
        assert pids[1] != pids[0] and server.healthy(url)
        again = httpx.get(f"{url}/flows/{flow['id']}", headers=server.auth_headers(), timeout=30)
        assert again.status_code == 200 and again.json()["name"] == "before-the-kill"
        assert (tmp_path / "home" / "prefect" / "prefect.db").is_file()
    finally:
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_campaign_on_an_object_store_killed_mid_round_is_finished_by_another_machine(campaign_store, api_env,
                                                                                       s3_bucket, tmp_path):
    """Multi-node runs without a shared filesystem: the store lives on an S3 API (moto on 127.0.0.1).
    ``matdisc run`` writes it through a working copy under its MATDISC_HOME, pushing every commit;
    it is killed (whole process group, -9) once round 1 has MLIP results on the bucket, and a run on
    "another machine" (a fresh MATDISC_HOME: no working copy, no model files) takes the dead writer's
    lease, pulls the store and finishes round 1. The bucket then equals the uninterrupted run's store."""
    reference_cfg, _ = campaign_store
    cold = tmp_path / "cold.zarr"
    store_after_cold_start(reference_cfg.store_path, cold)
    s3_bucket.put(str(cold), "campaigns/cu-pd.zarr", recursive=True)
    url = "s3://campaigns/cu-pd.zarr"
    cfg = emt_config(tmp_path, store=url)
    cfg["active_learning"] = {**cfg["active_learning"], "rounds": 1}
    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump(cfg))
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}

    def remote_keys(table: str) -> list[str]:
        s3_bucket.invalidate_cache()
        try:
            text = s3_bucket.cat_file(f"campaigns/cu-pd.zarr/_commits/{table}.jsonl").decode()
        except FileNotFoundError:
            return []
        return [json.loads(line)["key"] for line in text.splitlines() if line.strip().endswith("}")]

    log = tmp_path / "node-a.log"
    with open(log, "w") as out:
        run = subprocess.Popen([sys.executable, "-m", "matdisc.cli", "run", str(config)], cwd=ROOT,
                               env={**api_env, **aws, "MATDISC_HOME": str(tmp_path / "node-a")},
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for("round 1's first MLIP batch on the bucket", lambda: any(k.startswith("r1/") for k in remote_keys("mlip")),
                  run, 400, log)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    s3_bucket.invalidate_cache()
    lease = json.loads(s3_bucket.cat_file("campaigns/cu-pd.zarr/_commits/writer.lease"))
    assert lease["pid"] == run.pid  # the dead writer's lease is still there
    assert open_campaign(url).rounds()["round"].max() == 0

    node_b = tmp_path / "node-b"
    # run on a terminal, as a user's shell runs it: its progress, not the engines' INFO, and bars
    code, raw = run_in_terminal([sys.executable, "-m", "matdisc.cli", "run", str(config)],
                                {**api_env, **aws, "MATDISC_HOME": str(node_b)}, timeout=900, cwd=ROOT)
    printed = ANSI.sub("", raw).replace("\r", "\n")
    assert code == 0, printed[-3000:]
    assert "MLIP relaxed or rescored" in printed and "stable phases found" in printed, printed[-3000:]
    # each stage's bar, redrawn in place; before its first result the time left is the cost model's
    draws = [ANSI.sub("", d) for d in raw.split("\x1b[2K")]
    for stage in ("MLIP relaxations", "reference calculations", "MACE training epochs"):
        mine = [d for d in draws if d.startswith(f"round 1 {stage} ")]
        assert len(mine) >= 2, (stage, [d[:60] for d in draws][-40:])
        assert "left (predicted)" in mine[0] or "over the predicted" in mine[0], mine[0]
    engine_info = [line for line in printed.splitlines() if ("Task run" in line and "Finished in state" in line)
                   or "distributed.worker - INFO" in line or "distributed.scheduler - INFO" in line]
    assert not engine_info, engine_info[:5]
    s3_bucket.invalidate_cache()
    assert not s3_bucket.exists("campaigns/cu-pd.zarr/_commits/writer.lease")  # released
    resumed = open_campaign(url)
    _assert_same_campaign(resumed, open_campaign(reference_cfg.store_path), last_round=1)
    for path in json.loads(resumed.models()["paths"].iloc[-1]):  # round 1's committee is on the bucket
        assert s3_bucket.exists(f"campaigns/cu-pd.zarr/{path}")
    assert [p.parent.name for p in (node_b / "mirrors").glob("*/report.html")] == [f"{mirror_dir(url).stem}-report"]


def test_a_lost_prefect_api_stops_the_run_instead_of_failing_the_job():
    """Prefect reports its server gone as RuntimeError("Failed to reach API ...") from a task's result:
    the executor turns that into httpx's ConnectError, which stops the run (the executor's ``fatal``,
    the CLI's "lost the Prefect API"), so the round never records it as the job's own failure."""
    import httpx

    from matdisc_flows.executor import PrefectDask, TaskFuture

    class Gone:
        def result(self, timeout=None):
            raise RuntimeError("Failed to reach API at http://127.0.0.1:1/api/")

    class Broken:
        def result(self, timeout=None):
            raise RuntimeError("a bug in the job")

    with pytest.raises(httpx.ConnectError) as lost:
        TaskFuture(Gone()).result()
    assert isinstance(lost.value, PrefectDask.fatal)
    with pytest.raises(RuntimeError, match="a bug in the job"):  # the job's own error stays the job's
        TaskFuture(Broken()).result()


def test_the_api_a_prefect_profile_names_is_used_and_no_server_is_started(prefect_api, tmp_path, monkeypatch,
                                                                            capsys):
    """A URL set with ``prefect profile`` / ``prefect config set`` (here: the active profile of a
    profiles file naming the session's API) is the API matdisc uses; it says which profile, and
    starts no server of its own."""
    from prefect.settings import PREFECT_API_URL

    from matdisc_flows import server

    url = PREFECT_API_URL.value()
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(f'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "{url}"\n')
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(profiles))
    monkeypatch.setenv("PREFECT_API_URL", "")  # unset for matdisc; restored after the test
    monkeypatch.setenv("MATDISC_HOME", str(tmp_path / "home"))
    assert server.ensure_api() == url
    assert f"using the Prefect API of your profile 'team': {url}" in capsys.readouterr().err
    assert not (tmp_path / "home" / "prefect-server.json").exists()
    # without the profile's URL, matdisc would start its own and say so
    profiles.write_text('active = "team"\n\n[profiles.team]\n')
    monkeypatch.setenv("PREFECT_API_URL", "")  # ensure_api set it for this process's clients
    assert server.prefect_configured_api() is None
