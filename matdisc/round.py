"""A campaign, round by round: generate -> relax -> score -> select -> verify -> train.

The stages (:mod:`matdisc.stages`) run their jobs through an executor
(:mod:`matdisc.executor`): in this process with :class:`~matdisc.executor.InProcess`, on
Dask workers under a Prefect flow with ``flows``' executor. This module is the only place the
order of a round is written down. The process that runs it is the store's single writer:
each result is recorded as it completes, so a crash loses at most the jobs in flight, and a
rerun resumes where the store ends.
"""

from __future__ import annotations

import logging
import time
from importlib.metadata import version

from matdisc import discovery, reference_phases
from matdisc.config import CampaignConfig
from matdisc.dft import calculator_parameters, settings_hash
from matdisc.errors import StoreError
from matdisc.executor import Executor
from matdisc.mlip import resolve_device
from matdisc.mlip.model import configured_model
from matdisc.stages.context import Round, Run
from matdisc.stages.generate import add_candidates, candidate_atoms, generate, seed_candidates
from matdisc.stages.heldout import check_retrained, recorded_check, screening_model
from matdisc.stages.registry import ModelRecord, current_model, new_model, register_model
from matdisc.stages.relax import relax_stage
from matdisc.stages.score import update_scores
from matdisc.stages.select import select
from matdisc.stages.train import model_errors, train
from matdisc.stages.verify import (
    dft_done,
    perturbed_seed_jobs,
    reference_stage,
    retry_references,
    to_retry,
    verify_picks,
)
from matdisc.store import CampaignWriter

#: Held-out errors of a trained committee that each round record repeats.
TRAINING_METRICS = ("energy_rmse_per_atom", "forces_rmse")


def run_campaign(cfg: CampaignConfig, executor: Executor, *, rounds: int | None = None, run_id: str = "") -> dict:
    """Run (or resume) a campaign: round 0 (the first model, reference sets), then its rounds
    until ``rounds`` (default ``active_learning.rounds``) or a stop criterion; returns the
    store's summary. ``run_id``: the workflow engine's id of this run, recorded in the store."""
    n_rounds = rounds if rounds is not None else cfg.active_learning.rounds
    with CampaignWriter(cfg.store_path) as w:
        earlier = w.orchestrator_runs()
        record_run(w, cfg, run_id)
        executor.opened(w, cfg, earlier, run_id)
        run = Run(w, cfg, executor)
        pending = to_retry(w, settings_hash(cfg.reference))  # infrastructure errors, matdisc retry requests
        run_round_zero(run.round(0))
        retry_references(run, pending)
        done_rounds = set(w.rounds()["round"])
        for r in range(1, n_rounds + 1):
            if r in done_rounds:
                continue
            reason = discovery.stop_reason(w, cfg, r)
            if reason is not None:
                executor.log.info("campaign stops before round %d: %s", r, reason)
                w.append_records(
                    "stops", f"r{r}/stop/{len(w.table('stops'))}", [{"round": r, "reason": reason, "time": time.time()}]
                )
                executor.stopped(w, cfg, r, reason)
                break
            run_round(run.round(r))
        return w.summary()


def run_round(ctx: Round) -> dict:
    """One round of active learning; returns its metrics (also recorded in the ``rounds`` table)."""
    model = current_model(ctx.w, before_round=ctx.number)
    if model is None:  # round 0 always registers one
        raise StoreError(f"{ctx.w.location}: no model registered before round {ctx.number}")
    generate(ctx)
    relax_stage(ctx, model)
    update_scores(ctx.w, ctx.cfg, ctx.number, f"r{ctx.number}/scores-mlip")
    picks = select(ctx)
    verify_picks(ctx, picks)
    cand = update_scores(ctx.w, ctx.cfg, ctx.number, f"r{ctx.number}/scores")
    trained = current_model(ctx.w, before_round=ctx.number + 1)
    if trained is None or trained.round != ctx.number:
        trained = train(ctx)
    check = recorded_check(ctx.w, ctx.number)
    if check is None:  # judged once: a resumed round keeps the decision it recorded
        check = check_retrained(ctx, model, trained)
    errors = model_errors(ctx, model, new_model(ctx.w, check) or trained)
    trained = screening_model(ctx, check, model)
    metrics = discovery.round_metrics(ctx.w, ctx.cfg, ctx.number, model.sha256, errors)
    metrics.update(
        heldout_mae_previous_mev=check["heldout_mae_previous_mev"],
        heldout_mae_new_mev=check["heldout_mae_new_mev"],
        model_decision=check["decision"],
    )
    metrics["trained_model_sha256"] = trained.sha256
    metrics.update({f"trained_{k}": trained.metrics[k] for k in TRAINING_METRICS if k in trained.metrics})
    ctx.w.append_records("rounds", f"r{ctx.number}", [metrics])
    ctx.executor.round_done(ctx.w, ctx.cfg, ctx.number, metrics, cand)
    ctx.log.info("round %d: %s", ctx.number, metrics)
    return metrics


