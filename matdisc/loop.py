"""The steps of an active-learning round, as plain functions over config + store.

The flow (``flows/campaign.py``) decides where each heavy step runs; everything here is
cheap bookkeeping that runs in the orchestrating process: which structures still need
work (so a resumed run skips what is complete), how results become store rows, hulls,
acquisition, model registration and the round's metrics.
"""

from __future__ import annotations

import json
import re
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ase import Atoms
from pymatgen.io.ase import AseAtomsAdaptor

from matdisc.active import select_greedy
from matdisc.config import CampaignConfig
from matdisc.dft import calculator_parameters, perturbed_copies, settings_hash
from matdisc.generate import Candidate, generate, prototype_candidates
from matdisc.mlip.model import committee_sha256, file_sha256
from matdisc.records import RelaxResult, frames_from_atoms_with_results, scalar_fields
from matdisc.store import CampaignWriter, Frames
from matdisc.thermo import hull_energies

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
    w.record_run(cfg.model_dump_json(), package_versions(), calculator_parameters(cfg.reference))


# -- candidates --------------------------------------------------------------------------------
def add_candidates(w: CampaignWriter, cands: list[Candidate], round_: int, source: str) -> int:
    """Append this round's candidates once (key ``r{round}/{source}``); returns how many are new."""
    key = f"r{round_}/{source}"
    if w.has_batch("candidates", key):
        return 0
    records, atoms = [], []
    for i, c in enumerate(cands):
        records.append({"id": f"r{round_}-{i:04d}-{c.formula}-{c.prototype}", "formula": c.formula,
                        "round": round_, "source": source, "prototype": c.prototype,
                        "n_atoms": len(c.structure)})
        atoms.append(AseAtomsAdaptor.get_atoms(c.structure))
    w.append_records("candidates", key, records, Frames.from_atoms(atoms))
    return len(records)


def seed_candidates(cfg: CampaignConfig) -> list[Candidate]:
    """Cold start: elements in fcc/bcc/hcp and a few small ordered compounds."""
    cands = prototype_candidates(cfg.chemsys, cfg.generation, names=cfg.mlip.cold_start.prototypes)
    from matdisc.generate import unique_against

    keep = unique_against([c.structure for c in cands], [])
    return [cands[i] for i in keep]


def round_candidates(w: CampaignWriter, cfg: CampaignConfig) -> list[Candidate]:
    """New structures for a round, deduplicated against everything already stored."""
    existing = [s for s in stored_structures(w, "candidates")]
    return generate(cfg.chemsys, cfg.generation, existing)


def stored_structures(w: CampaignWriter, table: str) -> list:
    if table not in w.tables.tables():
        return []
    frames = w.frames(table)
    return [frames.structure(i) for i in range(len(frames))]


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
def record_reference(w: CampaignWriter, round_: int, result: RelaxResult, settings: str, *, verified: bool) -> None:
    """A reference result: its frames join the training set; a verified one joins the DFT table."""
    key = f"r{round_}/{result.id}"
    if result.frames:
        frames, cols = frames_from_atoms_with_results(result.frames)
        n = len(result.frames)
        w.append("frames", key, {"id": [result.id] * n, "round": [round_] * n, "settings_hash": [settings] * n,
                                 **cols}, frames)
    if verified:
        row = scalar_fields(result)
        row.update(round=round_, settings_hash=settings, e_dft_per_atom=result.energy_per_atom)
        w.append_records("dft", key, [row], Frames.from_atoms([result.atoms]))


def perturbed_seed_jobs(w: CampaignWriter, cfg: CampaignConfig) -> list[tuple[str, Atoms]]:
    """Rattled/strained copies of relaxed seeds that have no training frames yet."""
    cs = cfg.mlip.cold_start
    dft = w.table("dft")
    if dft.empty or cs.perturbed_per_structure == 0:
        return []
    have = set(w.table("frames")["id"])
    frames = w.frames("dft")
    jobs = []
    for i, row in enumerate(dft.to_dict("records")):
        if row["status"] != "ok":
            continue
        copies = perturbed_copies(frames.atoms(i), cs.perturbed_per_structure, rattle=cs.rattle_stdev,
                                  strain=cs.strain, seed=cfg.generation.seed + i)
        for k, a in enumerate(copies):
            jid = f"{row['id']}-p{k}"
            if jid not in have:
                jobs.append((jid, a))
    return jobs


def dft_done(w: CampaignWriter) -> set[str]:
    dft = w.table("dft")
    return set(dft["id"]) if not dft.empty else set()


# -- hulls and acquisition ------------------------------------------------------------------------
def update_scores(w: CampaignWriter, cfg: CampaignConfig, round_: int, key: str) -> pd.DataFrame:
    """Recompute MLIP and DFT hulls over every candidate; append them as this round's scores."""
    cand = w.candidates()
    if cand.empty:
        return cand
    settings = settings_hash(cfg.reference)
    e_mlip = np.where(cand["mlip_status"] == "ok", cand["e_mlip_per_atom"], np.nan)
    same_settings = cand["settings_hash"] == settings if "settings_hash" in cand else False
    e_dft = np.where((cand["dft_status"] == "ok") & same_settings, cand["e_dft_per_atom"], np.nan)
    ef_m, eh_m = hull_energies(list(cand["formula"]), e_mlip, cfg.chemsys)
    ef_d, eh_d = hull_energies(list(cand["formula"]), e_dft, cfg.chemsys)
    n_el = np.array([_n_elements(f) for f in cand["formula"]])
    is_hit = (eh_d <= cfg.active_learning.hull_tolerance + 1e-9) & (ef_d < 0) & (n_el > 1)
    w.append("scores", key, {"id": cand["id"].to_numpy(), "round": np.full(len(cand), round_),
                             "e_form_mlip": ef_m, "e_hull_mlip": eh_m, "e_form_dft": ef_d, "e_hull_dft": eh_d,
                             "is_hit": is_hit})
    return w.candidates()


