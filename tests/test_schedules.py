"""Scheduled runs on a real Prefect server, and dead runs that end Crashed.

The session's ``prefect_test_harness`` runs no scheduler, so the flow tests never saw Prefect
3.8's scheduler fail on every loop with SQLAlchemy 2.1. Here ``matdisc server start`` starts a
real local server (the one ``matdisc run`` uses, with its services) with a one-second
scheduler loop; ``matdisc deploy --interval`` serves a small EMT campaign, and the scheduler,
not the test, must create the flow run that completes its round. Meanwhile a ``matdisc run``
of another campaign is killed with SIGKILL: the zombie-run automation matdisc creates must mark
its flow run Crashed once its heartbeats stop. The resume path (the next writer of a store marks
its dead predecessor at once) is tested in ``test_operations``.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import stop_process_group

from matdisc.store import open_campaign
from matdisc_flows.health import service_errors
from matdisc_flows.runs import zombie_after_s

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


def tiny_campaign(tmp_path: Path, name: str) -> Path:
    """Cu-Pd with EMT and a one-member 8-channel MACE, seeded by three structures: a cold start
    and one round in about a minute and a half."""
    cfg = {
        "name": name, "chemsys": ["Cu", "Pd"], "store": str(tmp_path / f"{name}.zarr"),
        "generation": {"max_atoms": 4, "seed": 0, "random": {"per_round": 2}, "substitution": {"per_round": 2}},
        "mlip": {"model": "cold-start", "ensemble": 1, "device": "cpu", "fmax": 0.05, "max_steps": 100,
                 "structures_per_task": 20,
                 "training": {"num_channels": 8, "max_L": 0, "r_max": 4.5, "max_num_epochs": 5, "batch_size": 4,
                              "finetune_epochs": 2},
                 "cold_start": {"prototypes": ["fcc", "B2"], "perturbed_per_structure": 1}},
        "reference": {"calculator": "emt", "fmax": 0.05, "max_steps": 100},
        "active_learning": {"rounds": 1, "dft_budget": 2},
        "compute": {"scheduler": "local", "dft_workers": 1, "mlip_workers": 1, "threads_per_mlip_worker": 1},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def real_server(tmp_path):
    """``matdisc server start`` on a free port: (environment pointing at it, its MATDISC_HOME)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"MATDISC_HOME": str(home), "MATDISC_PREFECT_PORT": str(port), "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                # a short scheduler loop, and few runs ahead (an interval schedule would get 100)
                "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
                "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": "1", "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "2",
                "PREFECT_RUNNER_POLL_FREQUENCY": "1"})
    start = subprocess.run([sys.executable, "-m", "matdisc.cli", "server", "start"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr
    # the server requires the auth string matdisc generated: `matdisc server env` gives it to a shell
    exports = subprocess.run([sys.executable, "-m", "matdisc.cli", "server", "env"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60, check=True).stdout
    for line in exports.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0]
    assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{port}/api" and env["PREFECT_API_AUTH_STRING"]
    try:
        yield env, home
    finally:
        subprocess.run([sys.executable, "-m", "matdisc.cli", "server", "stop"], cwd=ROOT, env=env, timeout=60)


def _flow_runs(env: dict, **filters) -> list:
    """Flow runs on the server in ``env``, read with a plain POST to its REST API (this process's
    Prefect client belongs to the session's test harness; a child process per poll costs seconds)."""
    import datetime
    import urllib.request

    body = {"flow_runs": {"name": {"any_": [filters["name"]]}}} if "name" in filters else {}
    token = base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode()
    req = urllib.request.Request(f"{env['PREFECT_API_URL']}/flow_runs/filter", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        runs = json.loads(resp.read())
    return [{"id": r["id"], "name": r["name"], "state": r["state"]["type"], "message": r["state"]["message"],
             "at": datetime.datetime.fromisoformat(r["state"]["timestamp"].replace("Z", "+00:00")).timestamp(),
             "auto_scheduled": r["auto_scheduled"], "deployment_id": r["deployment_id"] or "", "tags": r["tags"]}
            for r in runs]


def _wait(what: str, check, timeout: float, *logs: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            found = check()
        except OSError:  # a busy SQLite server can take its time to answer: ask again
            found = None
        if found:
            return found
        time.sleep(2)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def test_the_scheduler_starts_a_run_that_completes_a_round_while_a_killed_run_ends_crashed(real_server, tmp_path):
    env, home = real_server
    # 1. a campaign run killed with SIGKILL once its flow run is Running (it has sent a heartbeat)
    killed_cfg = tiny_campaign(tmp_path, "killed-cu-pd")
    killed_log = tmp_path / "killed.log"
    with open(killed_log, "w") as out:
        run = subprocess.Popen([sys.executable, "-m", "matdisc.cli", "run", str(killed_cfg)], cwd=ROOT, env=env,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        dead = _wait("the run to be Running", lambda: [r for r in _flow_runs(env, name="killed-cu-pd round 1")
                                                       if r["state"] == "RUNNING"], 240, killed_log)[0]
        assert "matdisc" in dead["tags"]  # what the zombie automation matches
        time.sleep(2)  # the first heartbeat goes out as the flow begins
        os.killpg(run.pid, signal.SIGKILL)
        killed_at = time.time()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)

    # 2. a served deployment with an interval schedule: the scheduler creates its runs
    scheduled_cfg = tiny_campaign(tmp_path, "scheduled-cu-pd")
    serve_log = tmp_path / "serve.log"
    with open(serve_log, "w") as out:
        serve = subprocess.Popen([sys.executable, "-m", "matdisc.cli", "deploy", str(scheduled_cfg), "--interval",
                                  "5"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        done = _wait("a scheduled run to complete", lambda: [
            r for r in _flow_runs(env) if r["auto_scheduled"] and r["state"] == "COMPLETED"], 480, serve_log)[0]
    finally:
        stop_process_group(serve)
    assert done["name"] == "scheduled-cu-pd +1 round" and done["deployment_id"]
    store = open_campaign(tmp_path / "scheduled-cu-pd.zarr")
    assert list(store.rounds()["round"]) == [0, 1]  # the cold start and the round, by the scheduled run
    wrote = [r for r in _flow_runs(env, name="scheduled-cu-pd round 1") if r["id"] in store.orchestrator_runs()]
    assert [r["state"] for r in wrote][:1] == ["COMPLETED"]  # the scheduled run's campaign subflow wrote it

    # 3. the killed run: Crashed by the zombie-run automation (no resume came for it)
    crashed = _wait("the killed run to end Crashed", lambda: [r for r in _flow_runs(env, name="killed-cu-pd round 1")
                                                               if r["state"] == "CRASHED"],
                    max(10.0, killed_at + zombie_after_s() + 60 - time.time()), killed_log)[0]
    assert crashed["id"] == dead["id"]
    assert "no heartbeat" in crashed["message"] and "zombie-run automation" in crashed["message"]
    assert crashed["at"] - killed_at >= zombie_after_s() - 10  # not before its heartbeats could have stopped

    # 4. no service failed, and the status says so
    services, _ = service_errors(home / "prefect-server.log")
    assert services == {}, services
    # the test's schedule keeps only two runs ahead, 5 s apart: on a loaded machine a status taken
    # between two scheduler loops can find none ahead, so it gets a few loops to say healthy
    for _ in range(6):
        status = subprocess.run([sys.executable, "-m", "matdisc.cli", "server", "status", "--json"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=120)
        health = json.loads(status.stdout)
        if status.returncode == 0 and health["healthy"]:
            break
        time.sleep(5)
    assert status.returncode == 0 and health["healthy"], health
    assert health["started_by_matdisc"] and health["zombie_automation"] == "enabled"


def test_server_status_names_the_failing_service_from_the_servers_own_log(tmp_path):
    """The log of a real Prefect 3.8.8 server on SQLAlchemy 2.1.9 (scheduler loop 2 s), cut after
    three service failures, with one state-validation error of a busy SQLite database after them."""
    log = DATA / "prefect-server-sqlalchemy-2.1.log"
    services, other = service_errors(log)
    assert {k: v.count for k, v in services.items()} == {"schedule_recent_deployments": 1, "schedule_deployments": 2}
    bulk = "sqlalchemy.exc.InvalidRequestError: Can't evaluate bulk DML statement"
    assert all(v.last_error.startswith(bulk) for v in services.values())
    assert services["schedule_deployments"].last_time == "07:40:09.353"
    assert other.count == 1 and other.last_error.endswith("database is locked")
    # only what the server wrote since matdisc started it counts: an offset past the failures
    offset = log.read_bytes().index(b"07:29:06.204")
    assert service_errors(log, offset) == ({}, other)


def test_deploy_refuses_a_bad_schedule_before_starting_anything(tmp_path, monkeypatch, capsys):
    from matdisc.cli import main

    cfg = tiny_campaign(tmp_path, "bad-schedule")
    monkeypatch.setenv("MATDISC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    # the values the CLI sets: undone after the test (the session's harness flows send no heartbeats)
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for args, field in ((["--interval", "0"], "--interval"), (["--cron", "61 * * * *"], "--cron"),
                        (["--cron", "* * * * *", "--interval", "5"], "--cron or --interval")):
        assert main(["deploy", str(cfg), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and field in err, err
    assert not (tmp_path / "home").exists()  # no server was started


def test_sqlite_contention_is_not_a_failing_service(tmp_path):
    """Under load the server's event consumer can lose a write to SQLite's lock ("database is
    locked", retried later): that is contention, counted with the API's other errors, not a service
    failing; a service whose error is anything else still is one."""
    log = tmp_path / "prefect-server.log"
    log.write_text(
        "16:12:25.119 | ERROR   | prefect.server.utilities.messaging.memory - Failed in consume_loop\n"
        "Traceback (most recent call last):\n"
        '  File "aiosqlite/core.py", line 63, in _connection_worker_thread\n'
        "sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) database is locked\n"
        "16:12:30.000 | ERROR   | docket.dependencies - ↩ [    46ms] schedule_deployments(){schedule_deployments}\n"
        "Traceback (most recent call last):\n"
        "sqlalchemy.exc.InvalidRequestError: Can't evaluate bulk DML statement\n"
    )
    services, other = service_errors(log)
    assert list(services) == ["schedule_deployments"]
    assert other.count == 1 and other.last_error.endswith("database is locked")
