"""Where things are: a campaign store (a local path or an fsspec URL), matdisc's own home.

Kept free of heavy imports: configs are validated in every Dask worker that runs a task.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath


def store_url(location: str | Path) -> str | None:
    """The fsspec URL of a store location, or None for a local path (``file://`` URLs included)."""
    text = str(location)
    if "://" not in text or text.split("://", 1)[0] in ("file", "local"):
        return None
    return text


def store_name(location: str | Path) -> str:
    """The store's name without ``.zarr`` (``s3://b/runs/x.zarr`` and ``runs/x.zarr`` -> ``x``)."""
    return PurePosixPath(str(location).rstrip("/")).name.removesuffix(".zarr")


def as_location(location: str | Path) -> str | Path:
    """A store location as given by a user: an fsspec URL stays a string, anything else is a path."""
    url = store_url(location)
    return url if url is not None else local_path(location)


def local_path(location: str | Path) -> Path:
    """A local store location as a path (``file:///runs/x.zarr`` -> ``/runs/x.zarr``)."""
    text = str(location)
    return Path(text.split("://", 1)[1]) if "://" in text else Path(location)


def matdisc_home() -> Path:
    """matdisc's own files (model cache, the local Prefect server): ``$MATDISC_HOME`` or ``~/.matdisc``."""
    return Path(os.environ.get("MATDISC_HOME", Path.home() / ".matdisc"))
