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
    formulas: Sequence[str], energies_per_atom: Sequence[float], chemsys: Sequence[str]
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
