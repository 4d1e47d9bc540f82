"""Bring your own structures and data: candidates from the user's files, substitution parents from
files, and labelled frames joining the training set; bad files get one line naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import write
from conftest import emt_config
from pymatgen.core import Lattice, Structure

from matdisc.cli import main
from matdisc.config import CampaignConfig
from matdisc.errors import UserError
from matdisc.stages.generate import add_candidates, round_candidates
from matdisc.store import CampaignWriter


def structures_folder(tmp_path):
    """A paper's supplementary folder: two CIFs, a POSCAR of the first one again (a duplicate), and
    an extxyz of two more candidates from another code."""
    folder = tmp_path / "paper"
    folder.mkdir()
    b2 = Structure(Lattice.cubic(3.0), ["Cu", "Pd"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    l12 = Structure(
        Lattice.cubic(3.75), ["Pd", "Cu", "Cu", "Cu"], [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    )
    b2.to(filename=str(folder / "CuPd-B2.cif"))
    l12.to(filename=str(folder / "Cu3Pd-L12.cif"))
    b2.to(filename=str(folder / "POSCAR"), fmt="poscar")
    others = [bulk("Cu", "fcc", a=3.6, cubic=True), bulk("Pd", "fcc", a=3.9) * (2, 1, 1)]
    others[0].symbols[[0, 1]] = "Pd"  # CuPd in L1_0's decoration of the fcc cube; then elemental Pd
    write(folder / "others.extxyz", others, format="extxyz")
    return folder


def files_only(tmp_path, files) -> dict:
    cfg = emt_config(tmp_path)
    cfg["generation"] = {
        "max_atoms": 8,
        "prototype": {"enabled": False},
        "substitution": {"enabled": False},
        "random": {"enabled": False},
        "from_files": files,
    }
    return cfg


def test_a_campaign_round_is_seeded_only_from_a_folder_of_the_users_files(tmp_path):
    folder = structures_folder(tmp_path)
    cfg = CampaignConfig.model_validate(files_only(tmp_path, str(folder)))
    with CampaignWriter(cfg.store_path) as w:
        cands, keys = round_candidates(w, cfg, 1)
        add_candidates(w, cands, 1, "generated", keys)
        table = w.table("candidates")
    # 5 structures in 4 files; the POSCAR is the B2 CIF again and is dropped as a duplicate
    assert sorted(table["formula"]) == ["Cu3Pd", "CuPd", "CuPd", "Pd"]
    assert set(table["source"]) == {"file"}
    assert {d.split(":")[0] for d in table["detail"]} == {"CuPd-B2.cif", "Cu3Pd-L12.cif", "others.extxyz"}
    assert all(p.startswith(str(folder)) for p in table["parent"])
    assert table["spacegroup"][table["detail"] == "CuPd-B2.cif:0"].item() == 221
    with CampaignWriter(cfg.store_path) as w:  # the next round generates them again: all duplicates now
        again, _ = round_candidates(w, cfg, 2)
    assert again == []


def test_the_candidates_command_lists_file_candidates_with_their_provenance(tmp_path, capsys):
    """Previewed against a cold start's seeds: the folder's B2 CuPd is one of them and is dropped,
    the rock-salt and zinc-blende CuPd named by the glob are new."""
    folder = structures_folder(tmp_path)
    write(folder / "B1.cif", bulk("CuPd", "rocksalt", a=5.0))
    write(folder / "B3.cif", bulk("CuPd", "zincblende", a=5.4))
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(files_only(tmp_path, [str(folder / "B*.cif"), str(folder / "CuPd-B2.cif")])))
    assert main(["candidates", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted((r["detail"], r["spacegroup"]) for r in rows) == [("B1.cif:0", 225), ("B3.cif:0", 216)]
    assert {r["source"] for r in rows} == {"file"}


def test_substitution_parents_come_from_files_of_another_chemistry(tmp_path):
    agau = Structure(Lattice.cubic(3.1), ["Ag", "Au"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    agau.to(filename=str(tmp_path / "AgAu.cif"))
    cfg = emt_config(tmp_path)
    cfg["generation"] = {
        "max_atoms": 8,
        "prototype": {"enabled": False},
        "random": {"enabled": False},
        "substitution": {"from_prototypes": False, "threshold": 1e-5, "parents": [str(tmp_path / "AgAu.cif")]},
    }
    with CampaignWriter(tmp_path / "s.zarr") as w:
        cands, _ = round_candidates(w, CampaignConfig.model_validate(cfg), 1)
    assert cands and {c.source for c in cands} == {"substitution"}
    assert {c.parent for c in cands} == {"AgAu.cif:0"} and {c.formula for c in cands} == {"CuPd"}


def labelled(tmp_path, n=3):
    frames = []
    for i in range(n):
        a = bulk("Cu", "fcc", a=3.6, cubic=True)
        a.symbols[0] = "Pd"
        a.rattle(0.05, seed=i)
        a.calc = EMT()
        a.get_potential_energy(), a.get_forces(), a.get_stress()
        frames.append(a)
    write(tmp_path / "earlier-dft.extxyz", frames, format="extxyz")
    return frames


def test_extra_data_joins_the_training_set_with_its_weight_as_mace_reads_it(tmp_path):
    from mace.data.utils import KeySpecification, load_from_xyz

    from matdisc.stages.train import training_set

    frames = labelled(tmp_path)
    cfg = emt_config(tmp_path)
    cfg["mlip"]["training"]["extra_data"] = {"file": str(tmp_path / "earlier-dft.extxyz"), "weight": 0.25}
    cfg = CampaignConfig.model_validate(cfg)
    with CampaignWriter(cfg.store_path) as w:
        train, groups = training_set(w, cfg)  # a new store: only the extra frames
    assert len(train) == 3 and groups == ["extra:0", "extra:1", "extra:2"]
    for a, ref in zip(train, frames):
        assert a.info["REF_energy"] == pytest.approx(ref.get_potential_energy())
        assert np.allclose(a.arrays["REF_forces"], ref.get_forces())
    write(tmp_path / "train.xyz", train, format="extxyz")  # what train_mace hands mace's run_train
    keys = KeySpecification.from_defaults().update(
        info_keys={"energy": "REF_energy", "stress": "REF_stress"}, arrays_keys={"forces": "REF_forces"}
    )
    _, configs = load_from_xyz(str(tmp_path / "train.xyz"), key_specification=keys)
    assert [c.weight for c in configs] == [0.25] * 3
    assert configs[0].properties["energy"] == pytest.approx(frames[0].get_potential_energy())


@pytest.mark.parametrize(
    ("setting", "content", "words"),
    [
        ("from_files", None, "generation.from_files: {tmp}/gone does not exist"),
        ("from_files", b"\x00\x01garbage", "generation.from_files: {tmp}/bad.cif: cannot be read"),
        ("from_files", "outside", "has Ag, outside the chemical system Cu-Pd"),
        ("from_files", "large", "has 16 atoms, more than generation.max_atoms (8)"),
        ("extra_data", None, "mlip.training.extra_data: {tmp}/gone: does not exist"),
        ("extra_data", "unlabelled", "mlip.training.extra_data: {tmp}/plain.extxyz: frame 0 has no energy"),
    ],
)
def test_a_bad_file_is_one_line_naming_it(tmp_path, capsys, setting, content, words):
    cfg = emt_config(tmp_path)
    target = str(tmp_path / "gone")
    if isinstance(content, bytes):
        target = str(tmp_path / "bad.cif")
        (tmp_path / "bad.cif").write_bytes(content)
    elif content == "outside":
        target = str(tmp_path / "AgCu.cif")
        Structure(Lattice.cubic(3.0), ["Ag", "Cu"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(filename=target)
    elif content == "large":
        target = str(tmp_path / "big.cif")
        Structure(Lattice.cubic(3.0), ["Cu", "Pd"], [[0, 0, 0], [0.5, 0.5, 0.5]]).make_supercell(2).to(filename=target)
    elif content == "unlabelled":
        target = str(tmp_path / "plain.extxyz")
        write(target, bulk("Cu"), format="extxyz")
    if setting == "from_files":
        cfg["generation"]["from_files"] = target
    else:
        cfg["mlip"]["training"]["extra_data"] = target
    with pytest.raises(UserError):
        CampaignConfig.model_validate(cfg)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words.format(tmp=tmp_path) in err[0], err
