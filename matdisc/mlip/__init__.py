"""MACE: model loading with provenance, batched relaxation, committee uncertainty, training."""

from matdisc.mlip.model import ModelInfo, file_sha256, load_calculator, resolve_device
from matdisc.mlip.relax import relax_many
from matdisc.mlip.train import train_committee, train_mace

__all__ = ["ModelInfo", "file_sha256", "load_calculator", "relax_many", "resolve_device", "train_committee",
           "train_mace"]
