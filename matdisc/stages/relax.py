"""Relax: every candidate the current committee has not relaxed yet, in batches on MLIP workers,
each batch recorded under a key a resumed round recognises."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import pandas as pd
from ase import Atoms

from matdisc import jobs
from matdisc.budget import planning
from matdisc.records import RelaxResult, scalar_fields
from matdisc.stages.context import Round
from matdisc.stages.generate import candidate_atoms
from matdisc.store import CampaignWriter, Frames

if TYPE_CHECKING:
    from matdisc.stages.registry import ModelRecord


def relax_stage(ctx: Round, model: ModelRecord) -> None:
    """Relax the pending candidates with ``model`` (its registry record); each batch is recorded as it
    completes, under a key that a resumed round recognises."""
    w, cfg, round_ = ctx.w, ctx.cfg, ctx.number
    ctx.check_trusted(model.paths)
    pending = pending_relaxations(w, model.sha256)
    size = cfg.mlip.structures_per_task
    batches = [pending[i : i + size] for i in range(0, len(pending), size)]
    progress = ctx.executor.progress(cfg, round_, "MLIP relaxations", len(pending))
    rates = ctx.rates()
    n_workers = planning.workers(cfg)
    sources = w.table("candidates").drop_duplicates("id").set_index("id")["source"].to_dict()
    steps = expected_steps(w.table("mlip"), sources, [cid for cid, _ in pending], rates.mlip_steps)
    cost = planning.relax_cost([len(a) for _, a in pending], cfg, rates, n_workers, steps)
    predicted = ctx.run.first_mlip(cost, rates)
    t0, seconds, work = time.perf_counter(), [], 0.0
    mlip = cfg.mlip.model_dump(mode="json")
    futures = {ctx.executor.submit(jobs.relax, b, model.paths, mlip, ctx.remote, resource="mlip"): b for b in batches}
    for fut in ctx.executor.as_completed(list(futures)):
        results = fut.result()
        key = relax_batch_key(round_, model.sha256, [cid for cid, _ in futures[fut]])
        record_relaxations(w, key, round_, results, model.sha256)
        seconds.append(sum(r.walltime_s for r in results))
        work += sum(len(r.atoms) * r.n_steps for r in results)
        progress.advance(len(results))
        ctx.log.info("MLIP relaxed %d/%d structures", progress.done, len(pending))
    planning.record_stage(w, round_, "relax", predicted, seconds, work, time.perf_counter() - t0, n_workers.mlip)


def pending_relaxations(w: CampaignWriter, model_sha: str) -> list[tuple[str, Atoms]]:
    """Candidates without a relaxation by this model (every candidate is re-relaxed by each
    new model, so one round's MLIP hull comes from one model)."""
    mlip = w.table("mlip")
    done = set(mlip["id"][mlip["model_sha256"] == model_sha])
    return [(cid, a) for cid, a in candidate_atoms(w) if cid not in done]


#: MLIP outcomes whose step count says what a relaxation of that structure costs.
_COUNTED = ("ok", "symmetry_changed", "unconverged")


def expected_steps(mlip: pd.DataFrame, sources: Mapping[str, str], ids: list[str], default: float) -> list[float]:
    """FIRE steps each candidate's relaxation is expected to take, from the campaign's ``mlip``
    records and each candidate's source: what it took when last relaxed (a new committee relaxes a
    structure about as far: the counts of consecutive rounds correlate), else the mean first
    relaxation of candidates from the same source (a random crystal starts much farther from its
    minimum than a decorated prototype), else ``default``."""
    mlip = mlip[mlip["status"].isin(_COUNTED)].sort_values("round", kind="stable")
    last = mlip.groupby("id")["n_steps"].last().to_dict()
    first = mlip.drop_duplicates("id", keep="first")
    by_source = first.groupby(first["id"].map(sources))["n_steps"].mean().to_dict()
    return [float(last[cid]) if cid in last else float(by_source.get(sources.get(cid), default)) for cid in ids]


def relax_batch_key(round_: int, model_sha: str, ids: list[str]) -> str:
    """Commit key of one relaxation batch, named by what it holds: a resumed round splits its
    remaining candidates into new batches, and an index-based key would collide with (and be
    skipped as) a batch committed before the crash."""
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]
    return f"r{round_}/mlip/{model_sha[:12]}/{digest}"


def record_relaxations(w: CampaignWriter, key: str, round_: int, results: list[RelaxResult], model_sha: str) -> None:
    records = []
    for r in results:
        row = scalar_fields(r)  # walltime_s: this structure's share of its task (cost calibration)
        row.update(round=round_, model_sha256=model_sha, e_mlip_per_atom=r.energy_per_atom)
        records.append(row)
    w.append_records("mlip", key, records, Frames.from_atoms([r.atoms for r in results]))
