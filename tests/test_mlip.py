"""The MACE engine: training on EMT data, batched vs ASE relaxation, outcomes, committee, registry.

One committee of two tiny MACE models is trained once per session on ~200 EMT frames of
Cu-Pd (real mace-torch training); every test uses it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from matdisc.config import MLIPConfig, TrainingConfig
from matdisc.mlip import ModelError, describe, evaluate, relax_ase, relax_many, require_elements, train_committee
from matdisc.mlip.batched import GPU_BATCH_ATOMS_CAP, batch_atoms_for_memory, committee_spread, mace_models
from matdisc.mlip.model import check_trusted, load_torch_model, trusted_roots
from matdisc.records import labelled

#: Measured: 0.035-0.045 eV/Å held-out force RMSE after 20 epochs (two seeds); the bound leaves room.
FORCE_RMSE_BOUND = 0.08
TRAINING = TrainingConfig(num_channels=16, max_L=0, r_max=4.5, max_num_epochs=20, batch_size=8, finetune_epochs=6)


def emt_frames(n_structures: int, seed: int, *, per_structure: int = 5, strain: tuple[float, float] = (-0.03, 0.05)):
    """Rattled, strained Cu-Pd fcc cells (2 and 4 atoms) labelled with EMT, grouped by structure."""
    rng = np.random.default_rng(seed)
    frames, groups = [], []
    for i in range(n_structures):
        a = bulk("Cu", "fcc", a=3.75, cubic=True) if i % 2 else bulk("Cu", "fcc", a=3.75).repeat((2, 1, 1))
        a.numbers = rng.choice([29, 46], len(a))
        a.set_cell(a.cell * (1 + rng.uniform(*strain)), scale_atoms=True)
        for k in range(per_structure):
            b = a.copy()
            b.rattle(0.08, seed=int(rng.integers(1 << 30)))
            b.calc = EMT()
            frames.append(labelled(b, b.get_potential_energy(), b.get_forces(), b.get_stress(voigt=True)))
            groups.append(f"s{seed}-{i}")
    return frames, groups


@pytest.fixture(scope="session")
def committee(tmp_path_factory):
    frames, groups = emt_frames(40, seed=0)
    assert len(frames) == 200
    trained = train_committee(frames, groups, tmp_path_factory.mktemp("mace"), TRAINING, size=2, seed=0)
    return trained


@pytest.fixture(scope="session")
def model_paths(committee):
    return [str(m.path) for m in committee]


def rattled(n: int, seed: int = 0) -> list[tuple[str, Atoms]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = bulk("Cu", "fcc", a=3.8, cubic=True).repeat((2, 1, 1) if i % 2 else (1, 1, 1))
        a.numbers = rng.choice([29, 46], len(a))
        a.rattle(0.05, seed=i)
        out.append((f"c{i}", a))
    return out


def test_a_training_mace_rejects_fails_with_maces_own_error(tmp_path):
    """The trainer runs in a forked child: its exit code and the tail of its output come back."""
    from matdisc.mlip.train import TrainingError, train_mace

    frames, _ = emt_frames(4, seed=1)
    bad = TRAINING.model_copy(update={"num_channels": 0}).sized("cpu")
    with pytest.raises(TrainingError, match=r"mace training failed \(exit 1\): .*\S"):
        train_mace(frames[:12], frames[12:16], tmp_path / "m", bad)
    assert not (tmp_path / "m" / "mace-s0.model").exists()


def test_a_script_without_the_main_guard_is_told_to_add_it(tmp_path):
    """The training child re-imports the main module: a script that trains at import time restarts
    inside it, and the error names the guard instead of an empty mace failure."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from pathlib import Path\n"
        "from test_mlip import TRAINING, emt_frames\n"
        "from matdisc.mlip.train import train_mace\n"
        "frames, _ = emt_frames(2, seed=1)\n"
        f"train_mace(frames[:6], frames[6:], Path({str(tmp_path / 'm')!r}), TRAINING.sized('cpu'))\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("matdisc.mlip.train.TrainingError: the training process exited (1) before mace started")
    assert '`if __name__ == "__main__":`' in last


