"""Discovery metrics: how much a campaign found for the DFT it spent.

Plain functions over the candidates table (and, for the benchmark, over a known true hull).
A *hit* is a DFT-verified compound on the DFT hull below the elements (``is_hit``); a hull
*phase* is a reduced formula with a hit, so several candidates that relax into the same
phase count once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd


def hull_phases(cand: pd.DataFrame) -> set[str]:
    """Reduced formulas of the compounds on the current DFT hull."""
    if cand.empty:
        return set()
    return set(cand["formula"][cand["is_hit"]])


def hull_changes(before: set[str], after: set[str]) -> tuple[list[str], list[str]]:
    """(new phases, removed phases) between two hulls: a removed one was pushed off by a new one."""
    return sorted(after - before), sorted(before - after)


def precision_of_stable_calls(picks: pd.DataFrame, cand: pd.DataFrame, tolerance: float) -> float:
    """Of the picks the model called stable (``e_hull_pred`` <= tolerance when picked) and
    DFT verified, the fraction that DFT confirms on the hull. NaN when the model called none."""
    if picks.empty:
        return float("nan")
    called = picks[picks["e_hull_pred"] <= tolerance + 1e-9]
    done = cand.set_index("id").reindex(called["id"])
    done = done[done["dft_status"] == "ok"]
    return float(done["is_hit"].mean()) if len(done) else float("nan")


def prevalence_estimate(cand: pd.DataFrame, tolerance: float) -> float:
    """Best current estimate of the fraction of candidates that are stable.

    Verified candidates count as what DFT says; the rest as the model predicts them
    (``e_hull_pred`` <= tolerance). Elements are not candidates for discovery.
    """
    pool = cand[cand["n_elements"] > 1] if "n_elements" in cand else cand
    if pool.empty:
        return float("nan")
    verified = pool["dft_status"] == "ok"
    pred = pool["e_hull_pred"] if "e_hull_pred" in pool else pool["e_hull_mlip"]
    stable = np.where(verified, pool["is_hit"], pred <= tolerance + 1e-9)
    return float(np.mean(stable))


def daf(hits: int, calls: int, prevalence: float) -> float:
    """Discovery acceleration factor: hit rate of the picks over the hit rate of random picks."""
    if calls <= 0 or not prevalence or not np.isfinite(prevalence):
        return float("nan")
    return (hits / calls) / prevalence


def energy_mae_mev(
    predicted_per_atom: Sequence[float] | np.ndarray, reference_per_atom: Sequence[float] | np.ndarray
) -> float:
    """Mean absolute error in meV/atom over the finite pairs (NaN when there are none)."""
    p, r = np.asarray(predicted_per_atom, dtype=float), np.asarray(reference_per_atom, dtype=float)
    ok = np.isfinite(p) & np.isfinite(r)
    return float(np.mean(np.abs(p[ok] - r[ok])) * 1000) if ok.any() else float("nan")


# -- against a known hull (benchmarks, tests) ----------------------------------------------------
def recovery_curve(verified_in_order: Iterable[str], phase_of: Mapping[str, str], n_phases: int) -> np.ndarray:
    """Fraction of the true hull phases recovered after each DFT calculation.

    ``phase_of`` maps a candidate id to the true hull phase it relaxes into (absent: not on
    the true hull). Entry k is the fraction after k+1 calculations.
    """
    found: set[str] = set()
    out = []
    for cid in verified_in_order:
        if cid in phase_of:
            found.add(phase_of[cid])
        out.append(len(found) / n_phases if n_phases else 1.0)
    return np.asarray(out, dtype=float)


def calls_to_reach(curve: np.ndarray, fraction: float) -> int | None:
    """DFT calculations needed until the curve reaches ``fraction`` (None: never)."""
    reached = np.flatnonzero(curve >= fraction - 1e-12)
    return int(reached[0]) + 1 if len(reached) else None


def expected_random_calls(
    phase_of: Mapping[str, str],
    pool: Sequence[str],
    fraction: float,
    n_phases: int,
    *,
    draws: int = 2000,
    seed: int = 0,
) -> float:
    """Mean calculations random selection (without replacement) needs to reach ``fraction``."""
    rng = np.random.default_rng(seed)
    ids = np.asarray(list(pool))
    need = [
        calls_to_reach(recovery_curve(ids[rng.permutation(len(ids))], phase_of, n_phases), fraction)
        for _ in range(draws)
    ]
    return float(np.mean([len(ids) if n is None else n for n in need]))
