"""The process's one multiprocessing forkserver, shared by generation pools and MACE training.

A forkserver is one per process and its preload list is read only when it starts, so every user
in matdisc takes it from :func:`forkserver_context`. Training children need mace's trainer
(~12 s of imports on a 2-core machine, :mod:`matdisc.mlip.launch`): it is preloaded when the
process is about to train, or has mace imported already (the orchestrator, a test: it likely
trains later), so generation pools started first do not leave training without it. A process
with neither keeps a light forkserver.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import sys

#: The module every training child needs.
TRAINER = "mace.cli.run_train"


def forkserver_context(train: bool = False) -> multiprocessing.context.ForkServerContext:
    """multiprocessing's forkserver context, the trainer preloaded when this process trains
    (``train``) or has mace imported."""
    ctx = multiprocessing.get_context("forkserver")
    if train or "mace" in sys.modules:
        ctx.set_forkserver_preload([TRAINER])
    return ctx
