"""A library of crystal prototypes, built from space group + Wyckoff sites, and their decoration.

Each prototype names its space group and one representative position per Wyckoff site,
grouped into sublattices (labels ``A``, ``B``, ``C``); pymatgen's
``Structure.from_spacegroup`` expands them, and the primitive cell is kept. Decoration
assigns distinct elements of the chemical system to the sublattices; assignments that give
the same crystal (NaCl and ClNa) are kept once. Lattice parameters come from element sizes
(:mod:`matdisc.generate.geometry`); internal parameters (wurtzite u, rutile x, spinel x)
are the textbook values of the named compound.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache

import numpy as np
from pymatgen.core import Lattice, Structure

from matdisc.generate.geometry import scale_to_alloy_volume, scale_to_ionic_radii

Coords = tuple[float, float, float]


@dataclass(frozen=True)
class Prototype:
    """A prototype: space group, lattice shape (a=1) and Wyckoff sites per sublattice."""

    name: str
    strukturbericht: str
    example: tuple[str, ...]  # the compound it is named after, one element per label
    spacegroup: str
    spacegroup_number: int
    lattice: tuple[float, float, float, float, float, float]  # a, b, c, alpha, beta, gamma
    sites: tuple[tuple[str, Coords], ...]  # (sublattice label, representative frac coords)
    ionic: bool = False  # only decorated for ionic systems unless asked for by name

    @property
    def compound(self) -> str:
        return self.build(dict(zip(self.labels, self.example))).composition.reduced_formula

    @property
    def labels(self) -> list[str]:
        return sorted({label for label, _ in self.sites})

    def build(self, species: dict[str, str]) -> Structure:
        """The primitive cell with ``species`` on the sublattices, at a = 4 Å (unscaled)."""
        return _build(self, tuple(species[label] for label in self.labels))


@cache
def _skeleton(p: Prototype) -> Structure:
    """The primitive cell decorated with the example compound, built once per prototype
    (pymatgen's SpaceGroup setup costs ~0.5 s; decoration is then a species swap)."""
    a, b, c, alpha, beta, gamma = p.lattice
    # build at a physical scale (a = 4 Å): symmetry tolerances are in Å
    lat = Lattice.from_parameters(4 * a, 4 * b, 4 * c, alpha, beta, gamma)
    by_label = dict(zip(p.labels, p.example))
    s = Structure.from_spacegroup(p.spacegroup, lat, [by_label[lb] for lb, _ in p.sites], [x for _, x in p.sites])
    return s.get_primitive_structure()


def _build(p: Prototype, species: tuple[str, ...]) -> Structure:
    s = _skeleton(p).copy()
    s.replace_species(dict(zip(p.example, species)))
    return s


_CUBIC = (1.0, 1.0, 1.0, 90.0, 90.0, 90.0)


def _hex(c_over_a: float, a: float = 1.0) -> tuple[float, float, float, float, float, float]:
    return (a, a, a * c_over_a, 90.0, 90.0, 120.0)


def _tet(c_over_a: float, a: float = 1.0) -> tuple[float, float, float, float, float, float]:
    return (a, a, a * c_over_a, 90.0, 90.0, 90.0)


_P = Prototype
_Q = 1 / np.sqrt(2)
PROTOTYPES: dict[str, Prototype] = {
    p.name: p
    for p in [
        # elements
        _P("fcc", "A1", ("Cu",), "Fm-3m", 225, _CUBIC, (("A", (0, 0, 0)),)),
        _P("bcc", "A2", ("W",), "Im-3m", 229, _CUBIC, (("A", (0, 0, 0)),)),
        _P("hcp", "A3", ("Mg",), "P6_3/mmc", 194, _hex(1.633), (("A", (1 / 3, 2 / 3, 0.25)),)),
        _P("diamond", "A4", ("Si",), "Fd-3m:2", 227, _CUBIC, (("A", (1 / 8, 1 / 8, 1 / 8)),), ionic=True),
        # fcc / bcc / hcp orderings and intermetallics
        _P("B2", "B2", ("Cs", "Cl"), "Pm-3m", 221, _CUBIC, (("A", (0, 0, 0)), ("B", (0.5, 0.5, 0.5)))),
        _P(
            "L1_0",
            "L1_0",
            ("Cu", "Au"),
            "P4/mmm",
            123,
            (_Q, _Q, 1, 90, 90, 90),
            (("A", (0, 0, 0)), ("B", (0.5, 0.5, 0.5))),
        ),
        _P("L1_2", "L1_2", ("Cu", "Au"), "Pm-3m", 221, _CUBIC, (("A", (0, 0.5, 0.5)), ("B", (0, 0, 0)))),
        _P(
            "L1_1",
            "L1_1",
            ("Cu", "Pt"),
            "R-3m",
            166,
            (_Q, _Q, 2 * np.sqrt(3), 90, 90, 120),
            (("A", (0, 0, 0)), ("B", (0, 0, 0.5))),
        ),
        _P(
            "D0_3",
            "D0_3",
            ("Fe", "Al"),
            "Fm-3m",
            225,
            _CUBIC,
            (("A", (0.25, 0.25, 0.25)), ("A", (0.5, 0.5, 0.5)), ("B", (0, 0, 0))),
        ),
        _P(
            "D0_22",
            "D0_22",
            ("Al", "Ti"),
            "I4/mmm",
            139,
            _tet(2.0),
            (("A", (0, 0.5, 0.25)), ("A", (0, 0, 0.5)), ("B", (0, 0, 0))),
        ),
        _P(
            "D0_19",
            "D0_19",
            ("Ni", "Sn"),
            "P6_3/mmc",
            194,
            _hex(0.8165, 2.0),
            (("A", (5 / 6, 2 / 3, 0.25)), ("B", (1 / 3, 2 / 3, 0.25))),
        ),
        _P("C32", "C32", ("Al", "B"), "P6/mmm", 191, _hex(1.08), (("A", (0, 0, 0)), ("B", (1 / 3, 2 / 3, 0.5)))),
        _P("B8_1", "B8_1", ("Ni", "As"), "P6_3/mmc", 194, _hex(1.39), (("A", (0, 0, 0)), ("B", (1 / 3, 2 / 3, 0.25)))),
        # Laves phases (cubic MgCu2, hexagonal MgZn2)
        _P("C15", "C15", ("Mg", "Cu"), "Fd-3m:2", 227, _CUBIC, (("A", (1 / 8, 1 / 8, 1 / 8)), ("B", (0.5, 0.5, 0.5)))),
        _P(
            "C14",
            "C14",
            ("Mg", "Zn"),
            "P6_3/mmc",
            194,
            _hex(1.64),
            (("A", (1 / 3, 2 / 3, 0.0629)), ("B", (0, 0, 0)), ("B", (0.8305, 0.661, 0.25))),
        ),
        # Heusler and half-Heusler (ternary)
        _P(
            "L2_1",
            "L2_1",
            ("Cu", "Mn", "Al"),
            "Fm-3m",
            225,
            _CUBIC,
            (("A", (0.25, 0.25, 0.25)), ("B", (0, 0, 0)), ("C", (0.5, 0.5, 0.5))),
        ),
        _P(
            "C1_b",
            "C1_b",
            ("Mg", "Ag", "As"),
            "F-43m",
            216,
            _CUBIC,
            (("A", (0.25, 0.25, 0.25)), ("B", (0, 0, 0)), ("C", (0.5, 0.5, 0.5))),
        ),
        # ionic binaries
        _P("B1", "B1", ("Na", "Cl"), "Fm-3m", 225, _CUBIC, (("A", (0, 0, 0)), ("B", (0.5, 0.5, 0.5))), ionic=True),
        _P("B3", "B3", ("Zn", "S"), "F-43m", 216, _CUBIC, (("A", (0, 0, 0)), ("B", (0.25, 0.25, 0.25))), ionic=True),
        _P(
            "B4",
            "B4",
            ("Zn", "O"),
            "P6_3mc",
            186,
            _hex(1.633),
            (("A", (1 / 3, 2 / 3, 0)), ("B", (1 / 3, 2 / 3, 0.375))),
            ionic=True,
        ),
        # fluorite; decorated both ways it is also antifluorite (Li2O)
        _P("C1", "C1", ("Ca", "F"), "Fm-3m", 225, _CUBIC, (("A", (0, 0, 0)), ("B", (0.25, 0.25, 0.25))), ionic=True),
        _P(
            "C4",
            "C4",
            ("Ti", "O"),
            "P4_2/mnm",
            136,
            _tet(0.644),
            (("A", (0, 0, 0)), ("B", (0.305, 0.305, 0))),
            ionic=True,
        ),
        _P(
            "C6",
            "C6",
            ("Cd", "I"),
            "P-3m1",
            164,
            _hex(1.61),
            (("A", (0, 0, 0)), ("B", (1 / 3, 2 / 3, 0.25))),
            ionic=True,
        ),
        # ionic ternaries
        _P(
            "E2_1",
            "E2_1",
            ("Ca", "Ti", "O"),
            "Pm-3m",
            221,
            _CUBIC,
            (("A", (0, 0, 0)), ("B", (0.5, 0.5, 0.5)), ("C", (0.5, 0.5, 0))),
            ionic=True,
        ),
        _P(
            "H1_1",
            "H1_1",
            ("Mg", "Al", "O"),
            "Fd-3m:2",
            227,
            (2.0, 2.0, 2.0, 90, 90, 90),
            (("A", (1 / 8, 1 / 8, 1 / 8)), ("B", (0.5, 0.5, 0.5)), ("C", (0.2625, 0.2625, 0.2625))),
            ionic=True,
        ),
    ]
}
#: Prototypes for metallic systems (ionic ones are added when the chemistry is ionic).
ALLOY_PROTOTYPES = [name for name, p in PROTOTYPES.items() if not p.ionic]


def prototype_names(ionic: bool, requested: list[str] | None = None) -> list[str]:
    """The prototypes to decorate: those requested (checked), else the library for this chemistry."""
    if requested is not None:
        unknown = [n for n in requested if n not in PROTOTYPES]
        if unknown:
            raise ValueError(f"unknown prototype {unknown[0]!r} (library: {', '.join(PROTOTYPES)})")
        return list(requested)
    return list(PROTOTYPES) if ionic else list(ALLOY_PROTOTYPES)


def decorations(prototype: Prototype, elements: list[str]) -> list[tuple[str, ...]]:
    """Assignments of distinct elements to the sublattices (in label order)."""
    return list(itertools.permutations(elements, len(prototype.labels)))


def decorate(
    prototype: Prototype,
    elements: list[str],
    *,
    max_atoms: int,
    oxidation: dict[str, dict[str, int]] | None = None,
) -> list[tuple[tuple[str, ...], Structure]]:
    """Every symmetry-distinct decoration of ``prototype`` by ``elements``, volume-scaled.

    ``oxidation`` maps a reduced formula to its oxidation states; decorations found there
    are scaled by ionic radii, others by atomic volumes.
    """
    from matdisc.generate.dedup import Deduplicator

    out: list[tuple[tuple[str, ...], Structure]] = []
    seen = Deduplicator()
    for species in decorations(prototype, elements):
        s = prototype.build(dict(zip(prototype.labels, species))).copy()
        if len(s) > max_atoms:
            continue
        ox = (oxidation or {}).get(s.composition.reduced_formula)
        s = scale_to_ionic_radii(s, ox) if ox else scale_to_alloy_volume(s)
        if seen.add(s):
            out.append((species, s))
    return out
