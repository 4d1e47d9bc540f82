"""The committee's curvature at the structures a verification starts from.

A verification starts from the MLIP-relaxed structure (:mod:`matdisc.stages.start`). BFGS would
begin there with ASE's guess of the Hessian (70 eV/Å² times the identity) and spend its first DFT
steps learning a curvature the model already knows. The committee mean's Hessian in the
relaxation's own coordinates (:func:`matdisc.ase_relax.relaxation_hessian`) replaces the guess;
BFGS updates it with every DFT step, so a model that is off costs steps, never accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from ase import Atoms

from matdisc.ase_relax import Evaluation, relaxation_hessian
from matdisc.config import MLIPConfig
from matdisc.mlip.model import resolve_device
from matdisc.mlip.relax import load_committee


def hessians_many(
    structures: list[tuple[str, Atoms]], model_paths: list[str], mlip: MLIPConfig, *, relax_cell: bool = True
) -> list[tuple[str, np.ndarray | None, str]]:
    """``(id, Hessian, "")`` per structure, in order, or ``(id, None, reason)`` where the model
    gave none (a non-finite force, an error): that relaxation starts with ASE's guess. Each
    structure's displaced copies are evaluated in batches by the committee mean (torch-sim)."""
    model, _ = load_committee(model_paths, mlip, resolve_device(mlip.device))
    evaluate = batched_evaluation(model, mlip.batch_atoms)
    out: list[tuple[str, np.ndarray | None, str]] = []
    for cid, atoms in structures:
        try:
            out.append((cid, relaxation_hessian(atoms, evaluate, relax_cell=relax_cell, cell_filter="frechet"), ""))
        except Exception as err:  # one structure's failure is its own; the others go on
            out.append((cid, None, f"{type(err).__name__}: {err}".splitlines()[0][:200]))
    return out


def batched_evaluation(model, batch_atoms: int | None = None) -> Callable[[list[Atoms]], list[Evaluation]]:
    """Energy, forces and stress (ASE's Voigt convention) of many structures, a batch at a time."""
    import torch_sim as ts
    from ase.stress import full_3x3_to_voigt_6_stress

    from matdisc.mlip.batched import CPU_BATCH_ATOMS, atom_chunks

    def evaluate(structures: list[Atoms]) -> list[Evaluation]:
        out: list[Evaluation] = []
        for _, chunk in atom_chunks(structures, batch_atoms or CPU_BATCH_ATOMS):
            state = ts.initialize_state(chunk, model.device, model.dtype)
            res = model(state)
            forces = res["forces"].detach().cpu().numpy()
            at = np.cumsum([0] + [len(a) for a in chunk])
            for k in range(len(chunk)):
                stress = full_3x3_to_voigt_6_stress(res["stress"][k].detach().cpu().numpy())
                out.append((float(res["energy"][k]), forces[at[k] : at[k + 1]], stress))
        return out

    return evaluate
