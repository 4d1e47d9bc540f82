"""Train: the training set (the campaign's reference frames less the held-out set), the next MACE
committee trained on an MLIP worker and registered (:mod:`matdisc.stages.registry`), and how the
model that screened a round did on that round's new DFT structures. Whether the new committee
screens next is :mod:`matdisc.stages.heldout`'s decision."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from ase import Atoms

from matdisc import discovery, jobs
from matdisc.budget import planning
from matdisc.budget.costs import concurrent_members
from matdisc.config import CampaignConfig
from matdisc.dft import settings_hash
from matdisc.errors import StoreError
from matdisc.executor import JobFuture
from matdisc.metrics import energy_mae_mev
from matdisc.mlip import resolve_device
from matdisc.mlip.shipping import unpack
from matdisc.mlip.train import TrainedModel, current_epochs, diverse_frames
from matdisc.stages.context import Round
from matdisc.stages.heldout import evaluate_pair, group_of, groups_of, heldout_structures
from matdisc.stages.registry import ModelRecord, current_model, register_model
from matdisc.store import Campaign
from matdisc.structure_files import labelled_frames


def train(ctx: Round) -> ModelRecord:
    """Train (or fine-tune) the next committee; its held-out errors go to the registry row returned."""
    w, cfg, round_, log = ctx.w, ctx.cfg, ctx.number, ctx.log
    frames, groups = training_set(w, cfg)
    previous = current_model(w, before_round=round_ + 1)
    start = previous.paths if previous is not None and cfg.mlip.training.start_from == "previous" else None
    if start:
        ctx.check_trusted(start)
    log.info(
        "training MACE (%d members, %s) on %d reference frames",
        cfg.mlip.ensemble,
        "fine-tuning " + previous.sha256[:12] if start and previous else "from scratch",
        len(frames),
    )
    rates = ctx.rates()
    device = resolve_device(cfg.mlip.device)
    sized = cfg.mlip.training.sized(device)
    epochs = int((sized.finetune_epochs if start else sized.max_num_epochs) or 0)
    frame_atoms = float(sum(len(a) for a in frames))
    predicted = ctx.run.first_mlip(planning.train_cost(frame_atoms, cfg, rates, planning.workers(cfg), epochs), rates)
    t0 = time.perf_counter()
    fut = ctx.executor.submit(
        jobs.train,
        frames,
        groups,
        str(w.path / "training" / f"r{round_}"),
        cfg.mlip.training.model_dump(mode="json"),
        cfg.mlip.ensemble,
        cfg.generation.seed + 100 * round_,
        cfg.mlip.device,
        cfg.mlip.dtype,
        start,
        ctx.remote,
        resource="mlip",
    )
    try:
        trained: list[TrainedModel] = await_training(
            ctx, fut, w.path / "training" / f"r{round_}", epochs, predicted.wall_s
        )
    except ctx.executor.fatal:  # the engine is gone: the run stops, a rerun trains again
        raise
    except Exception as err:  # a failed training is recorded, and the round goes on with the committee it has
        return training_failed(ctx, previous, err)
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
    ctx.executor.trained(cfg, round_, trained)
    log.info(
        "trained (kept epochs %s of %d, the best on validation): %s",
        [m.kept_epoch for m in trained],
        trained[0].epochs,
        ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
    )
    paths = unpack(trained, w.path / "training" / f"r{round_}-shipped")
    return register_model(
        w,
        round_,
        paths,
        n_frames=len(frames),
        source="trained",
        device=device,
        dtype=cfg.mlip.dtype,
        mode=trained[0].mode,
        metrics=metrics,
        heldout_fraction=cfg.mlip.training.heldout_fraction,
        data_round=round_,
    )


#: How often the orchestrator looks at the members' epochs, and the least time between two log lines.
EPOCH_POLL_S = 2.0
EPOCH_LOG_S = 15.0


def await_training(
    ctx: Round, fut: JobFuture[list[TrainedModel]], workdir: Path, epochs: int, expected_s: float | None = None
) -> list[TrainedModel]:
    """The trained committee, and while it trains, its epochs as a count with the time left (log
    lines at most every ``EPOCH_LOG_S`` and the stage's progress; before the first epoch the time
    left is the cost model's ``expected_s``). The epochs are read
    from mace's results files in the training directory, so they show where the orchestrator sees
    that directory (one machine, or a shared filesystem); elsewhere the stage says only when it ends."""
    members = ctx.cfg.mlip.ensemble
    total = members * max(epochs, 1)
    progress = ctx.executor.progress(ctx.cfg, ctx.number, "MACE training epochs", total, expected_s)
    logged = time.monotonic()
    while True:
        try:
            trained = fut.result(timeout=EPOCH_POLL_S)
        except TimeoutError:
            pass
        else:  # every member ran its epochs (or stopped early, which mace decides)
            progress.advance(total - progress.done)
            return trained
        # an epoch in progress is not finished: a member in epoch e has finished e - 1
        done = min(total, sum(max(e - 1, 0) for e in current_epochs(workdir).values()))
        if done > progress.done:
            progress.advance(done - progress.done)
            if time.monotonic() - logged >= EPOCH_LOG_S:
                logged = time.monotonic()
                ctx.log.info("training %d members: epochs %s", members, progress.text())


def training_failed(ctx: Round, previous: ModelRecord | None, err: BaseException) -> ModelRecord:
    """Record why training failed and register the previous committee again for the round
    (``source: training_failed``): the round completes with the model it screened with, a resumed
    run does not fail on the same training again, and the next round trains with more data."""
    w, round_ = ctx.w, ctx.number
    reason = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    w.append_records(
        "training_failures",
        f"r{round_}/training-failed/{time.time_ns()}",
        [{"round": round_, "reason": reason, "time": time.time()}],
    )
    ctx.log.warning("round %d: training failed (%s); the previous committee screens the next round", round_, reason)
    if previous is None:  # nothing to go on with (a cold start's first training): the run stops here
        raise err
    return register_model(
        w,
        round_,
        previous.paths,
        n_frames=previous.n_train_frames,
        source="training_failed",
        device=resolve_device(ctx.cfg.mlip.device),
        dtype=ctx.cfg.mlip.dtype,
        mode=previous.mode,
        metrics=previous.metrics,
        key=f"r{round_}/model-untrained",
        heldout_fraction=previous.heldout_fraction,
        data_round=previous.data_round,
    )


def model_errors(ctx: Round, screened: ModelRecord, trained: ModelRecord) -> dict:
    """MLIP energy MAE on the round's new DFT structures, by the screening and the retrained model."""
    frames = discovery.new_reference_frames(ctx.w, ctx.number)
    if not frames:
        return {}
    before, after = evaluate_pair(ctx, screened, trained, frames)
    ref = [a.info["REF_energy"] / len(a) for a in frames]
    return {"mae_before_mev": energy_mae_mev(before, ref), "mae_after_mev": energy_mae_mev(after, ref)}


def training_set(w: Campaign, cfg: CampaignConfig) -> tuple[list[Atoms], list[str]]:
    """Reference frames with the current settings, labelled for MACE, grouped by structure.

    ``mlip.training.frames``: ``all`` frames of every calculation, or ``diverse``: at most
    ``frames_per_structure`` per calculation, spread over its energies and forces. The
    groups keep all frames of one structure on one side of the train/validation split.
    ``mlip.training.extra_data``'s frames come last, each its own group, with their weight.
    """
    extra = cfg.mlip.training.extra_data
    added = labelled_frames(extra.file, extra.weight, cfg.chemsys) if extra is not None else []
    added_groups = [f"extra:{i}" for i in range(len(added))]
    table = w.table("frames")
    if table.empty:
        return added, added_groups
    tc = cfg.mlip.training
    settings = settings_hash(cfg.reference)
    usable = np.flatnonzero((table["settings_hash"] == settings).to_numpy() & np.isfinite(table["energy"].to_numpy()))
    held = heldout_structures(w, cfg)
    if held:  # never trained on: the fixed set a new committee is judged on
        usable = usable[~np.isin(groups_of(table["id"].to_numpy()[usable]), list(held))]
    # by structure id, each calculation's frames in trajectory order: the training set (and so the
    # model) must not depend on the order calculations happened to finish, or a resumed campaign
    # would train a different model than an uninterrupted one
    usable = usable[np.argsort(table["id"].to_numpy()[usable], kind="stable")]
    frames = w.frames("frames")

    def forces(i: int) -> np.ndarray:
        f = frames.forces_of(i)
        if f is None:  # every training frame is stored with its forces
            raise StoreError(f"{w.location}: training frames are stored without forces")
        return f

    if tc.frames == "diverse":
        by_id: dict[str, list[int]] = {}
        for i in usable:
            by_id.setdefault(table["id"].iloc[i], []).append(int(i))
        keep, n_atoms, energy = [], frames.n_atoms, table["energy"].to_numpy()
        for rows in by_id.values():
            e = energy[rows] / n_atoms[rows]
            fmax = np.array([np.linalg.norm(forces(i), axis=1).max() for i in rows])
            keep += [rows[j] for j in diverse_frames(e, fmax, tc.frames_per_structure)]
        usable = np.array(keep, dtype=int)
    out, groups = [], []
    records = table.to_dict("records")
    for k in map(int, usable):
        row = records[k]
        a = frames.atoms(k)
        a.info["REF_energy"] = float(row["energy"])
        a.arrays["REF_forces"] = forces(k).astype(float)
        if np.all(np.isfinite(row["stress"])):
            a.info["REF_stress"] = np.asarray(row["stress"], dtype=float)
        out.append(a)
        groups.append(group_of(row["id"]))
    return out + added, groups + added_groups
