"""The Prefect API a campaign reports to: the user's (``PREFECT_API_URL``) or a local server.

Ephemeral mode would start a throwaway server in every Dask worker, invisible to the UI.
So without ``PREFECT_API_URL`` matdisc starts one ``prefect server`` on 127.0.0.1 (SQLite
under ``~/.matdisc/prefect``), leaves it running for the UI, and reuses it next time.
``matdisc server stop`` stops it.

Anyone who can reach the API can schedule runs of a campaign whose config runs code, so the
server matdisc starts requires an auth string it generates (``PREFECT_SERVER_API_AUTH_STRING``),
kept in the state file only its owner can read; matdisc's clients (and the Dask workers and
flow runs it starts) get it as ``PREFECT_API_AUTH_STRING``. ``matdisc server env`` prints both
variables for other shells (``prefect worker start``, ``prefect deploy``) and the UI's login.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
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
    """What matdisc recorded of the server it started (pid, api_url, auth, log_offset), if any."""
    state = _state_file()
    return json.loads(state.read_text()) if state.exists() else None


def _record(info: dict) -> None:
    """The state file, readable by its owner only: it holds the API's auth string."""
    fd = os.open(_state_file(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when it existed with wider permissions
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)


def _use(url: str, auth: str | None) -> str:
    """Point this process's Prefect clients (and the processes it starts) at the API."""
    os.environ["PREFECT_API_URL"] = url
    if auth:
        os.environ["PREFECT_API_AUTH_STRING"] = auth
    return url


def configured_api() -> str | None:
    """The API this process talks to: ``PREFECT_API_URL``, else the one the user's Prefect profile
    names, else the server matdisc started (with its auth string), else None."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    configured = prefect_configured_api()
    if configured is not None:
        os.environ["PREFECT_API_URL"] = configured[0]
        return configured[0]
    info = recorded()
    return _use(info["api_url"], info.get("auth")) if info else None


def auth_headers() -> dict[str, str]:
    """HTTP headers for a plain request to the API (what Prefect's client sends)."""
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}


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


#: What Prefect itself resolves (profiles, ``prefect.toml``, ``.env``, Prefect Cloud's login), asked
#: in a child: importing Prefect here would freeze its settings before matdisc sets its own.
_PREFECT_API = (
    "import json; from prefect.context import get_settings_context as c; s = c(); "
    "print(json.dumps({'url': s.settings.api.url or '', 'profile': s.profile.name}))"
)


def prefect_configured_api() -> tuple[str, str] | None:
    """(url, profile) of the API the user's own Prefect settings name, or None when they name none."""
    try:
        env = {k: v for k, v in os.environ.items() if v or not k.startswith("PREFECT_")}  # empty: unset
        out = subprocess.run([sys.executable, "-c", _PREFECT_API], capture_output=True, text=True, timeout=120, env=env)
        found = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else {}
    except (OSError, subprocess.TimeoutExpired, ValueError):
        found = {}
    return (found["url"], found.get("profile", "")) if found.get("url") else None


def ensure_api(port: int | None = None, timeout: float = 90.0) -> str:
    """The API URL to use: ``PREFECT_API_URL``, else the one the user's Prefect settings name (a
    profile, Prefect Cloud), else a local server matdisc starts (and says so); sets PREFECT_API_URL."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    configured = prefect_configured_api()
    if configured is not None:
        url, profile = configured
        print(f"matdisc: using the Prefect API of your profile {profile!r}: {url}", file=sys.stderr, flush=True)
        os.environ["PREFECT_API_URL"] = url  # its key or auth string come from the same profile
        return url
    info = recorded()
    if info is not None and healthy(info["api_url"]):
        if info.get("auth"):
            return _use(info["api_url"], info["auth"])
        # started by an older matdisc, without authentication: replaced by one that requires it
        print("matdisc: restarting the local Prefect server with authentication", file=sys.stderr, flush=True)
        stop()
        _wait_down(info["api_url"])
    port = port or int(os.environ.get("MATDISC_PREFECT_PORT", "4200"))
    url = f"http://127.0.0.1:{port}/api"
    if healthy(url):
        raise UserError(
            f"port {port} already serves a Prefect API not started by matdisc; "
            f"set PREFECT_API_URL={url} to use it, or MATDISC_PREFECT_PORT to pick another port"
        )
    print(f"matdisc: no Prefect API configured (PREFECT_API_URL, a profile): starting one at {url}", file=sys.stderr)
    home().mkdir(parents=True, exist_ok=True)
    log = open(log_file(), "ab")
    log_offset = log.tell()  # `matdisc server status` reads this server's lines only
    auth = f"matdisc:{secrets.token_urlsafe(24)}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**server_env(), "PREFECT_SERVER_API_AUTH_STRING": auth},
        start_new_session=True,
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the Prefect server exited at start; see {log_file()}")
        if healthy(url):
            _record({"pid": proc.pid, "api_url": url, "auth": auth, "log_offset": log_offset})
            return _use(url, auth)
        time.sleep(0.5)
    proc.terminate()
    raise UserError(f"the Prefect server did not answer within {timeout:.0f} s; see {log_file()}")


def _wait_down(url: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while healthy(url, timeout=1.0) and time.time() < deadline:
        time.sleep(0.2)


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
