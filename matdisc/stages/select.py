"""Select: the round's DFT picks in acquisition order, screened with cheaper DFT when the budget
cannot verify them all (:mod:`matdisc.screening`), cut where the budget ends; recorded once."""

from __future__ import annotations

from matdisc import discovery, planning, screening
from matdisc.dft import settings_hash
from matdisc.stages.context import Round
from matdisc.stages.verify import reference_stage


def select(ctx: Round) -> list[str]:
    """Ids of the round's picks (the recorded ones on a resumed round)."""
    w, cfg, round_, log = ctx.w, ctx.cfg, ctx.number, ctx.log
    recorded = discovery.recorded_selection(w, round_)
    if recorded is not None:
        return recorded
    ranked = discovery.rank_for_reference(w, cfg, round_)
    cost = discovery.predicted_reference_seconds(w, cfg, [p.id for p in ranked])
    remaining = planning.remaining_dft_seconds(cfg, w)
    budget = discovery.round_budget(w, cfg, round_)
    screen = screening.shortlist_plan(w, cfg, [p.id for p in ranked], remaining)
    if screen is not None:
        log.info(
            "round %d: screening a shortlist of %d candidates with %s settings (%s preset), then verifying the best %d",
            round_,
            len(screen.picks),
            settings_hash(screen.reference),
            screen.reference.preset,
            budget,
        )
    else:
        ranked, cost = ranked[:budget], cost[:budget]
        screen = screening.plan(w, cfg, [p.id for p in ranked], cost, remaining)
        if screen is None:
            return discovery.record_selection(w, cfg, round_, ranked, cost=cost)
        log.info(
            "round %d: the budget cannot verify all %d picks; screening %d with %s settings (%s preset) first",
            round_,
            len(ranked),
            len(screen.picks),
            settings_hash(screen.reference),
            screen.reference.preset,
        )
    reference_stage(ctx, screen.jobs, verified=False, screen=screen.reference, allowance_s=screen.allowance_s)
    within = screening.funnel(w, cfg, screen.picks)
    allowed = set(discovery.capped_per_composition(w, cfg, [cid for cid, _ in within]))
    kept = [(cid, e) for cid, e in within if cid in allowed][:budget]
    by_id, cost_of = {p.id: p for p in ranked}, {p.id: c for p, c in zip(ranked, cost)}
    initial = (
        0
        if "initial" in cfg.budget.screening.geometries
        else sum(screening.split_job_id(cid)[1] == "initial" for cid, _ in screen.jobs)
    )
    log.info(
        "round %d: %d of %d screened picks within %.3g eV/atom of the hull; verifying the best %d%s",
        round_,
        len(within),
        len(screen.picks),
        cfg.budget.screening.margin,
        len(kept),
        f" ({initial} screened at their initial structure: MLIP volume change beyond "
        f"{cfg.budget.screening.max_volume_change:g})"
        if initial
        else "",
    )
    return discovery.record_selection(
        w, cfg, round_, [by_id[cid] for cid, _ in kept], dict(kept), cost=[cost_of[cid] for cid, _ in kept]
    )
