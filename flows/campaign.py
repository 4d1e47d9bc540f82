"""The campaign flow: a thin Prefect layer over ``matdisc``.

Tasks call one matdisc function each and run on Dask workers routed by resources (MLIP
vs DFT). The flow body only decides order and writes results to the store as each task
completes (it is the store's single writer), so a crash loses at most the tasks in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import dask
import httpx
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run

from flows import artifacts, runs
from flows.artifacts import slug
from flows.cluster import DFT, MLIP
from flows.tasks import evaluate_task, reference_task, relax_task, statics_task, train_task
from matdisc import discovery, loop, planning, reference_phases, screening
from matdisc.config import CampaignConfig, ReferenceConfig
from matdisc.costs import Rates, concurrent_members, dft_seconds, dft_work, scf_cycles
from matdisc.dft import settings_hash
from matdisc.metrics import energy_mae_mev
from matdisc.mlip import resolve_device
from matdisc.mlip.model import check_trusted, configured_model, trusted_roots
from matdisc.mlip.shipping import unpack
from matdisc.mlip.train import TrainedModel
from matdisc.store import CampaignWriter

#: Held-out errors of a trained committee that each round record repeats.
TRAINING_METRICS = ("energy_rmse_per_atom", "forces_rmse")


def _reference_stage(
    w: CampaignWriter,
    cfg: CampaignConfig,
    round_: int,
    jobs: list,
    *,
    verified: bool,
    static: bool = False,
    screen: ReferenceConfig | None = None,
    allowance_s: float | None = None,
) -> None:
    """Run reference calculations on DFT workers; record each as it completes.

    ``screen``: single points with these cheaper settings, recorded in the screening table
    (stage ``screen``), never in the DFT table or the training frames. Single points travel in
    batches (``reference.statics_per_task``, smaller towards the end so no worker idles long),
    each batch one calculation process. ``allowance_s``: seconds of calculation the stage may
    spend; jobs are then submitted one batch per free worker, in order, each only while the
    measured seconds plus the predicted ones in flight leave room for it; the rest are left out
    once nothing is in flight and the next still does not fit.
    """
    log = get_run_logger()
    if not jobs:
        return
    ref = screen or cfg.reference
    settings = settings_hash(ref)
    static = static or screen is not None
    stage, what = (
        ("screen", "screening calculations")
        if screen
        else ("dft", "training frames" if static else "reference calculations")
    )
    workdir = str(w.path / "calculations" / (f"r{round_}-screen" if screen else f"r{round_}"))
    progress = artifacts.StageProgress(cfg, round_, what, len(jobs))
    rates, _ = planning.campaign_rates(cfg, w)
    steps = None if static else (rates.seed_steps if round_ == 0 else rates.dft_steps)
    n_workers = planning.workers(cfg).dft
    predicted = planning.dft_cost([a for _, a in jobs], cfg, rates, planning.workers(cfg), steps, ref)
    # each job's prediction only matters under an allowance (the stage's total is in ``predicted``)
    queue = [
        (cid, atoms, dft_seconds(atoms, ref, rates, steps) if allowance_s is not None else 0.0) for cid, atoms in jobs
    ]
    window = n_workers if allowance_s is not None or static else len(queue)
    t0, seconds, work, futures = time.perf_counter(), [], 0.0, {}
    reference = ref.model_dump(mode="json")

    def fill() -> None:
        while queue and len(futures) < window:
            size = max(1, min(ref.statics_per_task, -(-len(queue) // (2 * n_workers)))) if static else 1
            batch = []
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
            with dask.annotate(resources=DFT):
                if static:
                    fut = statics_task.submit([(cid, atoms) for cid, atoms, _ in batch], reference, workdir)
                else:
                    fut = reference_task.submit(batch[0][0], batch[0][1], reference, workdir)
            futures[fut] = batch

    fill()
    n = 0
    while futures:
        for fut in as_completed(list(futures)):
            batch = futures.pop(fut)
            try:
                results = fut.result() if static else [fut.result()]
            except httpx.HTTPError:  # the Prefect API is gone: the run stops, a rerun redoes these
                raise
            except Exception as err:  # Dask gave up on it (worker lost too often): recorded, never dropped
                results = [loop.failed_reference(cid, atoms, err, settings) for cid, atoms, _ in batch]
            for res, (_, atoms, _) in zip(results, batch):
                if screen:
                    screening.record(w, round_, res, settings)
                else:
                    loop.record_reference(w, round_, res, settings, verified=verified)
                seconds.append(res.walltime_s)
                work += dft_work(atoms, ref) * scf_cycles(None if static else res.n_steps)
                n += 1
                log.info("%s %d/%d: %s %s %s", stage, n, len(jobs), res.id, res.status, res.reason)
            progress.advance(len(results))
            if queue:  # a worker is free: submit the next while the allowance lasts
                fill()
                break
    planning.record_stage(w, round_, stage, predicted, seconds, work, time.perf_counter() - t0, n_workers)


def _select(w: CampaignWriter, cfg: CampaignConfig, round_: int) -> list[str]:
    """The round's DFT picks: acquisition order, screened with cheaper DFT when the budget cannot
    verify them all (:mod:`matdisc.screening`), cut where the budget ends; recorded once."""
    log = get_run_logger()
    recorded = discovery.recorded_selection(w, round_)
    if recorded is not None:
        return recorded
    ranked = discovery.rank_for_reference(w, cfg, round_)
    cost = discovery.predicted_reference_seconds(w, cfg, [p.id for p in ranked])
    remaining = planning.remaining_dft_seconds(cfg, w)
    budget = discovery.round_budget(w, cfg, round_)
    screen = screening.shortlist_plan(w, cfg, [p.id for p in ranked], remaining)
    if screen is not None:
        log.info(
            "round %d: screening a shortlist of %d candidates with %s settings (%s preset), then verifying the best %d",
            round_,
            len(screen.picks),
            settings_hash(screen.reference),
            screen.reference.preset,
            budget,
        )
    else:
        ranked, cost = ranked[:budget], cost[:budget]
        screen = screening.plan(w, cfg, [p.id for p in ranked], cost, remaining)
        if screen is None:
            return discovery.record_selection(w, cfg, round_, ranked, cost=cost)
        log.info(
            "round %d: the budget cannot verify all %d picks; screening %d with %s settings (%s preset) first",
            round_,
            len(ranked),
            len(screen.picks),
            settings_hash(screen.reference),
            screen.reference.preset,
        )
    _reference_stage(
        w, cfg, round_, screen.jobs, verified=False, screen=screen.reference, allowance_s=screen.allowance_s
    )
    within = screening.funnel(w, cfg, screen.picks)
    allowed = set(discovery.capped_per_composition(w, cfg, [cid for cid, _ in within]))
    kept = [(cid, e) for cid, e in within if cid in allowed][:budget]
    by_id, cost_of = {p.id: p for p in ranked}, {p.id: c for p, c in zip(ranked, cost)}
    initial = (
        0
        if "initial" in cfg.budget.screening.geometries
        else sum(screening.split_job_id(cid)[1] == "initial" for cid, _ in screen.jobs)
    )
    log.info(
        "round %d: %d of %d screened picks within %.3g eV/atom of the hull; verifying the best %d%s",
        round_,
        len(within),
        len(screen.picks),
        cfg.budget.screening.margin,
        len(kept),
        f" ({initial} screened at their initial structure: MLIP volume change beyond "
        f"{cfg.budget.screening.max_volume_change:g})"
        if initial
        else "",
    )
    return discovery.record_selection(
        w, cfg, round_, [by_id[cid] for cid, _ in kept], dict(kept), cost=[cost_of[cid] for cid, _ in kept]
    )


@dataclass
class FlowWorkers:
    """What this flow run's workers have done: its first MLIP stage waits for them to import torch
    and MACE, and its predicted cost says so."""

    mlip_started: bool = False

    def first_mlip(self, cost: planning.StageCost, rates: Rates) -> planning.StageCost:
        started, self.mlip_started = self.mlip_started, True
        return cost if started else cost.started(rates.mlip_start_s)


def _train(w: CampaignWriter, cfg: CampaignConfig, round_: int, run: FlowWorkers) -> dict:
    """Train (or fine-tune) the next committee; its held-out errors go to the store and the UI."""
    log = get_run_logger()
    frames, groups = loop.training_set(w, cfg)
    previous = loop.current_model(w, before_round=round_ + 1)
    start = previous["paths"] if previous is not None and cfg.mlip.training.start_from == "previous" else None
    if start:
        check_trusted(start, trusted_roots([w.path / "models", *_configured_paths(cfg)]))
    log.info(
        "training MACE (%d members, %s) on %d reference frames",
        cfg.mlip.ensemble,
        "fine-tuning " + previous["sha256"][:12] if start else "from scratch",
        len(frames),
    )
    rates, _ = planning.campaign_rates(cfg, w)
    device = resolve_device(cfg.mlip.device)
    sized = cfg.mlip.training.sized(device)
    epochs = int(sized.finetune_epochs if start else sized.max_num_epochs)
    frame_atoms = float(sum(len(a) for a in frames))
    predicted = run.first_mlip(planning.train_cost(frame_atoms, cfg, rates, planning.workers(cfg), epochs), rates)
    t0 = time.perf_counter()
    with dask.annotate(resources=MLIP):
        fut = train_task.submit(
            frames,
            groups,
            str(w.path / "training" / f"r{round_}"),
            cfg.mlip.training.model_dump(mode="json"),
            cfg.mlip.ensemble,
            cfg.generation.seed + 100 * round_,
            cfg.mlip.device,
            cfg.mlip.dtype,
            start,
            _remote(w),
        )
    trained: list[TrainedModel] = fut.result()
    side_by_side = concurrent_members(cfg.mlip.ensemble, planning.workers(cfg).mlip_cores)
    planning.record_stage(
        w,
        round_,
        "train",
        predicted,
        [m.seconds for m in trained],
        predicted.work,
        time.perf_counter() - t0,
        side_by_side,
    )
    metrics = {k: float(sum(m.metrics[k] for m in trained) / len(trained)) for k in trained[0].metrics}
    create_table_artifact(
        key=f"{slug(cfg.name)}-training-r{round_}",
        table=[
            {
                "member": k,
                "mode": m.mode,
                "train_frames": m.n_train,
                "valid_frames": m.n_valid,
                **{name: round(v, 5) for name, v in m.metrics.items()},
            }
            for k, m in enumerate(trained)
        ],
        description=f"{cfg.name}: MACE training, round {round_} (errors on held-out reference frames)",
    )
    log.info("trained: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    paths = unpack(trained, w.path / "training" / f"r{round_}-shipped")
    return loop.register_model(
        w,
        round_,
        paths,
        n_frames=len(frames),
        source="trained",
        device=resolve_device(cfg.mlip.device),
        dtype=cfg.mlip.dtype,
        mode=trained[0].mode,
        metrics=metrics,
    )


def _model_errors(w: CampaignWriter, cfg: CampaignConfig, round_: int, screened: dict, trained: dict) -> dict:
    """MLIP energy MAE on the round's new DFT structures, by the screening and the retrained model."""
    frames = discovery.new_reference_frames(w, round_)
    if not frames:
        return {}
    check_trusted(screened["paths"] + trained["paths"], trusted_roots([w.path / "models", *_configured_paths(cfg)]))
    with dask.annotate(resources=MLIP):
        fut = evaluate_task.submit(
            [screened["paths"], trained["paths"]], frames, cfg.mlip.device, cfg.mlip.dtype, _remote(w)
        )
    before, after = fut.result()
    ref = [a.info["REF_energy"] / len(a) for a in frames]
    return {"mae_before_mev": energy_mae_mev(before, ref), "mae_after_mev": energy_mae_mev(after, ref)}


