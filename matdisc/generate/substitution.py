"""Ionic substitution: known crystals with their species swapped for the campaign's.

pymatgen's data-mined substitution model (Hautier et al., Inorg. Chem. 2011; the lambda
table shipped with pymatgen) gives the probability that a structure stays stable when
species are exchanged. For an ionic system the parents get oxidation states by guess and
``Substitutor.pred_from_structures`` proposes every charge-balanced substitution above the
threshold. Intermetallics carry no formal charges: there each element stands in for its
most common cation in the same probability table (``cond_prob_list``) and charge balance
is not asked for, which keeps the chemical-similarity ranking without pretending the
alloy is ionic. Since the joint probability of k swaps shrinks like a product, the metallic
path compares the per-element geometric mean with the threshold (Cu3Au -> Ni3Al, the
classic L1_2 pair, has joint probability 5e-5 but 7e-3 per element).

Parents are the prototype library's namesake compounds (NaCl, CaTiO3, MgCu2, ...) and the
campaign's verified hits, so every hit seeds the next round.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

from pymatgen.analysis.structure_prediction.substitution_probability import SubstitutionProbability
from pymatgen.analysis.structure_prediction.substitutor import Substitutor
from pymatgen.core import Element, Species, Structure

from matdisc.generate.compositions import CompositionScreen
from matdisc.generate.geometry import scale_to_alloy_volume, scale_to_ionic_radii


@dataclass
class Substituted:
    structure: Structure
    parent: str
    probability: float
    substitution: str  # "Na->Li, Cl->F"


@lru_cache(maxsize=1)
def _probability_model() -> SubstitutionProbability:
    return SubstitutionProbability()


@cache
def _allowed_species() -> frozenset:
    return frozenset(_probability_model().species)


def _neutral(s: Structure) -> Structure:
    s = s.copy()
    s.remove_oxidation_states()
    return s


def _rescale(s: Structure, screen: CompositionScreen) -> Structure:
    ox = screen.oxidation.get(s.composition.reduced_formula)
    return scale_to_ionic_radii(s, ox) if ox else scale_to_alloy_volume(s)


def _target_species(screen: CompositionScreen, n: int) -> list[list[Species]]:
    """Species sets (one per allowed n-element composition's oxidation states), deduplicated."""
    out, seen = [], set()
    for states in screen.oxidation.values():
        if len(states) != n:
            continue
        species = tuple(sorted(Species(el, q) for el, q in states.items()))
        if species in seen or not set(species) <= _allowed_species():
            continue
        seen.add(species)
        out.append(list(species))
    return out


def _mapping(species_map: dict) -> str:
    def name(x) -> str:
        return str(Species.from_dict(x)) if isinstance(x, dict) else str(x)

    return ", ".join(f"{name(a)}->{name(b)}" for a, b in species_map.items())


def _ionic(parents: list[tuple[str, Structure]], screen: CompositionScreen, threshold: float) -> list[Substituted]:
    sub = Substitutor(threshold=threshold)
    targets_by_size: dict[int, list[list[Species]]] = {}  # the same for every parent of n species
    out = []
    for label, parent in parents:
        try:
            charged = parent.copy()
            charged.add_oxidation_state_by_guess()
        except Exception:
            continue  # no charge-balanced guess: the parent cannot seed ionic substitution
        if not set(charged.species) <= _allowed_species():
            continue
        n = len(charged.composition.elements)
        if n not in targets_by_size:
            targets_by_size[n] = _target_species(screen, n)
        for targets in targets_by_size[n]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                preds = sub.pred_from_structures(
                    targets, [{"structure": charged, "id": label}], remove_duplicates=False
                )
            for t in preds:
                last: Mapping[str, Any] = t.history[-1]  # type: ignore[assignment]  # as_dict() of the step
                mapping = _mapping(last.get("species_map") or {})
                out.append(Substituted(_neutral(t.final_structure), label, float(t.other_parameters["proba"]), mapping))
    return out


@cache
def _as_cation(symbol: str) -> Species | None:
    el = Element(symbol)
    for q in list(el.common_oxidation_states) + list(el.oxidation_states):
        if q > 0 and Species(symbol, q) in _allowed_species():
            return Species(symbol, q)
    return None


def _metallic(parents: list[tuple[str, Structure]], chemsys: list[str], threshold: float) -> list[Substituted]:
    model = _probability_model()
    out = []
    for label, parent in parents:
        parent = _neutral(parent)
        els = [str(e) for e in parent.composition.elements]
        src = [_as_cation(e) for e in els]
        if any(sp is None for sp in src):
            continue
        for targets in itertools.permutations(chemsys, len(els)):
            if list(targets) == els:
                continue
            dst = [_as_cation(e) for e in targets]
            if any(sp is None for sp in dst):
                continue
            p = float(model.cond_prob_list(dst, src))
            if p ** (1 / len(els)) <= threshold:
                continue
            s = parent.copy()
            s.replace_species(dict(zip(els, targets)))
            mapping = ", ".join(f"{a}->{b}" for a, b in zip(els, targets) if a != b)
            out.append(Substituted(s, label, p, mapping))
    return out


def substitute(
    parents: list[tuple[str, Structure]],
    chemsys: list[str],
    screen: CompositionScreen,
    *,
    threshold: float = 1e-3,
    max_atoms: int = 20,
) -> list[Substituted]:
    """Substituted structures over ``chemsys``, most probable first, volume-rescaled.

    Only results inside the chemical system, within ``max_atoms`` and allowed by the
    composition screen are returned.
    """
    results = _ionic(parents, screen, threshold) if screen.screened else _metallic(parents, chemsys, threshold)
    allowed = set(chemsys)
    out = []
    for r in results:
        els = {str(e) for e in r.structure.composition.elements}
        if not els <= allowed or len(r.structure) > max_atoms:
            continue
        if not screen.allows(r.structure.composition.reduced_formula):
            continue
        r.structure = _rescale(r.structure, screen)
        out.append(r)
    out.sort(key=lambda r: -r.probability)
    return out
