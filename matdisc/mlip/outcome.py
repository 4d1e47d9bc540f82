"""What became of one relaxation: the outcome classes both engines report.

``ok``                the forces (and cell forces) fell below fmax, symmetry kept
``symmetry_changed``  converged, but to another space group (reason names both); a real
                      structure, kept on the hull, flagged because the candidate's
                      prototype no longer describes it
``unconverged``       still above fmax after max_steps (reason names the steps)
``exploded``          non-finite energy or forces, atoms closer than a physical minimum,
                      or the volume grew past ×3: the potential left its training domain
``failed``            the calculator raised

Only ``ok`` and ``symmetry_changed`` energies enter a hull; every other outcome is
recorded with its reason.
"""

from __future__ import annotations

from ase import Atoms

from matdisc.ase_relax import MIN_DISTANCE, min_distance
from matdisc.records import USABLE

__all__ = ["SYMPREC", "USABLE", "classify", "spacegroup"]
#: spglib tolerance (Å) for "same space group": loose enough to forgive fmax-level noise.
SYMPREC = 0.1


def spacegroup(atoms: Atoms, symprec: float = SYMPREC) -> tuple[str, int]:
    import spglib

    cell = (atoms.cell[:], atoms.get_scaled_positions(), atoms.numbers)
    data = spglib.get_symmetry_dataset(cell, symprec=symprec)
    if data is None:
        return "P1", 1
    return data.international, int(data.number)


def classify(initial: Atoms, final: Atoms, status: str, reason: str) -> tuple[str, str]:
    """Refine an engine's verdict with checks on the final structure."""
    if status in ("exploded", "failed", "error"):
        return status, reason
    d = min_distance(final)
    if d < MIN_DISTANCE:
        return "exploded", f"atoms {d:.2f} Å apart"
    if status == "ok" and final.pbc.all():
        before, after = spacegroup(initial), spacegroup(final)
        if before[1] != after[1]:
            return "symmetry_changed", f"{before[0]} ({before[1]}) -> {after[0]} ({after[1]})"
    return status, reason
