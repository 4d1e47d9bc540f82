"""Append-only tables in a Zarr v3 group, with batches that commit atomically.

Layout of a table ``T`` inside the store directory::

    T/<column>            one array per column, first dimension = rows
    T/numbers, positions  per-atom arrays (ragged structures), when the table holds structures
    T/forces              per-atom forces, when given
    T/cell, pbc, offsets  per-structure arrays; offsets has rows + 1 entries
    _commits/T.jsonl      the commit log: one JSON line per complete batch

Crash safety: a batch first grows and fills every array, and only then appends its line
to the commit log. Readers see only the rows the log covers, so a batch cut short by an
exception or ``kill -9`` is invisible; the next writer truncates the arrays back to the
log and the batch is redone. Every key (chunk or metadata) is written with zarr's
atomic LocalStore writes (temporary file + rename), so rewriting a chunk that already
holds committed rows never exposes a torn chunk. A torn last line of the log (no newline)
is ignored and removed by the next writer.

Why one writer: the orchestrating process owns the store and the workers return results
to it. Appends are then sequential, batches are contiguous, and the log is a plain
high-water mark; an exclusive ``flock`` on ``_commits/writer.lock`` makes a second writer fail fast
instead of interleaving. Workers never open the store for writing.

Reading also works from any fsspec URL (``s3://``, ``gs://``, ``https://``, ``memory://``):
a notebook can analyse a store that lives on an object store. A ``TableStore`` writes only on a
filesystem (``file://`` URLs are local paths): the log is appended and locked in place. Writing
a store at a URL goes through a local working copy (:mod:`matdisc.store.remote`), which calls
``on_commit`` to push every commit.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import zarr
from numpy.typing import DTypeLike
from zarr.codecs import BloscCodec
from zarr.storage import FsspecStore, LocalStore

from matdisc.errors import StoreError, UserError
from matdisc.locations import as_location, local_path, store_name, store_url  # noqa: F401 (re-exported)
from matdisc.store.frames import Frames

ROW_CHUNK = 8192
ATOM_CHUNK = 65536
_FLOAT_CODEC = (BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"),)
_INT_CODEC = (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),)
_STRUCTURE_ARRAYS = ("numbers", "positions", "forces", "cell", "pbc", "offsets")
#: Forces are stored as float32: 1e-7 relative precision is far below any DFT or MLIP
#: force error, and it keeps the store under 40 bytes/atom. Everything else is exact.
_STORED_DTYPES = {"forces": np.float32, "numbers": np.int16}
#: Sub-groups of the store root that hold files, not tables.
#: The layout version this matdisc writes (the root attribute ``matdisc_store_format``, set when a
#: store is created); it reads every version up to it, and refuses a store of a later one, which
#: it could misread. A store without the attribute is format 1.
STORE_FORMAT = 1
FORMAT_ATTR = "matdisc_store_format"


def check_format(attributes: Mapping[str, Any], where: object) -> None:
    """Raise :class:`StoreError` for a store written in a format this matdisc does not know."""
    found = attributes.get(FORMAT_ATTR, 1)
    if not isinstance(found, int) or found > STORE_FORMAT:
        raise StoreError(
            f"{where} was written by a newer matdisc (store format {found}; this one reads up to {STORE_FORMAT}): "
            "upgrade matdisc to open it"
        )


def _local_attributes(path: Path) -> dict[str, Any]:
    """The root attributes of a local store (empty when there is none, or it cannot be parsed)."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta.get("attributes", {}) if isinstance(meta, dict) else {}


SIDE_GROUPS = ("_commits", "models", "calculations", "training")


@dataclass(frozen=True)
class Commit:
    """One committed batch: its key and the half-open row and atom ranges it added.

    ``together``: the batches of other tables committed with this one (``(table, Commit)``); the
    line of this commit is the one that decides, and a writer that was cut off before writing
    theirs writes them when the store is next opened for writing (:meth:`TableStore.append_together`).
    """

    key: str
    rows: tuple[int, int]
    atoms: tuple[int, int]
    together: tuple[tuple[str, Commit], ...] = ()

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"key": self.key, "rows": list(self.rows), "atoms": list(self.atoms)}
        if self.together:
            rec["together"] = [{"table": t, **c.record()} for t, c in self.together]
        return rec

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Commit:
        together = tuple((str(o["table"]), cls.from_record(o)) for o in rec.get("together", ()))
        return cls(rec["key"], tuple(rec["rows"]), tuple(rec["atoms"]), together)


