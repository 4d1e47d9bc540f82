"""Train: the training set (the campaign's reference frames), the next MACE committee trained on
an MLIP worker, the model registry it is recorded in, and how the model that screened a round
did on that round's new DFT structures."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from matdisc import discovery, jobs
from matdisc.budget import planning
from matdisc.budget.costs import concurrent_members
from matdisc.config import CampaignConfig
from matdisc.dft import settings_hash
from matdisc.errors import StoreError
from matdisc.metrics import energy_mae_mev
from matdisc.mlip import resolve_device
from matdisc.mlip.model import describe, file_sha256
from matdisc.mlip.shipping import unpack
from matdisc.mlip.train import TrainedModel, diverse_frames
from matdisc.stages.context import Round
from matdisc.store import Campaign, CampaignWriter, schema


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


def model_errors(ctx: Round, screened: ModelRecord, trained: ModelRecord) -> dict:
    """MLIP energy MAE on the round's new DFT structures, by the screening and the retrained model."""
    frames = discovery.new_reference_frames(ctx.w, ctx.number)
    if not frames:
        return {}
    ctx.check_trusted(screened.paths + trained.paths)
    cfg = ctx.cfg
    fut = ctx.executor.submit(
        jobs.evaluate,
        [screened.paths, trained.paths],
        frames,
        cfg.mlip.device,
        cfg.mlip.dtype,
        ctx.remote,
        resource="mlip",
    )
    before, after = fut.result()
    ref = [a.info["REF_energy"] / len(a) for a in frames]
    return {"mae_before_mev": energy_mae_mev(before, ref), "mae_after_mev": energy_mae_mev(after, ref)}


@dataclass(frozen=True)
class ModelRecord:
    """A committee in the model registry (table ``models``): its files, where it came from, and
    the mean held-out errors of its members (``metrics``; empty for a configured model)."""

    round: int
    sha256: str
    paths: list[str]
    source: str
    mode: str
    n_train_frames: int
    metrics: dict[str, float]
    #: the campaign data it saw: frames through ``data_round`` (-1: none, a configured model) except
    #: the held-out share ``heldout_fraction`` of the structures verified in rounds >= 1
    heldout_fraction: float = 0.0
    data_round: int = -1

    @classmethod
    def from_row(cls, row: dict[str, Any], store: Path) -> ModelRecord:
        fixed = set(schema.TABLES["models"].columns) - set(METRICS)
        metrics = {k: float(v) for k, v in row.items() if k not in fixed and isinstance(v, float) and np.isfinite(v)}
        return cls(
            round=int(row["round"]),
            sha256=str(row["sha256"]),
            paths=[str(store / p) if not Path(p).is_absolute() else p for p in json.loads(row["paths"])],
            source=str(row["source"]),
            mode=str(row["mode"]),
            n_train_frames=int(row["n_train_frames"]),
            metrics=metrics,
            heldout_fraction=float(row["heldout_fraction"]),
            data_round=int(row["data_round"]),
        )


#: Held-out errors training reports per member (the registry keeps their committee means).
METRICS = ("energy_rmse_per_atom", "energy_mae_per_atom", "forces_rmse", "forces_mae")


def current_model(w: Campaign, before_round: int | None = None) -> ModelRecord | None:
    """The latest registered model (or the latest registered before ``before_round``)."""
    models = w.models()
    if before_round is not None:
        models = models[models["round"] < before_round]
    if models.empty:
        return None
    return ModelRecord.from_row(models.iloc[-1].to_dict(), Path(w.path))


def register_model(
    w: CampaignWriter,
    round_: int,
    paths: Sequence[Path | str],
    *,
    n_frames: int,
    source: str,
    copy: bool = True,
    device: str = "cpu",
    dtype: str = "float64",
    mode: str = "",
    metrics: dict[str, float] | None = None,
    key: str | None = None,
    heldout_fraction: float = 0.0,
    data_round: int = -1,
) -> ModelRecord:
    """Record a model (committee) in the registry; trained files are copied into ``models/``.

    A row holds what every result needs to name its model: sha256 (of the committee),
    member hashes, dtype, device, r_max, elements; trained models add the training mode
    (scratch / naive / multihead fine-tuning) and held-out energy/force errors.
    """
    stored = []
    for p in paths:
        if copy:
            dest = w.path / "models" / f"{file_sha256(p)}.model"
            if not dest.exists():  # copy, then rename: a killed copy never sits under the final name
                tmp = dest.with_name(dest.name + ".partial")  # removed by the next writer if left
                shutil.copyfile(p, tmp)
                os.replace(tmp, dest)
            stored.append(str(dest.relative_to(w.path)))
        else:
            stored.append(str(Path(p).resolve()))
    abs_paths = [str(w.path / s) if copy else s for s in stored]
    info = describe(abs_paths, device=device, dtype=dtype)
    metric_cols = {k: float(v) for k, v in (metrics or {}).items()}
    w.append_records(
        "models",
        key or f"r{round_}/model",
        [
            {
                "round": round_,
                "sha256": info.sha256,
                "paths": stored,
                "members": list(info.members),
                "n_train_frames": n_frames,
                "source": source,
                "mode": mode,
                "device": device,
                "dtype": dtype,
                "r_max": info.r_max,
                "elements": list(info.elements),
                "heldout_fraction": heldout_fraction,
                "data_round": data_round,
                **metric_cols,
            }
        ],
    )
    model = current_model(w)
    assert model is not None  # just registered
    return model


