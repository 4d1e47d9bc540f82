"""Short measurements on this machine that put numbers into the cost forms of :mod:`matdisc.budget.costs`.

Before a campaign has any history, ``matdisc plan`` probes: two static reference calculations
on the smallest seed structures (slope and intercept of the DFT form), two short MACE trainings
of the configured size (1 and 4 epochs: per-member start-up and per-epoch cost), and a short
batched relaxation with the model the training left (per atom-step cost and the worker's memory).
Results are cached per machine and settings in ``~/.cache/matdisc/probes.json`` (``$XDG_CACHE_HOME``),
so the flow and later plans reuse them without probing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from matdisc.budget.costs import Rates, dft_work
from matdisc.config import CampaignConfig

#: Structures and steps of the relaxation probe (a batch like a task's, small enough to be quick).
PROBE_STRUCTURES, PROBE_STEPS = 24, 20
#: Training probe: at least this many frames, trained for each number of epochs.
PROBE_FRAMES, PROBE_EPOCHS = 48, (1, 4)
#: Version of the cost forms the cached rates were measured for (a changed form re-probes).
FORMS = 2
#: What a fresh MLIP worker imports before its first task.
MLIP_IMPORTS = "import matdisc.mlip.relax, matdisc.mlip.train, mace.modules, torch_sim"


def cache_path() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "matdisc" / "probes.json"


def probe_key(cfg: CampaignConfig) -> str:
    """What the measured rates depend on: this machine, the model size, the reference settings."""
    from matdisc.mlip import resolve_device

    device = resolve_device(cfg.mlip.device)
    training = cfg.mlip.training.sized(device)
    parts = {
        "host": os.uname().nodename,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "device": device,
        "dtype": cfg.mlip.dtype,
        "model": cfg.mlip.model,
        "chemsys": sorted(cfg.chemsys),
        "training": training.model_dump(mode="json", include={"num_channels", "max_L", "r_max", "batch_size"}),
        "ensemble": cfg.mlip.ensemble,
        "reference": cfg.reference.resolved().model_dump(mode="json"),
        "threads": cfg.compute.threads_per_dft_worker,
        "engine": cfg.mlip.engine,
        "forms": FORMS,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_rates(cfg: CampaignConfig) -> tuple[Rates, dict[str, Any]] | None:
    """Rates a probe measured earlier for these settings on this machine (None: never probed)."""
    try:
        entry = json.loads(cache_path().read_text()).get(probe_key(cfg))
    except (OSError, ValueError):
        return None
    if not entry:
        return None
    return Rates(**entry["rates"]), entry.get("memory", {})


def _store_cache(cfg: CampaignConfig, rates: Rates, memory: dict[str, Any]) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[probe_key(cfg)] = {"rates": rates.as_dict(), "memory": memory, "measured": time.time()}
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def probe(cfg: CampaignConfig, *, refresh: bool = False, log=print) -> tuple[Rates, dict[str, Any]]:
    """Measured rates for this campaign's settings on this machine (cached)."""
    if not refresh and (hit := cached_rates(cfg)) is not None:
        return hit
    from matdisc.stages.generate import seed_candidates

    seeds = [c.structure.to_ase_atoms() for c in seed_candidates(cfg)]
    with tempfile.TemporaryDirectory(prefix="matdisc-probe-") as tmp:
        rates = Rates()
        memory: dict[str, float] = {}
        t = time.perf_counter()
        rates = _probe_dft(cfg, seeds, Path(tmp) / "dft", rates)
        log(f"probe: reference calculations {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        rates, model = _probe_training(cfg, seeds, Path(tmp) / "train", rates)
        log(f"probe: MACE training {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        paths = [cfg.mlip.model] if cfg.mlip.is_model_file else [str(model)]
        rates, memory = _probe_relax(cfg, seeds, paths, rates)
        log(f"probe: MACE relaxation {time.perf_counter() - t:.1f} s")
        _, start = _timed(subprocess.run, [sys.executable, "-c", MLIP_IMPORTS], check=True, capture_output=True)
        rates = rates.updated("probe", mlip_start_s=start)
        log(f"probe: an MLIP worker's imports {start:.1f} s")
    _store_cache(cfg, rates, memory)
    return rates, memory


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _probe_dft(cfg: CampaignConfig, seeds: list[Atoms], workdir: Path, rates: Rates) -> Rates:
    """Static calculations of the smallest and a larger seed: the form's intercept and slope."""
    from matdisc.dft.protocol import run_protocol

    ref = cfg.reference.resolved().model_copy(update={"max_steps": 0})
    by_work = sorted(seeds, key=lambda a: dft_work(a, ref))
    small, large = by_work[0], by_work[min(len(by_work) - 1, len(by_work) // 2)]
    run_protocol(small, ref, id="warm-up", workdir=workdir / "warm-up")  # imports and setups, not counted
    times = [
        _timed(run_protocol, a, ref, id=f"p{i}", workdir=workdir / f"p{i}")[1] for i, a in enumerate((small, large))
    ]
    works = [dft_work(small, ref), dft_work(large, ref)]
    slope = (times[1] - times[0]) / (works[1] - works[0]) if works[1] > works[0] * 1.2 else 0.0
    if slope <= 0:
        slope, intercept = max(times) / max(works), 0.0
    else:
        intercept = max(0.0, times[0] - slope * works[0])
    if ref.runs_isolated:  # each calculation starts its own interpreter and imports the calculator
        start = "import matdisc.dft.protocol" + ("; import gpaw" if ref.calculator == "gpaw" else "")
        _, spawn = _timed(subprocess.run, [sys.executable, "-c", start], check=True, capture_output=True)
        intercept += spawn
    return rates.updated("probe", dft_s=slope, dft_call_s=intercept)


def _labelled(seeds: list[Atoms], cfg: CampaignConfig) -> list[Atoms]:
    """Rattled seeds with energies and forces from a cheap potential: the cost of training does not
    depend on the labels (EMT where it knows the elements, else Lennard-Jones)."""
    from ase.calculators.emt import EMT, parameters
    from ase.calculators.lj import LennardJones

    from matdisc.records import labelled

    calc = EMT() if all(s in parameters for s in cfg.chemsys) else LennardJones(sigma=2.3, epsilon=0.1, rc=5.0)
    rng = np.random.default_rng(0)
    out = []
    for k in range(max(2, -(-PROBE_FRAMES // len(seeds)))):
        for a in seeds:
            b = a.copy()
            b.positions += rng.normal(0, 0.05, b.positions.shape) * (k > 0)
            b.calc = calc
            out.append(labelled(b, b.get_potential_energy(), b.get_forces(), b.get_stress()))
    return out


def _probe_training(cfg: CampaignConfig, seeds: list[Atoms], workdir: Path, rates: Rates) -> tuple[Rates, Path]:
    """Two trainings (1 and 4 epochs) on the same frames: per-member start-up and per-epoch cost."""
    from matdisc.budget.costs import concurrent_members
    from matdisc.mlip import resolve_device
    from matdisc.mlip.train import split_by_structure, train_mace

    device = resolve_device(cfg.mlip.device)
    training = cfg.mlip.training.sized(device)
    frames = _labelled(seeds, cfg)
    train, valid = split_by_structure(
        frames, [str(i % len(seeds)) for i in range(len(frames))], training.valid_fraction, 0
    )
    train_frames = [a for a, _ in train]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // concurrent_members(cfg.mlip.ensemble, cores))
    times: list[float] = []
    model = workdir  # replaced by the last probe's model file
    for epochs in PROBE_EPOCHS:
        sized = training.model_copy(update={"max_num_epochs": epochs})
        trained, seconds = _timed(
            train_mace,
            train_frames,
            valid,
            workdir / f"e{epochs}",
            sized,
            seed=0,
            device=device,
            dtype=cfg.mlip.dtype,
            threads=threads,
        )
        times.append(seconds)
        model = trained.path
    atoms = sum(len(a) for a in train_frames)
    per_epoch = (times[1] - times[0]) / (PROBE_EPOCHS[1] - PROBE_EPOCHS[0])
    if per_epoch <= 0:  # a busy machine hid the epochs' cost: count all of the longer run as per-epoch work
        return rates.updated("probe", train_s=times[1] / (atoms * PROBE_EPOCHS[1]), train_member_s=0.0), model
    return rates.updated("probe", train_s=per_epoch / atoms, train_member_s=max(0.0, times[0] - per_epoch)), model


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _probe_relax(
    cfg: CampaignConfig, seeds: list[Atoms], model_paths: list[str], rates: Rates
) -> tuple[Rates, dict[str, Any]]:
    """A short batched relaxation (every structure runs ``PROBE_STEPS`` steps) with the probe model."""
    from matdisc.mlip import relax_many
    from matdisc.mlip.model import load_torch_model

    n = min(PROBE_STRUCTURES, max(len(seeds), cfg.mlip.structures_per_task))
    structures = [(f"p{i}", seeds[i % len(seeds)].copy()) for i in range(n)]
    for k, (_, a) in enumerate(structures):
        a.rattle(0.02, seed=k)
    mlip = cfg.mlip.model_copy(update={"fmax": 1e-9, "max_steps": PROBE_STEPS})  # nothing converges early
    members = model_paths * cfg.mlip.ensemble if len(model_paths) == 1 else model_paths
    rss0 = _rss_bytes("VmRSS")
    _, load = _timed(lambda: [load_torch_model(p, "cpu", cfg.mlip.dtype) for p in members])
    relax_many(structures[:2], members, mlip)  # warm-up: first-call compilation is not per-step cost
    results, seconds = _timed(relax_many, structures, members, mlip)
    work = sum(len(r.atoms) * max(1, r.n_steps) for r in results)
    atoms = sum(len(a) for _, a in structures)
    peak = _rss_bytes("VmHWM")
    per_atom = max(0.0, (peak - rss0) / atoms)
    rates = rates.updated("probe", relax_s=max(1e-9, (seconds - load) / work), relax_task_s=load)
    return rates, {"mlip_base_bytes": float(peak), "mlip_bytes_per_atom": float(per_atom)}
