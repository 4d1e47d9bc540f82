"""Verify: reference (DFT) calculations on the DFT workers, each recorded as it completes.

Relaxations go one per job; single points travel in batches (``reference.statics_per_task``,
smaller towards the end so no worker idles long), each batch one calculation process.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any

from ase import Atoms

from matdisc import jobs as run_jobs
from matdisc.budget import planning
from matdisc.budget.costs import dft_seconds, dft_work, scf_cycles
from matdisc.config import CampaignConfig, ReferenceConfig
from matdisc.dft import perturbed_copies, settings_hash
from matdisc.executor import JobFuture
from matdisc.records import USABLE, ReferenceResult, RelaxResult, frames_from_atoms_with_results, scalar_fields
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
    starts: dict[str, Start] | None = None,
) -> None:
    """Run reference calculations of ``(id, atoms)`` jobs; record each as it completes.

    ``starts``: where each job's structure came from, recorded with its DFT row (default: initial).

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
                    start = (starts or {}).get(res.id)
                    record_reference(
                        w,
                        round_,
                        res,
                        settings,
                        verified=verified,
                        start=start.start if start else "initial",
                        start_reason=start.reason if start else "",
                    )
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
    """The round's picks relaxed and computed with the reference settings (those not done yet),
    each from where :func:`reference_starts` says."""
    done = dft_done(ctx.w, settings_hash(ctx.cfg.reference))
    todo = [c for c in picks if c not in done]
    starts = reference_starts(ctx.w, ctx.cfg.reference, todo)
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


@dataclass(frozen=True)
class Start:
    """Where one reference relaxation starts: ``start`` is ``mlip`` or ``initial``; ``reason``
    says why the initial structure was used where the configuration asked for the MLIP one."""

    atoms: Atoms
    start: str
    reason: str = ""


def reference_starts(w: CampaignWriter, ref: ReferenceConfig, ids: list[str]) -> dict[str, Start]:
    """id -> the structure its reference relaxation starts from.

    The latest MLIP-relaxed structure when ``ref.start`` is ``mlip`` and that relaxation is usable
    (``ok``, ``symmetry_changed``), changed the volume by at most ``ref.start_max_volume_change`` and
    is still the generated structure's type by StructureMatcher (default tolerances, volume scaled
    out): then DFT starts near its answer. A young model can carry a cell into another basin
    (squeezed, sheared, atoms swapped into another arrangement); then the generated structure.
    """
    from pymatgen.core.structure_matcher import StructureMatcher
    from pymatgen.io.ase import AseAtomsAdaptor

    initial = dict(candidate_atoms(w, ids))
    if ref.start == "initial":
        return {cid: Start(initial[cid], "initial") for cid in ids}
    mlip = w.table("mlip")
    frames, row_of = w.latest_frames("mlip", mlip)
    matcher = StructureMatcher()
    out = {}
    for cid in ids:
        if cid not in row_of or frames is None:
            out[cid] = Start(initial[cid], "initial", "no MLIP result")
            continue
        row = row_of[cid]
        status = str(mlip["status"].iloc[row])
        relaxed = frames.atoms(row)
        change = relaxed.get_volume() / initial[cid].get_volume() - 1
        if status not in USABLE:
            out[cid] = Start(initial[cid], "initial", f"MLIP outcome {status}")
        elif abs(change) > ref.start_max_volume_change:
            out[cid] = Start(initial[cid], "initial", f"MLIP volume change {change:+.0%}")
        elif not matcher.fit(AseAtomsAdaptor.get_structure(initial[cid]), AseAtomsAdaptor.get_structure(relaxed)):
            out[cid] = Start(initial[cid], "initial", "MLIP structure no longer matches the generated one")
        else:
            out[cid] = Start(relaxed, "mlip")
    return out


def record_reference(
    w: CampaignWriter,
    round_: int,
    result: RelaxResult,
    reference_set: str,
    *,
    verified: bool,
    start: str = "initial",
    start_reason: str = "",
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
            round=round_,
            reference_set=reference_set,
            settings_hash=settings,
            e_dft_per_atom=result.energy_per_atom,
            start=start,
            start_reason=start_reason,
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
