"""Writing a campaign store at an fsspec URL: lease, pull, push, crash consistency, model shipping.

The object store is moto's S3 API on 127.0.0.1 (``s3_bucket`` in conftest): the same s3fs
calls (exclusive put with If-None-Match, whole-object puts, listings) a real bucket answers.
"""

from __future__ import annotations

import json
from pathlib import Path
import os
import socket
import time

import numpy as np
import pytest
from ase.build import bulk

from matdisc.errors import StoreError
from matdisc.store import CampaignWriter, Frames, open_campaign
from matdisc.store.remote import LEASE, RemoteStore, mirror_dir
from matdisc.store.tables import check_not_locked

URL = "s3://campaigns/remote.zarr"


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MATDISC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _candidates(n: int, start: int = 0) -> tuple[list[dict], Frames]:
    atoms = [bulk("Cu", cubic=True) * (1, 1, 1 + (i % 2)) for i in range(start, start + n)]
    rows = [{"id": f"c{i}", "formula": a.get_chemical_formula(), "round": 0, "source": "prototype", "prototype": "fcc"}
            for i, a in zip(range(start, start + n), atoms)]
    return rows, Frames.from_atoms(atoms)


def _lease(fs) -> dict | None:
    fs.invalidate_cache()
    path = f"campaigns/remote.zarr/{LEASE}"
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def test_a_writer_at_a_url_leases_pushes_each_commit_and_a_second_writer_is_refused(s3_bucket, home):
    with CampaignWriter(URL) as w:
        assert w.location == URL and w.path == mirror_dir(URL) and str(w.path).startswith(str(home))
        lease = _lease(s3_bucket)
        assert lease["pid"] == os.getpid() and lease["host"] == socket.gethostname()
        assert lease["fenced"] is True  # S3: every write of the lease and the logs is conditional
        assert lease["expires"] > time.time() + 60
        w.append_records("candidates", "r0", *_candidates(3))
        # every commit is on the bucket as soon as append returns: a reader elsewhere sees it
        assert list(open_campaign(URL).candidates()["id"]) == ["c0", "c1", "c2"]
        with pytest.raises(StoreError, match=f"being written by pid {os.getpid()} on {socket.gethostname()}"):
            CampaignWriter(URL)
        with pytest.raises(StoreError, match="being written by pid"):
            check_not_locked(URL)  # what `matdisc run` says before starting (exit 2)
        w.append_records("candidates", "r1", *_candidates(2, start=3))
        assert w.summary()["store"] == URL
    assert _lease(s3_bucket) is None  # released on close
    check_not_locked(URL)
    back = open_campaign(URL)
    assert list(back.candidates()["id"]) == [f"c{i}" for i in range(5)]
    assert len(back.structure("c3")) == 8 and len(back.structure("c4")) == 4
    assert not s3_bucket.exists("campaigns/remote.zarr/_commits/writer.lock")  # a local file, never pushed


def test_a_dead_or_expired_writers_lease_is_taken_over_a_live_one_is_not(s3_bucket, home):
    with CampaignWriter(URL) as w:
        w.append_records("candidates", "r0", *_candidates(2))
    path = f"campaigns/remote.zarr/{LEASE}"
    # another machine's writer, alive and renewing: refused, and its lease left as it was
    live = {"owner": "x", "host": "node-7", "pid": 1, "expires": time.time() + 200}
    s3_bucket.pipe_file(path, json.dumps(live).encode())
    with pytest.raises(StoreError, match="being written by pid 1 on node-7"):
        CampaignWriter(URL)
    assert _lease(s3_bucket) == live
    # that writer stopped renewing (killed with its node): its lease has expired
    s3_bucket.pipe_file(path, json.dumps({**live, "expires": time.time() - 1}).encode())
    with CampaignWriter(URL) as w:
        assert _lease(s3_bucket)["pid"] == os.getpid()
        assert len(w.candidates()) == 2
    # a writer on this host whose process is gone (kill -9): taken over at once, unexpired or not
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    s3_bucket.pipe_file(path, json.dumps({**live, "host": socket.gethostname(), "pid": int(dead.stdout)}).encode())
    with CampaignWriter(URL) as w:
        assert _lease(s3_bucket)["owner"] == w.remote.lease.owner


