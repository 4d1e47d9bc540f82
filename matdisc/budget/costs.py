"""Cost models: what one stage of a round costs, from stated forms and measured rates.

Forms (seconds of one job; the rates are measured, see :mod:`matdisc.budget.probe` and :func:`calibrate`):

* MLIP relaxation task: ``t = relax_task_s + relax_s × Σ atoms × steps`` over the task's structures
  (``steps``: FIRE steps of each structure, what it took when last relaxed, else the mean of
  first relaxations of candidates from the same source, else the campaign's mean, else a prior;
  see :func:`matdisc.stages.relax.expected_steps`).
* Reference calculation: ``t = dft_call_s + dft_s × work × cycles``. ``cycles`` are the SCF
  cycles of the protocol: one per configuration of the relaxation (ionic steps + 1: the cell
  changes every step and GPAW starts each from a fresh set-up) plus the final static; one for a
  static calculation. For GPAW ``work = irreducible k-points × (plane waves × bands + K_OVERHEAD)
  × spins``: a plane-wave SCF iteration applies the Hamiltonian to every band at every k-point
  (FFTs over the plane-wave sphere), and each k-point carries a fixed overhead (projectors,
  Python-level loops) worth ``K_OVERHEAD`` coefficient-bands; the N³ subspace term is left out, it
  matters only beyond tens of atoms. Any other calculator: ``work = atoms``.
* Training, per committee member: ``t = train_member_s + train_s × frame atoms × epochs``;
  members train side by side, ``min(members, cores)`` at a time.
* Wall time of a stage: list scheduling of its jobs on the stage's workers, plus ``task_s`` of
  orchestration (Prefect + Dask + store write) per job; the first MLIP stage of a flow run also
  waits ``mlip_start_s`` for its fresh workers to import torch and MACE.

The store records predicted and actual cost of every stage (table ``costs``); :func:`calibrate`
refits each rate on those records (a ratio estimator over the jobs' work), so every round
predicts the next one better.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from ase import Atoms

from matdisc.config import CampaignConfig, ReferenceConfig

#: Fixed cost of one k-point in a plane-wave SCF iteration, in plane-wave coefficients × bands
#: (fitted on 16 GPAW ``fast`` calculations of 1-4 atom Al-Si cells: 1700; rms error of the
#: form 14 % per calculation given its cycles).
K_OVERHEAD = 1500.0
#: Stages of a round whose cost is modelled and recorded.
STAGES = ("generate", "relax", "dft", "train")
#: Å per bohr and eV per hartree: plane-wave count from the cutoff.
_BOHR, _HARTREE = 0.529177, 27.2114


@dataclass
class Rates:
    """The coefficients of the cost forms, and where each came from (prior, probe or store)."""

    relax_s: float = 2e-4  # s per atom-step, batched MLIP relaxation
    relax_task_s: float = 3.0  # s per relaxation task (model load, committee spread)
    mlip_steps: float = 30.0  # FIRE steps per structure (27 measured on 64 mixed 4-32 atom cells)
    dft_s: float = 3e-5  # s per work unit of one SCF cycle (GPAW fast on 2 cores: 3.0e-5)
    dft_call_s: float = 3.0  # s per calculation (process start, setups, I/O)
    dft_steps: float = 10.0  # ionic steps of a verification (from an MLIP-relaxed structure)
    seed_steps: float = 6.0  # ionic steps of a cold-start seed (from a prototype)
    train_s: float = 1e-3  # s per frame atom per epoch, one member
    train_member_s: float = 10.0  # s per member (start-up, data, E0s, saving)
    task_s: float = 0.3  # s of orchestration per task
    mlip_start_s: float = 10.0  # s for a fresh MLIP worker to import torch + MACE (once per flow run)
    store_write_s: float = 0.5  # s to store a round's new candidates, beyond generating them
    source: dict[str, str] = field(default_factory=dict)  # coefficient -> prior | probe | store

    def updated(self, how: str, **values: float) -> Rates:
        finite = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v) and v >= 0}
        return replace(self, **finite, source={**self.source, **{k: how for k in finite}})

    def origin(self, name: str) -> str:
        return self.source.get(name, "prior")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- work measures -------------------------------------------------------------------------------
def valence_electrons(symbol: str) -> float:
    """Valence electrons of GPAW's default PBE setup (Z when no setup is installed)."""
    from ase.data import atomic_numbers

    try:
        from gpaw.setup_data import SetupData

        return float(SetupData(symbol, "PBE").Nv)
    except Exception:  # noqa: BLE001 - no setups for this element: an upper bound
        return float(atomic_numbers[symbol])


