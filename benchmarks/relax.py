"""MLIP relaxation throughput: the batched torch-sim engine vs the ASE loop, on one model.

Same model, same 64 structures (Cu-Pd fcc supercells of 8, 16, 24 and 32 atoms, random
decoration, ±3 % strain, 0.05 Å rattle), fmax 0.05 eV/Å with the cell relaxed (Fréchet
cell filter), float64, in one run:

* ``speedup_vs_ase``: wall time of the ASE loop (ASE FIRE + FrechetCellFilter +
  MACECalculator, one structure after another, matdisc's reference/fallback engine)
  divided by the batched engine's wall time (median of three runs) on the same 64 structures;
* ``step_overhead_vs_model``: time of one batched FIRE step on the full batch divided by
  one model evaluation (energy, forces and stress: forward + backward) on the same batch
  (``step_overhead_unit_cell``: the same with the unit-cell filter; torch-sim 0.3.0 took
  the Fréchet derivative of expm per system in a Python loop, 0.6 batches it);
* ``max_abs_dE_per_atom``: largest |E_batched − E_ase| per atom (eV) over structures both
  engines relaxed;
* ``scaling``: structures/s of the batched engine for 8 … 512 structures;
* ``engine_used``: the engines the batched runs' results record (``torch-sim`` only, or the
  benchmark says which fell back), ``structures_per_s`` of the batched engine on the 64, and
  ``torch_sim_version``.

The model is a tiny MACE (16x0e, r_max 4.5 Å) trained here on 200 EMT frames of Cu-Pd
(the size a campaign trains on a CPU), or ``--model PATH``. Prints one JSON line.
Run: ``.venv/bin/python benchmarks/relax.py`` (about 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")


def structures(n: int, seed: int = 0):
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    reps = [(2, 1, 1), (2, 2, 1), (3, 2, 1), (2, 2, 2)]  # 8, 16, 24, 32 atoms
    out = []
    for i in range(n):
        a = bulk("Cu", "fcc", a=3.75, cubic=True).repeat(reps[i % len(reps)])
        a.numbers = rng.choice([29, 46], len(a))
        a.set_cell(a.cell * (1 + rng.uniform(-0.03, 0.03)), scale_atoms=True)
        a.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append((f"s{i}", a))
    return out


def train_model(workdir: Path, device: str = "cpu") -> str:
    from ase.calculators.emt import EMT

    from matdisc.config import TrainingConfig
    from matdisc.mlip import train_committee
    from matdisc.records import labelled

    frames, groups = [], []
    for i, (_, a) in enumerate(structures(40, seed=99)):
        for k in range(5):
            b = a.copy()
            b.rattle(0.08, seed=1000 * i + k)
            b.calc = EMT()
            frames.append(labelled(b, b.get_potential_energy(), b.get_forces(), b.get_stress(voigt=True)))
            groups.append(str(i))
    cfg = TrainingConfig(num_channels=16, max_L=0, r_max=4.5, max_num_epochs=20, batch_size=8)
    return str(train_committee(frames, groups, workdir, cfg, size=1, seed=0, device=device)[0].path)


def step_overhead(model_path: str, batch, device: str, repeats: int = 10, cell_filter: str = "frechet",
                  dtype: str = "float64") -> float:
    """Batched FIRE step time / model evaluation time, on the same full batch (best of ``repeats``,
    interleaved, so that a noisy machine slows neither side alone)."""
    import torch
    import torch_sim as ts

    from matdisc.mlip.batched import mace_models
    from matdisc.mlip.model import load_torch_model

    model = mace_models([load_torch_model(model_path, device, dtype)], device, dtype)
    filt = ts.CellFilter.frechet if cell_filter == "frechet" else ts.CellFilter.unit
    state = ts.fire_init(ts.initialize_state([a for _, a in batch], model.device, model.dtype), model,
                         cell_filter=filt, fire_flavor="ase_fire")
    model(state)  # warm-up
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t_model, t_step = [], []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        model(state)
        sync()
        t_model.append(time.perf_counter() - t)
        t = time.perf_counter()
        state = ts.fire_step(state, model, fire_flavor="ase_fire")
        sync()
        t_step.append(time.perf_counter() - t)
    return float(min(t_step) / min(t_model))


def progress(msg: str, start: float = time.perf_counter()) -> None:
    """One line per phase on stderr, so a run stopped at a time limit still says how far it got."""
    print(f"[{time.perf_counter() - start:7.1f} s] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    from matdisc.config import MLIPConfig
    from matdisc.mlip import relax_ase, relax_many
    from matdisc.mlip.model import resolve_device

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a MACE .model file (default: train a tiny one on EMT data)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--no-ase", action="store_true", help="skip the ASE-loop baseline (speedup_vs_ase: null)")
    parser.add_argument("--scaling", default="8,32,128,512", help="structure counts for the scaling figures")
    parser.add_argument("--record", action="store_true", help="append the line to docs/benchmarks/relax.jsonl")
    args = parser.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        model = args.model or train_model(Path(tmp), device)
        t_train = time.perf_counter() - t
        progress(f"model ready ({t_train:.1f} s)")
        mlip = MLIPConfig(device=device, dtype=args.dtype, fmax=0.05, max_steps=500, engine="torch-sim")
        bench = structures(64)
        relax_many(bench[:4], [model], mlip)  # warm-up (lazy imports, allocator)
        runs = []
        for _ in range(3):  # median of three: this VM's speed drifts by ±15 % over minutes
            t = time.perf_counter()
            batched = relax_many(bench, [model], mlip)
            runs.append(time.perf_counter() - t)
            progress(f"batched relaxation of {len(bench)} structures: {runs[-1]:.2f} s")
        t_batched = float(np.median(runs))
        t = time.perf_counter()
        reference = [] if args.no_ase else relax_ase(bench, [model], mlip, device)
        t_ase = time.perf_counter() - t
        progress(f"ASE loop: {t_ase:.2f} s" if reference else "ASE loop skipped")
        usable = ("ok", "symmetry_changed")
        both = [(b, a) for b, a in zip(batched, reference) if b.status in usable and a.status in usable]
        de = max((abs(b.energy_per_atom - a.energy_per_atom) for b, a in both), default=None)
        overhead = step_overhead(model, bench, device, dtype=args.dtype)
        overhead_unit = step_overhead(model, bench, device, cell_filter="unit", dtype=args.dtype)
        progress(f"step overhead: frechet {overhead:.3f}, unit cell {overhead_unit:.3f}")
        scaling = {}
        for n in (int(x) for x in args.scaling.split(",")):
            batch = structures(n, seed=n)
            t = time.perf_counter()
            assert {r.engine for r in relax_many(batch, [model], mlip)} == {"torch-sim"}
            scaling[str(n)] = round(n / (time.perf_counter() - t), 2)
            progress(f"scaling: {n} structures at {scaling[str(n)]} structures/s")
    import torch
    from importlib.metadata import version

    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    result = {
        "device": name,
        "dtype": args.dtype,
        "speedup_vs_ase": round(t_ase / t_batched, 2) if reference else None,
        "step_overhead_vs_model": round(overhead, 3),
        "step_overhead_unit_cell": round(overhead_unit, 3),
        "max_abs_dE_per_atom": float(f"{de:.3g}") if de is not None else None,
        "scaling": scaling,
        "engine_used": sorted({r.engine for r in batched}),
        "structures_per_s": round(len(bench) / t_batched, 2),
        "torch_sim_version": version("torch-sim-atomistic"),
        "structures": len(bench),
        "atoms": [len(a) for _, a in bench[:4]],
        "both_converged": len(both),
        "batched_s": round(t_batched, 2),
        "ase_s": round(t_ase, 2) if reference else None,
        "batched_steps_mean": round(float(np.mean([r.n_steps for r in batched])), 1),
        "ase_steps_mean": round(float(np.mean([r.n_steps for r in reference])), 1) if reference else None,
        "train_s": round(t_train, 1),
    }
    print(json.dumps(result), flush=True)
    if args.record:
        from record import record

        record("relax", result)


if __name__ == "__main__":
    main()
