"""Training and fine-tuning MACE on the campaign's reference frames with mace-torch's own code.

Training runs ``mace.cli.run_train`` in a child process (:mod:`matdisc.mlip.launch`): it
configures logging and global torch state for itself, and a process keeps that out of the
worker. Frames are split into train/validation by structure (all frames of one structure land
on the same side); the validation structures are the same for every committee member, so their
metrics compare, while each member trains on its own random subsample of the rest (diversity).

Three starts: from scratch (cold start), naive fine-tuning of an earlier model (a
previous campaign model or a foundation model: all weights continue training on the
campaign's frames), and multihead fine-tuning of a foundation model when replay data
(``replay_file``) is given, which keeps the foundation head anchored to its own data.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import write

from matdisc.config import TrainingConfig
from matdisc.mlip.launch import run_trainer
from matdisc.mlip.model import MODEL_LOCK


class TrainingError(RuntimeError):
    """mace-torch's training did not produce a model."""


@dataclass
class TrainedModel:
    """One trained model file and how well it reproduces held-out reference frames."""

    path: Path
    mode: str  # scratch | naive | multihead
    n_train: int
    n_valid: int
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # training run (child process) wall time: the training cost model is fitted on it
    content: bytes | None = None  # the file's bytes, for a writer on another machine (mlip.shipping)
    preloaded: bool = False  # the trainer was forked with mace imported (matdisc.mlip.launch)
    epochs: int = 0  # epochs trained
    kept_epoch: int | None = None  # the epoch (from 1) whose state was kept: the best on validation


def split_by_structure(
    frames: list[Atoms], groups: list[str], valid_fraction: float, seed: int, held_out: set[str] | None = None
):
    """(train, valid) frames, whole structures on one side, chosen by ``seed`` (or named in ``held_out``)."""
    rng = np.random.default_rng(seed)
    names = sorted(set(groups))
    rng.shuffle(names)
    n_valid = max(1, int(round(valid_fraction * len(names)))) if len(names) > 1 else 0
    valid_names = set(names[:n_valid]) if held_out is None else set(held_out)
    train = [(f, g) for f, g in zip(frames, groups) if g not in valid_names]
    valid = [f for f, g in zip(frames, groups) if g in valid_names]
    return train, valid


def subsample(train: list[tuple[Atoms, str]], fraction: float, seed: int) -> list[Atoms]:
    """A random ``fraction`` of the training structures (all frames of each one drawn)."""
    if fraction >= 1.0:
        return [f for f, _ in train]
    names = sorted({g for _, g in train})
    rng = np.random.default_rng(seed)
    keep = set(rng.choice(names, size=max(1, int(np.ceil(fraction * len(names)))), replace=False))
    return [f for f, g in train if g in keep]


def diverse_frames(energies_per_atom: np.ndarray, max_forces: np.ndarray, k: int) -> list[int]:
    """Indices of at most ``k`` frames of one trajectory that span its energies and forces.

    A relaxation's frames crowd near the minimum; farthest-point sampling in (energy per
    atom, largest force), each scaled to its range, keeps the start, the end and the frames
    in between that differ most, instead of fifty near-copies of the relaxed structure.
    """
    n = len(energies_per_atom)
    if n <= k:
        return list(range(n))
    x = np.column_stack([energies_per_atom, max_forces]).astype(float)
    span = np.ptp(x, axis=0)
    x = (x - x.min(axis=0)) / np.where(span > 0, span, 1.0)
    chosen = [0, n - 1]
    dist = np.minimum(np.linalg.norm(x - x[0], axis=1), np.linalg.norm(x - x[-1], axis=1))
    while len(chosen) < k:
        nxt = int(np.argmax(dist))
        if dist[nxt] <= 0:
            break
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(x - x[nxt], axis=1))
    return sorted(chosen)


