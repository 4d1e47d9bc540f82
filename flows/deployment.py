"""Running a campaign from the CLI, a deployment or a schedule: one entry point for all three.

``run_campaign`` starts the configured Dask cluster and runs the campaign flow on it, named
after the campaign and the rounds it works on. ``continue_campaign`` is the deployable
flow ("one more round" on a schedule): it reads the campaign file when it runs, so a
scheduled run always continues the same store with the current configuration.
``serve_campaign`` is ``matdisc deploy``: a deployment with a cron schedule, served by this
process, with a deployment concurrency limit of one (runs queue, never share a store).
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType

from matdisc.config import CampaignConfig, ComputeConfig, load_config
from matdisc.errors import UserError
from matdisc.locations import as_location
from matdisc_flows.artifacts import slug
from matdisc_flows.campaign import campaign_flow
from matdisc_flows.runs import TAG


def completed_rounds(cfg: CampaignConfig) -> int:
    """The last round the store has a complete record of (0: cold start only or a new store)."""
    from matdisc.store import open_campaign
    from matdisc.store.tables import store_exists

    if not store_exists(cfg.store_path):
        return 0

    rounds = open_campaign(cfg.store_path).rounds()
    return int(rounds["round"].max()) if not rounds.empty else 0


def round_plan(cfg: CampaignConfig, *, rounds: int | None = None, more_rounds: int | None = None) -> tuple[int, int]:
    """(first, last) round a run works on: up to ``rounds`` in total, or ``more_rounds`` past the
    last completed one (an interrupted round counts as not done), else the configured total."""
    if rounds is not None and more_rounds is not None:
        raise UserError("give either rounds (total) or more_rounds (past the last completed), not both")
    done = completed_rounds(cfg)
    if more_rounds is not None:
        if more_rounds < 1:
            raise UserError("more_rounds: must be at least 1")
        return done + 1, done + more_rounds
    return done + 1, rounds if rounds is not None else cfg.active_learning.rounds


def run_name(cfg: CampaignConfig, first: int, last: int) -> str:
    if last == 0:
        return f"{cfg.name} cold start"
    if first > last:
        return f"{cfg.name} (rounds 1-{last} done)"
    return f"{cfg.name} round {first}" if first == last else f"{cfg.name} rounds {first}-{last}"


def run_campaign(cfg: CampaignConfig, *, rounds: int | None = None, more_rounds: int | None = None) -> dict:
    """Run (or resume) the campaign on its configured Dask cluster; returns the store summary.

    ``MATDISC_SCHEDULER`` (e.g. ``tcp://dask-scheduler:8786`` in the compose setup) replaces
    ``compute.scheduler``, so one campaign file runs on a laptop and on a shared cluster.
    """
    from prefect import tags
    from prefect_dask import DaskTaskRunner

    from matdisc_flows.cluster import campaign_cluster
    from matdisc_flows.runs import ensure_zombie_automation

    first, last = round_plan(cfg, rounds=rounds, more_rounds=more_rounds)
    compute = cfg.compute
    if os.environ.get("MATDISC_SCHEDULER"):  # where the workers are is the machine's business, not the campaign's
        compute = ComputeConfig.model_validate({**compute.model_dump(), "scheduler": os.environ["MATDISC_SCHEDULER"]})
    ensure_zombie_automation()  # a run killed from here on ends Crashed, not Running forever
    with campaign_cluster(compute) as address, tags(TAG, slug(cfg.name)):
        campaign = campaign_flow.with_options(
            task_runner=DaskTaskRunner(address=address), flow_run_name=run_name(cfg, first, last)
        )
        return campaign(config=cfg.model_dump(mode="json"), rounds=last)


def _continue_run_name() -> str:
    """'cu-pd-emt +1 round': the deployment's run says which campaign it continues."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    try:
        name = load_config(params["config_path"]).name
    except UserError:  # the run itself reports the bad file
        name = Path(params["config_path"]).stem
    n = params.get("more_rounds", 1)
    return f"{name} +{n} round{'s' if n != 1 else ''}"


@flow(name="matdisc-continue-campaign", log_prints=True, flow_run_name=_continue_run_name)
def continue_campaign(config_path: str, more_rounds: int = 1, store: str | None = None) -> dict:
    """Continue a campaign by ``more_rounds`` rounds (finishing an interrupted one first)."""
    cfg = load_config(config_path)
    if store:
        cfg = cfg.model_copy(update={"store": str(as_location(store))})
    return run_campaign(cfg, more_rounds=more_rounds)


def deployment_parameters(config_path: str | Path, more_rounds: int = 1, store: str | Path | None = None) -> dict:
    """Absolute paths: a worker or a served run may start in another directory."""
    cfg = load_config(config_path)
    return {
        "config_path": str(Path(config_path).resolve()),
        "more_rounds": more_rounds,
        "store": str(_absolute(store or cfg.store_path)),
    }


def _absolute(location: str | Path) -> str | Path:
    """A local store as an absolute path; a store at a URL as it is."""
    location = as_location(location)
    return location.resolve() if isinstance(location, Path) else location


def check_schedule(cron: str | None, interval: float | None) -> None:
    """A :class:`UserError` naming the option when the schedule is not one Prefect takes."""
    if cron is not None and interval is not None:
        raise UserError("give either --cron or --interval, not both")
    if interval is not None and not interval > 0:
        raise UserError("--interval: must be a positive number of seconds")
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=cron)
        except ValueError:
            raise UserError(f"--cron: {cron!r} is not a valid cron expression") from None


def serve_campaign(
    config_path: str | Path,
    *,
    cron: str | None,
    more_rounds: int = 1,
    name: str | None = None,
    store: str | Path | None = None,
    interval: float | None = None,
) -> None:
    """Create (or update) the campaign's deployment and serve its runs until interrupted.

    ``cron`` or ``interval`` (seconds between runs) is its schedule; neither: runs on demand."""
    cfg = load_config(config_path)
    check_schedule(cron, interval)
    continue_campaign.serve(
        name=name or slug(cfg.name),
        cron=cron,
        interval=interval,
        parameters=deployment_parameters(config_path, more_rounds, store),
        global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        tags=[TAG, slug(cfg.name)],
        description=f"{cfg.name}: {more_rounds} more active-learning round(s) per run on {cfg.store_path}",
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
