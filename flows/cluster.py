"""Dask clusters for campaigns: local (CPU or CUDA), an existing scheduler, or Slurm.

Tasks are routed by Dask worker resources: MLIP relaxation and training need ``MLIP``,
reference calculations need ``DFT``. Locally that is one MLIP worker (on a GPU when CUDA
is present) and DFT workers on the remaining cores with ``OMP_NUM_THREADS`` set. A CPU MLIP
worker's torch threads share all the cores: a round's MLIP stages and its DFT stages never
run at the same time (:mod:`matdisc.round`), so the cores the DFT workers hold are idle while
it relaxes or trains (``compute.threads_per_mlip_worker`` sets fewer: on a machine other work
shares, torch's threads spin against it). Every server binds to 127.0.0.1.

A worker runs whatever a client sends it, so every cluster matdisc starts speaks TLS with
mutually authenticated certificates made for it (``Security.temporary()``): only this process,
the workers it started, and clients it makes while the cluster runs can connect.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from matdisc.config import ComputeConfig, slurm_seconds
from matdisc.errors import UserError
from matdisc.locations import matdisc_home

MLIP = {"MLIP": 1}
DFT = {"DFT": 1}


def cuda_visible_devices(i: int, visible: list[str]) -> str:
    """``CUDA_VISIBLE_DEVICES`` of the ``i``-th GPU worker: the inherited list rotated so its own
    device comes first (dask-cuda's convention), so ``cuda:0`` is that device and the worker still
    sees the others."""
    return ",".join(visible[i:] + visible[:i])


def inherited_cuda_devices(cuda_devices: int) -> list[str]:
    """The devices this process may use: ``CUDA_VISIBLE_DEVICES`` as Slurm ``--gres`` or MIG set it
    (ids, UUIDs or MIG names), else ``0 .. cuda_devices - 1``."""
    inherited = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return inherited[:cuda_devices] if inherited else [str(i) for i in range(cuda_devices)]


def local_worker_specs(cfg: ComputeConfig, *, cuda_devices: int = 0, security: Any = None) -> dict[str, dict]:
    """Worker specs for a SpecCluster: MLIP workers (one per visible GPU, at most ``mlip_workers``)
    and single-calculation DFT workers; every worker has a thread limit (and, given ``security``,
    speaks TLS with it)."""
    from distributed import Nanny

    cores = os.cpu_count() or 1
    n_mlip = cfg.mlip_workers if not cuda_devices else min(cfg.mlip_workers, cuda_devices) or 1
    n_dft = cfg.dft_workers or max(1, (cores - n_mlip) // cfg.threads_per_dft_worker)
    specs: dict[str, dict] = {}
    mlip_threads = cfg.threads_per_mlip_worker or max(1, cores // n_mlip)
    devices = inherited_cuda_devices(cuda_devices)
    tls = {"security": security, "protocol": "tls://"} if security is not None else {}
    for i in range(n_mlip):
        env = {"OMP_NUM_THREADS": str(mlip_threads)}
        if cuda_devices:
            env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices(i, devices)
        specs[f"mlip-{i}"] = {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "resources": MLIP,
                "host": "127.0.0.1",
                "env": env,
                "name": f"mlip-{i}",
                "preload": WORKER_PRELOAD,
                **tls,
            },
        }
    for i in range(n_dft):
        env = {"OMP_NUM_THREADS": str(cfg.threads_per_dft_worker)}
        specs[f"dft-{i}"] = {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "resources": DFT,
                "host": "127.0.0.1",
                "env": env,
                "name": f"dft-{i}",
                "preload": WORKER_PRELOAD,
                **tls,
            },
        }
    return specs


#: How long a connection may go unanswered before Dask calls it dead (its default: 30 s). A
#: worker whose event loop is held that long (the GIL of a first import or of the science code on
#: a loaded machine: 33.7 s was seen in the suite) was dropped by the scheduler, and its nanny
#: closed with it instead of restarting it: the round then waited for ever on a DFT worker that
#: no longer existed. A worker that is really gone still fails sooner: its process's end is seen
#: by its nanny at once.
COMM_TIMEOUT = "300s"
#: Imported by every worker as it starts, before it joins: a task's first unpickling then imports
#: nothing (it runs on the worker's event loop, which heartbeats wait on).
WORKER_PRELOAD = ["matdisc_flows.tasks"]
#: Dask config every worker matdisc starts gets: the waits above, and worker processes that are not
#: daemonic, so a task may start processes of its own (MACE training forks its members from a
#: forkserver with mace imported, matdisc.mlip.launch: a daemonic process may have no children).
WORKER_CONFIG = {"distributed.comm.timeouts.tcp": COMM_TIMEOUT, "distributed.worker.daemon": False}


def worker_config_exports() -> str:
    """``WORKER_CONFIG`` as the shell line a job script runs before ``dask worker`` (Dask reads
    ``DASK_A__B__C`` as ``a.b.c``)."""
    names = {key: "DASK_" + key.upper().replace(".", "__").replace("-", "_") for key in WORKER_CONFIG}
    return "export " + " ".join(f"{names[key]}={value}" for key, value in WORKER_CONFIG.items())


@contextlib.contextmanager
def campaign_cluster(cfg: ComputeConfig) -> Iterator[str]:
    """Yield a scheduler address for the campaign's tasks; tear down what we started."""
    if cfg.scheduler.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        yield cfg.scheduler
        return
    if cfg.scheduler == "slurm":
        with slurm_cluster(cfg) as address:
            yield address
        return
    import dask
    import torch
    from distributed import Scheduler, Security, SpecCluster

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    security = Security.temporary()
    scheduler = {
        "cls": Scheduler,
        "options": {
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:0",
            "protocol": "tls://",
            "security": security,
        },
    }
    workers = local_worker_specs(cfg, cuda_devices=cuda, security=security)
    # the scheduler runs here; nannies hand this process's config to their workers (restarts too)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_start_environ(), **WORKER_CONFIG}):
        cluster = SpecCluster(scheduler=scheduler, workers=workers, name="matdisc", silence_logs=40, security=security)
        try:
            with clients_use(security):
                yield cluster.scheduler_address
        finally:
            cluster.close()


#: The dask config keys of a Security object's fields (what ``Security()`` reads by default).
_TLS_CONFIG = {
    "tls_ca_file": "distributed.comm.tls.ca-file",
    "tls_client_key": "distributed.comm.tls.client.key",
    "tls_client_cert": "distributed.comm.tls.client.cert",
}


@contextlib.contextmanager
def clients_use(security: Any) -> Iterator[None]:
    """Make ``security`` the default of clients this process creates meanwhile: Prefect's
    DaskTaskRunner and a notebook's ``Client(address)`` take the address alone."""
    import dask

    values = {key: getattr(security, field) for field, key in _TLS_CONFIG.items()}
    with dask.config.set({"distributed.comm.require-encryption": True, **values}):
        yield


def worker_start_environ() -> dict:
    """The environment a nanny starts a worker process with: Dask's, without its
    ``MALLOC_TRIM_THRESHOLD_=65536``. That makes glibc hand freed heap back to the system at
    once, and torch on CPU allocates and frees small tensors all the time: 40 MLIP relaxations
    took 6.0-6.6 s with it and 4.7-5.0 s without, in one process. (Calculations run in child
    processes of their own, so a DFT worker's memory is returned when each one ends.)"""
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return environ


def _private_dir(path: Path) -> Path:
    """A directory only its owner can enter (it holds TLS keys)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def slurm_job_options(cfg: ComputeConfig) -> tuple[dict, dict]:
    """dask-jobqueue keyword arguments of the DFT pool (the cluster) and the MLIP (GPU) pool (jobs).

    DFT jobs run one single-threaded worker per ``threads_per_dft_worker`` cores (one
    calculation each, ``OMP_NUM_THREADS`` set); an MLIP job is one worker on one GPU (more
    GPUs: more jobs), so ``device: auto`` finds its GPU as cuda:0.
    """
    s = cfg.slurm
    per_dft = max(1, s.cores // cfg.threads_per_dft_worker)
    lifetime = worker_lifetime(slurm_seconds(s.walltime))
    preload = [arg for module in WORKER_PRELOAD for arg in ("--preload", module)]
    exports = worker_config_exports()
    common = {
        "account": s.account,
        "walltime": s.walltime,
        "interface": s.interface,
        "job_extra_directives": list(s.job_extra_directives),
    }
    dft = {
        **common,
        # TLS with certificates made for this cluster, written where the jobs can read them (0600);
        # the scheduler listens on the cluster network, its dashboard only on this machine
        "security": True,
        "shared_temp_directory": str(_private_dir(matdisc_home() / "dask-tls")),
        "scheduler_options": {"dashboard_address": "127.0.0.1:8787"},
        "queue": s.queue,
        "cores": s.cores,
        "processes": per_dft,
        "memory": s.memory,
        "worker_extra_args": ["--resources", "DFT=1", *lifetime, *preload],  # one calculation per worker at a time
        "job_script_prologue": [f"export OMP_NUM_THREADS={cfg.threads_per_dft_worker}", exports],
    }
    mlip: dict[str, Any] = {
        **common,
        "queue": s.mlip_queue or s.queue,
        "cores": s.mlip_cores,
        "processes": 1,
        "memory": s.mlip_memory,
        "worker_extra_args": ["--resources", "MLIP=1", *lifetime, *preload],
        "job_script_prologue": [f"export OMP_NUM_THREADS={s.mlip_cores}", exports],
    }
    if s.gpus_per_mlip_job:
        mlip["job_extra_directives"] = [*mlip["job_extra_directives"], f"--gres=gpu:{s.gpus_per_mlip_job}"]
    return dft, mlip


def worker_lifetime(walltime_s: float) -> list[str]:
    """``dask worker`` arguments that end a worker cleanly before Slurm kills its job: its tasks
    move elsewhere instead of dying with it, and the pools submit a new job (``--lifetime`` a tenth
    of the walltime short of it, at most 10 min, staggered by half that so workers do not all go
    at once)."""
    margin = min(600.0, 0.1 * walltime_s)
    return ["--lifetime", f"{walltime_s - margin:.0f}s", "--lifetime-stagger", f"{margin / 2:.0f}s"]


class GpuPool:
    """The fixed pool of MLIP (GPU) jobs, kept at its size: dask-jobqueue's adaptive scaling
    resubmits the DFT pool's jobs, but the GPU jobs are started by hand (one job template per
    cluster), so a job that ended (its workers' lifetime ran out, the node failed) is replaced here.
    A job has ended when ``squeue`` no longer lists it; when ``squeue`` fails, nothing is replaced."""

    def __init__(self, cluster: Any, cfg: ComputeConfig):
        self.cluster, self.cfg = cluster, cfg
        self.jobs = mlip_jobs(cluster, cfg)
        self.resubmitted = 0

    def start(self) -> None:
        for job in self.jobs:
            self.cluster.sync(job.start)  # sbatch

    def queued(self) -> set[str] | None:
        """Ids of this user's jobs Slurm still has (pending or running); None when squeue fails."""
        import getpass
        import subprocess

        try:
            out = subprocess.run(
                ["squeue", "-h", "-o", "%i", "-u", getpass.getuser()], capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return set(out.stdout.split()) if out.returncode == 0 else None

    def keep(self) -> int:
        """Replace the jobs that ended; returns how many were submitted again."""
        queued = self.queued()
        if queued is None:
            return 0
        submitted = 0
        for i, job in enumerate(self.jobs):
            if job.job_id is not None and str(job.job_id) not in queued:
                fresh = mlip_job(self.cluster, self.cfg, i)
                self.cluster.sync(fresh.start)
                self.jobs[i] = fresh
                submitted += 1
        self.resubmitted += submitted
        return submitted

    def close(self) -> None:
        for job in self.jobs:
            self.cluster.sync(job.close)  # scancel


def mlip_job(cluster: Any, cfg: ComputeConfig, i: int) -> Any:
    """The GPU pool's ``i``-th Slurm job: a worker that joins ``cluster``'s scheduler with its TLS
    credentials."""
    from dask_jobqueue.slurm import SLURMJob

    _, mlip_opts = slurm_job_options(cfg)
    return SLURMJob(
        scheduler=cluster.scheduler_address,
        name=f"matdisc-mlip-{i}",
        security=cluster._job_kwargs["security"],  # the credentials dask-jobqueue wrote for its jobs
        protocol="tls://",
        **mlip_opts,
    )


def mlip_jobs(cluster: Any, cfg: ComputeConfig) -> list:
    """The GPU pool's Slurm jobs (:func:`mlip_job`)."""
    return [mlip_job(cluster, cfg, i) for i in range(cfg.slurm.mlip_jobs)]


@contextlib.contextmanager
def slurm_cluster(cfg: ComputeConfig) -> Iterator[str]:
    """An adaptive SLURMCluster of DFT jobs, plus a fixed pool of GPU jobs whose MLIP workers
    join the same scheduler (dask-jobqueue has one job template per cluster)."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise UserError("compute.scheduler: slurm needs dask-jobqueue (pip install 'matdisc[hpc]')") from None
    import threading

    import dask

    dft_opts, _ = slurm_job_options(cfg)
    with dask.config.set(WORKER_CONFIG):  # the scheduler runs here
        cluster = SLURMCluster(**dft_opts)
        pool = GpuPool(cluster, cfg)
        stop = threading.Event()

        def keep_pool() -> None:
            while not stop.wait(KEEP_POOL_S):
                pool.keep()

        keeper = threading.Thread(target=keep_pool, name="matdisc-gpu-pool", daemon=True)
        try:
            pool.start()
            keeper.start()
            cluster.adapt(minimum_jobs=0, maximum_jobs=max(1, cfg.slurm.dft_jobs))
            with clients_use(cluster.security):
                yield cluster.scheduler_address
        finally:
            stop.set()
            if keeper.is_alive():
                keeper.join(timeout=KEEP_POOL_S)
            pool.close()
            cluster.close()


#: Seconds between two looks at the GPU pool's jobs.
KEEP_POOL_S = 60.0