def irreducible_kpoints(atoms: Atoms, mesh: Sequence[int]) -> int:
    """k-points GPAW computes: the Monkhorst-Pack mesh reduced by the crystal's symmetry and time
    reversal. (A Monkhorst-Pack mesh of even size is offset by half a step from Γ.)"""
    import spglib

    cell = (atoms.cell[:], atoms.get_scaled_positions(), atoms.numbers)
    try:
        mapping, _ = spglib.get_ir_reciprocal_mesh(list(mesh), cell, is_shift=[1 - n % 2 for n in mesh])
        return int(len(np.unique(mapping)))
    except Exception:  # noqa: BLE001 - spglib failed on an odd cell: the full mesh
        return int(np.prod(mesh))


def bands(atoms: Atoms, magnetic: bool = False) -> int:
    """GPAW's default number of bands: 1.2 × occupied + 4, at most the setups' bound partial waves."""
    symbols = atoms.get_chemical_symbols()
    electrons = sum(valence_electrons(s) for s in symbols)
    n = math.ceil(1.2 * (electrons + (len(symbols) if magnetic else 0)) / 2) + 4
    return min(n, int(sum(_bound_orbitals(s) for s in symbols))) or n


def _bound_orbitals(symbol: str) -> int:
    try:
        from gpaw.setup_data import SetupData

        data = SetupData(symbol, "PBE")
        return sum(2 * l + 1 for l, n in zip(data.l_j, data.n_j) if n > 0)  # noqa: E741 - GPAW's name
    except Exception:  # noqa: BLE001 - no setup: no cap
        return 10**6


def dft_work(atoms: Atoms, ref: ReferenceConfig) -> float:
    """The work measure of one SCF cycle of ``atoms`` (see the module docstring)."""
    ref = ref.resolved()
    if ref.calculator != "gpaw":
        return float(len(atoms))
    spin = spin_polarised(atoms, ref)
    return (
        gpaw_kpoints(atoms, ref) * (planewaves(atoms, ref) * bands(atoms, spin) + K_OVERHEAD) * (2.0 if spin else 1.0)
    )


def gpaw_kpoints(atoms: Atoms, ref: ReferenceConfig) -> int:
    """Irreducible k-points of the mesh the reference settings give ``atoms``."""
    from matdisc.dft.calculators import kpoints

    return irreducible_kpoints(atoms, kpoints(atoms, ref.resolved().kpoint_density or 2.5))


def planewaves(atoms: Atoms, ref: ReferenceConfig) -> float:
    """Plane waves per k-point: the volume of the cutoff sphere in reciprocal space × the cell's volume."""
    from matdisc.dft.calculators import calculator_parameters

    ref = ref.resolved()
    mode = calculator_parameters(ref)["parameters"].get("mode")
    ecut = float(mode.get("ecut") or ref.ecut or 300.0) if isinstance(mode, dict) else float(ref.ecut or 300.0)
    k_cut = math.sqrt(2 * ecut / _HARTREE) / _BOHR  # Å⁻¹
    return atoms.get_volume() * k_cut**3 / (6 * math.pi**2)


