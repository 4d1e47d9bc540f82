"""Writing a campaign store that lives at an fsspec URL (``s3://``, ``gs://``, ...).

An object store has no append and no ``flock``, so the writer works on a local working
copy and keeps the URL the truth:

- **Lease, not lock.** ``_commits/writer.lease`` names the writer (host, pid, expiry). It is
  created with an exclusive put (S3 ``If-None-Match: *``), renewed by a background thread,
  and deleted on close. A second writer fails fast with the holder's name; a lease whose
  writer died (expired, or the same host and its pid gone) is taken over.
- **Pull on open.** The tables and commit logs are downloaded into a fresh working copy under
  ``$MATDISC_HOME/mirrors``; models are content-addressed and kept when already there.
- **Push after every commit.** Changed files are uploaded first, the changed commit logs last,
  each as one whole-object put. Readers bound what they read by the logs, so the URL always
  holds a consistent store, and a writer killed between the two leaves only rows no log covers:
  the batch is redone by the next run, exactly as on a local disk.

Calculation directories are pushed as they appear (DFT logs are provenance) but never pulled:
a resumed run redoes its calculations in fresh ones. ``training/`` (MACE run directories) stays
local scratch; the trained models themselves are in ``models/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from matdisc.errors import StoreError
from matdisc.locations import store_name
from matdisc.store.tables import url_filesystem

LEASE = "_commits/writer.lease"
#: A lease not renewed for this long belongs to a dead writer. Renewed every third of it.
LEASE_SECONDS = 300.0
#: Working-copy directories that are not store state: pushed as provenance (``calculations``) or
#: kept local (``training``), never pulled.
SCRATCH = ("calculations", "training")
NOT_PUSHED = ("training",)
_LOCAL_ONLY = ("_commits/writer.lock", LEASE)


def mirror_dir(url: str) -> Path:
    """This machine's working copy of the store at ``url``."""
    from matdisc.locations import matdisc_home as home

    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:12]
    return home() / "mirrors" / f"{store_name(url)}-{digest}.zarr"


def _holder_text(lease: dict[str, Any]) -> str:
    left = float(lease.get("expires", 0)) - time.time()
    return f"pid {lease.get('pid')} on {lease.get('host')} (lease expires in {max(left, 0):.0f} s)"


def _is_stale(lease: dict[str, Any]) -> bool:
    """A lease whose writer cannot be writing: expired, or on this host with its process gone."""
    if float(lease.get("expires", 0)) < time.time():
        return True
    if lease.get("host") == socket.gethostname():
        try:
            os.kill(int(lease.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError):
            return False
    return False


class Lease:
    """The single-writer lease of a store at a URL (see the module docstring)."""

    def __init__(self, fs: Any, root: str, url: str, seconds: float = LEASE_SECONDS):
        self.fs, self.path, self.url, self.seconds = fs, f"{root}/{LEASE}", url, seconds
        self.owner = uuid.uuid4().hex
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "expires": time.time() + self.seconds,
            }
        ).encode()

    def read(self) -> dict[str, Any] | None:
        try:
            self.fs.invalidate_cache()
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: nobody holds it
            return {}

    def acquire(self) -> None:
        for attempt in range(2):
            try:
                self.fs.pipe_file(self.path, self._record(), mode="create")
            except FileExistsError:
                held = self.read()
                if held is None or (attempt == 0 and _is_stale(held)):
                    if held is not None:
                        self.fs.rm_file(self.path)
                    continue
                raise StoreError(
                    f"store {self.url} is being written by {_holder_text(held or {})}; wait for it or stop it"
                ) from None
            if (self.read() or {}).get("owner") != self.owner:  # a racing writer replaced it
                raise StoreError(f"store {self.url}: another writer took the lease while this one started")
            self._thread = threading.Thread(target=self._renew_loop, name="matdisc-lease", daemon=True)
            self._thread.start()
            return
        raise StoreError(f"store {self.url}: could not take the writer lease")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew()
            except StoreError:
                return
            except OSError:  # transient: the next renewal tries again before the lease runs out
                continue

    def renew(self) -> None:
        held = self.read()
        if not held or held.get("owner") != self.owner:
            self.lost = f"store {self.url}: the writer lease was taken by {_holder_text(held or {})}"
            raise StoreError(self.lost)
        self.fs.pipe_file(self.path, self._record())

    def check(self) -> None:
        if self.lost:
            raise StoreError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.lost and (self.read() or {}).get("owner") == self.owner:
            self.fs.rm_file(self.path)