def _remote(w: CampaignWriter) -> str | None:
    """The URL of a store on an object store: workers fetch models from it (no shared filesystem)."""
    return w.remote.url if w.remote is not None else None


def _configured_paths(cfg: CampaignConfig) -> list[Path]:
    return [Path(cfg.mlip.model)] if cfg.mlip.is_model_file else []


def _initial_model(w: CampaignWriter, cfg: CampaignConfig, run: FlowWorkers) -> dict:
    """Round 0: the configured model, or (cold start) seed reference data and a first MACE."""
    log = get_run_logger()
    model = loop.current_model(w)
    if model is not None:
        return model
    info = configured_model(cfg.mlip, cfg.chemsys)
    if info is not None:
        return loop.register_model(
            w,
            0,
            list(info.paths),
            n_frames=0,
            source=cfg.mlip.model,
            copy=False,
            device=resolve_device(cfg.mlip.device),
            dtype=cfg.mlip.dtype,
        )
    seeds = loop.seed_candidates(cfg)
    loop.add_candidates(w, seeds, 0, "seed")
    reference_phases.add_known_phases(w, cfg)  # computed with the seeds: the first model learns them too
    done = loop.dft_done(w, settings_hash(cfg.reference))
    jobs = [(cid, a) for cid, a in loop.candidate_atoms(w) if cid not in done]
    known = set(w.table("known_phases")["candidate"]) if cfg.known_phases.configured else set()
    log.info(
        "cold start: %d seed structures with the reference calculator%s",
        len(jobs),
        f" (known phases among them: {sum(cid in known for cid, _ in jobs)})" if known else "",
    )
    _reference_stage(w, cfg, 0, jobs, verified=True)
    _reference_stage(w, cfg, 0, loop.perturbed_seed_jobs(w, cfg), verified=False, static=True)
    return _train(w, cfg, 0, run)


