"""The steps of an active-learning round, as plain functions over config + store.

The round (``matdisc/round.py``) and its executor decide where each heavy step runs; everything here is
cheap bookkeeping that runs in the orchestrating process: which structures still need
work (so a resumed run skips what is complete), how results become store rows, model
registration and the training set. Scores, acquisition, stopping and metrics of a round
are in :mod:`matdisc.discovery`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import zlib
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from matdisc.config import CampaignConfig
from matdisc.dft import calculator_parameters, perturbed_copies, settings_hash
from matdisc.generate import Candidate, GenerationReport, dedup_key, generate, prototype_candidates, unique_against
from matdisc.mlip.model import describe, file_sha256
from matdisc.mlip.train import diverse_frames
from matdisc.records import ReferenceResult, RelaxResult, frames_from_atoms_with_results, scalar_fields
from matdisc.store import CampaignWriter, Frames
from matdisc.store.campaign import in_reference_set

PACKAGES = ("matdisc", "mace-torch", "torch", "ase", "pymatgen", "gpaw", "prefect", "dask", "zarr")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except Exception:
            out[name] = "not installed"
    return out


def record_run(w: CampaignWriter, cfg: CampaignConfig, orchestrator_run: str = "") -> None:
    reference_set = settings_hash(cfg.reference)
    earlier = w.reference_set()
    w.record_run(
        cfg.model_dump_json(), package_versions(), calculator_parameters(cfg.reference), reference_set, orchestrator_run
    )
    if earlier is not None and earlier != reference_set:
        logging.getLogger(__name__).warning(
            "reference settings changed (%s -> %s): a new reference set starts; earlier DFT energies are kept "
            "but never mixed into its hulls",
            earlier,
            reference_set,
        )


# -- candidates --------------------------------------------------------------------------------
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


def verified_hits(w: CampaignWriter) -> list[tuple[str, Structure]]:
    """(id, DFT-relaxed structure) of every verified hit: the parents of substitution."""
    cand = w.candidates()
    if cand.empty:
        return []
    return [(cid, w.structure(cid, "dft")) for cid in cand["id"][cand["is_hit"]]]


def stored_by_key(w: CampaignWriter) -> Callable[[set[str]], dict[str, list[Structure]]]:
    """Lazy access to stored candidates by dedup key: only touched buckets are read."""

    def fetch(keys: set[str]) -> dict[str, list[Structure]]:
        table = w.table("candidates")
        if table.empty:
            return {}
        rows = [i for i, k in enumerate(table["dedup_key"]) if k in keys]
        frames = w.tables.read_frames("candidates", rows) if rows else None
        out: dict[str, list[Structure]] = {}
        for j, i in enumerate(rows):
            out.setdefault(table["dedup_key"].iloc[i], []).append(frames.structure(j))
        return out

    return fetch


def round_candidates(w: CampaignWriter, cfg: CampaignConfig, round_: int) -> tuple[list[Candidate], list[str]]:
    """New structures for a round, deduplicated against everything already stored.

    The generation report (counts per source, composition cuts, skips with reasons,
    timings) is stored in ``generation`` and ``generation_skips`` once per round.
    """
    cands, keys, report = generate(
        cfg.chemsys,
        cfg.generation,
        round_=round_,
        existing_by_key=stored_by_key(w),
        hits=verified_hits(w) if cfg.generation.substitution.from_hits else [],
    )
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
        cands, _, report = generate(
            cfg.chemsys, cfg.generation, round_=round_, existing_by_key=stored_by_key(store), hits=hits
        )
    else:
        seeds = seed_candidates(cfg) if cfg.mlip.model == "cold-start" else []
        cands, _, report = generate(cfg.chemsys, cfg.generation, round_=round_, existing=[c.structure for c in seeds])
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


# -- MLIP --------------------------------------------------------------------------------------
def pending_relaxations(w: CampaignWriter, model_sha: str) -> list[tuple[str, Atoms]]:
    """Candidates without a relaxation by this model (every candidate is re-relaxed by each
    new model, so one round's MLIP hull comes from one model)."""
    mlip = w.table("mlip")
    done = set(mlip["id"][mlip["model_sha256"] == model_sha])
    return [(cid, a) for cid, a in candidate_atoms(w) if cid not in done]


def relax_batch_key(round_: int, model_sha: str, ids: list[str]) -> str:
    """Commit key of one relaxation batch, named by what it holds: a resumed round splits its
    remaining candidates into new batches, and an index-based key would collide with (and be
    skipped as) a batch committed before the crash."""
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]
    return f"r{round_}/mlip/{model_sha[:12]}/{digest}"


