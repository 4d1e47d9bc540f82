"""The campaign flow: a Prefect flow run of :func:`matdisc.round.run_campaign`.

The round's jobs become Prefect tasks on Dask workers routed by resources (MLIP vs DFT;
:mod:`flows.executor`); the flow process runs the round itself and is the store's single
writer, so a crash loses at most the tasks in flight.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from matdisc.config import CampaignConfig
from matdisc.round import run_campaign
from matdisc_flows import artifacts
from matdisc_flows.executor import PrefectDask


@flow(name="matdisc-campaign", log_prints=True)
def campaign_flow(config: CampaignConfig, rounds: int | None = None) -> dict:
    """Run (or resume) a campaign: cold start, then generate → relax → score → select → verify → train."""
    cfg = CampaignConfig.model_validate(config)
    summary = run_campaign(cfg, PrefectDask(), rounds=rounds, run_id=str(flow_run.id) if flow_run.id else "")
    artifacts.report_link(cfg)
    return summary
