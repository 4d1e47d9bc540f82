"""mkdocs hooks: pages generated from the code and from recorded benchmark runs.

``<!-- matdisc:config-reference -->`` becomes the table of every campaign-file field (from the
pydantic models in :mod:`matdisc.config`); ``<!-- matdisc:benchmarks NAME -->`` becomes the table
of the runs ``benchmarks/NAME.py --record`` appended to ``docs/benchmarks/NAME.jsonl``;
``<!-- matdisc:store-schema -->`` becomes the tables of :mod:`matdisc.store.schema`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = "<!-- matdisc:config-reference -->"
SCHEMA = "<!-- matdisc:store-schema -->"
BENCH = re.compile(r"<!-- matdisc:benchmarks (\w+) -->")


def _default(info: Any) -> str:
    from pydantic_core import PydanticUndefined

    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    value = info.default_factory() if info.default_factory is not None else info.default
    return str(value)


def config_rows(model: Any = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) of every field of the campaign file, in model order."""
    from pydantic import BaseModel

    from matdisc.config import CampaignConfig

    model = model or CampaignConfig
    rows: list[tuple[str, str, str]] = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += config_rows(ann, f"{prefix}{name}.")
        else:
            rows.append((f"{prefix}{name}", _default(info), (info.description or "").replace("|", "\\|")))
    return rows


def config_table() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | `{default}` | {text} |" for key, default, text in config_rows()]
    return "\n".join(lines)


def schema_tables() -> str:
    """Every table the store declares: what it holds, its row dimension, commit keys and columns."""
    from matdisc.store.schema import TABLES

    out = []
    for t in TABLES.values():
        extra = " (plus the trainer's metric columns)" if t.open_metrics else ""
        structures = "; one structure per row" if t.structures else ""
        cols = ", ".join(f"`{c}` {d}" for c, d in t.columns.items())
        out.append(
            f"**`{t.name}`**: {t.doc}. Rows: `{t.row_dim}`{structures}; commit key `{t.key}`.\n"
            f"Columns{extra}: {cols}."
        )
    return "\n\n".join(out)


def benchmark_table(name: str) -> str:
    """The recorded runs of one benchmark, newest first: date, machine, commit, and its JSON keys."""
    path = ROOT / "docs" / "benchmarks" / f"{name}.jsonl"
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not runs:
        return f"*No recorded run of `benchmarks/{name}.py` yet (`--record` appends one).*"
    out = []
    for run in reversed(runs):
        meta = f"**{run['date']}**, {run['machine']}, commit `{run['commit']}`, `{run['command']}`"
        figures = json.dumps(run["result"], indent=1)
        out.append(f"{meta}\n\n```json\n{figures}\n```")
    return "\n\n".join(out)


def on_page_markdown(markdown: str, **_: Any) -> str:
    if CONFIG in markdown:
        markdown = markdown.replace(CONFIG, config_table())
    if SCHEMA in markdown:
        markdown = markdown.replace(SCHEMA, schema_tables())
    return BENCH.sub(lambda m: benchmark_table(m.group(1)), markdown)
