"""The Prefect UI as a user's browser shows it: a real local Prefect server (its UI included), the
product's own artifact code run in a flow against it, and Debian's Chromium headless reading the
pages (the Makefile installs it)."""

from __future__ import annotations

import html
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import copy_campaign, stop_process_group

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

#: Runs the product's artifact functions for round 2 of a copy of the session campaign, in a flow.
FLOW = """
import sys
from prefect import flow
from matdisc.config import CampaignConfig
from matdisc.store import open_campaign
from matdisc_flows import artifacts

cfg = CampaignConfig.model_validate_json(open(sys.argv[1]).read())

@flow(name="browser-check")
def figures():
    artifacts.round_figures(cfg, 2, open_campaign(cfg.store_path).candidates())
    artifacts.report_link(cfg)

state = figures(return_state=True)
print(state.state_details.flow_run_id)
"""


@pytest.fixture()
def ui_server(tmp_path):
    """``prefect server start`` on a free port of 127.0.0.1 with its UI; (URL, environment)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"{url}/api",
        "PREFECT_UI_API_URL": f"{url}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_AUTH_STRING", None)
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if urllib.request.urlopen(f"{url}/api/health", timeout=5).read() == b"true":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(1)
        yield url, env
    finally:
        stop_process_group(proc)
        log.close()


def _page(url: str, tmp_path: Path, shot: str) -> str:
    """The page's DOM after its scripts ran (and a screenshot of it, kept beside the test's files)."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
            "--window-size=1280,1000"]
    subprocess.run([*args, f"--screenshot={tmp_path / shot}", url], capture_output=True, timeout=120, check=True)
    assert (tmp_path / shot).stat().st_size > 10_000  # a rendered page, not a blank one
    out = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout


def _artifact_id(url: str, key: str) -> str:
    """The id of the latest artifact of ``key``, from the server's REST API."""
    import json

    body = json.dumps({"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}).encode()
    request = urllib.request.Request(f"{url}/api/artifacts/filter", body, {"Content-Type": "application/json"})
    found = json.loads(urllib.request.urlopen(request, timeout=30).read())
    assert len(found) == 1, (key, found)
    return found[0]["id"]


def _text(dom: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_the_flow_run_page_shows_the_round_figures_inline_and_names_the_report(campaign_store, ui_server, tmp_path):
    cfg, _ = campaign_store
    url, env = ui_server
    copy = copy_campaign(cfg, tmp_path, "copy.zarr")
    (tmp_path / "cfg.json").write_text(copy.model_dump_json())
    run = subprocess.run([sys.executable, "-c", FLOW, str(tmp_path / "cfg.json")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    flow_run = run.stdout.strip().splitlines()[-1]

    page = _text(_page(f"{url}/runs/flow-run/{flow_run}", tmp_path, "flow-run.png"))
    assert "browser-check" in page and "Completed" in page and "campaign report:" in page, page[:3000]
    run_name = re.search(r"Flow Run: (\S+)", page)[1]

    for name in ("hull", "parity"):  # the image is in the page itself: no file:// the browser refuses
        dom = _page(f"{url}/artifacts/artifact/{_artifact_id(url, f'cu-pd-emt-{name}-r2')}", tmp_path, f"{name}.png")
        images = re.findall(r'<img[^>]*src="(data:image/png;base64,[^"]{1000,})"', dom)
        assert len(images) == 1, _text(dom)[:2000]
        assert f"{name} plot, round 2" in dom and run_name in _text(dom)  # linked to its flow run
    report = _text(_page(f"{url}/artifacts/artifact/{_artifact_id(url, 'cu-pd-emt-report')}", tmp_path, "report.png"))
    assert "copy-report/report.html" in report and "matdisc report" in report, report[:2000]
    assert (tmp_path / "copy-report" / "report.html").is_file()
