"""Typed results that stages return and the store records.

Plain dataclasses holding ASE ``Atoms``: they pickle cheaply between Dask workers and the
orchestrating process, and :func:`records_to_columns` turns a list of them into a store batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import Atoms

if TYPE_CHECKING:  # the store (zarr, pandas) stays out of calculation processes that import records
    from matdisc.store.frames import Frames

#: Relaxation outcomes whose energies may enter a convex hull (see :mod:`matdisc.mlip.outcome`).
USABLE = ("ok", "symmetry_changed")


@dataclass
class RelaxResult:
    """Outcome of relaxing one structure (with an MLIP or a reference calculator).

    ``status`` is ``ok``, ``symmetry_changed`` (MLIP), ``unconverged``, ``exploded`` or
    ``failed`` (see :mod:`matdisc.mlip.outcome`), or ``error`` when the MLIP job as a whole
    failed (retried by the next run); anything but ``ok`` carries a ``reason``.
    ``frames`` holds every evaluated configuration with its energy,
    forces and stress (training data, for reference calculations).
    """

    id: str
    status: str
    reason: str
    atoms: Atoms
    energy: float = float("nan")
    n_steps: int = 0
    sigma: float = float("nan")  # committee energy spread, eV/atom
    force_std: float = float("nan")  # committee: largest per-atom force spread, eV/Å
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    walltime_s: float = 0.0
    frames: list[Atoms] = field(default_factory=list)
    #: the code that produced it: ``torch-sim`` (batched) or ``ase`` (the ASE loop), with why the
    #: ASE loop ran where the batched engine was asked for: ``ase (fallback: ...)``
    engine: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def energy_per_atom(self) -> float:
        return self.energy / len(self.atoms)


@dataclass
class ReferenceResult(RelaxResult):
    """A reference (DFT) result: what it took to get it, and which settings define its energy.

    ``settings_hash`` is the hash of the settings of the final static calculation (a
    recovery rung that changed an energy-defining setting gives a different one);
    ``scf_rung`` the highest recovery rung used; ``attempt`` counts runs of this candidate
    (a lost worker's attempt stays on disk); ``workdir`` is where its files are kept;
    ``notes`` says what happened on the way (rungs tried, steps used).
    """

    settings_hash: str = ""
    magmom: float = float("nan")  # total magnetic moment (µB) of the final static, when spin-polarised
    scf_rung: int = 0
    attempt: int = 1
    workdir: str = ""
    notes: str = ""


def frames_from_atoms_with_results(atoms_list: list[Atoms]) -> tuple[Frames, dict[str, Any]]:
    """Pack Atoms whose ``info``/``arrays`` hold REF_energy/REF_forces/REF_stress."""
    forces = [a.arrays.get("REF_forces", np.full((len(a), 3), np.nan)) for a in atoms_list]
    from matdisc.store.frames import Frames

    frames = Frames.from_atoms(atoms_list, forces=forces)
    energy = np.array([a.info.get("REF_energy", np.nan) for a in atoms_list], dtype=float)
    stress = np.array([a.info.get("REF_stress", np.full(6, np.nan)) for a in atoms_list], dtype=float).reshape(-1, 6)
    return frames, {"energy": energy, "stress": stress}


def labelled(atoms: Atoms, energy: float, forces: np.ndarray, stress: np.ndarray | None) -> Atoms:
    """A copy of ``atoms`` carrying reference labels under the keys MACE training reads."""
    out = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.info["REF_energy"] = float(energy)
    out.arrays["REF_forces"] = np.asarray(forces, dtype=float)
    if stress is not None:
        out.info["REF_stress"] = np.asarray(stress, dtype=float)
    return out


def scalar_fields(result: RelaxResult) -> dict[str, Any]:
    """The per-row columns of a result (no arrays, no atoms)."""
    skip = {"atoms", "forces", "stress", "frames"}
    return {f.name: getattr(result, f.name) for f in fields(result) if f.name not in skip}


__all__ = [
    "USABLE",
    "ReferenceResult",
    "RelaxResult",
    "asdict",
    "frames_from_atoms_with_results",
    "labelled",
    "scalar_fields",
]