def _relax_stage(w: CampaignWriter, cfg: CampaignConfig, round_: int, model: dict, run: FlowWorkers) -> None:
    log = get_run_logger()
    check_trusted(model["paths"], trusted_roots([w.path / "models", *_configured_paths(cfg)]))
    pending = loop.pending_relaxations(w, model["sha256"])
    size = cfg.mlip.structures_per_task
    batches = [pending[i : i + size] for i in range(0, len(pending), size)]
    progress = artifacts.StageProgress(cfg, round_, "MLIP relaxations", len(pending))
    rates, _ = planning.campaign_rates(cfg, w)
    n_workers = planning.workers(cfg)
    predicted = run.first_mlip(planning.relax_cost([len(a) for _, a in pending], cfg, rates, n_workers), rates)
    t0, seconds, work = time.perf_counter(), [], 0.0
    with dask.annotate(resources=MLIP):
        futures = {
            relax_task.submit(b, model["paths"], cfg.mlip.model_dump(mode="json"), _remote(w)): b for b in batches
        }
    for fut in as_completed(list(futures)):
        results = fut.result()
        key = loop.relax_batch_key(round_, model["sha256"], [cid for cid, _ in futures[fut]])
        loop.record_relaxations(w, key, round_, results, model["sha256"])
        seconds.append(sum(r.walltime_s for r in results))
        work += sum(len(r.atoms) * r.n_steps for r in results)
        progress.advance(len(results))
        log.info("MLIP relaxed %d/%d structures", progress.done, len(pending))
    planning.record_stage(w, round_, "relax", predicted, seconds, work, time.perf_counter() - t0, n_workers.mlip)


