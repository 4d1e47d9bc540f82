"""What a campaign shows in the Prefect UI: progress, per-round tables, figures, the report.

Every artifact key starts with the campaign's slug, so the UI's artifact page groups one
campaign's history (Prefect keeps every version of a key). Artifacts are views of the
store: a failure to draw one is logged, never allowed to fail a round.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast
from uuid import UUID

import pandas as pd
from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from matdisc.config import CampaignConfig
from matdisc.executor import Counter
from matdisc.store import CampaignWriter
from matdisc.store.campaign import DISCOVERY_KEYS
from matdisc_flows import console

if TYPE_CHECKING:
    from rich.progress import TaskID

#: Per-round figures the discovery table artifact shows (the hull itself is in the round report).
DISCOVERY_COLUMNS = ("round", "hits", *(k for k in DISCOVERY_KEYS if k != "hull_phases"))
#: Rows of the per-round candidates table: the best-scored candidates by predicted e_hull.
TOP_CANDIDATES = 25
#: Least interval between progress updates: a fast stage should not flood the API.
UPDATE_SECONDS = 2.0
CANDIDATE_COLUMNS = (
    "id",
    "formula",
    "source",
    "prototype",
    "status",
    "e_hull_pred",
    "sigma",
    "e_hull_dft",
    "is_hit",
    "novel",
    "known_match",
)


def slug(name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _local_store(cfg: CampaignConfig) -> Path:
    """The store on this machine: its path, or for a store at a URL the writer's working copy."""
    from matdisc.store.remote import mirror_dir

    location = cfg.store_path
    return mirror_dir(location) if isinstance(location, str) else location


def report_dir(cfg: CampaignConfig) -> Path:
    """``<store>-report`` beside the store on this machine (never in the working directory)."""
    from matdisc.report import default_report_dir

    return default_report_dir(_local_store(cfg))


def _safely(what: str, make: Callable[[], object]) -> None:
    try:
        make()
    except Exception as err:  # noqa: BLE001 - a view of the store never fails the campaign
        get_run_logger().warning("%s not written: %s", what, err)


class StageProgress(Counter):
    """A stage's progress in the UI (a progress artifact, updated as results come in) and, when
    the run's console is a terminal, as a redrawn bar there."""

    def __init__(self, cfg: CampaignConfig, round_: int, stage: str, total: int, expected_s: float | None = None):
        super().__init__(max(total, 1), expected_s)
        self.description = f"{cfg.name} round {round_}: {stage}"
        self.id: UUID | None = None
        self.bar: TaskID | None = None
        self._last = self.started
        if total:
            # sync-compatible: called from the flow's (sync) code it returns the UUID, not a coroutine
            self.id = cast(
                UUID,
                create_progress_artifact(
                    0.0,
                    key=f"{slug(cfg.name)}-r{round_}-{slug(stage)}",
                    description=f"{self.description} ({self.text()})",
                ),
            )
            if console.BARS is not None:
                self.bar = console.BARS.add(f"round {round_} {stage}", self.total, self.text())

    def advance(self, n: int = 1, left_s: float | None = None) -> None:
        """Count finished work; the terminal's bar hears of it at once, the UI at most every
        ``UPDATE_SECONDS`` and at the end."""
        super().advance(n, left_s)
        if self.bar is not None and console.BARS is not None:
            console.BARS.update(self.bar, self.done, self.text())
        now = time.monotonic()
        if self.id is not None and (self.done >= self.total or now - self._last >= UPDATE_SECONDS):
            self._last = now
            update_progress_artifact(
                self.id, 100.0 * self.done / self.total, description=f"{self.description} ({self.text()})"
            )


def discovery_table(w: CampaignWriter, cfg: CampaignConfig) -> None:
    rows = [
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items() if k in DISCOVERY_COLUMNS}
        for rec in w.rounds().to_dict("records")
    ]
    create_table_artifact(
        key=f"{slug(cfg.name)}-discovery",
        table=rows,
        description=f"{cfg.name}: discovery per round ({cfg.active_learning.acquisition} acquisition)",
    )


