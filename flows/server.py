"""The Prefect API a campaign reports to: the user's (``PREFECT_API_URL``) or a local server.

Ephemeral mode would start a throwaway server in every Dask worker, invisible to the UI.
So without ``PREFECT_API_URL`` matdisc starts one ``prefect server`` on 127.0.0.1 (SQLite
under ``~/.matdisc/prefect``), leaves it running for the UI, and reuses it next time.
``matdisc server stop`` stops it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from matdisc.errors import UserError
from matdisc.locations import matdisc_home

home = matdisc_home


def _state_file() -> Path:
    return home() / "prefect-server.json"


def log_file() -> Path:
    return home() / "prefect-server.log"


def recorded() -> dict | None:
    """What matdisc recorded of the server it started (pid, api_url, log_offset), if any."""
    state = _state_file()
    return json.loads(state.read_text()) if state.exists() else None


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def server_env() -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_HOME": str(home() / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",
    }


def ensure_api(port: int | None = None, timeout: float = 90.0) -> str:
    """The API URL to use, starting a local server if needed (and setting PREFECT_API_URL)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    state = _state_file()
    if state.exists():
        url = json.loads(state.read_text())["api_url"]
        if healthy(url):
            os.environ["PREFECT_API_URL"] = url
            return url
    port = port or int(os.environ.get("MATDISC_PREFECT_PORT", "4200"))
    url = f"http://127.0.0.1:{port}/api"
    if healthy(url):
        raise UserError(
            f"port {port} already serves a Prefect API not started by matdisc; "
            f"set PREFECT_API_URL={url} to use it, or MATDISC_PREFECT_PORT to pick another port"
        )
    home().mkdir(parents=True, exist_ok=True)
    log = open(log_file(), "ab")
    log_offset = log.tell()  # `matdisc server status` reads this server's lines only
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=server_env(),
        start_new_session=True,
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the Prefect server exited at start; see {log_file()}")
        if healthy(url):
            state.write_text(json.dumps({"pid": proc.pid, "api_url": url, "log_offset": log_offset}))
            os.environ["PREFECT_API_URL"] = url
            return url
        time.sleep(0.5)
    proc.terminate()
    raise UserError(f"the Prefect server did not answer within {timeout:.0f} s; see {log_file()}")


def ui_url(api_url: str) -> str:
    return api_url.rstrip("/").removesuffix("/api")


def stop() -> str:
    state = _state_file()
    if not state.exists():
        return "no matdisc Prefect server is recorded as running"
    info = json.loads(state.read_text())
    try:
        os.killpg(info["pid"], signal.SIGTERM)
        msg = f"stopped the Prefect server (pid {info['pid']}) at {info['api_url']}"
    except ProcessLookupError:
        msg = "the recorded Prefect server was not running"
    state.unlink()
    return msg
