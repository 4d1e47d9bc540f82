"""Score: every candidate on the current MLIP and DFT hulls, recomputed each round (so as phases
are verified the hull drops), and which known phase a verified candidate is."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from pymatgen.core import Structure

from matdisc.config import CampaignConfig
from matdisc.dft import settings_hash
from matdisc.records import USABLE
from matdisc.store import CampaignWriter
from matdisc.thermo import score


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
    e_dft = dft_energies(cand, cfg)
    scores = score(list(cand["formula"]), e_mlip, e_dft, cfg.chemsys, cfg.active_learning.hull_tolerance)
    scores["known_match"] = np.array(known_matches(w, cand, e_dft), dtype=str)
    w.append("scores", key, {"id": cand["id"].to_numpy(), "round": np.full(len(cand), round_), **scores})
    return w.candidates(settings)


def dft_energies(cand: pd.DataFrame, cfg: CampaignConfig) -> np.ndarray:
    """Per candidate, its verified DFT energy per atom with the campaign's reference settings (NaN
    where none)."""
    same_settings = cand["settings_hash"] == settings_hash(cfg.reference) if "settings_hash" in cand else False
    return np.asarray(np.where((cand["dft_status"] == "ok") & same_settings, cand["e_dft_per_atom"], np.nan), float)


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