def _launch_in_daemon(args, cwd, out):  # a daemonic process, as a Dask worker left at its default
    from matdisc.mlip.launch import run_trainer

    out.put(run_trainer(args, cwd, cwd / "run_train.log"))


def test_a_daemonic_process_trains_through_a_subprocess_and_says_so(tmp_path):
    """A daemonic process may not fork: the run is ``python -m mace.cli.run_train``, reported as such."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_launch_in_daemon, args=(["--name=x", "--num_channels=0"], tmp_path, out), daemon=True)
    proc.start()
    launch = out.get(timeout=300)
    proc.join(60)
    assert (launch.mode, launch.preloaded, launch.exitcode) == ("subprocess", False, 1)
    assert "num_channels must be positive integer" in (tmp_path / "run_train.log").read_text()


def test_training_from_scratch_reaches_force_bound(committee):
    for m in committee:
        assert m.mode == "scratch"
        assert m.preloaded  # forked with mace's trainer imported, not importing it per run (mlip.launch)
        assert m.n_valid > 0 and m.n_train > 100
        assert m.metrics["forces_rmse"] < FORCE_RMSE_BOUND, m.metrics
        assert m.metrics["energy_rmse_per_atom"] < 0.05, m.metrics
    # members differ: different seeds and training subsamples
    a, b = (load_torch_model(str(m.path)) for m in committee)
    assert any(not np.allclose(p.detach(), q.detach()) for p, q in zip(a.parameters(), b.parameters()))


def test_fine_tuning_improves_on_new_data(committee, tmp_path):
    """Naive fine-tuning of a trained model on frames it has not seen (expanded cells)."""
    frames, groups = emt_frames(12, seed=7, strain=(0.06, 0.10))
    start = str(committee[0].path)
    tuned = train_committee(frames, groups, tmp_path, TRAINING, size=1, seed=3, start_models=[start])[0]
    assert tuned.mode == "naive"
    held_out = [f for f, g in zip(frames, groups) if g in {groups[-1], groups[0]}]
    before = evaluate(start, held_out)["forces_rmse"]
    after = evaluate(str(tuned.path), held_out)["forces_rmse"]
    assert after < before, (before, after)
    # every epoch is validated and the best one kept (validated every fifth, a 6-epoch fine-tune kept
    # its first or sixth epoch whatever the others were)
    evals = [json.loads(line) for line in next(tuned.path.parent.glob("results/*_train.txt")).read_text().splitlines()]
    losses = {e["epoch"]: e["loss"] for e in evals if e["mode"] == "eval" and e["epoch"] is not None}
    assert sorted(losses) == list(range(TRAINING.finetune_epochs)) and tuned.epochs == TRAINING.finetune_epochs
    assert tuned.kept_epoch == min(losses, key=losses.get) + 1


def test_multihead_fine_tuning_with_replay_data(committee, tmp_path):
    """With replay data the start model is fine-tuned multihead; the campaign head is what we keep."""
    from ase.io import write

    replay, _ = emt_frames(10, seed=0)
    write(tmp_path / "replay.xyz", replay, format="extxyz")
    frames, groups = emt_frames(8, seed=11, strain=(0.06, 0.10))
    cfg = TRAINING.model_copy(update={"replay_file": tmp_path / "replay.xyz", "finetune_epochs": 3})
    start = str(committee[0].path)
    tuned = train_committee(frames, groups, tmp_path / "mh", cfg, size=1, seed=5, start_models=[start])[0]
    assert tuned.mode == "multihead"
    model = load_torch_model(str(tuned.path))
    assert list(model.heads) == ["Default"]  # the replay head is dropped from the screening model
    before = load_torch_model(start)
    assert any(not np.allclose(p.detach(), q.detach()) for p, q in zip(before.parameters(), model.parameters()))
    assert tuned.metrics["forces_rmse"] < FORCE_RMSE_BOUND  # anchored by the replay data: nothing forgotten


def test_batched_and_ase_agree(model_paths):
    structures = rattled(6)
    mlip = MLIPConfig(device="cpu", fmax=0.05, max_steps=300)
    batched = relax_many(structures, model_paths[:1], mlip.model_copy(update={"engine": "torch-sim"}))
    ase = relax_ase(structures, model_paths[:1], mlip)
    assert [r.engine for r in batched] == ["torch-sim"] * 6  # the batched engine really ran
    assert [r.engine for r in ase] == ["ase"] * 6
    for b, a in zip(batched, ase):
        assert b.id == a.id
        assert b.status in ("ok", "symmetry_changed") and a.status in ("ok", "symmetry_changed"), (b, a)
        assert abs(b.energy_per_atom - a.energy_per_atom) < 1e-3
        assert np.abs(b.forces).max() < 0.05 + 1e-6


def test_unconverged_and_exploded_are_outcomes_not_errors(model_paths):
    structures = rattled(3)
    squeezed = bulk("Cu", "fcc", a=3.8, cubic=True)
    squeezed.numbers = [29, 46, 29, 46]
    squeezed.positions[1] = squeezed.positions[0] + [0.15, 0.0, 0.0]  # two atoms 0.15 Å apart
    structures.append(("overlap", squeezed))
    gas = Atoms("CuPd", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[2.5, 30.0, 30.0], pbc=True)  # a chain in vacuum
    structures.append(("chain", gas))
    mlip = MLIPConfig(device="cpu", engine="torch-sim", max_steps=10)
    results = {r.id: r for r in relax_many(structures, model_paths[:1], mlip)}
    assert len(results) == 5
    assert results["overlap"].status == "exploded" and results["overlap"].reason, results["overlap"]
    assert np.isnan(results["overlap"].energy)
    assert results["c0"].status == "unconverged" and "10 steps" in results["c0"].reason
    assert np.isfinite(results["c0"].energy)
    assert {r.engine for r in results.values()} == {"torch-sim"}  # outcomes, not a fallback
    # the chain's two atoms share a site (x = 0 and x = a): its energy is not finite, and forces are
    # the gradient of the batch's summed energy; the others still relax as they do without it
    assert results["chain"].status == "exploded"
    alone = relax_many(structures[:3], model_paths[:1], mlip)
    for r in alone:
        assert results[r.id].status == r.status and abs(results[r.id].energy - r.energy) < 1e-6


def test_out_of_memory_splits_the_batch_and_finishes_on_the_batched_engine(model_paths, monkeypatch, caplog):
    """A device that holds 8 atoms per evaluation (a real model on a smaller device, not a mock):
    a 48-atom batch runs out of memory, is retried with half the atoms per batch until it fits,
    and every structure is relaxed by the batched engine, as without the limit."""
    from matdisc.mlip import batched

    structures = rattled(6)  # 4- and 8-atom cells
    mlip = MLIPConfig(device="cpu", engine="torch-sim", batch_atoms=48, max_steps=100)
    free = relax_many(structures, model_paths[:1], mlip)
    monkeypatch.setattr(batched, "DEVICE_MEMORY_ATOMS", 8)
    with caplog.at_level("WARNING", logger="matdisc.mlip.relax"):
        limited = relax_many(structures, model_paths[:1], mlip)
    assert [r.engine for r in limited] == ["torch-sim"] * 6
    assert "out of memory with 48 atoms per batch: retrying with 24" in caplog.text
    assert "retrying with 8" in caplog.text
    for a, b in zip(free, limited):
        assert (a.id, a.status) == (b.id, b.status)
        assert abs(a.energy_per_atom - b.energy_per_atom) < 1e-4


def test_a_structure_the_batched_engine_cannot_hold_is_failed_or_relaxed_by_ase_as_configured(
    model_paths, monkeypatch
):
    """An 8-atom cell on a device that holds 4 atoms: with ``engine: torch-sim`` it is ``failed`` with
    the engine's error and the others are relaxed; with ``auto`` the ASE loop relaxes it, recorded
    as a fallback with the reason. Never silently."""
    from matdisc.mlip import batched

    structures = rattled(4)  # c1 and c3 have 8 atoms
    monkeypatch.setattr(batched, "DEVICE_MEMORY_ATOMS", 4)
    strict = {r.id: r for r in relax_many(structures, model_paths[:1], MLIPConfig(device="cpu", engine="torch-sim"))}
    assert strict["c1"].status == "failed" and "OutOfMemoryError" in strict["c1"].reason
    assert strict["c1"].engine == "torch-sim"
    assert strict["c0"].status in ("ok", "symmetry_changed") and strict["c0"].engine == "torch-sim"
    auto = {r.id: r for r in relax_many(structures, model_paths[:1], MLIPConfig(device="cpu", engine="auto"))}
    assert auto["c0"].engine == auto["c2"].engine == "torch-sim"
    for cid in ("c1", "c3"):
        assert auto[cid].engine.startswith("ase (fallback: OutOfMemoryError: device holds 4 atoms")
        assert auto[cid].status in ("ok", "symmetry_changed") and np.isfinite(auto[cid].energy)


def test_symmetry_change_is_flagged(model_paths):
    """A B2 CuPd cell whose c axis is 10 % long relaxes to another space group (or stays): the
    outcome names both groups exactly when they differ."""
    from matdisc.mlip.outcome import spacegroup

    a = bulk("Cu", "fcc", a=3.75, cubic=True)
    a.numbers = [29, 46, 46, 46]  # L1_2 Pd3Cu, Pm-3m
    a.positions[1] += [0.25, 0.0, 0.0]  # off-site: P4/mmm-like distortion
    res = relax_many([("x", a)], model_paths[:1], MLIPConfig(device="cpu", engine="torch-sim"))[0]
    before, after = spacegroup(a), spacegroup(res.atoms)
    if before[1] != after[1]:
        assert res.status == "symmetry_changed"
        assert res.reason == f"{before[0]} ({before[1]}) -> {after[0]} ({after[1]})"
    else:
        assert res.status == "ok"
    assert before[1] != 221  # the input really is distorted


def test_committee_spread_grows_away_from_training_data(model_paths):
    near = bulk("Cu", "fcc", a=3.8, cubic=True)
    near.numbers = [29, 46, 29, 46]
    far = near.copy()
    far.set_cell(near.cell * 0.78, scale_atoms=True)  # 22 % compressed: never seen in training
    far.rattle(0.15, seed=1)
    members = [mace_models([load_torch_model(p)], "cpu", "float64") for p in model_paths]
    spread = committee_spread([near, far], members)
    assert spread[0, 0] > 0 and spread[0, 1] > 0
    assert spread[1, 0] > 3 * spread[0, 0], spread
    assert spread[1, 1] > 3 * spread[0, 1], spread
    # relax_many reports the same quantities per structure (batched committee)
    res = relax_many([("near", near)], model_paths, MLIPConfig(device="cpu", max_steps=1))[0]
    assert res.sigma > 0 and res.force_std > 0


def test_registry_describes_and_refuses_missing_elements(model_paths, tmp_path):
    info = describe(model_paths)
    assert info.elements == ("Cu", "Pd") and info.r_max == pytest.approx(4.5)
    assert len(info.members) == 2 and len(info.sha256) == 64
    require_elements(info, ["Cu", "Pd"])
    with pytest.raises(ModelError, match="has no Li"):
        require_elements(info, ["Cu", "Li"])
    with pytest.raises(ModelError, match="not under a configured model location"):
        check_trusted(model_paths[:1], trusted_roots([tmp_path]))
    check_trusted(model_paths[:1], trusted_roots([model_paths[0]]))


def test_cli_refuses_a_model_without_the_campaign_elements(model_paths, tmp_path):
    store = tmp_path / "li.zarr"
    cfg = {"name": "li", "chemsys": ["Cu", "Li"], "store": str(store),
           "mlip": {"model": model_paths[0], "ensemble": 1, "device": "cpu"},
           "reference": {"calculator": "gpaw"}}
    path = tmp_path / "li.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "matdisc.cli", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "has no Li" in err[0] and "Traceback" not in proc.stderr
    assert not store.exists()


def test_device_and_training_presets():
    with pytest.raises(ValueError, match="unknown device"):
        MLIPConfig(device="gpu0")
    assert MLIPConfig(device="cuda:1").device == "cuda:1"
    cpu, gpu = TrainingConfig().sized("cpu"), TrainingConfig().sized("cuda")
    assert (cpu.num_channels, cpu.max_L) == (16, 0) and (gpu.num_channels, gpu.max_L) == (128, 1)
    assert TrainingConfig(num_channels=32).sized("cuda").num_channels == 32
    assert cpu.finetune_epochs == cpu.max_num_epochs // 2


def test_gpu_batch_size_follows_free_memory():
    assert batch_atoms_for_memory(10_000, 10**9, 8) == 50_000  # half of 1 GB at 10 kB per atom
    assert batch_atoms_for_memory(1_000, 10**12, 8) == GPU_BATCH_ATOMS_CAP
    assert batch_atoms_for_memory(10**9, 10**9, 40) == 40  # never below the largest structure


def test_a_registered_model_that_changed_on_disk_is_never_unpickled(model_paths, tmp_path):
    """A store keeps models as models/<sha256>.model: a file whose bytes no longer have that hash
    (tampered with, damaged) is refused before torch unpickles it, by every loader."""
    import shutil

    from matdisc.mlip.model import file_sha256, load_calculator, load_torch_model

    good = tmp_path / f"{file_sha256(model_paths[0])}.model"
    shutil.copyfile(model_paths[0], good)
    assert load_torch_model(str(good)).r_max > 0  # the intact copy loads
    bad = tmp_path / "other" / good.name
    bad.parent.mkdir()
    shutil.copyfile(model_paths[0], bad)
    with open(bad, "ab") as f:  # 16 bytes more: the file no longer has the hash it is named by
        f.write(b"\0" * 16)
    for load in (lambda p: load_torch_model(p), lambda p: load_calculator([p]), lambda p: describe([p])):
        with pytest.raises(ModelError, match="does not have the sha256 it is registered under"):
            load(str(bad))


def test_a_rescore_is_the_committees_energy_and_spread_where_the_structure_stands(model_paths):
    """Rescoring evaluates, it does not relax: the structure comes back unmoved, with the committee
    mean energy (predict_energies) and the spread a relaxation reports at its end point."""
    from matdisc.mlip import predict_energies, rescore_many
    from matdisc.mlip.batched import committee_spread, mace_models
    from matdisc.mlip.model import load_torch_model

    structures = rattled(5, seed=3)
    res = rescore_many(structures, model_paths, MLIPConfig(device="cpu"))
    assert [r.id for r in res] == [cid for cid, _ in structures] and all(r.status == "ok" for r in res)
    assert {r.engine for r in res} == {"torch-sim"}
    assert all(r.n_steps == 0 and np.allclose(r.atoms.positions, a.positions) for r, (_, a) in zip(res, structures))
    expected = predict_energies(model_paths, [a for _, a in structures])
    assert np.allclose([r.energy_per_atom for r in res], expected, atol=1e-8)
    members = mace_models([load_torch_model(p) for p in model_paths], "cpu", "float64").members
    spread = committee_spread([a for _, a in structures], list(members))
    assert np.allclose([r.sigma for r in res], spread[:, 0]) and np.allclose([r.force_std for r in res], spread[:, 1])
    assert all(r.sigma > 0 for r in res)


def test_model_hashes_are_checked_before_unpickling_and_computed_once_per_file_version(model_paths, tmp_path,
                                                                                      monkeypatch):
    """``check_sha256`` refuses a file whose sha256 is not the one expected (a pin, or the name a
    registered file carries); the hash is computed once per (path, size, mtime), and again after the
    file changed."""
    import shutil

    from matdisc.mlip import model as registry

    path = tmp_path / "mine.model"
    shutil.copyfile(model_paths[0], path)
    calls = []
    real = registry.file_sha256
    monkeypatch.setattr(registry, "file_sha256", lambda p: calls.append(p) or real(p))
    sha = registry.check_sha256(path)
    assert sha == real(model_paths[0]) and registry.check_sha256(path, sha) == sha and len(calls) == 1
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match=r"mine.model does not have the sha256 expected \(" + sha[:12]):
        load_torch_model(str(path), sha256=sha)
    assert len(calls) == 2  # the changed file was hashed again, and refused before torch.load


def test_trust_roots_follow_mace_own_cache_location(tmp_path, monkeypatch):
    """mace-torch caches foundation models under ``$XDG_CACHE_HOME/mace`` when that is set: a file
    there is trusted, one in ``~/.cache/mace`` then is not."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    roots = trusted_roots([])
    assert roots == [(tmp_path / "xdg" / "mace").resolve()]
    check_trusted([str(tmp_path / "xdg" / "mace" / "mace-mpa-0-medium.model")], roots)
    with pytest.raises(ModelError, match="not under a configured model location"):
        check_trusted([str(tmp_path / ".cache" / "mace" / "x.model")], roots)


