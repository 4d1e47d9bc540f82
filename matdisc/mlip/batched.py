"""Batched relaxation with torch-sim: many structures on one model at once, in flight.

Structures enter a batch up to ``batch_atoms`` atoms; every ``steps_between_swaps`` FIRE
steps the finished ones (converged, exploded, or out of steps) leave and waiting ones take
their places (torch-sim's ``InFlightAutoBatcher``), so the model always sees a full batch.
The loop is ours rather than ``torch_sim.optimize`` because a screening run needs what that
runner does not track: steps per structure (``max_steps`` is per structure here) and
physical failure detected while a structure is still in the batch.

A committee drives relaxations by its mean (like ASE's ``MACECalculator`` with several
models), so both engines relax on the same surface; member spread is evaluated afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ase import Atoms
from torch_sim.models.interface import ModelInterface

from matdisc.ase_relax import MAX_VOLUME_FACTOR
from matdisc.mlip.outcome import classify
from matdisc.records import RelaxResult

#: Atoms per batch on a CPU: past a few thousand a CPU gains nothing from a larger batch.
CPU_BATCH_ATOMS = 2048
#: Most atoms in one GPU batch: a tiny screening model saturates an H200 well below this, and
#: a cap keeps one batch's stragglers from holding tens of thousands of finished atoms.
GPU_BATCH_ATOMS_CAP = 65536
#: Share of the free GPU memory a batch may take (activations, the optimizer state, headroom).
GPU_MEMORY_FRACTION = 0.5
#: Atoms in the probe batch whose peak memory sets the per-atom cost.
GPU_PROBE_ATOMS = 1024
#: Steps between swaps: a swap check costs little next to a CPU step (measured on 64 Cu-Pd
#: cells: 2 steps 8 % faster than 5, 1 step slower again); a GPU step is cheap, swaps are not.
SWAP_STEPS = {"cpu": 2, "cuda": 5}


@dataclass(frozen=True)
class BatchSettings:
    """How the batched engine runs (one value per field of ``mlip``)."""

    fmax: float = 0.05
    max_steps: int = 300
    cell_filter: str = "frechet"
    batch_atoms: int | None = None
    steps_between_swaps: int | None = None


def mace_models(members: list[torch.nn.Module], device: str, dtype: str, cueq: bool = False):
    """torch-sim model over one MACE module (mace-torch's own torch-sim integration), or the mean
    of a committee's."""
    from mace.calculators.mace_torchsim import MaceTorchSimModel

    wrapped = [
        MaceTorchSimModel(
            m, device=torch.device(device), dtype=getattr(torch, dtype), compute_stress=True, enable_cueq=cueq
        )
        for m in members
    ]
    return IsolatingModel(wrapped[0] if len(wrapped) == 1 else CommitteeModel(wrapped))


class IsolatingModel(ModelInterface):
    """``model``, with a system whose energy is not finite kept from spoiling the others.

    Forces are the gradient of the batch's summed energy, so one system with a non-finite
    energy (two atoms on one site, say) makes every force of the batch NaN and every structure
    of it look exploded. When that happens the batch is evaluated again without those systems;
    they keep their NaN energy and get NaN forces and stress, the others their own values.
    """

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.members = getattr(model, "members", None)
        self._device, self._dtype = model.device, model.dtype
        self._compute_stress, self._compute_forces = True, True
        self._memory_scales_with = "n_atoms"

    def forward(self, state, **kwargs) -> dict[str, torch.Tensor]:
        out = self.model(state, **kwargs)
        bad = ~torch.isfinite(out["energy"])
        if not bad.any() or bad.all() or torch.isfinite(out["forces"]).all():
            return out
        good = torch.nonzero(~bad).flatten()
        clean = self.model(state[good], **kwargs)
        atoms = torch.isin(state.system_idx, good)
        fixed = {k: torch.full_like(v, float("nan")) for k, v in out.items() if k in ("energy", "forces", "stress")}
        fixed["energy"][good] = clean["energy"].detach()
        fixed["forces"][atoms] = clean["forces"].detach()
        if "stress" in fixed:
            fixed["stress"][good] = clean["stress"].detach()
        return {**out, **fixed}


class CommitteeModel(ModelInterface):
    """Mean energy, forces and stress of several torch-sim models; members kept for their spread."""

    def __init__(self, members: list) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self._device, self._dtype = members[0].device, members[0].dtype
        self._compute_stress, self._compute_forces = True, True
        self._memory_scales_with = "n_atoms"

    def forward(self, state, **kwargs) -> dict[str, torch.Tensor]:
        outs = [m(state) for m in self.members]
        return {k: torch.stack([o[k] for o in outs]).mean(0) for k in ("energy", "forces", "stress")}


def batch_atoms_for_memory(
    bytes_per_atom: float,
    free_bytes: int,
    largest: int,
    *,
    fraction: float = GPU_MEMORY_FRACTION,
    cap: int = GPU_BATCH_ATOMS_CAP,
) -> int:
    """Atoms per batch that fit ``fraction`` of ``free_bytes`` at ``bytes_per_atom``, within
    [largest structure, cap]."""
    fit = int(fraction * free_bytes / max(bytes_per_atom, 1.0))
    return max(largest, min(cap, fit))


_GPU_BATCH_ATOMS: dict[tuple, int] = {}


def gpu_batch_atoms(model, structures: list[Atoms]) -> int:
    """Atoms per batch on the model's GPU, from one probe pass (cached per architecture and dtype).

    torch-sim's own estimate runs forward passes on geometrically growing batches up to ~10^6
    atoms, once per autobatcher: over a minute per call on an H200 for a model that needs
    kilobytes per atom. One forward+backward pass on ~``GPU_PROBE_ATOMS`` atoms of the actual
    structures (their density sets the neighbour count) gives the per-atom peak memory;
    memory grows linearly in atoms, so the batch is the free memory's share over that.
    """
    import torch_sim as ts

    device, dtype = model.device, model.dtype
    largest = max(len(a) for a in structures)
    key = (str(device), str(dtype), type(model).__name__, sum(p.numel() for p in model.parameters()), largest)
    if key in _GPU_BATCH_ATOMS:
        return _GPU_BATCH_ATOMS[key]
    probe, n_atoms = [], 0
    while n_atoms < GPU_PROBE_ATOMS:
        for a in structures:
            probe.append(a)
            n_atoms += len(a)
            if n_atoms >= GPU_PROBE_ATOMS:
                break
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model(ts.initialize_state(probe, device, dtype))
    torch.cuda.synchronize(device)
    bytes_per_atom = (torch.cuda.max_memory_allocated(device) - base) / n_atoms
    free, _ = torch.cuda.mem_get_info(device)
    _GPU_BATCH_ATOMS[key] = batch_atoms_for_memory(bytes_per_atom, free, largest)
    return _GPU_BATCH_ATOMS[key]


def _finished(state, fmax: float, volume0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(converged, exploded, volume_blowup) per system of a batch: converged by torch-sim's force
    criterion (atoms and cell), exploded by ours (upstream has no notion of a failed relaxation)."""
    import torch_sim as ts

    finite_forces = (
        torch.zeros(state.n_systems, device=state.forces.device, dtype=state.forces.dtype).scatter_reduce(
            0,
            state.system_idx,
            torch.isfinite(state.forces).all(dim=1).to(state.forces.dtype),
            reduce="amin",
            include_self=False,
        )
        > 0
    )
    blowup = state.volume.abs() > MAX_VOLUME_FACTOR * volume0
    exploded = ~torch.isfinite(state.energy) | ~finite_forces | blowup
    has_cell = getattr(state, "cell_forces", None) is not None
    converged = ts.generate_force_convergence_fn(fmax, include_cell_forces=has_cell)(state) & ~exploded
    return converged, exploded, blowup


def batch_atoms_for(model, structures: list[tuple[str, Atoms]], settings: BatchSettings) -> int:
    """Atoms per batch: configured, else the CPU default or what the GPU's free memory holds; never
    fewer than the largest structure."""
    largest = max(len(a) for _, a in structures)
    configured = settings.batch_atoms or (
        CPU_BATCH_ATOMS if model.device.type == "cpu" else gpu_batch_atoms(model, [a for _, a in structures])
    )
    return max(configured, largest)


#: A device that holds at most this many atoms in one model evaluation (None: the real device's
#: memory decides). Set to test out-of-memory handling with a real model and a real batch.
DEVICE_MEMORY_ATOMS: int | None = None


class AtomLimitedModel(ModelInterface):
    """``model`` on a device of ``limit`` atoms: a larger batch raises ``torch.OutOfMemoryError``."""

    def __init__(self, model, limit: int) -> None:
        super().__init__()
        self.model, self.limit = model, limit
        self._device, self._dtype = model.device, model.dtype
        self._compute_stress, self._compute_forces = True, True
        self._memory_scales_with = "n_atoms"

    def forward(self, state, **kwargs) -> dict[str, torch.Tensor]:
        if state.n_atoms > self.limit:
            raise torch.OutOfMemoryError(f"device holds {self.limit} atoms, the batch has {state.n_atoms}")
        return self.model(state, **kwargs)


def relax_batched(
    structures: list[tuple[str, Atoms]],
    model,
    settings: BatchSettings,
) -> list[RelaxResult]:
    """Relax ``(id, atoms)`` pairs (positions + cell) with a torch-sim model; results in input order."""
    import torch_sim as ts
    from torch_sim.autobatching import BinningAutoBatcher, InFlightAutoBatcher

    if not structures:
        return []
    t0 = time.perf_counter()
    if DEVICE_MEMORY_ATOMS is not None:
        model = AtomLimitedModel(model, DEVICE_MEMORY_ATOMS)
    device, dtype = model.device, model.dtype
    cell_filter = ts.CellFilter.frechet if settings.cell_filter == "frechet" else ts.CellFilter.unit
    batch_atoms = batch_atoms_for(model, structures, settings)
    swap_steps = settings.steps_between_swaps or SWAP_STEPS.get(device.type, 5)
    raw = ts.initialize_state([a for _, a in structures], device, dtype)
    volume0 = raw.volume.abs().clone()

    # initial forces for FIRE, in binned batches (one model call per batch, not per structure)
    binning: BinningAutoBatcher[Any] = BinningAutoBatcher(
        model, memory_scales_with="n_atoms", max_memory_scaler=batch_atoms
    )
    binning.load_states(raw)
    initialised = binning.restore_original_order(
        [ts.fire_init(b, model, cell_filter=cell_filter, fire_flavor="ase_fire") for b, _ in binning]
    )

    batcher: InFlightAutoBatcher[Any] = InFlightAutoBatcher(
        model, memory_scales_with="n_atoms", max_memory_scaler=batch_atoms
    )
    batcher.load_states(initialised)
    state, _ = batcher.next_batch(None, None)
    current = list(batcher.current_idx)
    n = len(structures)
    steps = np.zeros(n, dtype=int)
    verdict: list[tuple[str, str] | None] = [None] * n
    finals: list = [None] * n
    while state is not None:
        for _ in range(swap_steps):
            state = ts.fire_step(state, model, fire_flavor="ase_fire")
        idx = np.asarray(current)
        steps[idx] += swap_steps
        converged, exploded, blowup = (t.cpu().numpy() for t in _finished(state, settings.fmax, volume0[idx]))
        out_of_steps = steps[idx] >= settings.max_steps
        for pos, og in enumerate(idx):
            if exploded[pos]:
                why = f"volume grew more than {MAX_VOLUME_FACTOR:g}x" if blowup[pos] else "non-finite energy or forces"
                verdict[og] = ("exploded", why)
            elif converged[pos]:
                verdict[og] = ("ok", "")
            elif out_of_steps[pos]:
                verdict[og] = ("unconverged", f"not converged in {steps[og]} steps")
        done = torch.as_tensor(converged | exploded | out_of_steps, device=device)
        k0 = len(batcher.completed_idx_og_order)
        state, completed = batcher.next_batch(state, done)
        for og, final in zip(batcher.completed_idx_og_order[k0:], completed):
            finals[og] = final
        current = list(batcher.current_idx)
    walltime = (time.perf_counter() - t0) / n
    return [
        _result(cid, atoms, finals[i], verdict[i], int(steps[i]), walltime) for i, (cid, atoms) in enumerate(structures)
    ]


def _result(
    cid: str, initial: Atoms, final, verdict: tuple[str, str] | None, n_steps: int, walltime: float
) -> RelaxResult:
    from ase.stress import full_3x3_to_voigt_6_stress

    atoms = final.to_atoms()[0]
    atoms.calc = None
    energy = float(final.energy[0])
    forces = final.forces.detach().cpu().numpy()
    stress = full_3x3_to_voigt_6_stress(final.stress[0].detach().cpu().numpy())
    assert verdict is not None  # a structure leaves the batch only with a verdict
    status, reason = classify(initial, atoms, *verdict)
    if status == "exploded":
        energy = float("nan")
    return RelaxResult(
        cid,
        status,
        reason,
        atoms,
        energy=energy,
        n_steps=n_steps,
        forces=forces,
        stress=stress,
        walltime_s=walltime,
        engine="torch-sim",
    )


def committee_spread(atoms_list: list[Atoms], members: list, batch_atoms: int | None = None) -> np.ndarray:
    """Per structure: (energy std in eV/atom, largest per-atom force std in eV/Å) over members.

    One batched evaluation per member; the force spread of an atom is the norm of its
    per-component standard deviations, and a structure's is its largest atom's.
    """
    import torch_sim as ts

    out = np.full((len(atoms_list), 2), np.nan)
    if len(members) < 2 or not atoms_list:
        return out if len(members) >= 2 else np.zeros((len(atoms_list), 2))
    device, dtype = members[0].device, members[0].dtype
    for start, chunk in atom_chunks(atoms_list, batch_atoms or CPU_BATCH_ATOMS):
        state = ts.initialize_state(chunk, device, dtype)
        outs = [m(state) for m in members]
        energy = torch.stack([o["energy"] for o in outs])  # members x systems
        forces = torch.stack([o["forces"] for o in outs])  # members x atoms x 3
        counts = torch.bincount(state.system_idx).to(dtype)
        e_std = energy.std(0, unbiased=False) / counts
        f_std = forces.std(0, unbiased=False).norm(dim=1)
        f_max = torch.zeros(len(chunk), device=device, dtype=dtype).scatter_reduce(
            0, state.system_idx, f_std, reduce="amax", include_self=False
        )
        out[start : start + len(chunk)] = torch.stack([e_std, f_max], 1).detach().cpu().numpy()
    return out


def atom_chunks(atoms_list: list[Atoms], limit: int):
    """Consecutive ``(start, chunk)`` slices of at most ``limit`` atoms (a larger structure alone)."""
    start, n_atoms = 0, 0
    chunk: list[Atoms] = []
    for a in atoms_list:
        if chunk and n_atoms + len(a) > limit:
            yield start, chunk
            start, chunk, n_atoms = start + len(chunk), [], 0
        chunk.append(a)
        n_atoms += len(a)
    if chunk:
        yield start, chunk
