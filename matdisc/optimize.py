"""One ASE relaxation loop shared by the MLIP and the reference stages.

``relax`` runs FIRE on positions (and the cell, through ``FrechetCellFilter``) with any ASE
calculator, classifies the outcome, and optionally keeps every evaluated frame. Failures
are outcomes, not exceptions: a calculator error, a NaN, atoms closer than a physical
minimum or a blown-up volume come back as a result with a reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.filters import FrechetCellFilter, UnitCellFilter
from ase.optimize import FIRE

from matdisc.records import RelaxResult, labelled

#: Closest approach (Å) that any real solid allows; closer means the potential failed.
MIN_DISTANCE = 0.6
#: A relaxation that grows the volume past this factor has exploded.
MAX_VOLUME_FACTOR = 3.0


class Exploded(RuntimeError):
    """The relaxation left physical space (NaN, overlapping atoms, volume blow-up)."""


def min_distance(atoms: Atoms, cutoff: float = 1.0) -> float:
    """Closest interatomic distance, or inf when none is within ``cutoff`` (a cheap search)."""
    if len(atoms) == 1 and not atoms.pbc.any():
        return np.inf
    from ase.neighborlist import neighbor_list

    d = neighbor_list("d", atoms, cutoff)
    return float(d.min()) if len(d) else np.inf


def check_physical(atoms: Atoms, energy: float, volume0: float) -> None:
    if not np.isfinite(energy):
        raise Exploded("non-finite energy")
    if atoms.pbc.all() and atoms.get_volume() > MAX_VOLUME_FACTOR * volume0:
        raise Exploded(f"volume grew more than {MAX_VOLUME_FACTOR:g}x")
    d = min_distance(atoms)
    if d < MIN_DISTANCE:
        raise Exploded(f"atoms {d:.2f} Å apart")


def relax(
    atoms: Atoms,
    calc: Calculator,
    *,
    id: str = "",
    fmax: float = 0.05,
    max_steps: int = 300,
    relax_cell: bool = True,
    cell_filter: str = "frechet",
    keep_frames: bool = False,
    on_step: Callable[[Atoms], None] | None = None,
) -> RelaxResult:
    """Relax a copy of ``atoms`` with ``calc``; never raises for a failed calculation."""
    work = atoms.copy()
    work.calc = calc
    volume0 = work.get_volume() if work.pbc.all() else 0.0
    frames: list[Atoms] = []
    t0 = time.perf_counter()
    n_steps = 0

    def record() -> None:
        energy = work.get_potential_energy()
        check_physical(work, energy, volume0)
        if keep_frames:
            stress = work.get_stress(voigt=True) if work.pbc.all() else None
            frames.append(labelled(work, energy, work.get_forces(), stress))
        if on_step is not None:
            on_step(work)

    try:
        cell = FrechetCellFilter if cell_filter == "frechet" else UnitCellFilter
        target = cell(work) if (relax_cell and work.pbc.all()) else work
        opt = FIRE(target, logfile=None)
        opt.attach(record, interval=1)
        converged = bool(opt.run(fmax=fmax, steps=max_steps)) if max_steps > 0 else True
        n_steps = opt.nsteps
        if max_steps == 0:
            record()
        energy = float(work.get_potential_energy())
        forces = work.get_forces()
        stress = work.get_stress(voigt=True) if work.pbc.all() else None
        status, reason = ("ok", "") if converged else ("unconverged", f"not converged in {max_steps} steps")
    except Exploded as err:
        return RelaxResult(id, "exploded", str(err), work.copy(), n_steps=n_steps,
                           walltime_s=time.perf_counter() - t0, frames=frames)
    except Exception as err:  # a calculator failure is an outcome to record, not a crash
        msg = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        return RelaxResult(id, "failed", msg, work.copy(), n_steps=n_steps,
                           walltime_s=time.perf_counter() - t0, frames=frames)
    final = work.copy()
    final.calc = None
    return RelaxResult(id, status, reason, final, energy=energy, n_steps=n_steps, forces=forces, stress=stress,
                       walltime_s=time.perf_counter() - t0, frames=frames)