def training_set(w: Campaign, cfg: CampaignConfig) -> tuple[list[Atoms], list[str]]:
    """Reference frames with the current settings, labelled for MACE, grouped by structure.

    ``mlip.training.frames``: ``all`` frames of every calculation, or ``diverse``: at most
    ``frames_per_structure`` per calculation, spread over its energies and forces. The
    groups keep all frames of one structure on one side of the train/validation split.
    """
    table = w.table("frames")
    if table.empty:
        return [], []
    tc = cfg.mlip.training
    settings = settings_hash(cfg.reference)
    usable = np.flatnonzero((table["settings_hash"] == settings).to_numpy() & np.isfinite(table["energy"].to_numpy()))
    held = heldout_structures(w, cfg)
    if held:  # never trained on: the fixed set a new committee is judged on
        usable = usable[~np.isin(_groups(table["id"].to_numpy()[usable]), list(held))]
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
        groups.append(_group(row["id"]))
    return out, groups


def _group(cid: str) -> str:
    """The structure a frame belongs to: perturbed copies (``ID-pK``) stay with their parent."""
    return re.sub(r"-p\d+$", "", cid)


def _groups(ids: np.ndarray) -> np.ndarray:
    return np.array([_group(str(c)) for c in ids], dtype=object)


def heldout_structures(w: Campaign, cfg: CampaignConfig) -> set[str]:
    """Ids of the structures kept out of training for good: of those verified in rounds >= 1 (the
    seeds and references the first model needs are never held out), the ones whose id hashes below
    ``mlip.training.heldout_fraction``. A hash of the id, not a draw: the set only grows, and a
    frame never moves from held-out to training."""
    fraction = cfg.mlip.training.heldout_fraction
    dft = w.table("dft")
    if fraction <= 0 or dft.empty:
        return set()
    later = set(dft["id"][dft["round"] >= 1])
    return {cid for cid in later if _share(cid) < fraction}


def _share(cid: str) -> float:
    """Where an id falls in [0, 1): below the held-out fraction, held out."""
    return zlib.crc32(cid.encode()) / 2**32


def unseen_by(model: ModelRecord, w: Campaign, groups: set[str]) -> set[str]:
    """The structures of ``groups`` that ``model`` never trained on: verified after its data round,
    or held out when it was trained (a store from before the held-out set held none out)."""
    dft = w.table("dft")
    first = dft.groupby("id")["round"].min().to_dict() if not dft.empty else {}
    return {g for g in groups if first.get(g, -1) > model.data_round or _share(g) < model.heldout_fraction}


def heldout_frames(w: Campaign, cfg: CampaignConfig) -> tuple[list[Atoms], list[str]]:
    """Every frame of the held-out structures (current reference settings), labelled, with its structure."""
    held = heldout_structures(w, cfg)
    table = w.table("frames")
    if not held or table.empty:
        return [], []
    settings = settings_hash(cfg.reference)
    rows = np.flatnonzero(
        (table["settings_hash"] == settings).to_numpy()
        & np.isfinite(table["energy"].to_numpy())
        & np.isin(_groups(table["id"].to_numpy()), list(held))
    )
    frames = w.frames("frames")
    out = []
    for k in map(int, rows):
        a = frames.atoms(k)
        a.info["REF_energy"] = float(table["energy"].iloc[k])
        out.append(a)
    return out, [_group(str(c)) for c in table["id"].to_numpy()[rows]]


#: A paired comparison needs a spread to measure: with fewer structures the guard only reports.
MIN_HELDOUT_STRUCTURES = 2


@dataclass(frozen=True)
class ModelCheck:
    """A retrained committee against the previous one on the held-out frames (table ``model_checks``)."""

    round: int
    previous_sha256: str
    new_sha256: str
    heldout_structures: int
    heldout_frames: int
    heldout_mae_previous_mev: float
    heldout_mae_new_mev: float
    noise_mev: float
    decision: str  # new, kept_previous, new (no held-out frames yet), new (guard off)


