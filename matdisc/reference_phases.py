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
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure
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
    a foundation model, or whose reference settings changed, computes them first. Each
    reference is the first stored candidate StructureMatcher calls the same structure (a seed,
    say); missing ones are added as round-0 candidates (source ``reference``). Other elemental
    candidates are candidates like any other, not references: a pool of strained elemental
    cells must not turn into hundreds of reference calculations.
    """
    settings = settings_hash(cfg.reference)
    elemental = [
        c
        for c in prototype_candidates(cfg.chemsys, cfg.generation, names=["fcc", "bcc", "hcp"])
        if len(c.structure.composition.elements) == 1
    ]
    keys = [dedup_key(c.structure) for c in elemental]
    structures = [c.structure for c in elemental]
    ids = stored_matches(w, structures, keys)
    missing = [(c, k) for c, k, cid in zip(elemental, keys, ids) if cid is None]
    if missing:
        for c, _ in missing:
            c.source = "reference"
        add_candidates(w, [c for c, _ in missing], 0, "reference", [k for _, k in missing])
        ids = stored_matches(w, structures, keys)
    done = dft_done(w, settings)
    return candidate_atoms(w, [cid for cid in dict.fromkeys(ids) if cid is not None and cid not in done])


def stored_matches(w: CampaignWriter, structures: list[Structure], keys: list[str]) -> list[str | None]:
    """Per structure, the id of the first stored candidate with its dedup key that StructureMatcher
    fits to it (None: no such candidate)."""
    existing = stored_by_key(w)(set(keys))
    table = w.table("candidates")
    ids_by_key: dict[str, list[str]] = {}
    for cid, k in zip(table["id"], table["dedup_key"]):
        if k in existing:
            ids_by_key.setdefault(k, []).append(cid)
    matcher = StructureMatcher()
    return [
        next((cid for cid, t in zip(ids_by_key.get(k, ()), existing.get(k, ())) if matcher.fit(s, t)), None)
        for s, k in zip(structures, keys)
    ]


def add_known_phases(w: CampaignWriter, cfg: CampaignConfig) -> None:
    """Record the configured known phases once (table ``known_phases``: known id, formula,
    source, and the candidate that computes it).

    A known phase identical to a stored candidate (a seed, say) is computed as that
    candidate; the others become round-0 candidates of source ``known``. An entry computed
    with the campaign's own settings (its settings hash) is recorded as it is, not recomputed.
    """
    from matdisc.known_phases import load

    # one batch per known_phases setting: a campaign given more files later reads them then (the
    # files are read once per setting; a file edited in place under the same name is not re-read)
    setting = hashlib.sha256(cfg.known_phases.model_dump_json().encode()).hexdigest()[:12]
    key = f"r0/known/{setting}"
    if not cfg.known_phases.configured or w.has_batch("known_phases", key):
        return
    phases = load(cfg.known_phases, cfg.chemsys)
    matcher = StructureMatcher()
    keys = [dedup_key(p.structure) for p in phases]
    table = w.table("candidates")
    new: list[tuple[Candidate, str]] = []
    target: list[tuple[str, int]] = []  # per phase: ("id", -1) of a stored candidate, or ("", index into new)
    for p, k, same in zip(phases, keys, stored_matches(w, [p.structure for p in phases], keys)):
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
