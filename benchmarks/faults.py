"""The store and the reference stage under injected faults, against the same work done uninterrupted.

Each fault runs the product's own code in its own processes and compares what the store holds
afterwards with an uninterrupted run of the same work in the same benchmark:

- ``kill9_writer``: a writer process recording a fixed sequence of reference results as the DFT
  stage does (each a relaxed structure with its row and its relaxation frames, one commit) is
  killed with SIGKILL at several moments, then the same work is run again to the end; the store
  (rows, structures, training frames) must equal the uninterrupted one.
- ``full_disk``: the writer runs with a file-size limit (``RLIMIT_FSIZE``) so a chunk write fails
  part-way; then it runs again without the limit.
- ``kill9_dft_child``: a reference calculation's own process (EMT, run isolated) is killed while
  it computes; the stage records an infrastructure ``error``, the next run computes it again
  (:func:`matdisc.stages.verify.retry_references`), and its energy must equal an untouched one.
- ``paused_writer``: a writer of a store on S3 (moto's server on 127.0.0.1) is stopped with
  SIGSTOP past its lease while another takes the lease over and commits, then continued and told
  to commit; its commit must be refused.
- ``racing_writers``: two writers take over one stale lease at the same moment, ``--trials``
  times; at most one may hold it each time.
- ``corrupt_model``: a registered model file changes on disk; loading it must be refused.

Killing a whole ``matdisc run``, one of its Dask workers and its Prefect server is
``tests/test_operations.py`` (a real campaign, minutes per fault), not repeated here.

    python benchmarks/faults.py [--kills 6] [--trials 10] [--record]

Prints one JSON line: ``faults_injected``, ``campaigns_equal_to_uninterrupted`` (of the faults
that leave a store to compare: equal / compared), ``records_lost``, ``records_duplicated``,
``stale_writer_commits_accepted``, ``double_lease_holders``, ``corrupt_models_loaded``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: The writer: records reference results c0..c{N-1} as the DFT stage does (``record_reference``: each
#: result's relaxation frames and its row, one commit) and exits; ``pause`` sleeps between them.
WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from ase import Atoms
    from matdisc.records import ReferenceResult, labelled
    from matdisc.stages.verify import record_reference
    from matdisc.store import CampaignWriter

    store, n, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    rng = np.random.default_rng(7)
    with CampaignWriter(store) as w:
        done = set(w.table("dft").get("id", ()))  # the stage computes only what has no result yet
        print("opened", flush=True)
        for i in range(n):
            k = 8 + i % 13
            atoms = Atoms(numbers=rng.choice([29, 46], k), positions=rng.uniform(0, 6, (k, 3)), cell=np.eye(3) * 6,
                          pbc=True)
            steps = [labelled(atoms, -3.0 * k - 0.01 * (i + s), rng.normal(0, 0.3, (k, 3)), np.zeros(6))
                     for s in range(1 + i % 4)]
            last = steps[-1]
            result = ReferenceResult(f"c{i}", "ok", "", last, energy=last.info["REF_energy"], n_steps=len(steps),
                                     forces=last.arrays["REF_forces"], walltime_s=1.0, frames=steps, settings_hash="s")
            if result.id not in done:
                record_reference(w, 1, result, "s", verified=True)
            print(i, flush=True)
            time.sleep(pause)
    """
)

#: EMT that takes a second per evaluation, so a calculation can be killed while it runs.
SLOW_EMT = textwrap.dedent(
    """
    import time
    from ase.calculators.emt import EMT

    class SlowEMT(EMT):
        def calculate(self, atoms=None, properties=("energy",), system_changes=()):
            time.sleep(1.0)
            super().calculate(atoms, properties, system_changes)
    """
)


def _table(store: Path) -> list[tuple]:
    """Each DFT row with its structure and the training frames committed with it (ids, energies,
    positions): a record that lost either part does not compare equal."""
    from matdisc.store import open_campaign

    camp = open_campaign(store)
    dft, frames = camp.table("dft"), camp.table("frames")
    structures = camp.frames("dft") if len(dft) else None
    training = camp.frames("frames") if len(frames) else None
    steps: dict[str, list[tuple]] = {}
    for j, r in enumerate(frames.to_dict("records")):
        steps.setdefault(r["id"], []).append(
            (float(r["energy"]), tuple(np.round(training.atoms(j).positions.ravel(), 9)))
        )
    return [
        (
            r["id"],
            float(r["energy"]),
            tuple(np.round(structures.atoms(i).positions.ravel(), 9)),
            tuple(steps.get(r["id"], ())),
        )
        for i, r in enumerate(dft.to_dict("records"))
    ] + [(cid, "frames without a row") for cid in sorted(set(steps) - set(dft.get("id", ())))]


def _write(store: Path, n: int, pause: float = 0.0, fsize: int | None = None, kill_after: float | None = None) -> int:
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing

    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(store), str(n), str(pause)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
    )
    if kill_after is not None:  # seconds after the writer opened the store (its imports take seconds)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "opened":
                break
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=600)
    return proc.returncode


