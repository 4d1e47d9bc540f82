"""Deduplication with pymatgen's StructureMatcher, bucketed by reduced formula."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure


def unique_against(
    new: Sequence[Structure], existing: Sequence[Structure], *, matcher: StructureMatcher | None = None
) -> list[int]:
    """Indices of ``new`` that match neither each other nor anything in ``existing``."""
    matcher = matcher or StructureMatcher()
    seen: dict[str, list[Structure]] = defaultdict(list)
    for s in existing:
        seen[s.composition.reduced_formula].append(s)
    keep = []
    for i, s in enumerate(new):
        bucket = seen[s.composition.reduced_formula]
        if any(matcher.fit(s, other) for other in bucket):
            continue
        bucket.append(s)
        keep.append(i)
    return keep
