"""Campaign configuration: one pydantic model tree, loaded from YAML.

Every field has a default that works on a laptop; a campaign file only says what differs.
Validation errors name the field (``mlip.model: ...``) so the CLI can print them one per
line. Paths in the file are taken relative to the current working directory, like any
other command-line path.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from matdisc.errors import UserError
from matdisc.locations import as_location

#: Calculators that need no ``module:Class`` spelling.
BUILTIN_CALCULATORS = ("gpaw", "emt")
#: Scheduler spellings besides an address.
LOCAL_SCHEDULERS = ("local", "slurm")
_ADDRESS = re.compile(r"^(tcp|tls|ucx|inproc)://[^\s:/]+(:\d+)?$")
_MODEL_SUFFIXES = (".model", ".pt", ".pth")


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a campaign file must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def files_shorthand(value: Any) -> Any:
    """A section that takes files may be given as one path or a list of them: ``{files: [...]}``."""
    if isinstance(value, (str, Path)):
        return {"files": [str(value)]}
    if isinstance(value, list):
        return {"files": [str(v) for v in value]}
    return value


class PrototypeSourceConfig(_Strict):
    """Decorated crystal prototypes: the AFLOW library that pymatgen ships, or the built-in one."""

    enabled: bool = Field(True, description="decorate the prototype library")
    library: Literal["aflow", "builtin"] = Field(
        "aflow",
        description="aflow: every AFLOW prototype (pymatgen's copy of the library) with at most max_atoms "
        "sites and at most max_elements species; builtin: matdisc's 25 ideal-geometry prototypes (ionic ones only "
        "for ionic systems)",
    )
    elements: bool | None = Field(
        None,
        description="decorate the library's one-species prototypes (elemental polymorphs); None: only when "
        "the chemical system is one element (a compound search has fcc, bcc and hcp in its reference set)",
    )
    names: list[str] | None = Field(
        None,
        description="prototypes to decorate instead of the whole library: built-in names (fcc, B2, ...), "
        "Strukturbericht symbols (B32) or AFLOW labels (AB_cF16_227_a_b)",
    )
    per_round: int | None = Field(None, ge=0, description="cap on new prototype candidates per round (None: all)")

    @field_validator("names")
    @classmethod
    def _known_prototypes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            from matdisc.generate.aflow import by_name
            from matdisc.generate.prototypes import PROTOTYPES

            unknown = [n for n in value if n not in PROTOTYPES and n not in by_name()]
            if unknown:
                raise ValueError(
                    f"unknown prototype {unknown[0]!r}: not a built-in name ({', '.join(PROTOTYPES)}), "
                    "nor a Strukturbericht symbol or AFLOW label of the AFLOW library"
                )
        return value


class SubstitutionSourceConfig(_Strict):
    """Data-mined ionic substitution (pymatgen's lambda table) of known structures."""

    enabled: bool = Field(True, description="data-mined substitution (pymatgen lambda table)")
    threshold: float = Field(
        1e-3, gt=0, lt=1, description="minimum substitution probability (per element for metallic systems)"
    )
    from_prototypes: bool = Field(True, description="substitute into the library's namesake compounds")
    from_hits: bool = Field(True, description="substitute into the campaign's verified hits")
    per_round: int | None = Field(100, ge=0, description="most probable substitutions kept per round")
    parents: list[str] = Field(
        default_factory=list,
        description="structure files (CIF, POSCAR, extxyz, pymatgen JSON; a file, a folder or a glob) whose "
        "structures are substituted into as well, e.g. a paper's compounds of a neighbouring chemistry",
    )


class RandomSourceConfig(_Strict):
    """PyXtal random symmetric crystals (AIRSS-like)."""

    enabled: bool = Field(True, description="PyXtal random symmetric crystals")
    per_round: int = Field(20, ge=0, description="random crystals wanted per round")
    min_distance: float = Field(0.7, gt=0, le=1.2, description="closest approach, × sum of covalent radii")
    max_attempts: int = Field(5, ge=1, description="draws per wanted structure before giving up")


class FileSourceConfig(_Strict):
    """The user's own structures as candidates: a folder of CIFs from a paper, an extxyz of
    candidates from another code. Each becomes a candidate once (deduplicated like any other,
    provenance ``source: file`` with the file and index)."""

    files: list[str] = Field(
        default_factory=list,
        description="structure files: CIF, POSCAR/CONTCAR (.vasp), extxyz, or a JSON list of pymatgen "
        "Structure/ComputedStructureEntry; each entry a file, a folder or a glob pattern",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return files_shorthand(value)

    @property
    def enabled(self) -> bool:
        return bool(self.files)


class GenerationConfig(_Strict):
    """What candidate structures to build each round."""

    max_atoms: int = Field(8, ge=1, le=64, description="largest cell (atoms) a candidate may have")
    max_elements: int | None = Field(None, ge=1, description="most elements in one candidate (None: all of chemsys)")
    seed: int = Field(0, description="seed for every random choice of the generators")
    max_candidates: int | None = Field(
        None, ge=1, description="cap on new candidates per round, after dedup (None: no cap)"
    )
    workers: int = Field(1, ge=1, description="processes for random crystals and dedup (1: in the flow process)")
    prototype: PrototypeSourceConfig = Field(default_factory=PrototypeSourceConfig)
    substitution: SubstitutionSourceConfig = Field(default_factory=SubstitutionSourceConfig)
    random: RandomSourceConfig = Field(default_factory=RandomSourceConfig)
    from_files: FileSourceConfig = Field(default_factory=FileSourceConfig)


class ExtraDataConfig(_Strict):
    """The user's own labelled frames (earlier DFT of the same system), trained on beside the
    campaign's. Energies must share the campaign's reference zero (the same code, functional and
    pseudopotentials) or they pull the model off it: ``weight`` scales their share of the loss."""

    file: Path = Field(description="extxyz with energies and forces (stress optional) per frame")
    weight: float = Field(1.0, gt=0, description="loss weight of these frames relative to the campaign's (1)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"file": str(value)} if isinstance(value, (str, Path)) else value


class TrainingConfig(_Strict):
    """MACE hyperparameters for campaign training (mace-torch's ``run_train``).

    Left unset (None), the size fields follow ``preset``: ``cpu`` is a tiny model that
    trains in a minute on two cores, ``gpu`` a real one (128x0e+128x1o, 100s of epochs).
    """

    preset: Literal["auto", "cpu", "gpu"] = Field("auto", description="hyperparameter sizes (auto: by device)")
    num_channels: int | None = Field(None, ge=4, description="MACE hidden channels (None: from preset)")
    max_L: int | None = Field(None, ge=0, le=3, description="max L of equivariant features (None: from preset)")
    r_max: float = Field(5.0, gt=1.0, description="cutoff radius in Å")
    max_num_epochs: int | None = Field(None, ge=1, description="training epochs (None: from preset)")
    finetune_epochs: int | None = Field(
        None, ge=1, description="epochs when fine-tuning an earlier model (None: half of max_num_epochs)"
    )
    batch_size: int | None = Field(None, ge=1, description="frames per batch (None: from preset)")
    lr: float = Field(0.01, gt=0)
    valid_fraction: float = Field(0.1, gt=0, lt=0.5, description="validation split, by structure")
    forces_weight: float = Field(10.0, ge=0)
    energy_weight: float = Field(10.0, ge=0)
    start_from: Literal["previous", "scratch"] = Field(
        "previous",
        description="previous: fine-tune the model the round screened with (campaign, foundation or file "
        "model; cold start trains round 0 from scratch); scratch: a new model every round",
    )
    subsample: float = Field(
        0.9, gt=0, le=1, description="fraction of training structures each committee member draws (diversity)"
    )
    replay_file: Path | None = Field(
        None, description="extxyz of the foundation model's training data: enables multihead fine-tuning"
    )
    extra_data: ExtraDataConfig | None = Field(
        None, description="the user's own labelled frames joining every training set: {file, weight} or a path"
    )
    frames: Literal["all", "diverse"] = Field(
        "all", description="training frames per reference calculation: all, or a diverse subset by energy/forces"
    )
    frames_per_structure: int = Field(
        8, ge=2, description="with frames: diverse, frames kept per calculation (first and last always)"
    )
    heldout_fraction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="share of the structures verified in rounds >= 1 kept out of training for good (chosen by "
        "a hash of the id, so the held-out set only grows): what a new model is compared with the previous on",
    )
    guard: Literal["keep_previous", "off"] = Field(
        "keep_previous",
        description="keep_previous: a retrained committee worse than the previous one on the held-out frames "
        "(beyond guard_tolerance_mev and twice the paired standard error) is not used for screening; off: always "
        "use the new one. The decision is recorded per round (model_checks table)",
    )
    guard_tolerance_mev: float = Field(
        5.0, ge=0, description="meV/atom a new committee may be worse on the held-out frames before the guard acts"
    )

    @field_validator("replay_file")
    @classmethod
    def _replay_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"replay file {str(value)!r} does not exist")
        return value

    def sized(self, device: str) -> TrainingConfig:
        """This config with every size field filled in for ``device``."""
        preset = self.preset if self.preset != "auto" else ("gpu" if device.startswith("cuda") else "cpu")
        defaults = _TRAINING_PRESETS[preset]
        filled = {k: v if v is not None else defaults[k] for k, v in self.model_dump().items() if k in defaults}
        out = self.model_copy(update={**filled, "preset": preset})
        if out.finetune_epochs is None:
            assert out.max_num_epochs is not None  # filled from the preset above
            out = out.model_copy(update={"finetune_epochs": max(1, out.max_num_epochs // 2)})
        return out


#: Hyperparameter sizes per device: tiny on two CPU cores, a real model on a GPU.
_TRAINING_PRESETS: dict[str, dict[str, int]] = {
    "cpu": {"num_channels": 16, "max_L": 0, "max_num_epochs": 60, "batch_size": 4},
    "gpu": {"num_channels": 128, "max_L": 1, "max_num_epochs": 200, "batch_size": 16},
}


class ColdStartConfig(_Strict):
    """Seed DFT data when no starting model exists."""

    prototypes: list[str] = Field(
        default_factory=lambda: ["fcc", "bcc", "hcp", "B2", "L1_0", "L1_2"],
        description="prototypes relaxed with the reference calculator to seed training",
    )
    perturbed_per_structure: int = Field(
        3, ge=0, description="rattled + strained static calculations per relaxed seed structure"
    )
    rattle_stdev: float = Field(0.05, ge=0, description="Å, Gaussian displacement of perturbed seeds")
    strain: float = Field(0.04, ge=0, lt=0.3, description="max isotropic/shear strain of perturbed seeds")


class MLIPConfig(_Strict):
    """Which MACE model screens candidates, and how relaxations are run."""

    model: str = Field(
        "cold-start",
        description="cold-start, a mace_mp foundation name (e.g. medium-mpa-0), or a local .model file",
    )
    model_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="the sha256 the model file must have: checked before it is unpickled (None: the file as it "
        "is when the campaign starts; the store keeps that copy, named by its hash, and loads only it after)",
    )
    ensemble: int = Field(3, ge=1, le=16, description="committee size (uncertainty = spread of members)")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")
    dtype: Literal["float32", "float64"] = Field("float64", description="float64 for relaxations; float32 is faster")
    engine: Literal["auto", "torch-sim", "ase"] = Field(
        "auto",
        description="relaxation engine: batched torch-sim; auto: the same, with the ASE loop for a structure the "
        "batched engine fails on alone (recorded per result); ase: the ASE loop (the reference)",
    )
    cell_filter: Literal["frechet", "unit"] = Field("frechet", description="cell degrees of freedom in FIRE")
    fmax: float = Field(0.05, gt=0, description="eV/Å, relaxation force criterion")
    max_steps: int = Field(300, ge=1, description="relaxation steps before a structure counts as unconverged")
    structures_per_task: int = Field(200, ge=1, description="structures relaxed by one Dask task")
    rescore: bool = Field(
        True,
        description="a new committee rescores the candidates an earlier one relaxed (its energy and spread at "
        "their latest MLIP structure) and relaxes again only those that could be picked (relax_again_per_pick); "
        "false: every committee relaxes every candidate again",
    )
    relax_again_per_pick: int = Field(
        10,
        ge=1,
        description="a rescored candidate is relaxed again when its rescored optimistic e_hull ranks within this "
        "many times the round's DFT budget (or the screening shortlist, when that is longer) among the candidates "
        "not yet verified",
    )
    batch_atoms: int | None = Field(
        None, ge=1, description="most atoms in one batch (None: 2048 on CPU, estimated from GPU memory)"
    )
    steps_between_swaps: int | None = Field(
        None, ge=1, description="optimizer steps between in-flight batch swaps (None: 2 on CPU, 5 on GPU)"
    )
    cueq: bool | None = Field(None, description="cuEquivariance kernels (None: when installed and on CUDA)")
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    cold_start: ColdStartConfig = Field(default_factory=ColdStartConfig)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value == "cold-start":
            return value
        if value.endswith(_MODEL_SUFFIXES) or "/" in value:
            if not Path(value).is_file():
                raise ValueError(f"model file {value!r} does not exist")
            return value
        names = mace_mp_names()
        if value not in names:
            raise ValueError(f"{value!r} is not cold-start, a model file, or a mace_mp name ({', '.join(names)})")
        return value

    @model_validator(mode="before")
    @classmethod
    def _rescore_window_renamed(cls, value: Any) -> Any:
        """``rescore_window`` (eV/atom, 2026-12-05 stores) became ``rescore`` plus a rank: an absolute
        window did not carry across chemistries. null meant relax everything again."""
        if isinstance(value, dict) and "rescore_window" in value:
            value = dict(value)
            window = value.pop("rescore_window")
            value.setdefault("rescore", window is not None)
            warnings.warn(
                "mlip.rescore_window is replaced by mlip.rescore and mlip.relax_again_per_pick",
                DeprecationWarning,
                stacklevel=2,
            )
        return value

    @model_validator(mode="after")
    def _pin_needs_a_model(self) -> MLIPConfig:
        if self.model_sha256 is not None and self.is_cold_start:
            raise ValueError("model_sha256: pins a model file, but mlip.model is cold-start")
        return self

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"unknown device {value!r}: use auto, cpu, cuda or cuda:N")
        return value

    @property
    def is_cold_start(self) -> bool:
        return self.model == "cold-start"

    @property
    def is_model_file(self) -> bool:
        return self.model.endswith(_MODEL_SUFFIXES) or "/" in self.model


#: What each reference preset sets (see docs/stages/verify.md). ``ecut`` and
#: ``smearing`` (and the SCF tolerance) apply to GPAW; the rest to the protocol for any calculator.
REFERENCE_PRESETS: dict[str, dict[str, Any]] = {
    "fast": {
        "ecut": 300.0,
        "smearing": 0.1,
        "kpoint_density": 2.5,
        "fmax": 0.05,
        "stress_tol": 0.5,
        "max_steps": 60,
        "walltime_s": 3600.0,
        "scf": {"energy": 5e-4},
    },
    "accurate": {
        "ecut": 520.0,
        "smearing": 0.05,
        "kpoint_density": 5.0,
        "fmax": 0.01,
        "stress_tol": 0.1,
        "max_steps": 200,
        "walltime_s": 6 * 3600.0,
        "scf": {"energy": 1e-6, "density": 1e-6},
    },
}


class ReferenceConfig(_Strict):
    """The reference (DFT) calculator that verifies hits and produces training data.

    Fields left unset (None) come from ``preset``; :meth:`resolved` fills them in, and the
    settings hash (which energies may share a hull) is computed from the resolved values.
    """

    calculator: str = Field(
        "gpaw", validate_default=True, description="gpaw, emt, or module:Class of any ASE calculator"
    )
    preset: Literal["fast", "accurate"] = Field(
        "fast", description="fast (screening on a laptop) or accurate (converged settings) defaults"
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for the calculator (merged over the gpaw preset)"
    )
    ecut: float | None = Field(None, gt=0, description="gpaw: plane-wave cutoff in eV (None: from preset)")
    smearing: float | None = Field(None, gt=0, description="gpaw: Fermi-Dirac width in eV (None: from preset)")
    kpoint_density: float | None = Field(
        None, gt=0, description="k-points per Å⁻¹ of reciprocal length, when parameters set no kpts (None: preset)"
    )
    spin: Literal["auto", "on", "off"] = Field(
        "auto", description="spin polarisation: auto = on when a structure holds a magnetic element"
    )
    magmoms: dict[str, float] = Field(
        default_factory=dict, description="initial magnetic moments (µB) per element, over the built-in table"
    )
    fmax: float | None = Field(None, gt=0, description="eV/Å, DFT relaxation force criterion (None: preset)")
    stress_tol: float | None = Field(
        None, gt=0, description="GPa, largest stress component of a relaxed cell (None: preset)"
    )
    max_steps: int | None = Field(None, ge=0, description="DFT relaxation steps (0: static only; None: preset)")
    optimizer: Literal["BFGS", "FIRE", "LBFGS"] = Field("BFGS", description="ASE optimizer of the relaxation")
    relax_cell: bool = Field(True, description="relax the cell as well as positions")
    start: Literal["mlip", "initial"] = Field(
        "mlip",
        description="where a verification starts: the candidate's MLIP-relaxed structure, when its MLIP outcome is "
        "usable and it kept the generated structure's type (StructureMatcher) and volume (start_max_volume_change); "
        "else, or with 'initial', the generated structure. Recorded per calculation (dft table: start, start_reason)",
    )
    hessian: Literal["mlip", "default"] = Field(
        "mlip",
        description="BFGS's initial Hessian at an MLIP start: the screening committee's (finite differences in the "
        "relaxation's coordinates, on an MLIP worker), which saves DFT steps; or 'default', ASE's 70 eV/Å² times the "
        "identity. Other starts and optimizers use the default. Recorded per calculation (dft table: hessian)",
    )
    start_max_volume_change: float = Field(
        0.2,
        gt=0,
        description="start from the generated structure when the MLIP relaxation changed the volume by more than "
        "this fraction (a young model can squeeze a cell into another basin)",
    )
    recovery: list[dict[str, Any]] | None = Field(
        None, description="SCF recovery rungs: parameter updates tried in order (None: built-in ladder for gpaw)"
    )
    walltime_s: float | None = Field(
        None, gt=0, description="seconds one calculation may take before it is stopped (None: preset)"
    )
    isolate: bool | None = Field(
        None, description="run each calculation in its own process (None: yes, except for emt)"
    )
    launcher: str | None = Field(
        None, description="command prefix for parallel runs, e.g. 'mpirun -np {ranks}' (implies isolate)"
    )
    ranks: int = Field(1, ge=1, description="MPI ranks per calculation, substituted into launcher")
    pass_environment: list[str] = Field(
        default_factory=list,
        description="environment variables a calculation process keeps although their names look like "
        "credentials (…KEY, …TOKEN, …SECRET…, …PASSWORD…, …CREDENTIAL…, AWS_…): every other such variable is "
        "removed from the calculation's environment",
    )
    statics_per_task: int = Field(
        8,
        ge=1,
        description="single points (screening, training frames) one DFT task runs in one calculation "
        "process: the process start and calculator import are paid once, each keeps its own wall time",
    )

    @field_validator("calculator")
    @classmethod
    def _known_calculator(cls, value: str, info: ValidationInfo) -> str:
        if value == "gpaw" and not (info.context or {}).get(READ_ONLY) and importlib.util.find_spec("gpaw") is None:
            raise ValueError(
                "calculator 'gpaw' is not installed: pip install 'matdisc[gpaw]' (it builds against libxc, "
                "BLAS and FFTW; `make install` does both), or name another ASE calculator as module:Class"
            )
        if value in BUILTIN_CALCULATORS:
            return value
        if ":" not in value:
            raise ValueError(f"unknown calculator {value!r}: use gpaw, emt, or module:Class")
        if (info.context or {}).get(READ_ONLY):  # a saved config read back: importing would run its code
            return value
        module, _, attr = value.partition(":")
        try:  # find_spec imports a dotted name's parents: a missing parent raises
            spec = importlib.util.find_spec(module) if module and attr else None
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            raise ValueError(f"unknown calculator {value!r}: module {module!r} cannot be imported")
        try:
            loaded = importlib.import_module(module)
        except Exception as err:  # the module's own code failed: its words, on one line
            raise ValueError(f"calculator {value!r}: importing {module} failed: {type(err).__name__}: {err}") from None
        if not hasattr(loaded, attr):
            raise ValueError(f"unknown calculator {value!r}: {module} has no {attr}")
        return value

    @field_validator("magmoms")
    @classmethod
    def _known_elements(cls, value: dict[str, float]) -> dict[str, float]:
        from pymatgen.core import Element

        for symbol in value:
            if not Element.is_valid_symbol(symbol):
                raise ValueError(f"unknown element {symbol!r}")
        return value

    @field_validator("launcher")
    @classmethod
    def _launcher_template(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                value.format(ranks=1)
            except (KeyError, IndexError, ValueError):
                raise ValueError(f"launcher {value!r} may only use the placeholder {{ranks}}") from None
        return value

    #: Fields a preset decides (the accuracy), as opposed to what runs and how.
    ACCURACY_FIELDS: ClassVar[tuple[str, ...]] = (
        "ecut",
        "smearing",
        "kpoint_density",
        "fmax",
        "stress_tol",
        "max_steps",
        "walltime_s",
    )

    def under_preset(self, preset: str, **update: Any) -> ReferenceConfig:
        """These settings with ``preset`` deciding the accuracy fields (calculator, spin, parameters,
        launcher and the rest kept); ``update`` sets fields over that."""
        cleared = {name: None for name in self.ACCURACY_FIELDS}
        return ReferenceConfig.model_validate({**self.model_dump(), **cleared, "preset": preset, **update})

    def resolved(self) -> ReferenceConfig:
        """This config with every preset-dependent field filled in."""
        preset = REFERENCE_PRESETS[self.preset]
        update = {k: preset[k] for k in preset if k in type(self).model_fields and getattr(self, k) is None}
        return self.model_copy(update=update)

    @property
    def scf_tolerances(self) -> dict[str, float]:
        """GPAW's ``convergence`` for this preset (a user's ``parameters.convergence`` wins)."""
        return dict(REFERENCE_PRESETS[self.preset]["scf"])

    @property
    def runs_isolated(self) -> bool:
        if self.launcher is not None:
            return True
        return self.isolate if self.isolate is not None else self.calculator != "emt"


class ActiveLearningConfig(_Strict):
    """How many rounds, how each round spends its DFT budget, and when the campaign stops."""

    rounds: int = Field(
        2, ge=1, le=1000, description="active-learning rounds in all (a resumed campaign runs the missing ones)"
    )
    dft_budget: int = Field(8, ge=0, le=100_000, description="DFT verifications per round")
    hull_tolerance: float = Field(
        0.0, ge=0, description="eV/atom: a verified candidate within this of the DFT hull is a hit"
    )
    acquisition: Literal["uncertainty", "greedy", "random", "greedy_spread", "random_stratified"] = Field(
        "uncertainty",
        description="uncertainty: lowest optimistic e_hull (mean - kappa*sigma); greedy: lowest predicted "
        "e_hull; random: a seeded random draw; greedy_spread, random_stratified: greedy or random taking "
        "one candidate of every structure family before a second of any (baselines)",
    )
    kappa: float = Field(1.0, ge=0, description="weight of the committee spread in the optimistic e_hull")
    explore_fraction: float = Field(
        0.25,
        ge=0,
        le=1,
        description="uncertainty: share of the budget picked by optimistic e_hull, the rest by predicted e_hull",
    )
    diversity: bool = Field(
        True, description="never pick two structures StructureMatcher calls the same, nor one already verified"
    )
    max_per_composition: int | None = Field(
        2, ge=1, description="most picks per reduced formula in one round (None: no cap)"
    )
    query_failed_relaxations: bool = Field(
        True,
        description="uncertainty: candidates whose MLIP relaxation exploded come first in the exploration "
        "share (verified from their initial structure): the model failing on a structure is the plainest sign "
        "that it has not seen its like",
    )
    structure_spread: bool = Field(
        True,
        description="uncertainty, greedy_spread, random_stratified: take the best candidate of each structure "
        "family (prototype, or random crystals as one family) before a second of any, so a model's blind spot for "
        "one structure type costs a round one pick",
    )
    max_dft_total: int | None = Field(
        None, ge=0, description="stop once the campaign's rounds have used this many DFT calculations (None: no cap)"
    )
    patience: int | None = Field(
        None, ge=1, description="stop after this many rounds in a row without a new hit (None: never)"
    )

    @model_validator(mode="after")
    def _spread_needs_families(self) -> ActiveLearningConfig:
        if self.acquisition in ("greedy_spread", "random_stratified") and not self.structure_spread:
            raise ValueError(
                f"acquisition {self.acquisition} spreads over structure families: structure_spread must be true"
            )
        return self


class ScreeningConfig(_Strict):
    """Screening DFT when a budget runs short: cheaper settings rank a round's picks first.

    When what is left of a budget cannot verify all of a round's picks with the configured
    reference settings, the picks (from their MLIP-relaxed structures) get single-point
    calculations with these cheaper settings, and only those the screen puts within ``margin``
    of the DFT hull are verified, most stable first, as many as the budget still pays for.
    Screening energies form their own reference set: they rank, they never join the hull or
    the training data. Accuracy fields of ``reference`` (cutoff, smearing, k-points) are
    replaced by ``preset``'s unless set here; its calculator, spin and launcher are kept.
    """

    enabled: bool = Field(True, description="screen when a budget cannot verify a round's picks")
    preset: Literal["fast", "accurate"] = Field("fast", description="settings preset of the screening calculations")
    ecut: float | None = Field(None, gt=0, description="gpaw: plane-wave cutoff of the screen in eV (None: preset)")
    kpoint_density: float | None = Field(None, gt=0, description="k-points per Å⁻¹ of the screen (None: preset)")
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="calculator keyword arguments of the screen, over the reference's"
    )
    margin: float = Field(
        0.05, ge=0, description="eV/atom: a screened pick further than this above the DFT hull is not verified"
    )
    shortlist: int | None = Field(
        None,
        ge=1,
        description="screen this many of every round's acquisition order, budget or not, and verify "
        "the best screened (None: screen only when a budget runs short)",
    )
    walltime_s: float | None = Field(
        None, gt=0, description="seconds one screening calculation may take (None: the preset's)"
    )
    geometries: list[Literal["mlip", "initial"]] = Field(
        ["mlip"],
        min_length=1,
        description="where a candidate gets its single points: its MLIP-relaxed and/or "
        "its initial (generated) structure; the lowest energy ranks it (both: a young model's relaxation may "
        "end in a wrong basin)",
    )

    max_volume_change: float | None = Field(
        0.2,
        gt=0,
        description="a candidate whose MLIP relaxation changed its cell volume by more than this "
        "fraction is screened at its initial structure instead of the MLIP one (None: never)",
    )

    @field_validator("geometries")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"geometries {value} names one twice")
        return value

    @property
    def active_shortlist(self) -> int | None:
        """The shortlist every round screens (None: off, or screening disabled)."""
        return self.shortlist if self.enabled else None


class BudgetConfig(_Strict):
    """Resource budgets of the whole campaign (None: unlimited). Spending is the measured compute
    time recorded in the store; the campaign screens a round's picks with cheaper DFT (see
    :class:`ScreeningConfig`), shrinks its DFT batch to what is left and stops cleanly, with the
    reason in the store and the UI, instead of overrunning."""

    dft_cpu_hours: float | None = Field(
        None, gt=0, description="reference calculations: seconds × cores per calculation, in hours"
    )
    gpu_hours: float | None = Field(
        None, gt=0, description="MLIP worker hours: relaxations and training (on the GPU, or the CPU without one)"
    )
    wall_hours: float | None = Field(None, gt=0, description="wall time of the campaign's stages, in hours")
    screening: ScreeningConfig = Field(default_factory=ScreeningConfig)

    #: The budgeted resources (the other fields say how a short budget is spent).
    LIMITS: ClassVar[tuple[str, ...]] = ("dft_cpu_hours", "gpu_hours", "wall_hours")

    def limits(self) -> dict[str, float | None]:
        return {name: getattr(self, name) for name in self.LIMITS}


class SlurmConfig(_Strict):
    """dask-jobqueue settings (pip install matdisc[hpc]): two job pools, one Dask scheduler.

    DFT jobs (CPU partition) scale adaptively between 0 and ``dft_jobs``; MLIP jobs (GPU
    partition) are a fixed pool of ``mlip_jobs`` (MACE work comes in bursts that a GPU job's
    queue wait would miss). The store must be on a filesystem the login node sees.
    """

    queue: str | None = Field(None, description="partition of the DFT (CPU) jobs")
    account: str | None = None
    cores: int = Field(8, ge=1, description="cores per DFT job")
    memory: str = "16GB"
    walltime: str = "04:00:00"
    dft_jobs: int = Field(2, ge=0, description="maximum DFT (CPU) jobs under adaptive scaling")
    mlip_jobs: int = Field(1, ge=0, description="MLIP (GPU) jobs, a fixed pool")
    mlip_queue: str | None = Field(None, description="partition of the MLIP jobs (default: queue)")
    mlip_cores: int = Field(4, ge=1, description="cores per MLIP job")
    mlip_memory: str = "32GB"
    gpus_per_mlip_job: int = Field(1, ge=0, le=1, description="1: each MLIP job asks for a GPU (--gres=gpu:1)")
    interface: str | None = Field(None, description="network interface the workers reach the scheduler on, e.g. ib0")
    job_extra_directives: list[str] = Field(default_factory=list)

    @field_validator("walltime")
    @classmethod
    def _slurm_time(cls, value: str) -> str:
        slurm_seconds(value)
        return value


def slurm_seconds(text: str) -> float:
    """Seconds of a Slurm time ("MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS")."""
    days, dash, rest = text.strip().rpartition("-")
    if dash and not days:
        raise ValueError(f"{text!r} is not a Slurm time (HH:MM:SS or D-HH:MM:SS)")
    parts = rest.split(":")
    try:
        numbers = [int(p) for p in parts]
        d = int(days) if days else 0
    except ValueError:
        raise ValueError(f"{text!r} is not a Slurm time (HH:MM:SS or D-HH:MM:SS)") from None
    if not 1 <= len(numbers) <= 3 or min(numbers + [d]) < 0:
        raise ValueError(f"{text!r} is not a Slurm time (HH:MM:SS or D-HH:MM:SS)")
    if days:  # D-HH[:MM[:SS]]
        h, m, s = (numbers + [0, 0])[:3]
    else:  # MM, MM:SS or HH:MM:SS
        h, m, s = [0, *numbers, 0][:3] if len(numbers) < 3 else numbers
    return float(((d * 24 + h) * 60 + m) * 60 + s)


class ComputeConfig(_Strict):
    """Where tasks run: a local Dask cluster, an existing scheduler, or Slurm."""

    scheduler: str = Field("local", description="local, slurm, or a scheduler address tcp://host:8786")
    dft_workers: int | None = Field(None, ge=1, description="local DFT workers (None: cores - mlip workers)")
    mlip_workers: int = Field(1, ge=1, description="local MLIP workers (one per GPU when CUDA is present)")
    threads_per_dft_worker: int = Field(1, ge=1, description="OMP_NUM_THREADS of each DFT worker")
    threads_per_mlip_worker: int | None = Field(
        None,
        ge=1,
        description="local CPU MLIP workers: torch threads each (None: the cores shared out among them, since a "
        "round never runs MLIP and DFT stages at once; set 1 when other work shares the machine)",
    )
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value in LOCAL_SCHEDULERS or _ADDRESS.match(value):
            return value
        raise ValueError(f"{value!r} is not local, slurm, or an address like tcp://host:8786")


class MaterialsProjectConfig(_Strict):
    """Known phases from the Materials Project (mp-api): structures only, computed by the campaign."""

    enabled: bool = Field(False, description="fetch the Materials Project's phases of every subsystem")
    endpoint: str = Field("https://api.materialsproject.org/", description="Materials Project API address")
    api_key_env: str = Field("MP_API_KEY", description="environment variable holding the API key")
    max_e_above_hull: float = Field(
        0.05, ge=0, description="eV/atom: fetch phases within this of the Materials Project's own hull"
    )


class KnownPhasesConfig(_Strict):
    """Phases already known for the system: they join the DFT hull, and hits are compared with them."""

    files: list[str] = Field(
        default_factory=list,
        description="CIF/extxyz files, folders of them, globs, or JSON lists of pymatgen "
        "ComputedStructureEntry/Structure; computed with the reference settings at the start",
    )
    materials_project: MaterialsProjectConfig = Field(default_factory=MaterialsProjectConfig)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return files_shorthand(value)

    @property
    def configured(self) -> bool:
        return bool(self.files) or self.materials_project.enabled


class CampaignConfig(_Strict):
    """A whole discovery campaign."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="campaign name")
    chemsys: list[str] = Field(..., description="elements of the chemical system, e.g. [Cu, Pd]")
    store: str | None = Field(
        None,
        description="campaign store: a path (default runs/NAME.zarr) or an fsspec URL such as s3://bucket/NAME.zarr",
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    mlip: MLIPConfig = Field(default_factory=MLIPConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    active_learning: ActiveLearningConfig = Field(default_factory=ActiveLearningConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    known_phases: KnownPhasesConfig = Field(default_factory=KnownPhasesConfig)

    @field_validator("chemsys")
    @classmethod
    def _elements(cls, value: list[str]) -> list[str]:
        from pymatgen.core import Element

        if not value:
            raise ValueError("empty chemical system: name at least one element")
        for symbol in value:
            if not Element.is_valid_symbol(symbol):
                raise ValueError(f"unknown element {symbol!r}")
        if len(set(value)) != len(value):
            raise ValueError(f"repeated element in {value}")
        return value

    @model_validator(mode="after")
    def _defaults_and_cross_checks(self) -> CampaignConfig:
        if self.store is None:
            object.__setattr__(self, "store", str(Path("runs") / f"{self.name}.zarr"))
        if self.reference.calculator == "emt":
            from ase.calculators.emt import parameters

            missing = [el for el in self.chemsys if el not in parameters]
            if missing:
                raise ValueError(
                    f"reference.calculator: emt has no parameters for {', '.join(missing)} "
                    f"(it knows {', '.join(sorted(parameters))})"
                )
        if self.compute.scheduler == "slurm":  # a calculation longer than its job never finishes: refused now
            job = slurm_seconds(self.compute.slurm.walltime)
            calc = float(self.reference.resolved().walltime_s or 0)
            if calc > job:
                raise ValueError(
                    f"reference.walltime_s: a calculation may take {calc / 3600:g} h "
                    f"({self.reference.preset} preset unless set) but compute.slurm.walltime gives a DFT job "
                    f"{job / 3600:g} h: raise compute.slurm.walltime or lower reference.walltime_s"
                )
        if self.known_phases.files:  # read now: a bad file is a config error, before any store exists
            from matdisc.known_phases import from_files

            from_files(self.known_phases.files, self.chemsys)
        self._check_structure_files()
        return self

    def _check_structure_files(self) -> None:
        """Candidate files and substitution parents read now: a bad file is a config error, and a
        candidate larger than ``generation.max_atoms`` is refused rather than dropped."""
        from matdisc.structure_files import StructureFileError, read_all

        gen = self.generation
        if gen.from_files.files:
            for s in read_all(gen.from_files.files, self.chemsys, "generation.from_files"):
                if len(s.structure) > gen.max_atoms:
                    raise StructureFileError(
                        f"generation.from_files: {s.source}: {s.id} ({s.formula}) has {len(s.structure)} atoms, "
                        f"more than generation.max_atoms ({gen.max_atoms})"
                    )
        extra = self.mlip.training.extra_data
        if extra is not None:
            from matdisc.structure_files import labelled_frames

            labelled_frames(extra.file, extra.weight, self.chemsys)
        if gen.substitution.parents:  # a parent's elements are replaced: only its own file must parse
            read_all(gen.substitution.parents, [], "generation.substitution.parents", check_elements=False)

    @field_validator("store", mode="before")
    @classmethod
    def _store_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    @property
    def store_path(self) -> Path | str:
        """Where the store is: a local path, or the fsspec URL (a string) of a store on an object store."""
        assert self.store is not None
        return as_location(self.store)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def mace_mp_names() -> list[str]:
    """Foundation model names that ``mace.calculators.mace_mp`` accepts."""
    try:
        from mace.calculators.foundations_models import mace_mp_names as names
    except ImportError:  # pragma: no cover - mace is a hard dependency
        return ["small", "medium", "large", "medium-mpa-0"]
    return [n for n in names if n]


def format_validation_error(err: ValidationError) -> list[str]:
    """One line per problem: ``field.path: message``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        if not e["loc"] and re.match(r"^[\w.]+: ", msg):  # cross-field checks name their own field
            lines.append(msg)
        else:
            lines.append(f"{loc}: {msg}")
    return lines


def parse_config(data: dict[str, Any], *, default_name: str = "campaign") -> CampaignConfig:
    """Validate a mapping; raises :class:`UserError` with one line per problem."""
    if not isinstance(data, dict):
        raise UserError("config: the campaign file must be a mapping of keys to values")
    data = {"name": default_name, **data}
    try:
        return CampaignConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err)) from None


#: Validation context key: the config is read back from a store to be looked at, not run, so
#: nothing it names (a calculator module) is imported. ``saved_config`` sets it.
READ_ONLY = "read_only"


def saved_config(config_json: str) -> CampaignConfig:
    """A store's recorded campaign config, validated without importing the modules it names: looking
    at a store (``matdisc status``) must not run code that someone else's config points to."""
    return CampaignConfig.model_validate_json(config_json, context={READ_ONLY: True})


def load_config(path: str | Path) -> CampaignConfig:
    """Load and validate a campaign YAML file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {str(path)!r} is a folder, not a campaign file")
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:  # unreadable (permissions, a broken mount)
        raise UserError(f"config: {path} cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"config: {path} is not a text file (byte {err.start} is not UTF-8)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"config: {path} is not valid YAML{where}") from None
    if data is None:
        raise UserError(f"config: {path} is empty (a campaign needs at least chemsys)")
    if not isinstance(data, dict):
        raise UserError(f"config: {path} holds a {type(data).__name__}, not a mapping of settings")
    return parse_config(data, default_name=path.stem)