def worse_beyond_noise(
    err_new: np.ndarray, err_previous: np.ndarray, groups: list[str], tolerance: float
) -> tuple[bool, float]:
    """(is the new model worse, the noise allowed): per structure, the mean of the paired differences
    of absolute errors (frames of one relaxation are not independent); worse when their mean exceeds
    both ``tolerance`` and twice its standard error over structures."""
    diff = np.abs(err_new) - np.abs(err_previous)
    by = {g: float(np.mean(diff[[i for i, h in enumerate(groups) if h == g]])) for g in dict.fromkeys(groups)}
    d = np.array(list(by.values()))
    noise = 2 * float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return bool(d.mean() > max(tolerance, noise)), noise


def check_retrained(ctx: Round, previous: ModelRecord, trained: ModelRecord) -> dict[str, Any]:
    """Judge the round's new committee against the one that screened it, on the same held-out frames;
    recorded once per round in ``model_checks`` (:func:`screening_model` acts on the decision)."""
    w, cfg, round_ = ctx.w, ctx.cfg, ctx.number
    tc = cfg.mlip.training
    frames, groups = heldout_frames(w, cfg)
    fair = unseen_by(previous, w, set(groups))  # the previous committee may have trained on some of them
    keep = [i for i, g in enumerate(groups) if g in fair]
    frames, groups = [frames[i] for i in keep], [groups[i] for i in keep]
    nan = float("nan")
    if not frames or previous.sha256 == trained.sha256:
        decision, maes, noise = "new (no held-out frames yet)" if not frames else "new", (nan, nan), nan
    else:
        ctx.check_trusted(previous.paths + trained.paths)
        fut = ctx.executor.submit(
            jobs.evaluate,
            [previous.paths, trained.paths],
            frames,
            cfg.mlip.device,
            cfg.mlip.dtype,
            ctx.remote,
            resource="mlip",
        )
        before, after = (np.asarray(e, dtype=float) for e in fut.result())
        ref = np.array([a.info["REF_energy"] / len(a) for a in frames])
        maes = (energy_mae_mev(before, ref), energy_mae_mev(after, ref))
        worse, noise = worse_beyond_noise((after - ref) * 1000, (before - ref) * 1000, groups, tc.guard_tolerance_mev)
        if len(set(groups)) < MIN_HELDOUT_STRUCTURES:
            decision = f"new (fewer than {MIN_HELDOUT_STRUCTURES} held-out structures)"
        elif worse:
            decision = "kept_previous" if tc.guard == "keep_previous" else "new (guard off)"
        else:
            decision = "new"
    check = ModelCheck(
        round_, previous.sha256, trained.sha256, len(set(groups)), len(frames), maes[0], maes[1], noise, decision
    )
    if decision == "kept_previous":
        ctx.log.warning(
            "round %d: the retrained committee is worse on %d held-out frames (%.1f vs %.1f meV/atom, noise %.1f): "
            "the previous committee screens the next round",
            round_,
            len(frames),
            maes[1],
            maes[0],
            noise,
        )
    w.append_records("model_checks", f"r{round_}/model-check", [asdict(check)])
    return asdict(check)


def screening_model(ctx: Round, check: dict[str, Any], previous: ModelRecord) -> ModelRecord:
    """The committee the next round screens with: the new one, or (``kept_previous``) the previous one
    registered again for this round (``source: kept_previous``), so the next round also fine-tunes from it."""
    latest = current_model(ctx.w, before_round=ctx.number + 1)
    assert latest is not None  # the round trained one
    if check["decision"] != "kept_previous" or latest.source == "kept_previous":
        return latest
    cfg = ctx.cfg
    return register_model(
        ctx.w,
        ctx.number,
        previous.paths,
        n_frames=previous.n_train_frames,
        source="kept_previous",
        device=resolve_device(cfg.mlip.device),
        dtype=cfg.mlip.dtype,
        mode=previous.mode,
        metrics=previous.metrics,
        key=f"r{ctx.number}/model-kept",
        heldout_fraction=previous.heldout_fraction,
        data_round=previous.data_round,
    )


def new_model(w: Campaign, check: dict[str, Any]) -> ModelRecord | None:
    """The committee the round trained (also when the previous one was kept for screening)."""
    models = w.models()
    rows = models[(models["round"] == check["round"]) & (models["sha256"] == check["new_sha256"])]
    return None if rows.empty else ModelRecord.from_row(rows.iloc[0].to_dict(), Path(w.path))


def recorded_check(w: Campaign, round_: int) -> dict[str, Any] | None:
    """The round's model check, if it was recorded (a resumed round does not judge twice)."""
    checks = w.table("model_checks")
    rows = checks[checks["round"] == round_]
    return None if rows.empty else rows.iloc[-1].to_dict()
