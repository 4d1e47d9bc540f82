"""Where a round's calculations run: the seam between the round and a workflow engine.

The round (:mod:`matdisc.round`) submits plain job functions (:mod:`matdisc.jobs`) with the
kind of worker they need and records each result as it completes. An executor decides where
they run and tells the user how it goes. :class:`InProcess` runs every job here, in order: a
notebook, a test or a benchmark runs a whole campaign without Prefect or Dask. The Prefect +
Dask executor lives on the engine side (``flows/executor.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

if TYPE_CHECKING:
    import pandas as pd

    from matdisc.config import CampaignConfig
    from matdisc.mlip.train import TrainedModel
    from matdisc.store import CampaignWriter

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

#: The kinds of worker a job needs: the MLIP workers (GPU where present) or the DFT workers.
Resource = Literal["mlip", "dft"]


class JobFuture(Protocol[T_co]):
    """What ``submit`` returns: ``concurrent.futures.Future`` and Prefect's futures both fit."""

    def result(self, timeout: float | None = None) -> T_co:
        """The job's value (its exception raised); ``TimeoutError`` when not done within ``timeout`` s."""
        ...


class Progress(Protocol):
    """Counts finished work of one stage; ``done`` is the count so far."""

    done: int

    def advance(self, n: int = 1) -> None: ...


class Executor(Protocol):
    """Runs a round's jobs and reports its progress.

    ``fatal``: exceptions a job's result may raise that stop the campaign (the engine itself is
    gone) instead of being recorded as that job's failure.
    """

    log: logging.Logger | logging.LoggerAdapter
    fatal: tuple[type[BaseException], ...]

    def submit(self, fn: Callable[..., T], *args: Any, resource: Resource) -> JobFuture[T]: ...

    def as_completed(self, futures: Iterable[JobFuture[Any]]) -> Iterator[JobFuture[Any]]: ...

    def progress(self, cfg: CampaignConfig, round_: int, what: str, total: int) -> Progress: ...

    def trained(self, cfg: CampaignConfig, round_: int, models: list[TrainedModel]) -> None: ...

    def round_done(
        self, w: CampaignWriter, cfg: CampaignConfig, round_: int, metrics: dict, cand: pd.DataFrame
    ) -> None: ...

    def stopped(self, w: CampaignWriter, cfg: CampaignConfig, round_: int, reason: str) -> None: ...

    def opened(self, w: CampaignWriter, cfg: CampaignConfig, earlier_runs: list[str], run_id: str) -> None: ...


def counts(done: int, total: int, started: float) -> str:
    """'120/400, about 3 min left': the count and the time left at the rate so far (``started``:
    ``time.monotonic()`` when the stage began)."""
    text = f"{done}/{total}"
    if 0 < done < total:
        left = (time.monotonic() - started) * (total - done) / done
        text += f", about {left:.0f} s left" if left < 90 else f", about {left / 60:.0f} min left"
    return text


class Counter:
    """A progress counter that reports nothing (the log lines say how a stage goes)."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def advance(self, n: int = 1) -> None:
        self.done += n


class InProcess:
    """Every job runs in this process when it is submitted; results complete in submission order.

    A job that raises is a failed future, as on a worker: the round records it and goes on.
    """

    fatal: tuple[type[BaseException], ...] = ()

    def __init__(self, log: logging.Logger | logging.LoggerAdapter | None = None) -> None:
        self.log = log or logging.getLogger("matdisc.round")
        #: (resource, job function name) of every job run, in order: what ran where.
        self.jobs: list[tuple[Resource, str]] = []

    def submit(self, fn: Callable[..., T], *args: Any, resource: Resource) -> Future[T]:
        fut: Future[T] = Future()
        self.jobs.append((resource, fn.__name__))
        try:
            fut.set_result(fn(*args))
        except Exception as err:  # noqa: BLE001 - the round decides what a failed job means
            fut.set_exception(err)
        return fut

    def as_completed(self, futures: Iterable[JobFuture[Any]]) -> Iterator[JobFuture[Any]]:
        return iter(list(futures))

    def progress(self, cfg: CampaignConfig, round_: int, what: str, total: int) -> Progress:
        return Counter(total)

    def trained(self, cfg: CampaignConfig, round_: int, models: list[TrainedModel]) -> None:
        return None

    def round_done(
        self, w: CampaignWriter, cfg: CampaignConfig, round_: int, metrics: dict, cand: pd.DataFrame
    ) -> None:
        return None

    def stopped(self, w: CampaignWriter, cfg: CampaignConfig, round_: int, reason: str) -> None:
        return None

    def opened(self, w: CampaignWriter, cfg: CampaignConfig, earlier_runs: list[str], run_id: str) -> None:
        return None
