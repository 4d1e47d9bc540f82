"""``python -m matdisc.dft DIR PARENT_PID``: run the job in DIR (see :mod:`matdisc.dft.runner`)."""

import sys

from matdisc.dft.runner import main

sys.exit(main(sys.argv))
