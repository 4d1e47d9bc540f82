"""The round's jobs: the plain functions an executor runs on an MLIP or a DFT worker.

Arguments are plain data (atoms, paths, configuration as JSON-able dicts) so that any engine
can ship them; the science libraries are imported inside each job, so a DFT worker never loads
torch and MACE (about 10 s and several hundred MB), and an MLIP worker never loads GPAW.
``store``: the URL of a store on an object store, to fetch models a worker cannot see.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from ase import Atoms

    from matdisc.mlip.train import TrainedModel
    from matdisc.records import ReferenceResult, RelaxResult


def relax(
    batch: list[tuple[str, Atoms]], model_paths: list[str], mlip: dict, store: str | None = None
) -> list[RelaxResult]:
    """MLIP relaxations of ``(id, atoms)`` with the committee at ``model_paths``."""
    from matdisc.config import MLIPConfig
    from matdisc.mlip import relax_many
    from matdisc.mlip.model import worker_threads
    from matdisc.mlip.shipping import localize

    worker_threads()
    return relax_many(batch, localize(model_paths, store), MLIPConfig.model_validate(mlip))


def reference(
    cid: str,
    atoms: Atoms,
    reference: dict,
    workdir: str,
    hessian: np.ndarray | None = None,
    threads: int | None = None,
) -> ReferenceResult:
    """One reference relaxation and single point (:func:`matdisc.dft.run_reference`), BFGS
    starting from ``hessian`` when given."""
    from matdisc.config import ReferenceConfig
    from matdisc.dft import run_reference

    return run_reference(
        atoms, ReferenceConfig(**reference), id=cid, workdir=Path(workdir), threads=threads, hessian=hessian
    )


def hessians(
    batch: list[tuple[str, Atoms]], model_paths: list[str], mlip: dict, relax_cell: bool, store: str | None = None
) -> list[tuple[str, np.ndarray | None, str]]:
    """The committee's Hessians at ``(id, atoms)`` in the reference relaxation's coordinates
    (:func:`matdisc.mlip.hessian.hessians_many`)."""
    from matdisc.config import MLIPConfig
    from matdisc.mlip.hessian import hessians_many
    from matdisc.mlip.model import worker_threads
    from matdisc.mlip.shipping import localize

    worker_threads()
    return hessians_many(batch, localize(model_paths, store), MLIPConfig.model_validate(mlip), relax_cell=relax_cell)


def rescore(
    batch: list[tuple[str, Atoms]], model_paths: list[str], mlip: dict, store: str | None = None
) -> list[RelaxResult]:
    """The committee's energies and spreads at ``(id, atoms)`` as they stand (no relaxation)."""
    from matdisc.config import MLIPConfig
    from matdisc.mlip import rescore_many
    from matdisc.mlip.model import worker_threads
    from matdisc.mlip.shipping import localize

    worker_threads()
    return rescore_many(batch, localize(model_paths, store), MLIPConfig.model_validate(mlip))


def statics(
    jobs: list[tuple[str, Atoms]], reference: dict, workdir: str, threads: int | None = None
) -> list[ReferenceResult]:
    """Single points of ``(id, atoms)`` jobs in one calculation process (:func:`matdisc.dft.run_statics`)."""
    from matdisc.config import ReferenceConfig
    from matdisc.dft import run_statics

    return run_statics(jobs, ReferenceConfig(**reference), workdir=Path(workdir), threads=threads)


def evaluate(models: list[list[str]], frames: list[Atoms], device: str, dtype: str, store: str | None = None) -> list:
    """Energies per committee of ``frames`` (one list per entry of ``models``)."""
    from matdisc.mlip import predict_energies, resolve_device
    from matdisc.mlip.model import worker_threads
    from matdisc.mlip.shipping import localize

    worker_threads()
    return [
        predict_energies(localize(paths, store), frames, device=resolve_device(device), dtype=dtype) for paths in models
    ]


def train(
    frames: list[Atoms],
    groups: list[str],
    workdir: str,
    training: dict,
    size: int,
    seed: int,
    device: str,
    dtype: str,
    start_models: list[str] | None,
    store: str | None = None,
) -> list[TrainedModel]:
    """A committee trained (or fine-tuned from ``start_models``); with ``store`` the trained files
    travel back as bytes."""
    from matdisc.config import TrainingConfig
    from matdisc.mlip import resolve_device, train_committee
    from matdisc.mlip.model import worker_threads
    from matdisc.mlip.shipping import localize, pack

    worker_threads()  # the members' held-out evaluation runs in this process

    trained = train_committee(
        frames,
        groups,
        Path(workdir),
        TrainingConfig(**training),
        size=size,
        seed=seed,
        device=resolve_device(device),
        dtype=dtype,
        start_models=localize(start_models, store) if start_models else None,
    )
    return pack(trained) if store else trained
