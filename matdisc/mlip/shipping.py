"""Model files on workers that do not share a filesystem with the store's writer.

With a store on an object store (``s3://...``) the writer's working copy is on its own
machine, so a worker elsewhere cannot open ``models/<sha256>.model`` by path. It fetches the
file from the store's URL into ``$MATDISC_HOME/model-cache`` instead and keeps it only if its
sha256 equals its name, the hash the registry recorded: what it then unpickles is exactly the
registered model. Trained models travel back to the writer as bytes in the task's result.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from matdisc.mlip.model import ModelError, file_sha256

if TYPE_CHECKING:
    from matdisc.mlip.train import TrainedModel


def cache_dir() -> Path:
    from matdisc.locations import matdisc_home as home

    return home() / "model-cache"


def localize(paths: list[str], store: str | None = None) -> list[str]:
    """Paths this machine can open: each path itself where it is a file here, else (with the URL
    of the store) ``<store>/models/<name>`` fetched into the cache and checked against its sha256."""
    local = []
    for p in paths:
        if Path(p).is_file() or store is None:
            local.append(p)
            continue
        name = Path(p).name
        cached = cache_dir() / name  # only ever written after its hash was checked (_fetch)
        if not cached.is_file():
            _fetch(f"{store.rstrip('/')}/models/{name}", cached, name.removesuffix(".model"))
        local.append(str(cached))
    return local


def _fetch(url: str, dest: Path, sha: str) -> None:
    import fsspec

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.partial")
    try:
        with fsspec.open(url, "rb") as src, open(tmp, "wb") as out:
            out.write(src.read())
    except FileNotFoundError:
        raise ModelError(f"model {url} is not in the store") from None
    if file_sha256(tmp) != sha:
        tmp.unlink()
        raise ModelError(f"model {url}: its sha256 is not the one the registry recorded; refusing to load it")
    os.replace(tmp, dest)


def pack(models: list[TrainedModel]) -> list[TrainedModel]:
    """Trained models with their files' bytes, for a writer on another machine."""
    for m in models:
        m.content = Path(m.path).read_bytes()
    return models


def unpack(models: list[TrainedModel], workdir: Path) -> list[Path]:
    """Paths of trained models on this machine: their own where visible, else written from their bytes."""
    paths = []
    for k, m in enumerate(models):
        path = Path(m.path)
        if not path.is_file():
            if m.content is None:
                raise ModelError(f"trained model {m.path} is not on this machine and was not shipped")
            workdir.mkdir(parents=True, exist_ok=True)
            path = workdir / f"member-{k}.model"
            path.write_bytes(m.content)
        paths.append(path)
    return paths
