"""The campaign's Prefect tasks: one job function of :mod:`matdisc.jobs` each, run on Dask workers.

Light to import: a worker imports this module to run a task, and the jobs import the science
libraries inside, so a DFT worker never loads torch and MACE, and an MLIP worker never loads GPAW.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prefect import task

from matdisc import jobs

if TYPE_CHECKING:
    pass

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


def retried_task(name: str, run_name: str | Callable[[], str] | None = None) -> Any:
    """A Prefect task decorator: retried twice (after 5 and 30 s) when ``transient_failure`` says so;
    its runs are named ``run_name`` (a template of the task's parameters, or a function)."""
    return task(
        name=name,
        task_run_name=run_name,
        retries=2,
        retry_delay_seconds=[5, 30],
        retry_condition_fn=transient_failure,
    )


def _batch_name(stage: str, key: str) -> Callable[[], str]:
    """A task run's name from the ``(id, atoms)`` batch its parameter ``key`` holds: the stage, the
    first candidate and how many more, so the UI's list says what each run computed."""

    def name() -> str:
        from prefect.runtime import task_run

        batch = task_run.parameters.get(key) or []
        first = batch[0][0] if batch else "nothing"
        return f"{stage} {first}" + (f" +{len(batch) - 1}" if len(batch) > 1 else "")

    return name


def worker_threads() -> int | None:
    """The Dask worker's thread count (None outside a worker): the cores its calculation may use."""
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return None


#: The jobs that need nothing of the worker are the job functions themselves, as Prefect tasks.
relax_task = retried_task("relax-mace", _batch_name("relax", "batch"))(jobs.relax)
rescore_task = retried_task("rescore-mace", _batch_name("rescore", "batch"))(jobs.rescore)
evaluate_task = retried_task("evaluate-mace")(jobs.evaluate)
train_task = retried_task("train-mace")(jobs.train)
hessians_task = retried_task("hessians-mace", _batch_name("hessians", "batch"))(jobs.hessians)


@retried_task("reference-relax-static", "dft {cid}")
def reference_task(cid: str, atoms: Any, reference: dict, workdir: str, hessian: Any = None) -> Any:
    """A reference calculation using the cores this Dask worker has."""
    return jobs.reference(cid, atoms, reference, workdir, hessian, threads=worker_threads())


@retried_task("reference-statics", _batch_name("dft-statics", "batch"))
def statics_task(batch: list, reference: dict, workdir: str) -> list:
    """Single points of ``(id, atoms)`` jobs in one calculation process (see ``run_statics``)."""
    return jobs.statics(batch, reference, workdir, threads=worker_threads())


#: The Prefect task of each job function the round submits.
TASKS: dict[Callable[..., Any], Any] = {
    jobs.relax: relax_task,
    jobs.rescore: rescore_task,
    jobs.reference: reference_task,
    jobs.statics: statics_task,
    jobs.evaluate: evaluate_task,
    jobs.train: train_task,
    jobs.hessians: hessians_task,
}
