"""Dask clusters for campaigns: local (CPU or CUDA), an existing scheduler, or Slurm.

Tasks are routed by Dask worker resources: MLIP relaxation and training need ``MLIP``,
reference calculations need ``DFT``. Locally that is one MLIP worker (on a GPU when CUDA
is present) and DFT workers on the remaining cores with ``OMP_NUM_THREADS`` set. Every
server binds to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from matdisc.config import ComputeConfig
from matdisc.errors import UserError

MLIP = {"MLIP": 1}
DFT = {"DFT": 1}


def local_worker_specs(cfg: ComputeConfig, *, cuda_devices: int = 0) -> dict[str, dict]:
    """Worker specs for a SpecCluster: MLIP workers and single-calculation DFT workers."""
    from distributed import Nanny

    cores = os.cpu_count() or 1
    n_mlip = cfg.mlip_workers if not cuda_devices else min(cfg.mlip_workers, cuda_devices) or 1
    n_dft = cfg.dft_workers or max(1, (cores - n_mlip) // cfg.threads_per_dft_worker)
    specs: dict[str, dict] = {}
    for i in range(n_mlip):
        env = {"OMP_NUM_THREADS": "1"} if not cuda_devices else {"CUDA_VISIBLE_DEVICES": str(i)}
        specs[f"mlip-{i}"] = {"cls": Nanny, "options": {
            "nthreads": 1, "resources": MLIP, "host": "127.0.0.1", "env": env, "name": f"mlip-{i}"}}
    for i in range(n_dft):
        env = {"OMP_NUM_THREADS": str(cfg.threads_per_dft_worker)}
        specs[f"dft-{i}"] = {"cls": Nanny, "options": {
            "nthreads": 1, "resources": DFT, "host": "127.0.0.1", "env": env, "name": f"dft-{i}"}}
    return specs


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
    from distributed import Scheduler, SpecCluster

    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    cluster = SpecCluster(scheduler=scheduler, workers=local_worker_specs(cfg, cuda_devices=cuda),
                          name="matdisc", silence_logs=40)
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


@contextlib.contextmanager
def slurm_cluster(cfg: ComputeConfig) -> Iterator[str]:
    """An adaptive SLURMCluster whose workers carry both resources (pip install matdisc[hpc])."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise UserError("compute.scheduler: slurm needs dask-jobqueue (pip install 'matdisc[hpc]')") from None
    s = cfg.slurm
    cluster = SLURMCluster(
        queue=s.queue, account=s.account, cores=s.cores, processes=1, memory=s.memory, walltime=s.walltime,
        job_extra_directives=s.job_extra_directives,
        worker_extra_args=["--resources", "MLIP=1,DFT=1"],
        job_script_prologue=[f"export OMP_NUM_THREADS={s.cores}"],
    )
    cluster.adapt(minimum_jobs=0, maximum_jobs=max(1, s.dft_jobs + s.mlip_jobs))
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()
