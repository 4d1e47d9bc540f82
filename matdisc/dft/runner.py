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

Single points (screening, training frames) cost little more than the process start and the
calculator's import, so :func:`run_statics` runs a batch of them in one child, one after the
other; each still has its own directory, log, wall time and outcome, and a calculation that
hangs or crashes the child is recorded and the rest go on in a new one.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from ase import Atoms

from matdisc.config import ReferenceConfig
from matdisc.dft.calculators import settings_hash
from matdisc.dft.protocol import run_protocol
from matdisc.records import ReferenceResult, labelled

JOB, RESULT, FRAMES, LOG = "job.pkl", "result.pkl", "frames.extxyz", "runner.log"


def run_reference(
    atoms: Atoms,
    cfg: ReferenceConfig,
    *,
    id: str,
    workdir: Path,
    threads: int | None = None,
    hessian: np.ndarray | None = None,
) -> ReferenceResult:
    """Relax + static with the configured reference calculator. Never raises for a failed calculation.

    ``threads``: cores an isolated calculation may use when ``OMP_NUM_THREADS`` is unset.
    ``hessian``: the relaxation's initial BFGS Hessian (:func:`matdisc.dft.protocol.run_protocol`)."""
    ref = cfg.resolved()
    t0 = time.perf_counter()
    calc_dir = _new_attempt_dir(Path(workdir) / dir_name(id))
    walltime = float(ref.walltime_s or 0)
    if ref.runs_isolated:
        _write_job(calc_dir, atoms, ref, id, hessian)
        res = _run_isolated([(id, atoms, calc_dir)], ref, threads)[0]
    else:
        res = run_protocol(atoms, ref, id=id, workdir=calc_dir, deadline=time.monotonic() + walltime, hessian=hessian)
        if res.status == "timeout":
            res.reason = f"wall time {walltime:g} s exceeded ({res.reason})"
    res.walltime_s = time.perf_counter() - t0  # what the worker spent, process start included (budgets)
    return _attempt(res, calc_dir)


def run_static(
    atoms: Atoms, cfg: ReferenceConfig, *, id: str, workdir: Path, threads: int | None = None
) -> ReferenceResult:
    """A single reference calculation (for perturbed training frames)."""
    return run_reference(atoms, cfg.model_copy(update={"max_steps": 0}), id=id, workdir=workdir, threads=threads)


def run_statics(
    jobs: Sequence[tuple[str, Atoms]], cfg: ReferenceConfig, *, workdir: Path, threads: int | None = None
) -> list[ReferenceResult]:
    """Single points of ``(id, atoms)`` jobs, in order: an isolated calculator runs them in one
    process (restarted after a calculation that timed out or crashed it). Never raises for a
    failed calculation; ``walltime_s`` of each is the worker's time from the previous one's end."""
    ref = cfg.model_copy(update={"max_steps": 0}).resolved()
    if not ref.runs_isolated:
        return [run_reference(atoms, ref, id=cid, workdir=workdir, threads=threads) for cid, atoms in jobs]
    batch = []
    for cid, atoms in jobs:
        calc_dir = _new_attempt_dir(Path(workdir) / dir_name(cid))
        _write_job(calc_dir, atoms, ref, cid)
        batch.append((cid, atoms, calc_dir))
    out: list[ReferenceResult] = []
    while len(out) < len(batch):
        out += _run_isolated(batch[len(out) :], ref, threads)
    return [_attempt(res, calc_dir) for res, (*_, calc_dir) in zip(out, batch)]


def _attempt(res: ReferenceResult, calc_dir: Path) -> ReferenceResult:
    res.attempt = attempt = int(calc_dir.name.rsplit("-", 1)[1])
    if attempt > 1:
        res.notes = "; ".join(filter(None, [f"attempt {attempt} (earlier ones kept beside it)", res.notes]))
    return res


def dir_name(cid: str) -> str:
    """A candidate id as one directory name under the calculations folder: ids are data (from
    prototype labels, file names, a user's known phases), so a separator, a parent reference or a
    control character never becomes part of a path; any such character becomes ``_``."""
    name = re.sub(r"[^A-Za-z0-9._@+=,-]", "_", cid)
    return "_" + name if name in ("", ".", "..") or name.startswith(".") else name


def _new_attempt_dir(base: Path) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    k = 1 + sum(1 for p in base.iterdir() if p.name.startswith("attempt-"))
    while True:
        try:
            (base / f"attempt-{k}").mkdir()
            return base / f"attempt-{k}"
        except FileExistsError:
            k += 1


def _threads(threads: int | None) -> int:
    """OMP threads for the child: this process's setting, else what the caller says it has
    (a Dask worker's thread count, from the engine side), else 1."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    return threads or 1


def _write_job(calc_dir: Path, atoms: Atoms, ref: ReferenceConfig, id: str, hessian: np.ndarray | None = None) -> None:
    with open(calc_dir / JOB, "wb") as f:
        pickle.dump({"atoms": atoms, "config": ref.model_dump(mode="json"), "id": id, "hessian": hessian}, f)
    (calc_dir / "worker.pid").write_text(str(os.getpid()))


#: Names of variables that hold credentials: the object store's, Prefect's (key, auth string), the Materials
#: Project's.
CREDENTIAL = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|^AWS_|^AZURE_|^GOOGLE_APPLICATION)", re.I)


def calculation_environment(environ: Mapping[str, str], keep: Sequence[str] = ()) -> dict[str, str]:
    """The environment a calculation process starts with: this one less its credentials.

    A calculation runs whatever the configured calculator and launcher are; it needs paths and
    licences of its own, never the campaign's keys to the store or the Prefect API."""
    return {k: v for k, v in environ.items() if k in keep or not CREDENTIAL.search(k)}


