"""The reference protocol: relax (positions + cell), then a final static at fixed settings.

Every verified energy comes from a static calculation with a fresh calculator on the
relaxed structure, so all energies of one settings hash are comparable. Every evaluated
frame (energy, forces, stress) is kept as training data. An SCF that does not converge
climbs the recovery ladder (:mod:`matdisc.dft.recovery`) and the relaxation continues
from its last geometry; each rung writes into its own directory.

Outcomes (``status``): ``ok``; ``unconverged`` (the relaxation used its steps; the energy
is the final static's); ``settings_changed`` (converged only on an energy-defining rung,
so its energy has its own settings hash and stays off the reference hull); ``timeout``
(wall time exceeded; last energy kept); ``exploded``; ``failed`` (calculator error, or no
rung converged). Each comes with its reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.units import GPa

from matdisc.ase_relax import relax
from matdisc.config import ReferenceConfig
from matdisc.dft.calculators import magmoms_for, make_calculator, settings_hash
from matdisc.dft.recovery import Rung, is_scf_failure, ladder
from matdisc.records import ReferenceResult, RelaxResult, labelled

FrameSink = Callable[[Atoms], None]


def run_protocol(
    atoms: Atoms,
    cfg: ReferenceConfig,
    *,
    id: str,
    workdir: Path,
    deadline: float | None = None,
    on_frame: FrameSink | None = None,
    hessian: np.ndarray | None = None,
) -> ReferenceResult:
    """Relax + static in this process. Never raises for a failed calculation.

    ``deadline`` (``time.monotonic()``) is checked between steps; ``on_frame`` receives each
    labelled frame as soon as it is computed (the isolated runner streams them to disk).
    ``hessian``: BFGS's initial Hessian at ``atoms`` (:func:`matdisc.ase_relax.relaxation_hessian`
    with the same ``relax_cell``); a relaxation continued on a recovery rung starts elsewhere and
    goes without it.
    """
    ref = cfg.resolved()
    rungs = ladder(ref)
    t0 = time.perf_counter()
    workdir = Path(workdir)
    notes: list[str] = []
    start = _with_moments(atoms, ref)
    if ref.max_steps:
        res, rung, _ = _climb(
            start, ref, rungs, 0, "relax", ref.max_steps, id, workdir, deadline, on_frame, notes, hessian
        )
    else:  # a static calculation only: no relaxation phase
        res, rung = RelaxResult(id, "ok", "", start), 0
    magmom = float("nan")
    frames = list(res.frames)
    n_steps = res.n_steps
    relax_status, relax_reason = res.status, res.reason
    if res.status in ("ok", "unconverged"):
        final = _with_moments(res.atoms, ref)
        static, rung, magmom = _climb(final, ref, rungs, rung, "static", 0, id, workdir, deadline, on_frame, notes)
        frames += static.frames
        res = static
        if static.status == "ok" and relax_status == "unconverged":
            res.status, res.reason = relax_status, relax_reason
        elif static.status != "ok":
            res.reason = f"static: {static.reason}"
    if res.status == "scf_unconverged":
        res.status = "failed"
        res.reason = f"SCF not converged on any of {len(rungs)} recovery rungs ({res.reason})"
    used = settings_hash(ref, rungs[rung].overrides)
    if res.status == "ok" and used != settings_hash(ref):
        res.status = "settings_changed"
        res.reason = f"converged only with rung {rung} ({rungs[rung].name}): energy has its own settings hash"
    out = ReferenceResult(
        id,
        res.status,
        res.reason,
        res.atoms,
        energy=res.energy,
        n_steps=n_steps,
        forces=res.forces,
        stress=res.stress,
        frames=frames,
        settings_hash=used,
        scf_rung=rung,
        workdir=str(workdir),
        notes="; ".join(notes),
        magmom=magmom,
        engine="ase",
    )
    if out.status in ("ok", "unconverged", "settings_changed"):
        assert res.forces is not None  # a finished static calculation has forces
        out.atoms = labelled(res.atoms, res.energy, res.forces, res.stress)
    elif frames:  # timeout and failures keep the last energy that was computed
        out.energy = float(frames[-1].info["REF_energy"])
    out.walltime_s = time.perf_counter() - t0
    return out


def _climb(
    atoms: Atoms,
    ref: ReferenceConfig,
    rungs: list[Rung],
    rung: int,
    phase: str,
    max_steps: int,
    id: str,
    workdir: Path,
    deadline: float | None,
    on_frame: FrameSink | None,
    notes: list[str],
    hessian: np.ndarray | None = None,
) -> tuple[RelaxResult, int, float]:
    """Run one phase, moving up the ladder while the SCF fails; continue from the last geometry.

    Returns the phase's result, the rung it ended on, and the calculator's total magnetic
    moment (NaN when it has none)."""
    frames: list[Atoms] = []
    n_steps = 0
    current = atoms
    periodic = bool(atoms.pbc.all())
    sink = _frame_sink(on_frame, periodic)
    while True:
        where = workdir / (phase if rung == 0 else f"{phase}-rung{rung}")
        calc = make_calculator(ref, current, where, rungs[rung].overrides)
        res = relax(
            current,
            calc,
            id=id,
            fmax=ref.fmax or 0.05,
            max_steps=max(0, max_steps - n_steps) if phase == "relax" else 0,
            relax_cell=ref.relax_cell,
            optimizer=ref.optimizer,
            stress_tol=ref.stress_tol * GPa if ref.stress_tol else None,
            deadline=deadline,
            keep_frames=True,
            on_step=sink,
            scf_error=is_scf_failure,
            hessian=hessian if current is atoms else None,
        )
        frames += res.frames
        n_steps += res.n_steps
        if res.status != "scf_unconverged" or rung + 1 >= len(rungs):
            break
        rung += 1
        notes.append(f"{phase}: {res.reason} -> rung {rung} ({rungs[rung].name})")
        if phase == "relax" and n_steps >= max_steps:  # no steps left to continue with
            res.status, res.reason = "unconverged", f"not converged in {max_steps} steps"
            break
        if res.frames:
            current = _with_moments(res.frames[-1], ref)
    res.frames, res.n_steps = frames, n_steps
    magmom = getattr(calc, "results", {}).get("magmom")
    return res, rung, float(magmom) if magmom is not None else float("nan")


def _frame_sink(on_frame: FrameSink | None, periodic: bool) -> Callable[[Atoms], None] | None:
    if on_frame is None:
        return None

    def sink(work: Atoms) -> None:  # results are cached on the calculator: no extra evaluation
        stress = work.get_stress(voigt=True) if periodic else None
        on_frame(labelled(work, work.get_potential_energy(), work.get_forces(), stress))

    return sink


def _with_moments(atoms: Atoms, ref: ReferenceConfig) -> Atoms:
    """A copy with the initial magnetic moments the spin setting asks for."""
    out = atoms.copy()
    out.calc = None
    moments = magmoms_for(out, ref)
    if moments is not None:
        out.set_initial_magnetic_moments(moments)
    return out


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
