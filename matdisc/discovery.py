"""What a round found, and whether the campaign goes on: per-round discovery metrics (hits, hull
phases, model errors, hit rate, acquisition figures) and the stopping rules.

The science lives in :mod:`matdisc.thermo` (hulls) and :mod:`matdisc.metrics` (discovery
figures); this module applies them to a campaign store after each round's stages.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
from ase import Atoms
from pymatgen.core import Composition

from matdisc import metrics
from matdisc.budget import planning
from matdisc.config import CampaignConfig
from matdisc.records import USABLE
from matdisc.stages.select import cheapest_reference_seconds, dft_calls_used
from matdisc.store import CampaignWriter

# -- hulls and acquisition ------------------------------------------------------------------------


def _n_elements(formula: str) -> int:
    return len(Composition(formula).elements)


def stop_reason(w: CampaignWriter, cfg: CampaignConfig, round_: int) -> str | None:
    """Why the campaign stops before ``round_`` (None: it goes on).

    Rules: a resource budget is spent (:func:`matdisc.budget.planning.budget_stop_reason`), the total
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
    """Screening calculations of a round (cheaper DFT that ranked its picks, see matdisc.stages.screen)."""
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
    prevalence = metrics.prevalence_estimate(cand, tol)
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
        "prevalence_est": prevalence,
        "hull_phases": sorted(phases),
        "new_phases": new_phases,
        "removed_phases": removed,
    }
    out["daf"] = metrics.daf(hits_by_acquisition, len(all_picks), prevalence)
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
