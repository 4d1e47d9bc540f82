"""The phases a campaign's hull is measured against besides its own finds, computed with its settings.

A hull is only right when its elements (fcc, bcc and hcp of each, EMT for one puts hcp below
fcc) and the phases already known for the system were computed with the same reference
settings as the candidates. Here: which of them a campaign still has to compute (so a resumed
run, or one whose settings changed, computes only what is missing) and how the configured
known phases (:mod:`matdisc.known_phases`) are recorded (table ``known_phases``).
"""

from __future__ import annotations

import hashlib

from ase import Atoms
from pymatgen.io.ase import AseAtomsAdaptor

from matdisc.config import CampaignConfig
from matdisc.dft import settings_hash
from matdisc.generate import Candidate, dedup_key, prototype_candidates
from matdisc.records import ReferenceResult
from matdisc.stages.generate import add_candidates, candidate_atoms, stored_by_key
from matdisc.stages.verify import dft_done, record_reference
from matdisc.store import CampaignWriter


def reference_set_jobs(w: CampaignWriter, cfg: CampaignConfig) -> list[tuple[str, Atoms]]:
    """Elemental references (each element in fcc, bcc and hcp) missing from the current reference set.

    A hull needs its elements computed with the same settings: a campaign that starts from
    a foundation model, or whose reference settings changed, computes them first. Missing
    reference structures are added as round-0 candidates (source ``reference``).
    """
    settings = settings_hash(cfg.reference)
    cand = w.table("candidates")
    elemental = [
        c
        for c in prototype_candidates(cfg.chemsys, cfg.generation, names=["fcc", "bcc", "hcp"])
        if len(c.structure.composition.elements) == 1
    ]
    keys = [dedup_key(c.structure) for c in elemental]
    stored = set(cand["dedup_key"])
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


def add_known_phases(w: CampaignWriter, cfg: CampaignConfig) -> None:
    """Record the configured known phases once (table ``known_phases``: known id, formula,
    source, and the candidate that computes it).

    A known phase identical to a stored candidate (a seed, say) is computed as that
    candidate; the others become round-0 candidates of source ``known``. An entry computed
    with the campaign's own settings (its settings hash) is recorded as it is, not recomputed.
    """
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from matdisc.known_phases import load

    # one batch per known_phases setting: a campaign given more files later reads them then (the
    # files are read once per setting; a file edited in place under the same name is not re-read)
    setting = hashlib.sha256(cfg.known_phases.model_dump_json().encode()).hexdigest()[:12]
    key = f"r0/known/{setting}"
    if not cfg.known_phases.configured or w.has_batch("known_phases", key):
        return
    phases = load(cfg.known_phases, cfg.chemsys)
    matcher, stored = StructureMatcher(), stored_by_key(w)
    keys = [dedup_key(p.structure) for p in phases]
    existing = stored(set(keys))
    table = w.table("candidates")
    ids_by_key: dict[str, list[str]] = {}
    if not table.empty:
        for cid, k in zip(table["id"], table["dedup_key"]):
            if k in existing:
                ids_by_key.setdefault(k, []).append(cid)
    new: list[tuple[Candidate, str]] = []
    target: list[tuple[str, int]] = []  # per phase: ("id", -1) of a stored candidate, or ("", index into new)
    for p, k in zip(phases, keys):
        same = next(
            (cid for cid, s in zip(ids_by_key.get(k, ()), existing.get(k, ())) if matcher.fit(p.structure, s)), None
        )
        if same is None:
            same_new = next(
                (j for j, (c, kk) in enumerate(new) if kk == k and matcher.fit(p.structure, c.structure)), None
            )
            if same_new is None:
                new.append((Candidate(p.structure, "known", detail=p.id), k))
                same_new = len(new) - 1
            target.append(("", same_new))
        else:
            target.append((same, -1))
    if new:
        before = int((table["round"] == 0).sum())  # ids after every round-0 one
        add_candidates(w, [c for c, _ in new], 0, f"known-{setting}", [k for _, k in new], first_index=before)
    table = w.table("candidates")
    new_ids = list(table["id"][table["source"] == "known"])[-len(new) :] if new else []
    records, settings = [], settings_hash(cfg.reference)
    for p, (cid, j) in zip(phases, target):
        cid = cid or new_ids[j]
        records.append(
            {
                "known_id": p.id,
                "formula": p.formula,
                "source": p.source,
                "candidate": cid,
                "settings_hash": p.settings_hash,
            }
        )
        if p.energy is not None and p.settings_hash == settings and cid not in dft_done(w, settings):
            atoms = AseAtomsAdaptor.get_atoms(p.structure)
            record_reference(
                w,
                0,
                ReferenceResult(
                    cid,
                    "ok",
                    "",
                    atoms,
                    energy=p.energy,
                    settings_hash=settings,
                    notes=f"taken from {p.source} (computed with these settings)",
                ),
                settings,
                verified=True,
            )
    w.append_records("known_phases", key, records)


def known_phase_jobs(w: CampaignWriter, cfg: CampaignConfig) -> list[tuple[str, Atoms]]:
    """(id, structure) of the known phases' candidates with no result in the current reference set."""
    add_known_phases(w, cfg)
    known = w.table("known_phases")
    if known.empty:
        return []
    done = dft_done(w, settings_hash(cfg.reference))
    ids = list(dict.fromkeys(c for c in known["candidate"] if c not in done))
    return candidate_atoms(w, ids)
