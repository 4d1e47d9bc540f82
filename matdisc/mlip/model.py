"""The model registry: which MACE files may be loaded, what they are, and on what device.

A model file is a pickle, so loading it is running code: matdisc loads only the paths a
campaign names (its config's ``mlip.model``, the store's own ``models/`` directory, or
mace-torch's foundation-model cache for ``mace_mp`` names), checks each file's sha256 before
unpickling it (against the name a registered file carries, or ``mlip.model_sha256``) and
records it beside every result it produces. :func:`describe` reads what a result must record about a
model (sha256, dtype, device, r_max, elements); :func:`require_elements` refuses a model
that lacks an element of the chemical system before any work starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import mace.calculators  # noqa: F401  (import before e3nn: mace-torch pins e3nn 0.4.4)

from matdisc.errors import UserError


class ModelError(UserError):
    """A model that cannot be used for this campaign (missing file, element, or untrusted path)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a result records about the model (or committee) that produced it."""

    paths: tuple[str, ...]
    sha256: str  # of the single file, or of the committee's sorted member hashes
    members: tuple[str, ...]
    device: str
    dtype: str
    r_max: float
    elements: tuple[str, ...]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: A model file the registry keeps is named by its sha256 (``STORE/models/<sha256>.model``).
_HASH_NAME = re.compile(r"^[0-9a-f]{64}$")

#: sha256 of files already hashed, by (real path, size, mtime): a committee is loaded by every
#: MLIP job, and hashing a foundation model each time would cost more than the job.
_VERIFIED: dict[tuple[str, int, int], str] = {}


def verified_sha256(path: str | Path) -> str:
    """A file's sha256, computed once for each (real path, size, modification time)."""
    real = Path(path).resolve()
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = file_sha256(real)
    return _VERIFIED[key]


def check_sha256(path: str | Path, expected: str | None = None) -> str:
    """The file's sha256, refused before anything unpickles it when it is not the one expected:
    ``expected`` when given, else the hash a registered file is named by (``<sha256>.model``).
    Unpickling runs code, so a model that changed on disk (tampered with, or damaged) never loads."""
    p = Path(path)
    named = p.stem if p.suffix == ".model" and _HASH_NAME.match(p.stem) else None
    actual = verified_sha256(p)
    for want, what in ((named, "it is registered under"), (expected, "expected")):
        if want is not None and actual != want:
            raise ModelError(
                f"model file {p} does not have the sha256 {what} ({want[:12]}…; it has {actual[:12]}…): "
                "refusing to load it"
            )
    return actual


def committee_sha256(member_hashes: tuple[str, ...]) -> str:
    """A single model's own sha256, or the sha256 of a committee's sorted member hashes."""
    if len(member_hashes) == 1:
        return member_hashes[0]
    return hashlib.sha256("".join(sorted(member_hashes)).encode()).hexdigest()


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; ``cuda:N`` checked against the GPUs."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"mlip.device: {device} requested but no CUDA device is visible")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ModelError(f"mlip.device: {device} requested but only {torch.cuda.device_count()} GPU(s)")
    return device


def worker_threads() -> int:
    """Set torch's intra-op threads to ``OMP_NUM_THREADS`` when it is set, and return them.

    The worker's environment says how many cores an MLIP job may use, but a Dask nanny starts
    its worker process with ``OMP_NUM_THREADS=1`` (``distributed.nanny.pre-spawn-environ``) and
    torch keeps the thread count it read then; the ``env`` a worker spec sets comes later."""
    import torch

    wanted = os.environ.get("OMP_NUM_THREADS", "")
    if wanted.isdigit() and int(wanted) >= 1 and torch.get_num_threads() != int(wanted):
        torch.set_num_threads(int(wanted))
    return torch.get_num_threads()


def use_cueq(device: str, requested: bool | None) -> bool:
    """cuEquivariance kernels: on request, or by default when installed and on CUDA."""
    available = importlib.util.find_spec("cuequivariance_torch") is not None
    if requested and not (available and device.startswith("cuda")):
        raise ModelError("mlip.cueq: needs CUDA and the cuequivariance-torch package ([gpu] extra)")
    return bool(available and device.startswith("cuda")) if requested is None else requested


def foundation_model_path(name: str) -> str:
    """Local path of a ``mace_mp`` foundation model (downloads into mace's cache when online)."""
    from mace.calculators.foundations_models import download_mace_mp_checkpoint

    try:
        return download_mace_mp_checkpoint(name)
    except Exception as err:  # offline and not cached: say which name and where it was looked for
        raise ModelError(
            f"mlip.model: foundation model {name!r} is not cached and cannot be downloaded ({type(err).__name__})"
        ) from None


