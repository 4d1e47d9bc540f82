"""Training MACE on the campaign's reference frames with mace-torch's own training code.

Training runs ``mace.cli.run_train`` in a subprocess: it configures logging and global
torch state for itself, and a subprocess keeps that out of the worker. Frames are split
into train/validation by structure (all frames of one structure land on the same side).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import write

from matdisc.config import TrainingConfig


class TrainingError(RuntimeError):
    """mace-torch's training did not produce a model."""


def split_by_structure(frames: list[Atoms], groups: list[str], valid_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    names = sorted(set(groups))
    rng.shuffle(names)
    n_valid = max(1, int(round(valid_fraction * len(names)))) if len(names) > 1 else 0
    valid_names = set(names[:n_valid])
    train = [f for f, g in zip(frames, groups) if g not in valid_names]
    valid = [f for f, g in zip(frames, groups) if g in valid_names]
    return train, valid


def train_mace(
    frames: list[Atoms],
    groups: list[str],
    workdir: Path,
    cfg: TrainingConfig,
    *,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float64",
    foundation_model: str | None = None,
) -> Path:
    """Train one MACE model on labelled frames (REF_energy/REF_forces/REF_stress); returns its path."""
    workdir = Path(workdir).resolve()  # mace runs with this as its cwd
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    train, valid = split_by_structure(frames, groups, cfg.valid_fraction, seed)
    write(workdir / "train.xyz", train, format="extxyz")
    name = f"mace-s{seed}"
    args = [
        sys.executable, "-m", "mace.cli.run_train",
        f"--name={name}",
        f"--work_dir={workdir}",
        f"--model_dir={workdir}",
        f"--train_file={workdir / 'train.xyz'}",
        "--energy_key=REF_energy", "--forces_key=REF_forces", "--stress_key=REF_stress",
        "--model=MACE",
        f"--num_channels={cfg.num_channels}", f"--max_L={cfg.max_L}", f"--r_max={cfg.r_max}",
        "--num_interactions=2", "--correlation=2",
        f"--batch_size={cfg.batch_size}", f"--valid_batch_size={cfg.batch_size * 2}",
        f"--max_num_epochs={cfg.max_num_epochs}", f"--lr={cfg.lr}",
        f"--energy_weight={cfg.energy_weight}", f"--forces_weight={cfg.forces_weight}",
        "--E0s=average", "--scaling=rms_forces_scaling",
        f"--device={device}", f"--default_dtype={dtype}", f"--seed={seed}",
        "--ema", "--ema_decay=0.99", "--amsgrad", "--save_cpu", "--eval_interval=5",
        "--log_level=WARNING",
    ]
    if valid:
        write(workdir / "valid.xyz", valid, format="extxyz")
        args.append(f"--valid_file={workdir / 'valid.xyz'}")
    else:
        args.append(f"--valid_fraction={cfg.valid_fraction}")
    if foundation_model:
        args += [f"--foundation_model={foundation_model}", "--multiheads_finetuning=False"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(args, cwd=workdir, capture_output=True, text=True, env=env)
    model = workdir / f"{name}.model"
    if proc.returncode != 0 or not model.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise TrainingError(f"mace training failed (exit {proc.returncode}): {' | '.join(tail)}")
    return model


def train_committee(
    frames: list[Atoms],
    groups: list[str],
    workdir: Path,
    cfg: TrainingConfig,
    *,
    size: int,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float64",
    foundation_model: str | None = None,
) -> list[Path]:
    """``size`` models that differ in seed (initialisation and validation split)."""
    return [
        train_mace(frames, groups, Path(workdir) / f"member-{k}", cfg, seed=seed + k, device=device, dtype=dtype,
                   foundation_model=foundation_model)
        for k in range(size)
    ]
