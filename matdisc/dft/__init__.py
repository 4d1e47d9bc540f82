"""Reference calculations through ASE calculators (GPAW by default): protocol, recovery, isolation."""

from matdisc.dft.calculators import calculator_parameters, make_calculator, settings_hash
from matdisc.dft.protocol import perturbed_copies, run_protocol
from matdisc.dft.runner import run_reference, run_static, run_statics

__all__ = [
    "calculator_parameters",
    "make_calculator",
    "perturbed_copies",
    "run_protocol",
    "run_reference",
    "run_static",
    "run_statics",
    "settings_hash",
]
