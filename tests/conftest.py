"""Shared fixtures: one Prefect test harness per session, a small EMT campaign config and store."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# probe results are cached per user: the tests start from none (and never touch the user's)
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="matdisc-test-cache-")


#: Expensive session fixtures -> the xdist group of the tests that use them.
SHARED_FIXTURES = {"campaign_store": "campaign", "committee": "committee", "model_paths": "committee"}


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the markers to name the groups
def pytest_collection_modifyitems(items):
    """Under ``pytest -n 2 --dist loadgroup`` the tests of one expensive session fixture (the EMT
    campaign, the trained MACE committee) run in one process, so it is computed once; the other
    tests spread over both processes."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        group = next((g for f, g in SHARED_FIXTURES.items() if f in names), None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def campaign_store(prefect_api, tmp_path_factory):
    """(config, summary) of a two-round EMT campaign run by the real flow: read-only for tests."""
    from prefect_dask import DaskTaskRunner

    from matdisc.config import CampaignConfig
    from matdisc_flows.campaign import campaign_flow
    from matdisc_flows.cluster import campaign_cluster

    tmp = tmp_path_factory.mktemp("flow")
    cfg = CampaignConfig.model_validate(emt_config(tmp, known_phases={"files": [str(known_phases_cif(tmp))]}))
    with campaign_cluster(cfg.compute) as address:
        flow = campaign_flow.with_options(task_runner=DaskTaskRunner(address=address))
        summary = flow(config=cfg.model_dump(mode="json"))
    return cfg, summary


def emt_config(tmp_path, **over) -> dict:
    """Cu-Pd with EMT as the reference: instant, real physics with ordered compounds."""
    cfg = {
        "name": "cu-pd-emt",
        "chemsys": ["Cu", "Pd"],
        "store": str(tmp_path / "cu-pd.zarr"),
        # the built-in 25 prototypes keep the session campaign at ~40 candidates a round (the AFLOW
        # library gives ~180 at 8 atoms); the AFLOW source runs in test_aflow and test_schedules' flows
        "generation": {"max_atoms": 8, "seed": 0, "random": {"per_round": 4}, "substitution": {"per_round": 6},
                       "prototype": {"library": "builtin"}},
        "mlip": {
            "model": "cold-start", "ensemble": 2, "device": "cpu", "fmax": 0.05, "max_steps": 200,
            "structures_per_task": 10,
            "training": {"num_channels": 16, "max_L": 0, "r_max": 4.5, "max_num_epochs": 20, "batch_size": 4,
                         "finetune_epochs": 5},
            "cold_start": {"perturbed_per_structure": 3},
        },
        "reference": {"calculator": "emt", "fmax": 0.02, "max_steps": 200},
        "active_learning": {"rounds": 2, "dft_budget": 3, "hull_tolerance": 0.0},
        # one torch thread: the suite runs two test processes on two cores, and a two-thread MLIP worker
        # spinning against the other one relaxed 2.7x slower (round 2: 27.9 s vs 10.5 s alone)
        "compute": {"scheduler": "local", "dft_workers": 1, "mlip_workers": 1, "threads_per_mlip_worker": 1},
    }
    for key, value in over.items():
        cfg[key] = value
    return cfg


def known_phases_cif(directory):
    """``known.cif`` with two phases known for Cu-Pd: L1_0 CuPd (EMT's 1:1 ground state, also a
    cold-start seed) and B32 CuPd (above EMT's hull), from the AFLOW library."""
    from pymatgen.io.cif import CifWriter

    from matdisc.config import GenerationConfig
    from matdisc.generate import prototype_candidates

    cands = prototype_candidates(["Cu", "Pd"], GenerationConfig(max_atoms=8), names=["L1_0", "B32"])
    by_name = {c.prototype: c.structure for c in cands if c.formula == "CuPd"}
    path = directory / "known.cif"
    path.write_text("".join(str(CifWriter(by_name[n])).replace("data_CuPd", f"data_CuPd_{n}") for n in ("L1_0", "B32")))
    return path


def stop_process_group(proc, timeout: float = 30) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and its children; SIGKILL after
    ``timeout`` seconds (a served deployment, a campaign run)."""
    import os
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def copy_campaign(cfg, tmp_path, name: str, **update):
    """A copy of ``cfg``'s store at ``tmp_path/name`` and the config pointing at it (``update``
    replaces top-level sections): tests that write leave the session's stores alone."""
    import shutil

    from matdisc.config import CampaignConfig

    dst = tmp_path / name
    shutil.copytree(cfg.store_path, dst)
    data = cfg.model_dump(mode="json")
    data.update(store=str(dst), **update)
    return CampaignConfig.model_validate(data)


@pytest.fixture()
def s3_bucket(monkeypatch):
    """An S3 API on 127.0.0.1 (moto's server) with one empty bucket; credentials only in the
    environment, as s3fs/botocore read them for any real object store."""
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import urllib.request  # moto's backends live in this process: forget earlier tests' buckets

    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"))
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("campaigns")
    try:
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def store_after_cold_start(src: Path, dst: Path) -> None:
    """A copy of ``src`` as it was when round 0 was recorded: each commit log cut to its
    round-0 commits (the next writer truncates the arrays to the log), later rounds' files gone."""
    import json
    import shutil

    from matdisc.store import open_campaign

    shutil.copytree(src, dst)
    for log in (dst / "_commits").glob("*.jsonl"):
        if log.stem == "runs":
            continue
        lines = [line for line in log.read_text().splitlines(keepends=True)
                 if json.loads(line)["key"] == "r0" or json.loads(line)["key"].startswith("r0/")]
        if lines:
            log.write_text("".join(lines))
        else:  # a table round 0 does not write
            log.unlink()
            shutil.rmtree(dst / log.stem)
    for side in ("calculations", "training"):
        for d in (dst / side).iterdir():
            if d.is_dir() and d.name != "r0":
                shutil.rmtree(d)
    keep = set(json.loads(open_campaign(dst).models()["paths"].iloc[0]))
    for model in (dst / "models").glob("*.model"):
        if f"models/{model.name}" not in keep:
            model.unlink()


#: Control sequences a terminal program writes (colours, cursor moves, line erases).
ANSI = __import__("re").compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_terminal(args: list[str], env: dict, timeout: float, cwd=None, columns: int = 120) -> tuple[int, str]:
    """(exit code, raw output) of ``args`` run with a pseudo-terminal as stdin, stdout and stderr,
    as a user's shell runs it (so what draws only on a terminal draws)."""
    import fcntl
    import pty
    import select
    import struct
    import subprocess
    import termios
    import time

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(args, cwd=cwd, env={**env, "TERM": "xterm-256color"}, stdin=follower, stdout=follower,
                            stderr=follower, start_new_session=True)
    os.close(follower)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{args} ran over {timeout} s: {out[-3000:].decode(errors='replace')}")
            if not select.select([leader], [], [], 1.0)[0]:
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: every holder of the terminal closed it
                break
            if not chunk:
                break
            out += chunk
    finally:
        if proc.poll() is None:
            stop_process_group(proc)
        os.close(leader)
    return proc.wait(30), out.decode(errors="replace")
