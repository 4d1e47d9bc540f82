"""The model registry (table ``models``): every committee a campaign screened or trained with, its
files, where it came from, its held-out errors and which campaign data it saw."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from matdisc.mlip.model import describe, file_sha256
from matdisc.store import Campaign, CampaignWriter, schema
from matdisc.store.tables import fsync_dir


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
                with open(tmp, "rb") as f:  # on disk before the registry row that names it
                    os.fsync(f.fileno())
                os.replace(tmp, dest)
                fsync_dir(dest.parent)
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


def registered_start(w: Campaign, source: str) -> str | None:
    """The sha256 the campaign registered its configured model ``source`` under (None: not yet)."""
    models = w.models()
    rows = models[(models["round"] == 0) & (models["source"] == source)]
    if rows.empty:
        return None
    members = json.loads(rows.iloc[0]["members"])
    return str(members[0]) if len(members) == 1 else None


def new_model(w: Campaign, check: dict[str, Any]) -> ModelRecord | None:
    """The committee the round trained (also when the previous one was kept for screening)."""
    models = w.models()
    rows = models[(models["round"] == check["round"]) & (models["sha256"] == check["new_sha256"])]
    return None if rows.empty else ModelRecord.from_row(rows.iloc[0].to_dict(), Path(w.path))