def _compare(reference: list[tuple], got: list[tuple]) -> tuple[bool, int, int]:
    ids = [r[0] for r in got]
    duplicated = len(ids) - len(set(ids))
    lost = len({r[0] for r in reference} - set(ids))
    return sorted(set(got)) == sorted(reference) and not duplicated, lost, duplicated


def store_faults(tmp: Path, kills: int, n: int = 40) -> list[dict]:
    reference_store = tmp / "uninterrupted.zarr"
    assert _write(reference_store, n) == 0
    reference = _table(reference_store)
    out = []
    for k in range(kills):  # SIGKILL at moments spread over the writer's run
        store = tmp / f"kill-{k}.zarr"
        _write(store, n, pause=0.05, kill_after=0.05 + 0.37 * k)
        committed = len(_table(store)) if (store / "zarr.json").exists() else 0  # where the kill landed
        assert _write(store, n) == 0
        equal, lost, dup = _compare(reference, _table(store))
        out.append(
            {
                "fault": "kill9_writer",
                "after_s": 0.05 + 0.37 * k,
                "committed_at_kill": committed,
                "equal": equal,
                "lost": lost,
                "duplicated": dup,
            }
        )
    store = tmp / "full-disk.zarr"
    rc = _write(store, n, fsize=4_000)  # a file growing past 4 kB (the positions chunk) cannot be written
    committed = len(_table(store))
    assert _write(store, n) == 0
    equal, lost, dup = _compare(reference, _table(store))
    out.append(
        {
            "fault": "full_disk",
            "writer_exit": rc,
            "committed_at_failure": committed,
            "equal": equal,
            "lost": lost,
            "duplicated": dup,
        }
    )
    return out


def dft_child_fault(tmp: Path) -> dict:
    from ase.build import bulk
    from pymatgen.core import Structure

    from matdisc.config import CampaignConfig
    from matdisc.dft import settings_hash
    from matdisc.executor import InProcess
    from matdisc.generate import Candidate
    from matdisc.round import record_run
    from matdisc.stages.context import Run
    from matdisc.stages.generate import add_candidates
    from matdisc.stages.verify import reference_stage, retry_references, to_retry
    from matdisc.store import CampaignWriter

    (tmp / "slow_emt.py").write_text(SLOW_EMT)
    sys.path.insert(0, str(tmp))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")]))
    results = {}
    for name, inject in (("untouched", False), ("killed", True)):
        cfg = CampaignConfig.model_validate(
            {
                "name": name,
                "chemsys": ["Cu", "Pd"],
                "store": str(tmp / f"dft-{name}.zarr"),
                "reference": {"calculator": "slow_emt:SlowEMT", "isolate": True, "max_steps": 3, "start": "initial"},
                "compute": {"scheduler": "local"},
            }
        )
        cand = Candidate(Structure.from_ase_atoms(bulk("Cu", "fcc", a=3.7)), "prototype", "A1")
        with CampaignWriter(cfg.store_path) as w:
            record_run(w, cfg)
            add_candidates(w, [cand], 1, "bench")
            cid = "r1-0000-Cu-A1"
            if inject:
                threading.Thread(target=_kill_child, args=(cfg.store_path / "calculations",), daemon=True).start()
            reference_stage(Run(w, cfg, InProcess()).round(1), [(cid, bulk("Cu", "fcc", a=3.7))], verified=True)
            first = w.table("dft")["status"].iloc[-1]
            retry_references(Run(w, cfg, InProcess()), to_retry(w, settings_hash(cfg.reference)))
            dft = w.table("dft")
            results[name] = (first, list(dft["status"]), float(dft["e_dft_per_atom"].iloc[-1]))
    first, statuses, energy = results["killed"]
    equal = statuses[-1] == "ok" and abs(energy - results["untouched"][2]) < 1e-9
    return {
        "fault": "kill9_dft_child",
        "recorded": first,
        "statuses": statuses,
        "equal": equal,
        "lost": int(statuses[-1] != "ok"),
        "duplicated": 0,
    }


def _kill_child(calculations: Path) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        pids = list(calculations.rglob("runner-*.pid"))
        if pids:
            time.sleep(1.5)  # inside the first evaluations
            os.kill(int(pids[0].read_text()), signal.SIGKILL)
            return
        time.sleep(0.1)


