"""Verify: reference (DFT) calculations on the DFT workers, each recorded as it completes.

Relaxations go one per job; single points travel in batches (``reference.statics_per_task``,
smaller towards the end so no worker idles long), each batch one calculation process.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

from ase import Atoms

from matdisc import jobs as run_jobs
from matdisc.budget import planning
from matdisc.budget.costs import dft_seconds, dft_work, scf_cycles
from matdisc.config import CampaignConfig, ReferenceConfig
from matdisc.dft import perturbed_copies, settings_hash
from matdisc.executor import JobFuture
from matdisc.records import ReferenceResult, RelaxResult, frames_from_atoms_with_results, scalar_fields
from matdisc.stages import screen as screening
from matdisc.stages.context import Round, Run
from matdisc.stages.start import DEFAULT_HESSIAN, Start, reference_starts, with_hessians
from matdisc.store import Batch, CampaignWriter, Frames, record_columns
from matdisc.store.campaign import in_reference_set


def reference_stage(
    ctx: Round,
    jobs: list[tuple[str, Atoms]],
    *,
    verified: bool,
    static: bool = False,
    screen: ReferenceConfig | None = None,
    allowance_s: float | None = None,
    starts: dict[str, Start] | None = None,
) -> None:
    """Run reference calculations of ``(id, atoms)`` jobs; record each as it completes.

    ``starts``: where each job's structure came from and the Hessian its BFGS starts with
    (:mod:`matdisc.stages.start`), recorded with its DFT row (default: initial, ASE's guess).

    ``screen``: single points with these cheaper settings, recorded in the screening table
    (stage ``screen``), never in the DFT table or the training frames. ``allowance_s``: seconds
    of calculation the stage may spend; jobs are then submitted one batch per free worker, in
    order, each only while the measured seconds plus the predicted ones in flight leave room for
    it; the rest are left out once nothing is in flight and the next still does not fit.
    """
    if not jobs:
        return
    w, cfg, round_, log, ex = ctx.w, ctx.cfg, ctx.number, ctx.log, ctx.executor
    ref = screen or cfg.reference
    settings = settings_hash(ref)
    static = static or screen is not None
    stage, what = (
        ("screen", "screening calculations")
        if screen
        else ("dft", "training frames" if static else "reference calculations")
    )
    workdir = str(w.path / "calculations" / (f"r{round_}-screen" if screen else f"r{round_}"))
    rates = ctx.rates()
    steps = None if static else (rates.seed_steps if round_ == 0 else rates.dft_steps)
    n_workers = planning.workers(cfg).dft
    predicted = planning.dft_cost([a for _, a in jobs], cfg, rates, planning.workers(cfg), steps, ref)
    progress = ex.progress(cfg, round_, what, len(jobs), predicted.wall_s)
    # each job's prediction only matters under an allowance (the stage's total is in ``predicted``)
    queue = [
        (cid, atoms, dft_seconds(atoms, ref, rates, steps) if allowance_s is not None else 0.0) for cid, atoms in jobs
    ]
    window = n_workers if allowance_s is not None or static else len(queue)
    t0, work = time.perf_counter(), 0.0
    seconds: list[float] = []
    futures: dict[JobFuture[Any], list[tuple[str, Atoms, float]]] = {}
    reference = ref.model_dump(mode="json")

    def fill() -> None:
        while queue and len(futures) < window:
            size = max(1, min(ref.statics_per_task, -(-len(queue) // (2 * n_workers)))) if static else 1
            batch: list[tuple[str, Atoms, float]] = []
            while queue and len(batch) < size:
                in_flight = sum(p for b in futures.values() for *_, p in b) + sum(p for *_, p in batch)
                if allowance_s is not None and sum(seconds) + in_flight + queue[0][2] > allowance_s:
                    if not futures and not batch:  # nothing in flight will free the room it would need
                        log.info(
                            "%s: %d of %d calculations left out, the budget allows %.3g s",
                            stage,
                            len(queue),
                            len(jobs),
                            allowance_s,
                        )
                        queue.clear()
                    break
                batch.append(queue.pop(0))
            if not batch:
                return
            fut: JobFuture[Any]
            if static:
                fut = ex.submit(
                    run_jobs.statics, [(cid, atoms) for cid, atoms, _ in batch], reference, workdir, resource="dft"
                )
            else:
                cid, atoms, _ = batch[0]
                hessian = starts[cid].hessian if starts and cid in starts else None
                fut = ex.submit(run_jobs.reference, cid, atoms, reference, workdir, hessian, resource="dft")
            futures[fut] = batch

    fill()
    while futures:
        for fut in ex.as_completed(list(futures)):
            batch = futures.pop(fut)
            try:
                results = fut.result() if static else [fut.result()]
            except ex.fatal:  # the engine is gone (the Prefect API): the run stops, a rerun redoes these
                raise
            except Exception as err:  # the engine gave up on it (worker lost too often): recorded, never dropped
                results = [failed_reference(cid, atoms, err, settings) for cid, atoms, _ in batch]
            for res, (_, atoms, _) in zip(results, batch):
                if screen:
                    screening.record(w, round_, res, settings)
                else:
                    start = (starts or {}).get(res.id)
                    record_reference(
                        w,
                        round_,
                        res,
                        settings,
                        verified=verified,
                        start=start.start if start else "initial",
                        start_reason=start.reason if start else "",
                        hessian=start.curvature if start else DEFAULT_HESSIAN,
                    )
                seconds.append(res.walltime_s)
                work += dft_work(atoms, ref) * scf_cycles(None if static else res.n_steps)
                progress.advance()
                log.info("%s %s: %s %s %s", stage, progress.text(), res.id, res.status, res.reason)
            if queue:  # a worker is free: submit the next while the allowance lasts
                fill()
                break
    planning.record_stage(w, round_, stage, predicted, seconds, work, time.perf_counter() - t0, n_workers)


def verify_picks(ctx: Round, picks: list[str]) -> None:
    """The round's picks relaxed and computed with the reference settings (those not done yet),
    each from where :func:`reference_starts` says, with the committee's Hessian at MLIP starts."""
    done = dft_done(ctx.w, settings_hash(ctx.cfg.reference))
    todo = [c for c in picks if c not in done]
    starts = with_hessians(ctx, reference_starts(ctx.w, ctx.cfg.reference, todo))
    from_mlip = sum(s.start == "mlip" for s in starts.values())
    ctx.log.info(
        "round %d: verifying %d candidates with %s (%s acquisition), %d from their MLIP structure",
        ctx.number,
        len(todo),
        ctx.cfg.reference.calculator,
        ctx.cfg.active_learning.acquisition,
        from_mlip,
    )
    reference_stage(ctx, [(c, starts[c].atoms) for c in todo], verified=True, starts=starts)


def record_reference(
    w: CampaignWriter,
    round_: int,
    result: RelaxResult,
    reference_set: str,
    *,
    verified: bool,
    start: str = "initial",
    start_reason: str = "",
    hessian: str = DEFAULT_HESSIAN,
) -> None:
    """A reference result: its frames join the training set; a verified one joins the DFT table.

    ``reference_set`` is the campaign's settings hash the calculation was asked for; the
    row's ``settings_hash`` is what its energy was computed with (they differ only when a
    recovery rung had to change an energy-defining setting). One row per candidate and set.
    """
    key = f"r{round_}/{result.id}/{reference_set}"
    if verified:  # a calculation run again (an infrastructure error, matdisc retry) is its next attempt
        earlier = _results_in_set(w.table("dft"), reference_set).get(result.id, 0)
        key += f"/attempt{earlier + 1}" if earlier else ""
    settings = getattr(result, "settings_hash", "") or reference_set
    batches = []
    if result.frames:
        frames, cols = frames_from_atoms_with_results(result.frames)
        n = len(result.frames)
        meta = {"id": [result.id] * n, "round": [round_] * n, "settings_hash": [settings] * n}
        batches.append(Batch("frames", key, {**meta, **cols}, frames))
    if verified:
        row = scalar_fields(result)
        row.update(
            round=round_,
            reference_set=reference_set,
            settings_hash=settings,
            e_dft_per_atom=result.energy_per_atom,
            start=start,
            start_reason=start_reason,
            hessian=hessian,
        )
        batches.append(Batch("dft", key, record_columns([row]), Frames.from_atoms([result.atoms])))
    if batches:  # one commit: a kill between the frames and the row would redo the calculation
        w.append_together(batches)


def failed_reference(cid: str, atoms: Atoms, err: BaseException, reference_set: str) -> RelaxResult:
    """The record of a calculation whose worker was lost more often than retries allow: an
    infrastructure ``error``, which the next run computes again (:func:`to_retry`)."""
    reason = f"worker lost: {type(err).__name__}: {err}".splitlines()[0][:300]
    return ReferenceResult(cid, "error", reason, atoms, settings_hash=reference_set)


#: Reference results that say nothing about the structure (a lost worker, a killed or crashed
#: process, a full disk, memory): the next run computes the candidate again, up to
#: ``REFERENCE_ATTEMPTS`` results in all. Physics outcomes (``failed``: SCF not converged after
#: the recovery ladder, or the calculator refused the structure; ``unconverged``; ``exploded``;
#: ``timeout`` of the calculation's own wall time) are final for their settings; ``matdisc
#: retry`` asks for any of them again.
INFRASTRUCTURE = ("error",)
REFERENCE_ATTEMPTS = 3


def _results_in_set(dft: Any, reference_set: str) -> dict[str, int]:
    """id -> how many verified results it has in the reference set."""
    if dft.empty:
        return {}
    return {str(k): int(v) for k, v in dft["id"][in_reference_set(dft, reference_set)].value_counts().items()}


def to_retry(w: CampaignWriter, reference_set: str, dft: Any = None) -> dict[str, tuple[int, int]]:
    """id -> (the round of its latest result, its results so far), for the verified calculations
    the next run computes again: an infrastructure error under the attempt bound, or a ``matdisc
    retry`` request made since its latest result. ``dft``: the table, when the caller has read it."""
    dft = w.table("dft") if dft is None else dft
    if dft.empty:
        return {}
    mine = dft[in_reference_set(dft, reference_set)]
    counts = mine["id"].value_counts()
    latest = mine.drop_duplicates("id", keep="last").set_index("id")
    errors = mine["id"][mine["status"].isin(INFRASTRUCTURE)].value_counts()
    out = {
        str(cid): (int(row["round"]), int(counts[cid]))
        for cid, row in latest.iterrows()
        if row["status"] in INFRASTRUCTURE and errors.get(cid, 0) < REFERENCE_ATTEMPTS
    }
    requests = w.table("retries")
    for req in requests[requests["reference_set"] == reference_set].to_dict("records"):
        cid = str(req["id"])
        if cid in latest.index and int(counts[cid]) == int(req["attempts_before"]):
            out[cid] = (int(latest.loc[cid, "round"]), int(counts[cid]))
    return out


#: What a verified calculation's result can say (``matdisc retry --status``).
REFERENCE_STATUSES = ("ok", "unconverged", "failed", "exploded", "timeout", "error", "settings_changed")


def request_retries(w: CampaignWriter, statuses: list[str], ids: list[str] | None = None) -> list[str]:
    """Ask the next run to compute again the verified calculations of the store's reference set
    whose latest result has one of ``statuses`` (and is one of ``ids`` when given); returns them.
    Raises :class:`UserError` and writes nothing when none matches."""
    from matdisc.errors import UserError

    unknown = sorted(set(statuses) - set(REFERENCE_STATUSES))
    if unknown:
        raise UserError(f"--status: unknown {', '.join(unknown)} (one of {', '.join(REFERENCE_STATUSES)})")
    settings = w.reference_set()
    if not settings:
        raise UserError(f"{w.location}: no run recorded, so no reference calculation to retry")
    dft = w.table("dft")
    mine = dft[in_reference_set(dft, settings)] if not dft.empty else dft
    latest = mine.drop_duplicates("id", keep="last")
    chosen = latest[latest["status"].isin(statuses)]
    if ids:
        chosen = chosen[chosen["id"].isin(ids)]
    if chosen.empty:
        which = f" among {', '.join(ids)}" if ids else ""
        raise UserError(f"no verified calculation of reference set {settings} has status {', '.join(statuses)}{which}")
    counts = mine["id"].value_counts()
    now = time.time()
    rows = [
        {"id": cid, "reference_set": settings, "status": st, "attempts_before": int(counts[cid]), "requested": now}
        for cid, st in zip(chosen["id"], chosen["status"])
    ]
    w.append_records("retries", f"retry/{time.time_ns()}", rows)
    return [str(c) for c in chosen["id"]]


def retry_references(run: Run, pending: dict[str, tuple[int, int]]) -> None:
    """Compute again the verified calculations of ``pending`` (:func:`to_retry` when the run
    began) that nothing computed since (round 0 redoes its own), each in its own round, from where
    :func:`reference_starts` says: once per run, so an error that persists costs one try a run."""
    still = to_retry(run.w, settings_hash(run.cfg.reference))
    by_round: dict[int, list[str]] = {}
    for cid, (round_, results) in pending.items():
        if cid in still and still[cid][1] == results:
            by_round.setdefault(round_, []).append(cid)
    for round_, ids in sorted(by_round.items()):
        ctx = run.round(round_)
        starts = with_hessians(ctx, reference_starts(run.w, run.cfg.reference, ids))
        ctx.log.info("round %d: computing %d reference calculations again (%s)", round_, len(ids), ", ".join(ids[:5]))
        reference_stage(ctx, [(c, starts[c].atoms) for c in ids], verified=True, starts=starts)


def perturbed_seed_jobs(w: CampaignWriter, cfg: CampaignConfig) -> list[tuple[str, Atoms]]:
    """Rattled/strained copies of relaxed seeds that have no training frames yet."""
    cs = cfg.mlip.cold_start
    dft = w.table("dft")
    if dft.empty or cs.perturbed_per_structure == 0:
        return []
    settings = settings_hash(cfg.reference)
    frames_table = w.table("frames")
    have = set(frames_table["id"][frames_table["settings_hash"] == settings])
    frames = w.frames("dft")
    jobs = []
    for i, row in enumerate(dft.to_dict("records")):
        if row["status"] != "ok" or row.get("settings_hash") != settings:
            continue
        copies = perturbed_copies(
            frames.atoms(i),
            cs.perturbed_per_structure,
            rattle=cs.rattle_stdev,
            strain=cs.strain,
            seed=cfg.generation.seed + zlib.crc32(row["id"].encode()),
        )
        for k, a in enumerate(copies):
            jid = f"{row['id']}-p{k}"
            if jid not in have:
                jobs.append((jid, a))
    return jobs


def dft_done(w: CampaignWriter, reference_set: str) -> set[str]:
    """Candidates with a reference result in this reference set that stands (any outcome but one
    the next run computes again: :func:`to_retry`)."""
    dft = w.table("dft")
    if dft.empty:
        return set()
    return set(dft["id"][in_reference_set(dft, reference_set)]) - set(to_retry(w, reference_set, dft))
