"""Generate: the round's new candidates, computed in the writer's process and stored once; the
cold-start seeds; and reading candidates back (structures by id, stored ones by dedup key)."""

from __future__ import annotations

import time
from collections.abc import Callable

from ase import Atoms
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from matdisc.budget import planning
from matdisc.config import CampaignConfig
from matdisc.generate import (
    Candidate,
    GenerationReport,
    dedup_key,
    enabled_sources,
    prototype_candidates,
    unique_against,
)
from matdisc.generate import generate as generate_candidates
from matdisc.stages.context import Round
from matdisc.store import Campaign, CampaignWriter, Frames


def generate(ctx: Round) -> None:
    """Store the round's candidates; a resumed round keeps its stored ones (generating again could
    differ: substitution follows the hits found since)."""
    w, cfg, r = ctx.w, ctx.cfg, ctx.number
    if w.has_batch("candidates", f"r{r}/generated"):
        ctx.log.info("round %d: resuming with its stored candidates", r)
        return
    t0 = time.perf_counter()
    new, keys = round_candidates(w, cfg, r, GenerationProgress(ctx))
    n_new = add_candidates(w, new, r, "generated", keys)
    seconds = time.perf_counter() - t0
    planning.record_stage(w, r, "generate", None, [seconds], 0.0, seconds, 1)
    ctx.log.info("round %d: %d new candidates (%s)", r, n_new, generation_summary(w, r))


class GenerationProgress:
    """Hears generation's sources finish: a log line each and the stage's progress (sources, then
    the dedup). Sources differ a lot in cost (a PyXtal batch takes far longer than the prototypes),
    so the time left is what the same sources took in the last round that generated, when the
    store has one; otherwise the rate so far."""

    def __init__(self, ctx: Round) -> None:
        self.ctx = ctx
        self.sources = [*enabled_sources(ctx.cfg.generation), "dedup"]
        self.expected = earlier_generation_seconds(ctx.w, ctx.number)
        known = all(src in self.expected for src in self.sources)
        self.progress = ctx.executor.progress(
            ctx.cfg,
            ctx.number,
            "generation",
            len(self.sources),
            sum(self.expected[src] for src in self.sources) if known else None,
        )
        self.known, self.last = known, time.monotonic()

    def __call__(self, source: str, structures: int) -> None:
        now, r = time.monotonic(), self.ctx.number
        if source == "dedup":
            self.ctx.log.info(
                "round %d generation: deduplicating %d structures against each other and the store", r, structures
            )
            return
        left = self.sources[self.sources.index(source) + 1 :]
        self.progress.advance(1, sum(self.expected[src] for src in left) if self.known else None)
        self.ctx.log.info(
            "round %d generation: %s: %d structures in %.1f s (sources %s)",
            r,
            source,
            structures,
            now - self.last,
            self.progress.text(),
        )
        self.last = now

    def finished(self) -> None:
        """Deduplicated: the stage is done."""
        self.progress.advance(len(self.sources) - self.progress.done)


def earlier_generation_seconds(w: Campaign, round_: int) -> dict[str, float]:
    """{source or "dedup": seconds} of the last round before ``round_`` that recorded its generation."""
    gen = w.table("generation")
    if gen.empty or not (gen["round"] < round_).any():
        return {}
    last = gen[gen["round"] == gen.loc[gen["round"] < round_, "round"].max()]
    return {str(src): float(sec) for src, sec in zip(last["source"], last["seconds"])}


def add_candidates(
    w: CampaignWriter,
    cands: list[Candidate],
    round_: int,
    source: str,
    keys: list[str] | None = None,
    first_index: int = 0,
) -> int:
    """Append this round's candidates once (key ``r{round}/{source}``); returns how many are new.

    Each row carries its provenance (generator, prototype, parent, probability, space group,
    PyXtal seed) and its dedup key, so later rounds dedup without re-reducing the store.
    """
    key = f"r{round_}/{source}"
    if w.has_batch("candidates", key):
        return 0
    if keys is None:
        keys = [dedup_key(c.structure) for c in cands]
    records, atoms = [], []
    for i, (c, k) in enumerate(zip(cands, keys), start=first_index):
        records.append(
            {
                "id": f"r{round_}-{i:04d}-{c.formula}-{c.prototype or c.source}",
                "formula": c.formula,
                "round": round_,
                "source": c.source,
                "prototype": c.prototype,
                "parent": c.parent,
                "probability": float(c.probability),
                "spacegroup": int(c.spacegroup),
                "gen_seed": int(c.seed),
                "detail": c.detail,
                "aflow": c.aflow,
                "strukturbericht": c.strukturbericht,
                "pearson": c.pearson,
                "dedup_key": k,
                "n_atoms": len(c.structure),
            }
        )
        atoms.append(AseAtomsAdaptor.get_atoms(c.structure))
    w.append_records("candidates", key, records, Frames.from_atoms(atoms))
    return len(records)


