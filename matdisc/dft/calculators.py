"""Build the configured ASE calculator for one calculation, and name its settings.

``gpaw`` (default) gets plane-wave PBE settings from the preset (cutoff, Fermi-Dirac
smearing, SCF tolerances, k-points from a reciprocal density); ``emt`` is ASE's
effective-medium potential; ``module:Class`` is any ASE calculator, instantiated with the
configured keyword arguments (``kpts: auto`` asks for the density-derived mesh). Each
calculation gets its own directory, kept for inspection.

The settings hash covers what defines an energy (calculator, functional, cutoff,
smearing, k-point density, spin treatment) and leaves out what only helps the SCF
converge (mixer, bands, iteration limit, log file), so a recovery rung that changes the
mixer keeps a result in the campaign's reference set, and one that changes the smearing
does not.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any, cast

from ase import Atoms
from ase.calculators.calculator import Calculator, kptdensity2monkhorstpack

from matdisc.config import ReferenceConfig

#: Initial magnetic moments (µB) for spin-polarised runs; elements not listed start at 0.
#: High-spin guesses as in common high-throughput practice: SCF finds the actual moment.
INITIAL_MAGMOMS: dict[str, float] = {
    "V": 3.0,
    "Cr": 4.0,
    "Mn": 5.0,
    "Fe": 4.0,
    "Co": 3.0,
    "Ni": 2.0,
    "Ce": 1.0,
    "Pr": 2.0,
    "Nd": 3.0,
    "Sm": 5.0,
    "Eu": 7.0,
    "Gd": 7.0,
    "Tb": 6.0,
    "Dy": 5.0,
}

#: GPAW keywords that steer SCF convergence without changing the converged energy.
CONVERGENCE_ONLY = frozenset({"txt", "mixer", "maxiter", "nbands", "eigensolver", "parallel", "convergence"})
#: Keywords of any calculator that say where it runs, not what it computes.
LOCATION_ONLY = frozenset({"directory", "label", "command", "txt", "profile"})


def magmoms_for(atoms: Atoms, ref: ReferenceConfig) -> list[float] | None:
    """Initial moments when this structure is run spin-polarised, else None."""
    table = {**INITIAL_MAGMOMS, **ref.magmoms}
    symbols = atoms.get_chemical_symbols()
    if ref.spin == "off" or (ref.spin == "auto" and not any(table.get(s, 0.0) for s in symbols)):
        return None
    return [table.get(s, 0.0) for s in symbols]


def calculator_parameters(cfg: ReferenceConfig, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every keyword the calculator gets (before k-points and paths), plus the protocol settings."""
    ref = cfg.resolved()
    if ref.calculator == "gpaw":
        params: dict[str, Any] = {
            "mode": {"name": "pw", "ecut": ref.ecut},
            "xc": "PBE",
            "occupations": {"name": "fermi-dirac", "width": ref.smearing},
            "convergence": ref.scf_tolerances,
        }
    else:
        params = {}
    params.update(ref.parameters)
    params.update(overrides or {})
    return {
        "calculator": ref.calculator,
        "parameters": params,
        "kpoint_density": ref.kpoint_density,
        "spin": ref.spin,
        "magmoms": {**INITIAL_MAGMOMS, **ref.magmoms} if ref.spin != "off" else {},
    }


def settings_hash(cfg: ReferenceConfig, overrides: dict[str, Any] | None = None) -> str:
    """Short hash of the energy-defining settings: energies are comparable only within one hash."""
    full = calculator_parameters(cfg, overrides)
    skip = LOCATION_ONLY | (CONVERGENCE_ONLY if full["calculator"] == "gpaw" else frozenset())
    full["parameters"] = {k: v for k, v in full["parameters"].items() if k not in skip}
    if full["calculator"] == "emt":
        full.pop("kpoint_density")  # EMT has no k-points and no spin: these cannot change its energies
        full.pop("spin"), full.pop("magmoms")
    blob = json.dumps(full, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def kpoints(atoms: Atoms, density: float) -> tuple[int, int, int]:
    """Monkhorst-Pack mesh from a reciprocal density (ASE's convention: points per Å⁻¹)."""
    return tuple(int(k) for k in kptdensity2monkhorstpack(atoms, density))  # type: ignore[return-value]


def make_calculator(
    cfg: ReferenceConfig, atoms: Atoms, workdir: Path, overrides: dict[str, Any] | None = None
) -> Calculator:
    """A fresh calculator for ``atoms``, writing into ``workdir``."""
    ref = cfg.resolved()
    workdir.mkdir(parents=True, exist_ok=True)
    params = dict(calculator_parameters(ref, overrides)["parameters"])
    if ref.calculator == "emt":
        from ase.calculators.emt import EMT

        return EMT(**params)
    density = ref.kpoint_density
    assert density is not None
    if ref.calculator == "gpaw":
        from gpaw import GPAW

        params.setdefault("kpts", kpoints(atoms, density))
        params.setdefault("txt", str(workdir / "gpaw.txt"))
        if magmoms_for(atoms, ref) is not None:
            params.setdefault("spinpol", True)
        # GPAW's ASECalculator follows ASE's calculator protocol without subclassing Calculator
        return cast(Calculator, GPAW(**params))
    if params.get("kpts") == "auto":
        params["kpts"] = kpoints(atoms, density)
    module, _, cls = ref.calculator.partition(":")
    factory = getattr(importlib.import_module(module), cls)
    try:  # FileIOCalculators take a directory; others do not
        return factory(directory=str(workdir), **params)
    except TypeError:
        return factory(**params)
