"""The steps of an active-learning round, as plain functions over config + store.

The flow (``flows/campaign.py``) decides where each heavy step runs; everything here is
cheap bookkeeping that runs in the orchestrating process: which structures still need
work (so a resumed run skips what is complete), how results become store rows, hulls,
acquisition, model registration and the round's metrics.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from importlib.metadata import version
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from ase import Atoms
from pymatgen.core import Composition, Structure
from pymatgen.io.ase import AseAtomsAdaptor

from matdisc import metrics
from matdisc.active import select
from matdisc.config import CampaignConfig
from matdisc.dft import calculator_parameters, perturbed_copies, settings_hash
from matdisc.generate import Candidate, dedup_key, generate, prototype_candidates, unique_against
from matdisc.mlip.model import describe, file_sha256
from matdisc.mlip.train import diverse_frames
from matdisc.records import USABLE, ReferenceResult, RelaxResult, frames_from_atoms_with_results, scalar_fields
from matdisc.store import CampaignWriter, Frames
from matdisc.store.campaign import in_reference_set
from matdisc.thermo import score

PACKAGES = ("matdisc", "mace-torch", "torch", "ase", "pymatgen", "gpaw", "prefect", "dask", "zarr")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except Exception:
            out[name] = "not installed"
    return out


def record_run(w: CampaignWriter, cfg: CampaignConfig) -> None:
    reference_set = settings_hash(cfg.reference)
    earlier = w.reference_set()
    w.record_run(cfg.model_dump_json(), package_versions(), calculator_parameters(cfg.reference), reference_set)
    if earlier is not None and earlier != reference_set:
        logging.getLogger(__name__).warning(
            "reference settings changed (%s -> %s): a new reference set starts; earlier DFT energies are kept "
            "but never mixed into its hulls", earlier, reference_set)


# -- candidates --------------------------------------------------------------------------------
def add_candidates(w: CampaignWriter, cands: list[Candidate], round_: int, source: str,
                   keys: list[str] | None = None) -> int:
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
    for i, (c, k) in enumerate(zip(cands, keys)):
        records.append({"id": f"r{round_}-{i:04d}-{c.formula}-{c.prototype or c.source}", "formula": c.formula,
                        "round": round_, "source": c.source, "prototype": c.prototype, "parent": c.parent,
                        "probability": float(c.probability), "spacegroup": int(c.spacegroup),
                        "gen_seed": int(c.seed), "detail": c.detail, "dedup_key": k,
                        "n_atoms": len(c.structure)})
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


def _stored_by_key(w: CampaignWriter) -> Callable[[set[str]], dict[str, list[Structure]]]:
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
    cands, keys, report = generate(cfg.chemsys, cfg.generation, round_=round_, existing_by_key=_stored_by_key(w),
                                   hits=verified_hits(w) if cfg.generation.substitution.from_hits else [])
    key = f"r{round_}/generation"
    if not w.has_batch("generation", key):
        w.append_records("generation", key, [
            {"round": round_, "source": src, "generated": report.generated.get(src, 0), "new": report.new.get(src, 0),
             "seconds": float(report.seconds.get(src, 0.0))} for src in report.generated
        ] + [{"round": round_, "source": "dedup", "generated": sum(report.generated.values()),
              "new": len(cands), "seconds": float(report.seconds.get("dedup", 0.0))}])
        skips = report.skips + [{"source": "composition", "formula": f, "spacegroup": 0, "reason": r}
                                for f, r in report.cut.items()]
        if skips:
            w.append_records("generation_skips", key, [{"round": round_, **s} for s in skips])
    return cands, keys


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
    done = set(mlip["id"][mlip["model_sha256"] == model_sha]) if not mlip.empty else set()
    return [(cid, a) for cid, a in candidate_atoms(w) if cid not in done]


def record_relaxations(w: CampaignWriter, key: str, round_: int, results: list[RelaxResult], model_sha: str) -> None:
    records = []
    for r in results:
        row = scalar_fields(r)
        row.pop("walltime_s")
        row.update(round=round_, model_sha256=model_sha, e_mlip_per_atom=r.energy_per_atom)
        records.append(row)
    w.append_records("mlip", key, records, Frames.from_atoms([r.atoms for r in results]))


# -- reference calculations ------------------------------------------------------------------------
def record_reference(w: CampaignWriter, round_: int, result: RelaxResult, reference_set: str, *,
                     verified: bool) -> None:
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
        w.append("frames", key, {"id": [result.id] * n, "round": [round_] * n, "settings_hash": [settings] * n,
                                 **cols}, frames)
    if verified:
        row = scalar_fields(result)
        row.update(round=round_, reference_set=reference_set, settings_hash=settings,
                   e_dft_per_atom=result.energy_per_atom)
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
        copies = perturbed_copies(frames.atoms(i), cs.perturbed_per_structure, rattle=cs.rattle_stdev,
                                  strain=cs.strain, seed=cfg.generation.seed + i)
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


def reference_set_jobs(w: CampaignWriter, cfg: CampaignConfig) -> list[tuple[str, Atoms]]:
    """Elemental references (each element in fcc, bcc and hcp) missing from the current reference set.

    A hull needs its elements computed with the same settings: a campaign that starts from
    a foundation model, or whose reference settings changed, computes them first. Missing
    reference structures are added as round-0 candidates (source ``reference``).
    """
    settings = settings_hash(cfg.reference)
    cand = w.table("candidates")
    elemental = [c for c in prototype_candidates(cfg.chemsys, cfg.generation, names=["fcc", "bcc", "hcp"])
                 if len(c.structure.composition.elements) == 1]
    keys = [dedup_key(c.structure) for c in elemental]
    stored = set(cand["dedup_key"]) if not cand.empty and "dedup_key" in cand else set()
    missing = [(c, k) for c, k in zip(elemental, keys) if k not in stored]
    if missing:
        for c, _ in missing:
            c.source = "reference"
        add_candidates(w, [c for c, _ in missing], 0, "reference", [k for _, k in missing])
        cand = w.table("candidates")
    wanted = set(keys)
    ids = [cid for cid, k in zip(cand["id"], cand["dedup_key"]) if k in wanted]
    done = dft_done(w, settings)
    return [(cid, a) for cid, a in candidate_atoms(w, ids) if cid not in done]


# -- hulls and acquisition ------------------------------------------------------------------------
def update_scores(w: CampaignWriter, cfg: CampaignConfig, round_: int, key: str) -> pd.DataFrame:
    """Recompute every candidate's hull energies; append them as this round's scores.

    Besides the MLIP hull (``e_hull_mlip``) and the DFT hull (``e_hull_dft``, hits) each
    candidate gets ``e_hull_pred``: its MLIP formation energy against the current DFT hull,
    what acquisition ranks by. Every earlier candidate is rescored, so as phases are
    verified the hull drops and predictions that were stable against the old hull are not.
    """
    settings = settings_hash(cfg.reference)
    cand = w.candidates(settings)
    if cand.empty:
        return cand
    e_mlip = np.where(cand["mlip_status"].isin(USABLE), cand["e_mlip_per_atom"], np.nan)
    same_settings = cand["settings_hash"] == settings if "settings_hash" in cand else False
    e_dft = np.where((cand["dft_status"] == "ok") & same_settings, cand["e_dft_per_atom"], np.nan)
    scores = score(list(cand["formula"]), e_mlip, e_dft, cfg.chemsys, cfg.active_learning.hull_tolerance)
    w.append("scores", key, {"id": cand["id"].to_numpy(), "round": np.full(len(cand), round_), **scores})
    return w.candidates(settings)


def _n_elements(formula: str) -> int:
    return len(Composition(formula).elements)


def _relaxed_structures(w: CampaignWriter) -> Callable[[str], Structure]:
    """id -> latest MLIP-relaxed structure, read once from the store."""
    mlip = w.table("mlip")
    frames = w.frames("mlip") if not mlip.empty else None
    row_of = {cid: i for i, cid in enumerate(mlip["id"])} if not mlip.empty else {}
    return lambda cid: frames.structure(row_of[cid])  # type: ignore[union-attr]


def dft_calls_used(w: CampaignWriter, before_round: int | None = None) -> int:
    """DFT calculations acquisition has spent (rounds >= 1, before ``before_round``)."""
    sel = w.table("selections")
    if sel.empty:
        return 0
    return int((sel["round"] < before_round).sum()) if before_round is not None else len(sel)


def round_budget(w: CampaignWriter, cfg: CampaignConfig, round_: int) -> int:
    """This round's DFT budget: ``dft_budget``, capped by what ``max_dft_total`` leaves."""
    al = cfg.active_learning
    if al.max_dft_total is None:
        return al.dft_budget
    return max(0, min(al.dft_budget, al.max_dft_total - dft_calls_used(w, round_)))