def test_a_writer_that_lost_its_lease_stops_writing(s3_bucket, home):
    with pytest.raises(StoreError, match="lease was taken by pid 9 on node-2"):
        with CampaignWriter(URL) as w:
            w.append_records("candidates", "r0", *_candidates(1))
            thief = {"owner": "y", "host": "node-2", "pid": 9, "expires": time.time() + 300}
            s3_bucket.pipe_file(f"campaigns/remote.zarr/{LEASE}", json.dumps(thief).encode())
            w.remote.lease.renew()
    assert _lease(s3_bucket)["owner"] == "y"  # not deleted by the loser
    assert list(open_campaign(URL).candidates()["id"]) == ["c0"]


def test_a_push_cut_between_data_and_log_leaves_the_url_consistent_and_the_batch_is_redone(s3_bucket, home,
                                                                                          monkeypatch):
    """The crash window of a push: chunks uploaded, the commit log not. Readers of the URL see
    the previous commit only; the next writer (another machine: a fresh working copy) redoes it."""
    w = CampaignWriter(URL)  # never closed: the process dies (kill -9) inside a push
    w.append_records("candidates", "r0", *_candidates(2))
    real_put = w.remote._put_fenced

    def die_before_the_log(rels):
        if any(rel.startswith("_commits/") for rel in rels):
            raise KeyboardInterrupt  # the process is gone before the log's put
        return real_put(rels)

    monkeypatch.setattr(w.remote, "_put_fenced", die_before_the_log)
    with pytest.raises(KeyboardInterrupt):
        w.append_records("candidates", "r1", *_candidates(3, start=2))
    monkeypatch.setattr(w.remote, "_put_fenced", real_put)
    w.remote.lease.release()  # as a dead writer's lease runs out
    w.tables.close()
    assert s3_bucket.exists("campaigns/remote.zarr/candidates/id/c/0")
    assert list(open_campaign(URL).candidates()["id"]) == ["c0", "c1"]  # r1's chunks are there, not visible

    monkeypatch.setenv("MATDISC_HOME", str(home.parent / "node-b"))
    with CampaignWriter(URL) as w:
        assert not w.has_batch("candidates", "r1")
        assert w.append_records("candidates", "r1", *_candidates(3, start=2))
    back = open_campaign(URL)
    assert list(back.candidates()["id"]) == [f"c{i}" for i in range(5)]
    assert back.table("candidates")["id"].is_unique
    np.testing.assert_allclose(back.frames("candidates").cell[4], bulk("Cu", cubic=True).cell[:])


def test_pull_makes_the_working_copy_equal_the_url(s3_bucket, home):
    """What this machine committed but never pushed is dropped; models already here are kept."""
    with CampaignWriter(URL) as w:
        w.append_records("candidates", "r0", *_candidates(2))
        (w.path / "models" / "abc.model").write_bytes(b"model")
    remote = RemoteStore(URL)
    stale = remote.local / "candidates" / "stale-chunk"
    stale.write_bytes(b"x")
    remote.pull()
    assert not stale.exists() and (remote.local / "models" / "abc.model").read_bytes() == b"model"
    assert (remote.local / "_commits" / "candidates.jsonl").read_text().count("\n") == 1


