"""Relax (or rescore): every candidate the current committee has not scored yet, in batches on MLIP
workers, each batch recorded under a key a resumed round recognises.

A new committee relaxes new candidates and those whose last relaxation was unusable; every other
candidate is rescored: the committee's energy and spread at its latest relaxed structure, a single
evaluation instead of a relaxation (MLIP work otherwise grows with rounds x candidates). Then it
relaxes again the rescored candidates whose rescore ranks them where the round could pick them."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from ase import Atoms

from matdisc import jobs
from matdisc.budget import planning
from matdisc.config import CampaignConfig
from matdisc.dft import settings_hash
from matdisc.records import USABLE, RelaxResult, scalar_fields
from matdisc.stages.context import Round
from matdisc.stages.generate import candidate_atoms
from matdisc.stages.score import dft_energies
from matdisc.stages.select import round_budget
from matdisc.stages.start import mlip_starts
from matdisc.store import CampaignWriter, Frames
from matdisc.thermo import score

if TYPE_CHECKING:
    from matdisc.stages.registry import ModelRecord


def relax_stage(ctx: Round, model: ModelRecord) -> None:
    """Relax (or rescore) the pending candidates with ``model`` (its registry record), then relax
    again the rescored ones that could be picked; each batch is recorded as it completes, under a
    key that a resumed round recognises."""
    w, cfg, round_ = ctx.w, ctx.cfg, ctx.number
    ctx.check_trusted(model.paths)
    pending = pending_relaxations(w, model.sha256)
    relax, rescore = split_pending(w, cfg.mlip.rescore, pending)
    run_batches(ctx, model, relax, rescore, "MLIP relaxations")  # rescores count in it
    again = relax_again(w, cfg, model.sha256, round_)
    if rescore or again:
        ctx.log.info(
            "round %d: relaxed %d candidates, rescored %d; relaxing again the %d rescored ones that could be picked",
            round_,
            len(relax),
            len(rescore),
            len(again),
        )
    if again:
        run_batches(ctx, model, again, [], "MLIP relaxations again")


def run_batches(
    ctx: Round,
    model: ModelRecord,
    relax: list[tuple[str, Atoms]],
    rescore: list[tuple[str, Atoms, tuple[str, str]]],
    what: str,
) -> None:
    """Relax ``relax`` and rescore ``rescore`` in batches on MLIP workers, recording each batch as it
    lands, and what they cost against the cost model's prediction (a ``costs`` row); ``what``
    names the stage's progress, whose time left starts from that prediction."""
    w, cfg, round_ = ctx.w, ctx.cfg, ctx.number
    errors = job_errors(w, model.sha256)
    size = cfg.mlip.structures_per_task
    batches = [("relax", relax[i : i + size]) for i in range(0, len(relax), size)]
    batches += [("rescore", [(cid, a) for cid, a, _ in rescore[i : i + size]]) for i in range(0, len(rescore), size)]
    outcome = {cid: kept for cid, _, kept in rescore}  # a rescored structure keeps its relaxation's outcome
    rates = ctx.rates()
    sources = w.table("candidates").drop_duplicates("id").set_index("id")["source"].to_dict()
    steps = expected_steps(w.table("mlip"), sources, [cid for cid, _ in relax], rates.mlip_steps)
    steps += [RESCORE_STEPS] * len(rescore)
    cost = planning.relax_cost(
        [len(a) for _, a in relax] + [len(a) for _, a, _ in rescore],
        cfg,
        rates,
        planning.workers(cfg),
        steps,
        kinds_from=len(relax),
    )
    predicted = ctx.run.first_mlip(cost, rates)
    progress = ctx.executor.progress(cfg, round_, what, len(relax) + len(rescore), predicted.wall_s)
    t0 = time.perf_counter()
    seconds: list[float] = []
    work = 0.0
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
        ctx.log.info("MLIP relaxed or rescored %s structures", progress.text())
    n_workers = planning.workers(cfg).mlip
    planning.record_stage(w, round_, "relax", predicted, seconds, work, time.perf_counter() - t0, n_workers)


