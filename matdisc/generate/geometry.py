"""Physical sanity of generated cells: a starting volume from element sizes, and a minimum distance.

A candidate only needs a sensible starting volume (relaxation does the rest), but a bad
one costs many optimizer steps or sends a structure into a wrong basin. Alloys get the
sum of atomic volumes; ionic structures are scaled so the shortest cation–anion distance
is the sum of Shannon ionic radii, which is within a few % for rocksalt, fluorite,
rutile, perovskite and spinel.
"""

from __future__ import annotations

import warnings
from functools import cache

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from pymatgen.core import Element, Species, Structure

#: Alloy cells are expanded until no pair is closer than this × the sum of metallic radii
#: (open structures such as diamond would otherwise be squeezed to close-packed volume).
ALLOY_CONTACT = 0.9


@cache
def metallic_radius(symbol: str) -> float:
    el = Element(symbol)
    with warnings.catch_warnings():  # pymatgen warns for elements without a tabulated radius
        warnings.simplefilter("ignore")
        return float(el.metallic_radius or el.atomic_radius or 1.5)


def atomic_volume(symbol: str) -> float:
    """Volume per atom (Å³) of an element, from its metallic (else atomic) radius, fcc packing."""
    return 4 * np.sqrt(2) * metallic_radius(symbol) ** 3


@cache
def covalent_radius(symbol: str) -> float:
    """Cordero covalent radius (Å), as ASE tabulates it (the criterion PyXtal also uses)."""
    from ase.data import atomic_numbers, covalent_radii

    return float(covalent_radii[atomic_numbers[symbol]])


@cache
def ionic_radius(species: str) -> float | None:
    """Shannon radius (Å) of an ion such as ``Na+`` (average over coordinations), None if unknown."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = Species.from_str(species).ionic_radius
    except Exception:
        return None
    return float(r) if r else None


def _pair_min_distances(s: Structure) -> tuple[np.ndarray, np.ndarray]:
    """Distance matrix with self-images; the diagonal holds the shortest lattice vector."""
    d = s.distance_matrix.copy()
    shortest = float(np.min(np.linalg.norm(s.lattice.matrix, axis=1)))
    np.fill_diagonal(d, shortest)
    return d, np.array([str(getattr(site.specie, "element", site.specie)) for site in s])


def alloy_volume(s: Structure) -> float:
    """The volume model of an alloy cell: the sum of its atoms' volumes (Å³)."""
    return sum(atomic_volume(str(getattr(site.specie, "element", site.specie))) for site in s)


def _alloy_contact_ratio(s: Structure) -> float:
    """Smallest distance over ``ALLOY_CONTACT`` × the sum of metallic radii (< 1: overlap)."""
    d, symbols = _pair_min_distances(s)
    r = np.array([metallic_radius(x) for x in symbols])
    return float(np.min(d / (ALLOY_CONTACT * (r[:, None] + r[None, :]))))


def scale_to_alloy_volume(s: Structure) -> Structure:
    """Sum of atomic volumes, then opened up if two atoms overlap (open prototype structures).

    Not for random crystals: their closest pair is an accident of placement, and scaling the
    whole cell to separate it left half of PyXtal's metal cells at 2.5-8x the metallic volume;
    they go through :func:`push_apart` instead.
    """
    s.scale_lattice(alloy_volume(s))
    if len(s) > 1:
        ratio = _alloy_contact_ratio(s)
        if ratio < 1:
            s.scale_lattice(s.volume / ratio**3)
    return s


def scale_to_ionic_radii(s: Structure, oxidation: dict[str, int]) -> Structure:
    """Scale so the shortest cation–anion distance equals the sum of ionic radii.

    Falls back to atomic volumes when an ion has no tabulated radius or there is no
    cation–anion pair.
    """
    found = {el: ionic_radius(f"{el}{abs(q)}{'+' if q > 0 else '-'}") for el, q in oxidation.items() if q}
    radii = {el: r for el, r in found.items() if r is not None}
    if len(radii) < len(found):
        return scale_to_alloy_volume(s)
    d, symbols = _pair_min_distances(s)
    ratio = np.inf
    for i, a in enumerate(symbols):
        for j, b in enumerate(symbols):
            qa, qb = oxidation.get(a, 0), oxidation.get(b, 0)
            if qa * qb < 0 and d[i, j] > 1e-6:
                ratio = min(ratio, (radii[a] + radii[b]) / d[i, j])
    if not np.isfinite(ratio):
        return scale_to_alloy_volume(s)
    s.scale_lattice(s.volume * ratio**3)
    return s


def closest_approach(s: Structure, factor: float) -> tuple[float, str]:
    """(smallest distance / allowed distance, description of that pair); < 1 means too close."""
    d, symbols = _pair_min_distances(s)
    r = np.array([covalent_radius(x) for x in symbols])
    ratio = d / (factor * (r[:, None] + r[None, :]))
    i, j = np.unravel_index(int(np.argmin(ratio)), ratio.shape)
    return float(ratio[i, j]), f"{symbols[i]}-{symbols[j]} distance {d[i, j]:.2f} Å"


