"""Flow runs that died: marked Crashed, so the Prefect UI tells a live run from a dead one.

A process killed with SIGKILL (or a lost node) cannot report its own end, and its flow run
would stay Running forever. Two mechanisms, both Prefect's own:

- **Heartbeats and the zombie-run automation** (Prefect's "detect zombie flows" recipe): every
  flow run matdisc starts sends a heartbeat event every ``HEARTBEAT_S`` seconds
  (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``), and one automation on the API marks a matdisc run
  Crashed when ``MISSED_BEATS`` heartbeats in a row do not come. This works for any campaign,
  resumed or not.
- **Resume**: the next run that takes a campaign store's writer lock knows that every earlier
  writer of that store is gone (the lock is held by a live process only). Runs recorded in
  the store that the API still shows Running are marked Crashed at once, with the run that
  took over named, without waiting for the automation.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import timedelta
from typing import cast
from uuid import UUID

#: Seconds between two heartbeats of a flow run (Prefect's minimum is 30).
HEARTBEAT_S = 30
#: Heartbeats a run may miss before the automation marks it Crashed.
MISSED_BEATS = 3
#: Name of the automation on the Prefect API (looked up by it: created once per API).
ZOMBIE_AUTOMATION = "matdisc: mark flow runs Crashed when their heartbeats stop"
#: Every flow run matdisc starts carries this tag (the automation only touches those).
TAG = "matdisc"


def enable_heartbeats(env: dict[str, str] | os._Environ = os.environ) -> None:
    """Flow runs started with ``env`` send heartbeats (a user's own setting is kept). Call it
    before Prefect is imported: Prefect reads its settings from the environment at import."""
    env.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))


def zombie_after_s() -> int:
    """Seconds after the last heartbeat when a run counts as dead."""
    beat = max(int(os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY") or HEARTBEAT_S), HEARTBEAT_S)
    return beat * MISSED_BEATS


def zombie_automation():
    """The automation of Prefect's zombie-flow recipe, for flow runs tagged ``matdisc``."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    within = zombie_after_s()
    return Automation(
        name=ZOMBIE_AUTOMATION,
        description=f"A matdisc flow run that sent no heartbeat for {within} s is dead (killed, or its machine "
        "lost): mark it Crashed. Created by matdisc; disable it here to keep such runs Running.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{TAG}"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {within} s: the flow run's process was killed or its machine lost "
                "(matdisc's zombie-run automation); run the campaign again to resume it",
            ),
        ],
    )


def ensure_zombie_automation() -> tuple[str, bool]:
    """Create the automation on the current API if it is missing; (its id, whether it is enabled).
    One that exists is left as it is: a user who disabled it meant it."""
    from prefect.automations import Automation

    try:
        existing = cast(Automation, Automation.read(name=ZOMBIE_AUTOMATION))  # sync-compatible: sync here
    except ValueError:  # not found
        existing = None
    if existing is not None:
        return str(existing.id), bool(existing.enabled)
    created = cast(Automation, zombie_automation().create())
    return str(created.id), True


def mark_stale_runs_crashed(earlier: Iterable[str], current: str | None, store: str) -> list[str]:
    """Mark Crashed the flow runs in ``earlier`` (ids of runs that wrote ``store`` before) that the
    API still shows Running or Pending, and the flow runs they were subflows of; returns their names.

    Called only while holding the store's writer lock: an earlier writer is then certainly dead.
    """
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Crashed

    ids = [UUID(i) for i in dict.fromkeys(earlier) if i and i != current]
    if not ids:
        return []
    message = (
        f"its process died: flow run {current} took over the campaign store {store}"
        if current
        else f"its process died: another run took over the campaign store {store}"
    )
    marked: list[str] = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        mine = _ancestors(client, UUID(current)) if current else set()
        for run in runs:
            for dead in [run, *_parents(client, run)]:
                if dead.id in mine or dead.state is None or dead.state.type.value not in ("RUNNING", "PENDING"):
                    continue
                client.set_flow_run_state(dead.id, Crashed(message=message), force=True)
                marked.append(dead.name)
    return marked


def _parents(client, run) -> list:
    """The flow runs ``run`` is a subflow of, nearest first (a deployment's run around a campaign)."""
    out = []
    while run.parent_task_run_id is not None:
        task = client.read_task_run(run.parent_task_run_id)
        run = client.read_flow_run(task.flow_run_id)
        out.append(run)
    return out


def _ancestors(client, flow_run_id: UUID) -> set[UUID]:
    run = client.read_flow_run(flow_run_id)
    return {flow_run_id, *(r.id for r in _parents(client, run))}