def test_models_reach_a_worker_by_sha256_from_the_store_and_a_tampered_one_is_refused(s3_bucket, home, tmp_path):
    from matdisc.mlip.model import ModelError, file_sha256
    from matdisc.mlip.shipping import localize, unpack
    from matdisc.mlip.train import TrainedModel

    blob = tmp_path / "m.model"
    blob.write_bytes(os.urandom(1000))
    sha = file_sha256(blob)
    s3_bucket.put(str(blob), f"campaigns/remote.zarr/models/{sha}.model")
    missing_here = f"/nonexistent/writer/mirror/models/{sha}.model"
    got = localize([missing_here], URL)
    assert got == [str(home / "model-cache" / f"{sha}.model")] and file_sha256(got[0]) == sha
    assert localize([str(blob)], URL) == [str(blob)]  # visible here: used as it is
    other = os.urandom(1000)
    bad_sha = "0" * 64
    s3_bucket.pipe_file(f"campaigns/remote.zarr/models/{bad_sha}.model", other)
    with pytest.raises(ModelError, match="sha256 is not the one the registry recorded"):
        localize([f"/nowhere/{bad_sha}.model"], URL)
    assert not (home / "model-cache" / f"{bad_sha}.model").exists()
    with pytest.raises(ModelError, match="not in the store"):
        localize([f"/nowhere/{'1' * 64}.model"], URL)
    # a trained model comes back as bytes when the worker's file is not on the writer's machine
    shipped = TrainedModel(path=tmp_path / "elsewhere" / "member.model", mode="scratch", n_train=1, n_valid=0,
                           content=blob.read_bytes())
    (path,) = unpack([shipped], tmp_path / "received")
    assert file_sha256(path) == sha
    with pytest.raises(ModelError, match="was not shipped"):
        unpack([TrainedModel(path=tmp_path / "gone.model", mode="scratch", n_train=1, n_valid=0)], tmp_path)


def test_of_two_writers_taking_over_one_stale_lease_exactly_one_wins(s3_bucket, home):
    """Both read the expired lease; the first replaces it on the condition that it is still the
    version it read, and the second's replacement, on the same condition, is refused."""
    from matdisc.store.remote import Lease

    path = f"campaigns/remote.zarr/{LEASE}"
    s3_bucket.pipe_file(path, json.dumps({"owner": "dead", "host": "node-3", "pid": 1, "expires": time.time() - 5,
                                          "generation": 4}).encode())
    fs, root = s3_bucket, "campaigns/remote.zarr"
    a, b = Lease(fs, root, URL), Lease(fs, root, URL)
    seen_by_b = b._read()  # b reads the stale lease at the same moment as a
    a.acquire()
    b._read = lambda: seen_by_b  # noqa: SLF001  (b acts on what it read before a's takeover)
    try:
        with pytest.raises(StoreError, match="another writer took the stale writer lease first"):
            b.acquire()
        assert _lease(s3_bucket)["owner"] == a.owner and a.generation == 5  # one above the lease it replaced
    finally:
        a.release()


