"""Discovery, round by round: hull scores, acquisition, stopping rules, metrics, reports.

Cheap bookkeeping over config + store that runs in the orchestrating process, beside
:mod:`matdisc.loop` (which moves structures and results in and out of the store). The
science lives in :mod:`matdisc.thermo` (hulls), :mod:`matdisc.active` (acquisition) and
:mod:`matdisc.metrics` (discovery figures); this module applies them to a campaign store.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from ase import Atoms
from pymatgen.core import Composition, Structure

from matdisc import metrics, planning
from matdisc.active import Pick, select, structure_families
from matdisc.config import CampaignConfig
from matdisc.dft import settings_hash
from matdisc.records import USABLE
from matdisc.store import CampaignWriter
from matdisc.thermo import score


# -- hulls and acquisition ------------------------------------------------------------------------
def update_scores(w: CampaignWriter, cfg: CampaignConfig, round_: int, key: str) -> pd.DataFrame:
    """Recompute every candidate's hull energies; append them as this round's scores.

    Besides the MLIP hull (``e_hull_mlip``) and the DFT hull (``e_hull_dft``, hits) each
    candidate gets ``e_hull_pred``: its MLIP formation energy against the current DFT hull,
    what acquisition ranks by. Every earlier candidate is rescored, so as phases are
    verified the hull drops and predictions that were stable against the old hull are not.
    """
    settings = settings_hash(cfg.reference)
    cand = w.candidates(settings)
    if cand.empty:
        return cand
    e_mlip = np.where(cand["mlip_status"].isin(USABLE), cand["e_mlip_per_atom"], np.nan)
    same_settings = cand["settings_hash"] == settings if "settings_hash" in cand else False
    e_dft = np.where((cand["dft_status"] == "ok") & same_settings, cand["e_dft_per_atom"], np.nan)
    scores = score(list(cand["formula"]), e_mlip, e_dft, cfg.chemsys, cfg.active_learning.hull_tolerance)
    scores["known_match"] = np.array(known_matches(w, cand, e_dft), dtype=str)
    w.append("scores", key, {"id": cand["id"].to_numpy(), "round": np.full(len(cand), round_), **scores})
    return w.candidates(settings)


def known_matches(w: CampaignWriter, cand: pd.DataFrame, e_dft: np.ndarray) -> list[str]:
    """Per candidate, the known phase it is ("" for none): a known phase's own candidate is it;
    another verified candidate is when StructureMatcher calls their DFT structures the same
    (a known phase whose calculation failed is compared at its given structure)."""
    from matdisc.known_phases import matches

    known = w.table("known_phases")
    out = [""] * len(cand)
    if known.empty:
        return out
    own: dict[str, str] = {}
    for kid, cid in zip(known["known_id"], known["candidate"]):
        own.setdefault(cid, kid)
    row = {cid: i for i, cid in enumerate(cand["id"])}
    formulas = {f for f, c in zip(known["formula"], known["candidate"]) if c in row}
    verified = [
        cid
        for cid, f, e in zip(cand["id"], cand["formula"], e_dft)
        if np.isfinite(e) and f in formulas and cid not in own
    ]
    if verified:
        structure = _dft_or_initial(w, {cid for cid, e in zip(cand["id"], e_dft) if np.isfinite(e)})
        by_known = {kid: structure(cid) for cid, kid in own.items() if cid in row}
        found = matches({cid: structure(cid) for cid in verified}, by_known)
        for cid, kid in found.items():
            out[row[cid]] = kid
    for cid, kid in own.items():
        if cid in row:
            out[row[cid]] = kid
    return out


def _dft_or_initial(w: CampaignWriter, verified: set[str]) -> Callable[[str], Structure]:
    """id -> DFT-relaxed structure for ``verified`` ids, else the initial one."""
    frames, row_of = w.latest_frames("dft")

    def get(cid: str) -> Structure:
        if frames is not None and cid in verified and cid in row_of:
            return frames.structure(row_of[cid])
        return w.structure(cid, "initial")

    return get


def _n_elements(formula: str) -> int:
    return len(Composition(formula).elements)


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

    Candidates an earlier round's screen turned down are passed over (:mod:`matdisc.screening`).
    """
    from matdisc.screening import rejected

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
    return select(
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
    w.append(
        "selections",
        f"r{round_}/selection",
        {
            "id": [p.id for p in picks],
            "round": [round_] * len(picks),
            "strategy": [cfg.active_learning.acquisition] * len(picks),
            "score": [p.score for p in picks],
            "e_hull_pred": [p.e_hull_pred for p in picks],
            "sigma": [p.sigma for p in picks],
            "rank": [p.rank for p in picks],
            "predicted_s": cost[: len(picks)],
            "e_hull_screen": [screened.get(p.id, float("nan")) for p in picks],
        },
    )
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
    from matdisc.loop import candidate_atoms, dft_done

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
    from matdisc.loop import candidate_atoms

    if not ids:
        return []
    rates, _ = planning.campaign_rates(cfg, w)
    return [planning.dft_seconds(a, cfg.reference, rates, rates.dft_steps) for _, a in candidate_atoms(w, ids)]


def stop_reason(w: CampaignWriter, cfg: CampaignConfig, round_: int) -> str | None:
    """Why the campaign stops before ``round_`` (None: it goes on).

    Rules: a resource budget is spent (:func:`matdisc.planning.budget_stop_reason`), the total
    DFT budget is spent, or ``patience`` rounds in a row found no new hit. (The number of rounds
    is the flow's loop bound.)
    """
    al = cfg.active_learning
    if (reason := planning.budget_stop_reason(cfg, w)) is not None:
        return reason
    left = planning.remaining_dft_seconds(cfg, w)
    if left is not None:
        cheapest = cheapest_reference_seconds(w, cfg)
        if cheapest is not None and left < cheapest:
            return (
                f"budget: {left:.3g} s of reference calculation left, less than the cheapest unverified "
                f"candidate needs ({cheapest:.3g} s predicted)"
            )
    if al.max_dft_total is not None and dft_calls_used(w, round_) >= al.max_dft_total:
        return f"DFT budget spent: {dft_calls_used(w, round_)} of max_dft_total {al.max_dft_total} calculations"
    rounds = w.rounds()
    if al.patience is not None and not rounds.empty:
        recent = rounds[(rounds["round"] >= 1) & (rounds["round"] < round_)].tail(al.patience)
        if len(recent) == al.patience and (recent["new_hits"].fillna(0) == 0).all():
            return f"no new hits for {al.patience} rounds (patience)"
    return None


# -- round metrics -------------------------------------------------------------------------------
def _screened_in(w: CampaignWriter, round_: int) -> int:
    """Screening calculations of a round (cheaper DFT that ranked its picks, see matdisc.screening)."""
    table = w.table("screening")
    return int((table["round"] == round_).sum())


def round_metrics(
    w: CampaignWriter, cfg: CampaignConfig, round_: int, model_sha: str, model_errors: dict[str, float] | None = None
) -> dict[str, Any]:
    """The round's record: counts, discovery metrics (see :mod:`matdisc.metrics`), hull changes.

    ``mae_mev_per_atom`` compares the screening model's relaxed energies with the DFT ones of
    this round's verifications; ``model_errors`` (``mae_before_mev``/``mae_after_mev``: the
    screening and the retrained committee on the same new DFT structures) is merged in.
    """
    tol = cfg.active_learning.hull_tolerance
    cand = w.candidates()
    mlip = w.table("mlip")
    dft = w.table("dft")
    this_mlip = mlip[(mlip["round"] == round_)]
    this_dft = dft[(dft["round"] == round_)]
    verified = cand[cand["id"].isin(this_dft["id"]) & (cand["dft_status"] == "ok")]
    pairs = (
        verified[["e_dft_per_atom"]].join(
            this_mlip.drop_duplicates("id", keep="last").set_index("id")["e_mlip_per_atom"], on=verified["id"]
        )
        if not verified.empty and not this_mlip.empty
        else pd.DataFrame(columns=["e_mlip_per_atom", "e_dft_per_atom"])
    )
    sel = w.table("selections")
    picks = sel[sel["round"] == round_]
    all_picks = sel[sel["round"] <= round_]
    phases = metrics.hull_phases(cand)
    earlier = w.rounds()
    earlier = earlier[earlier["round"] < round_]
    last = earlier["hull_phases"].iloc[-1] if len(earlier) else ""
    before = set(json.loads(last)) if isinstance(last, str) and last else set()  # older stores: no record
    new_phases, removed = metrics.hull_changes(before, phases)
    new_hits = int(verified["is_hit"].sum())
    n_calls = len(picks)
    hits_by_acquisition = int(cand["is_hit"][cand["id"].isin(all_picks["id"])].sum()) if len(all_picks) else 0
    cand = cand.assign(n_elements=[_n_elements(f) for f in cand["formula"]])
    out = {
        "round": round_,
        "candidates": int((cand["round"] == round_).sum()),
        "relaxed": int(this_mlip["status"].isin(USABLE).sum()),
        "dft_verified": int((this_dft["status"] == "ok").sum()),
        "dft_failed": int((this_dft["status"] != "ok").sum()),
        "hits": int(cand["is_hit"].sum()),
        "model_sha256": model_sha,
        "mae_mev_per_atom": metrics.energy_mae_mev(pairs["e_mlip_per_atom"], pairs["e_dft_per_atom"]),
        "dft_calls": n_calls,
        "screened": _screened_in(w, round_),
        "dft_calls_total": len(all_picks),
        "new_hits": new_hits,
        "hit_rate": new_hits / n_calls if n_calls else float("nan"),
        "precision_stable": metrics.precision_of_stable_calls(picks, cand, tol) if n_calls else float("nan"),
        "prevalence_est": metrics.prevalence_estimate(cand, tol),
        "hull_phases": sorted(phases),
        "new_phases": new_phases,
        "removed_phases": removed,
    }
    out["daf"] = metrics.daf(hits_by_acquisition, len(all_picks), out["prevalence_est"])
    out.update({"mae_before_mev": float("nan"), "mae_after_mev": float("nan"), **(model_errors or {})})
    return out


def new_reference_frames(w: CampaignWriter, round_: int) -> list[Atoms]:
    """This round's verified DFT structures, labelled with their energies (for model errors)."""
    dft = w.table("dft")
    if dft.empty:
        return []
    rows = np.flatnonzero((dft["round"] == round_).to_numpy() & (dft["status"] == "ok").to_numpy())
    frames = w.tables.read_frames("dft", rows) if len(rows) else None
    out = []
    for j, i in enumerate(rows):
        a = frames.atoms(j)  # type: ignore[union-attr]
        a.info["REF_energy"] = float(dft["energy"].iloc[i])
        out.append(a)
    return out


def hits_by_source(cand: pd.DataFrame) -> pd.DataFrame:
    """Candidates, DFT-verified and hits per generator: which source produced the hits."""
    if cand.empty:
        return pd.DataFrame(columns=["source", "candidates", "verified", "hits"])
    return (
        cand.assign(verified=cand["dft_status"] == "ok")
        .groupby("source")
        .agg(candidates=("id", "size"), verified=("verified", "sum"), hits=("is_hit", "sum"))
        .reset_index()
    )


def round_report(cfg: CampaignConfig, metrics: dict[str, Any], cand: pd.DataFrame) -> str:
    """Markdown for the Prefect UI: the round's numbers, hits per generator and current hits."""
    lines = [f"# {cfg.name}: round {metrics['round']}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in metrics.items() if k != "round"]
    lines += [
        "",
        "## Candidates by generator",
        "",
        "| source | candidates | DFT verified | hits |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['source']} | {r['candidates']} | {r['verified']} | {r['hits']} |"
        for r in hits_by_source(cand).to_dict("records")
    ]
    hits = cand[cand["is_hit"]].sort_values("e_form_dft") if not cand.empty else cand
    lines += [
        "",
        "## Verified stable compounds",
        "",
        "| formula | prototype | E_form DFT (eV/atom) | E_hull DFT | E MLIP - DFT (meV/atom) |",
        "|---|---|---|---|---|",
    ]
    for r in hits.to_dict("records"):
        err = (r["e_mlip_per_atom"] - r["e_dft_per_atom"]) * 1000
        lines.append(
            f"| {r['formula']} | {r['prototype']} | {r['e_form_dft']:.3f} | {r['e_hull_dft']:.3f} | {err:.1f} |"
        )
    return "\n".join(lines)
