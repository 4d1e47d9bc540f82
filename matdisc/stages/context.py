"""The context a stage runs in: the campaign's run (writer, config, executor) and the round."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from matdisc.budget import planning
from matdisc.mlip.model import check_trusted, trusted_roots

if TYPE_CHECKING:
    import logging

    from matdisc.budget.costs import Rates
    from matdisc.config import CampaignConfig
    from matdisc.executor import Executor
    from matdisc.store import CampaignWriter


@dataclass
class Run:
    """One run of a campaign: the store's writer, its configuration, the executor, and what the
    run's workers have done (its first MLIP stage waits for them to import torch and MACE, and
    its predicted cost says so)."""

    w: CampaignWriter
    cfg: CampaignConfig
    executor: Executor
    mlip_started: bool = False

    def round(self, number: int) -> Round:
        return Round(self, number)

    def first_mlip(self, cost: planning.StageCost, rates: Rates) -> planning.StageCost:
        started, self.mlip_started = self.mlip_started, True
        return cost if started else cost.started(rates.mlip_start_s)


@dataclass(frozen=True)
class Round:
    """One round of a run: what every stage function takes."""

    run: Run
    number: int

    @property
    def w(self) -> CampaignWriter:
        return self.run.w

    @property
    def cfg(self) -> CampaignConfig:
        return self.run.cfg

    @property
    def executor(self) -> Executor:
        return self.run.executor

    @property
    def log(self) -> logging.Logger | logging.LoggerAdapter:
        return self.run.executor.log

    def rates(self) -> Rates:
        """The campaign's cost rates as measured so far (each stage's costs refine them)."""
        return planning.campaign_rates(self.cfg, self.w)[0]

    @property
    def remote(self) -> str | None:
        """The URL of a store on an object store: workers fetch models from it (no shared filesystem)."""
        return self.w.remote.url if self.w.remote is not None else None

    def check_trusted(self, paths: list[str]) -> None:
        """Model files load only from the store's models and the configured model file."""
        configured = [Path(self.cfg.mlip.model)] if self.cfg.mlip.is_model_file else []
        check_trusted(paths, trusted_roots([self.w.path / "models", *configured]))
