"""The reference protocol: relax, then a final static calculation at fixed settings.

Every verified energy comes from a static calculation with a fresh calculator on the
relaxed structure, so all energies of one settings hash are comparable. Every evaluated
frame of the relaxation (energy, forces, stress) is kept as training data.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from ase import Atoms

from matdisc.config import ReferenceConfig
from matdisc.dft.calculators import make_calculator
from matdisc.optimize import relax
from matdisc.records import RelaxResult, labelled


def run_reference(atoms: Atoms, cfg: ReferenceConfig, *, id: str, workdir: Path) -> RelaxResult:
    """Relax + static with the configured reference calculator. Never raises for a failed calculation."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    workdir = Path(workdir) / id
    res = relax(atoms, make_calculator(cfg, atoms, workdir / "relax"), id=id, fmax=cfg.fmax,
                max_steps=cfg.max_steps, relax_cell=cfg.relax_cell, keep_frames=True)
    if res.status in ("failed", "exploded"):
        res.walltime_s = time.perf_counter() - t0
        return res
    final = res.atoms.copy()
    try:
        final.calc = make_calculator(cfg, final, workdir / "static")
        energy = float(final.get_potential_energy())
        forces = final.get_forces()
        stress = final.get_stress(voigt=True) if final.pbc.all() else None
    except Exception as err:  # recorded, never raised
        res.status, res.reason = "failed", f"static: {type(err).__name__}: {err}".splitlines()[0][:300]
        res.walltime_s = time.perf_counter() - t0
        return res
    res.frames.append(labelled(final, energy, forces, stress))
    res.energy, res.forces, res.stress = energy, forces, stress
    res.atoms = labelled(final, energy, forces, stress)
    res.walltime_s = time.perf_counter() - t0
    return res


def perturbed_copies(atoms: Atoms, n: int, *, rattle: float, strain: float, seed: int) -> list[Atoms]:
    """Rattled and strained copies of a relaxed structure: off-equilibrium training frames."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = atoms.copy()
        eps = rng.uniform(-strain, strain, (3, 3))
        a.set_cell(a.cell[:] @ (np.eye(3) + (eps + eps.T) / 2), scale_atoms=True)
        a.positions += rng.normal(0, rattle, a.positions.shape)
        out.append(a)
    return out


def run_static(atoms: Atoms, cfg: ReferenceConfig, *, id: str, workdir: Path) -> RelaxResult:
    """A single reference calculation (for perturbed training frames)."""
    static_cfg = cfg.model_copy(update={"max_steps": 0})
    return relax(atoms, make_calculator(static_cfg, atoms, Path(workdir) / id), id=id, max_steps=0,
                 relax_cell=False, keep_frames=True)
