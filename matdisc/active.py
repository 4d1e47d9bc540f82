"""Acquisition: which relaxed candidates get a reference (DFT) calculation this round.

The loop exists to find the stable phases with as few DFT calculations as possible. A round's
picks combine:

- exploitation: the lowest predicted energy above the current DFT hull (``e_hull_pred``);
- exploration where it could matter: ``explore_fraction`` of the budget goes to the lowest
  optimistic ``e_hull_pred - kappa * sigma`` (committee spread ``sigma``), so an uncertain
  candidate is verified when it might be stable, not when it surely is not;
- diversity: a candidate StructureMatcher calls the same as an earlier pick or a verified
  structure is skipped, and at most ``max_per_composition`` picks share a reduced formula;
- spread over structure families (prototype, or ``random``): one of each family before a
  second of any, so a model's blind spot for one structure type costs a round one pick.

The baselines isolate what each ingredient buys: ``greedy``, ``random``, ``greedy_spread``
(the family spread without the committee spread) and ``random_stratified`` (the families
without the model). Why these rules, with the measurements behind them: docs/stages/select.md.
Everything here takes plain data (a candidates DataFrame, structures by id) and returns ids.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Structure

from matdisc.records import USABLE

STRATEGIES = ("uncertainty", "greedy", "random", "greedy_spread", "random_stratified")
#: The ranking each strategy walks: the spread variants take their base strategy's order.
BASE = {"greedy_spread": "greedy", "random_stratified": "random"}


@dataclass(frozen=True)
class Pick:
    """One chosen candidate and why: its acquisition score (lower is better), rank, and ``kind``:
    ``exploit`` (lowest predicted e_hull), ``explore`` (optimistic e_hull), ``failed_relaxation``
    (the MLIP relaxation exploded: exploration's share only) or ``random``."""

    id: str
    score: float
    e_hull_pred: float
    sigma: float
    rank: int
    kind: str = "exploit"


def eligible(candidates: pd.DataFrame) -> pd.DataFrame:
    """Candidates acquisition may pick: usable MLIP relaxation, a prediction, no DFT result yet."""
    if candidates.empty:
        return candidates
    pred = candidates["e_hull_pred"] if "e_hull_pred" in candidates else candidates["e_hull_mlip"]
    ok = candidates["mlip_status"].isin(USABLE) & (candidates["dft_status"] == "") & pred.notna()
    return candidates[ok].assign(e_hull_pred=pred[ok])


def failed_relaxations(candidates: pd.DataFrame) -> pd.DataFrame:
    """Candidates whose MLIP relaxation exploded and that have no DFT result yet."""
    if candidates.empty:
        return candidates
    return candidates[(candidates["mlip_status"] == "exploded") & (candidates["dft_status"] == "")]


def acquisition_scores(pool: pd.DataFrame, strategy: str, *, kappa: float = 1.0, seed: int = 0) -> np.ndarray:
    """Per-candidate score, lower is picked first (random: a seeded permutation rank)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown acquisition strategy {strategy!r}: use {', '.join(STRATEGIES)}")
    strategy = BASE.get(strategy, strategy)
    mean = pool["e_hull_pred"].to_numpy(dtype=float)
    if strategy == "greedy":
        return mean
    if strategy == "random":
        return np.random.default_rng(seed).permutation(len(pool)).astype(float)
    sigma = np.nan_to_num(pool["sigma"].to_numpy(dtype=float), nan=0.0) if "sigma" in pool else 0.0
    return mean - kappa * sigma


def select(
    candidates: pd.DataFrame,
    budget: int,
    *,
    strategy: str = "uncertainty",
    kappa: float = 1.0,
    explore_fraction: float = 0.25,
    seed: int = 0,
    structure_of: Callable[[str], Structure] | None = None,
    verified: Mapping[str, Sequence[Structure]] | None = None,
    max_per_composition: int | None = None,
    families: Mapping[str, str] | None = None,
    query_failed: bool = False,
) -> list[Pick]:
    """Up to ``budget`` picks from ``candidates`` (a ``Campaign.candidates()`` frame).

    ``uncertainty`` spends ``1 - explore_fraction`` of the budget on the lowest predicted
    e_hull and the rest on the lowest optimistic e_hull (``mean - kappa * sigma``) among
    the others (``explore_fraction`` 1: all optimistic), spread over chemical subsystems:
    the best optimistic candidate of each subsystem (Cu-Au, Cu-Pd-Au, ...) with the fewest
    picks this round comes first, so exploration does not pile into the chemistry the
    model already knows. With ``families`` (id -> structure family) the predicted-e_hull pass
    takes the best candidate of every family before a second of any, and the optimistic pass
    spreads over (subsystem, family) pairs. With ``structure_of`` (id ->
    relaxed Structure) a candidate that matches an earlier pick or a structure in
    ``verified`` (reduced formula -> structures) is skipped; without it no structure
    comparison is made. Ties break by id, so the same inputs give the same picks. With
    ``query_failed`` (uncertainty only) the candidates whose MLIP relaxation exploded lead the
    optimistic pass, spread like it: they have no prediction, and the model failing on them is
    the strongest uncertainty there is.
    """
    pool = eligible(candidates)
    failed = failed_relaxations(candidates) if query_failed and strategy == "uncertainty" else pool.iloc[:0]
    if budget <= 0 or (pool.empty and failed.empty):
        return []
    # (candidates with scores, picks wanted after this pass, what it spreads over: None, "family" or "system")
    if strategy == "uncertainty":
        n_exploit = budget - int(np.floor(explore_fraction * budget + 0.5))
        explore = pool.assign(acq_score=acquisition_scores(pool, strategy, kappa=kappa))
        if not failed.empty:
            explore = pd.concat([explore, failed.assign(acq_score=-np.inf, e_hull_pred=np.nan)])
        passes = [
            (
                pool.assign(acq_score=acquisition_scores(pool, "greedy")),
                n_exploit,
                "family" if families is not None else None,
            ),
            (explore, budget, "system"),
        ]
    else:  # one pass; the spread variants take one of every family before a second of any
        spread = "family" if strategy in BASE and families is not None else None
        passes = [(pool.assign(acq_score=acquisition_scores(pool, strategy, kappa=kappa, seed=seed)), budget, spread)]
    matcher = StructureMatcher() if structure_of is not None else None
    seen: dict[str, list[Structure]] = {f: list(v) for f, v in (verified or {}).items()}
    per_formula: dict[str, int] = {}
    # picks so far per spread key: "family" (structure family) and "system" (subsystem, and family)
    shares: dict[str, dict[str, int]] = {"family": {}, "system": {}}
    picks: list[Pick] = []
    taken: set[str] = set()
    for n_pass, (scored, until, spread) in enumerate(passes):
        pass_kind = "random" if BASE.get(strategy, strategy) == "random" else "explore" if n_pass == 1 else "exploit"
        ranked = scored.sort_values(["acq_score", "id"], kind="stable")
        rows = list(enumerate(ranked.itertuples(index=False)))
        keys = {
            row.id: {
                "family": (families or {}).get(row.id, ""),
                "system": _chemsys(row.formula) + ("|" + families.get(row.id, "") if families else ""),
            }
            for _, row in rows
        }
        share = shares[spread] if spread else {}
        level = 0
        while len(picks) < until:
            before = len(picks)
            for rank, row in rows:
                if len(picks) >= until:
                    break
                formula = row.formula
                if row.id in taken or (
                    max_per_composition is not None and per_formula.get(formula, 0) >= max_per_composition
                ):
                    continue
                if spread and share.get(keys[row.id][spread], 0) > level:
                    continue  # this family (or subsystem) already has its share of the pass
                if matcher is not None and row.mlip_status in USABLE:  # a failed relaxation has no structure
                    assert structure_of is not None  # a matcher exists only with it
                    s = structure_of(row.id)
                    if any(matcher.fit(s, other) for other in seen.get(formula, ())):
                        taken.add(row.id)  # a duplicate now stays one for the other pass too
                        continue
                    seen.setdefault(formula, []).append(s)
                per_formula[formula] = per_formula.get(formula, 0) + 1
                for kind, counts in shares.items():
                    counts[keys[row.id][kind]] = counts.get(keys[row.id][kind], 0) + 1
                taken.add(row.id)
                sigma = float(getattr(row, "sigma", np.nan))
                score = float(row.acq_score) if np.isfinite(row.acq_score) else np.nan  # nan: a failed relaxation
                failed = row.mlip_status not in USABLE
                picks.append(
                    Pick(
                        row.id, score, float(row.e_hull_pred), sigma, rank, "failed_relaxation" if failed else pass_kind
                    )
                )
            if not spread or (len(picks) == before and level >= max(share.values(), default=0)):
                break  # nothing more to take: a higher level would unlock no family or subsystem
            level += 1
    return picks


def structure_families(candidates: pd.DataFrame) -> dict[str, str]:
    """id -> structure family: the prototype a candidate was decorated from, else how it was made
    (``random`` crystals are one family; a substituted structure keeps its parent's prototype)."""
    if candidates.empty:
        return {}
    proto = candidates["prototype"].fillna("") if "prototype" in candidates else pd.Series("", index=candidates.index)
    source = candidates["source"].fillna("") if "source" in candidates else pd.Series("", index=candidates.index)
    return {cid: str(p or s) for cid, p, s in zip(candidates["id"], proto, source)}


def _chemsys(formula: str) -> str:
    return "-".join(sorted(str(el) for el in Composition(formula).elements))


def select_greedy(candidates: pd.DataFrame, budget: int) -> list[str]:
    """Ids of up to ``budget`` candidates, lowest predicted energy above hull first."""
    return [p.id for p in select(candidates, budget, strategy="greedy")]
