"""Select: the round's DFT picks in acquisition order, screened with cheaper DFT when the budget
cannot verify them all (:mod:`matdisc.stages.screen`), cut where the budget ends; recorded once."""

from __future__ import annotations

from collections.abc import Callable

from pymatgen.core import Structure

from matdisc import active
from matdisc.active import Pick, structure_families
from matdisc.budget import planning
from matdisc.config import CampaignConfig
from matdisc.dft import settings_hash
from matdisc.records import USABLE
from matdisc.stages import screen as screening
from matdisc.stages.context import Round
from matdisc.stages.verify import reference_stage
from matdisc.store import CampaignWriter
from matdisc.store.rows import Selection


def select(ctx: Round) -> list[str]:
    """Ids of the round's picks (the recorded ones on a resumed round)."""
    w, cfg, round_, log = ctx.w, ctx.cfg, ctx.number, ctx.log
    recorded = recorded_selection(w, round_)
    if recorded is not None:
        return recorded
    ranked = rank_for_reference(w, cfg, round_)
    cost = predicted_reference_seconds(w, cfg, [p.id for p in ranked])
    remaining = planning.remaining_dft_seconds(cfg, w)
    budget = round_budget(w, cfg, round_)
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
            return record_selection(w, cfg, round_, ranked, cost=cost)
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
    allowed = set(capped_per_composition(w, cfg, [cid for cid, _ in within]))
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
    return record_selection(
        w, cfg, round_, [by_id[cid] for cid, _ in kept], dict(kept), cost=[cost_of[cid] for cid, _ in kept]
    )


def _relaxed_structures(w: CampaignWriter) -> Callable[[str], Structure]:
    """id -> latest MLIP-relaxed structure, read once from the store."""
    frames, row_of = w.latest_frames("mlip")
    return lambda cid: frames.structure(row_of[cid])  # type: ignore[union-attr]


def dft_calls_used(w: CampaignWriter, before_round: int | None = None) -> int:
    """DFT calculations acquisition has spent (rounds >= 1, before ``before_round``)."""
    sel = w.table("selections")
    if sel.empty:
        return 0
    return int((sel["round"] < before_round).sum()) if before_round is not None else len(sel)


def round_budget(w: CampaignWriter, cfg: CampaignConfig, round_: int) -> int:
    """This round's DFT budget: ``dft_budget``, capped by what ``max_dft_total`` leaves."""
    al = cfg.active_learning
    if al.max_dft_total is None:
        return al.dft_budget
    return max(0, min(al.dft_budget, al.max_dft_total - dft_calls_used(w, round_)))


def recorded_selection(w: CampaignWriter, round_: int) -> list[str] | None:
    """The round's DFT picks if they were recorded (a resumed round verifies the same ones)."""
    if not w.has_batch("selections", f"r{round_}/selection"):
        return None
    sel = w.table("selections")
    return list(sel["id"][sel["round"] == round_])


def rank_for_reference(w: CampaignWriter, cfg: CampaignConfig, round_: int) -> list[Pick]:
    """This round's acquisition order, up to its DFT budget in calculations, or its screening
    shortlist when that is longer (no cost cut yet).

    Candidates an earlier round's screen turned down are passed over (:mod:`matdisc.stages.screen`).
    """
    from matdisc.stages.screen import rejected

    al = cfg.active_learning
    cand = w.candidates()
    verified: dict[str, list[Structure]] = {}
    structure_of = None
    if al.diversity and not cand.empty:
        structure_of = _relaxed_structures(w)
        done = cand[(cand["dft_status"] == "ok") & cand["mlip_status"].isin(USABLE)]
        for cid, formula in zip(done["id"], done["formula"]):
            verified.setdefault(formula, []).append(structure_of(cid))
    passed = rejected(w, cfg, round_)
    if passed and not cand.empty:
        cand = cand[~cand["id"].isin(passed)]
    budget = round_budget(w, cfg, round_)
    shortlist = cfg.budget.screening.active_shortlist
    n = max(budget, shortlist or 0) if budget else 0  # a shortlist ranks further
    # a shortlist caps picks per composition after the screen (screening.cap_per_composition)
    return active.select(
        cand,
        n,
        strategy=al.acquisition,
        kappa=al.kappa,
        explore_fraction=al.explore_fraction,
        seed=cfg.generation.seed * 1000 + round_,
        structure_of=structure_of,
        verified=verified,
        max_per_composition=None if shortlist else al.max_per_composition,
        families=structure_families(cand) if al.structure_spread else None,
        query_failed=al.query_failed_relaxations,
    )


