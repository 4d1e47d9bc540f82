"""Accuracy against cost of a campaign's two big choices, measured on its own data.

* **Reference settings** (the DFT presets, or any variants of the reference config): static
  calculations of the same verified structures with every option. The error of an option is
  what matters for a hull: its energies against the most accurate option's after the best
  per-element constant shift is removed (a shift of an element's energy cancels in every
  formation energy), as the mean absolute deviation in meV/atom. It needs more structures than
  elements; the cost is the measured seconds per calculation.
* **MACE model sizes** (channels × max L): one model per size trained on the campaign's training
  frames with one validation split by structure (whole structures held out); the error is the
  held-out energy and force RMSE, the cost the training seconds and the inference time per atom.

The figures go to the store (table ``tradeoffs``), so a notebook or ``matdisc status`` reads them
later; nothing else in the store changes.
"""

from __future__ import annotations

import re
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from matdisc.config import REFERENCE_PRESETS, CampaignConfig, ReferenceConfig
from matdisc.errors import UserError


@dataclass
class Option:
    """One choice with its measured error and cost."""

    kind: str  # dft | mlip
    option: str
    error_mev_per_atom: float  # dft: formation-energy deviation; mlip: held-out energy RMSE
    seconds: float  # dft: per calculation; mlip: training
    relative_cost: float  # seconds over the cheapest option's
    n_structures: int
    against: str  # what the error is measured against
    forces_rmse: float = float("nan")  # mlip: held-out eV/Å
    infer_us_per_atom: float = float("nan")  # mlip: one energy+forces evaluation
    failed: int = 0  # calculations of this option that did not finish (dft)


# -- reference settings --------------------------------------------------------------------------
def reference_options(cfg: CampaignConfig, names: list[str]) -> dict[str, ReferenceConfig]:
    """The campaign's reference config under each preset, as statics (its calculator, spin and
    parameters kept; the preset decides cutoff, smearing, k-points and SCF tolerance)."""
    unknown = [n for n in names if n not in REFERENCE_PRESETS]
    if unknown:
        raise UserError(f"unknown reference preset {unknown[0]!r}: use {', '.join(REFERENCE_PRESETS)}")
    order = list(REFERENCE_PRESETS)  # cheapest first: errors are measured against the last
    return {n: cfg.reference.under_preset(n, max_steps=0) for n in sorted(dict.fromkeys(names), key=order.index)}


def verified_structures(store, n: int) -> list[tuple[str, Atoms]]:
    """Up to ``n`` relaxed, verified structures: one per composition first, smallest cells first."""
    dft = store.table("dft")
    if dft.empty:
        raise UserError(f"{store.path}: no verified structures yet: run a round first")
    frames = store.frames("dft")
    rows = [(i, r) for i, r in enumerate(dft.to_dict("records")) if r["status"] == "ok"]
    structures = sorted(((r["id"], frames.atoms(i)) for i, r in rows), key=lambda p: (len(p[1]), p[0]))
    seen: dict[str, str] = {}
    for cid, a in structures:  # one per composition, then the rest
        seen.setdefault(a.get_chemical_formula("metal", empirical=True), cid)
    first = [p for p in structures if p[0] in seen.values()]
    unique = {cid: a for cid, a in first + [p for p in structures if p[0] not in seen.values()]}
    return list(unique.items())[:n]


def formation_deviation(energies: np.ndarray, reference: np.ndarray, structures: list[Atoms]) -> float:
    """Mean |ΔE − x·μ| in meV/atom: the per-atom energy differences to the reference option after the
    least-squares per-element shift ``μ`` (composition fractions ``x``); NaN when the structures
    cannot tell a shift from an error (no more structures than elements)."""
    elements = sorted({s for a in structures for s in a.get_chemical_symbols()})
    x = np.array([[a.get_chemical_symbols().count(e) / len(a) for e in elements] for a in structures])
    ok = np.isfinite(energies) & np.isfinite(reference)
    if ok.sum() <= np.linalg.matrix_rank(x[ok]):
        return float("nan")
    diff = energies[ok] - reference[ok]
    mu, *_ = np.linalg.lstsq(x[ok], diff, rcond=None)
    return float(np.mean(np.abs(diff - x[ok] @ mu)) * 1000)


def dft_tradeoff(
    structures: list[tuple[str, Atoms]], options: dict[str, ReferenceConfig], workdir: Path, log=lambda msg: None
) -> list[Option]:
    """Static calculations of ``structures`` with every option; errors against the last option
    (list options from cheapest to most accurate)."""
    from matdisc.dft import run_static

    energies, seconds, failed = {}, {}, {}
    for name, ref in options.items():
        e, t = [], []
        for cid, atoms in structures:
            res = run_static(atoms.copy(), ref, id=f"{cid}-{name}", workdir=workdir / name)
            ok = res.status == "ok"
            e.append(res.energy_per_atom if ok else float("nan"))
            t.append(res.walltime_s)
            log(f"tradeoff: {name} {cid}: {res.status} in {res.walltime_s:.1f} s {res.reason}".rstrip())
        energies[name], seconds[name], failed[name] = np.array(e), float(np.mean(t)), int(np.isnan(e).sum())
    best = list(options)[-1]
    cells = [a for _, a in structures]
    cheapest = min(seconds.values())
    return [
        Option(
            "dft",
            name,
            formation_deviation(energies[name], energies[best], cells),
            seconds[name],
            seconds[name] / cheapest if cheapest > 0 else float("nan"),
            len(structures),
            best,
            failed=failed[name],
        )
        for name in options
    ]


