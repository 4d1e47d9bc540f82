"""Fast deduplication with pymatgen's StructureMatcher.

``StructureMatcher.group_structures`` reduces every structure and compares all pairs of the
same formula. Candidates made at scale are mostly copies (substitution turns many parents
into the same structure) or share a few formulas. Here:

0. exact copies (same cell and coordinates up to volume) are found by hashing, in
   microseconds, and never reduced or fitted;
1. every other structure is reduced once, by the matcher's own Niggli + primitive
   reduction, which also gives its key: reduced formula | sites in the reduced cell;
2. only structures with the same key are compared (``fit`` with the reduction skipped; a
   structure alone in its bucket is never fitted); a different site count can never match;
3. inside a bucket, a pair whose lattices cannot be mapped onto each other is never fitted
   (``cannot_match``, a necessary condition of ``fit`` that costs a comparison of three numbers);
4. reduction and buckets run in parallel processes when ``workers > 1``.

A structure is kept when no earlier kept structure matches it, which is exactly the set of
group leaders ``group_structures`` returns; tests and ``benchmarks/generate.py`` check it.
A space-group key (the obvious finer split) is not used: StructureMatcher's default
tolerances (ltol 0.2) match a cubic half-Heusler with its 5 %-tetragonal random twin,
which spglib and moyopy put in different space groups, so results would differ.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import spglib
from pymatgen.core import Lattice, Structure
from pymatgen.core.structure_matcher import StructureMatcher

from matdisc.generate.parallel import chunks, process_pool

#: Below this many structures to reduce, a process pool costs more (~5 s to start workers
#: that import pymatgen) than it saves.
PARALLEL_MIN = 2000
#: Å; pymatgen's get_primitive_structure uses 0.25, a looser check only defers more cells to it.
PRIMITIVE_TOL = 0.5


_IMAGES = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=float)


def _maybe_supercell(s: Structure, tol: float = PRIMITIVE_TOL) -> bool:
    """False only when no translation maps the cell onto itself: it is then primitive.

    The candidate translations are pymatgen's (differences of the rarest species' sites),
    checked with a looser tolerance than pymatgen's 0.25 Å, so a cell called primitive here
    is primitive for StructureMatcher too; any doubt goes to pymatgen's full search.
    """
    z = np.asarray(s.atomic_numbers)
    species, counts = np.unique(z, return_counts=True)
    if np.gcd.reduce(counts) == 1:
        return False  # a smaller cell would hold a fraction of an atom
    frac = s.frac_coords
    rare = frac[z == species[np.argmin(counts)]]
    images = _IMAGES @ s.lattice.matrix
    for t in rare[1:] - rare[0]:
        ok = True
        for sp in species:
            d = (frac[z == sp] + t)[:, None, :] - frac[z == sp][None, :, :]
            cart = (d - np.round(d)) @ s.lattice.matrix
            dist = np.linalg.norm(cart[:, :, None, :] + images[None, None, :, :], axis=-1).min(axis=(1, 2))
            if (dist > tol).any():
                ok = False
                break
        if ok:
            return True
    return False


def reduce_structure(s: Structure) -> Structure:
    """The reduction StructureMatcher applies before every fit (Niggli cell, then primitive).

    Most candidates are primitive already (element counts without common divisor, or no
    translation maps them onto themselves), and then only the Niggli step is needed, done
    by spglib's Křivý-Gruber implementation: 0.1 ms instead of pymatgen's 1.5-5 ms, the
    same Niggli cell (tests compare the lattice parameters with pymatgen's; a cell with right
    angles may come in the other sign convention, the same lattice for ``fit``).
    """
    if not _maybe_supercell(s):
        matrix = spglib.niggli_reduce(s.lattice.matrix, eps=1e-5)
        if matrix is not None:
            return Structure(Lattice(matrix), s.species, (s.cart_coords @ np.linalg.inv(matrix)) % 1.0)
    return StructureMatcher._get_reduced_structure(s, primitive_cell=True, niggli=True)


def dedup_key(s: Structure) -> str:
    """Bucket key: reduced formula | sites in the cell StructureMatcher reduces to."""
    return key_of_reduced(reduce_structure(s))


def key_of_reduced(reduced: Structure) -> str:
    return f"{reduced.composition.reduced_formula}|{len(reduced)}"


def copy_hash(s: Structure) -> int:
    """Hash equal for bit-for-bit copies up to volume and rounding (1e-4).

    Substitution at scale makes the same structure from many parents (Co3Fe and Zn3Au in
    L1_2 both give Ni3Al in L1_2, with the same cell and coordinates); such copies are
    recognised here in microseconds. Equal hashes imply a StructureMatcher match; unequal
    hashes imply nothing (the structure goes on to the key and ``fit``).
    """
    lat = s.lattice.matrix
    lattice = np.round(lat / abs(np.linalg.det(lat)) ** (1 / 3), 4) + 0.0  # + 0.0: no negative zeros
    frac = np.round(s.frac_coords, 4) % 1.0
    z = np.asarray(s.atomic_numbers)
    order = np.lexsort((frac[:, 2], frac[:, 1], frac[:, 0], z))
    return hash((lattice.tobytes(), z[order].tobytes(), frac[order].tobytes()))


def fingerprint(s: Structure) -> tuple[str, Structure]:
    """(bucket key, reduced structure) of one structure: one reduction for both."""
    reduced = reduce_structure(s)
    return key_of_reduced(reduced), reduced


#: relative slack on the lattice bound, far above the Niggli reductions' rounding (1e-5)
LATTICE_SLACK = 1e-3


def lattice_shape(reduced: Structure) -> np.ndarray:
    """Sorted cell lengths over the cube root of the volume, of a Niggli-reduced structure.

    The lengths of a Niggli cell are its lattice's successive minima (in 3D the shortest
    three independent vectors form a basis, and a Niggli cell has the smallest length sum);
    dividing by V^(1/3) makes them invariant to the volume scaling ``fit`` applies.
    """
    return np.sort(reduced.lattice.abc) / reduced.volume ** (1 / 3)


def cannot_match(kept: np.ndarray, new: np.ndarray, ltol: float) -> bool:
    """True when ``StructureMatcher.fit(kept, new)`` must be False, from ``lattice_shape``s.

    ``fit`` scales both cells to one volume and looks for a basis of ``kept``'s lattice whose
    vectors are each shorter than (1 + ltol) times the matching cell vector of ``new``
    (``Lattice.find_all_mappings``). Such a basis has, for every k, k independent vectors
    shorter than (1 + ltol) times the k-th shortest cell length of ``new``, so ``kept``'s
    k-th successive minimum is below that bound; where it is not, no mapping exists.
    """
    return bool((kept >= (1 + ltol) * (1 + LATTICE_SLACK) * new).any())


def _fingerprints(structures: Sequence[Structure]) -> list[tuple[str, Structure]]:
    return [fingerprint(s) for s in structures]


def _leaders(job: tuple[list[Structure], list[Structure]]) -> list[int]:
    """Indices of reduced ``new`` that match no (raw) ref and no earlier kept structure."""
    refs, new = job
    matcher = StructureMatcher()
    kept = [(k, lattice_shape(k)) for k in map(reduce_structure, refs)]
    out = []
    for i, s in enumerate(new):
        shape = lattice_shape(s)
        # whether any kept structure matches does not depend on the order they are tried in:
        # the most similar cell shapes first, so a copy is usually found by the first fit
        candidates = sorted(
            (k for k in kept if not cannot_match(k[1], shape, matcher.ltol)),
            key=lambda k: float(np.abs(k[1] - shape).sum()),
        )
        if any(matcher.fit(k, s, skip_structure_reduction=True) for k, _ in candidates):
            continue
        kept.append((s, shape))
        out.append(i)
    return out


def unique(
    new: Sequence[Structure],
    existing: Sequence[Structure] = (),
    *,
    existing_keys: Sequence[str] | None = None,
    existing_by_key: Callable[[set[str]], dict[str, list[Structure]]] | None = None,
    workers: int = 1,
) -> tuple[list[int], list[str]]:
    """(indices of ``new`` to keep, bucket key of every new structure).

    ``existing`` structures (the store) are only reduced when a new structure falls into
    their bucket; pass ``existing_keys`` (stored with each candidate) to skip keying them,
    or ``existing_by_key`` to fetch only the stored structures of the buckets hit.
    """
    first: dict[int, int] = {}
    copy_of = [first.setdefault(copy_hash(s), i) for i, s in enumerate(new)]
    originals = [i for i, j in enumerate(copy_of) if i == j]
    todo = [new[i] for i in originals]
    pool = process_pool(workers) if workers > 1 and len(todo) >= PARALLEL_MIN else None
    try:
        prints = (
            [fp for part in pool.map(_fingerprints, chunks(todo, 4 * workers)) for fp in part]
            if pool
            else _fingerprints(todo)
        )
        keys = [k for k, _ in prints]
        buckets: dict[str, list[int]] = defaultdict(list)
        for i, k in enumerate(keys):
            buckets[k].append(i)
        old: dict[str, list[Structure]] = defaultdict(list)
        if existing_by_key is not None:
            old.update(existing_by_key(set(buckets)))
        if existing_keys is None:
            existing_keys = [dedup_key(s) for s in existing]
        for s, k in zip(existing, existing_keys):
            if k in buckets:
                old[k].append(s)
        jobs = {k: (old[k], [prints[i][1] for i in idx]) for k, idx in buckets.items() if old[k] or len(idx) > 1}
        if pool is not None and len(jobs) > 1:
            done = dict(zip(jobs, pool.map(_leaders, jobs.values(), chunksize=max(1, len(jobs) // 16))))
        else:
            done = {k: _leaders(job) for k, job in jobs.items()}
    finally:
        if pool is not None:
            pool.shutdown()
    keep = sorted(originals[idx[j]] for k, idx in buckets.items() for j in done.get(k, [0]))
    key_of = dict(zip(originals, keys))
    return keep, [key_of[j] for j in copy_of]


def unique_against(new: Sequence[Structure], existing: Sequence[Structure] = (), **kw) -> list[int]:
    """Indices of ``new`` that match neither each other nor anything in ``existing``."""
    return unique(new, existing, **kw)[0]


class Deduplicator:
    """Incremental dedup for small streams (one prototype's decorations, say)."""

    def __init__(self) -> None:
        self._buckets: dict[str, list[tuple[Structure, np.ndarray]]] = defaultdict(list)
        self._matcher = StructureMatcher()

    def add(self, s: Structure) -> bool:
        """Remember ``s``; False when it matches one already added."""
        key, reduced = fingerprint(s)
        shape = lattice_shape(reduced)
        bucket = self._buckets[key]
        if any(
            not cannot_match(k_shape, shape, self._matcher.ltol)
            and self._matcher.fit(k, reduced, skip_structure_reduction=True)
            for k, k_shape in bucket
        ):
            return False
        bucket.append((reduced, shape))
        return True

    def extend(self, structures: Iterable[Structure]) -> list[bool]:
        return [self.add(s) for s in structures]


def naive_unique(structures: Sequence[Structure]) -> list[int]:
    """Baseline: leaders of ``StructureMatcher().group_structures`` (all pairs per formula)."""
    index = {id(s): i for i, s in enumerate(structures)}
    groups = StructureMatcher().group_structures(list(structures))
    return sorted(index[id(g[0])] for g in groups)
