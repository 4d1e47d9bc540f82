"""Campaign-store throughput against extxyz: append, read back, bytes per atom.

Appends N structures (mean ~20 atoms: positions, numbers, forces, energy, stress) in
batches to a fresh store, reads every structure back as ASE Atoms, and does the same
with ASE's extxyz writer/reader in the same run. Prints one JSON line.

    python benchmarks/store.py [--n 100000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from matdisc.store import CampaignWriter, Frames, open_campaign


def make_batch(rng: np.random.Generator, n: int) -> tuple[list[Atoms], list[np.ndarray], np.ndarray]:
    """Crystal-like cells: lattice sites plus thermal noise, realistic force magnitudes."""
    atoms, forces = [], []
    for _ in range(n):
        k = int(rng.integers(4, 37))  # mean 20
        a = float(rng.uniform(3.0, 4.5))
        grid = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)[:k]
        pos = grid * a / 2 + rng.normal(0, 0.05, (k, 3))
        cell = np.diag([2 * a] * 3) + rng.normal(0, 0.02, (3, 3))
        atoms.append(Atoms(numbers=rng.choice([13, 28, 29, 46, 79], k), positions=pos, cell=cell, pbc=True))
        forces.append(rng.normal(0, 0.3, (k, 3)))
    return atoms, forces, rng.normal(-4.0, 0.5, n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=1000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    batches = [make_batch(rng, args.batch) for _ in range(args.n // args.batch)]
    n_atoms = sum(len(a) for b in batches for a in b[0])
    tmp = Path(tempfile.mkdtemp())
    try:
        store = tmp / "bench.zarr"
        t0 = time.perf_counter()
        with CampaignWriter(store) as w:
            for i, (atoms, forces, energy) in enumerate(batches):
                w.append("frames", f"b{i}", {"energy": energy}, Frames.from_atoms(atoms, forces=forces))
        t_append = time.perf_counter() - t0

        t0 = time.perf_counter()
        camp = open_campaign(store)
        frames = camp.frames()
        energies = camp.table("frames")["energy"].to_numpy()
        back = frames.to_atoms()
        t_read = time.perf_counter() - t0
        assert len(back) == args.n and np.isclose(energies.sum(), sum(b[2].sum() for b in batches))

        # bytes of the per-atom arrays the target names: positions + numbers + forces
        group = store / "frames"
        per_atom = sum(f.stat().st_size for name in ("positions", "numbers", "forces")
                       for f in (group / name).rglob("*") if f.is_file())
        total = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())

        xyz = tmp / "bench.extxyz"
        t0 = time.perf_counter()
        for atoms, forces, energy in batches:
            for a, f, e in zip(atoms, forces, energy):
                a.calc = SinglePointCalculator(a, energy=float(e), forces=f)
            write(xyz, atoms, format="extxyz", append=True)
        t_xyz_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        back_xyz = read(xyz, index=":", format="extxyz")
        t_xyz_read = time.perf_counter() - t0
        assert len(back_xyz) == args.n
        print(json.dumps({
            "n_structures": args.n,
            "n_atoms": n_atoms,
            "append_structures_per_s": round(args.n / t_append, 1),
            "read_structures_per_s": round(args.n / t_read, 1),
            "extxyz_write_structures_per_s": round(args.n / t_xyz_write, 1),
            "extxyz_read_structures_per_s": round(args.n / t_xyz_read, 1),
            "append_ratio_vs_extxyz": round(t_xyz_write / t_append, 2),
            "read_ratio_vs_extxyz": round(t_xyz_read / t_read, 2),
            "bytes_per_atom": round(per_atom / n_atoms, 2),
            "bytes_per_atom_all_arrays": round(total / n_atoms, 2),
            "extxyz_bytes_per_atom": round(xyz.stat().st_size / n_atoms, 2),
        }))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
