"""Candidate generation: known answers for the library, substitution, SMACT, PyXtal and dedup."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.core.operations import SymmOp
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from matdisc.config import GenerationConfig
from matdisc.generate import enabled_sources, generate
from matdisc.generate.compositions import enumerate_compositions, screen
from matdisc.generate.dedup import naive_unique, unique
from matdisc.generate.geometry import ALLOY_CONTACT, alloy_volume, closest_approach, metallic_radius, push_apart
from matdisc.generate.prototypes import PROTOTYPES, decorate
from matdisc.generate.random_search import MAX_EXPANSION, random_batch, random_crystals
from matdisc.generate.substitution import substitute


def rocksalt(a: str, b: str, lattice: float) -> Structure:
    s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(lattice), [a, b], [(0, 0, 0), (0.5, 0.5, 0.5)])
    return s.get_primitive_structure()


# -- prototype library ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PROTOTYPES))
def test_prototype_reproduces_its_space_group(name):
    p = PROTOTYPES[name]
    s = p.build(dict(zip(p.labels, p.example)))
    assert SpacegroupAnalyzer(s, symprec=1e-3).get_space_group_number() == p.spacegroup_number
    # decorated with other elements and volume-scaled it keeps its symmetry and sane distances
    elements = ["Cu", "Pd", "Ag"][: len(p.labels)]
    for _, d in decorate(p, elements, max_atoms=64):
        assert SpacegroupAnalyzer(d, symprec=1e-3).get_space_group_number() == p.spacegroup_number
        if len(d) > 1:
            assert closest_approach(d, 0.7)[0] >= 1.0, name


def test_library_covers_the_named_structure_types():
    compounds = {p.compound for p in PROTOTYPES.values()}
    for formula in ("NaCl", "ZnS", "ZnO", "CsCl", "CaF2", "TiO2", "CaTiO3", "MgAl2O4", "NiAs", "CdI2",
                    "MgCu2", "MgZn2", "MnAlCu2", "MgAgAs", "Cu3Au", "CuAu"):
        assert formula in compounds, formula


def test_decoration_keeps_symmetry_distinct_assignments_once():
    # NaCl and ClNa are one crystal; NiAs and AsNi (anion on the other site) are two
    assert len(decorate(PROTOTYPES["B1"], ["Na", "Cl"], max_atoms=8)) == 1
    assert len(decorate(PROTOTYPES["B8_1"], ["Ni", "As"], max_atoms=8)) == 2
    assert {s.composition.reduced_formula for _, s in decorate(PROTOTYPES["L1_2"], ["Cu", "Pd"], max_atoms=8)} == {
        "Cu3Pd", "CuPd3"}


def test_ionic_volume_from_shannon_radii():
    sc = screen(["Na", "Cl"], enumerate_compositions(["Na", "Cl"], 4))
    ((_, s),) = decorate(PROTOTYPES["B1"], ["Na", "Cl"], max_atoms=4, oxidation=sc.oxidation)
    a = (4 * s.volume) ** (1 / 3)
    assert abs(a - 5.64) / 5.64 < 0.02  # experiment 5.64 Å; radii 1.02 + 1.81 Å give 5.66


# -- composition screening -----------------------------------------------------------------------
def test_smact_screen_li_fe_o():
    sc = screen(["Li", "Fe", "O"], enumerate_compositions(["Li", "Fe", "O"], 8))
    assert "LiFeO2" in sc.oxidation and sc.oxidation["LiFeO2"] == {"Li": 1, "Fe": 3, "O": -2}
    assert sc.cut["Li2FeO"].startswith("charge neutrality")
    assert sc.cut["LiFe"].startswith("charge neutrality")
    assert sc.oxidation["FeO"] == {"Fe": 2, "O": -2}
    assert sum(sc.cut_reasons.values()) == len(sc.cut) > 0


def test_metallic_systems_are_not_screened():
    comps = enumerate_compositions(["Cu", "Pd"], 4)
    assert [c.reduced_formula for c in comps] == ["Cu", "Pd", "CuPd", "CuPd2", "CuPd3", "Cu2Pd", "Cu3Pd"]
    sc = screen(["Cu", "Pd"], comps)
    assert not sc.screened and sc.allows("CuPd7")


def test_element_without_oxidation_states_is_a_recorded_cut():
    sc = screen(["Na", "Cl", "Ar"], enumerate_compositions(["Na", "Cl", "Ar"], 4))
    assert "NaCl" in sc.oxidation
    assert sc.cut["NaAr"].startswith("no oxidation states: Ar")


# -- substitution --------------------------------------------------------------------------------
def test_substitution_from_rocksalt_lif():
    lif = rocksalt("Li", "F", 4.03)
    out = substitute([("LiF", lif)], ["Na", "K", "F", "Cl"], screen(["Na", "K", "F", "Cl"],
                     enumerate_compositions(["Na", "K", "F", "Cl"], 4, 2)))
    by_formula = {r.structure.composition.reduced_formula: r for r in out}
    assert {"NaF", "KCl"} <= set(by_formula)
    assert [r.probability for r in out] == sorted((r.probability for r in out), reverse=True)
    # one swap is likelier than two: NaF (Li→Na) above KCl (Li→K and F→Cl)
    assert by_formula["NaF"].probability > by_formula["KCl"].probability > 1e-3
    assert by_formula["KCl"].substitution == "F-->Cl-, Li+->K+"
    for formula, a_exp in (("NaF", 4.63), ("KCl", 6.29)):
        s = by_formula[formula].structure
        assert SpacegroupAnalyzer(s).get_space_group_number() == 225
        assert abs((4 * s.volume) ** (1 / 3) - a_exp) / a_exp < 0.03


def test_metallic_substitution_finds_l12_ni3al():
    cu3au = Structure.from_spacegroup("Pm-3m", Lattice.cubic(3.75), ["Au", "Cu"], [(0, 0, 0), (0, 0.5, 0.5)])
    sc = screen(["Ni", "Al"], enumerate_compositions(["Ni", "Al"], 4))
    out = substitute([("Cu3Au", cu3au)], ["Ni", "Al"], sc)
    assert "AlNi3" in {r.structure.composition.reduced_formula for r in out}


# -- random crystals -----------------------------------------------------------------------------
def test_random_crystals_are_deterministic_and_physical():
    sc = screen(["Cu", "Pd"], enumerate_compositions(["Cu", "Pd"], 8))
    a, skips_a = random_crystals(sc, 6, rng=np.random.default_rng([7, 1]), max_atoms=8)
    b, _ = random_crystals(sc, 6, rng=np.random.default_rng([7, 1]), max_atoms=8)
    c, _ = random_crystals(sc, 6, rng=np.random.default_rng([7, 2]), max_atoms=8)
    assert len(a) == 6
    assert [(x.spacegroup, x.seed) for x in a] == [(x.spacegroup, x.seed) for x in b]
    assert all(np.allclose(x.structure.cart_coords, y.structure.cart_coords) for x, y in zip(a, b))
    assert [(x.spacegroup, x.seed) for x in a] != [(x.spacegroup, x.seed) for x in c]
    for x in a:
        assert len(x.structure) <= 8 and closest_approach(x.structure, 0.7)[0] >= 1.0
        assert 2 <= x.spacegroup <= 230
        # metallic density: within MAX_EXPANSION of the volume model, no two atoms overlapping
        assert 1 - 1e-6 <= x.structure.volume / alloy_volume(x.structure) <= MAX_EXPANSION + 1e-3
        assert _contact(x.structure) >= 1 - 1e-4


def _contact(s: Structure) -> float:
    """Smallest distance over ALLOY_CONTACT x the sum of metallic radii."""
    d = s.distance_matrix + np.diag([min(s.lattice.abc)] * len(s))
    r = np.array([metallic_radius(site.specie.symbol) for site in s])
    return float(np.min(d / (ALLOY_CONTACT * (r[:, None] + r[None, :]))))


def test_overlapping_atoms_are_pushed_apart_at_fixed_volume_keeping_the_space_group():
    """A random cell at the volume model with atoms too close: pushing apart separates them
    without changing volume, composition or space group (scaling the whole cell instead inflated
    half of the random metal cells 2.5-8x)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from matdisc.generate.random_search import _one, _shared_tolerances

    cases = []
    with _shared_tolerances() as tm:
        for state in range(40):
            s = _one(Structure(Lattice.cubic(3), ["Cu", "Cu", "Pd"], [[0, 0, 0]] * 3).composition, 2, 12, state, tm)
            s.scale_lattice(alloy_volume(s))
            if _contact(s) < 0.9:
                cases.append(s)
    assert len(cases) >= 3
    for s in cases[:3]:
        before = SpacegroupAnalyzer(s, symprec=1e-3).get_symmetry_operations(cartesian=False)
        volume, formula, start = s.volume, s.composition, _contact(s)
        ratio = push_apart(s)
        assert ratio == pytest.approx(_contact(s)) and ratio > max(start, 0.9)
        assert s.volume == pytest.approx(volume) and s.composition == formula
        # every symmetry operation of the start still maps the cell onto itself (FixSymmetry;
        # the cell may gain symmetry as its shape relaxes)
        for op in before:
            moved = s.copy()
            moved.apply_operation(op, fractional=True)
            assert StructureMatcher(0.01, 0.01, 0.5, primitive_cell=False, scale=False).fit(moved, s)


