"""ASE's EMT with injected faults, for the runner's fault tests: a calculation that crashes its
process (SIGSEGV, as a calculator's C code can) or hangs, chosen by the structure's element.
Every energy it returns is EMT's own."""

from __future__ import annotations

import os
import signal
import time

from ase.calculators.emt import EMT


class FaultyEMT(EMT):
    """EMT, except that it segfaults on silver and hangs on gold."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        symbols = set(atoms.get_chemical_symbols()) if atoms is not None else set()
        if "Ag" in symbols:
            os.kill(os.getpid(), signal.SIGSEGV)
        if "Au" in symbols:
            time.sleep(3600)
        super().calculate(atoms, properties, system_changes)


class EnvironmentEMT(EMT):
    """EMT that writes the names of its process's environment variables next to itself
    (``environment.txt`` in the working directory), for the credential-scrubbing test."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        with open("environment.txt", "w") as f:
            f.write("\n".join(sorted(os.environ)))
        super().calculate(atoms, properties, system_changes)