def test_a_configured_model_is_pinned_and_a_resumed_campaign_refuses_it_changed(model_paths, tmp_path):
    """``mlip.model_sha256`` pins the configured file; without a pin the store registers a copy named
    by its hash at the start, and ``matdisc run`` on that store refuses the configured file once it
    changed, before unpickling it, with one line and the store untouched."""
    import shutil

    from matdisc.config import CampaignConfig
    from matdisc.mlip.model import configured_model, file_sha256
    from matdisc.stages.registry import register_model, registered_start
    from matdisc.store import CampaignWriter, open_campaign

    mine = tmp_path / "mine.model"
    shutil.copyfile(model_paths[0], mine)
    sha = file_sha256(mine)
    cfg = {"name": "cu-pd", "chemsys": ["Cu", "Pd"], "store": str(tmp_path / "cu-pd.zarr"),
           "mlip": {"model": str(mine), "model_sha256": "0" * 64, "ensemble": 1, "device": "cpu"},
           "reference": {"calculator": "emt"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "matdisc.cli", "run", str(path)], capture_output=True, text=True)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "does not have the sha256 expected (000000000000" in err[0], err
    assert not (tmp_path / "cu-pd.zarr").exists()
    cfg["mlip"]["model_sha256"] = sha
    assert configured_model(CampaignConfig.model_validate(cfg).mlip, ["Cu", "Pd"]).sha256 == sha

    del cfg["mlip"]["model_sha256"]
    with CampaignWriter(tmp_path / "cu-pd.zarr") as w:
        record = register_model(w, 0, [mine], n_frames=0, source=str(mine))
    assert record.paths == [str(tmp_path / "cu-pd.zarr" / "models" / f"{sha}.model")]  # the store's own copy
    assert registered_start(open_campaign(tmp_path / "cu-pd.zarr"), str(mine)) == sha
    before = {p: p.read_bytes() for p in (tmp_path / "cu-pd.zarr").rglob("*") if p.is_file()}
    with open(mine, "ab") as f:
        f.write(b"\0" * 8)
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "matdisc.cli", "run", str(path)], capture_output=True, text=True)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and f"does not have the sha256 expected ({sha[:12]}" in err[0], err
    assert {p: p.read_bytes() for p in (tmp_path / "cu-pd.zarr").rglob("*") if p.is_file()} == before