def candidates_table(cfg: CampaignConfig, round_: int, cand: pd.DataFrame) -> None:
    """Verified hits first, then the best-predicted candidates: what a user scans each morning."""
    if cand.empty:
        return
    cols = [c for c in CANDIDATE_COLUMNS if c in cand]
    hits = cand[cand["is_hit"]]
    rest = cand[~cand["is_hit"]].sort_values("e_hull_pred", na_position="last").head(TOP_CANDIDATES)
    table = pd.concat([hits, rest])[cols].round(4)
    records = [{k: (None if pd.isna(v) else v) for k, v in row.items()} for row in table.to_dict("records")]
    create_table_artifact(
        key=f"{slug(cfg.name)}-candidates-r{round_}",
        table=records,
        description=f"{cfg.name} round {round_}: verified hits, then the best-predicted candidates",
    )


def round_figures(cfg: CampaignConfig, round_: int, cand: pd.DataFrame) -> None:
    """Hull and parity plots of the round: PNG files beside the store, and markdown artifacts that
    carry each image inline (a ``data:`` URI), which the UI shows in any browser (a ``file://``
    image from an http page is blocked)."""
    from matdisc import analysis

    figures = report_dir(cfg) / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for name, make in (("hull", analysis.hull_figure), ("parity", analysis.parity_figure)):

        def draw(name=name, make=make) -> None:
            path = figures / f"{name}-r{round_}.png"
            make(cand).savefig(path, dpi=100, bbox_inches="tight")
            inline = base64.b64encode(path.read_bytes()).decode()
            create_markdown_artifact(
                f"![{name} plot, round {round_}](data:image/png;base64,{inline})\n\n`{path}`",
                key=f"{slug(cfg.name)}-{name}-r{round_}",
                description=f"{cfg.name} round {round_}: {name} plot",
            )

        _safely(f"{name} figure", draw)


def report_link(cfg: CampaignConfig) -> None:
    """The HTML report (hull, parity, learning and discovery figures) beside the store (a store at a
    URL: beside this machine's working copy of it), named in a markdown artifact with the command
    that writes it again: a browser does not follow a ``file://`` link from the UI's page."""
    from matdisc.report import write_report

    def write() -> None:
        page = write_report(_local_store(cfg), report_dir(cfg))
        get_run_logger().info("campaign report: %s", page)
        create_markdown_artifact(
            f"The campaign report (figures and hits) is on the machine that ran the flow:\n\n`{page}`\n\n"
            f"Open it in a browser there, or write it anywhere with `matdisc report {cfg.store_path} --out DIR`.",
            key=f"{slug(cfg.name)}-report",
            description=f"{cfg.name}: figures and hits (report.html beside the store)",
        )

    _safely("campaign report", write)


def costs_table(w: CampaignWriter, cfg: CampaignConfig) -> None:
    """Predicted vs actual seconds per round and stage, and what each budget has left."""
    from matdisc.budget import planning

    def make() -> None:
        rows = [
            {k: (None if pd.isna(v) else round(float(v), 3) if isinstance(v, float) else v) for k, v in r.items()}
            for r in planning.round_costs(w).to_dict("records")
        ]
        budget = planning.budget_status(cfg, w)
        rows += [
            {
                "round": "budget",
                "stage": name,
                "predicted_s": b["limit"],
                "actual_s": round(b["spent"], 6),
                "ratio": None if b["limit"] is None else round(b["spent"] / b["limit"], 4),
            }
            for name, b in budget.items()
            if b["limit"] is not None
        ]
        create_table_artifact(
            key=f"{slug(cfg.name)}-costs",
            table=rows,
            description=f"{cfg.name}: predicted vs actual seconds per stage (ratio = predicted/"
            "actual); budget rows: limit and spent (hours)",
        )

    _safely("cost table", make)


def stop_report(w: CampaignWriter, cfg: CampaignConfig, round_: int, reason: str) -> None:
    """A campaign that stops early says why in the UI (the store's ``stops`` table has it too)."""
    from matdisc.budget import planning

    lines = [
        f"# {cfg.name}: stopped before round {round_}",
        "",
        reason,
        "",
        "| budget | limit (h) | spent (h) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {k} | {b['limit'] if b['limit'] is not None else '-'} | {b['spent']:.4g} |"
        for k, b in planning.budget_status(cfg, w).items()
    ]
    create_markdown_artifact(
        key=f"{slug(cfg.name)}-stopped", markdown="\n".join(lines), description=f"{cfg.name}: why the campaign stopped"
    )
    costs_table(w, cfg)
