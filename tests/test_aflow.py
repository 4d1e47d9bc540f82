"""The AFLOW prototype library as the prototype source, and `matdisc candidates`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import emt_config
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from matdisc.config import CampaignConfig, GenerationConfig
from matdisc.generate import aflow, generate, prototype_candidates
from matdisc.generate.prototypes import PROTOTYPES

ROOT = Path(__file__).resolve().parents[1]


def _spacegroup(structure, symprec: float = 1e-3) -> int:
    return SpacegroupAnalyzer(structure, symprec=symprec).get_space_group_number()


@pytest.mark.parametrize("chemsys, symbol, formula, spacegroup, volume", [
    # experimental volumes per atom (Å^3) from the measured lattice constants
    (["Cu", "Ti"], "B11", "TiCu", 129, 14.3),    # gamma-CuTi, P4/nmm, a 3.107, c 5.919
    (["Al", "Cu"], "C16", "Al2Cu", 140, 14.92),  # theta-Al2Cu, I4/mcm, a 6.063, c 4.872
    (["Li", "Zn"], "B32", "LiZn", 227, 14.96),   # NaTl type, Fd-3m, a 6.209
    (["Fe", "Si"], "B20", "FeSi", 198, 11.3),    # FeSi, P2_13, a 4.489
])
def test_the_library_decorations_include_the_known_structure_types(chemsys, symbol, formula, spacegroup, volume):
    skips: list = []
    cands = prototype_candidates(chemsys, GenerationConfig(max_atoms=8), skips=skips)
    found = [c for c in cands if c.strukturbericht == symbol and c.formula == formula]
    assert len(found) == 1, [(c.formula, c.prototype) for c in cands if c.strukturbericht == symbol]
    c = found[0]
    assert _spacegroup(c.structure) == spacegroup == c.spacegroup
    assert c.source == "prototype" and c.prototype == symbol and c.aflow.split("_")[2] == str(spacegroup)
    assert c.pearson and len(c.structure) <= 8
    # the volume model (atomic volumes) puts the start within 20 % of experiment (FeSi: -17 %, LiZn: +12 %)
    assert abs(c.structure.volume / len(c.structure) / volume - 1) < 0.2
    # prototypes with more sites are skipped with the reason, not dropped silently
    assert skips and all(s["reason"].startswith("too many sites") for s in skips)
    assert len(skips) == sum(1 for p in aflow.library() if len(p.species) == 2 and p.n_sites > 8)
    # a compound search leaves out the elemental polymorphs (its reference set has fcc, bcc, hcp)
    assert all(len(c.structure.composition.elements) == 2 for c in cands)


def test_decoration_keeps_the_library_structures_symmetry_and_each_crystal_once():
    cfg = GenerationConfig(max_atoms=8, prototype={"elements": True})
    cands = prototype_candidates(["Cu", "Pd"], cfg)
    library = aflow.by_name()
    for c in cands:  # distinct elements on distinct species and an isotropic scaling change no symmetry
        assert _spacegroup(c.structure) == _spacegroup(library[c.prototype].structure), c.prototype
    usable = [p for p in aflow.library() if len(p.species) <= 2 and p.n_sites <= 8]
    unary = sum(1 for p in usable if len(p.species) == 1)
    # each unary prototype gives Cu and Pd; a binary gives both assignments unless they are one crystal (1:1)
    assert 2 * unary < len(cands) <= 2 * len(usable)
    assert len({(c.prototype, c.detail) for c in cands}) == len(cands)
    again = prototype_candidates(["Cu", "Pd"], cfg)
    assert [(c.prototype, c.detail) for c in again] == [(c.prototype, c.detail) for c in cands]  # deterministic
    assert len(prototype_candidates(["Cu"], GenerationConfig(max_atoms=8))) == unary  # a polymorph search
    assert aflow.available(8) == {k: sum(1 for p in aflow.library() if len(p.species) == k and p.n_sites <= 8)
                                  for k in (1, 2, 3, 4)}


def test_prototype_names_come_from_either_library_and_unknown_ones_are_refused():
    cfg = GenerationConfig(max_atoms=8, prototype={"names": ["fcc", "B20", "AB_cF16_227_a_b"]})
    cands = prototype_candidates(["Al", "Li"], cfg)
    assert {c.prototype for c in cands} == {"fcc", "B32", "B20"}
    builtin = GenerationConfig(max_atoms=8, prototype={"library": "builtin"})
    assert {c.prototype for c in prototype_candidates(["Al", "Li"], builtin)} <= set(PROTOTYPES)
    with pytest.raises(ValueError, match="unknown prototype 'B99'"):
        GenerationConfig(prototype={"names": ["B99"]})


def test_a_round_is_deterministic_and_records_the_aflow_provenance():
    cfg = GenerationConfig(max_atoms=4, seed=3, random={"per_round": 2}, substitution={"per_round": 5})
    first, _, report = generate(["Al", "Li"], cfg, round_=1)
    second, _, _ = generate(["Al", "Li"], cfg, round_=1)
    assert [c.structure for c in first] == [c.structure for c in second]
    b32 = [c for c in first if c.prototype == "B32"]
    assert len(b32) == 1 and b32[0].aflow == "AB_cF16_227_a_b" and b32[0].pearson == "cF16"
    assert report.as_dict()["skip_reasons"]["too many sites"] > 0


def test_matdisc_candidates_previews_a_round_without_computing_or_writing(tmp_path):
    cfg = emt_config(tmp_path)
    cfg["generation"] = {"max_atoms": 4, "seed": 0, "random": {"per_round": 2}, "substitution": {"per_round": 3}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "matdisc.cli", "candidates", str(path), "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout)
    assert rows and {"formula", "source", "prototype", "spacegroup", "n_atoms"} <= set(rows[0])
    assert {r["spacegroup_from"] for r in rows} == {"spglib"}  # no cell fell back to the generator's number
    assert {r["source"] for r in rows} <= {"prototype", "substitution", "random"}
    l12 = [r for r in rows if r["prototype"] == "L1_2"]
    assert {(r["formula"], r["spacegroup"], r["n_atoms"]) for r in l12} <= {("Cu3Pd", 221, 4), ("CuPd3", 221, 4)}
    # the cold-start seeds (fcc, bcc, hcp, B2, L1_0, L1_2 here) are what a new store begins with: not new
    assert "B2" in CampaignConfig.model_validate(cfg).mlip.cold_start.prototypes
    assert not [r for r in rows if r["formula"] == "CuPd" and r["spacegroup"] == 221]  # B2 CuPd is a seed
    assert [r for r in rows if r["formula"] == "CuPd" and r["prototype"] == "B32"]
    assert not Path(cfg["store"]).exists()  # nothing written
    bad = subprocess.run([sys.executable, "-m", "matdisc.cli", "candidates", str(path), "--round", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--round" in bad.stderr and bad.stderr.count("\n") == 1