def check_not_leased(url: str) -> None:
    """Raise :class:`StoreError` if a live writer holds the store at ``url`` (creates nothing)."""
    fs, root = url_filesystem(url)
    held = Lease(fs, root, url).read()
    if held and not _is_stale(held):
        raise StoreError(f"store {url} is being written by {_holder_text(held)}; wait for it or stop it")


class RemoteStore:
    """A local working copy of the store at ``url``: leased and pulled on :meth:`open`, pushed
    after every commit (:meth:`push`), lease released on :meth:`close`."""

    def __init__(self, url: str, local: Path | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = url_filesystem(self.url)
        self.local = local or mirror_dir(self.url)
        self.lease = Lease(self.fs, self.root, self.url)
        self._pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) last uploaded

    def open(self) -> Path:
        try:
            self.lease.acquire()
        except OSError as err:  # no bucket, no access, endpoint down
            raise StoreError(f"cannot write the campaign store at {self.url}: {err}") from None
        try:
            self.pull()
        except BaseException:
            self.lease.release()
            raise
        return self.local

    # -- pull -------------------------------------------------------------------------
    def _remote_files(self) -> dict[str, int]:
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.root.rstrip("/") + "/"
        files = {}
        for path, info in found.items():
            rel = path.removeprefix(prefix)
            if info.get("type", "file") == "file" and rel not in _LOCAL_ONLY and rel.split("/", 1)[0] not in SCRATCH:
                files[rel] = int(info.get("size") or 0)
        return files

    def pull(self) -> None:
        """Make the working copy equal the URL's store (the URL is the truth: what this machine
        committed but never pushed is dropped and redone)."""
        self.local.mkdir(parents=True, exist_ok=True)
        for entry in self.local.iterdir():  # everything but content-addressed models and scratch
            if entry.name in ("models", *SCRATCH):
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        wanted = [
            rel
            for rel, size in self._remote_files().items()
            if not (
                rel.startswith("models/") and (self.local / rel).is_file() and (self.local / rel).stat().st_size == size
            )
        ]
        if wanted:
            for rel in wanted:
                (self.local / rel).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get([f"{self.root}/{rel}" for rel in wanted], [str(self.local / rel) for rel in wanted])
        self._pushed = self._local_files()

    # -- push -------------------------------------------------------------------------
    def _local_files(self) -> dict[str, tuple[int, int]]:
        files = {}
        for dirpath, _dirnames, filenames in os.walk(self.local):
            rel_dir = os.path.relpath(dirpath, self.local)
            top = rel_dir.split(os.sep, 1)[0]
            for name in filenames:
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                if rel in _LOCAL_ONLY or name.endswith(".partial") or (top in NOT_PUSHED and rel != f"{top}/zarr.json"):
                    continue
                st = os.stat(os.path.join(dirpath, name))
                files[rel] = (st.st_size, st.st_mtime_ns)
        return files

    def push(self) -> None:
        """Upload what changed since the last push: data first, commit logs last."""
        self.lease.check()
        now = self._local_files()
        changed = [rel for rel, stamp in now.items() if self._pushed.get(rel) != stamp]
        logs = [rel for rel in changed if rel.startswith("_commits/")]
        data = [rel for rel in changed if not rel.startswith("_commits/")]
        for batch in (data, logs):
            if batch:
                self.fs.put([str(self.local / rel) for rel in batch], [f"{self.root}/{rel}" for rel in batch])
        gone = [rel for rel in self._pushed if rel not in now]
        if gone:
            self.fs.rm([f"{self.root}/{rel}" for rel in gone])
        self._pushed = now

    def close(self) -> None:
        try:
            if not self.lease.lost:
                self.push()
        finally:
            self.lease.release()
