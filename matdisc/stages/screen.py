"""Screening DFT: when a budget cannot verify a round's picks, cheaper settings rank them first.

A two-fidelity funnel. Acquisition ranks a round's picks by the MLIP; when what is left of a
budget (:func:`matdisc.budget.planning.remaining_dft_seconds`) cannot verify all of them with the
configured reference settings, each pick gets single-point calculations with cheaper settings
(``budget.screening``, the ``fast`` preset by default) at its MLIP-relaxed structure (and, with
``geometries: [mlip, initial]``, at its generated one: each energy is an upper bound of the
relaxed one, so the lower ranks it), and the budget left after that verifies the picks the
screen puts closest to the hull.

Screening energies are a reference set of their own (their settings hash): they never join
the hull or the training data, which stay at the configured settings. A pick's screened
distance to the hull is its screened formation energy (against the elements' ground states
computed with the same cheap settings, so per-element offsets of the cheap settings cancel)
minus the configured DFT hull's formation energy at its composition, the way
:func:`matdisc.thermo.energy_above_reference_hull` measures MLIP predictions.

Records: table ``screening`` (one row per calculation, settings and geometry, with its reason
when it failed) and the cost stage ``screen``, charged to the DFT budget. A screening job's id
is ``CANDIDATE@GEOMETRY`` (``mlip``, ``initial``, or ``dft`` for an element's ground state).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from pymatgen.core import Composition

from matdisc.budget import planning
from matdisc.budget.costs import dft_seconds
from matdisc.config import CampaignConfig, ReferenceConfig
from matdisc.dft import settings_hash
from matdisc.records import ReferenceResult, scalar_fields
from matdisc.stages.generate import candidate_atoms
from matdisc.store import CampaignWriter
from matdisc.thermo import energy_above_reference_hull

TABLE = "screening"


#: GPAW's SCF tolerances for a screen (eV/electron, electrons, eV²): a single point that ranks needs
#: its energy, not the converged density and wave functions forces come from. The energy is
#: variational, so its error is second order in the density's (see the docs for what was measured).
SCREEN_SCF = {"energy": 1e-3, "density": 1e-3, "eigenstates": 1e-6}


def screening_reference(cfg: CampaignConfig) -> ReferenceConfig:
    """The configured reference calculator with the screening's cheaper settings."""
    scr = cfg.budget.screening
    parameters = {**cfg.reference.parameters, **scr.parameters}
    if cfg.reference.calculator == "gpaw":
        parameters.setdefault("convergence", SCREEN_SCF)
    return cfg.reference.under_preset(
        scr.preset, ecut=scr.ecut, kpoint_density=scr.kpoint_density, walltime_s=scr.walltime_s, parameters=parameters
    )


@dataclass
class ScreenPlan:
    """What a round screens: ``jobs`` (elemental ground states and picks not screened before, at
    each configured geometry; ids from :func:`job_id`) to rank the first ``len(picks)`` picks of
    the acquisition order.
    The flow submits them in order while measured seconds stay within ``allowance_s``."""

    reference: ReferenceConfig
    picks: list[str]
    jobs: list[tuple[str, Atoms]] = field(default_factory=list)
    #: what the screen may spend: the budget left less the cheapest of its picks' verifications
    allowance_s: float = float("inf")


def job_id(cid: str, geometry: str) -> str:
    """The id of a screening job: the candidate and the geometry its single point is at."""
    return f"{cid}@{geometry}"


def split_job_id(job: str) -> tuple[str, str]:
    cid, _, geometry = job.rpartition("@")
    return (cid, geometry) if cid else (job, "mlip")


def screened_jobs(w: CampaignWriter, settings: str) -> dict[tuple[str, str], float]:
    """(id, geometry) -> screened energy per atom (NaN where it failed) with these settings."""
    table = w.table(TABLE)
    if table.empty:
        return {}
    rows = table[table["settings_hash"] == settings]
    return dict(zip(zip(rows["id"], rows["geometry"]), rows["e_screen_per_atom"].astype(float)))


def screened(w: CampaignWriter, settings: str) -> dict[str, float]:
    """id -> lowest screened energy per atom over its geometries (NaN where every one failed)."""
    out: dict[str, float] = {}
    for (cid, _), e in screened_jobs(w, settings).items():
        best = out.get(cid)
        if best is None or (np.isfinite(e) and not best <= e):
            out[cid] = e
    return out