def test_random_batch_does_not_depend_on_worker_count():
    sc = screen(["Cu", "Pd"], enumerate_compositions(["Cu", "Pd"], 6))
    one, _ = random_batch(sc, 20, seed=(5, 1), workers=1, max_atoms=6)
    two, _ = random_batch(sc, 20, seed=(5, 1), workers=2, max_atoms=6)
    assert len(one) == 20
    assert [(c.spacegroup, c.seed, c.structure.composition) for c in one] == [
        (c.spacegroup, c.seed, c.structure.composition) for c in two]


def test_impossible_random_requests_are_recorded_skips():
    sc = screen(["Cu", "Pd"], enumerate_compositions(["Cu", "Pd"], 4))
    # 1.2 × covalent radii (Cu-Cu 3.2 Å, fcc Cu has 2.55 Å) cannot be met within 1.5× the
    # volume: every draw is a recorded skip, and the call returns
    out, skips = random_crystals(sc, 2, rng=np.random.default_rng([0, 1]), max_atoms=4, min_distance=1.2, max_attempts=2)
    assert out == [] and len(skips) == 4
    assert all(s.reason for s in skips)


# -- dedup ---------------------------------------------------------------------------------------
def test_dedup_merges_symmetry_copies_and_keeps_polymorphs():
    nacl = rocksalt("Na", "Cl", 5.64)
    rotated = nacl.copy()
    rotated.apply_operation(SymmOp.from_axis_angle_and_translation((1, 2, 3), 37.0))
    translated = nacl.copy()
    translated.translate_sites(list(range(len(translated))), [0.13, 0.27, 0.41])
    supercell = nacl.copy()
    supercell.make_supercell([[2, 0, 0], [0, 1, 1], [0, -1, 1]])
    zincblende = Structure.from_spacegroup("F-43m", Lattice.cubic(5.64), ["Na", "Cl"],
                                           [(0, 0, 0), (0.25, 0.25, 0.25)]).get_primitive_structure()
    cscl = Structure.from_spacegroup("Pm-3m", Lattice.cubic(3.4), ["Na", "Cl"], [(0, 0, 0), (0.5, 0.5, 0.5)])
    structures = [nacl, rotated, translated, supercell, zincblende, cscl]
    keep, keys = unique(structures)
    assert keep == [0, 4, 5]
    assert keys[0] == keys[1] == keys[2] == keys[3] == "NaCl|2"  # the supercell reduces to 2 sites
    assert keep == naive_unique(structures)
    # against the store: a stored rocksalt makes the new one a duplicate
    assert unique([supercell, cscl], [nacl])[0] == [1]
    # lazy store access asks only for the buckets the new structures fall into
    asked = []
    unique([cscl], existing_by_key=lambda k: asked.append(k) or {})
    assert asked == [{keys[5]}]


