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
    """Counts finished work of one stage; ``done`` is the count so far, ``text()`` says it with the
    time left ("120/400, about 3 min left")."""

    done: int

    def advance(self, n: int = 1, left_s: float | None = None) -> None:
        """Count ``n`` more finished; ``left_s``: the time left, when the stage knows it better than
        the rate so far (its parts differ in cost)."""
        ...

    def text(self) -> str: ...


class Executor(Protocol):
    """Runs a round's jobs and reports its progress.

    ``fatal``: exceptions a job's result may raise that stop the campaign (the engine itself is
    gone) instead of being recorded as that job's failure.
    """

    log: logging.Logger | logging.LoggerAdapter
    fatal: tuple[type[BaseException], ...]

    def submit(self, fn: Callable[..., T], *args: Any, resource: Resource) -> JobFuture[T]: ...

    def as_completed(self, futures: Iterable[JobFuture[Any]]) -> Iterator[JobFuture[Any]]: ...

    def progress(
        self, cfg: CampaignConfig, round_: int, what: str, total: int, expected_s: float | None = None
    ) -> Progress:
        """A stage's progress; ``expected_s``: the cost model's wall time for all of it, the time
        left until the first results give a rate."""
        ...

    def trained(self, cfg: CampaignConfig, round_: int, models: list[TrainedModel]) -> None: ...

    def round_done(
        self, w: CampaignWriter, cfg: CampaignConfig, round_: int, metrics: dict, cand: pd.DataFrame
    ) -> None: ...

    def stopped(self, w: CampaignWriter, cfg: CampaignConfig, round_: int, reason: str) -> None: ...

    def opened(self, w: CampaignWriter, cfg: CampaignConfig, earlier_runs: list[str], run_id: str) -> None: ...


def duration(seconds: float) -> str:
    """'45 s', '3 min', '2.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def counts(done: int, total: int, started: float, expected_s: float | None = None, left_s: float | None = None) -> str:
    """'120/400, about 3 min left': the count and the time left (``started``: ``time.monotonic()``
    when the stage began). The time left is ``left_s`` when given, else the rate so far; before
    the first result it is the prediction ``expected_s`` less the time spent, said as predicted."""
    text = f"{done}/{total}"
    if done >= total:
        return text
    spent = time.monotonic() - started
    if left_s is None and done > 0:
        left_s = spent * (total - done) / done
    if left_s is not None:
        return text + f", about {duration(left_s)} left"
    if expected_s is None:
        return text
    if expected_s > spent:
        return text + f", about {duration(expected_s - spent)} left (predicted)"
    return text + f", over the predicted {duration(expected_s)}"


class Counter:
    """A stage's progress that reports nothing itself (the stage's log lines say it)."""

    def __init__(self, total: int, expected_s: float | None = None) -> None:
        self.total, self.done, self.expected_s = total, 0, expected_s
        self.left_s: float | None = None
        self.started = time.monotonic()

    def advance(self, n: int = 1, left_s: float | None = None) -> None:
        self.done += n
        self.left_s = left_s

    def text(self) -> str:
        return counts(self.done, self.total, self.started, self.expected_s, self.left_s)


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

    def progress(
        self, cfg: CampaignConfig, round_: int, what: str, total: int, expected_s: float | None = None
    ) -> Progress:
        return Counter(total, expected_s)

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