def _run_train_args(
    name: str, workdir: Path, cfg: TrainingConfig, *, seed: int, device: str, dtype: str, epochs: int
) -> list[str]:
    assert cfg.batch_size is not None  # train_mace takes a sized config
    return [
        f"--name={name}",
        f"--work_dir={workdir}",
        f"--model_dir={workdir}",
        f"--train_file={workdir / 'train.xyz'}",
        "--energy_key=REF_energy",
        "--forces_key=REF_forces",
        "--stress_key=REF_stress",
        "--model=MACE",
        f"--num_channels={cfg.num_channels}",
        f"--max_L={cfg.max_L}",
        f"--r_max={cfg.r_max}",
        "--num_interactions=2",
        "--correlation=2",
        f"--batch_size={cfg.batch_size}",
        f"--valid_batch_size={cfg.batch_size * 2}",
        f"--max_num_epochs={epochs}",
        f"--lr={cfg.lr}",
        f"--energy_weight={cfg.energy_weight}",
        f"--forces_weight={cfg.forces_weight}",
        "--E0s=average",
        "--scaling=rms_forces_scaling",
        f"--device={device}",
        f"--default_dtype={dtype}",
        f"--seed={seed}",
        "--ema",
        "--ema_decay=0.99",
        "--amsgrad",
        "--save_cpu",
        # mace keeps the best *evaluated* epoch and evaluates only when epoch % eval_interval == 0:
        # at 5 a 5-epoch fine-tune kept the state after its first epoch and threw epochs 1-4 away
        "--eval_interval=1",
        "--log_level=WARNING",
    ]


def train_mace(
    train: list[Atoms],
    valid: list[Atoms],
    workdir: Path,
    cfg: TrainingConfig,
    *,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float64",
    start_model: str | None = None,
    threads: int | None = None,
) -> TrainedModel:
    """Train one MACE model on labelled frames (REF_energy/REF_forces/REF_stress).

    ``cfg`` must be sized (:meth:`TrainingConfig.sized`). With ``start_model`` the model is
    fine-tuned from it (multihead when ``cfg.replay_file`` is set) for ``finetune_epochs``.
    """
    workdir = Path(workdir).resolve()  # mace runs with this as its cwd
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    write(workdir / "train.xyz", train, format="extxyz")
    name = f"mace-s{seed}"
    mode = "scratch" if not start_model else ("multihead" if cfg.replay_file else "naive")
    epochs = cfg.max_num_epochs if mode == "scratch" else cfg.finetune_epochs
    if epochs is None or cfg.batch_size is None:
        raise ValueError("train_mace needs a sized TrainingConfig (TrainingConfig.sized(device))")
    args = _run_train_args(name, workdir, cfg, seed=seed, device=device, dtype=dtype, epochs=epochs)
    if valid:
        write(workdir / "valid.xyz", valid, format="extxyz")
        args.append(f"--valid_file={workdir / 'valid.xyz'}")
    else:
        args.append(f"--valid_fraction={cfg.valid_fraction}")
    if start_model:
        from matdisc.mlip.model import check_sha256

        check_sha256(start_model)  # mace-torch unpickles it
        args.append(f"--foundation_model={start_model}")
        if mode == "multihead":  # the foundation's own atomic energies anchor both heads
            args = [a for a in args if not a.startswith("--E0s=")]
            args += [
                "--E0s=foundation",
                "--multiheads_finetuning=True",
                f"--pt_train_file={Path(str(cfg.replay_file)).resolve()}",
            ]
        else:
            args.append("--multiheads_finetuning=False")
    log = workdir / "run_train.log"
    run = run_trainer(args, workdir, log, threads=threads)
    model = workdir / f"{name}.model"
    if run.exitcode != 0 and not log.exists():  # the child died before it opened its log
        raise TrainingError(
            f"the training process exited ({run.exitcode}) before mace started: a script that runs a "
            'campaign must do so under `if __name__ == "__main__":` (the process re-imports the main '
            "module, see the traceback above)"
        )
    if run.exitcode != 0 or not model.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
        raise TrainingError(f"mace training failed (exit {run.exitcode}): {' | '.join(tail)}")
    if mode == "multihead":
        _keep_campaign_head(model)
    with MODEL_LOCK:  # members run in threads: see MODEL_LOCK
        metrics = evaluate(str(model), valid, device=device, dtype=dtype) if valid else {}
    return TrainedModel(
        model,
        mode,
        len(train),
        len(valid),
        metrics,
        run.seconds,
        preloaded=run.preloaded,
        epochs=epochs,
        kept_epoch=kept_epoch(workdir),
    )


def kept_epoch(workdir: Path) -> int | None:
    """The epoch (from 1) of the checkpoint mace loaded at the end, the best on validation (it keeps
    only that one, ``checkpoints/<name>_epoch-<k>.pt`` with ``k`` from 0); None without one."""
    found = [int(p.stem.rsplit("-", 1)[1]) for p in Path(workdir).glob("checkpoints/*_epoch-*.pt")]
    return max(found) + 1 if found else None


