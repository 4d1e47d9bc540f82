"""Random symmetric crystals with PyXtal: the AIRSS-like source of unexpected structures.

Each structure draws a composition (from the screened list, simple stoichiometries more
often), a number of formula units that fits ``max_atoms``, and a space group that PyXtal says
is compatible with those atom counts;
PyXtal places atoms on Wyckoff sites at random with its own (loose) separation of half the
sum of covalent radii: asking PyXtal for more makes it retry for seconds per 20-atom cell
(0.14 s vs 0.7-0.9 s per accepted structure at 0.7), while our expansion step below
reaches the wanted separation for free. The cell is then scaled to the campaign's
volume model. An alloy cell's overlapping atoms are then pushed apart at that volume,
keeping the space group (:func:`~matdisc.generate.geometry.push_apart`, AIRSS's MINSEP):
scaling the whole cell until its closest pair separates left half of the cells at 2.5-8x
the metallic volume, where EMT and short-ranged MLIPs have no forces to bring them back.
If two atoms still sit too close (or closer than ``min_distance`` × the sum of covalent
radii) the cell is expanded until they do not, and rejected when that takes more than 1.5×
the volume model. Every failure (incompatible group, PyXtal giving up, atoms too close) is
recorded as a skip with its reason; a structure that fails is retried with a new draw up
to ``max_attempts`` times.

Determinism: structures are made in chunks of 16, chunk k's random choices come from a
``numpy`` generator seeded by (campaign seed, round, k), and PyXtal gets an integer
``random_state`` drawn from it; chunks may run in parallel processes without changing
the result.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import numpy as np
from pymatgen.core import Composition, Structure

from matdisc.generate.compositions import CompositionScreen
from matdisc.generate.geometry import alloy_volume, expand_to_min_distance, push_apart, scale_to_ionic_radii
from matdisc.generate.parallel import process_pool

_CENTERED = ("A", "B", "C", "F", "I", "R")
#: A random cell scaled to the target volume may be expanded this much to separate its atoms.
MAX_EXPANSION = 1.5


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


@cache
def _group(number: int):
    from pyxtal.symmetry import Group

    return Group(number)


@cache
def compatible_groups(counts: tuple[int, ...]) -> tuple[int, ...]:
    """Space groups (2-230) whose Wyckoff positions can hold these atom counts."""
    return tuple(g for g in range(2, 231) if _group(g).check_compatible(list(counts))[0])


@contextlib.contextmanager
def _shared_tolerances() -> Iterator[object]:
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
        yield shared
    finally:
        ops.Tol_matrix = original


def _formula_units(comp: Composition, max_atoms: int) -> list[int]:
    n = int(comp.num_atoms)
    return list(range(1, max_atoms // n + 1))


def _one(comp: Composition, z: int, group: int, state: int, tm: object) -> Structure:
    from pyxtal import pyxtal

    els = [str(e) for e in comp.elements]
    counts = [int(comp[e]) * z for e in els]
    crystal = pyxtal()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        crystal.from_random(3, _group(group), els, counts, random_state=state, tm=tm)
    if not crystal.valid:
        raise RuntimeError("PyXtal found no valid arrangement")
    s = crystal.to_pymatgen()
    if _group(group).symbol[0] in _CENTERED:
        s = s.get_primitive_structure()
    return s


def dense_alloy_cell(s: Structure, min_distance: float) -> str | None:
    """Bring a random alloy cell to the volume model with no overlapping atoms (in place), or
    say why not: pushed apart at that volume, then opened up by at most ``MAX_EXPANSION``."""
    target = alloy_volume(s)
    s.scale_lattice(target)
    ratio = push_apart(s)
    if ratio < 1:
        if ratio**-3 > MAX_EXPANSION:
            return f"atoms overlap after pushing apart: {ratio**-3:.1f}x the volume needed"
        s.scale_lattice(s.volume / ratio**3 * 1.0001)
    return expand_to_min_distance(s, min_distance, MAX_EXPANSION * target / s.volume)


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
    # simple stoichiometries first: p ∝ 1/atoms per formula unit (AB is drawn 10x as often as
    # A3B7), as real hulls are dominated by them and PyXtal's cost grows with cell size
    weights = np.array([1.0 / c.num_atoms for c in comps])
    weights /= weights.sum()
    with _shared_tolerances() as tm:
        attempts = 0
        while len(out) < n and attempts < n * max_attempts:
            attempts += 1
            comp = comps[int(rng.choice(len(comps), p=weights))]
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
                s = _one(comp, z, group, state, tm)
            except Exception as err:  # PyXtal raises many kinds: one skip, never a crashed round
                skips.append(Skip(formula, group, f"pyxtal: {type(err).__name__}: {err}"[:200]))
                continue
            if len(s) > max_atoms:
                skips.append(Skip(formula, group, f"{len(s)} atoms > max_atoms {max_atoms}"))
                continue
            ox = screen.oxidation.get(formula)
            if ox and any(ox.values()):
                reason = expand_to_min_distance(scale_to_ionic_radii(s, ox), min_distance, MAX_EXPANSION)
            else:
                reason = dense_alloy_cell(s, min_distance)
            if reason:
                skips.append(Skip(formula, group, reason))
                continue
            out.append(RandomCrystal(s, group, state))
    return out, skips


#: Structures per independently seeded chunk: the output does not depend on worker count.
CHUNK = 16


def _chunk(args: tuple) -> tuple[list[RandomCrystal], list[Skip]]:
    screen, n, seed, kw = args
    return random_crystals(screen, n, rng=np.random.default_rng(list(seed)), **kw)


def random_batch(
    screen: CompositionScreen, n: int, *, seed: tuple[int, ...], workers: int = 1, **kw
) -> tuple[list[RandomCrystal], list[Skip]]:
    """``n`` random crystals in chunks of CHUNK, chunk k seeded by ``(*seed, k)``, on
    ``workers`` processes; the same seed gives the same crystals whatever ``workers`` is."""
    jobs = [(screen, min(CHUNK, n - i), (*seed, k), kw) for k, i in enumerate(range(0, n, CHUNK))]
    if workers > 1 and len(jobs) > 1:
        with process_pool(workers) as pool:
            parts = list(pool.map(_chunk, jobs))
    else:
        parts = [_chunk(job) for job in jobs]
    return [c for p, _ in parts for c in p], [s for _, p in parts for s in p]