def expand_to_min_distance(s: Structure, factor: float, max_volume_ratio: float) -> str | None:
    """Expand ``s`` isotropically until no pair is closer than ``factor`` × covalent radii.

    Returns a reason (and leaves ``s`` alone) when that needs more than ``max_volume_ratio``
    times the volume: the arrangement itself is too dense.
    """
    ratio, pair = closest_approach(s, factor)
    if ratio >= 1:
        return None
    if ratio**-3 > max_volume_ratio:
        return f"atoms too close: {pair}, needs {ratio**-3:.1f}x the volume"
    s.scale_lattice(s.volume / ratio**3 * 1.0001)
    return None


def push_apart(s: Structure, steps: int = 150, symprec: float = 1e-3) -> float:
    """Move overlapping atoms apart at fixed volume, keeping the space group (AIRSS's MINSEP).

    A harmonic repulsion acts between pairs closer than ``ALLOY_CONTACT`` × the sum of
    metallic radii (zero beyond: no energy model, only a separation); atoms and cell shape
    relax under it with FIRE, ASE's ``FixSymmetry`` and a constant-volume cell filter (a
    PyXtal cell is often too flat for its atoms at any uniform scale). ``s`` is updated in
    place; returns the contact ratio reached (1: no pair overlaps).
    """
    ratio = _alloy_contact_ratio(s)
    if ratio >= 1 or len(s) < 2:
        return ratio
    from ase.constraints import FixSymmetry
    from ase.filters import UnitCellFilter
    from ase.optimize import FIRE
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = AseAtomsAdaptor.get_atoms(s)
    atoms.calc = _Repulsion(np.array([metallic_radius(x) for x in atoms.get_chemical_symbols()]) * ALLOY_CONTACT)
    atoms.set_constraint(FixSymmetry(atoms, symprec=symprec))
    FIRE(UnitCellFilter(atoms, constant_volume=True), logfile=None).run(fmax=1e-3, steps=steps)
    pushed = Structure(atoms.cell[:], s.species, atoms.get_positions(), coords_are_cartesian=True)
    pushed.scale_lattice(s.volume)  # the cell filter's constant volume drifts over large shape changes
    s.lattice = pushed.lattice
    for i, site in enumerate(pushed):
        s.replace(i, site.species, site.frac_coords)
    return _alloy_contact_ratio(s)


def _pairs_within(positions: np.ndarray, cell: np.ndarray, cutoff: float) -> tuple[np.ndarray, ...]:
    """(i, j, distance, vector i->j) of every pair of a periodic cell closer than ``cutoff``, each
    listed from both sides, self-images included: ASE's ``neighbor_list("ijdD")`` for the small
    cells a generator makes, in one vectorised step (ASE's bins cost ~3 ms a call on 20 atoms)."""
    frac = np.linalg.solve(cell.T, positions.T).T
    positions = (frac % 1.0) @ cell  # wrapped: a pair's image vectors are the same set, the reach is bounded
    heights = np.abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    reach = np.ceil(cutoff / heights).astype(int) + 1
    shifts = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1).reshape(-1, 3)
    vec = positions[None, :, None, :] + (shifts @ cell)[None, None, :, :] - positions[:, None, None, :]
    d = np.linalg.norm(vec, axis=-1)
    i, j, k = np.nonzero((d < cutoff) & (d > 1e-8))
    return i, j, d[i, j, k], vec[i, j, k]


class _Repulsion(Calculator):
    """Soft-sphere separation: E = Σ_pairs (d0 - d)² / 2 for d < d0, with d0 the sum of the two
    atoms' contact radii. A geometric tool for starting cells, not an energy of anything."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, radii: np.ndarray):
        super().__init__()
        self.radii = radii

    def check_state(self, atoms, tol: float = 1e-15) -> list[str]:
        """Positions and cell only, compared exactly: nothing else changes in ``push_apart``, and
        ASE's general check (``allclose`` on every array, for each of the filter's forces and
        stress requests) took a quarter of a random crystal's time."""
        if self.atoms is None:
            return list(all_changes)
        changes = [] if np.array_equal(self.atoms.positions, atoms.positions) else ["positions"]
        return changes if np.array_equal(self.atoms.cell.array, atoms.cell.array) else [*changes, "cell"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        # what ``check_state`` compares, without ``Atoms.copy``'s deep copy of FixSymmetry
        self.atoms = Atoms(cell=atoms.cell.array.copy(), positions=atoms.positions.copy(), pbc=True)
        i, j, d, vec = _pairs_within(self.atoms.positions, self.atoms.cell[:], 2 * float(self.radii.max()))
        overlap = self.radii[i] + self.radii[j] - d
        near = overlap > 0
        i, overlap, d, vec = i[near], overlap[near], d[near], vec[near]
        forces = np.zeros((len(self.atoms), 3))
        np.add.at(forces, i, -(overlap / d)[:, None] * vec)  # vec points from i to j: push i away
        # virial (1/V) Σ_pairs φ'(d) D⊗D / d with φ' = -overlap; each pair is listed twice
        virial = -np.einsum("p,pa,pb->ab", overlap / d, vec, vec) / (2 * self.atoms.get_volume())
        stress = virial[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
        energy = 0.25 * float(np.sum(overlap**2))
        self.results = {"energy": energy, "free_energy": energy, "forces": forces, "stress": stress}