def _keep_campaign_head(path: Path) -> None:
    """Multihead fine-tuning saves the replay (``pt_head``) head too; screening uses only ours."""
    import torch
    from mace.tools.scripts_utils import remove_pt_head

    with MODEL_LOCK:
        model = torch.load(path, map_location="cpu", weights_only=False)
    if len(getattr(model, "heads", [])) > 1:
        torch.save(remove_pt_head(model, "Default"), path)


def _batched_outputs(model_paths: list[str], frames: list[Atoms], device: str, dtype: str):
    """``(chunk, energies, forces)`` of a model (a committee: the mean) over frames, batched."""
    import torch_sim as ts

    from matdisc.mlip.batched import CPU_BATCH_ATOMS, atom_chunks, mace_models
    from matdisc.mlip.model import load_torch_model

    model = mace_models([load_torch_model(p, device, dtype) for p in model_paths], device, dtype)
    for _, chunk in atom_chunks(frames, CPU_BATCH_ATOMS):
        out = model(ts.initialize_state(chunk, model.device, model.dtype))
        yield chunk, out["energy"].detach().cpu().numpy(), out["forces"].detach().cpu().numpy()


def evaluate(model_path: str, frames: list[Atoms], *, device: str = "cpu", dtype: str = "float64") -> dict[str, float]:
    """Energy (eV/atom) and force (eV/Å) RMSE and MAE of a model on labelled frames, batched."""
    per_atom: list[float] = []
    components: list[np.ndarray] = []
    for chunk, energy, forces in _batched_outputs([model_path], frames, device, dtype):
        offset = 0
        for a, e in zip(chunk, energy):
            per_atom.append((e - a.info["REF_energy"]) / len(a))
            components.append((forces[offset : offset + len(a)] - a.arrays["REF_forces"]).ravel())
            offset += len(a)
    de, df = np.asarray(per_atom), np.concatenate(components)
    return {
        "energy_rmse_per_atom": float(np.sqrt(np.mean(de**2))),
        "energy_mae_per_atom": float(np.mean(np.abs(de))),
        "forces_rmse": float(np.sqrt(np.mean(df**2))),
        "forces_mae": float(np.mean(np.abs(df))),
    }


def predict_energies(
    model_paths: list[str], frames: list[Atoms], *, device: str = "cpu", dtype: str = "float64"
) -> np.ndarray:
    """Committee-mean energy per atom (eV/atom) of each frame, as it stands (no relaxation)."""
    if not frames:
        return np.zeros(0)
    out = [
        e / np.array([len(a) for a in chunk]) for chunk, e, _ in _batched_outputs(model_paths, frames, device, dtype)
    ]
    return np.concatenate(out)


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
    start_models: list[str] | None = None,
    held_out: set[str] | None = None,
) -> list[TrainedModel]:
    """``size`` models that differ in seed and training subsample, on one validation split.

    ``start_models`` (one per member, or one for all) makes each member a fine-tune of it;
    ``held_out`` names the validation structures (default: ``valid_fraction`` of them by ``seed``).
    """
    from concurrent.futures import ThreadPoolExecutor

    cfg = cfg.sized(device)
    train, valid = split_by_structure(frames, groups, cfg.valid_fraction, seed, held_out)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    concurrent = max(1, min(size, cores))
    threads = max(1, cores // concurrent)

    def member(k: int) -> TrainedModel:
        start = start_models[k % len(start_models)] if start_models else None
        return train_mace(
            subsample(train, cfg.subsample, seed + k),
            valid,
            Path(workdir) / f"member-{k}",
            cfg,
            seed=seed + k,
            device=device,
            dtype=dtype,
            start_model=start,
            threads=threads,
        )

    # members are independent runs: side by side, the cores shared out (one thread each on two
    # cores halves a committee's wall time; mace's training loop uses a single core poorly)
    with ThreadPoolExecutor(concurrent) as pool:
        return list(pool.map(member, range(size)))


def current_epochs(workdir: Path) -> dict[int, int]:
    """The epoch (counted from 1) each committee member's training is in, read from the tail of the
    results file to which mace's ``run_train`` appends a JSON line per optimisation step (members
    without one yet are absent): what the orchestrator shows while a committee trains."""
    done = {}
    for path in Path(workdir).glob("member-*/results/*_train.txt"):
        member = int(path.parts[-3].removeprefix("member-"))
        try:
            with open(path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                tail = f.read().splitlines()
        except OSError:
            continue
        for line in reversed(tail):
            try:
                epoch = json.loads(line).get("epoch")
            except ValueError:  # the first line of the tail, cut, or a line being written
                continue
            if isinstance(epoch, int):
                done[member] = epoch + 1  # mace counts epochs from 0
                break
    return done
