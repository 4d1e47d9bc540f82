"""Candidate generation: compositions, prototypes, substitution, random crystals, dedup.

``generate`` is what a round calls: it screens compositions, runs each enabled source in a
fixed order (prototypes, substitution, random), drops duplicates of each other and of the
store, and returns candidates with their provenance plus a report of what was cut, skipped
and merged, and how long each step took. Same config, seed and round give the same
candidates.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pymatgen.core import Structure

from matdisc.config import GenerationConfig
from matdisc.generate import aflow
from matdisc.generate.compositions import CompositionScreen, enumerate_compositions, is_ionic, screen
from matdisc.generate.dedup import Deduplicator, dedup_key, fingerprint, unique, unique_against
from matdisc.generate.prototypes import PROTOTYPES, decorate, prototype_names
from matdisc.generate.random_search import random_batch
from matdisc.generate.substitution import substitute

SOURCES = ("file", "prototype", "substitution", "random")


@dataclass
class Candidate:
    """A generated structure and where it came from (provenance is stored with it)."""

    structure: Structure
    source: str  # file | prototype | substitution | random | seed
    prototype: str = ""  # prototype name (for substitution: the parent's, when known)
    parent: str = ""  # substitution parent: candidate id or library compound
    probability: float = math.nan  # substitution probability
    spacegroup: int = 0  # space group the generator built (PyXtal's draw, or the prototype's)
    seed: int = -1  # PyXtal random_state
    detail: str = ""  # decoration or substitution map, e.g. "A=Cu B=Pd" or "Na+->Li+"
    aflow: str = ""  # AFLOW prototype label, e.g. AB_cF16_227_a_b (library prototypes)
    strukturbericht: str = ""  # e.g. B32
    pearson: str = ""  # e.g. cF16

    @property
    def formula(self) -> str:
        return self.structure.composition.reduced_formula


@dataclass
class GenerationReport:
    """What a round's generation did, for logs, the Prefect UI and the store."""

    compositions: int = 0
    compositions_kept: int = 0
    cut_reasons: dict[str, int] = field(default_factory=dict)
    cut: dict[str, str] = field(default_factory=dict)  # composition -> why it was cut
    generated: dict[str, int] = field(default_factory=dict)
    new: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    skips: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "compositions": self.compositions,
            "compositions_kept": self.compositions_kept,
            "cut_reasons": self.cut_reasons,
            "generated": self.generated,
            "new": self.new,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "skips": len(self.skips),
            "skip_reasons": dict(Counter(s["reason"].split(":")[0] for s in self.skips)),
        }


def composition_screen(chemsys: list[str], cfg: GenerationConfig) -> CompositionScreen:
    return screen(chemsys, enumerate_compositions(chemsys, cfg.max_atoms, cfg.max_elements))


def prototype_candidates(
    chemsys: list[str],
    cfg: GenerationConfig,
    names: list[str] | None = None,
    comp_screen: CompositionScreen | None = None,
    skips: list[dict[str, Any]] | None = None,
) -> list[Candidate]:
    """Every symmetry-distinct decoration of the prototypes over the chemical system.

    ``names`` (else ``cfg.prototype.names``): those prototypes, each looked up in the built-in
    ideal-geometry library first (the cold-start seeds), then in AFLOW's. None: the whole library
    of ``cfg.prototype.library``. Prototypes left out for their size, or that fail to decorate,
    are appended to ``skips`` with the reason.
    """
    comp_screen = comp_screen or composition_screen(chemsys, cfg)
    max_el = cfg.max_elements or len(chemsys)
    skips = skips if skips is not None else []
    names = names if names is not None else cfg.prototype.names
    builtin = (
        [n for n in names if n in PROTOTYPES]
        if names is not None
        else (prototype_names(is_ionic(chemsys)) if cfg.prototype.library == "builtin" else [])
    )
    listed = aflow.by_name()
    library = (
        [listed[n] for n in names if n not in PROTOTYPES]
        if names is not None
        else (list(aflow.library()) if cfg.prototype.library == "aflow" else [])
    )
    out = []
    for name in builtin:
        p = PROTOTYPES[name]
        if len(p.labels) > max_el:
            continue
        for species, s in decorate(p, chemsys, max_atoms=cfg.max_atoms, oxidation=comp_screen.oxidation):
            if comp_screen.allows(s.composition.reduced_formula):
                detail = " ".join(f"{lb}={el}" for lb, el in zip(p.labels, species))
                out.append(
                    Candidate(
                        s,
                        "prototype",
                        name,
                        spacegroup=p.spacegroup_number,
                        detail=detail,
                        strukturbericht=p.strukturbericht,
                    )
                )
    unary = cfg.prototype.elements if cfg.prototype.elements is not None else len(chemsys) == 1
    for lp in library:
        if len(lp.species) > max_el or (len(lp.species) == 1 and not unary and names is None):
            continue
        if lp.n_sites > cfg.max_atoms:
            skips.append(
                {
                    "source": "prototype",
                    "formula": lp.compound,
                    "spacegroup": lp.spacegroup,
                    "reason": f"too many sites: {lp.n_sites} > max_atoms {cfg.max_atoms} ({lp.aflow})",
                }
            )
            continue
        try:
            decorated = aflow.decorate(lp, chemsys, oxidation=comp_screen.oxidation)
        except Exception as err:  # noqa: BLE001 - one prototype's failure must not stop the round
            skips.append(
                {
                    "source": "prototype",
                    "formula": lp.compound,
                    "spacegroup": lp.spacegroup,
                    "reason": f"decoration failed: {type(err).__name__}: {err} ({lp.aflow})",
                }
            )
            continue
        for species, s in decorated:
            if comp_screen.allows(s.composition.reduced_formula):
                detail = " ".join(f"{a}={b}" for a, b in zip(lp.species, species))
                out.append(
                    Candidate(
                        s,
                        "prototype",
                        lp.name,
                        spacegroup=lp.spacegroup,
                        detail=detail,
                        aflow=lp.aflow,
                        strukturbericht=lp.strukturbericht,
                        pearson=lp.pearson,
                    )
                )
    return out