class Batch(NamedTuple):
    """One table's part of an append: ``columns`` (equal lengths) and, for a table of structures,
    one frame per row."""

    table: str
    key: str
    columns: Mapping[str, Any]
    frames: Frames | None = None
    row_dim: str = "row"


def url_filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, the store's path on it) of a store URL; :class:`StoreError` when the
    protocol has no driver installed or the URL is malformed."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise StoreError(f"cannot open the campaign store at {url}: {err}") from None


def store_exists(location: str | Path) -> bool:
    """Whether a campaign store is at ``location`` (a path or an fsspec URL)."""
    url = store_url(location)
    if url is None:
        return (local_path(location) / "zarr.json").exists()
    fs, root = url_filesystem(url)
    try:
        return bool(fs.exists(f"{root}/zarr.json"))
    except OSError as err:  # no access, endpoint down
        raise StoreError(f"cannot read the campaign store at {url}: {err}") from None


def _read_log(path: Path) -> tuple[list[Commit], int]:
    """Valid commits, and the byte length of the valid prefix (a torn tail is excluded)."""
    return _parse_log(path.read_bytes() if path.exists() else b"")


def _parse_log(data: bytes) -> tuple[list[Commit], int]:
    commits: list[Commit] = []
    good = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            commits.append(Commit.from_record(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            break
        good += len(line)
    return commits, good


def _column_array(values: Any) -> np.ndarray:
    """Normalise a column to the dtype it is stored with."""
    arr = np.asarray(values)
    if arr.dtype.kind in "OUS":
        return np.array(["" if v is None else str(v) for v in arr.ravel()], dtype=object).reshape(arr.shape)
    if arr.dtype.kind == "f":
        return arr.astype(np.float64)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind == "b":
        return arr
    raise TypeError(f"unsupported column dtype {arr.dtype}")


def fill_value(dtype: DTypeLike) -> Any:
    """What a row that lacks a column holds: NaN, -1 (ints: "not recorded"), False or ""."""
    kind = np.dtype(dtype).kind if dtype is not str else "O"
    return {"f": np.nan, "i": -1, "u": 0, "b": False}.get(kind, "")


def _locked_message(path: Path, holder: str) -> str:
    return f"store {path} is being written by {holder}; wait for it or stop it"


def check_store_location(path: str | Path) -> None:
    """Raise :class:`StoreError` when a local store path cannot hold a store, before anything is
    written: it is a file, lies under a file, or is a non-empty folder that is not a campaign store
    (which a run would otherwise write into)."""
    if store_url(path) is not None:
        return
    p = local_path(path)
    where = _file_at_or_above(p)
    if where:
        raise StoreError(f"store: {p} {where}, not a folder a campaign store can live in")
    if p.is_dir() and any(p.iterdir()) and not (p / "_commits").is_dir():
        raise StoreError(f"store: {p} is a non-empty folder that is not a campaign store; choose a new path")
    check_format(_local_attributes(p), f"store: {p}")


def check_output_dir(path: Path, what: str) -> None:
    """Raise :class:`UserError` when ``path`` cannot be a folder to write into (it, or a folder
    above it, is a file), before anything is written."""
    where = _file_at_or_above(path)
    if where:
        raise UserError(f"{what}: {path} {where}, not a folder to write into")


def _file_at_or_above(path: Path) -> str | None:
    """How a file stands in the way of a folder at ``path`` ("is a file", "lies under the file
    X"), or None when the nearest existing path is a folder."""
    for parent in [path, *path.parents]:
        if parent.exists():
            if parent.is_dir():
                return None
            return "is a file" if parent == path else f"lies under the file {parent}"
    return None


def check_not_locked(path: str | Path) -> None:
    """Raise :class:`StoreError` if a writer holds the store; creates nothing (a store that
    does not exist yet is not locked). A store at a URL: whether a live writer holds its lease."""
    url = store_url(path)
    if url is not None:
        from matdisc.store.remote import check_not_leased

        check_not_leased(url)
        return
    lock = local_path(path) / "_commits" / "writer.lock"
    if not lock.exists():
        return
    fd = os.open(lock, os.O_RDONLY)
    try:
        _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, Path(path))
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
        raise StoreError(_locked_message(Path(path), holder)) from None
    finally:
        os.close(fd)


def _flock(fd: int, operation: int, store: Path) -> None:
    """``flock``, with a filesystem that has no locks (NFS without lockd, Lustre mounted without
    ``flock``) said in one line: the single-writer guarantee cannot be kept there."""
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        raise
    except OSError as err:
        raise StoreError(
            f"{store}: the filesystem gives no file locks ({err.strerror or err}), so a second writer could not be "
            "kept out; put the store on a local disk or a filesystem mounted with locks (Lustre: 'flock'), "
            "or use an object-store URL"
        ) from None


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a file created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SyncedStore(LocalStore):
    """Zarr's LocalStore, remembering the files it writes so that a commit can fsync them (and
    the directories they were created in) before its line in the commit log."""

    def __init__(self, root: Path | str, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self.written: set[Path] = set()
        self.new_in: set[Path] = set()  # directories that got a new entry

    async def _set(self, key: str, value: Any, exclusive: bool = False) -> None:
        path = Path(self.root) / key
        if not path.exists():
            self.new_in.update(p for p in path.parents if p == Path(self.root) or Path(self.root) in p.parents)
        await super()._set(key, value, exclusive=exclusive)
        self.written.add(path)

    def sync(self) -> None:
        for path in sorted(self.written):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for d in sorted(self.new_in, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)
        self.written.clear()
        self.new_in.clear()


class TableStore:
    """The tables of one store directory: committed reads, and (with ``write=True``) appends."""

    def __init__(self, path: str | Path, *, write: bool = False, on_commit: Callable[[], None] | None = None):
        url = store_url(path)
        self.path: Path | str = url or local_path(path)
        self.write = write
        self.on_commit = on_commit
        self._lock_fd: int | None = None
        self.generation: int | None = None  # the writer lease's generation (stores at a URL)
        self._logs: dict[str, list[Commit]] = {}
        self._fs = None  # the fsspec filesystem of a URL store (``_fs_root``: the store's path on it)
        if url is not None:
            self._open_url(url)
        elif write:
            new = not (self._dir / "zarr.json").exists()
            check_format(_local_attributes(self._dir), self._dir)  # before the lock file is written
            where = _file_at_or_above(self._dir)
            if where:
                raise StoreError(f"store: {self._dir} {where}, not a folder a campaign store can live in")
            self._dir.mkdir(parents=True, exist_ok=True)
            self._acquire_lock()
            self._store = SyncedStore(self._dir)
            self.root = zarr.open_group(store=self._store, mode="a", zarr_format=3)
            if new:
                self.root.attrs[FORMAT_ATTR] = STORE_FORMAT
            for side in SIDE_GROUPS:  # zarr groups, so zarr and xarray see known nodes only
                if side not in self.root:
                    self.root.create_group(side, attributes={"matdisc": "files, not arrays"})
            self._repair()
        else:
            if not (self._dir / "zarr.json").exists():
                raise StoreError(f"{self.path} is not a campaign store (no zarr.json)")
            self.root = zarr.open_group(store=LocalStore(self._dir, read_only=True), mode="r", zarr_format=3)
            check_format(self.root.attrs, self.path)

    @property
    def _dir(self) -> Path:
        """The store's directory: local stores only (a URL store is read through fsspec)."""
        assert isinstance(self.path, Path), f"{self.path} is not a local store"
        return self.path

    def _group(self, table: str) -> zarr.Group:
        node = self.root[table]
        assert isinstance(node, zarr.Group), f"{table} is not a table"
        return node

    def _open_url(self, url: str) -> None:
        if self.write:
            raise StoreError(
                f"{url}: tables are written on a filesystem; a store at a URL is "
                "written through CampaignWriter's working copy"
            )
        if not store_exists(url):
            raise StoreError(f"{url} is not a campaign store (no zarr.json)")
        self._fs, self._fs_root = url_filesystem(url)
        self.root = zarr.open_group(store=FsspecStore.from_url(url, read_only=True), mode="r", zarr_format=3)
        check_format(self.root.attrs, url)

    # -- locking -----------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        (self._dir / "_commits").mkdir(parents=True, exist_ok=True)
        fd = os.open(self._dir / "_commits" / "writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, self._dir)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StoreError(_locked_message(self._dir, holder)) from None
        except StoreError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> TableStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commit log ----------------------------------------------------------------------
    def _log_path(self, table: str) -> Path:
        return self._dir / "_commits" / f"{table}.jsonl"

    def commits(self, table: str) -> list[Commit]:
        if table not in self._logs or not self.write:
            if self._fs is not None:
                try:
                    data = self._fs.cat_file(f"{self._fs_root}/_commits/{table}.jsonl")
                except FileNotFoundError:
                    data = b""
                self._logs[table] = _parse_log(data)[0]
            else:
                self._logs[table] = _read_log(self._log_path(table))[0]
        return self._logs[table]

    def committed(self, table: str) -> tuple[int, int]:
        """(rows, atoms) that readers may see."""
        log = self.commits(table)
        return (log[-1].rows[1], log[-1].atoms[1]) if log else (0, 0)

    def has_batch(self, table: str, key: str) -> bool:
        return any(c.key == key for c in self.commits(table))

    def tables(self) -> list[str]:
        if self._fs is not None:
            return sorted(PurePosixPath(p).stem for p in self._fs.glob(f"{self._fs_root}/_commits/*.jsonl"))
        log_dir = self._dir / "_commits"
        return sorted(p.stem for p in log_dir.glob("*.jsonl")) if log_dir.exists() else []

    def _repair(self) -> None:
        """Drop what an interrupted writer left beyond the last commit."""
        for partial in self._dir.rglob("*.partial"):
            partial.unlink(missing_ok=True)
        tables = [p.name for p in self._dir.iterdir() if (p / "zarr.json").exists() and p.name not in SIDE_GROUPS]
        for table in tables:
            log_path = self._log_path(table)
            _, good = _read_log(log_path)
            if log_path.exists() and good < log_path.stat().st_size:
                with open(log_path, "r+b") as f:
                    f.truncate(good)
        # a grouped commit cut off after its deciding line (its data is on disk): appends are
        # sequential and every open repairs, so only a table's last commit can be one
        for log in (self.commits(table) for table in tables):
            for other, part in log[-1].together if log else ():
                if not self.has_batch(other, part.key) and self.committed(other) == (part.rows[0], part.atoms[0]):
                    self._commit(other, part, push=False)
        for table in tables:
            rows, atoms = self.committed(table)
            group = self._group(table)
            for name, arr in group.arrays():
                target = self._length_for(name, rows, atoms)
                if arr.shape[0] != target:
                    arr.resize((target, *arr.shape[1:]))

    @staticmethod
    def _length_for(name: str, rows: int, atoms: int) -> int:
        if name in ("numbers", "positions", "forces"):
            return atoms
        if name == "offsets":
            return rows + 1
        return rows

    # -- append --------------------------------------------------------------------------
    def append(
        self,
        table: str,
        key: str,
        columns: Mapping[str, Any],
        frames: Frames | None = None,
        *,
        row_dim: str = "row",
    ) -> bool:
        """Append one batch atomically; returns False if ``key`` was committed before."""
        return self.append_together([Batch(table, key, columns, frames, row_dim)])

    def append_together(self, batches: Sequence[Batch]) -> bool:
        """Append batches of different tables as one commit. The last batch's commit line decides:
        it names the others, whose lines follow it; a writer cut off between them (``kill -9``)
        leaves their data on disk, and the next writer completes their lines before anything else
        (:meth:`_repair`), so a kill never keeps one part of the group and drops another. Returns
        False if the deciding key was committed before."""
        if not self.write:
            raise StoreError(f"store {self.path} is open read-only")
        if len({b.table for b in batches}) != len(batches):
            raise ValueError("append_together: one batch per table")
        *others, deciding = batches
        if self.has_batch(deciding.table, deciding.key):
            return False
        # a batch of the group committed before (by a writer of two commits) is not written again
        together = tuple((b.table, self._write(b)) for b in others if not self.has_batch(b.table, b.key))
        last = self._write(deciding)
        self._store.sync()  # every batch's data is on disk before the commit that makes it visible
        self._commit(deciding.table, Commit(last.key, last.rows, last.atoms, together), push=not together)
        for i, (table, part) in enumerate(together):
            self._commit(table, part, push=i == len(together) - 1)
        return True

    def _write(self, batch: Batch) -> Commit:
        """Grow and fill the arrays of ``batch.table`` past its committed rows; the commit that
        covers them is the caller's."""
        table, key, columns, frames, row_dim = batch
        cols = {name: _column_array(v) for name, v in columns.items()}
        lengths = {len(v) for v in cols.values()} | ({len(frames)} if frames is not None else set())
        if len(lengths) != 1:
            raise ValueError(f"batch {key!r} of {table!r}: columns have different lengths {sorted(lengths)}")
        n = lengths.pop()
        rows, atoms = self.committed(table)
        group = self.root.require_group(table)
        if "_row_dim" not in group.attrs:
            group.attrs["_row_dim"] = row_dim
        row_dim = str(group.attrs["_row_dim"])

        for name in {*cols, *(k for k, _ in group.arrays() if k not in _STRUCTURE_ARRAYS)}:
            if name in _STRUCTURE_ARRAYS:
                raise ValueError(f"column name {name!r} is reserved for structures")
            values = cols.get(name)
            arr = self._require(group, name, values, rows, row_dim)
            if values is None:  # a column this batch does not have: pad
                values = np.full((n, *arr.shape[1:]), fill_value(arr.dtype))
            self._put(arr, rows, values)

        if frames is not None:
            n_new = int(frames.offsets[-1])
            self._put(
                self._require(group, "numbers", frames.numbers.astype(np.int16), atoms, "atom"), atoms, frames.numbers
            )
            self._put(self._require(group, "positions", frames.positions, atoms, "atom"), atoms, frames.positions)
            self._put(self._require(group, "cell", frames.cell, rows, row_dim), rows, frames.cell)
            self._put(self._require(group, "pbc", frames.pbc, rows, row_dim), rows, frames.pbc)
            offsets = self._require(group, "offsets", frames.offsets, rows + 1, "offset", initial=[0])
            self._put(offsets, rows + 1, atoms + frames.offsets[1:])
            if frames.forces is not None or "forces" in group:
                forces = frames.forces if frames.forces is not None else np.full((n_new, 3), np.nan)
                self._put(self._require(group, "forces", forces, atoms, "atom"), atoms, forces)
        else:
            n_new = 0
        return Commit(key, (rows, rows + n), (atoms, atoms + n_new))

    def _require(
        self,
        group: zarr.Group,
        name: str,
        values: np.ndarray | None,
        length: int,
        dim: str,
        initial: list[Any] | None = None,
    ) -> zarr.Array:
        if name in group:
            return _array(group, name)
        assert values is not None
        values = np.asarray(values)
        tail = values.shape[1:]
        if values.dtype.kind == "O":
            dtype: Any = str
            codecs: Any = "auto"
        else:
            dtype = _STORED_DTYPES.get(name, values.dtype)
            codecs = _FLOAT_CODEC if values.dtype.kind == "f" else _INT_CODEC
        chunk = ATOM_CHUNK if dim == "atom" else ROW_CHUNK
        arr = group.create_array(
            name,
            shape=(length, *tail),
            dtype=dtype,
            chunks=(chunk, *tail),
            compressors=codecs,
            fill_value=fill_value(dtype),
            dimension_names=(dim, *self._tail_dims(name, tail)),
        )
        if initial is not None:
            arr[: len(initial)] = np.asarray(initial, dtype=values.dtype)
        elif length:
            arr[:length] = np.full((length, *tail), fill_value(dtype), dtype=object if dtype is str else dtype)
        return arr

    @staticmethod
    def _tail_dims(name: str, tail: tuple[int, ...]) -> tuple[str, ...]:
        if name in ("positions", "forces"):
            return ("xyz",)
        if name == "cell":
            return ("cell_vector", "xyz")
        if name == "pbc":
            return ("xyz",)
        if name == "stress":
            return ("voigt",)
        return tuple(f"{name}_{i}" for i in range(len(tail)))

    @staticmethod
    def _put(arr: zarr.Array, start: int, values: np.ndarray) -> None:
        stop = start + len(values)
        if arr.shape[0] != stop:
            arr.resize((stop, *arr.shape[1:]))
        if len(values):
            arr[start:stop] = values

    def _commit(self, table: str, commit: Commit, *, push: bool = True) -> None:
        path = self._log_path(table)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {**commit.record(), "time": time.time()}
        if self.generation is not None:  # a store at a URL: which lease holder committed it
            record["generation"] = self.generation
        line = json.dumps(record)
        new = not path.exists()
        with open(path, "ab") as f:
            f.write(line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())  # committed means on disk: a power cut after this keeps the batch
        if new:
            fsync_dir(path.parent)
        self._logs.setdefault(table, []).append(commit)
        if push and self.on_commit is not None:
            self.on_commit()

    # -- read ----------------------------------------------------------------------------
    def columns(self, table: str) -> list[str]:
        if table not in self.root:
            return []
        return sorted(k for k, _ in self._group(table).arrays() if k not in _STRUCTURE_ARRAYS)

    def read(self, table: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Committed values of the named columns (all columns by default)."""
        rows, _ = self.committed(table)
        names = self.columns(table) if names is None else list(names)
        if not rows:
            return {name: np.zeros(0) for name in names}
        group = self._group(table)
        return {name: np.asarray(_array(group, name)[:rows]) for name in names}

    def read_frames(self, table: str, rows: slice | np.ndarray | Sequence[int] | None = None) -> Frames:
        """Committed structures of a table (all, or the given row indices)."""
        n, n_atoms = self.committed(table)
        group = self._group(table)
        offsets = np.asarray(_array(group, "offsets")[: n + 1]) if n else np.zeros(1, np.int64)
        has_forces = "forces" in group
        if rows is None:
            return Frames(
                numbers=np.asarray(_array(group, "numbers")[:n_atoms]),
                positions=np.asarray(_array(group, "positions")[:n_atoms]),
                cell=np.asarray(_array(group, "cell")[:n]),
                pbc=np.asarray(_array(group, "pbc")[:n]),
                offsets=offsets,
                forces=np.asarray(_array(group, "forces")[:n_atoms]) if has_forces else None,
            )
        idx = np.arange(n)[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        if not len(idx):
            return Frames.from_atoms([])
        if idx.min() < 0 or idx.max() >= n:
            raise IndexError(f"row out of range for table {table!r} with {n} committed rows")
        # read the smallest contiguous span that covers the requested rows, then pick
        r_lo, r_hi = int(idx.min()), int(idx.max()) + 1
        lo, hi = int(offsets[r_lo]), int(offsets[r_hi])
        counts = offsets[idx + 1] - offsets[idx]
        atom_idx = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx]) - lo
        return Frames(
            numbers=np.asarray(_array(group, "numbers")[lo:hi])[atom_idx],
            positions=np.asarray(_array(group, "positions")[lo:hi])[atom_idx],
            cell=np.asarray(_array(group, "cell")[r_lo:r_hi])[idx - r_lo],
            pbc=np.asarray(_array(group, "pbc")[r_lo:r_hi])[idx - r_lo],
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            forces=np.asarray(_array(group, "forces")[lo:hi])[atom_idx] if has_forces else None,
        )


def _array(group: zarr.Group, name: str) -> zarr.Array:
    node = group[name]
    assert isinstance(node, zarr.Array), f"{name} is not a column"
    return node
