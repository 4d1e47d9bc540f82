"""Relaxing many structures with a MACE model (or committee) in one call.

One Dask task relaxes a whole list: the models load once, and the batched engine
(torch-sim, :mod:`matdisc.mlip.batched`) keeps them busy with a full batch. The ASE loop
(FIRE + cell filter + ``MACECalculator``, one structure after another) is the reference
the batched engine is checked against; it relaxes a structure in place of the batched engine
only when configured, or (``engine: auto``) when the batched engine failed on that structure
alone, and every result records which engine produced it.

The committee mean drives the relaxation; at the relaxed structure the members' spread
gives ``sigma`` (energy std, eV/atom) and ``force_std`` (largest per-atom force std, eV/Å).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from ase import Atoms

from matdisc.ase_relax import relax
from matdisc.config import MLIPConfig
from matdisc.mlip.model import load_calculator, load_torch_model, resolve_device, use_cueq
from matdisc.mlip.outcome import USABLE, classify
from matdisc.records import RelaxResult

log = logging.getLogger(__name__)


def relax_many(
    structures: list[tuple[str, Atoms]], model_paths: list[str], mlip: MLIPConfig | None = None
) -> list[RelaxResult]:
    """Relax ``(id, atoms)`` pairs (positions + cell); one result per input, in order.

    Each result records its ``engine``. ``mlip.engine``: ``ase`` runs the ASE loop; ``torch-sim``
    and ``auto`` the batched engine, where a batch that fails is split and retried on it (out of
    memory: half the atoms per batch first). A structure that fails alone is ``failed`` with the
    engine's error (``torch-sim``) or relaxed by the ASE loop and recorded as a fallback (``auto``).
    """
    mlip = mlip or MLIPConfig()
    if not structures:
        return []
    t0 = time.perf_counter()
    device = resolve_device(mlip.device)
    if mlip.engine == "ase":
        results = relax_ase(structures, model_paths, mlip, device)
    else:
        results = _relax_torch_sim(structures, model_paths, mlip, device)
    share = (time.perf_counter() - t0) / len(results)  # the call's time (models loaded, spread) per structure
    for r in results:
        r.walltime_s = share
    return results


def load_committee(model_paths: list[str], mlip: MLIPConfig, device: str) -> tuple[Any, list]:
    """(the torch-sim model the committee mean drives, its members for the spread; each keeps a
    structure with a non-finite energy from spoiling the others' forces)."""
    from matdisc.mlip.batched import IsolatingModel, mace_models

    modules = [load_torch_model(p, device, mlip.dtype) for p in model_paths]
    model = mace_models(modules, device, mlip.dtype, use_cueq(device, mlip.cueq))
    return model, [IsolatingModel(m) for m in model.members] if len(modules) > 1 else [model]


def rescore_many(
    structures: list[tuple[str, Atoms]], model_paths: list[str], mlip: MLIPConfig | None = None
) -> list[RelaxResult]:
    """The committee's energy, energy spread and force spread of each ``(id, atoms)`` as it stands
    (no relaxation: ``n_steps`` 0), batched; outcome ``ok`` unless the energy is not finite."""
    import torch_sim as ts

    from matdisc.mlip.batched import CPU_BATCH_ATOMS, atom_chunks, committee_spread

    mlip = mlip or MLIPConfig()
    if not structures:
        return []
    t0 = time.perf_counter()
    device = resolve_device(mlip.device)
    model, members = load_committee(model_paths, mlip, device)
    atoms_list = [a for _, a in structures]
    energies: list[float] = []
    for _, chunk in atom_chunks(atoms_list, mlip.batch_atoms or CPU_BATCH_ATOMS):
        state = ts.initialize_state(chunk, model.device, model.dtype)
        energies += [float(e) for e in model(state)["energy"].detach().cpu()]
    spread = committee_spread(atoms_list, members, mlip.batch_atoms)
    share = (time.perf_counter() - t0) / len(structures)
    out = []
    for (cid, atoms), e, (sigma, fstd) in zip(structures, energies, spread):
        ok = bool(np.isfinite(e))
        out.append(
            RelaxResult(
                cid,
                "ok" if ok else "exploded",
                "" if ok else "non-finite energy at the rescored structure",
                atoms.copy(),
                energy=e if ok else float("nan"),
                sigma=float(sigma),
                force_std=float(fstd),
                walltime_s=share,
                engine="torch-sim",
            )
        )
    return out


def _relax_torch_sim(structures, model_paths, mlip: MLIPConfig, device: str) -> list[RelaxResult]:
    from matdisc.mlip.batched import BatchSettings, committee_spread

    model, members = load_committee(model_paths, mlip, device)
    settings = BatchSettings(
        fmax=mlip.fmax,
        max_steps=mlip.max_steps,
        cell_filter=mlip.cell_filter,
        batch_atoms=mlip.batch_atoms,
        steps_between_swaps=mlip.steps_between_swaps,
    )
    fallback: list[tuple[int, str]] = []  # (position, why) of structures the batched engine could not relax

    def alone(pos: int, err: Exception) -> RelaxResult:
        cid, atoms = structures[pos]
        why = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        if mlip.engine == "auto":
            fallback.append((pos, why))
            return RelaxResult(cid, "failed", why, atoms.copy())  # replaced by the ASE loop's result below
        return RelaxResult(cid, "failed", f"torch-sim could not relax it: {why}", atoms.copy(), engine="torch-sim")

    results = _split_on_failure(list(range(len(structures))), structures, model, settings, alone)
    if fallback:
        log.warning(
            "the batched engine could not relax %d of %d structures; the ASE loop relaxes them (recorded as engine "
            "'ase (fallback: ...)')",
            len(fallback),
            len(structures),
        )
        redo = relax_ase([structures[pos] for pos, _ in fallback], model_paths, mlip, device)
        for (pos, why), r in zip(fallback, redo):
            r.engine = f"ase (fallback: {why})"
            results[pos] = r
    batched = [r for r in results if r.engine == "torch-sim" and (r.status in USABLE or r.status == "unconverged")]
    spread = committee_spread([r.atoms for r in batched], members, mlip.batch_atoms)
    for r, (sigma, fstd) in zip(batched, spread):
        r.sigma, r.force_std = float(sigma), float(fstd)
    return results


def _split_on_failure(
    positions: list[int],
    structures: list[tuple[str, Atoms]],
    model: Any,
    settings: Any,
    alone: Callable[[int, Exception], RelaxResult],
) -> list[RelaxResult]:
    """``relax_batched`` on ``structures`` at ``positions``; a failed batch is retried on the batched
    engine: out of memory with more than one structure per batch, with half the atoms per batch;
    otherwise in two halves, so one structure the engine cannot handle costs only itself."""
    from dataclasses import replace

    from matdisc.mlip.batched import batch_atoms_for, relax_batched

    subset = [structures[p] for p in positions]
    try:
        return relax_batched(subset, model, settings)
    except Exception as err:  # noqa: BLE001 - whatever it was, it is retried smaller or recorded below
        if out_of_memory(err):
            _free_device_memory(model)
            used = batch_atoms_for(model, subset, settings)  # on a GPU a probe: only when memory ran out
            largest = max(len(a) for _, a in subset)
            if used > largest:
                log.warning("out of memory with %d atoms per batch: retrying with %d", used, max(largest, used // 2))
                return _split_on_failure(
                    positions, structures, model, replace(settings, batch_atoms=max(largest, used // 2)), alone
                )
        if len(positions) == 1:
            return [alone(positions[0], err)]
        half = len(positions) // 2
        log.warning(
            "batched relaxation of %d structures failed (%s); retrying in halves", len(positions), type(err).__name__
        )
        return _split_on_failure(positions[:half], structures, model, settings, alone) + _split_on_failure(
            positions[half:], structures, model, settings, alone
        )


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a device (or host) allocation failure."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None)
    return (
        isinstance(err, MemoryError)
        or (oom is not None and isinstance(err, oom))
        or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())
    )


def _free_device_memory(model: Any) -> None:
    import torch

    if getattr(model, "device", None) is not None and model.device.type == "cuda":
        torch.cuda.empty_cache()


def relax_ase(structures, model_paths, mlip: MLIPConfig, device: str = "cpu") -> list[RelaxResult]:
    """The reference engine: ASE FIRE with a cell filter, one structure after another."""
    calc = load_calculator(model_paths, device=device, dtype=mlip.dtype, cueq=mlip.cueq)
    results = []
    for cid, atoms in structures:
        res = relax(
            atoms, calc, id=cid, fmax=mlip.fmax, max_steps=mlip.max_steps, relax_cell=True, cell_filter=mlip.cell_filter
        )
        if res.status in ("ok", "unconverged"):
            res.status, res.reason = classify(atoms, res.atoms, res.status, res.reason)
        if res.status in USABLE or res.status == "unconverged":
            res.sigma, res.force_std = _ase_spread(calc, len(res.atoms), len(model_paths))
        results.append(res)
    return results


def _ase_spread(calc, n_atoms: int, n_models: int) -> tuple[float, float]:
    if n_models < 2:
        return 0.0, 0.0
    energies = np.asarray(calc.results["energy_comm"], dtype=float)
    forces = np.asarray(calc.results["forces_comm"], dtype=float)
    return float(energies.std() / n_atoms), float(np.linalg.norm(forces.std(0), axis=1).max())