def _n_elements(formula: str) -> int:
    from pymatgen.core import Composition

    return len(Composition(formula).elements)


def select_for_reference(w: CampaignWriter, cfg: CampaignConfig, round_: int) -> list[str]:
    """This round's DFT picks, recorded once so that a resumed round verifies the same ones."""
    key = f"r{round_}/selection"
    sel = w.table("selections")
    if w.has_batch("selections", key):
        return list(sel["id"][sel["round"] == round_])
    picks = select_greedy(w.candidates(), cfg.active_learning.dft_budget)
    w.append("selections", key, {"id": picks, "round": [round_] * len(picks)})
    return picks


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
                   copy: bool = True) -> dict[str, Any]:
    """Record a model (committee) in the registry; trained files are copied into ``models/``."""
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
    sha = committee_sha256(abs_paths)
    w.append_records("models", f"r{round_}/model", [{
        "round": round_, "sha256": sha, "paths": stored, "members": [file_sha256(p) for p in abs_paths],
        "n_train_frames": n_frames, "source": source}])
    return current_model(w)  # type: ignore[return-value]


def training_set(w: CampaignWriter, cfg: CampaignConfig) -> tuple[list[Atoms], list[str]]:
    """Every reference frame with the current settings, labelled for MACE, grouped by structure."""
    table = w.table("frames")
    if table.empty:
        return [], []
    frames = w.frames("frames")
    settings = settings_hash(cfg.reference)
    out, groups = [], []
    for i, row in enumerate(table.to_dict("records")):
        if row["settings_hash"] != settings or not np.isfinite(row["energy"]):
            continue
        a = frames.atoms(i)
        a.info["REF_energy"] = float(row["energy"])
        a.arrays["REF_forces"] = frames.forces_of(i).astype(float)
        if np.all(np.isfinite(row["stress"])):
            a.info["REF_stress"] = np.asarray(row["stress"], dtype=float)
        out.append(a)
        groups.append(re.sub(r"-p\d+$", "", row["id"]))  # perturbed copies stay with their parent
    return out, groups


# -- round metrics -------------------------------------------------------------------------------
def round_metrics(w: CampaignWriter, round_: int, model_sha: str) -> dict[str, Any]:
    cand = w.candidates()
    mlip = w.table("mlip")
    dft = w.table("dft")
    this_mlip = mlip[(mlip["round"] == round_)] if not mlip.empty else mlip
    this_dft = dft[(dft["round"] == round_)] if not dft.empty else dft
    verified = cand[cand["id"].isin(this_dft["id"]) & (cand["dft_status"] == "ok")] if not dft.empty else cand[:0]
    pairs = verified[["e_dft_per_atom"]].join(
        this_mlip.drop_duplicates("id", keep="last").set_index("id")["e_mlip_per_atom"], on=verified["id"]
    ) if not verified.empty and not this_mlip.empty else pd.DataFrame()
    mae = float("nan")
    if not pairs.empty:
        diff = (pairs["e_mlip_per_atom"] - pairs["e_dft_per_atom"]).abs().dropna()
        mae = float(diff.mean() * 1000) if len(diff) else float("nan")
    return {
        "round": round_,
        "candidates": int((cand["round"] == round_).sum()),
        "relaxed": int((this_mlip["status"] == "ok").sum()) if not this_mlip.empty else 0,
        "dft_verified": int((this_dft["status"] == "ok").sum()) if not this_dft.empty else 0,
        "dft_failed": int((this_dft["status"] != "ok").sum()) if not this_dft.empty else 0,
        "hits": int(cand["is_hit"].sum()),
        "model_sha256": model_sha,
        "mae_mev_per_atom": mae,
    }


def round_report(cfg: CampaignConfig, metrics: dict[str, Any], cand: pd.DataFrame) -> str:
    """Markdown for the Prefect UI: the round's numbers and the current hits."""
    lines = [f"# {cfg.name}: round {metrics['round']}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in metrics.items() if k != "round"]
    hits = cand[cand["is_hit"]].sort_values("e_form_dft") if not cand.empty else cand
    lines += ["", "## Verified stable compounds", "",
              "| formula | prototype | E_form DFT (eV/atom) | E_hull DFT | E MLIP - DFT (meV/atom) |",
              "|---|---|---|---|---|"]
    for r in hits.to_dict("records"):
        err = (r["e_mlip_per_atom"] - r["e_dft_per_atom"]) * 1000
        lines.append(f"| {r['formula']} | {r['prototype']} | {r['e_form_dft']:.3f} | {r['e_hull_dft']:.3f} | {err:.1f} |")
    return "\n".join(lines)
