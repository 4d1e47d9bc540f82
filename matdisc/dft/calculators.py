"""Build the configured ASE calculator for one calculation.

``gpaw`` (default) gets plane-wave PBE settings sized for screening; ``emt`` is ASE's
effective-medium potential; ``module:Class`` is any ASE calculator, instantiated with the
configured keyword arguments. Each calculation gets its own directory, kept for inspection.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

from ase import Atoms
from ase.calculators.calculator import Calculator, kptdensity2monkhorstpack

from matdisc.config import ReferenceConfig

#: GPAW defaults: plane waves, PBE, Fermi-Dirac smearing for metals. k-points come from
#: ``reference.kpoint_density`` unless ``parameters`` sets ``kpts``.
GPAW_DEFAULTS: dict[str, Any] = {
    "mode": {"name": "pw", "ecut": 300.0},
    "xc": "PBE",
    "occupations": {"name": "fermi-dirac", "width": 0.1},
    "convergence": {"energy": 1e-5},
}


def calculator_parameters(cfg: ReferenceConfig) -> dict[str, Any]:
    """The parameters that define the reference energies (what the settings hash covers)."""
    params = dict(GPAW_DEFAULTS) if cfg.calculator == "gpaw" else {}
    params.update(cfg.parameters)
    return {"calculator": cfg.calculator, "parameters": params, "kpoint_density": cfg.kpoint_density}


def settings_hash(cfg: ReferenceConfig) -> str:
    """Short hash of the energy-defining settings: energies are comparable only within one hash."""
    blob = json.dumps(calculator_parameters(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_calculator(cfg: ReferenceConfig, atoms: Atoms, workdir: Path) -> Calculator:
    """A fresh calculator for ``atoms``, writing into ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    params = calculator_parameters(cfg)["parameters"]
    if cfg.calculator == "emt":
        from ase.calculators.emt import EMT

        return EMT(**params)
    if cfg.calculator == "gpaw":
        from gpaw import GPAW

        kw = dict(params)
        kw.setdefault("kpts", tuple(int(k) for k in kptdensity2monkhorstpack(atoms, cfg.kpoint_density)))
        kw.setdefault("txt", str(workdir / "gpaw.txt"))
        return GPAW(**kw)
    module, _, cls = cfg.calculator.partition(":")
    factory = getattr(importlib.import_module(module), cls)
    kw = dict(params)
    try:  # FileIOCalculators take a directory; others do not
        return factory(directory=str(workdir), **kw)
    except TypeError:
        return factory(**kw)
