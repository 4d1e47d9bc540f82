"""Process pools for generation and dedup (pure Python work that threads cannot speed up)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

from matdisc.forkserver import forkserver_context


def process_pool(workers: int) -> ProcessPoolExecutor:
    # forkserver: safe beside threads (Dask, torch) yet cheaper than spawn per task; the one
    # forkserver of this process, which training shares (matdisc.forkserver)
    return ProcessPoolExecutor(max_workers=workers, mp_context=forkserver_context())


def chunks(seq: Sequence, n: int) -> list[Sequence]:
    """``seq`` in ``n`` nearly equal consecutive parts."""
    size = max(1, -(-len(seq) // n))
    return [seq[i : i + size] for i in range(0, len(seq), size)]