def library_parents(
    chemsys: list[str], max_elements: int, library: str = "aflow", max_atoms: int | None = None
) -> list[tuple[str, Structure, str]]:
    """The library's namesake compounds (NaCl, NaTl, ...) as substitution parents: (label,
    structure, prototype name). AFLOW parents larger than ``max_atoms`` are left out."""
    if library == "builtin":
        return [
            (f"{p.compound} ({p.name})", p.build(dict(zip(p.labels, p.example))), p.name)
            for p in PROTOTYPES.values()
            if 1 < len(p.labels) <= max_elements
        ]
    return [
        (f"{p.compound} ({p.name})", p.structure, p.name)
        for p in aflow.library()
        if 1 < len(p.species) <= max_elements and (max_atoms is None or p.n_sites <= max_atoms)
    ]


def substitution_candidates(
    chemsys: list[str],
    cfg: GenerationConfig,
    comp_screen: CompositionScreen,
    hits: Sequence[tuple[str, Structure]] = (),
) -> list[Candidate]:
    sc = cfg.substitution
    parents: list[tuple[str, Structure]] = []
    prototype_of: dict[str, str] = {}
    if sc.from_prototypes:
        for label, s, name in library_parents(
            chemsys, cfg.max_elements or len(chemsys), cfg.prototype.library, cfg.max_atoms
        ):
            parents.append((label, s))
            prototype_of[label] = name
    if sc.parents:
        from matdisc.structure_files import read_all

        parents.extend(
            (s.id, s.structure)
            for s in read_all(sc.parents, [], "generation.substitution.parents", check_elements=False)
        )
    if sc.from_hits:
        parents.extend(hits)
    subs = substitute(parents, chemsys, comp_screen, threshold=sc.threshold, max_atoms=cfg.max_atoms)
    return [
        Candidate(
            r.structure,
            "substitution",
            prototype_of.get(r.parent, ""),
            parent=r.parent,
            probability=r.probability,
            detail=r.substitution,
        )
        for r in subs
    ]


def file_candidates(cfg: GenerationConfig) -> list[Candidate]:
    """The structures of ``generation.from_files``, as they are (no composition screen: the user
    chose them), each with its file and its id in the file as provenance."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    from matdisc.structure_files import read_all

    out = []
    for s in read_all(cfg.from_files.files, [], "generation.from_files", check_elements=False):
        try:
            spacegroup = SpacegroupAnalyzer(s.structure, symprec=0.1).get_space_group_number()
        except Exception:  # noqa: BLE001 - spglib gives up on some cells: the space group is provenance only
            spacegroup = 0
        out.append(Candidate(s.structure, "file", spacegroup=spacegroup, parent=s.source, detail=s.id))
    return out


def enabled_sources(cfg: GenerationConfig) -> list[str]:
    """The sources a round's generation runs, in the order it runs them."""
    on = {
        "file": cfg.from_files.enabled,
        "prototype": cfg.prototype.enabled,
        "substitution": cfg.substitution.enabled,
        "random": bool(cfg.random.enabled and cfg.random.per_round),
    }
    return [src for src in SOURCES if on[src]]