@flow(name="matdisc-campaign", log_prints=True)
def campaign_flow(config: dict, rounds: int | None = None) -> dict:
    """Run (or resume) a campaign: cold start, then generate → relax → score → verify → retrain."""
    cfg = CampaignConfig.model_validate(config)
    log = get_run_logger()
    n_rounds = rounds if rounds is not None else cfg.active_learning.rounds
    with CampaignWriter(cfg.store_path) as w:
        this_run = str(flow_run.id) if flow_run.id else ""
        earlier = w.orchestrator_runs()
        loop.record_run(w, cfg, this_run)
        dead = runs.mark_stale_runs_crashed(earlier, this_run, str(cfg.store_path))
        if dead:  # the writer lock is ours: whoever wrote before is gone, whatever the UI said
            log.warning(
                "marked Crashed: %s (earlier runs of this store that the API still showed running)", ", ".join(dead)
            )
        run = FlowWorkers()
        model = _initial_model(w, cfg, run)
        refs = reference_phases.reference_set_jobs(w, cfg)
        if refs:
            log.info("reference set %s: %d elemental references", settings_hash(cfg.reference), len(refs))
            _reference_stage(w, cfg, 0, refs, verified=True)
        known = reference_phases.known_phase_jobs(w, cfg)
        if known:
            log.info("known phases: %d to compute with the reference settings", len(known))
            _reference_stage(w, cfg, 0, known, verified=True)
        done_rounds = set(w.rounds()["round"]) if not w.rounds().empty else set()
        if 0 not in done_rounds:
            discovery.update_scores(w, cfg, 0, "r0/scores")
            w.append_records(
                "rounds",
                "r0",
                [{**discovery.round_metrics(w, cfg, 0, model["sha256"]), "trained_model_sha256": model["sha256"]}],
            )
        for r in range(1, n_rounds + 1):
            if r in done_rounds:
                continue
            reason = discovery.stop_reason(w, cfg, r)
            if reason is not None:
                log.info("campaign stops before round %d: %s", r, reason)
                artifacts.stop_report(w, cfg, r, reason)
                break
            model = loop.current_model(w, before_round=r)
            if w.has_batch("candidates", f"r{r}/generated"):  # resumed: the round's candidates are stored
                log.info("round %d: resuming with its stored candidates", r)
            else:  # (generating again could differ: substitution follows the hits found since)
                t0 = time.perf_counter()
                new, keys = loop.round_candidates(w, cfg, r)
                n_new = loop.add_candidates(w, new, r, "generated", keys)
                seconds = time.perf_counter() - t0
                planning.record_stage(w, r, "generate", None, [seconds], 0.0, seconds, 1)
                log.info("round %d: %d new candidates (%s)", r, n_new, loop.generation_summary(w, r))
            _relax_stage(w, cfg, r, model, run)
            discovery.update_scores(w, cfg, r, f"r{r}/scores-mlip")
            picks = _select(w, cfg, r)
            done = loop.dft_done(w, settings_hash(cfg.reference))
            log.info(
                "round %d: verifying %d candidates with %s (%s acquisition)",
                r,
                len(picks),
                cfg.reference.calculator,
                cfg.active_learning.acquisition,
            )
            _reference_stage(
                w, cfg, r, [(c, a) for c, a in loop.candidate_atoms(w, picks) if c not in done], verified=True
            )
            cand = discovery.update_scores(w, cfg, r, f"r{r}/scores")
            trained = loop.current_model(w, before_round=r + 1)
            if trained is None or trained["round"] != r:
                trained = _train(w, cfg, r, run)
            metrics = discovery.round_metrics(w, cfg, r, model["sha256"], _model_errors(w, cfg, r, model, trained))
            metrics["trained_model_sha256"] = trained["sha256"]
            metrics.update({f"trained_{k}": trained[k] for k in TRAINING_METRICS if k in trained})
            w.append_records("rounds", f"r{r}", [metrics])
            create_markdown_artifact(
                key=f"{slug(cfg.name)}-round-{r}",
                markdown=discovery.round_report(cfg, metrics, cand),
                description=f"{cfg.name} round {r}",
            )
            artifacts.discovery_table(w, cfg)
            artifacts.candidates_table(cfg, r, cand)
            artifacts.round_figures(cfg, r, cand)
            artifacts.costs_table(w, cfg)
            log.info("round %d: %s", r, metrics)
        summary = w.summary()
    artifacts.report_link(cfg)
    return summary
