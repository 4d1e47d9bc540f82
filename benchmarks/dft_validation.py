"""DFT validation: relaxed lattice constants against experiment, and DFT throughput on Dask.

1. Relaxes the primitive cells of six solids (Al, Cu, Ag, Ni with spin, Si, NaCl) with the
   reference protocol (GPAW, PBE, BFGS + Fréchet cell filter, final static) at the
   ``accurate`` and ``fast`` presets, starting from the experimental cell, and compares the
   lattice constant with experiment (room temperature, not corrected for zero-point
   motion: PBE's known +1-2 % shows as such).
2. Runs N small-cell GPAW calculations (the real isolated runner) on a Dask cluster of 1
   and of 2 single-threaded workers, one calculation per worker at a time, and reports the
   throughput ratio.

Prints one JSON line: ``preset`` (the validated one), ``lattice_rel_error`` (solid ->
signed relative error at that preset), the same for the other preset under its name,
``parallel_speedup_2_workers``, and timings.

    python benchmarks/dft_validation.py [--presets accurate,fast] [--n-parallel 10]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from ase import Atoms  # noqa: E402
from ase.build import bulk  # noqa: E402

from matdisc.config import ReferenceConfig  # noqa: E402
from matdisc.dft import run_reference  # noqa: E402

#: Experimental lattice constants (Å, room temperature; CRC Handbook / Kittel).
EXPERIMENT: dict[str, tuple[str, float]] = {
    "Al": ("fcc", 4.0495),
    "Cu": ("fcc", 3.6149),
    "Ag": ("fcc", 4.0853),
    "Ni": ("fcc", 3.5240),  # ferromagnetic: spin-polarised through spin: auto
    "Si": ("diamond", 5.4310),
    "NaCl": ("rocksalt", 5.6402),
}


def primitive(solid: str) -> Atoms:
    structure, a = EXPERIMENT[solid]
    return bulk(solid, structure, a=a)


def lattice_constant(atoms: Atoms) -> float:
    """Cubic a of an fcc-lattice primitive cell (fcc, diamond, rocksalt): V = a^3 / 4."""
    return float((4 * atoms.get_volume()) ** (1 / 3))


def validate(preset: str, workdir: Path) -> dict:
    errors, details = {}, {}
    cfg = ReferenceConfig(calculator="gpaw", preset=preset, walltime_s=3600)
    for solid, (_, a_exp) in EXPERIMENT.items():
        t0 = time.perf_counter()
        res = run_reference(primitive(solid), cfg, id=f"{preset}-{solid}", workdir=workdir)
        a = lattice_constant(res.atoms)
        errors[solid] = round(a / a_exp - 1, 5) if res.status == "ok" else None
        details[solid] = {"a": round(a, 4), "a_exp": a_exp, "status": res.status, "steps": res.n_steps,
                          "seconds": round(time.perf_counter() - t0, 1),
                          **({"magmom": round(res.magmom, 3)} if res.magmom == res.magmom else {})}
        print(f"# {preset} {solid}: a = {a:.4f} Å (exp {a_exp}) {100 * (a / a_exp - 1):+.2f} % "
              f"[{res.status}, {res.n_steps} steps, {details[solid]['seconds']} s]", flush=True)
    return {"lattice_rel_error": errors, "details": details}


def _calc_job(args: tuple[str, float, str]) -> float:
    """One small-cell GPAW relax + static on a worker; returns its own wall time."""
    cid, a, root = args
    t0 = time.perf_counter()
    cfg = ReferenceConfig(calculator="gpaw", preset="fast", max_steps=3)
    res = run_reference(bulk("Si", "diamond", a=a), cfg, id=cid, workdir=Path(root))
    assert res.status in ("ok", "unconverged"), res.reason
    return time.perf_counter() - t0


def throughput(n_workers: int, n_calcs: int, workdir: Path) -> tuple[float, float]:
    """(wall seconds, summed task seconds) of n_calcs calculations on n_workers DFT workers."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, resources={"DFT": 1}, silence_logs=40) as cluster, \
            Client(cluster) as client:
        client.run(lambda: __import__("matdisc.dft"))  # workers warm: imports are not throughput
        jobs = [(f"w{n_workers}-{i}", 5.35 + 0.02 * i, str(workdir)) for i in range(n_calcs)]
        t0 = time.perf_counter()
        futures = client.map(_calc_job, jobs, resources={"DFT": 1}, pure=False)
        task_s = sum(client.gather(futures))
        return time.perf_counter() - t0, task_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="accurate,fast", help="comma-separated; the first is validated")
    parser.add_argument("--n-parallel", type=int, default=10, help="calculations in the throughput test")
    args = parser.parse_args()
    presets = args.presets.split(",")
    out: dict = {"preset": presets[0]}
    with tempfile.TemporaryDirectory(prefix="matdisc-dft-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        one = throughput(1, args.n_parallel, root / "parallel")
        two = throughput(2, args.n_parallel, root / "parallel")
        out["parallel_speedup_2_workers"] = round(one[0] / two[0], 3)
        out["parallel"] = {"calculations": args.n_parallel, "wall_s_1_worker": round(one[0], 1),
                           "wall_s_2_workers": round(two[0], 1), "task_s_1_worker": round(one[1], 1),
                           "task_s_2_workers": round(two[1], 1), "cores": os.cpu_count()}
        print(f"# throughput: 1 worker {one[0]:.1f} s, 2 workers {two[0]:.1f} s", flush=True)
        for i, preset in enumerate(presets):
            result = validate(preset, root / "lattice")
            if i == 0:
                out["lattice_rel_error"] = result["lattice_rel_error"]
                out["details"] = result["details"]
            else:
                out[preset] = result
        errs = [abs(v) for v in out["lattice_rel_error"].values() if v is not None]
        out["max_abs_rel_error"] = round(max(errs), 5) if errs else None
        out["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
