"""Screening DFT when a budget runs short: cheaper settings rank a round's picks, the budget
left verifies the best of them. Real GPAW (a cheaper cutoff and k-point mesh as the screen) on a
small hand-built Al-Si store; the session's EMT campaign for the case with no cheaper settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import copy_campaign, emt_config
from pymatgen.core import Composition

from matdisc import discovery
from matdisc.budget import planning
from matdisc.budget.costs import dft_seconds, dft_work
from matdisc.config import CampaignConfig
from matdisc.dft import run_static, settings_hash
from matdisc.generate import prototype_candidates
from matdisc.records import RelaxResult
from matdisc.round import record_run
from matdisc.stages import screen as screening
from matdisc.stages.generate import add_candidates, candidate_atoms
from matdisc.stages.relax import record_relaxations
from matdisc.stages.score import update_scores
from matdisc.stages.select import cap_per_composition, predicted_reference_seconds, rank_for_reference
from matdisc.stages.verify import record_reference
from matdisc.store import CampaignWriter, open_campaign

ASAP = {"parameters": {"asap_cutoff": True}}
ROUND = 3  # of the session campaign (two rounds done)


@pytest.fixture(autouse=True)
def _prior_rates(tmp_path, monkeypatch):
    """The budgets here are set from the model's prior rates: no probe measured by another test of
    this process (under the other process's load) may price these calculations instead."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _tight(cfg: CampaignConfig, tmp_path: Path, name: str, screening: dict) -> tuple[CampaignConfig, list, list]:
    """A copy whose DFT budget verifies the first two of the round's six ranked picks and no more."""
    free = copy_campaign(cfg, tmp_path, name + "-free", active_learning={**cfg.active_learning.model_dump(), "dft_budget": 6})
    with CampaignWriter(free.store_path) as w:
        ranked = [p.id for p in rank_for_reference(w, free, ROUND)]
        cost = predicted_reference_seconds(w, free, ranked)
        used = planning.spent(w, free)["dft_cpu_hours"]
    assert len(ranked) == 6
    left = cost[0] + cost[1] + 0.9 * min(cost[2:])
    limit = used + left * planning.reference_cores(free) / 3600
    tight = copy_campaign(free, tmp_path, name, budget={"dft_cpu_hours": limit, "screening": screening})
    return tight, ranked, cost


def _select(cfg: CampaignConfig) -> list[str]:
    """The round's selection stage, run in this process."""
    from matdisc.executor import InProcess
    from matdisc.stages.context import Run
    from matdisc.stages.select import select

    with CampaignWriter(cfg.store_path) as w:
        return select(Run(w, cfg, InProcess()).round(ROUND))


def test_screening_settings_take_the_fast_preset_and_keep_the_calculator():
    cfg = CampaignConfig.model_validate({
        "name": "x", "chemsys": ["Al", "Si"],
        "reference": {"preset": "accurate", "ecut": 520.0, "kpoint_density": 6.0, "spin": "off",
                      "parameters": {"xc": "PBE"}}})
    screen = screening.screening_reference(cfg)
    assert (screen.calculator, screen.spin) == ("gpaw", "off")
    assert screen.parameters == {"xc": "PBE", "convergence": screening.SCREEN_SCF}  # the user's, plus the screen's SCF
    fast = screen.resolved()
    assert (fast.ecut, fast.kpoint_density, fast.smearing) == (300.0, 2.5, 0.1)  # the fast preset, not the user's
    assert settings_hash(screen) != settings_hash(cfg.reference)
    from ase.build import bulk

    si = bulk("Si", "diamond", a=5.47)
    assert dft_work(si, screen) < dft_work(si, cfg.reference) / 4  # what makes a screen worth its cost
    own = CampaignConfig.model_validate({**cfg.model_dump(), "budget": {"screening": {"ecut": 200.0}}})
    assert screening.screening_reference(own).resolved().ecut == 200.0


def _hand_built_al_si(tmp_path: Path, **over) -> CampaignConfig:
    """Al-Si with GPAW as the reference: elements verified by real GPAW statics, five compounds
    the (hand-set) MLIP calls stable by -0.10 ... -0.02 eV/atom. No costs recorded: the model's
    prior rates price every calculation."""
    cfg = CampaignConfig.model_validate(emt_config(
        tmp_path, chemsys=["Al", "Si"],
        reference={"calculator": "gpaw", "preset": "accurate", "ecut": 300.0, "kpoint_density": 2.0,
                   "isolate": False},
        active_learning={"rounds": 2, "dft_budget": 4, "acquisition": "greedy"}, **over))
    keep = {("Al", "fcc"), ("Si", "diamond"), ("AlSi", "B1"), ("AlSi", "B2"), ("AlSi", "B3"), ("Al3Si", "L1_2"),
            ("AlSi3", "L1_2")}
    cands = [c for c in prototype_candidates(cfg.chemsys, cfg.generation, names=["fcc", "diamond", "B1", "B2", "B3",
                                                                                  "L1_2"])
             if (c.formula, c.prototype) in keep]
    assert len(cands) == len(keep)
    settings = settings_hash(cfg.reference)
    with CampaignWriter(cfg.store_path) as w:
        record_run(w, cfg)
        add_candidates(w, cands, 0, "prototype")
        atoms = candidate_atoms(w)
        elements = [(cid, a) for cid, a in atoms if len(set(a.get_chemical_symbols())) == 1]
        for cid, a in elements:
            res = run_static(a, cfg.reference, id=cid, workdir=w.path / "calculations" / "r0")
            assert res.ok, res.reason
            record_reference(w, 0, res, settings, verified=True)
        compounds = [cid for cid, a in atoms if len(set(a.get_chemical_symbols())) > 1]
        e_mlip = {cid: 0.0 for cid, _ in elements} | {cid: -0.10 + 0.02 * k for k, cid in enumerate(compounds)}
        record_relaxations(w, "r0/mlip/hand", 0, [
            RelaxResult(cid, "ok", "", a, energy=e_mlip[cid] * len(a), sigma=0.01) for cid, a in atoms], "hand")
        update_scores(w, cfg, ROUND, f"r{ROUND}/scores-mlip")
    return cfg


def test_a_short_budget_screens_the_picks_and_verifies_the_most_stable(tmp_path):
    free = _hand_built_al_si(tmp_path)
    cores = planning.reference_cores(free)
    with CampaignWriter(free.store_path) as w:
        ranked = [p.id for p in rank_for_reference(w, free, ROUND)]
        cost = predicted_reference_seconds(w, free, ranked)
        # the elements' statics count as spent at their measured wall time (longer on a loaded machine)
        already = planning.spent(w, free)["dft_cpu_hours"] * 3600 / cores
    assert len(ranked) == 4
    left = cost[0] + cost[1] + 0.5 * cost[2]  # verifies two of the four, and no more
    tight = copy_campaign(free, tmp_path, "tight.zarr", budget={
        "dft_cpu_hours": (already + left) * cores / 3600,
        "screening": {"ecut": 200.0, "kpoint_density": 1.5, "margin": 1.0}})
    before = open_campaign(tight.store_path)
    n_dft, n_frames = len(before.table("dft")), len(before.table("frames"))
    picks = _select(tight)

    w = open_campaign(tight.store_path)
    scr = w.table("screening")
    ground = screening.ground_states(w, tight)
    screened_picks = [c for c in ranked if c in set(scr["id"])]
    assert {cid for cid, _ in ground.values()} <= set(scr["id"]) and len(screened_picks) > 2  # more than it verifies
    assert screened_picks == ranked[: len(screened_picks)]  # screened in acquisition order
    assert (scr["status"] == "ok").all()
    assert (scr["settings_hash"] == settings_hash(screening.screening_reference(tight))).all()
    for workdir in scr["workdir"]:  # each ran with the screening cutoff
        assert "Cutoff: 200.0 eV" in (Path(workdir) / "static" / "gpaw.txt").read_text()
    # the screened distance to the hull, recomputed here: formation energy against the
    # screened elements (the DFT hull holds only the elements, at zero)
    energy = dict(zip(scr["id"], scr["e_screen_per_atom"]))
    mu = {el: energy[cid] for el, (cid, _) in ground.items()}
    formula = dict(zip(w.table("candidates")["id"], w.table("candidates")["formula"]))
    expected = {}
    for cid in screened_picks:
        comp = Composition(formula[cid])
        expected[cid] = energy[cid] - sum(comp.get_atomic_fraction(el) * mu[str(el)] for el in comp.elements)
    funnel = screening.funnel(w, tight, screened_picks)
    kept = sorted((c for c in screened_picks if expected[c] <= 1.0), key=expected.get)
    assert [c for c, _ in funnel] == kept
    assert [e for _, e in funnel] == pytest.approx([expected[c] for c in kept], abs=1e-9)
    # verified: the screen's order, cut where the budget left after screening ends
    sel = w.table("selections")
    sel = sel[sel["round"] == ROUND]
    assert list(sel["id"]) == picks
    pick_cost = predicted_reference_seconds(w, tight, kept)
    assert picks == kept[: planning.affordable(pick_cost, planning.remaining_dft_seconds(tight, w))]
    assert list(sel["e_hull_screen"]) == pytest.approx([expected[c] for c in picks], abs=1e-9)
    # the budget holds: screening is charged to it, and the picks' verification fits what is left
    costs = w.table("costs")
    assert list(costs["stage"]) == ["screen"] and costs["actual_s"].iloc[0] > 0
    assert planning.spent(w, tight)["dft_cpu_hours"] * 3600 / cores + sel["predicted_s"].sum() <= already + left + 1e-9
    # screening energies never join the hull or the training data
    assert (len(w.table("dft")), len(w.table("frames"))) == (n_dft, n_frames)
    assert discovery.round_metrics(w, tight, ROUND, "hand")["screened"] == len(scr)
    # a later round passes over the screened picks that were not verified
    with CampaignWriter(tight.store_path) as rw:
        later = {p.id for p in rank_for_reference(rw, tight, ROUND + 1)}
    assert not later & (set(screened_picks) - set(picks))


def test_without_cheaper_settings_a_short_budget_only_cuts_the_batch(campaign_store, tmp_path):
    """EMT has no presets: its default screen has the reference's own settings, so nothing is screened."""
    cfg, _ = campaign_store
    tight, ranked, _ = _tight(cfg, tmp_path, "plain.zarr", {})
    picks = _select(tight)
    w = open_campaign(tight.store_path)
    assert w.table("screening").empty and picks == ranked[:2]
    off, ranked_off, _ = _tight(cfg, tmp_path, "off.zarr", {**ASAP, "enabled": False})
    assert _select(off) == ranked_off[:2] and open_campaign(off.store_path).table("screening").empty


def test_a_screen_submits_in_order_and_stops_where_its_allowance_ends(tmp_path):
    """The budget guard of a screening stage: one job per free worker, the next only while the
    measured seconds plus its predicted ones fit the allowance."""
    from ase.build import bulk

    from matdisc.executor import InProcess
    from matdisc.stages.context import Run
    from matdisc.stages.verify import reference_stage

    cfg = CampaignConfig.model_validate(emt_config(tmp_path, budget={"screening": ASAP}))
    ref = screening.screening_reference(cfg)
    jobs = [(f"cu-{k}", bulk("Cu", "fcc", a=3.5 + 0.02 * k)) for k in range(30)]
    with CampaignWriter(cfg.store_path) as w:
        rates, _ = planning.campaign_rates(cfg, w)
    each = [dft_seconds(a, ref, rates, None) for _, a in jobs]
    # the guard counts measured seconds, so the slack is a few of this machine's (warm) jobs
    one = [run_static(jobs[0][1], ref, id="probe", workdir=tmp_path / "probe").walltime_s for _ in range(3)][-1]
    allowance = each[0] + 3 * one

    with CampaignWriter(cfg.store_path) as w:
        reference_stage(Run(w, cfg, InProcess()).round(1), jobs, verified=False, screen=ref, allowance_s=allowance)
    scr = open_campaign(cfg.store_path).table("screening")
    ran, took = list(scr["id"]), list(scr["walltime_s"])
    assert ran == [cid for cid, _ in jobs][: len(ran)] and 0 < len(ran) < len(jobs)
    assert sum(took[:-1]) + each[len(ran) - 1] <= allowance  # the last one submitted fitted
    assert sum(took) + each[len(ran)] > allowance  # the next would not have


def test_a_shortlist_screens_past_the_budget_and_verifies_the_screens_best(tmp_path):
    """``budget.screening.shortlist``: no budget runs short, yet every one of the shortlist is screened
    and the picks are the screen's best, at most ``max_per_composition`` of a formula, not the MLIP's
    (whose hand-set order here says nothing about DFT's)."""
    cfg = _hand_built_al_si(tmp_path)
    data = cfg.model_dump(mode="json")
    data["active_learning"].update(dft_budget=3, max_per_composition=1)
    data["budget"]["screening"].update(ecut=200.0, kpoint_density=1.5, margin=1.0, shortlist=5)
    data["reference"]["isolate"] = True  # as GPAW runs by default: in calculation processes of their own
    cfg = CampaignConfig.model_validate(data)
    with CampaignWriter(cfg.store_path) as w:
        ranked = [p.id for p in rank_for_reference(w, cfg, ROUND)]
    formula = dict(zip(open_campaign(cfg.store_path).table("candidates")["id"],
                       open_campaign(cfg.store_path).table("candidates")["formula"]))
    assert len(ranked) == 5 and sum(formula[c] == "AlSi" for c in ranked) == 3  # no composition cap before the screen
    picks = _select(cfg)

    w = open_campaign(cfg.store_path)
    scr = w.table("screening")
    assert set(ranked) <= set(scr["id"]) and (scr["status"] == "ok").all()
    pids = [(Path(d) / "runner-0.pid").read_text() for d in scr["workdir"]]
    assert len(set(pids)) < len(pids)  # single points share calculation processes (statics_per_task)
    screened_hull = screening.screened_hull_distance(w, cfg, ranked)
    best_first = sorted(ranked, key=screened_hull.get)
    expected = cap_per_composition(best_first, formula, 1)[:3]
    assert picks == expected and len({formula[c] for c in picks}) == len(picks) == 3
    sel = w.table("selections")
    assert list(sel[sel["round"] == ROUND]["e_hull_screen"]) == pytest.approx([screened_hull[c] for c in picks])
    # a later round passes over what the screen put beyond the margin, not what it kept but could not
    # verify (two of the five here, within the margin): they stay in the acquisition's pool
    assert len(set(ranked) - set(picks)) == 2 and all(screened_hull[c] <= 1.0 for c in ranked)
    with CampaignWriter(cfg.store_path) as rw:
        assert screening.rejected(rw, cfg, ROUND + 1) == set()
        later = {p.id for p in rank_for_reference(rw, cfg, ROUND + 1)}
    assert set(ranked) - set(picks) <= later


def test_a_screen_at_two_geometries_ranks_each_candidate_by_its_lower_energy(tmp_path):
    """``geometries: [mlip, initial]``: a young model that squeezed every compound's cell (6% on each
    axis) costs nothing when the generated structure is screened too: each energy is an upper
    bound of the relaxed one, and the lower ranks. One it squeezed by 10% on each axis (27% of
    the volume, beyond ``max_volume_change``, as a cold-start model did to B32 LiAl) is screened
    at its initial structure only."""
    cfg = _hand_built_al_si(tmp_path)
    data = cfg.model_dump(mode="json")
    data["active_learning"].update(dft_budget=2, max_per_composition=1)
    data["budget"]["screening"].update(ecut=200.0, kpoint_density=1.5, margin=1.0, shortlist=5,
                                       geometries=["mlip", "initial"])
    data["reference"]["isolate"] = True  # each calculation keeps the structure it was given (job.pkl)
    cfg = CampaignConfig.model_validate(data)
    with CampaignWriter(cfg.store_path) as w:
        squeezed, factor = [], {}
        for cid, a in candidate_atoms(w):
            if len(set(a.get_chemical_symbols())) > 1:
                factor[cid] = 0.9 if not factor else 0.94
                a = a.copy()
                a.set_cell(a.cell[:] * factor[cid], scale_atoms=True)
                squeezed.append(RelaxResult(cid, "ok", "", a, energy=-0.1 * len(a), sigma=0.01))
        record_relaxations(w, "r0/mlip/squeezed", 0, squeezed, "hand")
        ranked = [p.id for p in rank_for_reference(w, cfg, ROUND)]
        initial = dict(candidate_atoms(w, ranked))
    crushed = next(cid for cid, f in factor.items() if f == 0.9)
    assert crushed in ranked
    picks = _select(cfg)

    w = open_campaign(cfg.store_path)
    scr = w.table("screening")
    assert (scr["status"] == "ok").all()
    by = {(cid, g): (e, wd) for cid, g, e, wd in zip(scr["id"], scr["geometry"], scr["e_screen_per_atom"],
                                                    scr["workdir"])}
    ground = {cid for cid, _ in screening.ground_states(w, cfg).values()}
    assert {k for k in by if k[0] in ground} == {(cid, "dft") for cid in ground}
    assert {k for k in by if k[0] not in ground} == {(cid, g) for cid in ranked for g in ("mlip", "initial")
                                                     if cid != crushed or g == "initial"}
    import pickle

    def volume(cid: str, geometry: str) -> float:  # of the structure the calculation was given
        return pickle.loads((Path(by[cid, geometry][1]) / "job.pkl").read_bytes())["atoms"].get_volume()

    for cid in ranked:  # each single point ran at the geometry its row names
        assert volume(cid, "initial") == pytest.approx(initial[cid].get_volume(), rel=1e-9)
        if cid != crushed:
            assert volume(cid, "mlip") == pytest.approx(0.94**3 * initial[cid].get_volume(), rel=1e-9)
    twice = [cid for cid in ranked if cid != crushed]
    lower = {cid: min(by[cid, "mlip"][0], by[cid, "initial"][0]) for cid in twice} | {crushed: by[crushed, "initial"][0]}
    assert all(by[cid, "initial"][0] < by[cid, "mlip"][0] for cid in twice)  # squeezing costs energy
    with CampaignWriter(cfg.store_path) as rw:
        assert screening.screened(rw, settings_hash(screening.screening_reference(cfg))) == pytest.approx(
            {**lower, **{cid: by[cid, "dft"][0] for cid in ground}})
        hull = screening.screened_hull_distance(rw, cfg, ranked)
    formula = dict(zip(w.table("candidates")["id"], w.table("candidates")["formula"]))
    assert picks == cap_per_composition(sorted(ranked, key=hull.get), formula, 1)[:2]


def test_a_relaxation_that_changed_the_volume_too_much_is_screened_at_the_initial_structure():
    from ase.build import bulk

    cfg = CampaignConfig.model_validate({"name": "x", "chemsys": ["Al", "Li"]})
    start = bulk("Al", "fcc", a=4.04)

    def relaxed(scale: float):
        a = start.copy()
        a.set_cell(a.cell[:] * scale ** (1 / 3), scale_atoms=True)
        return a

    assert cfg.budget.screening.max_volume_change == 0.2
    assert screening.screen_geometries(cfg, relaxed(0.85), start) == ["mlip"]
    assert screening.screen_geometries(cfg, relaxed(0.75), start) == ["initial"]
    assert screening.screen_geometries(cfg, relaxed(1.25), start) == ["initial"]
    both = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"screening": cfg.budget.screening.model_copy(
        update={"geometries": ["mlip", "initial"]})})})
    assert screening.screen_geometries(both, relaxed(0.75), start) == ["initial"]
    assert screening.screen_geometries(both, relaxed(0.95), start) == ["mlip", "initial"]
    never = both.budget.screening.model_copy(update={"max_volume_change": None, "geometries": ["mlip"]})
    assert screening.screen_geometries(both.model_copy(update={"budget": both.budget.model_copy(
        update={"screening": never})}), relaxed(0.5), start) == ["mlip"]
    with pytest.raises(ValueError, match="names one twice"):
        CampaignConfig.model_validate({"name": "x", "chemsys": ["Al", "Li"],
                                       "budget": {"screening": {"geometries": ["mlip", "mlip"]}}})
    screen = screening.screening_reference(cfg)  # a screen converges the SCF as far as ranking needs
    assert screen.parameters["convergence"] == screening.SCREEN_SCF
    assert settings_hash(screen) == settings_hash(screen.model_copy(update={"parameters": {}}))
