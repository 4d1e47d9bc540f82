"""Candidate generation: prototype decoration and deduplication (more sources in later rounds)."""

from __future__ import annotations

from dataclasses import dataclass

from pymatgen.core import Structure

from matdisc.config import GenerationConfig
from matdisc.generate.dedup import unique_against
from matdisc.generate.prototypes import PROTOTYPES, decorate, prototype_names


@dataclass
class Candidate:
    """A generated structure and where it came from."""

    structure: Structure
    source: str
    prototype: str

    @property
    def formula(self) -> str:
        return self.structure.composition.reduced_formula


def prototype_candidates(chemsys: list[str], cfg: GenerationConfig, names: list[str] | None = None) -> list[Candidate]:
    """Decorate prototypes over the chemical system (elements alone included)."""
    out = []
    for name in prototype_names(chemsys, names if names is not None else cfg.prototypes):
        for s in decorate(PROTOTYPES[name], chemsys, max_atoms=cfg.max_atoms):
            out.append(Candidate(s, "prototype", name))
    return out


def generate(chemsys: list[str], cfg: GenerationConfig, existing: list[Structure]) -> list[Candidate]:
    """New, unique candidates for this round (deduplicated also against ``existing``)."""
    cands = prototype_candidates(chemsys, cfg)
    keep = unique_against([c.structure for c in cands], existing)
    cands = [cands[i] for i in keep]
    if cfg.max_candidates is not None:
        cands = cands[: cfg.max_candidates]
    return cands


__all__ = ["Candidate", "PROTOTYPES", "generate", "prototype_candidates", "unique_against"]