def ground_states(w: CampaignWriter, cfg: CampaignConfig) -> dict[str, tuple[str, Atoms]]:
    """element -> (id, DFT-relaxed Atoms) of its lowest verified structure in the reference set."""
    settings = settings_hash(cfg.reference)
    dft = w.table("dft")
    if dft.empty:
        return {}
    frames = w.frames("dft")
    cand = w.table("candidates")
    formula = dict(zip(cand["id"], cand["formula"]))
    best: dict[str, tuple[float, str, int]] = {}
    for i, row in enumerate(dft.to_dict("records")):
        if row["status"] != "ok" or row.get("settings_hash") != settings or not np.isfinite(row["e_dft_per_atom"]):
            continue
        comp = Composition(formula[row["id"]])
        if len(comp.elements) != 1:
            continue
        el = str(comp.elements[0])
        if el not in best or row["e_dft_per_atom"] < best[el][0]:
            best[el] = (float(row["e_dft_per_atom"]), row["id"], i)
    return {el: (cid, frames.atoms(i)) for el, (_, cid, i) in best.items()}


def relaxed_atoms(w: CampaignWriter, ids: list[str]) -> dict[str, Atoms]:
    """id -> latest MLIP-relaxed structure of each candidate (where there is one)."""
    frames, row_of = w.latest_frames("mlip")
    return {cid: frames.atoms(row_of[cid]) for cid in ids if cid in row_of}  # type: ignore[union-attr]


def screen_geometries(cfg: CampaignConfig, relaxed: Atoms, initial: Atoms) -> list[str]:
    """Where one candidate is screened: the configured geometries, the initial structure for the
    MLIP one when the relaxation changed the volume beyond ``max_volume_change`` (a young model
    squeezed B32 LiAl by 29%, into a single point 0.1 eV/atom above its relaxed energy)."""
    scr = cfg.budget.screening
    limit = scr.max_volume_change
    if limit is not None and abs(relaxed.get_volume() / initial.get_volume() - 1) > limit:
        return list(dict.fromkeys("initial" if g == "mlip" else g for g in scr.geometries))
    return list(scr.geometries)


def _pick_jobs(
    w: CampaignWriter,
    cfg: CampaignConfig,
    ids: list[str],
    relaxed: dict[str, Atoms],
    done: dict[tuple[str, str], float],
) -> dict[str, list[tuple[str, Atoms]]]:
    """id -> its screening jobs not run before, one per geometry it is screened at."""
    initial = dict(candidate_atoms(w, ids))
    out = {}
    for cid in ids:
        at = {"mlip": relaxed[cid], "initial": initial[cid]}
        out[cid] = [
            (job_id(cid, g), at[g]) for g in screen_geometries(cfg, relaxed[cid], initial[cid]) if (cid, g) not in done
        ]
    return out


def _element_jobs(
    elements: dict[str, tuple[str, Atoms]], done: dict[tuple[str, str], float]
) -> list[tuple[str, Atoms]]:
    """The elements' ground states at their DFT structures, once per campaign and settings."""
    ran = {cid for cid, _ in done}
    return [(job_id(cid, "dft"), a) for cid, a in elements.values() if cid not in ran]


def plan(
    w: CampaignWriter, cfg: CampaignConfig, ranked: list[str], cost: list[float], remaining_s: float | None
) -> ScreenPlan | None:
    """The screen this round needs, or None: the budget verifies every pick, screening is off,
    has the reference's own settings, lacks an element's ground state, or would look at no more
    picks than verification alone can.

    Screened: the longest prefix of the ranking whose screening, plus the cheapest of its
    verifications, fits what is left (elements' ground states screened once per campaign).
    """
    if not cfg.budget.screening.enabled or remaining_s is None:
        return None
    direct = planning.affordable(cost, remaining_s)
    if direct == len(ranked):
        return None
    ref = screening_reference(cfg)
    settings = settings_hash(ref)
    if settings == settings_hash(cfg.reference):
        return None
    elements = ground_states(w, cfg)
    if set(elements) != set(cfg.chemsys):
        return None
    done = screened_jobs(w, settings)
    rates, _ = planning.campaign_rates(cfg, w)
    jobs = _element_jobs(elements, done)
    spend = sum(dft_seconds(a, ref, rates, None) for _, a in jobs)
    structures = relaxed_atoms(w, ranked)
    todo = _pick_jobs(w, cfg, [cid for cid in ranked if cid in structures], structures, done)
    picks: list[str] = []
    pick_jobs: list[tuple[str, Atoms]] = []
    cheapest = float("inf")
    for cid, c in zip(ranked, cost):
        if cid not in structures:
            break
        s = sum(dft_seconds(a, ref, rates, None) for _, a in todo[cid])
        if spend + s + min(cheapest, c) > remaining_s:
            break
        spend, cheapest = spend + s, min(cheapest, c)
        picks.append(cid)
        pick_jobs += todo[cid]
    if len(picks) <= direct:
        return None
    jobs += pick_jobs
    return ScreenPlan(ref, picks, jobs, remaining_s - cheapest)


