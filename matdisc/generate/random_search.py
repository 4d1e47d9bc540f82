"""Random symmetric crystals with PyXtal: the AIRSS-like source of unexpected structures.

Each structure draws a composition (from the screened list), a number of formula units that
fits ``max_atoms``, and a space group that PyXtal says is compatible with those atom counts;
PyXtal places atoms on Wyckoff sites at random, keeping them ``min_distance`` × the sum of
covalent radii apart. The cell is then scaled to the campaign's
volume model; if two atoms then sit closer than ``min_distance`` × the sum of covalent
radii it is expanded until they do not, and rejected when that takes more than 1.5× the
volume. Every failure (incompatible group, PyXtal giving up, atoms too close) is
recorded as a skip with its reason; a structure that fails is retried with a new draw up
to ``max_attempts`` times.

Determinism: every random choice comes from one ``numpy`` generator seeded by
(campaign seed, round), and PyXtal gets an integer ``random_state`` drawn from it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from pymatgen.core import Composition, Structure

from matdisc.generate.compositions import CompositionScreen
from matdisc.generate.geometry import expand_to_min_distance, scale_to_alloy_volume, scale_to_ionic_radii

_CENTERED = ("A", "B", "C", "F", "I", "R")
#: A random cell scaled to the target volume may be expanded this much to separate its atoms.
MAX_EXPANSION = 1.5
#: Largest separation (× covalent radii sum) asked of PyXtal itself.
PYXTAL_MAX_SEPARATION = 0.75


@dataclass
class RandomCrystal:
    structure: Structure
    spacegroup: int
    seed: int  # PyXtal random_state: (composition, group, seed) rebuilds the structure


@dataclass
class Skip:
    formula: str
    spacegroup: int
    reason: str


@lru_cache(maxsize=None)
def _group(number: int):
    from pyxtal.symmetry import Group

    return Group(number)


@lru_cache(maxsize=None)
def compatible_groups(counts: tuple[int, ...]) -> tuple[int, ...]:
    """Space groups (2-230) whose Wyckoff positions can hold these atom counts."""
    return tuple(g for g in range(2, 231) if _group(g).check_compatible(list(counts))[0])


@contextlib.contextmanager
def _shared_tolerances() -> Iterator[None]:
    """Give PyXtal one prebuilt tolerance table.

    ``pyxtal.operations.check_images`` builds a fresh 100×100 ``Tol_matrix`` on every call,
    which is two thirds of generation time; the table is read-only there, so one shared
    instance gives identical structures about twice as fast.
    """
    import pyxtal.operations as ops
    from pyxtal.tolerance import Tol_matrix

    shared = Tol_matrix(prototype="atomic")
    original = ops.Tol_matrix

    def factory(*args, prototype: str = "atomic", **kw):
        return shared if not args and not kw and prototype == "atomic" else original(*args, prototype=prototype, **kw)

    ops.Tol_matrix = factory
    try:
        yield
    finally:
        ops.Tol_matrix = original


def _formula_units(comp: Composition, max_atoms: int) -> list[int]:
    n = int(comp.num_atoms)
    return list(range(1, max_atoms // n + 1))


@lru_cache(maxsize=None)
def _tolerances(min_distance: float):
    """PyXtal's distance table at our criterion (its "atomic" table is 0.5 × radii sum).

    Capped at PYXTAL_MAX_SEPARATION: beyond it PyXtal spends seconds per draw failing to
    place atoms; larger separations are reached by our expansion step instead.
    """
    from pyxtal.tolerance import Tol_matrix

    return Tol_matrix(prototype="atomic", factor=2 * min(min_distance, PYXTAL_MAX_SEPARATION))


def _one(comp: Composition, z: int, group: int, state: int, min_distance: float) -> Structure:
    from pyxtal import pyxtal

    els = [str(e) for e in comp.elements]
    counts = [int(comp[e]) * z for e in els]
    crystal = pyxtal()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        crystal.from_random(3, _group(group), els, counts, random_state=state, tm=_tolerances(min_distance))
    if not crystal.valid:
        raise RuntimeError("PyXtal found no valid arrangement")
    s = crystal.to_pymatgen()
    if _group(group).symbol[0] in _CENTERED:
        s = s.get_primitive_structure()
    return s


def random_crystals(
    screen: CompositionScreen,
    n: int,
    *,
    rng: np.random.Generator,
    max_atoms: int,
    min_distance: float = 0.7,
    max_attempts: int = 5,
) -> tuple[list[RandomCrystal], list[Skip]]:
    """Up to ``n`` random crystals over the screened compositions, and the skips on the way."""
    comps = [c for c in screen.kept if len(c.elements) > 1 and c.num_atoms <= max_atoms] or [
        c for c in screen.kept if c.num_atoms <= max_atoms
    ]
    out: list[RandomCrystal] = []
    skips: list[Skip] = []
    if not comps or n <= 0:
        return out, skips
    with _shared_tolerances():
        attempts = 0
        while len(out) < n and attempts < n * max_attempts:
            attempts += 1
            comp = comps[int(rng.integers(len(comps)))]
            z = int(rng.choice(_formula_units(comp, max_atoms)))
            counts = tuple(int(comp[e]) * z for e in comp.elements)
            groups = compatible_groups(counts)
            formula = comp.reduced_formula
            if not groups:
                skips.append(Skip(formula, 0, f"no space group fits {counts} atoms"))
                continue
            group = int(rng.choice(groups))
            state = int(rng.integers(2**31 - 1))
            try:
                s = _one(comp, z, group, state, min_distance)
            except Exception as err:  # PyXtal raises many kinds: one skip, never a crashed round
                skips.append(Skip(formula, group, f"pyxtal: {type(err).__name__}: {err}"[:200]))
                continue
            if len(s) > max_atoms:
                skips.append(Skip(formula, group, f"{len(s)} atoms > max_atoms {max_atoms}"))
                continue
            ox = screen.oxidation.get(formula)
            s = scale_to_ionic_radii(s, ox) if ox and any(ox.values()) else scale_to_alloy_volume(s)
            reason = expand_to_min_distance(s, min_distance, MAX_EXPANSION)
            if reason:
                skips.append(Skip(formula, group, reason))
                continue
            out.append(RandomCrystal(s, group, state))
    return out, skips