# -- MACE sizes ----------------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    """``"16x0e"`` (channels × max L, e3nn style) or ``"16x1"`` -> (16, 1)."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d)(?:[eo])?\s*", text)
    if not m or int(m.group(1)) < 4 or int(m.group(2)) > 3:
        raise UserError(f"bad model size {text!r}: use CHANNELSxL, e.g. 16x0e (channels >= 4, L <= 3)")
    return int(m.group(1)), int(m.group(2))


def default_sizes(cfg: CampaignConfig, device: str) -> list[str]:
    """Half, the configured and double the configured channels, at the configured max L."""
    t = cfg.mlip.training.sized(device)
    assert t.num_channels is not None and t.max_L is not None  # sized() fills every size field
    c, L = int(t.num_channels), int(t.max_L)
    return [f"{max(4, c // 2)}x{L}", f"{c}x{L}", f"{2 * c}x{L}"]


def spread_held_out(frames: list[Atoms], groups: list[str], every: int = 4) -> set[str]:
    """Every ``every``-th structure by size: held-out structures from small to large cells (a random
    quarter of a small campaign can be all one-atom cells, whose forces vanish by symmetry)."""
    size = {g: len(a) for a, g in zip(frames, groups)}
    ordered = sorted(size, key=lambda g: (size[g], g))
    return set(ordered[every // 2 :: every])


def mlip_tradeoff(
    frames: list[Atoms],
    groups: list[str],
    cfg: CampaignConfig,
    sizes: list[str],
    workdir: Path,
    device: str = "cpu",
    log=lambda msg: None,
) -> list[Option]:
    """One model per size on the same frames and validation split (a quarter of the structures,
    spread over cell sizes)."""
    from matdisc.mlip import predict_energies, train_committee

    n_groups = len(set(groups))
    if n_groups < 4:
        raise UserError(f"{n_groups} structures with reference frames: the MACE size comparison needs at least 4")
    held_out = spread_held_out(frames, groups)
    out = []
    for size in sizes:
        channels, L = parse_size(size)
        training = cfg.mlip.training.model_copy(update={"num_channels": channels, "max_L": L, "subsample": 1.0})
        (model,) = train_committee(
            frames,
            groups,
            workdir / size,
            training,
            size=1,
            seed=cfg.generation.seed,
            device=device,
            dtype=cfg.mlip.dtype,
            held_out=held_out,
        )
        paths = [str(model.path)]
        predict_energies(paths, frames[:1], device=device, dtype=cfg.mlip.dtype)  # warm-up (imports, first call)
        t0 = time.perf_counter()
        predict_energies(paths, frames[:1], device=device, dtype=cfg.mlip.dtype)
        t1 = time.perf_counter()
        predict_energies(paths, frames, device=device, dtype=cfg.mlip.dtype)
        t2 = time.perf_counter()
        atoms = sum(len(a) for a in frames[1:])
        infer = max(0.0, (t2 - t1) - (t1 - t0)) / max(1, atoms) * 1e6
        log(
            f"tradeoff: MACE {size}: {model.seconds:.1f} s training, held-out "
            f"{model.metrics['energy_rmse_per_atom'] * 1000:.1f} meV/atom"
        )
        out.append(
            Option(
                "mlip",
                size,
                model.metrics["energy_rmse_per_atom"] * 1000,
                model.seconds,
                0.0,
                n_groups,
                "held-out",
                forces_rmse=model.metrics["forces_rmse"],
                infer_us_per_atom=infer,
            )
        )
    cheapest = min(o.seconds for o in out)
    for o in out:
        o.relative_cost = o.seconds / cheapest if cheapest > 0 else float("nan")
    return out


# -- the command's work --------------------------------------------------------------------------
def measure(
    cfg: CampaignConfig, *, presets: list[str], sizes: list[str] | None, structures: int = 4, log=print
) -> list[Option]:
    """Measure the requested trade-offs on the campaign's store and record them (table ``tradeoffs``)."""
    from matdisc.mlip import resolve_device
    from matdisc.stages.train import training_set
    from matdisc.store import CampaignWriter, open_campaign

    store = open_campaign(cfg.store_path)
    device = resolve_device(cfg.mlip.device)
    options = reference_options(cfg, presets) if presets else {}
    sizes = list(sizes if sizes is not None else default_sizes(cfg, device))
    for s in sizes:
        parse_size(s)  # bad input fails before any work
    out: list[Option] = []
    with tempfile.TemporaryDirectory(prefix="matdisc-tradeoff-") as tmp:
        if options:
            picked = verified_structures(store, structures)
            out += dft_tradeoff(picked, options, Path(tmp) / "dft", log=log)
        if sizes:
            frames, groups = training_set(store, cfg)
            out += mlip_tradeoff(frames, groups, cfg, sizes, Path(tmp) / "mlip", device=device, log=log)
    if out:
        with CampaignWriter(cfg.store_path) as w:
            stamp = time.time()
            w.append_records(
                "tradeoffs", f"tradeoff/{uuid.uuid4().hex[:12]}", [{**asdict(o), "measured": stamp} for o in out]
            )
    return out


def latest(store) -> list[dict[str, Any]]:
    """The most recent measurement of each option (table ``tradeoffs``)."""
    table = store.table("tradeoffs")
    if table.empty:
        return []
    table = table.sort_values("measured").drop_duplicates(["kind", "option"], keep="last")
    return table.sort_values(["kind", "relative_cost"]).to_dict("records")


__all__ = [
    "Option",
    "default_sizes",
    "dft_tradeoff",
    "formation_deviation",
    "latest",
    "measure",
    "mlip_tradeoff",
    "parse_size",
    "reference_options",
    "spread_held_out",
    "verified_structures",
]
