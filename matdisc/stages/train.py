"""Train: the next MACE committee from the campaign's reference frames, on an MLIP worker; and
how the model that screened a round did on that round's new DFT structures."""

from __future__ import annotations

import time

from matdisc import discovery, jobs, loop, planning
from matdisc.costs import concurrent_members
from matdisc.metrics import energy_mae_mev
from matdisc.mlip import resolve_device
from matdisc.mlip.shipping import unpack
from matdisc.mlip.train import TrainedModel
from matdisc.stages.context import Round


def train(ctx: Round) -> dict:
    """Train (or fine-tune) the next committee; its held-out errors go to the registry row returned."""
    w, cfg, round_, log = ctx.w, ctx.cfg, ctx.number, ctx.log
    frames, groups = loop.training_set(w, cfg)
    previous = loop.current_model(w, before_round=round_ + 1)
    start = previous["paths"] if previous is not None and cfg.mlip.training.start_from == "previous" else None
    if start:
        ctx.check_trusted(start)
    log.info(
        "training MACE (%d members, %s) on %d reference frames",
        cfg.mlip.ensemble,
        "fine-tuning " + previous["sha256"][:12] if start else "from scratch",
        len(frames),
    )
    rates = ctx.rates()
    device = resolve_device(cfg.mlip.device)
    sized = cfg.mlip.training.sized(device)
    epochs = int(sized.finetune_epochs if start else sized.max_num_epochs)
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
    ctx.executor.trained(cfg, round_, trained)
    log.info("trained: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    paths = unpack(trained, w.path / "training" / f"r{round_}-shipped")
    return loop.register_model(
        w,
        round_,
        paths,
        n_frames=len(frames),
        source="trained",
        device=device,
        dtype=cfg.mlip.dtype,
        mode=trained[0].mode,
        metrics=metrics,
    )


def model_errors(ctx: Round, screened: dict, trained: dict) -> dict:
    """MLIP energy MAE on the round's new DFT structures, by the screening and the retrained model."""
    frames = discovery.new_reference_frames(ctx.w, ctx.number)
    if not frames:
        return {}
    ctx.check_trusted(screened["paths"] + trained["paths"])
    cfg = ctx.cfg
    fut = ctx.executor.submit(
        jobs.evaluate,
        [screened["paths"], trained["paths"]],
        frames,
        cfg.mlip.device,
        cfg.mlip.dtype,
        ctx.remote,
        resource="mlip",
    )
    before, after = fut.result()
    ref = [a.info["REF_energy"] / len(a) for a in frames]
    return {"mae_before_mev": energy_mae_mev(before, ref), "mae_after_mev": energy_mae_mev(after, ref)}
