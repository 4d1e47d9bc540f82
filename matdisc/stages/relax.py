"""Relax: every candidate the current committee has not relaxed yet, in batches on MLIP workers."""

from __future__ import annotations

import time

from matdisc import jobs, loop, planning
from matdisc.stages.context import Round


def relax_stage(ctx: Round, model: dict) -> None:
    """Relax the pending candidates with ``model`` (a registry row); each batch is recorded as it
    completes, under a key that a resumed round recognises."""
    w, cfg, round_ = ctx.w, ctx.cfg, ctx.number
    ctx.check_trusted(model["paths"])
    pending = loop.pending_relaxations(w, model["sha256"])
    size = cfg.mlip.structures_per_task
    batches = [pending[i : i + size] for i in range(0, len(pending), size)]
    progress = ctx.executor.progress(cfg, round_, "MLIP relaxations", len(pending))
    rates = ctx.rates()
    n_workers = planning.workers(cfg)
    predicted = ctx.run.first_mlip(planning.relax_cost([len(a) for _, a in pending], cfg, rates, n_workers), rates)
    t0, seconds, work = time.perf_counter(), [], 0.0
    mlip = cfg.mlip.model_dump(mode="json")
    futures = {
        ctx.executor.submit(jobs.relax, b, model["paths"], mlip, ctx.remote, resource="mlip"): b for b in batches
    }
    for fut in ctx.executor.as_completed(list(futures)):
        results = fut.result()
        key = loop.relax_batch_key(round_, model["sha256"], [cid for cid, _ in futures[fut]])
        loop.record_relaxations(w, key, round_, results, model["sha256"])
        seconds.append(sum(r.walltime_s for r in results))
        work += sum(len(r.atoms) * r.n_steps for r in results)
        progress.advance(len(results))
        ctx.log.info("MLIP relaxed %d/%d structures", progress.done, len(pending))
    planning.record_stage(w, round_, "relax", predicted, seconds, work, time.perf_counter() - t0, n_workers.mlip)
