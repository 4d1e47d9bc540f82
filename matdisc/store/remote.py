"""Writing a campaign store that lives at an fsspec URL (``s3://``, ``gs://``, ...).

An object store has no append and no ``flock``, so the writer works on a local working
copy and keeps the URL the truth:

- **Lease, not lock.** ``_commits/writer.lease`` names the writer (host, pid, expiry, and a
  generation one above the lease it replaced). It is created with an exclusive put (S3
  ``If-None-Match: *``), renewed by a background thread, and deleted on close. A second writer
  fails fast with the holder's name; a lease whose writer died (expired, or the same host and
  its pid gone) is taken over.
- **Fenced.** Every write of the lease is conditional on the version this writer last saw
  (S3 ``If-Match`` on the ETag): of two writers taking over one stale lease exactly one wins,
  and a writer whose lease was taken cannot renew it. Every push first renews the lease (so a
  writer paused past its lease, by Slurm suspend or a laptop's sleep, finds out before it
  writes), stops when its renewal is older than half the lease, and puts every table file and
  commit log on the condition that the URL still has the version this writer last saw or wrote
  (a new one only if absent): a writer paused even in the middle of an upload, after its lease
  check, cannot replace one file the new writer wrote; its commit is refused, never merged over
  the new writer's. Models are content-addressed (a name is its bytes' sha256) and calculation
  folders are provenance, so neither needs the condition. Each commit line records the
  writer's generation.
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

import asyncio
import hashlib
import json
import logging
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
LEASE_SECONDS = float(os.environ.get("MATDISC_LEASE_SECONDS", "300"))
#: Working-copy directories that are not store state: pushed as provenance (``calculations``) or
#: kept local (``training``), never pulled.
SCRATCH = ("calculations", "training")
NOT_PUSHED = ("training",)
_LOCAL_ONLY = ("_commits/writer.lock", LEASE)
#: Conditional puts in flight at once (one per file: a batch's chunks go up together).
PUT_CONCURRENCY = 16


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


def _uptime() -> float:
    """Seconds on a clock that keeps counting while the machine sleeps or the process is stopped."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


