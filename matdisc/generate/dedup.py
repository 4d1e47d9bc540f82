"""Fast deduplication with pymatgen's StructureMatcher.

``StructureMatcher.group_structures`` reduces every structure and compares all pairs of the
same formula. Generated candidates share few formulas, so those buckets are large and
most comparisons are between obviously different crystals (a rocksalt against a random
P1 cell), each of which costs a full lattice search before it fails. Here:

1. each structure is reduced once (the matcher's own Niggli + primitive reduction);
2. it gets a key: reduced formula | space group (spglib, 0.1 Å) | sites in the reduced cell;
3. only structures with the same key are compared (``fit`` with the reduction skipped);
4. buckets are matched in parallel processes when ``workers > 1``.

A structure is kept when no earlier kept structure matches it, which is exactly the set of
group leaders ``group_structures`` returns; ``benchmarks/generate.py`` checks the two agree.
The key is conservative: two structures whose symmetry differs at 0.1 Å are never merged
(both get relaxed), whereas distinct crystals are never merged by the key.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from pymatgen.core import Structure
from pymatgen.core.structure_matcher import StructureMatcher
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

#: Tolerance (Å) of the space-group part of the key; looser than StructureMatcher's stol
#: would merge more, tighter would split near-symmetric copies apart.
KEY_SYMPREC = 0.1


def reduce_structure(s: Structure) -> Structure:
    """The reduction StructureMatcher applies before every fit (Niggli cell, then primitive)."""
    return StructureMatcher._get_reduced_structure(s, primitive_cell=True, niggli=True)


def fingerprint(s: Structure) -> tuple[str, Structure]:
    """(bucket key, reduced structure) of one structure."""
    reduced = reduce_structure(s)
    try:
        spg = SpacegroupAnalyzer(reduced, symprec=KEY_SYMPREC).get_space_group_number()
    except Exception:  # spglib gives up on some distorted cells: they share bucket 0
        spg = 0
    return f"{reduced.composition.reduced_formula}|{spg}|{len(reduced)}", reduced


def _fingerprint_many(structures: Sequence[Structure]) -> list[tuple[str, Structure]]:
    return [fingerprint(s) for s in structures]


def _leaders(refs: list[Structure], new: list[Structure]) -> list[int]:
    """Indices of ``new`` that match no ref and no earlier kept structure (all reduced)."""
    matcher = StructureMatcher()
    kept = list(refs)
    out = []
    for i, s in enumerate(new):
        if any(matcher.fit(k, s, skip_structure_reduction=True) for k in kept):
            continue
        kept.append(s)
        out.append(i)
    return out


def _leaders_job(job: tuple[list[Structure], list[Structure]]) -> list[int]:
    return _leaders(*job)


def _chunks(seq: Sequence, n: int) -> list[Sequence]:
    size = max(1, -(-len(seq) // n))
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def _pool(workers: int) -> ProcessPoolExecutor:
    # forkserver: safe beside threads (Dask, torch) yet cheaper than spawn per worker
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("forkserver"))


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
    parallel = workers > 1 and len(new) >= 64
    if parallel:
        with _pool(workers) as pool:
            prints = [fp for part in pool.map(_fingerprint_many, _chunks(list(new), 4 * workers)) for fp in part]
    else:
        prints = _fingerprint_many(new)
    keys = [k for k, _ in prints]
    buckets: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        buckets[k].append(i)

    old: dict[str, list[Structure]] = defaultdict(list)
    if existing_by_key is not None:
        old.update(existing_by_key(set(buckets)))
    if existing_keys is None:
        existing_keys = [fingerprint(s)[0] for s in existing]
    for s, k in zip(existing, existing_keys):
        if k in buckets:
            old[k].append(s)

    jobs = [([reduce_structure(s) for s in old[k]], [prints[i][1] for i in idx]) for k, idx in buckets.items()]
    if parallel and len(jobs) > 1:
        with _pool(workers) as pool:
            results = list(pool.map(_leaders_job, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    else:
        results = [_leaders(*job) for job in jobs]
    keep = sorted(idx[j] for idx, res in zip(buckets.values(), results) for j in res)
    return keep, keys


def unique_against(new: Sequence[Structure], existing: Sequence[Structure] = (), **kw) -> list[int]:
    """Indices of ``new`` that match neither each other nor anything in ``existing``."""
    return unique(new, existing, **kw)[0]


class Deduplicator:
    """Incremental dedup for small streams (one prototype's decorations, say)."""

    def __init__(self) -> None:
        self._buckets: dict[str, list[Structure]] = defaultdict(list)
        self._matcher = StructureMatcher()

    def add(self, s: Structure) -> bool:
        """Remember ``s``; False when it matches one already added."""
        key, reduced = fingerprint(s)
        bucket = self._buckets[key]
        if any(self._matcher.fit(k, reduced, skip_structure_reduction=True) for k in bucket):
            return False
        bucket.append(reduced)
        return True

    def extend(self, structures: Iterable[Structure]) -> list[bool]:
        return [self.add(s) for s in structures]


def naive_unique(structures: Sequence[Structure]) -> list[int]:
    """Baseline: leaders of ``StructureMatcher().group_structures`` (all pairs per formula)."""
    index = {id(s): i for i, s in enumerate(structures)}
    groups = StructureMatcher().group_structures(list(structures))
    return sorted(index[id(g[0])] for g in groups)