def record_selection(
    w: CampaignWriter,
    cfg: CampaignConfig,
    round_: int,
    picks: list[Pick],
    screened: dict[str, float] | None = None,
    cost: list[float] | None = None,
) -> list[str]:
    """Record the picks the budget pays for, in order, and return their ids.

    Each pick is stored with the strategy, its acquisition score, predicted e_hull and
    committee spread at the time of picking (what precision of "stable" calls is measured on),
    its predicted cost (``cost``, when the caller has it) and, when the round was screened, its
    screened e_hull.
    """
    if cost is None:
        cost = predicted_reference_seconds(w, cfg, [p.id for p in picks])
    picks = picks[: planning.affordable(cost, planning.remaining_dft_seconds(cfg, w))]  # what the budget pays for
    screened = screened or {}
    rows = [
        Selection(
            p.id,
            round_,
            cfg.active_learning.acquisition,
            p.score,
            p.e_hull_pred,
            p.sigma,
            p.rank,
            c,
            screened.get(p.id, float("nan")),
            p.kind,
        )
        for p, c in zip(picks, cost)
    ]
    w.append_rows("selections", f"r{round_}/selection", rows)  # none: the round picked nothing, recorded
    return [p.id for p in picks]


def select_for_reference(w: CampaignWriter, cfg: CampaignConfig, round_: int) -> list[str]:
    """This round's DFT picks without screening: the acquisition order cut where the budget ends,
    recorded once."""
    recorded = recorded_selection(w, round_)
    if recorded is not None:
        return recorded
    ranked = rank_for_reference(w, cfg, round_)
    if cfg.budget.screening.active_shortlist:
        keep = set(capped_per_composition(w, cfg, [p.id for p in ranked]))
        ranked = [p for p in ranked if p.id in keep]
    return record_selection(w, cfg, round_, ranked[: round_budget(w, cfg, round_)])


def capped_per_composition(w: CampaignWriter, cfg: CampaignConfig, ids: list[str]) -> list[str]:
    """``ids`` in order, at most ``active_learning.max_per_composition`` of each reduced formula:
    a shortlist ranks without the cap, which then applies to what is verified."""
    cand = w.table("candidates")
    return cap_per_composition(ids, dict(zip(cand["id"], cand["formula"])), cfg.active_learning.max_per_composition)


def cap_per_composition(ids: list[str], formula: dict[str, str], cap: int | None) -> list[str]:
    """``ids`` in order, at most ``cap`` of each reduced formula (None: all)."""
    if cap is None:
        return list(ids)
    seen: dict[str, int] = {}
    out = []
    for cid in ids:
        f = formula[cid]
        if seen.get(f, 0) < cap:
            seen[f] = seen.get(f, 0) + 1
            out.append(cid)
    return out


def cheapest_reference_seconds(w: CampaignWriter, cfg: CampaignConfig) -> float | None:
    """Predicted seconds of the cheapest candidate without a reference result (None: there is none)."""
    from matdisc.stages.generate import candidate_atoms
    from matdisc.stages.verify import dft_done

    done = dft_done(w, settings_hash(cfg.reference))
    atoms = [a for cid, a in candidate_atoms(w) if cid not in done]
    if not atoms:
        return None
    rates, _ = planning.campaign_rates(cfg, w)
    return planning.dft_seconds(
        min(atoms, key=lambda a: planning.dft_work(a, cfg.reference)), cfg.reference, rates, rates.dft_steps
    )


def predicted_reference_seconds(w: CampaignWriter, cfg: CampaignConfig, ids: list[str]) -> list[float]:
    """Predicted seconds of verifying each candidate (cost model calibrated on the store)."""
    from matdisc.stages.generate import candidate_atoms

    if not ids:
        return []
    rates, _ = planning.campaign_rates(cfg, w)
    return [planning.dft_seconds(a, cfg.reference, rates, rates.dft_steps) for _, a in candidate_atoms(w, ids)]
