"""What a run prints on the terminal: matdisc's progress (the flow run's log, and redrawn bars on a
terminal) and every warning.

Dask's and Prefect's own INFO lines (each worker's start-up and shutdown, every task's "Finished
in state Completed()") buried the result table of a run under ~40 lines; they stay in the Prefect
UI (the API log handler is untouched) and come back on the terminal with ``matdisc -v``.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import TaskID

#: Set before Dask or Prefect is imported; worker processes inherit them, so their consoles show
#: warnings only (their task-run logs still reach the API).
QUIET_ENVIRONMENT = {"DASK_LOGGING__DISTRIBUTED": "warning", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING"}


def quiet_environment() -> None:
    """Dask's and Prefect's consoles at WARNING in this process and the workers it starts (a value
    the user set wins)."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


class FlowRunsAndWarnings(logging.Filter):
    """Passes warnings and worse, and the flow run's own INFO lines (matdisc's progress)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.startswith("prefect.flow_runs")


def show_flow_progress() -> None:
    """In the process that runs the flow, after Prefect configured its logging: its console shows
    the flow run's INFO again, and still nothing else below WARNING."""
    import prefect.main  # noqa: F401 - configures Prefect's logging at import: it would replace the filter after
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, FlowRunsAndWarnings) for f in handler.filters
        ):
            handler.setLevel(logging.NOTSET)
            handler.addFilter(FlowRunsAndWarnings())


class TerminalBars:
    """Redrawn progress bars for the stages in flight, under the run's log lines.

    They live on the rich console Prefect's console handler prints to, so a log line printed while
    bars show lands above them. A stage's bar goes when the stage ends (its last log line stays);
    the display stops when no stage is in flight.
    """

    def __init__(self, console: Console) -> None:
        from rich.progress import BarColumn, TextColumn
        from rich.progress import Progress as RichProgress

        # Prefect's console has its own theme without rich's default styles: colours by name
        self.bars = RichProgress(
            TextColumn("{task.description}", style="none"),
            BarColumn(style="grey23", complete_style="green", finished_style="green", pulse_style="green"),
            TextColumn("{task.fields[counts]}", style="none"),
            console=console,
            transient=True,
        )
        self._lock = threading.Lock()

    def add(self, description: str, total: int, counts: str) -> TaskID:
        with self._lock:
            if not self.bars.live.is_started:
                self.bars.start()
            return self.bars.add_task(description, total=total, counts=counts)

    def update(self, task: TaskID, done: int, counts: str) -> None:
        with self._lock:
            if task not in self.bars.task_ids:
                return
            self.bars.update(task, completed=done, counts=counts)
            if self.bars.tasks[self.bars.task_ids.index(task)].finished:
                self.bars.remove_task(task)
                if not self.bars.tasks:
                    self.bars.stop()

    def stop(self) -> None:
        with self._lock:
            for task in list(self.bars.task_ids):
                self.bars.remove_task(task)
            self.bars.stop()


#: The bars of the process that runs the flow, when its console is a terminal (``show_progress_bars``).
BARS: TerminalBars | None = None


def show_progress_bars() -> bool:
    """Stage progress as redrawn bars when Prefect's console is a terminal (a pipe or a log file
    gets the log lines only); True when they will show."""
    global BARS
    import prefect.main  # noqa: F401 - configures Prefect's logging (its console handler)
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            console = handler.console
            if console.is_terminal and not console.is_dumb_terminal:
                BARS = TerminalBars(console)
    return BARS is not None


def stop_progress_bars() -> None:
    """Take down bars a stage cut short left (the run ended or failed)."""
    if BARS is not None:
        BARS.stop()
