"""A library of crystal prototypes, built from space group + Wyckoff sites, and their decoration.

Each prototype has sublattices (labels ``A``, ``B``, ``C``) that decoration assigns
elements to: every assignment of distinct elements to sublattices gives one candidate
(so L1₂ over Cu-Pd gives both Cu₃Pd and CuPd₃). Lattice parameters are scaled so the
volume per atom is the mean of the elements' atomic volumes; relaxation does the rest.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from pymatgen.core import Element, Lattice, Structure


@dataclass(frozen=True)
class Prototype:
    """A prototype: space group, lattice shape (a=1) and Wyckoff sites per sublattice."""

    name: str
    strukturbericht: str
    spacegroup: str
    lattice: tuple[float, float, float, float, float, float]  # a, b, c, alpha, beta, gamma
    sites: tuple[tuple[str, tuple[float, float, float]], ...]  # (sublattice label, frac coords)
    ionic: bool = False

    @property
    def labels(self) -> list[str]:
        return sorted({label for label, _ in self.sites})

    def build(self, species: dict[str, str]) -> Structure:
        a, b, c, alpha, beta, gamma = self.lattice
        # build at a physical scale (a = 4 Å): symmetry tolerances are in Å
        lat = Lattice.from_parameters(4 * a, 4 * b, 4 * c, alpha, beta, gamma)
        labels = [label for label, _ in self.sites]
        coords = [xyz for _, xyz in self.sites]
        s = Structure.from_spacegroup(self.spacegroup, lat, [species[lb] for lb in labels], coords)
        return s.get_primitive_structure()


_C = 1.0  # cubic
_H = (1.0, 1.0, 1.633, 90, 90, 120)  # ideal hcp c/a

PROTOTYPES: dict[str, Prototype] = {
    p.name: p
    for p in [
        Prototype("fcc", "A1", "Fm-3m", (1, 1, 1, 90, 90, 90), (("A", (0, 0, 0)),)),
        Prototype("bcc", "A2", "Im-3m", (1, 1, 1, 90, 90, 90), (("A", (0, 0, 0)),)),
        Prototype("hcp", "A3", "P6_3/mmc", _H, (("A", (1 / 3, 2 / 3, 0.25)),)),
        Prototype("B2", "B2", "Pm-3m", (1, 1, 1, 90, 90, 90), (("A", (0, 0, 0)), ("B", (0.5, 0.5, 0.5)))),
        Prototype("L1_0", "L1_0", "P4/mmm", (1 / np.sqrt(2), 1 / np.sqrt(2), 1, 90, 90, 90),
                  (("A", (0, 0, 0)), ("B", (0.5, 0.5, 0.5)))),
        Prototype("L1_2", "L1_2", "Pm-3m", (1, 1, 1, 90, 90, 90), (("A", (0, 0.5, 0.5)), ("B", (0, 0, 0)))),
        Prototype("L1_1", "L1_1", "R-3m", (1 / np.sqrt(2), 1 / np.sqrt(2), 2 * np.sqrt(3), 90, 90, 120),
                  (("A", (0, 0, 0)), ("B", (0, 0, 0.5)))),
        Prototype("D0_3", "D0_3", "Fm-3m", (1, 1, 1, 90, 90, 90),
                  (("A", (0.25, 0.25, 0.25)), ("A", (0.5, 0.5, 0.5)), ("B", (0, 0, 0)))),
        Prototype("D0_22", "D0_22", "I4/mmm", (1, 1, 2, 90, 90, 90),
                  (("A", (0, 0.5, 0.25)), ("A", (0, 0, 0.5)), ("B", (0, 0, 0)))),
        Prototype("D0_19", "D0_19", "P6_3/mmc", (2, 2, 1.633, 90, 90, 120),
                  (("A", (5 / 6, 2 / 3, 0.25)), ("B", (1 / 3, 2 / 3, 0.25)))),
        Prototype("C15", "C15", "Fd-3m", (1, 1, 1, 90, 90, 90),
                  (("A", (0.5, 0.5, 0.5)), ("B", (0.125, 0.125, 0.125)))),
        Prototype("B1", "B1", "Fm-3m", (1, 1, 1, 90, 90, 90), (("A", (0, 0, 0)), ("B", (0.5, 0.5, 0.5))), True),
        Prototype("B3", "B3", "F-43m", (1, 1, 1, 90, 90, 90), (("A", (0, 0, 0)), ("B", (0.25, 0.25, 0.25))), True),
        Prototype("C1", "C1", "Fm-3m", (1, 1, 1, 90, 90, 90), (("A", (0, 0, 0)), ("B", (0.25, 0.25, 0.25))), True),
        Prototype("E2_1", "E2_1", "Pm-3m", (1, 1, 1, 90, 90, 90),
                  (("A", (0, 0, 0)), ("B", (0.5, 0.5, 0.5)), ("C", (0.5, 0.5, 0))), True),
    ]
}
#: Prototypes for metallic systems (ionic ones are added when the chemistry is ionic).
ALLOY_PROTOTYPES = [name for name, p in PROTOTYPES.items() if not p.ionic]


def atomic_volume(symbol: str) -> float:
    """Volume per atom (Å³) of an element, from its metallic (else atomic) radius, fcc packing."""
    el = Element(symbol)
    r = el.metallic_radius or el.atomic_radius or 1.5
    return 4 * np.sqrt(2) * float(r) ** 3


def is_ionic(chemsys: list[str]) -> bool:
    """An ionic system has a metal and a non-metal (anion former)."""
    els = [Element(s) for s in chemsys]
    return any(e.is_metal for e in els) and any(not e.is_metal and not e.is_metalloid for e in els)


def prototype_names(chemsys: list[str], requested: list[str] | None = None) -> list[str]:
    if requested is not None:
        unknown = [n for n in requested if n not in PROTOTYPES]
        if unknown:
            raise ValueError(f"unknown prototype {unknown[0]!r} (library: {', '.join(PROTOTYPES)})")
        return list(requested)
    return list(PROTOTYPES) if is_ionic(chemsys) else list(ALLOY_PROTOTYPES)


def decorate(prototype: Prototype, chemsys: list[str], *, max_atoms: int) -> list[Structure]:
    """Every assignment of distinct elements of ``chemsys`` to the prototype's sublattices."""
    out = []
    for species in itertools.permutations(chemsys, len(prototype.labels)):
        s = prototype.build(dict(zip(prototype.labels, species)))
        if len(s) > max_atoms:
            continue
        s.scale_lattice(sum(atomic_volume(str(site.specie)) for site in s))
        out.append(s)
    return out