def select_for_reference(w: CampaignWriter, cfg: CampaignConfig, round_: int) -> list[str]:
    """This round's DFT picks, recorded once so that a resumed round verifies the same ones.

    Each pick is stored with the strategy, its acquisition score, predicted e_hull and
    committee spread at the time of picking (what precision of "stable" calls is measured on).
    """
    key = f"r{round_}/selection"
    sel = w.table("selections")
    if w.has_batch("selections", key):
        return list(sel["id"][sel["round"] == round_])
    al = cfg.active_learning
    cand = w.candidates()
    verified: dict[str, list[Structure]] = {}
    structure_of = None
    if al.diversity and not cand.empty:
        structure_of = _relaxed_structures(w)
        done = cand[(cand["dft_status"] == "ok") & cand["mlip_status"].isin(USABLE)]
        for cid, formula in zip(done["id"], done["formula"]):
            verified.setdefault(formula, []).append(structure_of(cid))
    picks = select(cand, round_budget(w, cfg, round_), strategy=al.acquisition, kappa=al.kappa,
                   explore_fraction=al.explore_fraction, seed=cfg.generation.seed * 1000 + round_,
                   structure_of=structure_of, verified=verified, max_per_composition=al.max_per_composition)
    w.append("selections", key, {"id": [p.id for p in picks], "round": [round_] * len(picks),
                                 "strategy": [al.acquisition] * len(picks), "score": [p.score for p in picks],
                                 "e_hull_pred": [p.e_hull_pred for p in picks], "sigma": [p.sigma for p in picks],
                                 "rank": [p.rank for p in picks]})
    return [p.id for p in picks]