def generate(
    chemsys: list[str],
    cfg: GenerationConfig,
    *,
    round_: int = 1,
    existing: Sequence[Structure] = (),
    existing_keys: list[str] | None = None,
    existing_by_key: Callable[[set[str]], dict[str, list[Structure]]] | None = None,
    hits: Sequence[tuple[str, Structure]] = (),
    heard: Callable[[str, int], None] | None = None,
) -> tuple[list[Candidate], list[str], GenerationReport]:
    """New, unique candidates for a round, their dedup keys, and the report.

    ``existing`` are the structures already in the store (with their stored dedup keys when
    known), or ``existing_by_key`` fetches them by bucket; ``hits`` are verified
    (id, structure) pairs that seed substitution. ``heard(source, structures)`` hears each source
    of ``enabled_sources`` as it finishes, then ``("dedup", structures)`` as deduplication starts
    (a round's generation can take minutes).
    """
    report = GenerationReport()
    sources = enabled_sources(cfg)

    def finished(src: str) -> None:
        if heard is not None:
            heard(src, len(per_source[src]))

    t0 = time.perf_counter()
    comp_screen = composition_screen(chemsys, cfg)
    report.compositions = len(comp_screen.kept) + len(comp_screen.cut)
    report.compositions_kept = len(comp_screen.kept)
    report.cut_reasons = comp_screen.cut_reasons
    report.cut = dict(comp_screen.cut)
    report.seconds["compositions"] = time.perf_counter() - t0

    per_source: dict[str, list[Candidate]] = {}
    if "file" in sources:
        t0 = time.perf_counter()
        per_source["file"] = file_candidates(cfg)
        report.seconds["file"] = time.perf_counter() - t0
        finished("file")
    if "prototype" in sources:
        t0 = time.perf_counter()
        per_source["prototype"] = prototype_candidates(chemsys, cfg, comp_screen=comp_screen, skips=report.skips)
        report.seconds["prototype"] = time.perf_counter() - t0
        finished("prototype")
    if "substitution" in sources:
        t0 = time.perf_counter()
        per_source["substitution"] = substitution_candidates(chemsys, cfg, comp_screen, hits)
        report.seconds["substitution"] = time.perf_counter() - t0
        finished("substitution")
    if "random" in sources:
        t0 = time.perf_counter()
        rc = cfg.random
        crystals, skips = random_batch(
            comp_screen,
            rc.per_round,
            seed=(cfg.seed, round_),
            workers=cfg.workers,
            max_atoms=cfg.max_atoms,
            min_distance=rc.min_distance,
            max_attempts=rc.max_attempts,
        )
        per_source["random"] = [
            Candidate(c.structure, "random", spacegroup=c.spacegroup, seed=c.seed) for c in crystals
        ]
        report.skips.extend(
            {"source": "random", "formula": s.formula, "spacegroup": s.spacegroup, "reason": s.reason} for s in skips
        )
        report.seconds["random"] = time.perf_counter() - t0
        finished("random")

    t0 = time.perf_counter()
    cands = [c for src in SOURCES for c in per_source.get(src, [])]
    if heard is not None:
        heard("dedup", len(cands))
    report.generated = {src: len(v) for src, v in per_source.items()}
    keep, keys = unique(
        [c.structure for c in cands],
        existing,
        existing_keys=existing_keys,
        existing_by_key=existing_by_key,
        workers=cfg.workers,
    )
    report.seconds["dedup"] = time.perf_counter() - t0

    caps = {"prototype": cfg.prototype.per_round, "substitution": cfg.substitution.per_round}
    taken: dict[str, int] = {}
    out: list[Candidate] = []
    out_keys: list[str] = []
    for i in keep:
        src = cands[i].source
        cap = caps.get(src)
        if cap is not None and taken.get(src, 0) >= cap:
            continue
        if cfg.max_candidates is not None and len(out) >= cfg.max_candidates:
            break
        taken[src] = taken.get(src, 0) + 1
        out.append(cands[i])
        out_keys.append(keys[i])
    report.new = {src: taken.get(src, 0) for src in per_source}
    return out, out_keys, report


__all__ = [
    "Candidate",
    "CompositionScreen",
    "Deduplicator",
    "GenerationReport",
    "PROTOTYPES",
    "SOURCES",
    "enabled_sources",
    "composition_screen",
    "dedup_key",
    "enumerate_compositions",
    "fingerprint",
    "generate",
    "prototype_candidates",
    "screen",
    "substitution_candidates",
    "unique",
    "unique_against",
]
