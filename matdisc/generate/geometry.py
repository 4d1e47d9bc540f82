"""Physical sanity of generated cells: a starting volume from element sizes, and a minimum distance.

A candidate only needs a sensible starting volume (relaxation does the rest), but a bad
one costs many optimizer steps or sends a structure into a wrong basin. Alloys get the
sum of atomic volumes; ionic structures are scaled so the shortest cation–anion distance
is the sum of Shannon ionic radii, which is within a few % for rocksalt, fluorite,
rutile, perovskite and spinel.
"""

from __future__ import annotations

from functools import lru_cache

import warnings

import numpy as np
from pymatgen.core import Element, Species, Structure


#: Alloy cells are expanded until no pair is closer than this × the sum of metallic radii
#: (open structures such as diamond would otherwise be squeezed to close-packed volume).
ALLOY_CONTACT = 0.9


@lru_cache(maxsize=None)
def metallic_radius(symbol: str) -> float:
    el = Element(symbol)
    with warnings.catch_warnings():  # pymatgen warns for elements without a tabulated radius
        warnings.simplefilter("ignore")
        return float(el.metallic_radius or el.atomic_radius or 1.5)


def atomic_volume(symbol: str) -> float:
    """Volume per atom (Å³) of an element, from its metallic (else atomic) radius, fcc packing."""
    return 4 * np.sqrt(2) * metallic_radius(symbol) ** 3


@lru_cache(maxsize=None)
def covalent_radius(symbol: str) -> float:
    """Cordero covalent radius (Å), as ASE tabulates it (the criterion PyXtal also uses)."""
    from ase.data import atomic_numbers, covalent_radii

    return float(covalent_radii[atomic_numbers[symbol]])


@lru_cache(maxsize=None)
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


def scale_to_alloy_volume(s: Structure) -> Structure:
    """Sum of atomic volumes, then opened up if two atoms overlap (open structures)."""
    s.scale_lattice(sum(atomic_volume(str(getattr(site.specie, "element", site.specie))) for site in s))
    if len(s) > 1:
        d, symbols = _pair_min_distances(s)
        r = np.array([metallic_radius(x) for x in symbols])
        ratio = float(np.min(d / (ALLOY_CONTACT * (r[:, None] + r[None, :]))))
        if ratio < 1:
            s.scale_lattice(s.volume / ratio**3)
    return s


def scale_to_ionic_radii(s: Structure, oxidation: dict[str, int]) -> Structure:
    """Scale so the shortest cation–anion distance equals the sum of ionic radii.

    Falls back to atomic volumes when an ion has no tabulated radius or there is no
    cation–anion pair.
    """
    radii = {el: ionic_radius(f"{el}{abs(q)}{'+' if q > 0 else '-'}") for el, q in oxidation.items() if q}
    if any(r is None for r in radii.values()):
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
    if ratio ** -3 > max_volume_ratio:
        return f"atoms too close: {pair}, needs {ratio ** -3:.1f}x the volume"
    s.scale_lattice(s.volume / ratio**3 * 1.0001)
    return None
