"""The Zarr campaign store: exact round-trips, atomic batches, crash safety, xarray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import xarray as xr
from ase import Atoms

from matdisc.errors import StoreError
from matdisc.store import CampaignWriter, Frames, TableStore, open_campaign


def random_batch(seed: int, n: int) -> tuple[list[Atoms], list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    atoms, forces = [], []
    for _ in range(n):
        k = int(rng.integers(1, 41))
        cell = rng.uniform(2, 12, (3, 3))
        atoms.append(Atoms(numbers=rng.integers(1, 95, k), positions=rng.uniform(-5, 15, (k, 3)),
                           cell=cell, pbc=rng.random(3) < 0.8))
        forces.append(rng.normal(0, 2, (k, 3)))
    return atoms, forces, rng.normal(-3, 1, n)


def test_round_trip_1000_structures_exactly(tmp_path):
    atoms, forces, energy = random_batch(0, 1000)
    with CampaignWriter(tmp_path / "c.zarr") as w:
        for i in range(4):  # several batches, so offsets are stitched across appends
            sl = slice(250 * i, 250 * (i + 1))
            w.append("frames", f"b{i}", {"energy": energy[sl], "id": [f"s{j}" for j in range(1000)][sl]},
                     Frames.from_atoms(atoms[sl], forces=forces[sl]))
    camp = open_campaign(tmp_path / "c.zarr")
    back = camp.frames()
    assert len(back) == 1000
    for i in (0, 1, 249, 250, 777, 999):
        a = back.atoms(i)
        assert np.array_equal(a.numbers, atoms[i].numbers)
        assert np.array_equal(a.positions, atoms[i].positions)
        assert np.array_equal(a.cell[:], atoms[i].cell[:])
        assert np.array_equal(a.pbc, atoms[i].pbc)
        # forces are stored as float32 by design (documented): exact at that precision
        assert np.array_equal(back.forces_of(i), forces[i].astype(np.float32))
    allpos = np.concatenate([a.positions for a in atoms])
    assert np.array_equal(back.positions, allpos)
    table = camp.table("frames")
    assert np.array_equal(table["energy"].to_numpy(), energy)
    assert list(table["id"][:3]) == ["s0", "s1", "s2"]
    # random access of a few rows
    sub = camp.tables.read_frames("frames", [999, 3])
    assert np.array_equal(sub.atoms(0).positions, atoms[999].positions)
    assert np.array_equal(sub.atoms(1).numbers, atoms[3].numbers)


def test_xarray_opens_the_arrays(tmp_path):
    atoms, forces, energy = random_batch(1, 20)
    with CampaignWriter(tmp_path / "c.zarr") as w:
        w.append("frames", "b0", {"energy": energy, "stress": np.zeros((20, 6))}, Frames.from_atoms(atoms, forces=forces))
    ds = xr.open_zarr(tmp_path / "c.zarr", group="frames", consolidated=False)
    assert ds["positions"].dims == ("atom", "xyz")
    assert ds["cell"].dims == ("frame", "cell_vector", "xyz")
    assert ds["stress"].dims == ("frame", "voigt")
    assert ds.sizes["atom"] == sum(len(a) for a in atoms)
    assert np.array_equal(ds["energy"].values, energy)


def test_exception_inside_batch_leaves_batch_invisible(tmp_path, monkeypatch):
    path = tmp_path / "c.zarr"
    a0, f0, e0 = random_batch(2, 50)
    a1, f1, e1 = random_batch(3, 60)
    with CampaignWriter(path) as w:
        w.append("frames", "b0", {"energy": e0}, Frames.from_atoms(a0, forces=f0))
    calls = {"n": 0}
    real_put = TableStore._put

    def failing_put(arr, start, values):
        calls["n"] += 1
        if calls["n"] == 3:  # after some arrays of the batch are already grown and written
            raise RuntimeError("disk on fire")
        return real_put(arr, start, values)

    monkeypatch.setattr(TableStore, "_put", staticmethod(failing_put))
    with CampaignWriter(path) as w, pytest.raises(RuntimeError):
        w.append("frames", "b1", {"energy": e1}, Frames.from_atoms(a1, forces=f1))
    monkeypatch.setattr(TableStore, "_put", staticmethod(real_put))

    camp = open_campaign(path)
    assert len(camp.frames()) == 50
    assert np.array_equal(camp.table("frames")["energy"].to_numpy(), e0)
    # the batch is redone on resume and lands whole
    with CampaignWriter(path) as w:
        assert not w.has_batch("frames", "b1")
        assert w.append("frames", "b1", {"energy": e1}, Frames.from_atoms(a1, forces=f1))
        assert not w.append("frames", "b1", {"energy": e1}, Frames.from_atoms(a1, forces=f1))  # idempotent
    back = open_campaign(path).frames()
    assert len(back) == 110
    assert np.array_equal(back.atoms(50).positions, a1[0].positions)
    assert np.array_equal(back.atoms(109).positions, a1[-1].positions)


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_store import random_batch
    from matdisc.store import CampaignWriter, Frames
    w = CampaignWriter({path!r})
    for i in range(1000):
        atoms, forces, energy = random_batch(100 + i, 400)
        print("writing", i, flush=True)
        w.append("frames", f"b{{i}}", {{"energy": energy}}, Frames.from_atoms(atoms, forces=forces))
    """
)


