"""A private local Prefect server for a benchmark: ``matdisc run``'s server, in a scratch home."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prefect_server(tmp: Path, **env: str) -> Iterator[str]:
    """Start a real ``prefect server`` on 127.0.0.1 (a free port, state under ``tmp``); yield its API URL."""
    os.environ.update(MATDISC_HOME=str(tmp / "home"), MATDISC_PREFECT_PORT=str(free_port()),
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1", **env)
    os.environ.pop("PREFECT_API_URL", None)
    from matdisc_flows import server

    api = server.ensure_api()
    try:
        yield api
    finally:
        server.stop()
