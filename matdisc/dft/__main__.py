"""``python -m matdisc.dft DIR PARENT_PID [DIR ...]``: run the job in each DIR (see :mod:`matdisc.dft.runner`)."""

import sys

from matdisc.dft.runner import main

sys.exit(main(sys.argv))