@pytest.mark.parametrize("delay", [0.0, 0.03, 0.09])
def test_kill_9_mid_write_leaves_store_readable(tmp_path, delay):
    path = tmp_path / "c.zarr"
    code = WRITER.format(tests=os.path.dirname(__file__), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.strip() == "writing 3":
            break
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    camp = open_campaign(path)
    done = [c.key for c in camp.tables.commits("frames")]
    assert done == [f"b{i}" for i in range(len(done))] and len(done) >= 3
    frames = camp.frames()
    energies = camp.table("frames")["energy"].to_numpy()
    expected = [random_batch(100 + i, 400) for i in range(len(done))]
    assert len(frames) == 400 * len(done)
    assert np.array_equal(energies, np.concatenate([e for _, _, e in expected]))
    assert np.array_equal(frames.positions, np.concatenate([a.positions for b in expected for a in b[0]]))

    # a new writer repairs the tail and appends after the last committed batch
    a, f, e = random_batch(7, 10)
    with CampaignWriter(path) as w:
        w.append("frames", "after", {"energy": e}, Frames.from_atoms(a, forces=f))
    back = open_campaign(path)
    assert len(back.frames()) == 400 * len(done) + 10
    assert np.array_equal(back.frames().atoms(400 * len(done)).positions, a[0].positions)
    ds = xr.open_zarr(path, group="frames", consolidated=False)
    assert ds.sizes["frame"] == 400 * len(done) + 10


def test_second_writer_is_refused(tmp_path):
    with CampaignWriter(tmp_path / "c.zarr"):
        with pytest.raises(StoreError, match="being written by pid"):
            CampaignWriter(tmp_path / "c.zarr")


def test_open_missing_store_is_a_user_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_campaign(tmp_path / "nope.zarr")


def test_candidates_view_takes_latest_results(tmp_path):
    atoms, _, _ = random_batch(5, 3)
    with CampaignWriter(tmp_path / "c.zarr") as w:
        w.append_records("candidates", "r0", [
            {"id": f"c{i}", "formula": atoms[i].get_chemical_formula(), "round": 0, "source": "prototype",
             "prototype": "x"} for i in range(3)], Frames.from_atoms(atoms))
        w.append_records("mlip", "r0-mlip", [
            {"id": "c0", "round": 0, "status": "ok", "reason": "", "model_sha256": "m", "energy": -1.0,
             "e_mlip_per_atom": -1.0, "sigma": 0.01, "n_steps": 3},
            {"id": "c1", "round": 0, "status": "exploded", "reason": "NaN energy", "model_sha256": "m",
             "energy": np.nan, "e_mlip_per_atom": np.nan, "sigma": np.nan, "n_steps": 1}],
            Frames.from_atoms(atoms[:2]))
        w.append_records("dft", "r0-dft", [
            {"id": "c0", "round": 0, "status": "ok", "reason": "", "settings_hash": "h", "energy": -1.1,
             "e_dft_per_atom": -1.1, "n_steps": 4}], Frames.from_atoms(atoms[:1]))
        w.append_records("scores", "r0-s", [{"id": "c0", "round": 0, "e_hull_mlip": 0.2, "is_hit": False}])
        w.append_records("scores", "r1-s", [{"id": "c0", "round": 1, "e_hull_mlip": 0.0, "is_hit": True}])
    cand = open_campaign(tmp_path / "c.zarr").candidates().set_index("id")
    assert cand.loc["c0", "e_hull_mlip"] == 0.0 and cand.loc["c0", "status"] == "hit"
    assert cand.loc["c1", "status"] == "mlip_exploded"
    assert cand.loc["c2", "status"] == "generated"
    s = open_campaign(tmp_path / "c.zarr").structure("c1", "mlip")
    assert np.allclose(s.cart_coords, atoms[1].positions)


def test_a_store_copied_to_an_object_store_reads_as_the_original(tmp_path, s3_bucket):
    """Notebooks and ``matdisc status`` read a store from an fsspec URL (here an S3 API):
    the same tables, structures and candidates; only committed batches."""
    import pandas as pd

    atoms, forces, energy = random_batch(7, 40)
    local = tmp_path / "c.zarr"
    with CampaignWriter(local) as w:
        w.append_records("candidates", "r0", [
            {"id": f"c{i}", "formula": a.get_chemical_formula(), "round": 0, "source": "prototype", "prototype": "x"}
            for i, a in enumerate(atoms)], Frames.from_atoms(atoms))
        for i in range(2):  # two batches: offsets stitched across appends
            sl = slice(20 * i, 20 * (i + 1))
            w.append("frames", f"f{i}", {"energy": energy[sl], "id": [f"c{j}" for j in range(40)][sl]},
                     Frames.from_atoms(atoms[sl], forces=forces[sl]))
        w.append_records("dft", "r0-dft", [
            {"id": "c3", "round": 0, "status": "ok", "reason": "", "settings_hash": "h", "energy": -2.0,
             "e_dft_per_atom": -2.0 / len(atoms[3]), "n_steps": 4, "walltime_s": 1.5}], Frames.from_atoms(atoms[3:4]))
    s3_bucket.put(str(local), "campaigns/c.zarr", recursive=True)
    # a batch cut short after the copy started: its log line is torn, so readers must not see it
    with s3_bucket.open("campaigns/c.zarr/_commits/dft.jsonl", "ab") as f:
        f.write(b'{"key": "r1-dft", "rows": [1, 2')

    url = "s3://campaigns/c.zarr"
    remote, mine = open_campaign(url), open_campaign(local)
    assert remote.path == url
    assert remote.tables.tables() == mine.tables.tables() == ["candidates", "dft", "frames"]
    for table in ("candidates", "dft", "frames"):
        pd.testing.assert_frame_equal(remote.table(table), mine.table(table))
    pd.testing.assert_frame_equal(remote.candidates(), mine.candidates())
    back = remote.frames()
    assert np.array_equal(back.positions, np.concatenate([a.positions for a in atoms]))
    assert np.array_equal(back.forces_of(33), forces[33].astype(np.float32))
    assert remote.structure("c3", "dft").composition == open_campaign(local).structure("c3", "dft").composition

    env = {**os.environ}
    ok = subprocess.run([sys.executable, "-m", "matdisc.cli", "status", url, "--json"], env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert '"store": "s3://campaigns/c.zarr"' in ok.stdout
    missing = subprocess.run([sys.executable, "-m", "matdisc.cli", "status", "s3://campaigns/nope.zarr"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0, missing.stderr
    assert "s3://campaigns/nope.zarr is not a campaign store" in missing.stderr


def test_a_filesystem_without_locks_is_one_line_and_opens_no_store(tmp_path, monkeypatch):
    """flock failing with ENOLCK (NFS without lockd, Lustre without 'flock') is said, not a
    traceback, and the writer does not go on without the lock that keeps a second writer out."""
    import errno
    import fcntl

    from matdisc.store import tables

    real = fcntl.flock

    def no_locks(fd, operation):
        if operation & fcntl.LOCK_UN:
            return real(fd, operation)
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(tables.fcntl, "flock", no_locks)
    with pytest.raises(StoreError, match="the filesystem gives no file locks") as err:
        CampaignWriter(tmp_path / "s.zarr")
    assert len(str(err.value).splitlines()) == 1 and "No locks available" in str(err.value)
    assert not (tmp_path / "s.zarr" / "zarr.json").exists()
    (tmp_path / "t.zarr" / "_commits").mkdir(parents=True)
    (tmp_path / "t.zarr" / "_commits" / "writer.lock").write_text("pid 1")
    with pytest.raises(StoreError, match="no file locks"):
        tables.check_not_locked(tmp_path / "t.zarr")


def test_a_batch_is_on_disk_before_the_commit_that_makes_it_visible(tmp_path, monkeypatch):
    """Durability: every file an append writes (chunks and metadata), and each directory that got a
    new entry, is fsynced before the commit line, and the commit line itself is fsynced: a power
    cut after ``append`` returns keeps the batch, one before the line leaves it invisible."""
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    rng = np.random.default_rng(1)
    atoms = [Atoms("Cu2", positions=rng.normal(size=(2, 3)), cell=np.eye(3) * 3, pbc=True) for _ in range(3)]
    with TableStore(tmp_path / "s.zarr", write=True) as store:
        before = {p for p in (tmp_path / "s.zarr").rglob("*")}
        store.append("frames", "b0", {"energy": [1.0, 2.0, 3.0]}, Frames.from_atoms(atoms))
    log = str(tmp_path / "s.zarr" / "_commits" / "frames.jsonl")
    assert synced[-2:] == [log, str(tmp_path / "s.zarr" / "_commits")]  # the line, then its new directory entry
    data = {str(p) for p in (tmp_path / "s.zarr" / "frames").rglob("*") if p.is_file()}
    assert data and data <= set(synced[: synced.index(log)])  # every array file before the line
    created_dirs = {str(p) for p in (tmp_path / "s.zarr" / "frames").rglob("*") if p.is_dir() and p not in before}
    assert created_dirs <= set(synced[: synced.index(log)])


GROUP_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_store import random_batch
    from matdisc.store import Batch, CampaignWriter, Frames, TableStore
    real = TableStore._commit
    def commit_then_die(self, table, commit, **kw):
        if table == {die_before!r}:
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, table, commit, **kw)
    TableStore._commit = commit_then_die
    atoms, forces, energy = random_batch(5, 7)
    with CampaignWriter({path!r}) as w:
        w.append_together([
            Batch("frames", "r1/c1/s", {{"id": ["c1"] * 7, "energy": energy}}, Frames.from_atoms(atoms, forces=forces)),
            Batch("dft", "r1/c1/s", {{"id": ["c1"], "e_dft_per_atom": [energy[-1]]}}, Frames.from_atoms(atoms[-1:])),
        ])
    """
)


@pytest.mark.parametrize("die_before", ["dft", "frames"])
def test_a_reference_result_is_one_commit_whatever_line_a_kill_cuts(tmp_path, die_before):
    """A DFT result is its training frames and its row, in two tables: killed before the row's line
    (the deciding one) neither is visible; killed after it, before the frames' line, the next writer
    completes the frames' commit from the data already on disk, so the result is not computed again
    and its frames are not lost."""
    path = tmp_path / "c.zarr"
    with CampaignWriter(path) as w:  # an earlier batch: the group's rows start after it
        a0, f0, e0 = random_batch(1, 4)
        w.append("frames", "earlier", {"id": ["c0"] * 4, "energy": e0}, Frames.from_atoms(a0, forces=f0))
    code = GROUP_WRITER.format(tests=os.path.dirname(__file__), path=str(path), die_before=die_before)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    atoms, forces, energy = random_batch(5, 7)
    with CampaignWriter(path) as w:  # opening for writing repairs
        keys = {t: [c.key for c in w.tables.commits(t)] for t in ("frames", "dft")}
    camp = open_campaign(path)
    if die_before == "dft":  # nothing of the group
        assert keys == {"frames": ["earlier"], "dft": []}
        assert len(camp.frames()) == 4
        return
    assert keys == {"frames": ["earlier", "r1/c1/s"], "dft": ["r1/c1/s"]}
    frames = camp.frames()
    assert len(frames) == 11
    assert np.array_equal(camp.table("frames")["energy"].to_numpy(), np.concatenate([e0, energy]))
    assert np.array_equal(frames.atoms(4).positions, atoms[0].positions)
    assert np.allclose(frames.forces[-len(atoms[-1]):], forces[-1], atol=1e-5)
    assert camp.table("dft")["e_dft_per_atom"].tolist() == [energy[-1]]
