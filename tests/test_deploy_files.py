"""The deployment files and cluster recipes, checked without the systems they target.

No Docker engine, Slurm or Prefect work pool runs here: the compose file is validated by
docker-compose itself, prefect.yaml's deployments are resolved against the real flow and
campaign files, and the Slurm job scripts are rendered by dask-jobqueue.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from matdisc.config import ComputeConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _compose_config(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    assert shutil.which("docker-compose"), "docker-compose is installed by `make install` (Debian package)"
    env = {k: v for k, v in os.environ.items() if k not in ("POSTGRES_PASSWORD", "PREFECT_AUTH_STRING")}
    return subprocess.run(["docker-compose", "-f", str(DEPLOY / "docker-compose.yml"), "config"],
                          env={**env, **extra_env}, capture_output=True, text=True, timeout=60)


def test_compose_file_validates_and_binds_every_port_to_localhost():
    proc = _compose_config({"POSTGRES_PASSWORD": "not-a-real-secret", "PREFECT_AUTH_STRING": "admin:not-real-either"})
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    services = config["services"]
    assert {"postgres", "prefect-server", "prefect-worker", "dask-scheduler", "mlip-worker", "dft-worker"} <= set(services)
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(str(p).startswith("127.0.0.1:") for p in published), published
    # Prefect on PostgreSQL, the password from the environment; workers routed by resources
    db_url = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url.startswith("postgresql+asyncpg://") and "not-a-real-secret" in db_url
    assert "--resources MLIP=1" in services["mlip-worker"]["command"]
    assert "--resources DFT=1" in services["dft-worker"]["command"]
    gpus = services["mlip-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus[0]["capabilities"] == ["gpu"]
    assert services["prefect-worker"]["environment"]["MATDISC_SCHEDULER"] == "tls://dask-scheduler:8786"
    assert "not-a-real-secret" not in (DEPLOY / "docker-compose.yml").read_text()
    # the API requires the auth string, and the worker sends it
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == "admin:not-real-either"
    assert services["prefect-worker"]["environment"]["PREFECT_API_AUTH_STRING"] == "admin:not-real-either"


def test_compose_file_refuses_to_start_without_a_database_password_or_an_api_auth_string():
    proc = _compose_config({})
    assert proc.returncode != 0 and "POSTGRES_PASSWORD" in proc.stderr
    proc = _compose_config({"POSTGRES_PASSWORD": "not-a-real-secret"})
    assert proc.returncode != 0 and "PREFECT_AUTH_STRING" in proc.stderr


def test_prefect_yaml_deployments_resolve_to_the_flow_and_valid_campaigns():
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())
    deployments = spec["deployments"]
    assert {d["name"] for d in deployments} == {load_config(ROOT / d["parameters"]["config_path"]).name + "-nightly"
                                                for d in deployments}
    for d in deployments:
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        assert flow.name == "matdisc-continue-campaign"
        flow.validate_parameters(d["parameters"])  # names and types the flow accepts
        for schedule in d["schedules"]:
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
        assert d["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
        assert d["work_pool"]["name"] == "matdisc-process"


def test_slurm_pools_render_gpu_and_cpu_job_scripts_for_one_scheduler(tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue", reason="the [hpc] extra")
    monkeypatch.setenv("MATDISC_HOME", str(tmp_path))
    from dask_jobqueue import SLURMCluster

    from matdisc_flows.cluster import mlip_jobs, slurm_job_options

    cfg = ComputeConfig(scheduler="slurm", threads_per_dft_worker=2,
                        slurm={"queue": "cpu", "mlip_queue": "gpu", "cores": 8, "account": "proj1",
                               "walltime": "01:00:00"})
    dft, _ = slurm_job_options(cfg)
    cluster = SLURMCluster(**dft)
    try:
        dft_script = cluster.job_script()
        mlip_script = mlip_jobs(cluster, cfg)[0].job_script()
    finally:
        cluster.close()
    # both pools speak TLS with the certificates made for this cluster (files only the user reads)
    assert cluster.scheduler_address.startswith("tls://")
    for script in (dft_script, mlip_script):
        assert "--tls-ca-file" in script and "--tls-key" in script and "--protocol tls://" in script
    assert dft["scheduler_options"] == {"dashboard_address": "127.0.0.1:8787"}  # the dashboard: this machine only
    assert (tmp_path / "dask-tls").stat().st_mode & 0o777 == 0o700  # the jobs' keys: the user's alone
    # workers end cleanly 6 min (a tenth of the 1 h walltime) before Slurm would kill them, staggered
    for script in (dft_script, mlip_script):
        assert "--lifetime 3240s --lifetime-stagger 180s" in script
    assert "#SBATCH -p cpu" in dft_script and "#SBATCH -p gpu" in mlip_script
    assert "#SBATCH --gres=gpu:1" in mlip_script and "gres" not in dft_script
    assert "--resources DFT=1" in dft_script and "--nworkers 4" in dft_script  # 8 cores / 2 threads
    assert "export OMP_NUM_THREADS=2" in dft_script
    for script in (dft_script, mlip_script):  # a worker held past 30 s under load is not dropped for good
        assert "export DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP=300s DASK_DISTRIBUTED__WORKER__DAEMON=False" in script
        assert "--preload matdisc_flows.tasks" in script
    assert "--resources MLIP=1" in mlip_script and "--nworkers" not in mlip_script.replace("--nworkers 1", "")
    assert cluster.scheduler_address in mlip_script  # GPU workers join the DFT cluster's scheduler


def test_the_gpu_pool_replaces_a_job_that_ended_and_nothing_when_squeue_fails(tmp_path, monkeypatch):
    """dask-jobqueue's own code against Slurm commands of the test's making (sbatch numbers the
    jobs it is given, squeue lists the ones a file says are queued, scancel records): a GPU job that
    left the queue (its workers' lifetime ran out) is submitted again, the running ones are not,
    and an squeue that fails replaces nothing."""
    pytest.importorskip("dask_jobqueue", reason="the [hpc] extra")
    from dask_jobqueue import SLURMCluster

    from matdisc_flows.cluster import GpuPool, slurm_job_options

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    state = tmp_path / "slurm"
    state.mkdir()
    (state / "queued").write_text("")
    scripts = {
        "sbatch": f'n=$(( $(cat {state}/n 2>/dev/null || echo 0) + 1 )); echo $n > {state}/n; '
                  f'echo $n >> {state}/queued; cp "$1" {state}/job-$n.sh; echo "Submitted batch job $n"',
        "squeue": f'[ -e {state}/down ] && exit 1; cat {state}/queued',
        "scancel": f'echo "$@" >> {state}/cancelled',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("MATDISC_HOME", str(tmp_path / "home"))
    cfg = ComputeConfig(scheduler="slurm", slurm={"queue": "cpu", "mlip_queue": "gpu", "mlip_jobs": 2})
    cluster = SLURMCluster(**slurm_job_options(cfg)[0])
    try:
        pool = GpuPool(cluster, cfg)
        pool.start()
        assert [j.job_id for j in pool.jobs] == ["1", "2"] and pool.keep() == 0
        (state / "queued").write_text("2\n")  # job 1 ended
        assert pool.keep() == 1 and [j.job_id for j in pool.jobs] == ["3", "2"] and pool.resubmitted == 1
        assert "#SBATCH -p gpu" in (state / "job-3.sh").read_text()
        (state / "queued").write_text("")
        (state / "down").write_text("")  # the controller does not answer: nothing is submitted blindly
        assert pool.keep() == 0 and (state / "n").read_text().strip() == "3"
        pool.close()
        assert (state / "cancelled").read_text().split() == ["3", "2"]
    finally:
        cluster.close()


def test_prefect_deploy_creates_the_scheduled_deployments(prefect_api):
    """`prefect deploy --all` with deploy/prefect.yaml against a real Prefect API."""
    import asyncio
    import sys

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    async def create_pool():  # what `prefect work-pool create matdisc-process --type process` does
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name="matdisc-process", type="process"), overwrite=True)

    asyncio.run(create_pool())
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "MATDISC_PROJECT_DIR": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
                           "deploy/prefect.yaml"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    async def read():
        async with get_client() as client:
            return [await client.read_deployment_by_name(f"matdisc-continue-campaign/{name}")
                    for name in ("cu-pd-emt-nightly", "quickstart-al-li-nightly")]

    for d in asyncio.run(read()):
        assert d.entrypoint == "flows/deployment.py:continue_campaign" and d.work_pool_name == "matdisc-process"
        assert [(s.schedule.cron, s.active) for s in d.schedules] == [("0 2 * * *", True)]
        assert d.global_concurrency_limit.limit == 1 and d.concurrency_options.collision_strategy == "ENQUEUE"
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        assert d.parameters["more_rounds"] == 1 and (ROOT / d.parameters["config_path"]).is_file()
        # the worker's runs send heartbeats: a killed one is marked Crashed by the zombie-run automation
        assert d.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"


def _make_install_commands(*args: str) -> list[str]:
    """The commands ``make install`` would run from scratch (``-W pyproject.toml``: as if the venv
    were out of date), without running them."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        ["make", "-n", "-W", "pyproject.toml", "install", *args], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if "pip install" in line]


def test_the_gpu_install_is_the_pinned_torch_and_the_cuequivariance_of_its_cuda_major():
    """``make install GPU=1`` installs the same torch as the CPU install (PyPI's wheel is a CUDA
    build) and the ``gpu`` extra, whose cuEquivariance kernels must be built for the CUDA major
    version of that torch; the default install has GPAW and no GPU packages."""
    import tomllib

    import torch
    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    gpu, cpu = _make_install_commands("GPU=1"), _make_install_commands()
    torch_spec = next(line for line in gpu if '"torch==' in line).split('"')[1]
    assert torch_spec in " ".join(cpu)  # one torch for both
    pinned = Requirement(torch_spec).specifier
    assert torch.__version__.split("+")[0] in pinned  # the suite runs on the torch the Makefile pins
    allowed = next(Requirement(r) for r in project["dependencies"] if r.startswith("torch"))
    assert all(allowed.specifier.contains(v.version) for v in pinned)
    assert '.[dev,gpaw,gpu]"' in gpu[-1] and '.[dev,gpaw]"' in cpu[-1]
    kernels = [Requirement(r).name for r in project["optional-dependencies"]["gpu"] if "ops-torch-cu" in r]
    assert kernels == [f"cuequivariance-ops-torch-cu{torch.version.cuda.split('.')[0]}"]
    assert {Requirement(r).name for r in project["optional-dependencies"]["gpaw"]} == {"gpaw", "gpaw-data"}
    assert not any(Requirement(r).name == "gpaw" for r in project["dependencies"])


_CLIENT = """
import os, sys
from distributed import Client
with Client(os.environ["MATDISC_SCHEDULER"], timeout=60) as client:
    client.wait_for_workers(1, timeout=60)
    workers = client.scheduler_info()["workers"]
    print(sorted(int(w["resources"].get("DFT", 0)) for w in workers.values()), client.submit(sum, [1, 2]).result())
"""

_OTHERS = """
import sys
from distributed import Client, Security
try:
    Client(sys.argv[1], timeout=8, security=Security.temporary() if sys.argv[2] == "other-cert" else None)
    print("connected")
except Exception as err:
    print("refused", type(err).__name__)
"""


def test_the_compose_files_dask_speaks_tls_and_refuses_clients_without_its_certificate(tmp_path):
    """The compose file's own commands, run here with its paths and host names moved to this
    machine: the dask-tls service makes the credentials (0600, kept on a restart), its scheduler
    and a DFT worker join over TLS, the prefect worker's environment connects as it is, and a
    plain-TCP client or one with other certificates is refused."""
    import shlex
    import socket
    import sys

    from conftest import stop_process_group

    proc = _compose_config({"POSTGRES_PASSWORD": "not-a-real-secret", "PREFECT_AUTH_STRING": "admin:not-real-either"})
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    tls, ports = tmp_path / "dask-tls", []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])

    def here(text: str) -> str:
        return (text.replace("/dask-tls", str(tls)).replace("dask-scheduler:8786", f"127.0.0.1:{ports[0]}")
                .replace("--host 0.0.0.0 --port 8786", f"--host 127.0.0.1 --port {ports[0]}")
                .replace("--dashboard-address :8787", f"--dashboard-address 127.0.0.1:{ports[1]}"))

    def command(service: str) -> list[str]:
        args = shlex.split(here(services[service]["command"]))
        return [sys.executable, *args[1:]] if args[0] == "python" else [str(Path(sys.executable).parent / args[0]),
                                                                         *args[1:]]

    def environment(service: str) -> dict[str, str]:
        return {**os.environ, **{k: here(str(v)) for k, v in services[service]["environment"].items()}}

    for service in ("dask-scheduler", "dft-worker", "mlip-worker", "prefect-worker"):
        assert services[service]["depends_on"]["dask-tls"]["condition"] == "service_completed_successfully"
        assert "dask-tls:/dask-tls:ro" in services[service]["volumes"]
    assert services["prefect-worker"]["environment"]["MATDISC_SCHEDULER"] == "tls://dask-scheduler:8786"
    made = subprocess.run(command("dask-tls"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    files = {p.name: p.read_bytes() for p in tls.iterdir()}
    assert sorted(files) == ["ca.pem", "cert.pem", "key.pem"] and b"PRIVATE KEY" in files["key.pem"]
    assert tls.stat().st_mode & 0o777 == 0o700 and all((tls / n).stat().st_mode & 0o777 == 0o600 for n in files)
    assert subprocess.run(command("dask-tls"), cwd=ROOT, capture_output=True, timeout=120).returncode == 0
    assert {p.name: p.read_bytes() for p in tls.iterdir()} == files  # a restart keeps the cluster's identity

    started = []
    try:
        for service in ("dask-scheduler", "dft-worker"):
            started.append(subprocess.Popen(command(service), cwd=tmp_path, env=environment(service),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True))
        client = subprocess.run([sys.executable, "-c", _CLIENT], env=environment("prefect-worker"),
                                capture_output=True, text=True, timeout=180)
        assert client.stdout.strip() == "[1] 3", client.stderr[-3000:]
        for address, security in ((f"tcp://127.0.0.1:{ports[0]}", "none"), (f"tls://127.0.0.1:{ports[0]}",
                                                                             "other-cert")):
            other = subprocess.run([sys.executable, "-c", _OTHERS, address, security], capture_output=True,
                                   text=True, timeout=120, env={k: v for k, v in os.environ.items()
                                                                if not k.startswith("DASK_")})
            assert other.stdout.startswith("refused"), (address, security, other.stdout, other.stderr[-2000:])
    finally:
        for p in reversed(started):
            stop_process_group(p)