def _run_isolated(
    batch: Sequence[tuple[str, Atoms, Path]], ref: ReferenceConfig, threads: int | None
) -> list[ReferenceResult]:
    """Run the jobs written in ``batch``'s directories in one child, in order. Returns the results
    of those it finished, ending with the one it was on if it timed out or the child died."""
    launcher = shlex.split(ref.launcher.format(ranks=ref.ranks)) if ref.launcher else []
    parent = 0 if launcher else os.getpid()  # under a launcher our direct child is the launcher
    dirs = [calc_dir for *_, calc_dir in batch]
    cmd = [*launcher, sys.executable, "-m", "matdisc.dft", str(dirs[0]), str(parent), *map(str, dirs[1:])]
    n = str(_threads(threads))
    env = {
        **calculation_environment(os.environ, ref.pass_environment),
        "OMP_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
    }
    walltime = float(ref.walltime_s or 0) or None
    out: list[ReferenceResult] = []
    with open(dirs[0] / LOG, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=dirs[0], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started = time.perf_counter()
    try:
        while len(out) < len(batch):
            id, atoms, calc_dir = batch[len(out)]
            if (calc_dir / RESULT).is_file():
                with open(calc_dir / RESULT, "rb") as f:
                    res = pickle.load(f)
                now = time.perf_counter()
                res.walltime_s, started = now - started, now
                out.append(res)
                continue
            try:
                rc = proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                if walltime is not None and time.perf_counter() - started > walltime:
                    _kill(proc)
                    out.append(
                        _partial(
                            atoms, ref, id, calc_dir, "timeout", f"wall time {walltime:g} s exceeded: stopped", started
                        )
                    )
                    break
                continue
            if (calc_dir / RESULT).is_file():  # finished just before the child exited
                continue
            how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
            out.append(
                _partial(
                    atoms,
                    ref,
                    id,
                    calc_dir,
                    "error",  # killed (out of memory, a job's end) or crashed: nothing said about the structure
                    f"calculation process ended with {how}: {_last_line(calc_dir / LOG)}",
                    started,
                )
            )
            break
    except BaseException:  # cancelled task, interrupted flow: never leave the calculation running
        _kill(proc)
        raise
    if proc.poll() is None and len(out) == len(batch):
        proc.wait()
    return out


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.is_file() else []
    return lines[-1][:200] if lines else "no output"


def _partial(
    atoms: Atoms, ref: ReferenceConfig, id: str, calc_dir: Path, status: str, reason: str, t0: float
) -> ReferenceResult:
    """A result from what a stopped or crashed child left: its streamed frames."""
    frames = read_frames(calc_dir / FRAMES)
    last = frames[-1] if frames else atoms
    energy = float(last.info["REF_energy"]) if frames else float("nan")
    reason = f"{reason} ({len(frames)} frames kept)"
    return ReferenceResult(
        id,
        status,
        reason,
        last.copy(),
        energy=energy,
        frames=frames,
        settings_hash=settings_hash(ref),
        workdir=str(calc_dir),
        walltime_s=time.perf_counter() - t0,
    )


def read_frames(path: Path) -> list[Atoms]:
    """Frames a child streamed (a torn last frame from a kill is dropped)."""
    if not path.is_file():
        return []
    from ase.io import iread

    out = []
    try:
        for a in iread(str(path), index=":", format="extxyz"):
            out.append(labelled(a, float(a.info["REF_energy"]), a.arrays["REF_forces"], a.info.get("REF_stress")))
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


def _log_to(path: Path) -> None:
    """Send this process's output (the calculator's C code included) to ``path`` from now on."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _run_job(calc_dir: Path) -> None:
    with open(calc_dir / JOB, "rb") as f:
        job = pickle.load(f)
    lead = _rank() == 0
    (calc_dir / f"runner-{_rank()}.pid").write_text(str(os.getpid()))
    print(
        f"matdisc.dft runner: pid {os.getpid()}, rank {_rank()}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}",
        flush=True,
    )
    sink = (lambda frame: _append_frame(calc_dir / FRAMES, frame)) if lead else None
    res = run_protocol(
        job["atoms"],
        ReferenceConfig(**job["config"]),
        id=job["id"],
        workdir=calc_dir,
        on_frame=sink,
        hessian=job.get("hessian"),
    )
    if lead:
        tmp = calc_dir / (RESULT + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(res, f)
        os.replace(tmp, calc_dir / RESULT)


def main(argv: list[str]) -> int:
    """``DIR PARENT_PID [DIR ...]``: the job in each directory, in order, each logging to its own."""
    dirs, parent = [Path(argv[1]), *map(Path, argv[3:])], int(argv[2])
    _die_with_parent(parent)
    for i, calc_dir in enumerate(dirs):
        if i:
            _log_to(calc_dir / LOG)
        _run_job(calc_dir)
    return 0