#: What a rescore costs in FIRE steps of the same structure: one committee evaluation and the
#: members' spread, where a step is one evaluation of the committee mean.
RESCORE_STEPS = 2.0


def split_pending(
    w: CampaignWriter, rescore: bool, pending: list[tuple[str, Atoms]]
) -> tuple[list[tuple[str, Atoms]], list[tuple[str, Atoms, tuple[str, str]]]]:
    """(candidates to relax from their generated structure, candidates to rescore at their latest
    relaxed structure with that relaxation's outcome). Rescored: every candidate whose last
    relaxation was usable, when ``rescore`` (else every candidate is relaxed)."""
    if not rescore or not pending:
        return list(pending), []
    mlip = w.table("mlip")
    frames, row_of = w.latest_frames("mlip", mlip)
    if frames is None:
        return list(pending), []
    relax, out = [], []
    for cid, atoms in pending:
        row = row_of.get(cid)
        status = str(mlip["status"].iloc[row]) if row is not None else ""
        if row is None or status not in USABLE:
            relax.append((cid, atoms))
        else:
            out.append((cid, frames.atoms(row), (status, str(mlip["reason"].iloc[row]))))
    return relax, out


def relax_again(w: CampaignWriter, cfg: CampaignConfig, model_sha: str, round_: int) -> list[tuple[str, Atoms]]:
    """Rescored candidates this committee relaxes again: those whose
    optimistic e_hull (predicted minus kappa x committee spread, as acquisition ranks) is among the
    lowest ``mlip.relax_again_per_pick`` x the round's budget (or screening shortlist) of the
    candidates not yet verified. A rescore is an upper bound on what a relaxation in the same basin
    gives, so a candidate ranked far down cannot climb into the picks by relaxing. Each continues
    from its latest MLIP structure unless an earlier model moved it out of its generated type
    (:func:`matdisc.stages.start.mlip_starts`, the rule verification's starts follow).

    The ranking uses each candidate's first result by this model (its rescore, for a rescored one),
    so it does not move as its members are relaxed: a resumed round relaxes the same ones."""
    mlip = w.table("mlip")
    mine = mlip[(mlip["model_sha256"] == model_sha) & (mlip["status"] != "error")]
    rescored = set(mine["id"][mine["kind"] == "rescore"])
    if not rescored:
        return []
    relaxed = set(mine["id"][mine["kind"] == "relax"])
    first = mine.drop_duplicates("id", keep="first").set_index("id")
    cand = w.candidates(settings_hash(cfg.reference))
    ids = cand["id"].tolist()
    usable = {cid for cid, st in first["status"].items() if st in USABLE}
    e = np.array([float(first.at[cid, "e_mlip_per_atom"]) if cid in usable else np.nan for cid in ids])
    sigma = np.array([float(first.at[cid, "sigma"]) if cid in usable else np.nan for cid in ids])
    al = cfg.active_learning
    kappa = al.kappa if al.acquisition == "uncertainty" else 0.0
    e_hull = score(list(cand["formula"]), e, dft_energies(cand, cfg), cfg.chemsys)["e_hull_pred"]
    optimistic = e_hull - kappa * np.nan_to_num(sigma)
    open_ = (cand["dft_status"] == "").to_numpy() & np.isfinite(optimistic)
    n = cfg.mlip.relax_again_per_pick * max(round_budget(w, cfg, round_), cfg.budget.screening.active_shortlist or 0)
    order = np.flatnonzero(open_)[np.argsort(optimistic[open_], kind="stable")][:n]
    given_up = {cid for cid, n in job_errors(w, model_sha).items() if n >= MLIP_ATTEMPTS}
    chosen = sorted({ids[i] for i in order} & rescored - relaxed - given_up)
    return [(cid, start.atoms) for cid, start in mlip_starts(w, chosen, cfg.reference.start_max_volume_change).items()]


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
