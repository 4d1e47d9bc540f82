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
from matdisc.stages.context import Round
from matdisc.stages.generate import candidate_atoms
from matdisc.store import CampaignWriter, Frames
from matdisc.store.campaign import in_reference_set


def reference_stage(
    ctx: Round,
    jobs: list[tuple[str, Atoms]],
    *,
    verified: bool,
    static: bool = False,
    screen: ReferenceConfig | None = None,
    allowance_s: float | None = None,
) -> None:
    """Run reference calculations of ``(id, atoms)`` jobs; record each as it completes.

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
    progress = ex.progress(cfg, round_, what, len(jobs))
    rates = ctx.rates()
    steps = None if static else (rates.seed_steps if round_ == 0 else rates.dft_steps)
    n_workers = planning.workers(cfg).dft
    predicted = planning.dft_cost([a for _, a in jobs], cfg, rates, planning.workers(cfg), steps, ref)
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
                fut = ex.submit(run_jobs.reference, batch[0][0], batch[0][1], reference, workdir, resource="dft")
            futures[fut] = batch

    fill()
    n = 0
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
                    record_reference(w, round_, res, settings, verified=verified)
                seconds.append(res.walltime_s)
                work += dft_work(atoms, ref) * scf_cycles(None if static else res.n_steps)
                n += 1
                log.info("%s %d/%d: %s %s %s", stage, n, len(jobs), res.id, res.status, res.reason)
            progress.advance(len(results))
            if queue:  # a worker is free: submit the next while the allowance lasts
                fill()
                break
    planning.record_stage(w, round_, stage, predicted, seconds, work, time.perf_counter() - t0, n_workers)


def verify_picks(ctx: Round, picks: list[str]) -> None:
    """The round's picks relaxed and computed with the reference settings (those not done yet)."""
    done = dft_done(ctx.w, settings_hash(ctx.cfg.reference))
    ctx.log.info(
        "round %d: verifying %d candidates with %s (%s acquisition)",
        ctx.number,
        len(picks),
        ctx.cfg.reference.calculator,
        ctx.cfg.active_learning.acquisition,
    )
    jobs = [(c, a) for c, a in candidate_atoms(ctx.w, picks) if c not in done]
    reference_stage(ctx, jobs, verified=True)


def record_reference(
    w: CampaignWriter, round_: int, result: RelaxResult, reference_set: str, *, verified: bool
) -> None:
    """A reference result: its frames join the training set; a verified one joins the DFT table.

    ``reference_set`` is the campaign's settings hash the calculation was asked for; the
    row's ``settings_hash`` is what its energy was computed with (they differ only when a
    recovery rung had to change an energy-defining setting). One row per candidate and set.
    """
    key = f"r{round_}/{result.id}/{reference_set}"
    settings = getattr(result, "settings_hash", "") or reference_set
    if result.frames:
        frames, cols = frames_from_atoms_with_results(result.frames)
        n = len(result.frames)
        w.append(
            "frames",
            key,
            {"id": [result.id] * n, "round": [round_] * n, "settings_hash": [settings] * n, **cols},
            frames,
        )
    if verified:
        row = scalar_fields(result)
        row.update(
            round=round_, reference_set=reference_set, settings_hash=settings, e_dft_per_atom=result.energy_per_atom
        )
        w.append_records("dft", key, [row], Frames.from_atoms([result.atoms]))


def failed_reference(cid: str, atoms: Atoms, err: BaseException, reference_set: str) -> RelaxResult:
    """The record of a calculation whose worker was lost more often than retries allow."""
    reason = f"worker lost: {type(err).__name__}: {err}".splitlines()[0][:300]
    return ReferenceResult(cid, "failed", reason, atoms, settings_hash=reference_set)


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
    """Candidates with a reference result (of any outcome) in this reference set."""
    dft = w.table("dft")
    if dft.empty:
        return set()
    return set(dft["id"][in_reference_set(dft, reference_set)])
