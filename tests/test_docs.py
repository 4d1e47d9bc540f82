"""The documentation site builds with --strict, its configuration reference is generated from
the models, and the README is a front door whose links lead into it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_strictly_with_every_config_field_and_the_api(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "docs"))
    from hooks import config_rows

    page = (site / "configuration" / "index.html").read_text()
    rows = config_rows()
    assert len(rows) > 100 and {"budget.screening.max_volume_change", "reference.statics_per_task",
                                "known_phases.materials_project.api_key_env"} <= {k for k, *_ in rows}
    missing = [key for key, *_ in rows if f"<code>{key}</code>" not in page]
    assert not missing, f"configuration page lacks {missing}"
    api = (site / "api" / "index.html").read_text()
    assert "open_campaign" in api and "run_statics" in api and "known_phase_summary" in api  # mkdocstrings ran
    assert not (site / "hooks.py").exists() and not (site / "benchmarks" / "generate.jsonl").exists()


def test_the_readme_is_a_front_door_whose_links_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\(((?:docs|examples|notebooks)/[^)#]+)", readme)
    assert len(links) >= 10 and all((ROOT / link).exists() for link in links), links
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert all(page in nav for page in pages), pages  # every page is in the navigation