def record_relaxations(w: CampaignWriter, key: str, round_: int, results: list[RelaxResult], model_sha: str) -> None:
    records = []
    for r in results:
        row = scalar_fields(r)  # walltime_s: this structure's share of its task (cost calibration)
        row.update(round=round_, model_sha256=model_sha, e_mlip_per_atom=r.energy_per_atom)
        records.append(row)
    w.append_records("mlip", key, records, Frames.from_atoms([r.atoms for r in results]))


# -- reference calculations ------------------------------------------------------------------------
def record_reference(
    w: CampaignWriter, round_: int, result: RelaxResult, reference_set: str, *, verified: bool
) -> None:
    """A reference result: its frames join the training set; a verified one joins the DFT table.

    ``reference_set`` is the campaign's settings hash the calculation was asked for; the
    row's ``settings_hash`` is what its energy was computed with (they differ only when a
    recovery rung had to change an energy-defining setting). One row per candidate and set.
    """
    key = f"r{round_}/{result.id}/{reference_set}"
    settings = getattr(result, "settings_hash", "") or reference_set
    if result.frames:
        frames, cols = frames_from_atoms_with_results(result.frames)
        n = len(result.frames)
        w.append(
            "frames",
            key,
            {"id": [result.id] * n, "round": [round_] * n, "settings_hash": [settings] * n, **cols},
            frames,
        )
    if verified:
        row = scalar_fields(result)
        row.update(
            round=round_, reference_set=reference_set, settings_hash=settings, e_dft_per_atom=result.energy_per_atom
        )
        w.append_records("dft", key, [row], Frames.from_atoms([result.atoms]))


def failed_reference(cid: str, atoms: Atoms, err: BaseException, reference_set: str) -> RelaxResult:
    """The record of a calculation whose worker was lost more often than retries allow."""
    reason = f"worker lost: {type(err).__name__}: {err}".splitlines()[0][:300]
    return ReferenceResult(cid, "failed", reason, atoms, settings_hash=reference_set)


def perturbed_seed_jobs(w: CampaignWriter, cfg: CampaignConfig) -> list[tuple[str, Atoms]]:
    """Rattled/strained copies of relaxed seeds that have no training frames yet."""
    cs = cfg.mlip.cold_start
    dft = w.table("dft")
    if dft.empty or cs.perturbed_per_structure == 0:
        return []
    settings = settings_hash(cfg.reference)
    frames_table = w.table("frames")
    have = set(frames_table["id"][frames_table["settings_hash"] == settings])
    frames = w.frames("dft")
    jobs = []
    for i, row in enumerate(dft.to_dict("records")):
        if row["status"] != "ok" or row.get("settings_hash") != settings:
            continue
        copies = perturbed_copies(
            frames.atoms(i),
            cs.perturbed_per_structure,
            rattle=cs.rattle_stdev,
            strain=cs.strain,
            seed=cfg.generation.seed + zlib.crc32(row["id"].encode()),
        )
        for k, a in enumerate(copies):
            jid = f"{row['id']}-p{k}"
            if jid not in have:
                jobs.append((jid, a))
    return jobs


def dft_done(w: CampaignWriter, reference_set: str) -> set[str]:
    """Candidates with a reference result (of any outcome) in this reference set."""
    dft = w.table("dft")
    if dft.empty:
        return set()
    return set(dft["id"][in_reference_set(dft, reference_set)])


# -- models --------------------------------------------------------------------------------------
def current_model(w: CampaignWriter, before_round: int | None = None) -> dict[str, Any] | None:
    """The latest registered model (or the latest registered before ``before_round``)."""
    models = w.models()
    if not models.empty and before_round is not None:
        models = models[models["round"] < before_round]
    if models.empty:
        return None
    row = models.iloc[-1].to_dict()
    row["paths"] = [str(w.path / p) if not Path(p).is_absolute() else p for p in json.loads(row["paths"])]
    return row