def spin_polarised(atoms: Atoms, ref: ReferenceConfig) -> bool:
    from matdisc.dft.calculators import magmoms_for

    return ref.spin == "on" or (ref.spin == "auto" and magmoms_for(atoms, ref) is not None)


def scf_cycles(steps: float | None) -> float:
    """SCF cycles of one reference calculation: a relaxation of ``steps`` ionic steps (its
    configurations and the final static), or a static calculation (``steps=None``)."""
    return 1.0 if steps is None else steps + 2.0


def dft_seconds(atoms: Atoms, ref: ReferenceConfig, rates: Rates, steps: float | None) -> float:
    """Predicted seconds of one reference calculation with ``steps`` ionic steps (None: a static)."""
    return rates.dft_call_s + rates.dft_s * dft_work(atoms, ref) * scf_cycles(steps)


def relax_tasks(
    n_atoms: Sequence[int], per_task: int, rates: Rates, steps: Sequence[float] | None = None
) -> list[float]:
    """Predicted seconds of each relaxation task (structures split as the flow splits them);
    ``steps``: expected FIRE steps per structure (default: the campaign's mean for each)."""
    work = relax_work(n_atoms, rates, steps)
    return [rates.relax_task_s + rates.relax_s * sum(work[i : i + per_task]) for i in range(0, len(work), per_task)]


def relax_work(n_atoms: Sequence[int], rates: Rates, steps: Sequence[float] | None = None) -> list[float]:
    """Atom-steps of each structure's relaxation."""
    if steps is None:
        steps = [rates.mlip_steps] * len(n_atoms)
    if len(steps) != len(n_atoms):
        raise ValueError(f"{len(steps)} step counts for {len(n_atoms)} structures")
    return [float(n) * float(k) for n, k in zip(n_atoms, steps)]


def train_member_seconds(frame_atoms: float, epochs: int, rates: Rates) -> float:
    return rates.train_member_s + rates.train_s * frame_atoms * epochs


def concurrent_members(size: int, cores: int) -> int:
    """Committee members trained side by side (as :func:`matdisc.mlip.train_committee` does)."""
    return max(1, min(size, cores))


# -- wall time -----------------------------------------------------------------------------------
def makespan(jobs: Iterable[float], workers: int) -> float:
    """Wall time of independent jobs on ``workers``: longest job first to the least-loaded worker."""
    loads = [0.0] * max(1, workers)
    for t in sorted(jobs, reverse=True):
        heapq.heapreplace(loads, loads[0] + t)
    return max(loads)


def stage_wall(jobs: Sequence[float], workers: int, rates: Rates) -> float:
    return makespan(jobs, workers) + rates.task_s * math.ceil(len(jobs) / max(1, workers))


# -- calibration ---------------------------------------------------------------------------------
def _ratio(num: Iterable[float], den: Iterable[float]) -> float | None:
    n, d = float(np.nansum(list(num))), float(np.nansum(list(den)))
    return n / d if d > 0 and n > 0 else None


def _fit(jobs: np.ndarray, work: np.ndarray, actual: np.ndarray, fixed: float) -> tuple[float, float]:
    """(per-job, per-work) seconds of ``actual ≈ per_job × jobs + per_work × work`` over a stage's records.

    Least squares when the records tell the two parts apart (different work per job) and both
    come out non-negative; else the per-job part is kept and the rate is the ratio estimator; and
    when the kept per-job part alone exceeds what was measured, everything counts as per-work.
    """
    design = np.c_[jobs, work]
    scaled = design / np.maximum(design.max(axis=0), 1e-300)
    if len(jobs) >= 2 and np.linalg.matrix_rank(scaled, tol=0.05) == 2:
        (c, s), *_ = np.linalg.lstsq(design, actual, rcond=None)
        if c >= 0 and s > 0:
            return float(c), float(s)
    rate = _ratio(actual - jobs * fixed, work)
    if rate is None:
        return 0.0, float(actual.sum() / work.sum())
    return fixed, rate