def test_fast_dedup_equals_naive_on_generated_candidates():
    cfg = GenerationConfig(max_atoms=8, random={"per_round": 30})
    cands, _, _ = generate(["Cu", "Pd", "Ag"], cfg.model_copy(update={"max_candidates": None}), round_=1)
    structures = [c.structure for c in cands]
    structures += [s.copy() for s in structures[::3]]  # exact duplicates to be found
    assert unique(structures)[0] == naive_unique(structures)


def test_the_lattice_bound_only_skips_pairs_the_matcher_rejects():
    """``cannot_match`` is a necessary condition of ``fit``: on every same-key pair of generated
    candidates (random cells included, squeezed and stretched copies of each), a pair it skips is
    one ``StructureMatcher.fit`` rejects; and it does skip pairs, or it would save nothing."""
    import itertools

    from pymatgen.core.structure_matcher import StructureMatcher

    from matdisc.generate.dedup import cannot_match, fingerprint, lattice_shape

    cfg = GenerationConfig(max_atoms=8, random={"per_round": 30})
    cands, _, _ = generate(["Cu", "Pd", "Ag"], cfg.model_copy(update={"max_candidates": None}), round_=1)
    structures = [c.structure for c in cands]
    for s in structures[::4]:  # near the bound: 15 % and 25 % stretched along one axis
        for f in (1.15, 1.25):
            t = s.copy()
            t.lattice = Lattice(s.lattice.matrix * np.array([[f], [1], [1]]))
            structures.append(t)
    buckets: dict[str, list] = {}
    for s in structures:
        key, reduced = fingerprint(s)
        buckets.setdefault(key, []).append(reduced)
    matcher, skipped, pairs = StructureMatcher(), 0, 0
    for group in buckets.values():
        for a, b in itertools.permutations(group, 2):
            pairs += 1
            if cannot_match(lattice_shape(a), lattice_shape(b), matcher.ltol):
                skipped += 1
                assert not matcher.fit(a, b, skip_structure_reduction=True)
    assert pairs > 200 and 0.1 * pairs < skipped < pairs


