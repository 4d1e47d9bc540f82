"""Ragged batches of structures as flat arrays: the storage form of many structures.

A batch of ``n`` structures with ``N`` atoms in all is held as ``numbers[N]``,
``positions[N, 3]``, optional ``forces[N, 3]``, ``cell[n, 3, 3]``, ``pbc[n, 3]`` and
``offsets[n + 1]`` (structure ``i`` owns atoms ``offsets[i]:offsets[i + 1]``). That is
how the store lays them out on disk, and it converts to and from ASE ``Atoms`` and
pymatgen ``Structure`` at the edges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor


@dataclass(frozen=True)
class Frames:
    """Structures (and per-atom forces, when known) as flat arrays plus offsets."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    offsets: np.ndarray
    forces: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.cell)
        if self.offsets.shape != (n + 1,) or self.offsets[0] != 0:
            raise ValueError("offsets must have n_structures + 1 entries starting at 0")
        n_atoms = int(self.offsets[-1])
        if self.numbers.shape != (n_atoms,) or self.positions.shape != (n_atoms, 3):
            raise ValueError("numbers/positions do not match offsets")
        if self.forces is not None and self.forces.shape != (n_atoms, 3):
            raise ValueError("forces do not match offsets")

    def __len__(self) -> int:
        return len(self.cell)

    @property
    def n_atoms(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_atoms(cls, atoms_list: Sequence[Atoms], *, forces: Sequence[np.ndarray] | None = None) -> Frames:
        """Pack ASE Atoms; ``forces`` (one array per structure) is optional."""
        counts = np.array([len(a) for a in atoms_list], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if len(atoms_list):
            numbers = np.concatenate([a.numbers for a in atoms_list]).astype(np.int16)
            positions = np.concatenate([a.positions for a in atoms_list]).astype(np.float64)
            cell = np.stack([np.asarray(a.cell[:], dtype=np.float64) for a in atoms_list])
            pbc = np.stack([np.asarray(a.pbc, dtype=bool) for a in atoms_list])
        else:
            numbers = np.zeros(0, np.int16)
            positions = np.zeros((0, 3))
            cell = np.zeros((0, 3, 3))
            pbc = np.zeros((0, 3), bool)
        packed_forces = None
        if forces is not None:
            packed_forces = (
                np.concatenate([np.asarray(f, dtype=np.float64) for f in forces]) if len(forces) else np.zeros((0, 3))
            )
        return cls(numbers, positions, cell, pbc, offsets, packed_forces)

    @classmethod
    def from_structures(cls, structures: Sequence[Structure]) -> Frames:
        return cls.from_atoms([AseAtomsAdaptor.get_atoms(s) for s in structures])

    def atoms(self, i: int) -> Atoms:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return Atoms(
            numbers=self.numbers[lo:hi].astype(int),
            positions=self.positions[lo:hi],
            cell=self.cell[i],
            pbc=self.pbc[i],
        )

    def structure(self, i: int) -> Structure:
        return AseAtomsAdaptor.get_structure(self.atoms(i))

    def forces_of(self, i: int) -> np.ndarray | None:
        if self.forces is None:
            return None
        return self.forces[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def to_atoms(self) -> list[Atoms]:
        return [self.atoms(i) for i in range(len(self))]

    def take(self, rows: Sequence[int] | np.ndarray) -> Frames:
        """The sub-batch of the given structure indices, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        counts = self.n_atoms[rows]
        idx = (
            np.concatenate([np.arange(self.offsets[r], self.offsets[r + 1]) for r in rows])
            if len(rows)
            else np.zeros(0, np.int64)
        )
        return Frames(
            numbers=self.numbers[idx],
            positions=self.positions[idx],
            cell=self.cell[rows],
            pbc=self.pbc[rows],
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            forces=None if self.forces is None else self.forces[idx],
        )
