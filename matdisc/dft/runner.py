"""Where one reference calculation runs: in this process, or in its own killable process.

DFT codes can hang in an SCF, crash in C, or outlive their welcome, so by default (all
calculators but EMT) each calculation runs as ``python -m matdisc.dft DIR`` in a
process of its own, optionally under an MPI launcher (``reference.launcher``, e.g.
``mpirun -np {ranks}``). The parent waits at most ``reference.walltime_s``, then kills
the whole process group and records ``timeout`` with every frame computed so far (the
child streams them to ``frames.extxyz``). The child dies with its parent (a killed Dask
worker leaves no orphan DFT run behind).

Every run of a candidate gets a fresh ``attempt-N`` directory under ``WORKDIR/ID``, so a
retried calculation never overwrites what an earlier, lost attempt left for inspection.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from ase import Atoms

from matdisc.config import ReferenceConfig
from matdisc.dft.calculators import settings_hash
from matdisc.dft.protocol import run_protocol
from matdisc.records import ReferenceResult, labelled

JOB, RESULT, FRAMES, LOG = "job.pkl", "result.pkl", "frames.extxyz", "runner.log"


def run_reference(atoms: Atoms, cfg: ReferenceConfig, *, id: str, workdir: Path) -> ReferenceResult:
    """Relax + static with the configured reference calculator. Never raises for a failed calculation."""
    ref = cfg.resolved()
    t0 = time.perf_counter()
    calc_dir = _new_attempt_dir(Path(workdir) / id)
    attempt = int(calc_dir.name.rsplit("-", 1)[1])
    walltime = float(ref.walltime_s or 0)
    if ref.runs_isolated:
        res = _run_isolated(atoms, ref, id, calc_dir)
    else:
        res = run_protocol(atoms, ref, id=id, workdir=calc_dir, deadline=time.monotonic() + walltime)
        if res.status == "timeout":
            res.reason = f"wall time {walltime:g} s exceeded ({res.reason})"
    res.attempt = attempt
    res.walltime_s = time.perf_counter() - t0  # what the worker spent, process start included (budgets)
    if attempt > 1:
        res.notes = "; ".join(filter(None, [f"attempt {attempt} (earlier ones kept beside it)", res.notes]))
    return res


def run_static(atoms: Atoms, cfg: ReferenceConfig, *, id: str, workdir: Path) -> ReferenceResult:
    """A single reference calculation (for perturbed training frames)."""
    return run_reference(atoms, cfg.model_copy(update={"max_steps": 0}), id=id, workdir=workdir)


def _new_attempt_dir(base: Path) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    k = 1 + sum(1 for p in base.iterdir() if p.name.startswith("attempt-"))
    while True:
        try:
            (base / f"attempt-{k}").mkdir()
            return base / f"attempt-{k}"
        except FileExistsError:
            k += 1


def _threads() -> int:
    """OMP threads for the child: the worker's setting, else its Dask thread count, else 1."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return 1


def _run_isolated(atoms: Atoms, ref: ReferenceConfig, id: str, calc_dir: Path) -> ReferenceResult:
    with open(calc_dir / JOB, "wb") as f:
        pickle.dump({"atoms": atoms, "config": ref.model_dump(mode="json"), "id": id}, f)
    launcher = shlex.split(ref.launcher.format(ranks=ref.ranks)) if ref.launcher else []
    parent = 0 if launcher else os.getpid()  # under a launcher our direct child is the launcher
    cmd = [*launcher, sys.executable, "-m", "matdisc.dft", str(calc_dir), str(parent)]
    threads = str(_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    (calc_dir / "worker.pid").write_text(str(os.getpid()))
    walltime = float(ref.walltime_s or 0) or None
    t0 = time.perf_counter()
    with open(calc_dir / LOG, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=calc_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=walltime)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return _partial(atoms, ref, id, calc_dir, "timeout", f"wall time {walltime:g} s exceeded: stopped", t0)
        except BaseException:  # cancelled task, interrupted flow: never leave the calculation running
            _kill(proc)
            raise
    if (calc_dir / RESULT).is_file():
        with open(calc_dir / RESULT, "rb") as f:
            return pickle.load(f)
    how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
    return _partial(atoms, ref, id, calc_dir, "failed", f"calculation process ended with {how}: {_last_line(calc_dir / LOG)}",
                    t0)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.is_file() else []
    return lines[-1][:200] if lines else "no output"


def _partial(atoms: Atoms, ref: ReferenceConfig, id: str, calc_dir: Path, status: str, reason: str,
             t0: float) -> ReferenceResult:
    """A result from what a stopped or crashed child left: its streamed frames."""
    frames = read_frames(calc_dir / FRAMES)
    last = frames[-1] if frames else atoms
    energy = float(last.info["REF_energy"]) if frames else float("nan")
    reason = f"{reason} ({len(frames)} frames kept)"
    return ReferenceResult(id, status, reason, last.copy(), energy=energy, frames=frames,
                           settings_hash=settings_hash(ref), workdir=str(calc_dir),
                           walltime_s=time.perf_counter() - t0)


def read_frames(path: Path) -> list[Atoms]:
    """Frames a child streamed (a torn last frame from a kill is dropped)."""
    if not path.is_file():
        return []
    from ase.io import iread

    out = []
    try:
        for a in iread(str(path), index=":", format="extxyz"):
            forces = a.arrays.get("REF_forces")
            stress = a.info.get("REF_stress")
            out.append(labelled(a, float(a.info["REF_energy"]), forces, stress))
    except Exception:  # the writer was killed mid-frame
        pass
    return out


def _append_frame(path: Path, frame: Atoms) -> None:
    from ase.io import write

    write(str(path), frame, format="extxyz", append=True)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this process when its parent (the Dask worker) dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if parent and os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _rank() -> int:
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def main(argv: list[str]) -> int:
    calc_dir, parent = Path(argv[1]), int(argv[2])
    _die_with_parent(parent)
    with open(calc_dir / JOB, "rb") as f:
        job = pickle.load(f)
    lead = _rank() == 0
    (calc_dir / f"runner-{_rank()}.pid").write_text(str(os.getpid()))
    print(f"matdisc.dft runner: pid {os.getpid()}, rank {_rank()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    sink = (lambda frame: _append_frame(calc_dir / FRAMES, frame)) if lead else None
    res = run_protocol(job["atoms"], ReferenceConfig(**job["config"]), id=job["id"], workdir=calc_dir, on_frame=sink)
    if lead:
        tmp = calc_dir / (RESULT + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(res, f)
        os.replace(tmp, calc_dir / RESULT)
    return 0