def seed_candidates(cfg: CampaignConfig) -> list[Candidate]:
    """Cold start: elements in fcc/bcc/hcp and a few small ordered compounds."""
    cands = prototype_candidates(cfg.chemsys, cfg.generation, names=cfg.mlip.cold_start.prototypes)
    keep = unique_against([c.structure for c in cands])
    out = [cands[i] for i in keep]
    for c in out:
        c.source = "seed"
    return out


def verified_hits(w: Campaign) -> list[tuple[str, Structure]]:
    """(id, DFT-relaxed structure) of every verified hit: the parents of substitution."""
    cand = w.candidates()
    if cand.empty:
        return []
    return [(cid, w.structure(cid, "dft")) for cid in cand["id"][cand["is_hit"]]]


def stored_by_key(w: Campaign) -> Callable[[set[str]], dict[str, list[Structure]]]:
    """Lazy access to stored candidates by dedup key: only touched buckets are read."""

    def fetch(keys: set[str]) -> dict[str, list[Structure]]:
        table = w.table("candidates")
        if table.empty:
            return {}
        rows = [i for i, k in enumerate(table["dedup_key"]) if k in keys]
        if not rows:
            return {}
        frames = w.tables.read_frames("candidates", rows)
        out: dict[str, list[Structure]] = {}
        for j, i in enumerate(rows):
            out.setdefault(table["dedup_key"].iloc[i], []).append(frames.structure(j))
        return out

    return fetch


def round_candidates(
    w: CampaignWriter, cfg: CampaignConfig, round_: int, progress: GenerationProgress | None = None
) -> tuple[list[Candidate], list[str]]:
    """New structures for a round, deduplicated against everything already stored (``progress``
    hears how generation goes).

    The generation report (counts per source, composition cuts, skips with reasons,
    timings) is stored in ``generation`` and ``generation_skips`` once per round.
    """
    cands, keys, report = generate_candidates(
        cfg.chemsys,
        cfg.generation,
        round_=round_,
        existing_by_key=stored_by_key(w),
        hits=verified_hits(w) if cfg.generation.substitution.from_hits else [],
        heard=progress,
    )
    if progress is not None:
        progress.finished()
    key = f"r{round_}/generation"
    if not w.has_batch("generation", key):
        w.append_records(
            "generation",
            key,
            [
                {
                    "round": round_,
                    "source": src,
                    "generated": report.generated.get(src, 0),
                    "new": report.new.get(src, 0),
                    "seconds": float(report.seconds.get(src, 0.0)),
                }
                for src in report.generated
            ]
            + [
                {
                    "round": round_,
                    "source": "dedup",
                    "generated": sum(report.generated.values()),
                    "new": len(cands),
                    "seconds": float(report.seconds.get("dedup", 0.0)),
                }
            ],
        )
        skips = report.skips + [
            {"source": "composition", "formula": f, "spacegroup": 0, "reason": r} for f, r in report.cut.items()
        ]
        if skips:
            w.append_records("generation_skips", key, [{"round": round_, **s} for s in skips])
    return cands, keys


def preview_candidates(cfg: CampaignConfig, round_: int) -> tuple[list[Candidate], GenerationReport]:
    """What round ``round_`` would add, computing nothing and writing nothing: deduplicated against
    the store read-only when it exists, else against the seeds a cold start begins with."""
    from matdisc.store import open_campaign
    from matdisc.store.tables import store_exists

    if store_exists(cfg.store_path):
        store = open_campaign(cfg.store_path)
        hits = verified_hits(store) if cfg.generation.substitution.from_hits else []
        cands, _, report = generate_candidates(
            cfg.chemsys, cfg.generation, round_=round_, existing_by_key=stored_by_key(store), hits=hits
        )
    else:
        seeds = seed_candidates(cfg) if cfg.mlip.model == "cold-start" else []
        cands, _, report = generate_candidates(
            cfg.chemsys, cfg.generation, round_=round_, existing=[c.structure for c in seeds]
        )
    return cands, report


def candidate_atoms(w: CampaignWriter, ids: list[str] | None = None) -> list[tuple[str, Atoms]]:
    """(id, initial Atoms) of candidates (all, or the given ids, in that order)."""
    table = w.table("candidates")
    if table.empty:
        return []
    frames = w.frames("candidates")
    index = {cid: i for i, cid in enumerate(table["id"])}
    wanted = list(table["id"]) if ids is None else ids
    return [(cid, frames.atoms(index[cid])) for cid in wanted]


def generation_summary(w: CampaignWriter, round_: int) -> str:
    """One line: new candidates per source and how many draws were skipped."""
    gen = w.table("generation")
    gen = gen[(gen["round"] == round_) & (gen["source"] != "dedup")]
    skips = w.table("generation_skips")
    n_skips = int((skips["round"] == round_).sum())
    parts = [f"{r['source']} {r['new']}/{r['generated']}" for r in gen.to_dict("records")]
    return ", ".join(parts) + f"; {n_skips} skipped (see generation_skips)"
