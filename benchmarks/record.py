"""``--record``: append a benchmark's JSON line, with when, where and what code, to the docs.

Each benchmark prints one JSON line; with ``--record`` it also lands in
``docs/benchmarks/NAME.jsonl``, which the documentation site shows (``docs/hooks.py``). The
figures are kept as measured: what they mean is for the pages of the stages to say.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """CPU model and count (and GPUs, when torch sees any): the numbers depend on them."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = f"{os.cpu_count()} x {cpu}"
    try:
        import torch

        if torch.cuda.is_available():
            out += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return out


def commit() -> str:
    """The commit measured, marked ``-dirty`` when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def record(name: str, result: dict[str, Any], argv: list[str] | None = None) -> Path:
    """Append one run of ``benchmarks/NAME.py`` to ``docs/benchmarks/NAME.jsonl``."""
    argv = sys.argv if argv is None else argv
    args = [a for a in argv[1:] if a != "--record"]
    entry = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "machine": machine(), "commit": commit(),
             "command": " ".join([f"benchmarks/{name}.py", *args]), "result": result}
    path = ROOT / "docs" / "benchmarks" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return path