def stop_reason(w: CampaignWriter, cfg: CampaignConfig, round_: int) -> str | None:
    """Why the campaign stops before ``round_`` (None: it goes on).

    Rules: the total DFT budget is spent, or ``patience`` rounds in a row found no new hit.
    (The number of rounds is the flow's loop bound.)
    """
    al = cfg.active_learning
    if al.max_dft_total is not None and dft_calls_used(w, round_) >= al.max_dft_total:
        return f"DFT budget spent: {dft_calls_used(w, round_)} of max_dft_total {al.max_dft_total} calculations"
    rounds = w.rounds()
    if al.patience is not None and not rounds.empty and "new_hits" in rounds:
        recent = rounds[(rounds["round"] >= 1) & (rounds["round"] < round_)].tail(al.patience)
        if len(recent) == al.patience and (recent["new_hits"].fillna(0) == 0).all():
            return f"no new hits for {al.patience} rounds (patience)"
    return None


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


def register_model(w: CampaignWriter, round_: int, paths: list[Path | str], *, n_frames: int, source: str,
                   copy: bool = True, device: str = "cpu", dtype: str = "float64", mode: str = "",
                   metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """Record a model (committee) in the registry; trained files are copied into ``models/``.

    A row holds what every result needs to name its model: sha256 (of the committee),
    member hashes, dtype, device, r_max, elements; trained models add the training mode
    (scratch / naive / multihead fine-tuning) and held-out energy/force errors.
    """
    stored = []
    for p in paths:
        if copy:
            dest = w.path / "models" / f"{file_sha256(p)}.model"
            if not dest.exists():
                shutil.copyfile(p, dest)
            stored.append(str(dest.relative_to(w.path)))
        else:
            stored.append(str(Path(p).resolve()))
    abs_paths = [str(w.path / s) if copy else s for s in stored]
    info = describe(abs_paths, device=device, dtype=dtype)
    metric_cols = {k: float(v) for k, v in (metrics or {}).items()}
    w.append_records("models", f"r{round_}/model", [{
        "round": round_, "sha256": info.sha256, "paths": stored, "members": list(info.members),
        "n_train_frames": n_frames, "source": source, "mode": mode, "device": device, "dtype": dtype,
        "r_max": info.r_max, "elements": list(info.elements), **metric_cols}])
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
        usable = np.array(sorted(keep), dtype=int)
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


# -- round metrics -------------------------------------------------------------------------------
def round_metrics(w: CampaignWriter, cfg: CampaignConfig, round_: int, model_sha: str,
                  model_errors: dict[str, float] | None = None) -> dict[str, Any]:
    """The round's record: counts, discovery metrics (see :mod:`matdisc.metrics`), hull changes.

    ``mae_mev_per_atom`` compares the screening model's relaxed energies with the DFT ones of
    this round's verifications; ``model_errors`` (``mae_before_mev``/``mae_after_mev``: the
    screening and the retrained committee on the same new DFT structures) is merged in.
    """
    tol = cfg.active_learning.hull_tolerance
    cand = w.candidates()
    mlip = w.table("mlip")
    dft = w.table("dft")
    this_mlip = mlip[(mlip["round"] == round_)] if not mlip.empty else mlip
    this_dft = dft[(dft["round"] == round_)] if not dft.empty else dft
    verified = cand[cand["id"].isin(this_dft["id"]) & (cand["dft_status"] == "ok")] if not dft.empty else cand[:0]
    pairs = verified[["e_dft_per_atom"]].join(
        this_mlip.drop_duplicates("id", keep="last").set_index("id")["e_mlip_per_atom"], on=verified["id"]
    ) if not verified.empty and not this_mlip.empty else pd.DataFrame(columns=["e_mlip_per_atom", "e_dft_per_atom"])
    sel = w.table("selections")
    picks = sel[sel["round"] == round_] if not sel.empty else sel
    all_picks = sel[sel["round"] <= round_] if not sel.empty else sel
    phases = metrics.hull_phases(cand)
    earlier = w.rounds()
    earlier = earlier[earlier["round"] < round_] if not earlier.empty else earlier
    last = earlier["hull_phases"].iloc[-1] if "hull_phases" in earlier and len(earlier) else ""
    before = set(json.loads(last)) if isinstance(last, str) and last else set()  # older stores: no record
    new_phases, removed = metrics.hull_changes(before, phases)
    new_hits = int(verified["is_hit"].sum())
    n_calls = len(picks)
    hits_by_acquisition = int(cand["is_hit"][cand["id"].isin(all_picks["id"])].sum()) if len(all_picks) else 0
    cand = cand.assign(n_elements=[_n_elements(f) for f in cand["formula"]])
    out = {
        "round": round_,
        "candidates": int((cand["round"] == round_).sum()),
        "relaxed": int(this_mlip["status"].isin(USABLE).sum()) if not this_mlip.empty else 0,
        "dft_verified": int((this_dft["status"] == "ok").sum()) if not this_dft.empty else 0,
        "dft_failed": int((this_dft["status"] != "ok").sum()) if not this_dft.empty else 0,
        "hits": int(cand["is_hit"].sum()),
        "model_sha256": model_sha,
        "mae_mev_per_atom": metrics.energy_mae_mev(pairs["e_mlip_per_atom"], pairs["e_dft_per_atom"]),
        "dft_calls": n_calls,
        "dft_calls_total": len(all_picks),
        "new_hits": new_hits,
        "hit_rate": new_hits / n_calls if n_calls else float("nan"),
        "precision_stable": metrics.precision_of_stable_calls(picks, cand, tol) if n_calls else float("nan"),
        "prevalence_est": metrics.prevalence_estimate(cand, tol),
        "hull_phases": sorted(phases),
        "new_phases": new_phases,
        "removed_phases": removed,
    }
    out["daf"] = metrics.daf(hits_by_acquisition, len(all_picks), out["prevalence_est"])
    out.update({"mae_before_mev": float("nan"), "mae_after_mev": float("nan"), **(model_errors or {})})
    return out


def new_reference_frames(w: CampaignWriter, round_: int) -> list[Atoms]:
    """This round's verified DFT structures, labelled with their energies (for model errors)."""
    dft = w.table("dft")
    if dft.empty:
        return []
    rows = np.flatnonzero((dft["round"] == round_).to_numpy() & (dft["status"] == "ok").to_numpy())
    frames = w.tables.read_frames("dft", rows) if len(rows) else None
    out = []
    for j, i in enumerate(rows):
        a = frames.atoms(j)  # type: ignore[union-attr]
        a.info["REF_energy"] = float(dft["energy"].iloc[i])
        out.append(a)
    return out


def generation_summary(w: CampaignWriter, round_: int) -> str:
    """One line: new candidates per source and how many draws were skipped."""
    gen = w.table("generation")
    gen = gen[(gen["round"] == round_) & (gen["source"] != "dedup")] if not gen.empty else gen
    skips = w.table("generation_skips")
    n_skips = int((skips["round"] == round_).sum()) if not skips.empty else 0
    parts = [f"{r['source']} {r['new']}/{r['generated']}" for r in gen.to_dict("records")]
    return ", ".join(parts) + f"; {n_skips} skipped (see generation_skips)"


def hits_by_source(cand: pd.DataFrame) -> pd.DataFrame:
    """Candidates, DFT-verified and hits per generator: which source produced the hits."""
    if cand.empty:
        return pd.DataFrame(columns=["source", "candidates", "verified", "hits"])
    return (cand.assign(verified=cand["dft_status"] == "ok")
            .groupby("source").agg(candidates=("id", "size"), verified=("verified", "sum"), hits=("is_hit", "sum"))
            .reset_index())


def round_report(cfg: CampaignConfig, metrics: dict[str, Any], cand: pd.DataFrame) -> str:
    """Markdown for the Prefect UI: the round's numbers, hits per generator and current hits."""
    lines = [f"# {cfg.name}: round {metrics['round']}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in metrics.items() if k != "round"]
    lines += ["", "## Candidates by generator", "", "| source | candidates | DFT verified | hits |", "|---|---|---|---|"]
    lines += [f"| {r['source']} | {r['candidates']} | {r['verified']} | {r['hits']} |"
              for r in hits_by_source(cand).to_dict("records")]
    hits = cand[cand["is_hit"]].sort_values("e_form_dft") if not cand.empty else cand
    lines += ["", "## Verified stable compounds", "",
              "| formula | prototype | E_form DFT (eV/atom) | E_hull DFT | E MLIP - DFT (meV/atom) |",
              "|---|---|---|---|---|"]
    for r in hits.to_dict("records"):
        err = (r["e_mlip_per_atom"] - r["e_dft_per_atom"]) * 1000
        lines.append(f"| {r['formula']} | {r['prototype']} | {r['e_form_dft']:.3f} | {r['e_hull_dft']:.3f} | {err:.1f} |")
    return "\n".join(lines)
