"""MACE: model registry with provenance, batched relaxation, committee uncertainty, training."""

from matdisc.mlip.model import (
    ModelError,
    ModelInfo,
    configured_model,
    describe,
    file_sha256,
    load_calculator,
    require_elements,
    resolve_device,
)
from matdisc.mlip.relax import relax_ase, relax_many, rescore_many
from matdisc.mlip.train import TrainedModel, evaluate, predict_energies, train_committee, train_mace

__all__ = [
    "ModelError",
    "ModelInfo",
    "TrainedModel",
    "configured_model",
    "describe",
    "evaluate",
    "file_sha256",
    "load_calculator",
    "predict_energies",
    "relax_ase",
    "relax_many",
    "rescore_many",
    "require_elements",
    "resolve_device",
    "train_committee",
    "train_mace",
]
