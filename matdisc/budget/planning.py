"""What a campaign will cost, round by round, before it runs (``matdisc plan``), and what it has spent.

A plan generates the next round's candidates for real (cheap) and prices every stage with the
cost forms of :mod:`matdisc.budget.costs`: the rates come from the store's own records when it has
any (:func:`matdisc.budget.costs.calibrate`), else from a probe of this machine (:mod:`matdisc.budget.probe`),
else from priors. The flow uses the same functions to record each stage's predicted cost beside
its actual one, and to keep a campaign inside its budget.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from ase import Atoms

from matdisc.budget.costs import (
    Rates,
    calibrate,
    concurrent_members,
    dft_seconds,
    dft_work,
    reference_cores,
    relax_tasks,
    relax_work,
    scf_cycles,
    stage_wall,
    train_member_seconds,
)
from matdisc.config import CampaignConfig, ReferenceConfig
from matdisc.store.rows import StageRun

__all__ = [
    "Plan",
    "RoundPlan",
    "StageCost",
    "Workers",
    "affordable",
    "budget_status",
    "budget_stop_reason",
    "campaign_rates",
    "dft_cost",
    "dft_seconds",
    "dft_work",
    "epochs_for",
    "plan_campaign",
    "record_stage",
    "relax_cost",
    "remaining_dft_seconds",
    "round_costs",
    "spent",
    "train_cost",
    "workers",
]


@dataclass
class StageCost:
    """One stage of one round: jobs, work (units of its cost form), compute and wall seconds."""

    jobs: int = 0
    work: float = 0.0
    compute_s: float = 0.0
    wall_s: float = 0.0
    start_s: float = 0.0  # of wall_s: fresh workers importing their libraries

    def started(self, seconds: float) -> StageCost:
        """This stage as the first of a flow run on its workers: their start-up adds to the wall."""
        return replace(self, wall_s=self.wall_s + seconds, start_s=self.start_s + seconds)


@dataclass
class RoundPlan:
    round: int
    candidates: int  # new candidates this round
    relaxations: int
    dft_calcs: int
    train_frames: int
    stages: dict[str, StageCost] = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return sum(s.wall_s for s in self.stages.values())


@dataclass
class Workers:
    """Where the stages run: MLIP workers (one task each), DFT workers, cores of an MLIP worker."""

    mlip: int
    dft: int
    mlip_cores: int
    assumed: bool = False  # a remote scheduler: counts taken from the config, not seen


def workers(cfg: CampaignConfig) -> Workers:
    c = cfg.compute
    cores = os.cpu_count() or 1
    if c.scheduler == "slurm":
        per_job = max(1, c.slurm.cores // c.threads_per_dft_worker)
        return Workers(
            mlip=max(1, c.slurm.mlip_jobs), dft=max(1, c.slurm.dft_jobs * per_job), mlip_cores=c.slurm.mlip_cores
        )
    if c.scheduler == "local":
        n_mlip = c.mlip_workers
        return Workers(
            mlip=n_mlip, dft=c.dft_workers or max(1, (cores - n_mlip) // c.threads_per_dft_worker), mlip_cores=cores
        )
    return Workers(mlip=c.mlip_workers, dft=c.dft_workers or 1, mlip_cores=cores, assumed=True)


# -- stage predictions (shared with the flow) ---------------------------------------------------
def relax_cost(
    n_atoms: Sequence[int],
    cfg: CampaignConfig,
    rates: Rates,
    w: Workers,
    steps: Sequence[float] | None = None,
    *,
    kinds_from: int | None = None,
) -> StageCost:
    """MLIP relaxations of structures of ``n_atoms``, ``steps`` FIRE steps each (default: the mean).
    ``kinds_from``: the structures from this index on are another kind of job (rescores), which
    the stage puts in tasks of their own, as it runs them."""
    steps = [rates.mlip_steps] * len(n_atoms) if steps is None else steps
    cut = len(n_atoms) if kinds_from is None else kinds_from
    size = cfg.mlip.structures_per_task
    jobs = relax_tasks(n_atoms[:cut], size, rates, steps[:cut]) + relax_tasks(n_atoms[cut:], size, rates, steps[cut:])
    return StageCost(len(jobs), sum(relax_work(n_atoms, rates, steps)), sum(jobs), stage_wall(jobs, w.mlip, rates))


def dft_cost(
    atoms: Sequence[Atoms],
    cfg: CampaignConfig,
    rates: Rates,
    w: Workers,
    steps: float | None,
    ref: ReferenceConfig | None = None,
) -> StageCost:
    """Reference calculations of ``atoms``: relaxations of ``steps`` ionic steps, or statics (None),
    with the configured reference settings or ``ref`` (a screen's)."""
    ref = ref or cfg.reference
    jobs = [dft_seconds(a, ref, rates, steps) for a in atoms]
    work = sum(dft_work(a, ref) * scf_cycles(steps) for a in atoms)
    return StageCost(len(jobs), work, sum(jobs), stage_wall(jobs, w.dft, rates))


def epochs_for(cfg: CampaignConfig, round_: int, device: str) -> int:
    """Epochs of the round's training: rounds after the first fine-tune the screening model."""
    t = cfg.mlip.training.sized(device)
    epochs = t.finetune_epochs if round_ >= 1 and t.start_from == "previous" else t.max_num_epochs
    assert epochs is not None  # sized() fills every size field
    return int(epochs)


def member_atoms(frame_atoms: float, cfg: CampaignConfig) -> float:
    """Frame atoms one committee member trains on (validation split off, then its subsample)."""
    t = cfg.mlip.training
    return frame_atoms * (1 - t.valid_fraction) * t.subsample


def train_cost(frame_atoms: float, cfg: CampaignConfig, rates: Rates, w: Workers, epochs: int) -> StageCost:
    size = cfg.mlip.ensemble
    member = train_member_seconds(member_atoms(frame_atoms, cfg), epochs, rates)
    waves = math.ceil(size / concurrent_members(size, w.mlip_cores))
    return StageCost(size, size * member_atoms(frame_atoms, cfg) * epochs, size * member, waves * member + rates.task_s)


# -- rates for a campaign ------------------------------------------------------------------------
def campaign_rates(cfg: CampaignConfig, store=None) -> tuple[Rates, dict[str, Any]]:
    """Cached probe rates (else priors), refitted on the store's records when there are any."""
    from matdisc.budget.probe import cached_rates

    cached = cached_rates(cfg)
    rates, memory = cached if cached is not None else (Rates(), {})
    if store is not None:
        rates = calibrate(
            rates, store.table("costs"), store.table("mlip"), store.table("dft"), store.table("generation")
        )
    return rates, memory


# -- the plan ------------------------------------------------------------------------------------
@dataclass
class Plan:
    campaign: str
    rounds: list[RoundPlan]
    rates: Rates
    workers: Workers
    memory: dict[str, float]
    budget: dict[str, Any]
    cores_per_dft: int = 1

    def totals(self) -> dict[str, float]:
        stages: dict[str, dict[str, float]] = {}
        for r in self.rounds:
            for name, s in r.stages.items():
                agg = stages.setdefault(name, {"compute_s": 0.0, "wall_s": 0.0})
                agg["compute_s"] += s.compute_s
                agg["wall_s"] += s.wall_s
        return {
            "wall_s": sum(r.wall_s for r in self.rounds),
            "stages": stages,  # type: ignore[dict-item]
            **planned_usage(self.rounds, self.cores_per_dft),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "campaign": self.campaign,
            "rounds": [
                {
                    **{k: v for k, v in asdict(r).items() if k != "stages"},
                    "wall_s": r.wall_s,
                    "stages": {k: asdict(s) for k, s in r.stages.items()},
                }
                for r in self.rounds
            ],
            "total": self.totals(),
            "peak_memory_gb": self.memory,
            "workers": asdict(self.workers),
            "rates": {k: v for k, v in self.rates.as_dict().items() if k != "source"},
            "rate_sources": {k: self.rates.origin(k) for k in self.rates.as_dict() if k != "source"},
            "budget": self.budget,
        }


def planned_usage(rounds: Sequence[RoundPlan], cores_per_dft: int) -> dict[str, float]:
    """Budget units of planned rounds: DFT CPU-hours, MLIP worker hours, wall hours."""
    dft = sum(r.stages["dft"].compute_s for r in rounds if "dft" in r.stages)
    mlip = sum(r.stages[s].compute_s for r in rounds for s in ("relax", "train") if s in r.stages)
    return {
        "dft_cpu_hours": dft * cores_per_dft / 3600,
        "gpu_hours": mlip / 3600,
        "wall_hours": sum(r.wall_s for r in rounds) / 3600,
    }


# the table each stage records its calculations in, one row per structure with its ``walltime_s``
STAGE_RECORDS = {"dft": "dft", "screen": "screening", "relax": "mlip"}


def spent(store, cfg: CampaignConfig) -> dict[str, float]:
    """What a campaign has used so far (same units as :func:`planned_usage`).

    From its ``costs`` records; a stage killed before it recorded its cost (flow process or
    server gone) left its finished calculations in their tables, so per round and stage the
    larger of the two counts: the rerun's cost row covers only what the rerun computed.
    """
    if store is None:
        return {"dft_cpu_hours": 0.0, "gpu_hours": 0.0, "wall_hours": 0.0}
    costs = store.table("costs")
    actual = costs.groupby(["round", "stage"])["actual_s"].sum().to_dict()
    for stage, table in STAGE_RECORDS.items():
        rows = store.table(table)
        if rows.empty:
            continue
        for round_, seconds in rows.groupby("round")["walltime_s"].sum().items():
            key = (int(round_), stage)
            actual[key] = max(actual.get(key, 0.0), float(seconds))
    dft = sum(v for (_, stage), v in actual.items() if stage in ("dft", "screen"))
    mlip = sum(v for (_, stage), v in actual.items() if stage in ("relax", "train"))
    wall = float(costs["wall_s"].sum())
    return {
        "dft_cpu_hours": float(dft) * reference_cores(cfg) / 3600,
        "gpu_hours": float(mlip) / 3600,
        "wall_hours": wall / 3600,
    }


def budget_status(cfg: CampaignConfig, store, planned: dict[str, float] | None = None) -> dict[str, Any]:
    """Per budgeted resource: limit, spent, remaining, and (for a plan) what the plan needs."""
    used = spent(store, cfg)
    out: dict[str, Any] = {}
    for name, limit in cfg.budget.limits().items():
        row = {
            "limit": limit,
            "spent": used[name],
            "remaining": None if limit is None else max(0.0, limit - used[name]),
        }
        if planned is not None:
            row["planned"] = planned[name]
            row["fits"] = limit is None or used[name] + planned[name] <= limit
        out[name] = row
    return out


# -- what the flow records and how a budget is kept ----------------------------------------------
def record_stage(
    w,
    round_: int,
    stage: str,
    predicted: StageCost | None,
    job_seconds: Sequence[float],
    work: float,
    wall_s: float,
    n_workers: int,
) -> None:
    """One stage run's predicted and actual cost (table ``costs``; a resumed stage adds another row)."""
    import uuid

    from matdisc.budget.costs import makespan

    if not job_seconds:
        return
    nan = float("nan")
    row = StageRun(
        round=round_,
        stage=stage,
        jobs=len(job_seconds),
        work=float(work),
        workers=n_workers,
        predicted_s=predicted.compute_s if predicted else nan,
        predicted_wall_s=predicted.wall_s if predicted else nan,
        actual_s=float(sum(job_seconds)),
        wall_s=float(wall_s),
        ideal_wall_s=makespan(job_seconds, n_workers),
        start_s=predicted.start_s if predicted else 0.0,
        recorded=time.time(),
    )
    w.append_rows("costs", f"r{round_}/{stage}/{uuid.uuid4().hex[:12]}", [row])


def round_costs(store) -> pd.DataFrame:
    """Predicted vs actual seconds per round and stage (resumed stages summed)."""
    costs = store.table("costs") if store is not None else pd.DataFrame()
    if costs.empty:
        return pd.DataFrame(
            columns=["round", "stage", "jobs", "predicted_s", "actual_s", "predicted_wall_s", "wall_s", "ratio"]
        )
    agg = (
        costs.groupby(["round", "stage"], sort=True)[["jobs", "predicted_s", "actual_s", "predicted_wall_s", "wall_s"]]
        .sum(min_count=1)
        .reset_index()
    )
    agg["ratio"] = agg["predicted_s"] / agg["actual_s"]
    return agg


def affordable(costs_s: Sequence[float], remaining_s: float | None) -> int:
    """How many of the ranked picks fit: the longest prefix whose predicted cost fits what is left."""
    if remaining_s is None:
        return len(costs_s)
    total, n = 0.0, 0
    for c in costs_s:
        if total + c > remaining_s:
            break
        total, n = total + c, n + 1
    return n


def remaining_dft_seconds(cfg: CampaignConfig, store) -> float | None:
    """Seconds of reference calculation the budgets still allow (None: no DFT or wall budget)."""
    b = budget_status(cfg, store)
    left = []
    if b["dft_cpu_hours"]["remaining"] is not None:
        left.append(b["dft_cpu_hours"]["remaining"] * 3600 / reference_cores(cfg))
    if b["wall_hours"]["remaining"] is not None:  # calculations run side by side on the DFT workers
        left.append(b["wall_hours"]["remaining"] * 3600 * workers(cfg).dft)
    return min(left) if left else None


def budget_stop_reason(cfg: CampaignConfig, store) -> str | None:
    """Why the budgets stop the campaign now (None: something is left of each)."""
    for name, row in budget_status(cfg, store).items():
        if row["limit"] is not None and row["remaining"] <= 0:
            return f"budget.{name} spent: {row['spent']:.4g} of {row['limit']:.4g} h"
    return None


def _n_atoms(store) -> list[int]:
    """Atoms of each stored candidate (the latest row per id, as the flow relaxes them)."""
    if store is None or "candidates" not in store.tables.tables():
        return []
    sizes = np.diff(store.frames("candidates").offsets).astype(int)
    last = {cid: n for cid, n in zip(store.table("candidates")["id"], sizes)}
    return list(last.values())


def _unverified(store, cfg: CampaignConfig) -> list[Atoms]:
    from matdisc.dft import settings_hash
    from matdisc.stages.generate import candidate_atoms
    from matdisc.stages.verify import dft_done

    if store is None or "candidates" not in store.tables.tables():
        return []
    done = dft_done(store, settings_hash(cfg.reference))
    return [a for cid, a in candidate_atoms(store) if cid not in done]


def _perturbed(seeds: Sequence[Atoms], cfg: CampaignConfig) -> list[Atoms]:
    """The cold start's rattled statics: priced as such, their broken symmetry leaves more k-points."""
    from matdisc.dft import perturbed_copies

    cs = cfg.mlip.cold_start
    return [
        c
        for a in seeds
        for c in perturbed_copies(a, cs.perturbed_per_structure, rattle=cs.rattle_stdev, strain=cs.strain, seed=0)
    ]


def _frame_atoms(store) -> float:
    if store is None or "frames" not in store.tables.tables():
        return 0.0
    return float(store.frames("frames").offsets[-1])


def _quantile_sample(atoms: Sequence[Atoms], n: int, key) -> list[Atoms]:
    """``n`` structures spread evenly over the cost order: the picks are not known before the round."""
    if not atoms or n <= 0:
        return []
    ordered = sorted(atoms, key=key)
    idx = np.linspace(0, len(ordered) - 1, n).round().astype(int)
    return [ordered[i] for i in idx]


def _training_frames_per_calc(cfg: CampaignConfig, steps: float) -> float:
    t = cfg.mlip.training
    frames = steps + 1
    return min(frames, t.frames_per_structure) if t.frames == "diverse" else frames


def plan_campaign(
    cfg: CampaignConfig,
    store=None,
    *,
    rounds: int | None = None,
    rates: Rates | None = None,
    memory: dict[str, float] | None = None,
    log=lambda msg: None,
) -> Plan:
    """Price every round the campaign has still to run (``rounds``: total rounds, default the config's)."""
    from matdisc.generate import generate
    from matdisc.mlip import resolve_device
    from matdisc.stages.generate import seed_candidates, stored_by_key, verified_hits

    if rates is None:
        rates, memory = campaign_rates(cfg, store)
    device = resolve_device(cfg.mlip.device)
    w = workers(cfg)
    al = cfg.active_learning
    done = set(store.rounds()["round"]) if store is not None else set()
    n_atoms = _n_atoms(store)
    frame_atoms = _frame_atoms(store)
    used_calls = int(len(store.table("selections"))) if store is not None else 0
    out: list[RoundPlan] = []
    mlip_fresh = True  # the plan is one flow run: its first MLIP stage starts the workers
    if 0 not in done and (store is None or store.models().empty) and cfg.mlip.is_cold_start:
        seeds = [c.structure.to_ase_atoms() for c in seed_candidates(cfg)]
        statics = len(seeds) * cfg.mlip.cold_start.perturbed_per_structure
        seed_cost = dft_cost(seeds, cfg, rates, w, rates.seed_steps)
        static_cost = dft_cost(_perturbed(seeds, cfg), cfg, rates, w, None)
        frame_atoms += sum(len(a) for a in seeds) * (rates.seed_steps + 1 + cfg.mlip.cold_start.perturbed_per_structure)
        dft = StageCost(
            seed_cost.jobs + static_cost.jobs,
            seed_cost.work + static_cost.work,
            seed_cost.compute_s + static_cost.compute_s,
            seed_cost.wall_s + static_cost.wall_s,
        )
        train = train_cost(frame_atoms, cfg, rates, w, epochs_for(cfg, 0, device)).started(rates.mlip_start_s)
        mlip_fresh = False
        out.append(
            RoundPlan(
                0,
                len(seeds),
                0,
                len(seeds) + statics,
                int(len(seeds) * (rates.seed_steps + 1) + statics),
                {"dft": dft, "train": train},
            )
        )
        n_atoms += [len(a) for a in seeds]
    total = rounds if rounds is not None else al.rounds
    generated: tuple[list[Atoms], float, int] | None = None
    pool = _unverified(store, cfg)  # what acquisition picks from: every candidate without a reference result
    for r in range(1, total + 1):
        if r in done:
            continue
        if generated is None:  # the next round's generation, for real; later rounds: its repeatable sources
            existing = stored_by_key(store) if store is not None else (lambda keys: {})
            hits = verified_hits(store) if store is not None and cfg.generation.substitution.from_hits else []
            # twice: the first call in a process pays for imports and tables (~10 s), which a
            # round's generation pays only when it is the first in its process
            for _ in range(2):
                t0 = time.perf_counter()
                cands, _, report = generate(cfg.chemsys, cfg.generation, round_=r, existing_by_key=existing, hits=hits)
                seconds = time.perf_counter() - t0
            atoms = [c.structure.to_ase_atoms() for c in cands]
            again = sum(n for src, n in report.new.items() if src != "prototype")
            generated = (atoms, seconds, again)
            log(f"round {r}: {len(cands)} new candidates generated in {seconds:.1f} s")
            new = atoms
        else:
            new = generated[0][: generated[2]] if generated[2] else []
        n_atoms += [len(a) for a in new]
        pool += new
        picks = min(al.dft_budget, len(n_atoms))
        if al.max_dft_total is not None:
            picks = max(0, min(picks, al.max_dft_total - used_calls))
        used_calls += picks
        sample = _quantile_sample(pool, picks, key=lambda a: dft_work(a, cfg.reference))
        pool = [a for a in pool if not any(a is s for s in sample)]
        frames_new = picks * _training_frames_per_calc(cfg, rates.dft_steps)
        frame_atoms += frames_new * (np.mean([len(a) for a in sample]) if sample else 0.0)
        stages = {
            "generate": StageCost(1, 0.0, generated[1] + rates.store_write_s, generated[1] + rates.store_write_s),
            "relax": relax_cost(n_atoms, cfg, rates, w).started(rates.mlip_start_s if mlip_fresh else 0.0),
            "dft": dft_cost(sample, cfg, rates, w, rates.dft_steps),
            "train": train_cost(frame_atoms, cfg, rates, w, epochs_for(cfg, r, device)),
        }
        mlip_fresh = False
        out.append(RoundPlan(r, len(new), len(n_atoms), picks, int(frames_new), stages))
    cores = reference_cores(cfg)
    mem = _memory(cfg, generated[0] if generated else [], memory or {})
    plan = Plan(cfg.name, out, rates, w, mem, {}, cores_per_dft=cores)
    plan.budget = budget_status(cfg, store, planned_usage(out, cores))
    return plan


def _memory(cfg: CampaignConfig, atoms: Sequence[Atoms], probed: dict[str, float]) -> dict[str, float]:
    """Peak memory per worker (GB). MLIP: the probe's base plus its per-atom growth times a full
    batch; DFT (GPAW): 16-byte plane-wave coefficients × k-points × bands × spin, ×3 for work
    arrays, over a 0.3 GB process; any other calculator: the process."""
    from matdisc.budget.costs import bands, gpaw_kpoints, planewaves, spin_polarised
    from matdisc.mlip.batched import CPU_BATCH_ATOMS

    gb = 1024**3
    batch = cfg.mlip.batch_atoms or CPU_BATCH_ATOMS
    out = {}
    if probed:
        out["mlip_worker"] = (probed.get("mlip_base_bytes", 0.0) + probed.get("mlip_bytes_per_atom", 0.0) * batch) / gb
    ref = cfg.reference.resolved()
    dft = 0.3
    if ref.calculator == "gpaw" and atoms:
        for a in atoms:
            spin = spin_polarised(a, ref)
            coefficients = gpaw_kpoints(a, ref) * bands(a, spin) * planewaves(a, ref) * (2 if spin else 1)
            dft = max(dft, 0.3 + 3 * 16 * coefficients / gb)
    out["dft_worker"] = dft
    return out