def shortlist_plan(
    w: CampaignWriter, cfg: CampaignConfig, ranked: list[str], remaining_s: float | None
) -> ScreenPlan | None:
    """``budget.screening.shortlist``: screen the acquisition's first ``shortlist`` candidates every
    round (those screened before keep their energies), within what is left of a budget.

    A cold-start model ranks structure types it never saw almost at random (Al-Li: B32, the
    ground state, 18th to 47th of 47 LiAl structures); a single point at its relaxed structure
    ranks them by DFT for a fraction of a relaxation's cost. None when screening is off, has
    the reference's own settings, or lacks an element's ground state.
    """
    size = cfg.budget.screening.active_shortlist
    if not size:
        return None
    ref = screening_reference(cfg)
    settings = settings_hash(ref)
    elements = ground_states(w, cfg)
    if settings == settings_hash(cfg.reference) or set(elements) != set(cfg.chemsys):
        return None
    done = screened_jobs(w, settings)
    structures = relaxed_atoms(w, ranked[:size])
    picks = [cid for cid in ranked[:size] if cid in structures]
    todo = _pick_jobs(w, cfg, picks, structures, done)
    jobs = _element_jobs(elements, done) + [job for cid in picks for job in todo[cid]]
    return ScreenPlan(ref, picks, jobs, float("inf") if remaining_s is None else remaining_s)


def record(w: CampaignWriter, round_: int, result: ReferenceResult, settings: str) -> None:
    """One screening calculation (a failed one with its reason), once per id, geometry and settings."""
    cid, geometry = split_job_id(result.id)
    row = scalar_fields(result)
    row.update(
        id=cid, geometry=geometry, round=round_, settings_hash=settings, e_screen_per_atom=result.energy_per_atom
    )
    w.append_records(TABLE, f"r{round_}/{cid}/{settings}/{geometry}", [row])


def screened_hull_distance(w: CampaignWriter, cfg: CampaignConfig, ids: list[str]) -> dict[str, float]:
    """id -> screened energy above the configured DFT hull in eV/atom (NaN: not screened, failed,
    or an element's ground state without a screened energy)."""
    settings = settings_hash(screening_reference(cfg))
    energy = screened(w, settings)
    mu = {el: energy.get(cid, np.nan) for el, (cid, _) in ground_states(w, cfg).items()}
    cand = w.candidates(settings_hash(cfg.reference))
    formula = dict(zip(cand["id"], cand["formula"]))
    e_form = []
    for cid in ids:
        comp = Composition(formula[cid])
        shift = sum(comp.get_atomic_fraction(el) * mu.get(str(el), np.nan) for el in comp.elements)
        e_form.append(energy.get(cid, np.nan) - shift)
    ref = cand[np.isfinite(cand["e_form_dft"].astype(float))] if "e_form_dft" in cand else cand.iloc[:0]
    above = energy_above_reference_hull(
        [formula[c] for c in ids], e_form, list(ref["formula"]), list(ref["e_form_dft"].astype(float)), cfg.chemsys
    )
    return dict(zip(ids, above))


def funnel(w: CampaignWriter, cfg: CampaignConfig, picks: list[str]) -> list[tuple[str, float]]:
    """The screened picks worth verifying, most stable first: (id, screened e_hull) within the margin."""
    above = screened_hull_distance(w, cfg, picks)
    keep = [(cid, e) for cid, e in above.items() if np.isfinite(e) and e <= cfg.budget.screening.margin]
    return sorted(keep, key=lambda item: item[1])


def rejected(w: CampaignWriter, cfg: CampaignConfig, round_: int) -> set[str]:
    """Candidates a round before ``round_`` screened and did not verify: acquisition passes over them."""
    table = w.table(TABLE)
    if table.empty:
        return set()
    earlier = (table["settings_hash"] == settings_hash(screening_reference(cfg))) & (table["round"] < round_)
    ids = set(table["id"][earlier])
    sel = w.table("selections")
    ids -= set(sel["id"])
    if cfg.budget.screening.active_shortlist and ids:  # a shortlist screens more than a round verifies: only
        above = screened_hull_distance(w, cfg, sorted(ids))  # those the screen put beyond the margin are out
        ids = {cid for cid, e in above.items() if not (np.isfinite(e) and e <= cfg.budget.screening.margin)}
    return ids


__all__ = [
    "TABLE",
    "ScreenPlan",
    "funnel",
    "ground_states",
    "job_id",
    "plan",
    "record",
    "rejected",
    "relaxed_atoms",
    "screened",
    "screen_geometries",
    "screened_hull_distance",
    "screened_jobs",
    "screening_reference",
    "shortlist_plan",
    "split_job_id",
]