def test_a_training_committee_shows_its_epochs_as_they_go(tmp_path, monkeypatch, caplog):
    """While a committee trains on a worker, the round reads each member's epoch from mace's own
    results files and logs the count of finished epochs with the time left: increasing, never past
    the total, and the stage's progress reaches the total when the committee is back."""
    import logging
    import re
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from conftest import emt_config

    from matdisc.config import CampaignConfig
    from matdisc.executor import InProcess
    from matdisc.stages import train as train_stage

    monkeypatch.setattr(train_stage, "EPOCH_POLL_S", 0.2)
    monkeypatch.setattr(train_stage, "EPOCH_LOG_S", 0.0)
    cfg = CampaignConfig.model_validate(emt_config(tmp_path))
    frames, groups = emt_frames(12, seed=5)
    epochs, members = 8, cfg.mlip.ensemble
    training = TRAINING.model_copy(update={"max_num_epochs": epochs, "batch_size": 2})
    progress = {}

    class Executor(InProcess):
        def progress(self, cfg, round_, what, total, expected_s=None):
            progress["bar"] = super().progress(cfg, round_, what, total, expected_s)
            return progress["bar"]

    ctx = SimpleNamespace(cfg=cfg, number=1, executor=Executor(), log=logging.getLogger("test-epochs"))
    with caplog.at_level(logging.INFO, "test-epochs"), ThreadPoolExecutor(1) as pool:
        fut = pool.submit(train_committee, frames, groups, tmp_path / "r1", training, size=members, seed=0)
        trained = train_stage.await_training(ctx, fut, tmp_path / "r1", epochs)
    assert len(trained) == members
    shown = [re.match(r"training \d+ members: epochs (\d+)/(\d+)", r.getMessage()) for r in caplog.records]
    done = [int(m[1]) for m in shown if m]
    assert {int(m[2]) for m in shown if m} == {members * epochs}
    assert len(done) >= 3 and done == sorted(set(done)) and 0 < done[0] and done[-1] < members * epochs, done
    assert progress["bar"].done == members * epochs


