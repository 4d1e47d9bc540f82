"""Which stoichiometries to build: enumeration, and SMACT screening for ionic systems.

Every subset of the chemical system (up to ``max_elements`` elements) gets every reduced
integer ratio whose formula unit fits in ``max_atoms``. For an ionic system (a metal and an
anion former) a composition survives only if SMACT's ``smact_filter`` finds oxidation
states that are charge neutral and in Pauling electronegativity order; every cut is
counted with its reason. Metallic systems are not screened: intermetallics do not obey
formal charges.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from math import gcd

from pymatgen.core import Composition, Element

#: Oxidation-state set SMACT uses (ICSD 2024 occurrences).
OXIDATION_SET = "icsd24"


def is_ionic(chemsys: list[str]) -> bool:
    """An ionic system has a metal and a non-metal that forms anions (O, F, S, Cl, N ...)."""
    els = [Element(s) for s in chemsys]
    return any(e.is_metal for e in els) and any(
        not e.is_metal and not e.is_metalloid and not e.is_noble_gas for e in els
    )


def enumerate_compositions(chemsys: list[str], max_atoms: int, max_elements: int | None = None) -> list[Composition]:
    """Reduced compositions of 1..max_elements elements with at most ``max_atoms`` atoms."""
    max_elements = min(max_elements or len(chemsys), len(chemsys))
    out = []
    for k in range(1, max_elements + 1):
        for els in itertools.combinations(sorted(chemsys), k):
            if k == 1:
                out.append(Composition({els[0]: 1}))
                continue
            for counts in itertools.product(range(1, max_atoms - k + 2), repeat=k):
                if sum(counts) > max_atoms or _gcd(counts) != 1:
                    continue
                out.append(Composition(dict(zip(els, counts))))
    return out


def _gcd(counts: tuple[int, ...]) -> int:
    g = 0
    for c in counts:
        g = gcd(g, c)
    return g


@dataclass
class CompositionScreen:
    """Outcome of screening: kept compositions with oxidation states, and why others were cut."""

    kept: list[Composition]
    oxidation: dict[str, dict[str, int]]  # reduced formula -> element -> oxidation state
    cut: dict[str, str] = field(default_factory=dict)  # reduced formula -> reason
    screened: bool = True

    @property
    def cut_reasons(self) -> dict[str, int]:
        return dict(Counter(r.split(":")[0] for r in self.cut.values()))

    def allows(self, formula: str) -> bool:
        return not self.screened or formula in self.oxidation


@cache
def oxidation_states(symbol: str) -> tuple[int, ...]:
    """SMACT's ICSD-24 oxidation states of an element (empty when none are known)."""
    import smact

    try:
        return tuple(smact.Element(symbol).oxidation_states_icsd24 or ())
    except Exception:  # SMACT has no data for the element
        return ()


@cache
def _smact_allowed(elements: tuple[str, ...], threshold: int) -> dict[str, dict[str, int]]:
    """smact_filter over one element set: reduced formula -> first allowed oxidation states."""
    import smact
    from smact.screening import smact_filter

    allowed: dict[str, dict[str, int]] = {}
    # with oxidation states asked for, smact yields (symbols, oxidation states, ratio) triples
    found: list[tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]] = smact_filter(  # type: ignore[assignment]
        [smact.Element(e) for e in elements], threshold=threshold, oxidation_states_set=OXIDATION_SET
    )
    for els, ox, ratio in found:
        formula = Composition(dict(zip(els, ratio))).reduced_formula
        allowed.setdefault(formula, dict(zip(els, ox)))
    return allowed


def _likely_states(comp: Composition, smact_states: dict[str, int]) -> dict[str, int]:
    """The most probable oxidation states (pymatgen's ICSD statistics), else SMACT's first.

    SMACT lists every allowed assignment; FeO is allowed as Fe+ O- too, and ionic radii
    for volume scaling need the likely one (Fe2+ O2-). Mixed valence is rounded.
    """
    guesses = comp.oxi_state_guesses(max_sites=-1)
    if guesses:
        return {el: int(round(q)) for el, q in guesses[0].items()}
    return smact_states


def _has_neutral_states(comp: Composition) -> bool:
    els = [str(e) for e in comp.elements]
    states = [oxidation_states(e) for e in els]
    counts = [int(comp[e]) for e in els]
    return any(sum(q * n for q, n in zip(qs, counts)) == 0 for qs in itertools.product(*states))


def screen(chemsys: list[str], compositions: list[Composition]) -> CompositionScreen:
    """SMACT screening of ``compositions`` (a no-op for metallic systems)."""
    if not is_ionic(chemsys):
        return CompositionScreen(kept=list(compositions), oxidation={}, screened=False)
    kept, oxidation, cut = [], {}, {}
    for comp in compositions:
        formula = comp.reduced_formula
        els = tuple(sorted(str(e) for e in comp.elements))
        if len(els) == 1:  # elements are always candidates (hull end points)
            kept.append(comp)
            oxidation[formula] = {els[0]: 0}
            continue
        missing = [e for e in els if not oxidation_states(e)]
        if missing:
            cut[formula] = f"no oxidation states: {missing[0]} has none in SMACT's {OXIDATION_SET} set"
            continue
        allowed = _smact_allowed(els, max(int(comp[e]) for e in els))
        if formula in allowed:
            kept.append(comp)
            oxidation[formula] = _likely_states(comp, allowed[formula])
        elif not _has_neutral_states(comp):
            cut[formula] = "charge neutrality: no combination of oxidation states sums to zero"
        else:
            cut[formula] = "electronegativity: every neutral assignment fails the Pauling test"
    return CompositionScreen(kept=kept, oxidation=oxidation, cut=cut)