def trusted_roots(configured: list[str | Path]) -> list[Path]:
    """Directories and files a campaign may load models from: the configured ones and mace-torch's
    foundation-model cache, where mace itself puts it (``$XDG_CACHE_HOME/mace`` when that is set)."""
    from mace.tools.utils import get_cache_dir

    return [Path(p).resolve() for p in configured] + [Path(get_cache_dir()).resolve()]


def check_trusted(paths: list[str], roots: list[Path]) -> None:
    """Refuse to unpickle a file outside the configured places."""
    for p in paths:
        real = Path(p).resolve()
        if not any(real == r or r in real.parents for r in roots):
            raise ModelError(f"model file {p} is not under a configured model location; refusing to load it")


def load_torch_model(path: str, device: str = "cpu", dtype: str = "float64", *, sha256: str | None = None):
    """One MACE ``torch.nn.Module`` from a file, in eval mode on ``device`` at ``dtype``, after its
    sha256 was checked (:func:`check_sha256`)."""
    import torch

    if not Path(path).is_file():
        raise ModelError(f"model file {path} does not exist")
    if Path(path).stat().st_size == 0:
        raise ModelError(f"model file {path} is empty")
    check_sha256(path, sha256)
    try:
        with MODEL_LOCK:
            model = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # a truncated or foreign file fails in many ways: one line says which
        reason = str(err).splitlines()[0][:200] if str(err) else ""
        raise ModelError(f"model file {path} cannot be read as a MACE model: {type(err).__name__}: {reason}") from None
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "atomic_numbers"):
        raise ModelError(f"model file {path} holds a {type(model).__name__}, not a MACE model")
    return model.to(device=device, dtype=getattr(torch, dtype)).eval()


#: torch.fx tracing (e3nn's code generation, when a MACE model is unpickled or wrapped)
#: patches ``torch.nn.Module.__call__`` process-wide, so a model running in another thread
#: meanwhile fails with "NameError: module is not installed as a submodule". Threads that
#: load or evaluate models side by side (train_committee's members) hold this lock.
MODEL_LOCK = threading.RLock()


@lru_cache(maxsize=32)
def _read_header(path: str, sha: str) -> tuple[float, tuple[str, ...]]:
    from ase.data import chemical_symbols

    model = load_torch_model(path, sha256=sha)
    elements = tuple(sorted(chemical_symbols[int(z)] for z in model.atomic_numbers))
    return float(model.r_max), elements


def describe(paths: list[str], *, device: str = "cpu", dtype: str = "float64") -> ModelInfo:
    """Provenance of a model or committee: hashes, cutoff and the elements every member knows."""
    for p in paths:
        if not Path(p).is_file():
            raise ModelError(f"model file {p} does not exist")
    members = tuple(check_sha256(p) for p in paths)
    headers = [_read_header(str(p), s) for p, s in zip(paths, members)]
    common = set(headers[0][1]).intersection(*(set(h[1]) for h in headers[1:]))
    return ModelInfo(
        paths=tuple(str(p) for p in paths),
        sha256=committee_sha256(members),
        members=members,
        device=device,
        dtype=dtype,
        r_max=max(h[0] for h in headers),
        elements=tuple(sorted(common)),
    )


def require_elements(info: ModelInfo, chemsys: list[str], *, name: str = "mlip.model") -> None:
    """Refuse a model that was not trained on every element of the chemical system."""
    missing = sorted(set(chemsys) - set(info.elements))
    if missing:
        raise ModelError(
            f"{name}: model {Path(info.paths[0]).name} has no {', '.join(missing)} "
            f"(it knows {', '.join(info.elements)})"
        )


def load_calculator(paths: list[str], *, device: str = "cpu", dtype: str = "float64", cueq: bool | None = None):
    """An ASE MACECalculator over one model or a committee (each member's energy in ``results``)."""
    import warnings

    from mace.calculators import MACECalculator

    for p in paths:
        if not Path(p).is_file():
            raise ModelError(f"model file {p} does not exist")
        check_sha256(p)
    device = resolve_device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MACECalculator(
            model_paths=list(paths), device=device, default_dtype=dtype, enable_cueq=use_cueq(device, cueq)
        )


def configured_model(mlip, chemsys: list[str], registered: str | None = None) -> ModelInfo | None:
    """The campaign's configured starting model, checked against its chemistry (None: cold start).

    Called before any work starts (``matdisc run``) and again by the flow: a model lacking
    an element of ``chemsys`` is refused with a message naming the missing elements. Its sha256
    is checked before it is unpickled against ``mlip.model_sha256``, or on a resume against the
    hash the store ``registered`` it under: a file that changed since is refused.
    """
    if mlip.is_cold_start:
        return None
    path = mlip.model if mlip.is_model_file else foundation_model_path(mlip.model)
    expected = mlip.model_sha256 or registered
    if expected is not None:
        check_sha256(path, expected)
    info = describe([path], device=mlip.device, dtype=mlip.dtype)
    require_elements(info, chemsys)
    return info