def register_model(
    w: CampaignWriter,
    round_: int,
    paths: list[Path | str],
    *,
    n_frames: int,
    source: str,
    copy: bool = True,
    device: str = "cpu",
    dtype: str = "float64",
    mode: str = "",
    metrics: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Record a model (committee) in the registry; trained files are copied into ``models/``.

    A row holds what every result needs to name its model: sha256 (of the committee),
    member hashes, dtype, device, r_max, elements; trained models add the training mode
    (scratch / naive / multihead fine-tuning) and held-out energy/force errors.
    """
    stored = []
    for p in paths:
        if copy:
            dest = w.path / "models" / f"{file_sha256(p)}.model"
            if not dest.exists():  # copy, then rename: a killed copy never sits under the final name
                tmp = dest.with_name(dest.name + ".partial")  # removed by the next writer if left
                shutil.copyfile(p, tmp)
                os.replace(tmp, dest)
            stored.append(str(dest.relative_to(w.path)))
        else:
            stored.append(str(Path(p).resolve()))
    abs_paths = [str(w.path / s) if copy else s for s in stored]
    info = describe(abs_paths, device=device, dtype=dtype)
    metric_cols = {k: float(v) for k, v in (metrics or {}).items()}
    w.append_records(
        "models",
        f"r{round_}/model",
        [
            {
                "round": round_,
                "sha256": info.sha256,
                "paths": stored,
                "members": list(info.members),
                "n_train_frames": n_frames,
                "source": source,
                "mode": mode,
                "device": device,
                "dtype": dtype,
                "r_max": info.r_max,
                "elements": list(info.elements),
                **metric_cols,
            }
        ],
    )
    return current_model(w)  # type: ignore[return-value]


def training_set(w: CampaignWriter, cfg: CampaignConfig) -> tuple[list[Atoms], list[str]]:
    """Reference frames with the current settings, labelled for MACE, grouped by structure.

    ``mlip.training.frames``: ``all`` frames of every calculation, or ``diverse``: at most
    ``frames_per_structure`` per calculation, spread over its energies and forces. The
    groups keep all frames of one structure on one side of the train/validation split.
    """
    table = w.table("frames")
    if table.empty:
        return [], []
    tc = cfg.mlip.training
    settings = settings_hash(cfg.reference)
    usable = np.flatnonzero((table["settings_hash"] == settings).to_numpy() & np.isfinite(table["energy"].to_numpy()))
    # by structure id, each calculation's frames in trajectory order: the training set (and so the
    # model) must not depend on the order calculations happened to finish, or a resumed campaign
    # would train a different model than an uninterrupted one
    usable = usable[np.argsort(table["id"].to_numpy()[usable], kind="stable")]
    frames = w.frames("frames")
    if tc.frames == "diverse":
        by_id: dict[str, list[int]] = {}
        for i in usable:
            by_id.setdefault(table["id"].iloc[i], []).append(int(i))
        keep, n_atoms, energy = [], frames.n_atoms, table["energy"].to_numpy()
        for rows in by_id.values():
            e = energy[rows] / n_atoms[rows]
            fmax = np.array([np.linalg.norm(frames.forces_of(i), axis=1).max() for i in rows])
            keep += [rows[j] for j in diverse_frames(e, fmax, tc.frames_per_structure)]
        usable = np.array(keep, dtype=int)
    out, groups = [], []
    records = table.to_dict("records")
    for i in usable:
        row = records[i]
        a = frames.atoms(i)
        a.info["REF_energy"] = float(row["energy"])
        a.arrays["REF_forces"] = frames.forces_of(i).astype(float)
        if np.all(np.isfinite(row["stress"])):
            a.info["REF_stress"] = np.asarray(row["stress"], dtype=float)
        out.append(a)
        groups.append(re.sub(r"-p\d+$", "", row["id"]))  # perturbed copies stay with their parent
    return out, groups


def generation_summary(w: CampaignWriter, round_: int) -> str:
    """One line: new candidates per source and how many draws were skipped."""
    gen = w.table("generation")
    gen = gen[(gen["round"] == round_) & (gen["source"] != "dedup")]
    skips = w.table("generation_skips")
    n_skips = int((skips["round"] == round_).sum())
    parts = [f"{r['source']} {r['new']}/{r['generated']}" for r in gen.to_dict("records")]
    return ", ".join(parts) + f"; {n_skips} skipped (see generation_skips)"
