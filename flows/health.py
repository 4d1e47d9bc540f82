"""Is the Prefect server doing its job? ``matdisc server status``, without reading a log.

A server can answer ``/health`` while a background service fails on every loop: with
SQLAlchemy 2.1 Prefect 3.8's scheduler raised once a minute and no scheduled run was ever
created, visible only in the server log. So the status looks three ways:

- the services' errors in the log of a server matdisc started (only lines written since it
  started), grouped by service;
- what the scheduler should have produced: every deployment with an active schedule has
  runs scheduled ahead once the scheduler has looped (checked through the API, so it works
  for a user's own server too);
- the zombie-run automation (:mod:`flows.runs`) exists and is enabled.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

#: A Prefect server log line: "07:25:14.135 | ERROR   | docket.dependencies - message".
_LINE = re.compile(r"^(?P<time>\d\d:\d\d:\d\d\.\d+) \| (?P<level>[A-Z]+) *\| (?P<logger>[\w.]+) - (?P<msg>.*)$")
#: Services run as docket tasks; a failure names the task: "↩ [ 56ms] schedule_deployments(){...}".
_TASK = re.compile(r"(?P<task>\w+)\(\)\{")
#: The line that ends a traceback: "sqlalchemy.exc.InvalidRequestError: Can't evaluate ...".
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b(: .*)?$")


@dataclass
class ServiceErrors:
    """Errors of one service (a docket task, or a logger) in the server log."""

    count: int = 0
    last_time: str = ""
    last_error: str = ""  # the exception line that ended the last traceback


@dataclass
class Health:
    api_url: str
    reachable: bool
    version: str = ""
    started_by_matdisc: bool = False
    log: str = ""
    services: dict[str, ServiceErrors] = field(default_factory=dict)  # failing services only
    other_errors: ServiceErrors = field(default_factory=ServiceErrors)  # the API's own (e.g. SQLite locked)
    scheduled_deployments: int = 0
    unscheduled: list[str] = field(default_factory=list)  # active schedule, no run scheduled ahead
    zombie_automation: str = "missing"  # enabled | disabled | missing

    @property
    def problems(self) -> list[str]:
        out = []
        if not self.reachable:
            return [f"the Prefect API at {self.api_url} does not answer"]
        for name, err in self.services.items():
            out.append(f"service {name} failed {err.count} time(s), last at {err.last_time}: {err.last_error}")
        for name in self.unscheduled:
            out.append(
                f"deployment {name} has an active schedule but no run scheduled ahead (is the scheduler "
                "service running?)"
            )
        if self.zombie_automation != "enabled":
            out.append(
                f"the zombie-run automation is {self.zombie_automation}: killed runs stay Running "
                "(matdisc run creates it)"
            )
        return out

    def as_dict(self) -> dict:
        return {**asdict(self), "healthy": not self.problems, "problems": self.problems}


def service_errors(log: Path, offset: int = 0) -> tuple[dict[str, ServiceErrors], ServiceErrors]:
    """Errors of the server's background services in ``log`` (from byte ``offset``), by service,
    and the other errors the server logged (``prefect.server`` lines: a state change it could
    not write, e.g. SQLite's "database is locked" under load, which the client retries)."""
    if not log.exists():
        return {}, ServiceErrors()
    with open(log, "rb") as fh:
        fh.seek(offset)
        lines = fh.read().decode("utf-8", "replace").splitlines()
    services: dict[str, ServiceErrors] = {}
    other = ServiceErrors()
    current: ServiceErrors | None = None
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            if current is not None and _EXCEPTION.match(line):
                current.last_error = line.strip()  # the exception line closes a traceback
            continue
        current = None
        if m["level"] not in ("ERROR", "CRITICAL"):
            continue
        task = _TASK.search(m["msg"])
        if task is None and m["logger"] == "prefect.server":
            current = other
        else:
            current = services.setdefault(task["task"] if task else m["logger"], ServiceErrors())
        current.count += 1
        current.last_time = m["time"]
        current.last_error = m["msg"].strip()
    for name, err in list(services.items()):
        if "database is locked" in err.last_error:  # SQLite contention under load: written on a later try
            del services[name]
            other.count += err.count
            latest = max((other.last_time, other.last_error), (err.last_time, err.last_error))
            other.last_time, other.last_error = latest
    return services, other


def _scheduler_grace_s() -> float:
    """How long a new schedule may have no runs: one scheduler loop (Prefect's default 60 s) and slack."""
    return float(os.environ.get("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS") or 60) + 30


def unscheduled_deployments(client) -> tuple[int, list[str]]:
    """(deployments with an active schedule, those of them with no run scheduled in the future)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    now = datetime.now(UTC)
    active, missing = 0, []
    for dep in client.read_deployments():
        if dep.paused or not any(s.active for s in dep.schedules or []):
            continue
        active += 1
        if dep.updated is not None and now - dep.updated < timedelta(seconds=_scheduler_grace_s()):
            continue  # the scheduler has not looped since it was (re)created
        ahead = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[dep.id]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                expected_start_time=FlowRunFilterExpectedStartTime(after_=now),
            ),
            limit=1,
        )
        if not ahead:
            missing.append(dep.name)
    return active, missing


def _server_version(api_url: str) -> str:
    import json
    import urllib.request

    from matdisc_flows.server import auth_headers

    request = urllib.request.Request(f"{api_url.rstrip('/')}/admin/version", headers=auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return str(json.loads(resp.read()))
    except (OSError, ValueError):
        return ""


def check(api_url: str) -> Health:
    """The health of the Prefect API at ``api_url`` (``PREFECT_API_URL`` must point at it)."""
    from matdisc_flows import server

    health = Health(api_url=api_url, reachable=server.healthy(api_url))
    if not health.reachable:
        return health
    state = server.recorded()
    if state is not None and state.get("api_url") == api_url:
        health.started_by_matdisc = True
        health.log = str(server.log_file())
        health.services, health.other_errors = service_errors(server.log_file(), int(state.get("log_offset", 0)))
    from prefect import get_client

    from matdisc_flows.runs import ZOMBIE_AUTOMATION

    health.version = _server_version(api_url)
    with get_client(sync_client=True) as client:
        health.scheduled_deployments, health.unscheduled = unscheduled_deployments(client)
        found = client.read_automations_by_name(name=ZOMBIE_AUTOMATION)
    if found:
        health.zombie_automation = "enabled" if found[0].enabled else "disabled"
    return health