# -- generate ------------------------------------------------------------------------------------
@pytest.mark.parametrize("library", ["aflow", "builtin"])
def test_generate_is_deterministic_with_provenance(library):
    from matdisc.generate import aflow

    cfg = GenerationConfig(max_atoms=8, seed=3, random={"per_round": 8}, substitution={"per_round": 5},
                           prototype={"library": library})
    heard: list[tuple[str, int]] = []
    a, keys_a, report = generate(["Cu", "Pd"], cfg, round_=1, heard=lambda src, n: heard.append((src, n)))
    b, keys_b, _ = generate(["Cu", "Pd"], cfg, round_=1)
    # progress: each enabled source's count as it finishes, in order, then the dedup as it starts
    assert enabled_sources(cfg) == ["prototype", "substitution", "random"]
    assert heard == [(src, report.generated[src]) for src in enabled_sources(cfg)] + [
        ("dedup", sum(report.generated.values()))]
    assert [(c.source, c.formula, c.prototype, c.spacegroup, c.seed) for c in a] == [
        (c.source, c.formula, c.prototype, c.spacegroup, c.seed) for c in b]
    assert keys_a == keys_b
    sources = {c.source for c in a}
    for c in a:
        if c.source == "prototype" and library == "builtin":
            assert c.prototype in PROTOTYPES and c.detail.startswith("A=")
        elif c.source == "prototype":  # "Cu=Pd Au=Cu": the namesake compound's species -> ours
            assert aflow.by_name()[c.prototype].aflow == c.aflow and "=" in c.detail
        elif c.source == "substitution":
            assert c.parent and c.probability > 0 and "->" in c.detail
        else:
            assert 2 <= c.spacegroup <= 230 and c.seed >= 0 and math.isnan(c.probability)
    if library == "builtin":
        assert sources == {"prototype", "substitution", "random"}
        assert report.new["substitution"] <= 5 and report.generated["prototype"] == report.new["prototype"]
    else:
        # the library's namesake compounds substituted into Cu-Pd are decorations of the same library:
        # substitution adds nothing before there are hits to substitute into
        assert sources == {"prototype", "random"}
        assert report.generated["substitution"] > 0 and report.new["substitution"] == 0
        assert 0 < report.new["prototype"] <= report.generated["prototype"]
    # round 2 against round 1's candidates: nothing from the library again, new random crystals
    c2, _, report2 = generate(["Cu", "Pd"], cfg, round_=2, existing=[c.structure for c in a], existing_keys=keys_a)
    assert report2.new["prototype"] == 0 and report2.new["substitution"] == 0
    assert 0 < report2.new["random"] <= 8
    assert unique([c.structure for c in c2], [c.structure for c in a])[0] == list(range(len(c2)))