def run_round_zero(ctx: Round) -> None:
    """The first model, the elemental reference set and the known phases, scored once."""
    w, cfg, log = ctx.w, ctx.cfg, ctx.log
    model = initial_model(ctx)
    refs = reference_phases.reference_set_jobs(w, cfg)
    if refs:
        log.info("reference set %s: %d elemental references", settings_hash(cfg.reference), len(refs))
        reference_stage(ctx, refs, verified=True)
    known = reference_phases.known_phase_jobs(w, cfg)
    if known:
        log.info("known phases: %d to compute with the reference settings", len(known))
        reference_stage(ctx, known, verified=True)
    if 0 not in set(w.rounds()["round"]):
        update_scores(w, cfg, 0, "r0/scores")
        w.append_records(
            "rounds",
            "r0",
            [{**discovery.round_metrics(w, cfg, 0, model.sha256), "trained_model_sha256": model.sha256}],
        )


def initial_model(ctx: Round) -> ModelRecord:
    """Round 0: the configured model, or (cold start) seed reference data and a first MACE."""
    w, cfg = ctx.w, ctx.cfg
    model = current_model(w)
    if model is not None:
        return model
    info = configured_model(cfg.mlip, cfg.chemsys)
    if info is not None:
        return register_model(
            w,
            0,
            list(info.paths),
            n_frames=0,
            source=cfg.mlip.model,  # copied in as models/<sha256>.model: every later load checks that hash
            device=resolve_device(cfg.mlip.device),
            dtype=cfg.mlip.dtype,
        )
    seeds = seed_candidates(cfg)
    add_candidates(w, seeds, 0, "seed")
    reference_phases.add_known_phases(w, cfg)  # computed with the seeds: the first model learns them too
    done = dft_done(w, settings_hash(cfg.reference))
    jobs = [(cid, a) for cid, a in candidate_atoms(w) if cid not in done]
    known = set(w.table("known_phases")["candidate"]) if cfg.known_phases.configured else set()
    ctx.log.info(
        "cold start: %d seed structures with the reference calculator%s",
        len(jobs),
        f" (known phases among them: {sum(cid in known for cid, _ in jobs)})" if known else "",
    )
    reference_stage(ctx, jobs, verified=True)
    reference_stage(ctx, perturbed_seed_jobs(w, cfg), verified=False, static=True)
    return train(ctx)


PACKAGES = ("matdisc", "mace-torch", "torch", "ase", "pymatgen", "gpaw", "prefect", "dask", "zarr")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except Exception:
            out[name] = "not installed"
    return out


def record_run(w: CampaignWriter, cfg: CampaignConfig, orchestrator_run: str = "") -> None:
    reference_set = settings_hash(cfg.reference)
    earlier = w.reference_set()
    w.record_run(
        cfg.model_dump_json(), package_versions(), calculator_parameters(cfg.reference), reference_set, orchestrator_run
    )
    if earlier is not None and earlier != reference_set:
        logging.getLogger(__name__).warning(
            "reference settings changed (%s -> %s): a new reference set starts; earlier DFT energies are kept "
            "but never mixed into its hulls",
            earlier,
            reference_set,
        )