def calibrate(
    rates: Rates, costs: pd.DataFrame, mlip: pd.DataFrame, dft: pd.DataFrame, generation: pd.DataFrame | None = None
) -> Rates:
    """Refit the rates on a campaign's records (tables ``costs``, ``mlip``, ``dft``, ``generation``).

    Steps come from the relaxations themselves (mean FIRE steps; mean ionic steps of seeds and
    of verifications); each stage's per-job and per-work seconds are fitted on its records
    (:func:`_fit`; DFT on the verification rounds' records once there are any: the cold start's
    relaxations from prototypes and rattled statics are other jobs). Orchestration per task is
    what the stages' wall time exceeded their compute by;
    storing candidates, what a generation stage took beyond the generation's own timings.
    """
    out = rates
    if not mlip.empty:
        relaxed = mlip[mlip["kind"] != "rescore"] if "kind" in mlip else mlip  # a rescore takes no steps
        ok = relaxed[relaxed["status"].isin(("ok", "symmetry_changed", "unconverged"))]
        if len(ok):
            out = out.updated("store", mlip_steps=float(ok["n_steps"].mean()))
    if not dft.empty:
        seeds, verif = dft[dft["round"] == 0], dft[dft["round"] >= 1]
        if len(seeds):
            out = out.updated("store", seed_steps=float(seeds["n_steps"].mean()))
        if len(verif):
            out = out.updated("store", dft_steps=float(verif["n_steps"].mean()))
    if costs.empty:
        return out
    fitted = {}
    for stage, fixed, rate in (
        ("relax", "relax_task_s", "relax_s"),
        ("dft", "dft_call_s", "dft_s"),
        ("train", "train_member_s", "train_s"),
    ):
        rows = costs[(costs["stage"] == stage) & (costs["work"] > 0)]
        if stage == "dft" and "round" in rows and (rows["round"] >= 1).any():
            rows = rows[rows["round"] >= 1]  # verifications, once there are any: not seeds or rattled statics
        if len(rows):
            c, s = _fit(
                rows["jobs"].to_numpy(float),
                rows["work"].to_numpy(float),
                rows["actual_s"].to_numpy(float),
                getattr(out, fixed),
            )
            fitted.update({fixed: c, rate: s})
    out = out.updated("store", **fitted)
    gen = costs[costs["stage"] == "generate"]
    if len(gen) and generation is not None and not generation.empty:
        pure = generation.groupby("round")["seconds"].sum()
        beyond = [row["actual_s"] - pure[row["round"]] for _, row in gen.iterrows() if row["round"] in pure.index]
        if beyond:
            out = out.updated("store", store_write_s=max(0.0, float(np.mean(beyond))))
    waits = costs[costs["stage"].isin(("relax", "dft")) & (costs["jobs"] > 0)]
    if len(waits):
        started = waits["start_s"].fillna(0.0)  # fresh workers' imports
        extra = (waits["wall_s"] - waits["ideal_wall_s"] - started).clip(lower=0)
        over = _ratio(extra, waits["jobs"] / waits["workers"].clip(lower=1))
        out = out.updated("store", task_s=over if over is not None else 0.0)
    return out


def reference_cores(cfg: CampaignConfig) -> int:
    """Cores one reference calculation occupies (what a CPU-hour budget is charged per second)."""
    return cfg.compute.threads_per_dft_worker * cfg.reference.ranks


__all__ = [
    "K_OVERHEAD",
    "STAGES",
    "Rates",
    "bands",
    "calibrate",
    "concurrent_members",
    "dft_seconds",
    "dft_work",
    "gpaw_kpoints",
    "irreducible_kpoints",
    "makespan",
    "planewaves",
    "reference_cores",
    "relax_tasks",
    "relax_work",
    "scf_cycles",
    "spin_polarised",
    "stage_wall",
    "train_member_seconds",
    "valence_electrons",
]
