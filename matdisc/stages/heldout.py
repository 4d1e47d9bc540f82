"""The held-out set and the model guard: structures never trained on, the new committee judged
against the previous one on them, and which of the two screens the next round."""

from __future__ import annotations

import re
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from ase import Atoms

from matdisc import jobs
from matdisc.config import CampaignConfig
from matdisc.dft import settings_hash
from matdisc.metrics import energy_mae_mev
from matdisc.mlip import resolve_device
from matdisc.stages.context import Round
from matdisc.stages.registry import ModelRecord, current_model, register_model
from matdisc.store import Campaign


def group_of(cid: str) -> str:
    """The structure a frame belongs to: perturbed copies (``ID-pK``) stay with their parent."""
    return re.sub(r"-p\d+$", "", cid)


def groups_of(ids: np.ndarray) -> np.ndarray:
    return np.array([group_of(str(c)) for c in ids], dtype=object)


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
        & np.isin(groups_of(table["id"].to_numpy()), list(held))
    )
    frames = w.frames("frames")
    out = []
    for k in map(int, rows):
        a = frames.atoms(k)
        a.info["REF_energy"] = float(table["energy"].iloc[k])
        out.append(a)
    return out, [group_of(str(c)) for c in table["id"].to_numpy()[rows]]


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
    if trained.source == "training_failed":
        decision, maes, noise = "kept_previous (training failed)", (nan, nan), nan
    elif not frames or previous.sha256 == trained.sha256:
        decision, maes, noise = "new (no held-out frames yet)" if not frames else "new", (nan, nan), nan
    else:
        before, after = evaluate_pair(ctx, previous, trained, frames)
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


def evaluate_pair(ctx: Round, a: ModelRecord, b: ModelRecord, frames: list[Atoms]) -> tuple[np.ndarray, np.ndarray]:
    """Energies per atom of ``frames`` by two committees, in one job on an MLIP worker."""
    ctx.check_trusted(a.paths + b.paths)
    cfg = ctx.cfg
    fut = ctx.executor.submit(
        jobs.evaluate, [a.paths, b.paths], frames, cfg.mlip.device, cfg.mlip.dtype, ctx.remote, resource="mlip"
    )
    first, second = fut.result()
    return np.asarray(first, dtype=float), np.asarray(second, dtype=float)


def recorded_check(w: Campaign, round_: int) -> dict[str, Any] | None:
    """The round's model check, if it was recorded (a resumed round does not judge twice)."""
    checks = w.table("model_checks")
    rows = checks[checks["round"] == round_]
    return None if rows.empty else rows.iloc[-1].to_dict()
