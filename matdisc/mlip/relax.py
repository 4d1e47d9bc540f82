"""Relaxing many structures with a MACE model (or committee) in one call.

One Dask task relaxes a whole list: the model loads once, and per-task overhead is paid
once per hundreds of structures. The committee mean drives the relaxation; the spread of
the members' energies at the relaxed structure is the uncertainty ``sigma`` (eV/atom).
"""

from __future__ import annotations

import numpy as np
from ase import Atoms

from matdisc.mlip.model import load_calculator
from matdisc.optimize import relax
from matdisc.records import RelaxResult


def relax_many(
    structures: list[tuple[str, Atoms]],
    model_paths: list[str],
    *,
    fmax: float = 0.05,
    max_steps: int = 300,
    device: str = "cpu",
    dtype: str = "float64",
) -> list[RelaxResult]:
    """Relax ``(id, atoms)`` pairs (positions + cell); one result per input, in order."""
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    calc = load_calculator(model_paths, device=device, dtype=dtype)
    results = []
    for cid, atoms in structures:
        res = relax(atoms, calc, id=cid, fmax=fmax, max_steps=max_steps, relax_cell=True)
        if res.status in ("ok", "unconverged") and len(model_paths) > 1:
            member = np.asarray(calc.results.get("energies", [res.energy]), dtype=float)
            res.sigma = float(np.std(member) / len(res.atoms))
        elif res.status in ("ok", "unconverged"):
            res.sigma = 0.0
        results.append(res)
    return results
