"""Start mace-torch's trainer in a child process whose imports are already done.

Training runs ``mace.cli.run_train`` in its own process: mace configures logging and global
torch state for itself, and a process keeps that out of the worker. Started as
``python -m mace.cli.run_train``, every run first spends ~12 s of CPU importing torch, mace,
scipy and torchmetrics (2-core machine), more than a fine-tuning run of a small committee
member takes itself. So members are forked from multiprocessing's forkserver with
``mace.cli.run_train`` preloaded: the imports happen once per worker process, and each run
starts from a fork of them. The forkserver imports torch but never touches a GPU, so a child
may still use CUDA.

Whether a run's child had the trainer imported before the fork (:mod:`matdisc.forkserver`
says when it has) is reported per run (:class:`Launch`), and tests assert it. A daemonic process
(a Dask worker whose ``distributed.worker.daemon`` is left true: the clusters matdisc starts set it
false) may not fork children: there the run is ``python -m mace.cli.run_train`` as before, with a
warning that says why and how to avoid it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from matdisc.forkserver import TRAINER, forkserver_context


@dataclass(frozen=True)
class Launch:
    """How one training run went: its exit code, wall time, and whether the trainer was imported
    before the fork (``preloaded``) or by the child itself."""

    exitcode: int
    seconds: float
    preloaded: bool
    mode: str = "forkserver"  # or "subprocess" (a daemonic process: no children of its own)


logger = logging.getLogger(__name__)


def run_trainer(args: list[str], cwd: Path, log: Path, threads: int | None = None) -> Launch:
    """Run ``mace.cli.run_train`` with command-line ``args`` in ``cwd``, its stdout and stderr to
    ``log``, with ``threads`` torch threads; returns when it ends."""
    if multiprocessing.current_process().daemon:
        return _run_subprocess(args, cwd, log, threads)
    ctx = forkserver_context(train=True)
    flag = Path(cwd) / ".preloaded"
    flag.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = ctx.Process(target=_child, args=(list(args), str(cwd), str(log), threads), name="mace-train")
    proc.start()
    proc.join()
    seconds = time.perf_counter() - t0
    exitcode = proc.exitcode if proc.exitcode is not None else -1
    return Launch(exitcode, seconds, flag.exists())


def _run_subprocess(args: list[str], cwd: Path, log_path: Path, threads: int | None) -> Launch:
    logger.warning(
        "MACE training imports mace in each run (~12 s of CPU): this process is daemonic and may not fork "
        "(a Dask worker: set distributed.worker.daemon: false, DASK_DISTRIBUTED__WORKER__DAEMON=False)"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **_thread_env(threads)}
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.run([sys.executable, "-m", TRAINER, *args], cwd=cwd, env=env, stdout=out, stderr=out)
    return Launch(proc.returncode, time.perf_counter() - t0, preloaded=False, mode="subprocess")


def _thread_env(threads: int | None) -> dict[str, str]:
    """The environment that gives a training run ``threads`` intra-op threads (none: inherited)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}


def _child(args: list[str], cwd: str, log: str, threads: int | None) -> None:
    preloaded = TRAINER in sys.modules
    os.chdir(cwd)
    if preloaded:
        Path(".preloaded").touch()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    import warnings

    warnings.simplefilter("ignore")
    os.environ.update(_thread_env(threads))
    import torch
    from mace.cli.run_train import main

    if threads:
        torch.set_num_threads(threads)
    sys.argv = ["mace_run_train", *args]
    try:
        main()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
