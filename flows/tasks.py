"""The campaign's Prefect tasks: one matdisc call each, run on Dask workers.

Kept apart from the flow and light to import: a worker imports this module to run a task,
so the science libraries are imported inside each task. A DFT worker then never loads
torch and MACE (about 10 s and several hundred MB per worker), and an MLIP worker never
loads GPAW.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task

from matdisc.config import MLIPConfig, ReferenceConfig, TrainingConfig

if TYPE_CHECKING:
    from matdisc.mlip.train import TrainedModel

#: Exceptions worth a retry: out of memory, I/O and connection trouble. The matdisc functions
#: return failed calculations as results, so anything else raised in a task is a bug or bad
#: input that would fail again. (A lost Dask worker never reaches Prefect: Dask reruns the task.)
TRANSIENT = (MemoryError, OSError, TimeoutError, ConnectionError)


def transient_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only what may succeed on a second try."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except RuntimeError as err:  # torch reports CUDA/CPU allocation failures as RuntimeError
        return "out of memory" in str(err).lower()
    except BaseException:  # noqa: BLE001 - deterministic: do not retry
        return False
    return False


RETRY = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_condition_fn": transient_failure}


def worker_threads() -> int | None:
    """The Dask worker's thread count (None outside a worker): the cores its calculation may use."""
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return None


@task(name="relax-mace", **RETRY)
def relax_task(batch: list, model_paths: list[str], mlip: dict, store: str | None = None) -> list:
    """``store``: the URL of a store on an object store, to fetch models this worker cannot see."""
    from matdisc.mlip import relax_many
    from matdisc.mlip.shipping import localize

    return relax_many(batch, localize(model_paths, store), MLIPConfig.model_validate(mlip))


@task(name="reference-relax-static", **RETRY)
def reference_task(cid: str, atoms: Any, reference: dict, workdir: str) -> Any:
    from matdisc.dft import run_reference

    return run_reference(atoms, ReferenceConfig(**reference), id=cid, workdir=Path(workdir), threads=worker_threads())


@task(name="reference-statics", **RETRY)
def statics_task(jobs: list, reference: dict, workdir: str) -> list:
    """Single points of ``(id, atoms)`` jobs in one calculation process (see ``run_statics``)."""
    from matdisc.dft import run_statics

    return run_statics(jobs, ReferenceConfig(**reference), workdir=Path(workdir), threads=worker_threads())


@task(name="evaluate-mace", **RETRY)
def evaluate_task(models: list[list[str]], frames: list, device: str, dtype: str, store: str | None = None) -> list:
    from matdisc.mlip import predict_energies, resolve_device
    from matdisc.mlip.shipping import localize

    return [
        predict_energies(localize(paths, store), frames, device=resolve_device(device), dtype=dtype) for paths in models
    ]


@task(name="train-mace", **RETRY)
def train_task(
    frames: list,
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
    """``store``: the URL of a store on an object store; the trained files then travel back as bytes."""
    from matdisc.mlip import resolve_device, train_committee
    from matdisc.mlip.shipping import localize, pack

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