def test_generation_config_errors_name_the_field():
    from matdisc.config import parse_config

    with pytest.raises(Exception) as err:
        parse_config({"name": "x", "chemsys": ["Cu"], "generation": {"prototype": {"names": ["Z9"]}}})
    assert "generation.prototype.names" in str(err.value) and "Z9" in str(err.value)


# -- the store: provenance, dedup against stored candidates, recorded skips ---------------------
def test_round_candidates_record_provenance_and_dedup_against_the_store(tmp_path):
    from matdisc.config import parse_config
    from matdisc.stages.generate import add_candidates, generation_summary, round_candidates, seed_candidates
    from matdisc.store import CampaignWriter, open_campaign

    cfg = parse_config({"name": "gen", "chemsys": ["Cu", "Pd"], "store": str(tmp_path / "g.zarr"),
                        # the built-in library: its namesake compounds give substitutions (AFLOW's
                        # are its own decorations, test_aflow)
                        "generation": {"max_atoms": 6, "random": {"per_round": 4},
                                       "prototype": {"library": "builtin"}}})
    with CampaignWriter(cfg.store_path) as w:
        seeds = seed_candidates(cfg)
        add_candidates(w, seeds, 0, "seed")
        new1, keys1 = round_candidates(w, cfg, 1)
        assert add_candidates(w, new1, 1, "generated", keys1) == len(new1)
        # the seeds (fcc Cu, B2 CuPd, ...) are in the store: round 1 does not propose them again
        assert unique([c.structure for c in new1], [c.structure for c in seeds])[0] == list(range(len(new1)))
        assert len(new1) > 0 and not {c.formula + c.prototype for c in new1} & {c.formula + c.prototype for c in seeds}
        new2, keys2 = round_candidates(w, cfg, 2)
        add_candidates(w, new2, 2, "generated", keys2)
        assert {c.source for c in new2} == {"random"}
    camp = open_campaign(cfg.store_path)
    cand = camp.table("candidates")
    assert set(cand["source"]) == {"seed", "prototype", "substitution", "random"}
    sub = cand[cand["source"] == "substitution"]
    assert (sub["probability"] > 0).all() and sub["parent"].str.len().gt(0).all()
    rnd = cand[cand["source"] == "random"]
    assert rnd["spacegroup"].between(2, 230).all() and (rnd["gen_seed"] >= 0).all()
    # stored keys are what the structures give: later rounds can trust them
    from matdisc.generate import fingerprint

    for i in (0, len(cand) // 2, len(cand) - 1):
        assert fingerprint(camp.structure(cand["id"].iloc[i]))[0] == cand["dedup_key"].iloc[i]
    gen = camp.table("generation")
    assert set(gen["round"]) == {1, 2}
    r1 = gen[(gen["round"] == 1) & (gen["source"] == "prototype")].iloc[0]
    assert r1["new"] == (cand["source"] == "prototype").sum() <= r1["generated"]
    assert "prototype" in generation_summary(w, 1)


def test_fast_reduction_gives_the_matchers_niggli_cell():
    from pymatgen.core.structure_matcher import StructureMatcher

    from matdisc.generate.dedup import _maybe_supercell, reduce_structure

    cands, _, _ = generate(["Cu", "Pd", "Ag"], GenerationConfig(max_atoms=12, random={"per_round": 24}), round_=1)
    skewed = cands[0].structure.copy()
    skewed.make_supercell([[1, 1, 0], [0, 1, 0], [0, 0, 1]])  # same cell volume, skewed basis
    doubled = [c.structure * (2, 1, 1) for c in cands[::7]]  # supercells: the primitive search must run
    assert all(_maybe_supercell(s) for s in doubled)
    assert any(not _maybe_supercell(c.structure) and c.source == "random" and len(c.structure) > 3
               for c in cands)  # the shortcut is taken for random cells too
    for s in [c.structure for c in cands] + [skewed] + doubled:
        ours, theirs = reduce_structure(s), StructureMatcher._get_reduced_structure(s, True, True)
        assert len(ours) == len(theirs)
        assert np.allclose(ours.lattice.abc, theirs.lattice.abc, atol=1e-6)
        # the same angles, except that the basis vectors may differ in sign: flipping one vector
        # turns two angles into their supplements (an AFLOW cell reduces to 90.03/90.03/63.0 with
        # spglib and 89.97/89.97/63.0 with pymatgen; with right angles either Niggli convention
        # may come). The same lattice, which StructureMatcher.fit maps either way; the product of
        # the cosines (the Krivy-Gruber type) is what a sign flip keeps.
        mirrored = np.allclose(np.minimum(ours.lattice.angles, 180 - np.array(ours.lattice.angles)),
                               np.minimum(theirs.lattice.angles, 180 - np.array(theirs.lattice.angles)), atol=1e-6)
        cosines = [np.prod(np.cos(np.radians(c.lattice.angles))) for c in (ours, theirs)]
        same_type = np.sign(np.round(cosines[0], 12)) == np.sign(np.round(cosines[1], 12))
        assert np.allclose(ours.lattice.angles, theirs.lattice.angles, atol=1e-6) or (
            mirrored and (same_type or np.isclose(ours.lattice.angles, 90.0, atol=1e-6).any()))
        assert ours.lattice.find_mapping(theirs.lattice, ltol=1e-5, atol=1e-3) is not None


def test_the_separation_pairs_are_ase_neighbor_lists_pairs():
    """push_apart's vectorised pair search finds exactly the pairs (and distances) of ASE's
    neighbor_list, on skewed cells with atoms outside the cell as an optimizer leaves them."""
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    from matdisc.generate.geometry import _pairs_within

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        n = int(rng.integers(1, 21))
        cell = rng.normal(size=(3, 3)) * rng.uniform(1.5, 6) + np.eye(3) * rng.uniform(1, 6)
        if abs(np.linalg.det(cell)) < 1:
            continue
        atoms = Atoms("Cu" * n, scaled_positions=rng.random((n, 3)) * 3 - 1, cell=cell, pbc=True)
        cutoff = float(rng.uniform(1.5, 5))
        ase_pairs = neighbor_list("ijdD", atoms, cutoff)
        ours = _pairs_within(atoms.positions, atoms.cell[:], cutoff)

        def key(i, j, d, v):
            return sorted(zip(i.tolist(), j.tolist(), np.round(d, 8).tolist()))

        assert key(*ours) == key(*ase_pairs)
        checked += len(ase_pairs[0])
    assert checked > 1000