def test_the_committees_hessian_starts_bfgs_on_its_own_surface_in_fewer_steps(model_paths):
    """The committee's Hessian (matdisc.mlip.hessian, the job verification uses) is its curvature in
    the relaxation's coordinates: BFGS on the committee's own surface from a rattled, strained cell
    converges in well under the steps of ASE's guess (measured 34 against 67), to the same energy. A
    Hessian in the wrong coordinates or units does no better than the guess."""
    from matdisc.ase_relax import relax
    from matdisc.mlip.hessian import hessians_many
    from matdisc.mlip.model import load_calculator

    structures = rattled(4, seed=7)
    for _, a in structures:
        a.set_cell(a.cell * 1.02, scale_atoms=True)
    mlip = MLIPConfig(device="cpu")
    results = hessians_many(structures, model_paths, mlip)
    assert [cid for cid, _, _ in results] == [cid for cid, _ in structures]
    assert all(h is not None and why == "" for _, h, why in results)
    calc = load_calculator(model_paths)
    # the batched evaluation (torch-sim) gives the curvature the ASE calculator gives
    from matdisc.ase_relax import relaxation_hessian

    assert np.allclose(results[0][1], relaxation_hessian(structures[0][1], calc), atol=1e-3)
    plain = seeded = 0
    for (cid, atoms), (_, hessian, _) in zip(structures, results):
        assert hessian.shape == (3 * len(atoms) + 9,) * 2
        a = relax(atoms, calc, fmax=0.01, max_steps=300, optimizer="BFGS")
        b = relax(atoms, calc, fmax=0.01, max_steps=300, optimizer="BFGS", hessian=hessian)
        assert a.status == b.status == "ok", (a.reason, b.reason)
        assert abs(a.energy_per_atom - b.energy_per_atom) < 1e-3, cid
        plain, seeded = plain + a.n_steps, seeded + b.n_steps
    assert seeded <= 0.6 * plain, (seeded, plain)
