"""Formation energies and energies above the convex hull from the campaign's own entries.

A hull is only right when the elemental references were computed with the same method:
the campaign relaxes fcc, bcc and hcp of every element itself (EMT, for one, puts hcp
below fcc), and an element with no entry makes the hull undefined (NaN), never a guess.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition


def hull_energies(
    formulas: Sequence[str], energies_per_atom: Sequence[float] | np.ndarray, chemsys: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(formation energy, energy above hull) in eV/atom for each entry; NaN where undefined.

    Entries with a non-finite energy are left out of the hull and get NaN.
    """
    n = len(formulas)
    e_form = np.full(n, np.nan)
    e_hull = np.full(n, np.nan)
    entries = {}
    for i, (f, e) in enumerate(zip(formulas, energies_per_atom)):
        if e is not None and np.isfinite(e):
            comp = Composition(f)
            entries[i] = PDEntry(comp, float(e) * comp.num_atoms)
    present = {str(el) for entry in entries.values() for el in entry.composition.elements}
    elements_done = {
        str(entry.composition.elements[0]) for entry in entries.values() if len(entry.composition.elements) == 1
    }
    if not entries or not set(chemsys) <= elements_done or not present <= set(chemsys):
        return e_form, e_hull
    pd = PhaseDiagram(list(entries.values()))
    for i, entry in entries.items():
        e_form[i] = pd.get_form_energy_per_atom(entry)
        e_hull[i] = pd.get_e_above_hull(entry, allow_negative=True)
    return e_form, e_hull


def energy_above_reference_hull(
    formulas: Sequence[str],
    e_form_per_atom: Sequence[float] | np.ndarray,
    ref_formulas: Sequence[str],
    ref_e_form_per_atom: Sequence[float] | np.ndarray,
    chemsys: Sequence[str],
) -> np.ndarray:
    """Predicted formation energies measured against a hull built from reference ones (eV/atom).

    This is how a screening model sees the current DFT hull: a candidate's MLIP formation
    energy (from MLIP elemental references, so per-element offsets of the model cancel)
    minus the DFT hull's formation energy at its composition. As phases are verified the
    reference hull drops and so does every candidate's predicted stability. Negative: below
    the reference hull (a predicted new phase). NaN where the prediction is not finite.
    """
    refs = [PDEntry(Composition(el), 0.0) for el in chemsys]
    for f, e in zip(ref_formulas, ref_e_form_per_atom):
        if e is not None and np.isfinite(e):
            comp = Composition(f)
            refs.append(PDEntry(comp, float(e) * comp.num_atoms))
    pd = PhaseDiagram(refs)
    out = np.full(len(formulas), np.nan)
    hull_at: dict[str, float] = {}
    for i, (f, e) in enumerate(zip(formulas, e_form_per_atom)):
        if e is None or not np.isfinite(e):
            continue
        if f not in hull_at:
            hull_at[f] = float(pd.get_hull_energy_per_atom(Composition(f)))
        out[i] = float(e) - hull_at[f]
    return out


def score(
    formulas: Sequence[str],
    e_mlip_per_atom: Sequence[float] | np.ndarray,
    e_dft_per_atom: Sequence[float] | np.ndarray,
    chemsys: Sequence[str],
    hull_tolerance: float = 0.0,
) -> dict[str, np.ndarray]:
    """Every hull quantity of a round from per-atom energies (NaN where not usable).

    ``e_form_mlip``/``e_hull_mlip`` (the MLIP hull), ``e_form_dft``/``e_hull_dft`` (the DFT
    hull), ``e_hull_pred`` (MLIP formation energy against the DFT hull; the MLIP hull
    until the DFT hull has every element) and ``is_hit`` (a compound on the DFT hull, within
    ``hull_tolerance``, below the elements).
    """
    ef_m, eh_m = hull_energies(formulas, e_mlip_per_atom, chemsys)
    ef_d, eh_d = hull_energies(formulas, e_dft_per_atom, chemsys)
    eh_p = energy_above_reference_hull(formulas, ef_m, formulas, ef_d, chemsys) if np.isfinite(ef_d).any() else eh_m
    n_el = np.array([len(Composition(f).elements) for f in formulas])
    is_hit = (eh_d <= hull_tolerance + 1e-9) & (ef_d < 0) & (n_el > 1)
    return {
        "e_form_mlip": ef_m,
        "e_hull_mlip": eh_m,
        "e_form_dft": ef_d,
        "e_hull_dft": eh_d,
        "e_hull_pred": eh_p,
        "is_hit": is_hit,
    }
