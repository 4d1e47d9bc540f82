"""Reference calculations through ASE calculators (GPAW by default)."""

from matdisc.dft.calculators import calculator_parameters, make_calculator, settings_hash
from matdisc.dft.protocol import perturbed_copies, run_reference

__all__ = ["calculator_parameters", "make_calculator", "perturbed_copies", "run_reference", "settings_hash"]
