"""The AFLOW prototype library, which pymatgen ships with structures, as the prototype source.

``pymatgen/analysis/prototypes/aflow_prototypes.json.gz`` holds 288 prototypes of the AFLOW
Library of Crystallographic Prototypes (Mehl et al. 2017), each as the primitive cell of its
namesake compound with its AFLOW label, Strukturbericht symbol, Pearson symbol and mineral
name. A prototype with ``k`` species is decorated by every injective map of its species onto
the system's elements; decorations that give the same crystal are kept once, and each is
scaled to the volume model of :mod:`matdisc.generate.geometry`. Reading it with plain JSON
takes 0.2 s (``monty.loadfn`` builds SNL objects: 12 s).
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from pymatgen.core import Structure

from matdisc.generate.geometry import scale_to_alloy_volume, scale_to_ionic_radii


@dataclass(frozen=True, eq=False)
class LibraryPrototype:
    """One AFLOW prototype: its tags and the namesake compound's primitive cell."""

    name: str  # Strukturbericht symbol when it names one prototype, else the AFLOW label
    aflow: str  # e.g. AB_cF16_227_a_b
    strukturbericht: str  # e.g. B32 ("" when none)
    pearson: str  # e.g. cF16
    mineral: str
    structure: Structure

    @property
    def spacegroup(self) -> int:
        return int(self.aflow.split("_")[2])

    @property
    def species(self) -> list[str]:
        """The namesake compound's elements, in the AFLOW label's order (alphabetical)."""
        return sorted({sp.symbol for sp in self.structure.species})

    @property
    def n_sites(self) -> int:
        return len(self.structure)

    @property
    def compound(self) -> str:
        return self.structure.composition.reduced_formula


def library_path() -> str:
    import pymatgen.analysis.prototypes as prototypes

    return os.path.join(os.path.dirname(prototypes.__file__), "aflow_prototypes.json.gz")


@lru_cache(maxsize=1)
def library() -> tuple[LibraryPrototype, ...]:
    """Every prototype of the library, in its file order."""
    with gzip.open(library_path(), "rt") as fh:
        raw = json.load(fh)
    tags = [entry["tags"] for entry in raw]
    sb = [t.get("strukturbericht") or "" for t in tags]
    sb = ["" if s == "None" else s for s in sb]
    taken = Counter(sb)
    names = [s if s and taken[s] == 1 else t["aflow"] for s, t in zip(sb, tags)]
    repeated = Counter(names)
    out = []
    for entry, t, s, name in zip(raw, tags, sb, names):
        structure = Structure.from_dict(entry["snl"])
        if repeated[name] > 1:  # one AFLOW label, several internal parameters: the namesake tells them apart
            name = f"{name}-{structure.composition.reduced_formula}"
        out.append(LibraryPrototype(name, t["aflow"], s, t.get("pearson", ""), t.get("mineral", ""), structure))
    return tuple(out)


@lru_cache(maxsize=1)
def by_name() -> dict[str, LibraryPrototype]:
    """Prototypes by name, AFLOW label (when it names one) and Strukturbericht symbol (built once:
    every round's generation and every config validation looks names up)."""
    protos = library()
    labels = Counter(p.aflow for p in protos)
    out: dict[str, LibraryPrototype] = {}
    for p in protos:
        out[p.name] = p
        if labels[p.aflow] == 1:
            out[p.aflow] = p
    return out


def available(max_atoms: int) -> dict[int, int]:
    """How many prototypes have at most ``max_atoms`` sites, per number of species."""
    return dict(sorted(Counter(len(p.species) for p in library() if p.n_sites <= max_atoms).items()))


def decorations(prototype: LibraryPrototype, elements: list[str]) -> list[tuple[str, ...]]:
    """Injective maps of the prototype's species (in order) onto ``elements``."""
    return list(itertools.permutations(elements, len(prototype.species)))


def decorate(
    prototype: LibraryPrototype,
    elements: list[str],
    *,
    oxidation: dict[str, dict[str, int]] | None = None,
) -> list[tuple[tuple[str, ...], Structure]]:
    """Every symmetry-distinct decoration of ``prototype`` by ``elements``, volume-scaled
    (ionic radii for formulas in ``oxidation``, atomic volumes otherwise)."""
    from matdisc.generate.dedup import Deduplicator

    out: list[tuple[tuple[str, ...], Structure]] = []
    seen = Deduplicator()
    for species in decorations(prototype, elements):
        s = prototype.structure.copy()
        s.replace_species(dict(zip(prototype.species, species)))
        ox = (oxidation or {}).get(s.composition.reduced_formula)
        s = scale_to_ionic_radii(s, ox) if ox else scale_to_alloy_volume(s)
        if seen.add(s):
            out.append((species, s))
    return out
