"""Acquisition: which relaxed candidates get a reference (DFT) calculation this round.

The walking-skeleton rule: the lowest predicted energies above the MLIP hull, one
structure per (formula, prototype) at most, never a candidate already verified.
"""

from __future__ import annotations

import pandas as pd

from matdisc.records import USABLE


def select_greedy(candidates: pd.DataFrame, budget: int) -> list[str]:
    """Ids of up to ``budget`` candidates, lowest ``e_hull_mlip`` first."""
    if budget <= 0 or candidates.empty:
        return []
    pool = candidates[candidates["mlip_status"].isin(USABLE) & (candidates["dft_status"] == "")]
    pool = pool[pool["e_hull_mlip"].notna()].sort_values(["e_hull_mlip", "id"])
    return list(pool["id"][:budget])