def test_a_writer_paused_past_its_lease_cannot_write_over_the_writer_that_took_it(s3_bucket, home, tmp_path):
    """The fault of a Slurm suspend or a laptop's sleep: writer A is stopped (SIGSTOP) holding the
    lease, the lease expires, writer B takes it over and commits; A is continued and commits too.
    A's commit is refused with one line and the URL holds A's first batch and B's, nothing of A's
    second: no stale writer commit is accepted."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "writer_a.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_remote_store import URL, _candidates\n"
        "from matdisc.store import CampaignWriter\n"
        "w = CampaignWriter(URL)\n"
        "w.append_records('candidates', 'a0', *_candidates(2))\n"
        "print('committed', flush=True)\n"
        "sys.stdin.readline()\n"
        "try:\n"
        "    w.append_records('candidates', 'a1', *_candidates(2, start=10))\n"
        "    print('a1 accepted', flush=True)\n"
        "except Exception as err:\n"
        "    print('refused:', err, flush=True)\n"
    )
    env = {**os.environ, "MATDISC_LEASE_SECONDS": "3", "MATDISC_HOME": str(home / "node-a")}
    a = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert a.stdout.readline().strip() == "committed", a.stderr.read() if a.poll() is not None else ""
        os.kill(a.pid, signal.SIGSTOP)
        time.sleep(4)  # A's lease (3 s) runs out: A cannot renew while stopped
        with CampaignWriter(URL) as b:  # another node
            assert b.remote.lease.generation == 1
            b.append_records("candidates", "b0", *_candidates(3, start=20))
            os.kill(a.pid, signal.SIGCONT)
            a.stdin.write("go\n")
            a.stdin.flush()
            out = a.stdout.readline().strip()
            assert out.startswith("refused:") and "lease" in out, out
            b.append_records("candidates", "b1", *_candidates(1, start=30))
    finally:
        os.kill(a.pid, signal.SIGCONT)
        a.kill()
        a.wait()
    ids = list(open_campaign(URL).candidates()["id"])
    assert ids == ["c0", "c1", "c20", "c21", "c22", "c30"]  # A's first batch, B's two, none of A's second
    commits = [json.loads(line) for line in s3_bucket.cat_file(
        "campaigns/remote.zarr/_commits/candidates.jsonl").decode().splitlines()]
    assert [(c["key"], c["generation"]) for c in commits] == [("a0", 0), ("b0", 1), ("b1", 1)]


def test_a_model_this_machine_has_but_the_url_lacks_is_pushed_by_the_next_writer(s3_bucket, home):
    """A writer that copied a model into its working copy and died before pushing it: the next
    writer on this machine keeps the local file (models are content-addressed) and, since the URL
    lacks it, uploads it with its first commit, before the log that could name it."""
    with CampaignWriter(URL) as w:
        w.append_records("candidates", "r0", *_candidates(1))
        (w.path / "models" / "abc.model").write_bytes(b"model")
    s3_bucket.rm_file("campaigns/remote.zarr/models/abc.model")  # as if the push never happened
    with CampaignWriter(URL) as w:
        assert (w.path / "models" / "abc.model").is_file()
        w.append_records("candidates", "r1", *_candidates(1, start=1))
    s3_bucket.invalidate_cache()
    assert s3_bucket.cat_file("campaigns/remote.zarr/models/abc.model") == b"model"


def test_a_store_without_conditional_writes_says_so_and_records_it(home, caplog):
    """An fsspec store matdisc cannot fence (here the in-memory filesystem, as gs:// or az://): the
    writer warns when it opens it and its lease records ``fenced: false``; it still writes."""
    import fsspec

    url = "memory://campaigns/unfenced.zarr"
    with caplog.at_level("WARNING", logger="matdisc.store"):
        with CampaignWriter(url) as w:
            lease = json.loads(fsspec.filesystem("memory").cat_file(f"/campaigns/unfenced.zarr/{LEASE}"))
            w.append_records("candidates", "r0", *_candidates(2))
    assert lease["fenced"] is False
    assert any("no conditional writes" in r.getMessage() for r in caplog.records)
    assert list(open_campaign(url).candidates()["id"]) == ["c0", "c1"]


def test_a_writer_paused_inside_its_upload_cannot_replace_a_table_file_the_new_writer_wrote(s3_bucket, home,
                                                                                            monkeypatch):
    """The window the lease checks leave: writer A renewed and checked its lease, then was paused
    in the middle of its upload past its lease; B took the store over and committed. When A goes
    on, each table file is put only over the version A last saw, so the first file B rewrote
    refuses it: A stops, and every file B left on the URL is as B left it."""
    from matdisc.store import remote

    monkeypatch.setattr(remote, "LEASE_SECONDS", 2.0)
    monkeypatch.setenv("MATDISC_HOME", str(home / "node-a"))
    a = CampaignWriter(URL)
    try:
        a.append_records("candidates", "a0", *_candidates(2))
        lease = a.remote.lease
        lease._stop.set()  # noqa: SLF001 - A is paused: no renewals from here
        lease._thread.join()  # noqa: SLF001
        # the pause came after A's renewal and check for its next push: they pass as they did then
        monkeypatch.setattr(lease, "renew", lambda: None)
        monkeypatch.setattr(lease, "check", lambda: None)
        time.sleep(2.5)
        monkeypatch.setenv("MATDISC_HOME", str(home / "node-b"))
        with CampaignWriter(URL) as b:
            assert b.remote.lease.generation == 1
            b.append_records("candidates", "b0", *_candidates(3, start=20))
        s3_bucket.invalidate_cache()
        left_by_b = {p: s3_bucket.cat_file(p) for p in s3_bucket.find("campaigns/remote.zarr")}
        with pytest.raises(StoreError, match="was changed by another writer"):
            a.append_records("candidates", "a1", *_candidates(2, start=10))
    finally:
        a.close()
    s3_bucket.invalidate_cache()
    assert {p: s3_bucket.cat_file(p) for p in left_by_b} == left_by_b
    store = open_campaign(URL)
    assert list(store.candidates()["id"]) == ["c0", "c1", "c20", "c21", "c22"]
    frames = store.frames("candidates")
    assert [len(frames.atoms(i)) for i in range(len(frames))] == [4, 8, 4, 8, 4]
