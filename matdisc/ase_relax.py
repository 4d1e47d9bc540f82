"""One ASE relaxation loop shared by the MLIP and the reference stages.

``relax`` runs FIRE on positions (and the cell, through ``FrechetCellFilter``) with any ASE
calculator, classifies the outcome, and optionally keeps every evaluated frame. Failures
are outcomes, not exceptions: a calculator error, a NaN, atoms closer than a physical
minimum or a blown-up volume come back as a result with a reason.

``relaxation_hessian`` gives the curvature of a structure in the same coordinates (atoms and
cell filter) with any calculator, so a cheap model's curvature can start BFGS with a dearer one
(``relax(hessian=...)``): ASE's default guess, 70 eV/Å² times the identity, costs the expensive
calculator several steps to learn what the model already knows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.calculators.singlepoint import SinglePointCalculator
from ase.filters import FrechetCellFilter, UnitCellFilter
from ase.optimize import BFGS, FIRE, LBFGS

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


#: ASE optimizers by name (BFGS usually needs the fewest DFT steps; FIRE is robust far from a minimum).
OPTIMIZERS = {"FIRE": FIRE, "BFGS": BFGS, "LBFGS": LBFGS}


def relax(
    atoms: Atoms,
    calc: Calculator,
    *,
    id: str = "",
    fmax: float = 0.05,
    max_steps: int = 300,
    relax_cell: bool = True,
    cell_filter: str = "frechet",
    optimizer: str = "FIRE",
    stress_tol: float | None = None,
    deadline: float | None = None,
    keep_frames: bool = False,
    on_step: Callable[[Atoms], None] | None = None,
    scf_error: Callable[[BaseException], bool] | None = None,
    hessian: np.ndarray | None = None,
) -> RelaxResult:
    """Relax a copy of ``atoms`` with ``calc``; never raises for a failed calculation.

    Converged means: every atomic force below ``fmax`` and, with ``stress_tol`` (eV/Å³),
    every stress component below it; without ``stress_tol`` the cell filter's generalised
    forces must be below ``fmax``. ``deadline`` (``time.monotonic()``) is checked between
    steps: past it the result is ``timeout`` with the last energy. An exception for which
    ``scf_error`` is true comes back as ``scf_unconverged`` (the caller may escalate).
    ``hessian``: BFGS's initial Hessian in the relaxation's coordinates
    (:func:`relaxation_hessian` of the same structure and settings); other optimizers ignore it.
    """
    work = atoms.copy()
    work.calc = calc
    volume0 = work.get_volume() if work.pbc.all() else 0.0
    frames: list[Atoms] = []
    t0 = time.perf_counter()
    n_steps = 0
    periodic = bool(work.pbc.all())

    def record() -> None:
        energy = work.get_potential_energy()
        check_physical(work, energy, volume0)
        if keep_frames:
            stress = work.get_stress(voigt=True) if periodic else None
            frames.append(labelled(work, energy, work.get_forces(), stress))
        if on_step is not None:
            on_step(work)

    def converged(target: Any) -> bool:
        if stress_tol is None or not (relax_cell and periodic):
            return _max_norm(target.get_forces()) < fmax
        return _max_norm(work.get_forces()) < fmax and float(np.abs(work.get_stress()).max()) < stress_tol

    def result(
        status: str, reason: str, energy: float = float("nan"), final: Atoms | None = None, **extra: Any
    ) -> RelaxResult:
        return RelaxResult(
            id,
            status,
            reason,
            final if final is not None else work.copy(),
            energy=energy,
            n_steps=n_steps,
            walltime_s=time.perf_counter() - t0,
            frames=frames,
            engine="ase",
            **extra,
        )

    try:
        target = _coordinates(work, relax_cell, cell_filter)
        done = max_steps == 0
        if done:
            record()
        else:
            opt = OPTIMIZERS[optimizer](target, logfile=None)
            if hessian is not None and isinstance(opt, BFGS):
                if hessian.shape != opt.H0.shape:
                    raise ValueError(f"hessian: shape {hessian.shape}, the relaxation has {opt.H0.shape}")
                opt.H0 = hessian
            for _ in opt.irun(fmax=0.0, steps=max_steps):  # fmax 0: convergence is ours to judge
                n_steps = opt.nsteps
                record()
                if converged(target):
                    done = True
                    break
                if deadline is not None and time.monotonic() > deadline:
                    return result(
                        "timeout",
                        f"wall time exceeded after {n_steps} steps",
                        energy=float(work.get_potential_energy()),
                    )  # cached by record()
        energy = float(work.get_potential_energy())
        forces = work.get_forces()
        stress = work.get_stress(voigt=True) if periodic else None
        status, reason = ("ok", "") if done else ("unconverged", f"not converged in {max_steps} steps")
    except Exploded as err:
        return result("exploded", str(err))
    except Exception as err:  # a calculator failure is an outcome to record, not a crash
        msg = f"{type(err).__name__}: {err}".splitlines()[0][:300] if str(err) else type(err).__name__
        if scf_error is not None and scf_error(err):
            return result("scf_unconverged", msg)
        if isinstance(err, OSError | MemoryError):  # a full disk, memory: the machine's failure, not the structure's
            return result("error", msg)
        return result("failed", msg)
    final = work.copy()
    final.calc = None
    return result(status, reason, energy, final=final, forces=forces, stress=stress)


def _coordinates(atoms: Atoms, relax_cell: bool, cell_filter: str) -> Any:
    """What the optimizer moves: the atoms, or the atoms and the cell through a cell filter."""
    if not (relax_cell and atoms.pbc.all()):
        return atoms
    return FrechetCellFilter(atoms) if cell_filter == "frechet" else UnitCellFilter(atoms)


#: Smallest curvature (eV/Å² in the optimizer's coordinates) a model Hessian passes on to BFGS.
#: Rigid translations and, with a cell filter, cell rotations have none (their gradient is zero);
#: a saddle has negative ones: either would make BFGS's first step undefined or uphill. Softer real
#: modes (a C11_b cell's c/a: 0.5) are stiffened to it, which BFGS corrects as it goes.
MIN_CURVATURE = 1.0


#: What a Hessian needs of a model at each displaced structure: energy, forces, stress (Voigt).
Evaluation = tuple[float, np.ndarray, np.ndarray]


def relaxation_hessian(
    atoms: Atoms,
    model: Calculator | Callable[[list[Atoms]], list[Evaluation]],
    *,
    relax_cell: bool = True,
    cell_filter: str = "frechet",
    step: float = 0.003,
) -> np.ndarray:
    """The Hessian of ``model``'s energy at ``atoms`` in the coordinates :func:`relax` optimises
    (central differences of its forces, ``step`` Å), made positive definite for BFGS: each
    eigenvalue by its magnitude, at least :data:`MIN_CURVATURE`. ``model``: an ASE calculator, or
    a function that evaluates a list of structures at once (a batched MLIP); ``2 * ndofs`` structures."""
    work = atoms.copy()
    target = _coordinates(work, relax_cell, cell_filter)
    x0 = target.get_positions().copy()
    n = x0.size
    moves = [(i, sign) for i in range(n) for sign in (1.0, -1.0)]

    def moved(i: int, sign: float) -> None:
        x = x0.copy().ravel()
        x[i] += sign * step
        target.set_positions(x.reshape(x0.shape))

    displaced = []
    for i, sign in moves:
        moved(i, sign)
        displaced.append(work.copy())
    evaluate = model if callable(model) and not isinstance(model, Calculator) else _calculator_evaluation(model)
    results = evaluate(displaced)
    grads = np.empty((len(moves), n))
    for k, ((i, sign), (energy, forces, stress)) in enumerate(zip(moves, results)):
        moved(i, sign)  # the filter's gradient at this displacement, from the model's results there
        work.calc = SinglePointCalculator(work, energy=energy, forces=forces, stress=stress)
        grads[k] = -np.asarray(target.get_forces()).ravel()
    hess = (grads[0::2] - grads[1::2]) / (2 * step)
    if not np.isfinite(hess).all():
        raise ValueError("the model's Hessian is not finite")
    w, v = np.linalg.eigh((hess + hess.T) / 2)
    return (v * np.maximum(np.abs(w), MIN_CURVATURE)) @ v.T


def _calculator_evaluation(calc: Calculator) -> Callable[[list[Atoms]], list[Evaluation]]:
    def evaluate(structures: list[Atoms]) -> list[Evaluation]:
        out = []
        for a in structures:
            a = a.copy()
            a.calc = calc
            stress = a.get_stress(voigt=True) if a.pbc.all() else np.zeros(6)
            out.append((float(a.get_potential_energy()), a.get_forces(), stress))
        return out

    return evaluate


def _max_norm(forces: np.ndarray) -> float:
    return float(np.sqrt((np.asarray(forces) ** 2).sum(axis=1)).max()) if len(forces) else 0.0