class Lease:
    """The single-writer lease of a store at a URL (see the module docstring)."""

    def __init__(self, fs: Any, root: str, url: str, seconds: float | None = None):
        self.fs, self.path, self.url = fs, f"{root}/{LEASE}", url
        self.seconds = seconds if seconds is not None else LEASE_SECONDS
        self.owner = uuid.uuid4().hex
        self.generation = 0
        self.lost: str | None = None
        self.etag: str | None = None  # the lease object's version this writer last wrote
        self.renewed = -float("inf")  # _uptime() of the last successful write of the lease
        self.fenced = conditional_writes(fs)
        self._lock = threading.Lock()  # the renewal thread and a push renew the same lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "expires": time.time() + self.seconds,
                "generation": self.generation,
                "fenced": self.fenced,  # whether its writes are conditional (S3), or not (other stores)
            }
        ).encode()

    def read(self) -> dict[str, Any] | None:
        return self._read()[0]

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """(the lease, the version it was read at): the version first, so a change in between makes
        a conditional write on it fail rather than succeed on content not seen."""
        try:
            self.fs.invalidate_cache()
            etag = self.fs.info(self.path).get("ETag") if self.fenced else None
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(data), etag
        except ValueError:  # a torn or foreign file: nobody holds it
            return {}, etag

    def _put(self, *, create: bool = False, over: str | None = None) -> None:
        """Write this writer's lease: ``create`` only if there is none (FileExistsError otherwise);
        else, where writes are fenced, only over the version ``over`` (PermissionError if it changed)."""
        data = self._record()
        if create:
            out = self.fs.pipe_file(self.path, data, mode="create")
        elif self.fenced:
            try:
                out = self.fs.pipe_file(self.path, data, IfMatch=over)
            except OSError as err:
                if precondition_failed(err):
                    raise PermissionError(f"the lease of {self.url} changed") from None
                raise
        else:
            out = self.fs.pipe_file(self.path, data)
        self.etag = out.get("ETag") if isinstance(out, dict) else None
        self.renewed = _uptime()

    def acquire(self) -> None:
        for attempt in range(2):
            try:
                self._put(create=True)
            except FileExistsError:
                held, etag = self._read()
                if held is not None and attempt == 0 and _is_stale(held):
                    self.generation = int(held.get("generation", 0)) + 1
                    try:  # taken over only if nobody changed it since it was read: one taker wins
                        self._put(over=etag)
                    except PermissionError:
                        raise StoreError(
                            f"store {self.url}: another writer took the stale writer lease first"
                        ) from None
                    return self._started()
                if held is None:
                    continue
                raise StoreError(
                    f"store {self.url} is being written by {_holder_text(held or {})}; wait for it or stop it"
                ) from None
            return self._started()
        raise StoreError(f"store {self.url}: could not take the writer lease")

    def _started(self) -> None:
        if (self.read() or {}).get("owner") != self.owner:  # a racing writer replaced it (unfenced stores)
            raise StoreError(f"store {self.url}: another writer took the lease while this one started")
        self._thread = threading.Thread(target=self._renew_loop, name="matdisc-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew()
            except StoreError:
                return
            except OSError:  # transient: the next renewal tries again before the lease runs out
                continue

    def renew(self) -> None:
        """Write the lease again with a new expiry: where writes are fenced, one conditional put (it
        fails if anyone else wrote it); elsewhere read first, the only check there is."""
        with self._lock:
            if self.lost:
                raise StoreError(self.lost)
            if not self.fenced:
                held = self.read()
                if not held or held.get("owner") != self.owner:
                    self._lose(held)
            try:
                self._put(over=self.etag)
            except PermissionError:
                self._lose(self.read())

    def _lose(self, holder: dict[str, Any] | None) -> None:
        self.lost = f"store {self.url}: the writer lease was taken by {_holder_text(holder or {})}"
        raise StoreError(self.lost)

    def check(self) -> None:
        """Refuse to write once the lease is lost or this writer cannot know it still holds it: its
        last renewal is older than half the lease (it was paused), so another may have taken it."""
        if self.lost:
            raise StoreError(self.lost)
        age = _uptime() - self.renewed
        if age > self.seconds / 2:
            self.lost = (
                f"store {self.url}: the writer lease was last renewed {age:.0f} s ago (this process was paused?); "
                "another writer may hold it now, so this one stops"
            )
            raise StoreError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.lost and (self.read() or {}).get("owner") == self.owner:
            self.fs.rm_file(self.path)


def _fenced_file(rel: str) -> bool:
    """Store state whose every put is conditional: the tables' files and the commit logs (not the
    content-addressed models, not provenance)."""
    return rel.split("/", 1)[0] not in ("models", *SCRATCH) and rel not in _LOCAL_ONLY


def precondition_failed(err: OSError) -> bool:
    """Whether a conditional put was refused because the object changed (HTTP 412)."""
    text = str(err)
    return "pre-condition" in text or "PreconditionFailed" in text or "412" in text


def conditional_writes(fs: Any) -> bool:
    """Whether matdisc fences writes to this filesystem with conditional puts (S3's ``If-Match``)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("s3", "s3a")


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
        self._etags: dict[str, str] = {}  # table file or commit log -> the version this writer last saw or wrote
        if not self.lease.fenced:
            logging.getLogger("matdisc.store").warning(
                "store %s: %s has no conditional writes matdisc uses, so a writer paused past its lease could "
                "still overwrite a newer writer's commits (S3 stores are fenced)",
                self.url,
                self.fs.protocol,
            )

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
        self._etags = {}
        for path, info in found.items():
            rel = path.removeprefix(prefix)
            if info.get("type", "file") == "file" and rel not in _LOCAL_ONLY and rel.split("/", 1)[0] not in SCRATCH:
                files[rel] = int(info.get("size") or 0)
                if _fenced_file(rel) and info.get("ETag"):
                    self._etags[rel] = str(info["ETag"])
        return files

    def pull(self) -> None:
        """Make the working copy equal the URL's store (the URL is the truth: what this machine
        committed but never pushed is dropped and redone)."""
        self.local.mkdir(parents=True, exist_ok=True)
        for entry in self.local.iterdir():  # everything but content-addressed models and scratch
            if entry.name in ("models", *SCRATCH):
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        remote = self._remote_files()
        wanted = [
            rel
            for rel, size in remote.items()
            if not (
                rel.startswith("models/") and (self.local / rel).is_file() and (self.local / rel).stat().st_size == size
            )
        ]
        if wanted:
            for rel in wanted:
                (self.local / rel).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get([f"{self.root}/{rel}" for rel in wanted], [str(self.local / rel) for rel in wanted])
        # pushed = what the URL has: a model kept here that the URL lacks goes up with the next push
        self._pushed = {rel: stamp for rel, stamp in self._local_files().items() if remote.get(rel) == stamp[0]}

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
        """Upload what changed since the last push: data first (models before the rows that name
        them), commit logs last, table files and logs each on the condition that the URL still has
        the version this writer last saw or wrote; the lease is renewed first and checked again
        before the logs."""
        self.lease.renew()  # a writer paused past its lease finds out here, before it writes
        now = self._local_files()
        changed = [rel for rel, stamp in now.items() if self._pushed.get(rel) != stamp]
        logs = [rel for rel in changed if rel.startswith("_commits/")]
        data = [rel for rel in changed if not rel.startswith("_commits/")]
        fenced: list[str] = []
        plain: list[str] = []
        for rel in data:
            (fenced if self.lease.fenced and _fenced_file(rel) else plain).append(rel)
        self.lease.check()
        if plain:
            self.fs.put([str(self.local / rel) for rel in plain], [f"{self.root}/{rel}" for rel in plain])
        self._put_fenced(fenced)
        self.lease.check()
        for rel in logs:
            self._put_fenced([rel])
        gone = [rel for rel in self._pushed if rel not in now]
        if gone:
            self.fs.rm([f"{self.root}/{rel}" for rel in gone])
        self._pushed = now

    def _put_fenced(self, rels: list[str]) -> None:
        """Put each file only over the version this writer last saw or wrote (a new one only if
        absent), concurrently; any refused means another writer took the store: this one stops."""
        if not rels:
            return
        if not self.lease.fenced:
            for rel in rels:
                self.fs.pipe_file(f"{self.root}/{rel}", (self.local / rel).read_bytes())
            return
        from fsspec.asyn import sync

        async def put(rel: str, limit: asyncio.Semaphore) -> Any:
            condition = {"IfMatch": self._etags[rel]} if rel in self._etags else {"mode": "create"}
            async with limit:
                return await self.fs._pipe_file(f"{self.root}/{rel}", (self.local / rel).read_bytes(), **condition)

        async def put_all() -> list[Any]:
            limit = asyncio.Semaphore(PUT_CONCURRENCY)
            return await asyncio.gather(*(put(rel, limit) for rel in rels), return_exceptions=True)

        outcomes = sync(self.fs.loop, put_all)
        refused = [
            rel
            for rel, out in zip(rels, outcomes)
            if isinstance(out, FileExistsError) or (isinstance(out, OSError) and precondition_failed(out))
        ]
        for rel, out in zip(rels, outcomes):
            if not isinstance(out, BaseException):
                self._etags[rel] = str(out["ETag"])
        if refused:
            self.lease.lost = f"store {self.url}: {refused[0]} was changed by another writer; this one stops"
            raise StoreError(self.lease.lost)
        failed = [out for out in outcomes if isinstance(out, BaseException)]
        if failed:
            raise failed[0]

    def close(self) -> None:
        try:
            if not self.lease.lost:
                self.push()
        finally:
            self.lease.release()
