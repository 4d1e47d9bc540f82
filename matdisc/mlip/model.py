"""Loading MACE models, only from configured places, with their sha256 recorded.

A model file is a pickle, so loading it is running code: matdisc loads only the paths a
campaign names (its config, or the store's own ``models/`` directory) and records each
file's sha256 beside every result it produces. Foundation models (``mace_mp`` names) go
through mace-torch's own download-and-cache path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import mace.calculators  # noqa: F401  (import before e3nn: mace-torch pins e3nn 0.4.4)


@dataclass(frozen=True)
class ModelInfo:
    """What a result records about the model that produced it."""

    paths: tuple[str, ...]
    sha256: str  # of the single file, or of the committee's sorted member hashes
    device: str
    dtype: str


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def committee_sha256(paths: list[str]) -> str:
    if len(paths) == 1:
        return file_sha256(paths[0])
    joined = "".join(sorted(file_sha256(p) for p in paths))
    return hashlib.sha256(joined.encode()).hexdigest()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def foundation_model_path(name: str) -> str:
    """Local path of a ``mace_mp`` foundation model (downloads into mace's cache when online)."""
    from mace.calculators.foundations_models import download_mace_mp_checkpoint

    return download_mace_mp_checkpoint(name)


def load_calculator(paths: list[str], *, device: str = "cpu", dtype: str = "float64"):
    """A MACECalculator over one model or a committee (energies of each member in ``results``)."""
    import warnings

    from mace.calculators import MACECalculator

    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"model file {p} does not exist")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MACECalculator(model_paths=list(paths), device=resolve_device(device), default_dtype=dtype)


def model_elements(path: str) -> set[str]:
    """Chemical symbols a MACE model was trained for."""
    import torch
    from ase.data import chemical_symbols

    model = torch.load(path, map_location="cpu", weights_only=False)
    return {chemical_symbols[int(z)] for z in model.atomic_numbers}
