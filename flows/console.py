"""What a run prints on the terminal: matdisc's progress (the flow run's log) and every warning.

Dask's and Prefect's own INFO lines (each worker's start-up and shutdown, every task's "Finished
in state Completed()") buried the result table of a run under ~40 lines; they stay in the Prefect
UI (the API log handler is untouched) and come back on the terminal with ``matdisc -v``.
"""

from __future__ import annotations

import logging
import os

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
