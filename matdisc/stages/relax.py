"""Relax (or rescore): every candidate the current committee has not scored yet, in batches on MLIP
workers, each batch recorded under a key a resumed round recognises.

A new committee relaxes again only what can change the round's picks: new candidates, those whose
last relaxation was unusable, and those predicted within ``mlip.rescore_window`` of the hull. Every
other candidate is rescored: the committee's energy and spread at its latest relaxed structure, a
single evaluation instead of a relaxation (MLIP work otherwise grows with rounds x candidates)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import pandas as pd
from ase import Atoms

from matdisc import jobs
from matdisc.budget import planning
from matdisc.records import USABLE, RelaxResult, scalar_fields
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
    errors = job_errors(w, model.sha256)
    relax, rescore = split_pending(w, cfg.mlip.rescore_window, pending)
    size = cfg.mlip.structures_per_task
    batches = [("relax", relax[i : i + size]) for i in range(0, len(relax), size)]
    batches += [("rescore", [(cid, a) for cid, a, _ in rescore[i : i + size]]) for i in range(0, len(rescore), size)]
    outcome = {cid: kept for cid, _, kept in rescore}  # a rescored structure keeps its relaxation's outcome
    progress = ctx.executor.progress(cfg, round_, "MLIP relaxations", len(pending))  # rescores count in it
    if rescore:
        ctx.log.info(
            "round %d: relaxing %d candidates, rescoring %d (predicted beyond %g eV/atom of the hull)",
            round_,
            len(relax),
            len(rescore),
            cfg.mlip.rescore_window,
        )
    rates = ctx.rates()
    n_workers = planning.workers(cfg)
    sources = w.table("candidates").drop_duplicates("id").set_index("id")["source"].to_dict()
    steps = expected_steps(w.table("mlip"), sources, [cid for cid, _ in relax], rates.mlip_steps)
    steps += [RESCORE_STEPS] * len(rescore)
    cost = planning.relax_cost(
        [len(a) for _, a in relax] + [len(a) for _, a, _ in rescore], cfg, rates, n_workers, steps
    )
    predicted = ctx.run.first_mlip(cost, rates)
    t0, seconds, work = time.perf_counter(), [], 0.0
    mlip = cfg.mlip.model_dump(mode="json")
    job = {"relax": jobs.relax, "rescore": jobs.rescore}
    futures = {
        ctx.executor.submit(job[kind], b, model.paths, mlip, ctx.remote, resource="mlip"): (kind, b)
        for kind, b in batches
    }
    for fut in ctx.executor.as_completed(list(futures)):
        kind, batch = futures[fut]
        try:
            results = fut.result()
        except ctx.executor.fatal:  # the engine is gone: the run stops, the next one redoes the batch
            raise
        except Exception as err:  # noqa: BLE001 - the job failed as a whole: recorded, retried by the next run
            results = failed_job(batch, kind, err)
            ctx.log.warning("MLIP %s job of %d structures failed: %s", kind, len(batch), results[0].reason)
        attempt = 1 + max(errors.get(cid, 0) for cid, _ in batch)
        key = relax_batch_key(round_, model.sha256, [cid for cid, _ in batch], kind, attempt)
        for r in results if kind == "rescore" else ():
            if r.status == "ok":
                r.status, r.reason = outcome[r.id]
        record_relaxations(w, key, round_, results, model.sha256, kind)
        fallbacks = [r for r in results if r.engine.startswith("ase (fallback")]
        if fallbacks:  # never silent: the flow run's log (the UI) and status show it
            ctx.log.warning(
                "%d of %d structures relaxed by the ASE loop because the batched engine failed on them (%s: %s)",
                len(fallbacks),
                len(results),
                fallbacks[0].id,
                fallbacks[0].engine,
            )
        seconds.append(sum(r.walltime_s for r in results))
        work += sum(len(r.atoms) * (r.n_steps if kind == "relax" else RESCORE_STEPS) for r in results)
        progress.advance(len(results))
        ctx.log.info("MLIP relaxed or rescored %d/%d structures", progress.done, len(pending))
    planning.record_stage(w, round_, "relax", predicted, seconds, work, time.perf_counter() - t0, n_workers.mlip)


#: What a rescore costs in FIRE steps of the same structure: one committee evaluation and the
#: members' spread, where a step is one evaluation of the committee mean.
RESCORE_STEPS = 2.0


def split_pending(
    w: CampaignWriter, window: float | None, pending: list[tuple[str, Atoms]]
) -> tuple[list[tuple[str, Atoms]], list[tuple[str, Atoms, tuple[str, str]]]]:
    """(candidates to relax from their generated structure, candidates to rescore at their latest
    relaxed structure with that relaxation's outcome). Rescored: a usable last relaxation and a last
    prediction (``e_hull_pred``) beyond ``window`` of the hull; ``window`` None relaxes everything."""
    if window is None or not pending:
        return list(pending), []
    mlip = w.table("mlip")
    frames, row_of = w.latest_frames("mlip", mlip)
    if frames is None:
        return list(pending), []
    cand = w.candidates()
    predicted = dict(zip(cand["id"], cand["e_hull_pred"].astype(float))) if "e_hull_pred" in cand else {}
    relax, rescore = [], []
    for cid, atoms in pending:
        row = row_of.get(cid)
        status = str(mlip["status"].iloc[row]) if row is not None else ""
        e = predicted.get(cid, float("nan"))
        if row is None or status not in USABLE or not e > window:  # NaN: no prediction, relax
            relax.append((cid, atoms))
        else:
            kept = (status, str(mlip["reason"].iloc[row]))
            rescore.append((cid, frames.atoms(row), kept))
    return relax, rescore


#: Attempts at a candidate's MLIP job per model. A job that failed as a whole (status ``error``:
#: a worker lost for good, a bug, a full disk) is tried again by the next run, up to this many
#: times; what a relaxation itself ends in (unconverged, exploded, failed) is final.
MLIP_ATTEMPTS = 2


def pending_relaxations(w: CampaignWriter, model_sha: str) -> list[tuple[str, Atoms]]:
    """Candidates without a result by this model (each new model scores every candidate, so one
    round's MLIP hull comes from one model), and those whose job failed fewer than
    ``MLIP_ATTEMPTS`` times."""
    mlip = w.table("mlip")
    mine = mlip[mlip["model_sha256"] == model_sha]
    errors = job_errors(w, model_sha)
    done = set(mine["id"][mine["status"] != "error"]) | {cid for cid, n in errors.items() if n >= MLIP_ATTEMPTS}
    return [(cid, a) for cid, a in candidate_atoms(w) if cid not in done]


def job_errors(w: CampaignWriter, model_sha: str) -> dict[str, int]:
    """Per candidate, how many of this model's jobs for it failed as a whole."""
    mlip = w.table("mlip")
    failed = mlip["id"][(mlip["model_sha256"] == model_sha) & (mlip["status"] == "error")]
    return {str(cid): int(n) for cid, n in failed.value_counts().items()}


def failed_job(batch: list[tuple[str, Atoms]], kind: str, err: BaseException) -> list[RelaxResult]:
    """A result per structure of a job that raised: status ``error`` with the job's error."""
    why = f"{kind} job failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return [RelaxResult(cid, "error", why, atoms.copy()) for cid, atoms in batch]


#: MLIP outcomes whose step count says what a relaxation of that structure costs.
_COUNTED = ("ok", "symmetry_changed", "unconverged")


def expected_steps(mlip: pd.DataFrame, sources: Mapping[str, str], ids: list[str], default: float) -> list[float]:
    """FIRE steps each candidate's relaxation is expected to take, from the campaign's ``mlip``
    records and each candidate's source: what it took when last relaxed (a new committee relaxes a
    structure about as far: the counts of consecutive rounds correlate), else the mean first
    relaxation of candidates from the same source (a random crystal starts much farther from its
    minimum than a decorated prototype), else ``default``."""
    mlip = mlip[mlip["status"].isin(_COUNTED) & (mlip["kind"] != "rescore")].sort_values("round", kind="stable")
    last = mlip.groupby("id")["n_steps"].last().to_dict()
    first = mlip.drop_duplicates("id", keep="first")
    by_source = first.groupby(first["id"].map(sources))["n_steps"].mean().to_dict()
    return [float(last[cid]) if cid in last else float(by_source.get(sources.get(cid), default)) for cid in ids]


def relax_batch_key(round_: int, model_sha: str, ids: list[str], kind: str = "relax", attempt: int = 1) -> str:
    """Commit key of one relaxation batch, named by what it holds: a resumed round splits its
    remaining candidates into new batches, and an index-based key would collide with (and be
    skipped as) a batch committed before the crash. A retried failed job has its attempt in it."""
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]
    key = f"r{round_}/mlip/{model_sha[:12]}/{digest}" + ("-rescore" if kind == "rescore" else "")
    return key + (f"-attempt{attempt}" if attempt > 1 else "")


def record_relaxations(
    w: CampaignWriter, key: str, round_: int, results: list[RelaxResult], model_sha: str, kind: str = "relax"
) -> None:
    records = []
    for r in results:
        row = scalar_fields(r)  # walltime_s: this structure's share of its task (cost calibration)
        row.update(round=round_, model_sha256=model_sha, e_mlip_per_atom=r.energy_per_atom, kind=kind)
        records.append(row)
    w.append_records("mlip", key, records, Frames.from_atoms([r.atoms for r in results]))
