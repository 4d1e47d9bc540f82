"""Where a verification starts: the structure its reference relaxation begins from, and the
curvature BFGS begins with there.

With ``reference.start: mlip`` a pick's DFT relaxation starts from its MLIP-relaxed structure when
that relaxation can be trusted (:func:`mlip_starts`), so DFT starts near its answer and verifies
the geometry the model scored; with ``reference.hessian: mlip`` BFGS starts there from the
screening committee's Hessian instead of ASE's 70 eV/Å² guess (:mod:`matdisc.mlip.hessian`).
The ``dft`` table records both per calculation (``start``, ``start_reason``, ``hessian``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
from ase import Atoms

from matdisc import jobs as run_jobs
from matdisc.config import ReferenceConfig
from matdisc.records import USABLE
from matdisc.stages.context import Round
from matdisc.stages.generate import candidate_atoms
from matdisc.stages.registry import current_model
from matdisc.store import CampaignWriter

#: ``hessian`` of a calculation that BFGS started with ASE's guess (70 eV/Å² times the identity).
DEFAULT_HESSIAN = "default"


@dataclass(frozen=True)
class Start:
    """Where one reference relaxation starts: ``start`` is ``mlip`` or ``initial``; ``reason``
    says why the initial structure was used where the configuration asked for the MLIP one.
    ``hessian``: BFGS's initial Hessian there; ``curvature`` what it is (``mlip``, or ``default``
    with the reason when the configuration asked for the model's)."""

    atoms: Atoms
    start: str
    reason: str = ""
    hessian: np.ndarray | None = None
    curvature: str = DEFAULT_HESSIAN


def reference_starts(w: CampaignWriter, ref: ReferenceConfig, ids: list[str]) -> dict[str, Start]:
    """id -> the structure its reference relaxation starts from: with ``ref.start`` ``mlip``, the
    latest MLIP-relaxed structure where :func:`mlip_starts` allows it, else the generated one."""
    if ref.start == "initial":
        return {cid: Start(a, "initial") for cid, a in candidate_atoms(w, ids)}
    return mlip_starts(w, ids, ref.start_max_volume_change)


def mlip_starts(w: CampaignWriter, ids: list[str], max_volume_change: float) -> dict[str, Start]:
    """id -> where a relaxation that could continue from the MLIP structure starts.

    The latest MLIP-relaxed structure when that relaxation is usable (``ok``, ``symmetry_changed``),
    changed the volume by at most ``max_volume_change`` and is still the generated structure's type
    by StructureMatcher (default tolerances, volume scaled out): then it starts near its answer. A
    young model can carry a cell into another basin (squeezed, sheared, atoms swapped into another
    arrangement); then the generated structure, with the reason.
    """
    from pymatgen.core.structure_matcher import StructureMatcher
    from pymatgen.io.ase import AseAtomsAdaptor

    initial = dict(candidate_atoms(w, ids))
    mlip = w.table("mlip")
    frames, row_of = w.latest_frames("mlip", mlip)
    matcher = StructureMatcher()
    out = {}
    for cid in ids:
        if cid not in row_of or frames is None:
            out[cid] = Start(initial[cid], "initial", "no MLIP result")
            continue
        row = row_of[cid]
        status = str(mlip["status"].iloc[row])
        relaxed = frames.atoms(row)
        change = relaxed.get_volume() / initial[cid].get_volume() - 1
        if status not in USABLE:
            out[cid] = Start(initial[cid], "initial", f"MLIP outcome {status}")
        elif abs(change) > max_volume_change:
            out[cid] = Start(initial[cid], "initial", f"MLIP volume change {change:+.0%}")
        elif not matcher.fit(AseAtomsAdaptor.get_structure(initial[cid]), AseAtomsAdaptor.get_structure(relaxed)):
            out[cid] = Start(initial[cid], "initial", "MLIP structure no longer matches the generated one")
        else:
            out[cid] = Start(relaxed, "mlip")
    return out


def with_hessians(ctx: Round, starts: dict[str, Start]) -> dict[str, Start]:
    """``starts`` with the screening committee's Hessian at each MLIP start, computed on an MLIP
    worker in one job, when ``reference.hessian`` is ``mlip`` and the optimizer BFGS. Where the
    model gives none (a non-finite force, its job failed) that start keeps ASE's guess and the
    reason goes into its ``curvature`` (and the log)."""
    ref = ctx.cfg.reference.resolved()
    todo = [(cid, s.atoms) for cid, s in starts.items() if s.start == "mlip"]
    if ref.hessian != "mlip" or ref.optimizer != "BFGS" or not ref.max_steps or not todo:
        return starts
    model = current_model(ctx.w, before_round=ctx.number)
    if model is None:  # round >= 1 always has one; nothing relaxed these structures otherwise
        return starts
    ctx.check_trusted(model.paths)
    t0 = time.perf_counter()
    mlip = ctx.cfg.mlip.model_dump(mode="json")
    fut = ctx.executor.submit(run_jobs.hessians, todo, model.paths, mlip, ref.relax_cell, ctx.remote, resource="mlip")
    try:
        results = fut.result()
    except ctx.executor.fatal:
        raise
    except Exception as err:  # the MLIP worker gave up: the verifications go on with ASE's guess
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        results = [(cid, None, f"job failed: {reason}") for cid, _ in todo]
    out = dict(starts)
    for cid, hessian, why in results:
        curvature = "mlip" if hessian is not None else f"{DEFAULT_HESSIAN}: model Hessian {why}"
        out[cid] = replace(starts[cid], hessian=hessian, curvature=curvature)
        if hessian is None:
            ctx.log.warning("round %d: %s starts BFGS with ASE's guess: model Hessian %s", ctx.number, cid, why)
    ctx.log.info(
        "round %d: the committee's Hessian at %d MLIP starts in %.1f s",
        ctx.number,
        sum(h is not None for _, h, _ in results),
        time.perf_counter() - t0,
    )
    return out