def lease_faults(tmp: Path, trials: int) -> list[dict]:
    from benchmarks.remote_store import _moto_url
    from matdisc.store.remote import LEASE, Lease

    url, server = _moto_url()
    import s3fs

    fs = s3fs.S3FileSystem()
    root = url.removeprefix("s3://")
    out = []
    try:
        doubles = 0
        for _ in range(trials):
            fs.pipe_file(
                f"{root}/{LEASE}",
                json.dumps({"owner": "dead", "host": "x", "pid": 1, "expires": time.time() - 1}).encode(),
            )
            leases = [Lease(fs, root, url), Lease(fs, root, url)]
            barrier: threading.Barrier = threading.Barrier(2)
            held: list[Lease] = []
            threads = [threading.Thread(target=_take, args=(lease, barrier, held)) for lease in leases]
            [t.start() for t in threads]
            [t.join() for t in threads]
            doubles += len(held) > 1
            for lease in held:
                lease._stop.set()
            fs.rm_file(f"{root}/{LEASE}")
        out.append({"fault": "racing_writers", "trials": trials, "double_holders": doubles})
        out.append(_paused_writer(url, tmp))
    finally:
        server.stop()
    return out


def _take(lease, barrier: threading.Barrier, held: list) -> None:
    """One of two writers starting at the same moment on a stale lease."""
    barrier.wait()
    try:
        lease.acquire()
        held.append(lease)
    except Exception:  # the loser is refused (StoreError)
        pass


def _paused_writer(url: str, tmp: Path) -> dict:
    from matdisc.store import CampaignWriter, Frames, open_campaign

    script = tmp / "paused.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        from ase.build import bulk
        from matdisc.store import CampaignWriter, Frames
        w = CampaignWriter({url!r})
        row = lambda i: [{{"id": f"a{{i}}", "round": 1, "status": "ok", "reason": "", "energy": -1.0}}]
        w.append_records("dft", "a0", row(0), Frames.from_atoms([bulk("Cu")]))
        print("committed", flush=True)
        sys.stdin.readline()
        try:
            w.append_records("dft", "a1", row(1), Frames.from_atoms([bulk("Cu")]))
            print("accepted", flush=True)
        except Exception as err:
            print("refused", err, flush=True)
    """)
    )
    env = {**os.environ, "MATDISC_LEASE_SECONDS": "3", "MATDISC_HOME": str(tmp / "node-a")}
    a = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert a.stdout.readline().strip() == "committed"
        os.kill(a.pid, signal.SIGSTOP)
        time.sleep(4)
        os.environ["MATDISC_HOME"] = str(tmp / "node-b")
        with CampaignWriter(url) as b:
            b.append_records(
                "dft",
                "b0",
                [{"id": "b0", "round": 1, "status": "ok", "reason": "", "energy": -2.0}],
                Frames.from_atoms([__import__("ase.build").build.bulk("Cu")]),
            )
            os.kill(a.pid, signal.SIGCONT)
            a.stdin.write("go\n")
            a.stdin.flush()
            said = a.stdout.readline().strip()
    finally:
        os.kill(a.pid, signal.SIGCONT)
        a.kill()
        a.wait()
    ids = list(open_campaign(url).table("dft")["id"])
    accepted = int("a1" in ids or said.startswith("accepted"))
    return {
        "fault": "paused_writer",
        "writer_said": said[:120],
        "ids": ids,
        "stale_commits_accepted": accepted,
        "equal": ids == ["a0", "b0"],
        "lost": int("b0" not in ids),
        "duplicated": len(ids) - len(set(ids)),
    }


def corrupt_model_fault(tmp: Path) -> dict:
    """A file in ``models/`` named by a sha256 it no longer has: loading must be refused."""
    from matdisc.mlip.model import ModelError, load_torch_model

    path = tmp / ("0" * 64 + ".model")
    path.write_bytes(b"PK\x03\x04 not the model the registry recorded")
    try:
        load_torch_model(str(path))
        loaded = 1
    except ModelError:
        loaded = 0
    return {"fault": "corrupt_model", "loaded": loaded}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=6, help="SIGKILL moments of the writer")
    ap.add_argument("--trials", type=int, default=10, help="racing takeovers of one stale lease")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="matdisc-faults-"))
    os.environ["MATDISC_HOME"] = str(tmp / "home")
    t0 = time.perf_counter()
    faults = store_faults(tmp, args.kills) + [dft_child_fault(tmp)] + lease_faults(tmp, args.trials)
    faults.append(corrupt_model_fault(tmp))
    compared = [f for f in faults if "equal" in f]
    result = {
        "faults_injected": len(faults) - 1 + args.trials,  # each racing trial is one fault
        "campaigns_equal_to_uninterrupted": f"{sum(f['equal'] for f in compared)}/{len(compared)}",
        "records_lost": sum(f.get("lost", 0) for f in faults),
        "records_duplicated": sum(f.get("duplicated", 0) for f in faults),
        "stale_writer_commits_accepted": sum(f.get("stale_commits_accepted", 0) for f in faults),
        "double_lease_holders": sum(f.get("double_holders", 0) for f in faults),
        "corrupt_models_loaded": sum(f.get("loaded", 0) for f in faults),
        "seconds": round(time.perf_counter() - t0, 1),
        "faults": faults,
    }
    print(json.dumps(result))
    if args.record:
        from benchmarks.record import record

        record("faults", result)


if __name__ == "__main__":
    main()
