"""Generate: the round's new candidates, computed in the writer's process and stored once."""

from __future__ import annotations

import time

from matdisc import loop, planning
from matdisc.stages.context import Round


def generate(ctx: Round) -> None:
    """Store the round's candidates; a resumed round keeps its stored ones (generating again could
    differ: substitution follows the hits found since)."""
    w, cfg, r = ctx.w, ctx.cfg, ctx.number
    if w.has_batch("candidates", f"r{r}/generated"):
        ctx.log.info("round %d: resuming with its stored candidates", r)
        return
    t0 = time.perf_counter()
    new, keys = loop.round_candidates(w, cfg, r)
    n_new = loop.add_candidates(w, new, r, "generated", keys)
    seconds = time.perf_counter() - t0
    planning.record_stage(w, r, "generate", None, [seconds], 0.0, seconds, 1)
    ctx.log.info("round %d: %d new candidates (%s)", r, n_new, loop.generation_summary(w, r))
