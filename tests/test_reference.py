"""The reference stage: real GPAW on a tiny cell, EMT relax + static, failures recorded."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

from matdisc.config import ReferenceConfig
from matdisc.dft import run_reference, settings_hash


def test_gpaw_relax_and_static_on_a_one_atom_cell(tmp_path):
    cfg = ReferenceConfig(calculator="gpaw", parameters={"mode": {"name": "pw", "ecut": 200}},
                          kpoint_density=1.5, fmax=0.05, max_steps=8)
    atoms = bulk("Al", "fcc", a=4.25)  # strained: PBE's a is ~4.04 Å
    res = run_reference(atoms, cfg, id="al", workdir=tmp_path)
    assert res.status in ("ok", "unconverged"), res.reason
    assert np.isfinite(res.energy) and res.forces.shape == (1, 3) and res.stress.shape == (6,)
    first, last = res.frames[0], res.frames[-1]
    assert last.info["REF_energy"] == pytest.approx(res.energy)  # the final static is the last frame
    assert res.energy < first.info["REF_energy"]  # relaxation lowered the energy
    assert res.atoms.get_volume() < atoms.get_volume()  # and shrank the cell towards equilibrium
    assert (tmp_path / "al" / "static" / "gpaw.txt").is_file()  # working directories are kept


def test_emt_protocol_matches_emt_directly(tmp_path):
    from ase.calculators.emt import EMT

    res = run_reference(bulk("Cu", "fcc", a=3.7), ReferenceConfig(calculator="emt", fmax=0.01), id="cu",
                        workdir=tmp_path)
    assert res.ok
    a = res.atoms.copy()
    a.calc = EMT()
    assert a.get_potential_energy() == pytest.approx(res.energy, abs=1e-9)
    assert abs(a.get_stress()).max() < 0.01  # relaxed cell


def test_a_failing_calculator_is_recorded_not_raised(tmp_path):
    # EMT has no parameters for Si: the calculator raises, the protocol records why
    res = run_reference(bulk("Si", "diamond", a=5.4), ReferenceConfig(calculator="emt"), id="si", workdir=tmp_path)
    assert res.status == "failed" and "Si" in res.reason


def test_settings_hash_changes_with_energy_defining_settings():
    a = ReferenceConfig()
    assert settings_hash(a) == settings_hash(ReferenceConfig())
    assert settings_hash(a) != settings_hash(ReferenceConfig(parameters={"xc": "LDA"}))
    assert settings_hash(a) != settings_hash(ReferenceConfig(kpoint_density=4.0))
