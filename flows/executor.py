"""The Prefect + Dask executor: a round's jobs as Prefect tasks on Dask workers routed by
resources (MLIP vs DFT), its progress and reports as Prefect artifacts."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import dask
import httpx
import pandas as pd
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture, as_completed

from matdisc.config import CampaignConfig
from matdisc.executor import Progress, Resource
from matdisc.mlip.train import TrainedModel
from matdisc.report import round_report
from matdisc.store import CampaignWriter
from matdisc_flows import artifacts, runs, tasks
from matdisc_flows.artifacts import slug
from matdisc_flows.cluster import DFT, MLIP

RESOURCES: dict[str, dict[str, int]] = {"mlip": MLIP, "dft": DFT}


class TaskFuture:
    """A Prefect future whose ``result()`` reports a lost Prefect API as ``httpx.ConnectError``.

    Prefect raises ``RuntimeError("Failed to reach API at ...")`` from a task's result when its
    server is gone: that is the engine failing, not the job, so it must stop the run (``fatal``)
    instead of being recorded as the job's failure.
    """

    def __init__(self, future: PrefectFuture) -> None:
        self.future = future

    def result(self, timeout: float | None = None) -> Any:
        try:
            return self.future.result(timeout=timeout)
        except RuntimeError as err:
            if "Failed to reach API" in str(err):
                raise httpx.ConnectError(str(err)) from err
            raise


class PrefectDask:
    """Submits each job as its Prefect task (``matdisc_flows.tasks.TASKS``) to the flow's task runner.

    Called from inside a flow run. An unreachable Prefect API (``httpx.HTTPError``) stops the
    run: the jobs in flight are redone by the next run.
    """

    fatal: tuple[type[BaseException], ...] = (httpx.HTTPError,)

    def __init__(self) -> None:
        self.log = get_run_logger()

    def submit(self, fn: Callable[..., Any], *args: Any, resource: Resource) -> TaskFuture:
        with dask.annotate(resources=RESOURCES[resource]):
            return TaskFuture(tasks.TASKS[fn].submit(*args))

    def as_completed(self, futures: Iterable[TaskFuture]) -> Iterator[TaskFuture]:
        wrapped = {f.future: f for f in futures}
        return (wrapped[f] for f in as_completed(list(wrapped)))

    def progress(
        self, cfg: CampaignConfig, round_: int, what: str, total: int, expected_s: float | None = None
    ) -> Progress:
        return artifacts.StageProgress(cfg, round_, what, total, expected_s)

    def opened(self, w: CampaignWriter, cfg: CampaignConfig, earlier_runs: list[str], run_id: str) -> None:
        dead = runs.mark_stale_runs_crashed(earlier_runs, run_id, str(cfg.store_path))
        if dead:  # the writer lock is ours: whoever wrote before is gone, whatever the UI said
            self.log.warning(
                "marked Crashed: %s (earlier runs of this store that the API still showed running)", ", ".join(dead)
            )

    def trained(self, cfg: CampaignConfig, round_: int, models: list[TrainedModel]) -> None:
        create_table_artifact(
            key=f"{slug(cfg.name)}-training-r{round_}",
            table=[
                {
                    "member": k,
                    "mode": m.mode,
                    "train_frames": m.n_train,
                    "valid_frames": m.n_valid,
                    **{name: round(v, 5) for name, v in m.metrics.items()},
                }
                for k, m in enumerate(models)
            ],
            description=f"{cfg.name}: MACE training, round {round_} (errors on held-out reference frames)",
        )

    def round_done(
        self, w: CampaignWriter, cfg: CampaignConfig, round_: int, metrics: dict, cand: pd.DataFrame
    ) -> None:
        create_markdown_artifact(
            key=f"{slug(cfg.name)}-round-{round_}",
            markdown=round_report(cfg, metrics, cand),
            description=f"{cfg.name} round {round_}",
        )
        artifacts.discovery_table(w, cfg)
        artifacts.candidates_table(cfg, round_, cand)
        artifacts.round_figures(cfg, round_, cand)
        artifacts.costs_table(w, cfg)

    def stopped(self, w: CampaignWriter, cfg: CampaignConfig, round_: int, reason: str) -> None:
        artifacts.stop_report(w, cfg, round_, reason)
