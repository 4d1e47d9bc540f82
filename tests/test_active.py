"""Acquisition, discovery metrics, stopping rules and the training-set policy, without Prefect.

The metrics run on a hand-built store whose hull is worked out by hand in the comments.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from ase import Atoms
from conftest import emt_config
from pymatgen.core import Lattice, Structure

from matdisc import discovery
from matdisc.active import select, select_greedy, structure_families
from matdisc.config import CampaignConfig
from matdisc.dft import settings_hash
from matdisc.generate import Candidate
from matdisc.metrics import calls_to_reach, daf, expected_random_calls, hull_changes, recovery_curve
from matdisc.mlip.train import diverse_frames
from matdisc.records import ReferenceResult, RelaxResult
from matdisc.round import record_run
from matdisc.stages.generate import add_candidates
from matdisc.stages.relax import record_relaxations
from matdisc.stages.score import update_scores
from matdisc.stages.select import round_budget, select_for_reference
from matdisc.stages.train import training_set
from matdisc.stages.verify import record_reference
from matdisc.store import CampaignWriter, open_campaign


def pool(rows):
    """A candidates frame: (id, formula, e_hull_pred, sigma[, mlip_status, dft_status])."""
    out = []
    for r in rows:
        cid, formula, pred, sigma, *rest = r
        mlip, dft = (list(rest) + ["ok", ""][len(rest):])[:2]
        out.append({"id": cid, "formula": formula, "e_hull_pred": pred, "sigma": sigma, "mlip_status": mlip,
                    "dft_status": dft})
    return pd.DataFrame(out)


def test_budget_and_eligibility():
    df = pool([("a", "CuPd", 0.00, 0.01), ("b", "Cu3Pd", 0.01, 0.01), ("c", "CuPd3", -0.5, 0.0, "exploded"),
               ("d", "Cu2Pd", -0.3, 0.0, "ok", "ok"), ("e", "CuPd2", -0.2, 0.0, "ok", "failed"),
               ("f", "Cu3Pd2", float("nan"), 0.0), ("g", "Cu2Pd3", 0.02, 0.0, "symmetry_changed")])
    assert select_greedy(df, 2) == ["a", "b"]
    # exploded, already verified, failed DFT and unscored candidates are never picked
    assert [p.id for p in select(df, 10, strategy="greedy")] == ["a", "b", "g"]
    assert select(df, 0) == [] and select(df.iloc[:0], 3) == []


def test_uncertainty_prefers_an_unsure_candidate_that_could_be_stable():
    df = pool([("sure", "CuPd", 0.03, 0.001), ("unsure", "Cu3Pd", 0.06, 0.05), ("hopeless", "CuPd3", 0.50, 0.2)])
    assert [p.id for p in select(df, 1, strategy="greedy")] == ["sure"]
    picks = select(df, 2, strategy="uncertainty", kappa=1.0, explore_fraction=1.0)
    assert [p.id for p in picks] == ["unsure", "sure"]  # 0.06 - 0.05 = 0.01 < 0.029
    assert picks[0].score == pytest.approx(0.01) and picks[0].e_hull_pred == 0.06 and picks[0].sigma == 0.05
    kappa0 = select(df, 2, strategy="uncertainty", kappa=0.0, explore_fraction=1.0)
    assert [p.id for p in kappa0] == ["sure", "unsure"]  # kappa 0: greedy


def test_uncertainty_splits_the_budget_between_exploiting_and_exploring():
    df = pool([("best", "CuPd", 0.00, 0.001), ("next", "Cu3Pd", 0.01, 0.001), ("third", "CuPd3", 0.02, 0.001),
               ("unsure", "Cu2Pd", 0.08, 0.10), ("hopeless", "CuPd2", 0.50, 0.2)])
    picks = select(df, 3, strategy="uncertainty", kappa=1.0, explore_fraction=1 / 3)
    # two by predicted e_hull, one by optimistic e_hull (-0.02) among the rest
    assert [p.id for p in picks] == ["best", "next", "unsure"]
    assert [p.id for p in select(df, 3, strategy="uncertainty", explore_fraction=0.0)] == ["best", "next", "third"]
    assert len(select(df, 2, strategy="uncertainty", explore_fraction=0.25)) == 2


def test_exploration_spreads_over_chemical_subsystems():
    df = pool([("cupd1", "CuPd", 0.02, 0.05), ("cupd2", "Cu3Pd", 0.03, 0.05), ("cuau", "CuAu", 0.05, 0.05),
               ("pdau", "PdAu", 0.08, 0.05), ("tern", "CuPdAu", 0.09, 0.05)])
    picks = select(df, 3, strategy="uncertainty", kappa=1.0, explore_fraction=1.0)
    assert [p.id for p in picks] == ["cupd1", "cuau", "pdau"]  # one per subsystem before a second Cu-Pd
    picks = select(df, 5, strategy="uncertainty", kappa=1.0, explore_fraction=1.0)
    assert [p.id for p in picks] == ["cupd1", "cuau", "pdau", "tern", "cupd2"]
    # the exploit share is not spread: greedy order, then exploration in the other subsystems first
    picks = select(df, 3, strategy="uncertainty", kappa=1.0, explore_fraction=1 / 3)
    assert [p.id for p in picks] == ["cupd1", "cupd2", "cuau"]


def test_picks_spread_over_structure_families_when_a_model_ranks_one_type_too_well():
    """A cold-start committee puts a crowd of random cells (truly far above the hull) first: with
    families, each pass takes the best of every family before a second random cell."""
    rows = [(f"rand{i}", ["AlAg5", "Al5Ag", "AlAg2", "Al2Ag", "AlAg3", "Al3Ag"][i], 0.001 * (i + 1), 0.0)
            for i in range(6)]
    df = pool(rows + [("l11", "AlAg", 0.010, 0.0), ("c6", "AlAg2", 0.012, 0.0), ("b1", "AlAg", 0.020, 0.0)])
    df["source"] = ["random"] * 6 + ["prototype"] * 3
    df["prototype"] = [""] * 6 + ["L1_1", "C6", "B1"]
    families = structure_families(df)
    assert families["rand3"] == "random" and families["c6"] == "C6"
    plain = select(df, 4, strategy="uncertainty", explore_fraction=0.25)
    assert [p.id for p in plain] == ["rand0", "rand1", "rand2", "rand3"]
    spread = select(df, 4, strategy="uncertainty", explore_fraction=0.25, families=families)
    # exploit: the best of each family in predicted order; explore: the family no pick has yet
    assert [p.id for p in spread] == ["rand0", "l11", "c6", "b1"]
    # once every family has a pick, the next level takes a second of each in order
    assert [p.id for p in select(df, 6, strategy="uncertainty", explore_fraction=0.0, families=families)] == [
        "rand0", "l11", "c6", "b1", "rand1", "rand2"]
    # the plain baselines ignore families
    assert [p.id for p in select(df, 3, strategy="greedy", families=families)] == ["rand0", "rand1", "rand2"]
    # greedy_spread: greedy's order with the same family spread, no uncertainty
    spread_greedy = select(df, 5, strategy="greedy_spread", families=families)
    assert [p.id for p in spread_greedy] == ["rand0", "l11", "c6", "b1", "rand1"]
    assert {p.kind for p in spread_greedy} == {"exploit"}


def test_random_stratified_draws_every_family_before_a_second_of_any():
    """Random order, but one of each structure family first: 3 families and a crowd of random
    cells give 3 different families in the first 3 picks, whatever the seed."""
    rows = [(f"rand{i}", f"Cu{i + 1}Pd", 0.01, 0.0) for i in range(12)]
    df = pool(rows + [("l10", "CuPd", 0.02, 0.0), ("l12", "Cu3Pd", 0.02, 0.0)])
    df["source"] = ["random"] * 12 + ["prototype"] * 2
    df["prototype"] = [""] * 12 + ["L1_0", "L1_2"]
    families = structure_families(df)
    firsts = set()
    for seed in range(8):
        picks = select(df, 4, strategy="random_stratified", seed=seed, families=families)
        assert {families[p.id] for p in picks[:3]} == {"random", "L1_0", "L1_2"}
        assert {p.kind for p in picks} == {"random"}
        firsts.add(picks[0].id)
        plain = select(df, 3, strategy="random", seed=seed, families=families)
        assert [p.id for p in plain] == [p.id for p in select(df, 3, strategy="random", seed=seed)]
    assert len(firsts) > 1  # still a random draw


def test_the_spread_baselines_need_structure_spread():
    from pydantic import ValidationError

    from matdisc.config import ActiveLearningConfig

    with pytest.raises(ValidationError, match="spreads over structure families"):
        ActiveLearningConfig(acquisition="random_stratified", structure_spread=False)


def test_candidates_the_model_could_not_relax_lead_the_exploration_share():
    """A cold-start MACE that blows up on a structure type has no prediction for it: the exploration
    share takes such candidates first (one per subsystem and family), exploitation never does."""
    df = pool([("b24", "LiAl", 0.00, 0.0), ("d015", "LiAl3", 0.001, 0.0), ("c6", "LiAl2", 0.003, 0.0),
               ("b32", "LiAl", np.nan, np.nan, "exploded"), ("rand", "LiAl6", np.nan, np.nan, "exploded"),
               ("done", "Li3Al", np.nan, np.nan, "exploded", "ok")])
    df["source"] = ["prototype"] * 4 + ["random", "prototype"]
    df["prototype"] = ["B24", "D0_15", "C6", "B32", "", "L1_2"]
    families = structure_families(df)
    picks = select(df, 2, strategy="uncertainty", explore_fraction=0.5, families=families, query_failed=True)
    assert [p.id for p in picks] == ["b24", "b32"]  # ties among failed ones break by id
    assert np.isnan(picks[1].score) and np.isnan(picks[1].e_hull_pred)
    assert [p.kind for p in picks] == ["exploit", "failed_relaxation"]  # recorded as what it is
    wide = select(df, 4, strategy="uncertainty", explore_fraction=0.5, families=families, query_failed=True)
    assert [p.id for p in wide] == ["b24", "d015", "b32", "rand"]  # a verified one ("done") never again
    # off, and for the baselines, a failed relaxation is never picked
    assert [p.id for p in select(df, 2, strategy="uncertainty", explore_fraction=0.5, families=families)] == [
        "b24", "d015"]
    assert "b32" not in [p.id for p in select(df, 5, strategy="greedy", query_failed=True)]


def test_in_a_ternary_exploitation_spreads_over_families_and_exploration_over_subsystem_family_pairs():
    df = pool([("cupd", "Cu3Pd", 0.01, 0.0), ("cuau", "Cu3Au", 0.02, 0.0), ("rand", "CuPdAu", 0.03, 0.0),
               ("pdau", "Pd3Au", 0.04, 0.0)])
    df["source"], df["prototype"] = ["prototype", "prototype", "random", "prototype"], ["L1_2", "L1_2", "", "L1_2"]
    families = structure_families(df)
    # exploit: one L1_2 (the best, whatever its subsystem) before the random family
    assert [p.id for p in select(df, 2, strategy="uncertainty", explore_fraction=0.0, families=families)] == [
        "cupd", "rand"]
    # explore: Cu-Au L1_2 is another (subsystem, family) pair than Cu-Pd L1_2, so it comes next
    picks = select(df, 3, strategy="uncertainty", explore_fraction=1 / 3, families=families)
    assert [(p.id, p.kind) for p in picks] == [("cupd", "exploit"), ("rand", "exploit"), ("cuau", "explore")]


def test_random_is_seeded():
    df = pool([(f"c{i}", f"Cu{i + 1}Pd", 0.01 * i, 0.0) for i in range(20)])
    a = [p.id for p in select(df, 5, strategy="random", seed=1)]
    assert a == [p.id for p in select(df, 5, strategy="random", seed=1)]
    assert a != [p.id for p in select(df, 5, strategy="random", seed=2)]
    assert a != [f"c{i}" for i in range(5)]
    with pytest.raises(ValueError, match="unknown acquisition strategy"):
        select(df, 1, strategy="thompson")


def _l10(a: float = 3.8, c: float = 3.6) -> Structure:
    return Structure(Lattice.tetragonal(a / 2**0.5, c), ["Cu", "Pd"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_diversity_skips_near_identical_structures_and_caps_compositions():
    b2 = Structure(Lattice.cubic(3.0), ["Cu", "Pd"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    l10_strained = _l10(3.8 * 1.01, 3.6)  # the same phase as l10, 1 % strained
    structures = {"l10": _l10(), "l10b": l10_strained, "b2": b2, "l10c": _l10(3.7, 3.5), "cu3pd": Structure(
        Lattice.cubic(3.7), ["Cu", "Cu", "Cu", "Pd"], [[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0], [0, 0, 0]])}
    df = pool([("l10", "CuPd", -0.05, 0.0), ("l10b", "CuPd", -0.049, 0.0), ("b2", "CuPd", -0.01, 0.0),
               ("l10c", "CuPd", -0.005, 0.0), ("cu3pd", "Cu3Pd", 0.0, 0.0)])
    picks = select(df, 3, strategy="greedy", structure_of=structures.__getitem__)
    assert [p.id for p in picks] == ["l10", "b2", "cu3pd"]  # l10b and l10c are the same phase as l10
    assert [p.rank for p in picks] == [0, 2, 4]
    # without structures, only the composition cap spreads the picks
    capped = select(df, 3, strategy="greedy", max_per_composition=2)
    assert [p.id for p in capped] == ["l10", "l10b", "cu3pd"]
    # a candidate matching an already verified structure is skipped
    verified = {"CuPd": [_l10(3.79, 3.6)]}
    again = select(df, 2, strategy="greedy", structure_of=structures.__getitem__, verified=verified)
    assert [p.id for p in again] == ["b2", "cu3pd"]


# -- metrics on a hand-built store -------------------------------------------------------------------
# Elements: Cu -1.0, Pd -2.0 eV/atom (DFT); the MLIP is offset by -0.01/-0.02 per element, which
# formation energies cancel. DFT formation energies (eV/atom):
#   A CuPd -0.10, B Cu3Pd -0.06, E CuPd3 +0.01 (round 1); F Cu2Pd -0.12 (round 2).
# After round 1 the hull is Cu - B - A - Pd: hits A, B. F is predicted at -0.11 against a hull of
# -0.0733 at x(Pd)=1/3. After round 2 F (-0.12) lowers the hull at x=0.25 to -0.09: B drops off.
E_FORM = {"A": ("CuPd", -0.10), "B": ("Cu3Pd", -0.06), "E": ("CuPd3", 0.01), "F": ("Cu2Pd", -0.12)}
MU_DFT, MU_MLIP = {"Cu": -1.0, "Pd": -2.0}, {"Cu": -1.01, "Pd": -2.02}


def _atoms(formula: str) -> Atoms:
    from pymatgen.core import Composition

    symbols = [str(el) for el, n in Composition(formula).items() for _ in range(int(n))]
    return Atoms(symbols, positions=[[2.5 * i, 0, 0] for i in range(len(symbols))], cell=[12, 12, 12], pbc=True)


def _energy(formula: str, e_form: float, mu: dict) -> float:
    from pymatgen.core import Composition

    comp = Composition(formula)
    return float(sum(mu[str(el)] * n for el, n in comp.items()) + e_form * comp.num_atoms)


@pytest.fixture
def hand_store(built_hand_store, tmp_path):
    """A fresh copy per test (tests record picks in it) of the store built once per module."""
    cfg, ids, r1, r2 = built_hand_store
    shutil.copytree(cfg.store_path, tmp_path / cfg.store_path.name)
    return cfg.model_copy(update={"store": tmp_path / cfg.store_path.name}), ids, r1, r2


@pytest.fixture(scope="module")
def built_hand_store(tmp_path_factory):
    cfg = CampaignConfig.model_validate(emt_config(tmp_path_factory.mktemp("hand")))
    ref_set = settings_hash(cfg.reference)
    with CampaignWriter(cfg.store_path) as w:
        record_run(w, cfg)
        names = {"Cu": ("Cu", 0.0), "Pd": ("Pd", 0.0), **E_FORM}
        cands = [Candidate(Structure.from_ase_atoms(_atoms(f)), "prototype", cid) for cid, (f, _) in names.items()]
        add_candidates(w, cands, 0, "hand")
        ids = {cid: f"r0-{i:04d}-{names[cid][0]}-{cid}" for i, cid in enumerate(names)}
        mlip = [RelaxResult(ids[c], "ok", "", _atoms(f), energy=_energy(f, e, MU_MLIP) + (0.001 if c == "B" else 0))
                for c, (f, e) in names.items()]
        mlip[-1].energy = _energy("Cu2Pd", -0.11, MU_MLIP)  # F: the model's prediction
        record_relaxations(w, "r1/mlip", 1, mlip, "m1")

        def verify(round_, which):
            for c in which:
                f, e = names[c]
                record_reference(w, round_, ReferenceResult(ids[c], "ok", "", _atoms(f),
                                                                 energy=_energy(f, e, MU_DFT)), ref_set, verified=True)

        verify(0, ["Cu", "Pd"])
        update_scores(w, cfg, 0, "r0/scores")
        w.append_records("rounds", "r0", [discovery.round_metrics(w, cfg, 0, "m0")])
        # round 1 picks A, B, E; the model called all three stable when it picked them
        w.append("selections", "r1/selection", {"id": [ids["A"], ids["B"], ids["E"]], "round": [1, 1, 1],
                                                "e_hull_pred": [-0.05, -0.01, -0.02]})
        verify(1, ["A", "B", "E"])
        update_scores(w, cfg, 1, "r1/scores")
        r1 = discovery.round_metrics(w, cfg, 1, "m1", {"mae_before_mev": 12.0})
        w.append_records("rounds", "r1", [r1])
        w.append("selections", "r2/selection", {"id": [ids["F"]], "round": [2], "e_hull_pred": [-0.03]})
        verify(2, ["F"])
        update_scores(w, cfg, 2, "r2/scores")
        r2 = discovery.round_metrics(w, cfg, 2, "m1")
        w.append_records("rounds", "r2", [r2])
    return cfg, ids, r1, r2


def test_round_metrics_on_a_hand_built_store(hand_store):
    cfg, ids, r1, r2 = hand_store
    assert (r1["dft_calls"], r1["dft_calls_total"], r1["dft_verified"], r1["new_hits"]) == (3, 3, 3, 2)
    assert r1["hit_rate"] == pytest.approx(2 / 3)
    assert r1["precision_stable"] == pytest.approx(2 / 3)  # A, B confirmed; E above the elements
    # screening MAE: relaxed MLIP vs DFT energies of A, B, E (B's MLIP energy is 1 meV higher in total)
    exp = np.mean([abs(_energy(f, e, MU_MLIP) + (0.001 if c == "B" else 0) - _energy(f, e, MU_DFT)) / len(_atoms(f))
                   for c, (f, e) in E_FORM.items() if c in "ABE"]) * 1000
    assert r1["mae_mev_per_atom"] == pytest.approx(exp, abs=1e-6)
    assert r1["mae_before_mev"] == 12.0 and np.isnan(r1["mae_after_mev"])
    # prevalence: A, B hits, E not, F predicted stable (-0.11 vs -0.0733): 3/4; DAF = (2/3) / (3/4)
    assert r1["prevalence_est"] == pytest.approx(0.75)
    assert r1["daf"] == pytest.approx((2 / 3) / 0.75)
    assert r1["new_phases"] == ["Cu3Pd", "CuPd"] and r1["removed_phases"] == []
    # round 2: F is a new phase and pushes B (Cu3Pd) off the hull
    assert (r2["dft_calls"], r2["dft_calls_total"], r2["new_hits"], r2["hits"]) == (1, 4, 1, 2)
    assert r2["precision_stable"] == 1.0 and r2["hit_rate"] == 1.0
    assert r2["new_phases"] == ["Cu2Pd"] and r2["removed_phases"] == ["Cu3Pd"]
    assert r2["hull_phases"] == ["Cu2Pd", "CuPd"]
    assert r2["prevalence_est"] == pytest.approx(0.5) and r2["daf"] == pytest.approx((2 / 4) / 0.5)


def test_hull_evolution_rescores_earlier_candidates(hand_store):
    cfg, ids, _, _ = hand_store
    camp = open_campaign(cfg.store_path)
    scores = camp.table("scores")
    b = scores[scores["id"] == ids["B"]].set_index("round")
    assert bool(b.loc[1, "is_hit"]) and not bool(b.loc[2, "is_hit"])
    assert b.loc[2, "e_hull_dft"] == pytest.approx(-0.06 + 0.09)  # F's line at x=0.25 is -0.09
    f = scores[scores["id"] == ids["F"]].set_index("round")
    # before F's DFT: its MLIP formation energy against the DFT hull of round 1
    assert f.loc[1, "e_hull_pred"] == pytest.approx(-0.11 - (-0.06 - 0.04 / 3))
    cand = camp.candidates().set_index("id")
    assert cand.loc[ids["F"], "is_hit"] and not cand.loc[ids["B"], "is_hit"]
    assert camp.rounds()["new_hits"].tolist() == [0, 2, 1]


def test_stopping_rules(hand_store, tmp_path):
    cfg, _, _, _ = hand_store
    al = cfg.active_learning
    with CampaignWriter(cfg.store_path) as w:
        assert discovery.stop_reason(w, cfg, 3) is None
        budget = cfg.model_copy(update={"active_learning": al.model_copy(update={"max_dft_total": 4})})
        assert "DFT budget spent: 4 of max_dft_total 4" in discovery.stop_reason(w, budget, 3)
        assert round_budget(w, budget.model_copy(update={"active_learning": al.model_copy(
            update={"max_dft_total": 5, "dft_budget": 3})}), 3) == 1
        w.append_records("rounds", "r3", [{"round": 3, "new_hits": 0}])
        patient = cfg.model_copy(update={"active_learning": al.model_copy(update={"patience": 1})})
        assert "no new hits for 1 rounds" in discovery.stop_reason(w, patient, 4)
        patient2 = cfg.model_copy(update={"active_learning": al.model_copy(update={"patience": 2})})
        assert discovery.stop_reason(w, patient2, 4) is None  # round 2 found one


def test_select_for_reference_records_picks_once(hand_store):
    cfg, ids, _, _ = hand_store
    with CampaignWriter(cfg.store_path) as w:
        first = select_for_reference(w, cfg, 3)
        assert first == []  # every candidate is verified
        assert select_for_reference(w, cfg, 3) == first


# -- discovery curves (the benchmark's arithmetic) -------------------------------------------------
def test_recovery_curve_and_random_expectation():
    phase_of = {"a": "CuPd", "b": "CuPd", "c": "Cu3Pd"}
    curve = recovery_curve(["x", "a", "b", "y", "c"], phase_of, 2)
    assert curve.tolist() == [0.0, 0.5, 0.5, 0.5, 1.0]
    assert calls_to_reach(curve, 0.95) == 5 and calls_to_reach(curve, 0.5) == 2
    assert calls_to_reach(curve[:3], 0.95) is None
    assert hull_changes({"A", "B"}, {"B", "C"}) == (["C"], ["A"])
    assert daf(2, 4, 0.25) == 2.0 and np.isnan(daf(0, 0, 0.5))
    # one stable candidate among n: random needs (n + 1) / 2 draws on average
    pool_ids = [f"p{i}" for i in range(9)]
    assert expected_random_calls({"p3": "X"}, pool_ids, 1.0, 1, draws=4000) == pytest.approx(5.0, rel=0.05)


# -- training-set policy ------------------------------------------------------------------------
def test_diverse_frames_keep_the_ends_and_spread():
    e = np.array([0.0, -0.5, -0.8, -0.9, -0.95, -0.97, -0.98, -0.985, -0.99, -0.99])
    f = np.array([2.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.06, 0.04, 0.03, 0.02])
    keep = diverse_frames(e, f, 4)
    assert len(keep) == 4 and keep[0] == 0 and keep[-1] == 9
    assert 1 in keep  # the largest jump from both ends
    assert diverse_frames(e[:3], f[:3], 4) == [0, 1, 2]
    assert diverse_frames(np.zeros(5), np.zeros(5), 3) == [0, 4]  # identical frames add nothing


def test_training_set_policy_subsamples_per_structure(tmp_path):
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from matdisc.records import labelled

    data = emt_config(tmp_path)
    data["mlip"]["training"]["heldout_fraction"] = 0.0  # every structure trains here (the held-out set: test_model_guard)
    cfg = CampaignConfig.model_validate(data)
    ref_set = settings_hash(cfg.reference)
    with CampaignWriter(cfg.store_path) as w:
        for k in range(3):
            frames = []
            for j in range(12):
                a = bulk("Cu", "fcc", a=3.5 + 0.02 * j, cubic=True)
                a.rattle(0.05 * (12 - j) / 12, seed=k * 100 + j)
                a.calc = EMT()
                frames.append(labelled(a, a.get_potential_energy(), a.get_forces(), a.get_stress()))
            record_reference(w, 1, ReferenceResult(f"c{k}", "ok", "", frames[-1], frames=frames), ref_set,
                                  verified=True)
        all_frames, groups = training_set(w, cfg)
        assert len(all_frames) == 36 and sorted(set(groups)) == ["c0", "c1", "c2"]
        diverse = cfg.model_copy(update={"mlip": cfg.mlip.model_copy(update={"training": cfg.mlip.training.model_copy(
            update={"frames": "diverse", "frames_per_structure": 5})})})
        sub, sub_groups = training_set(w, diverse)
        assert len(sub) == 15 and [sub_groups.count(g) for g in ("c0", "c1", "c2")] == [5, 5, 5]
        # the first and last frame of each calculation are kept, with their labels
        energies = {round(a.info["REF_energy"], 8) for a in sub}
        for a in (all_frames[0], all_frames[11]):
            assert round(a.info["REF_energy"], 8) in energies
