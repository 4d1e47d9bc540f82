"""ruff's lint and format checks on the library and the engine side, as configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args, "matdisc", "flows"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_ruff_lint_passes():
    out = ruff("check", "--output-format", "concise")
    assert out.returncode == 0, out.stdout[-3000:]


def test_ruff_format_leaves_the_code_as_it_is():
    out = ruff("format", "--check")
    assert out.returncode == 0, out.stdout[-3000:]
