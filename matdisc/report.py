"""``matdisc report STORE``: one self-contained HTML file and the verified hits as CIF files.

The figures are :mod:`matdisc.analysis`'s, embedded as base64 PNG so the file can be mailed
or attached to a Prefect run; the tables are the store's own numbers.
"""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from matdisc import analysis
from matdisc.analysis import hits_by_source
from matdisc.config import CampaignConfig
from matdisc.store import open_campaign
from matdisc.store.tables import store_name, store_url

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}img{max-width:100%}h2{border-bottom:1px solid #ddd;padding-bottom:3px}"""


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(df: pd.DataFrame, floats: str = "{:.4g}") -> str:
    return df.to_html(index=False, float_format=floats.format, na_rep="-", escape=True, border=0)


def default_report_dir(store: Path | str) -> Path:
    """``<store>-report`` beside the store (``runs/x.zarr`` -> ``runs/x-report``); in the working
    directory for a store at a URL."""
    return (Path.cwd() if store_url(store) else Path(store).parent) / f"{store_name(store)}-report"


def write_report(store: str | Path, out: str | Path | None = None) -> Path:
    """Write ``out/report.html`` and ``out/hits/<id>.cif``; returns the HTML path.

    ``out`` defaults to ``<store>-report`` beside the store. The store is only read.
    """
    camp = open_campaign(store)
    out = Path(out) if out else default_report_dir(camp.path)
    cand = camp.candidates()
    found = analysis.hits(cand)
    cif_paths = analysis.export_structures(camp, list(found["id"]), out / "hits", "cif") if len(found) else []
    sections = [
        f"<h1>Campaign report: {html.escape(store_name(camp.path))}</h1>",
        f"<p>Store <code>{html.escape(str(camp.path))}</code>, written {time.strftime('%Y-%m-%d %H:%M')}. "
        f"{len(cand)} candidates, {int((cand['dft_status'] == 'ok').sum())} verified with DFT, "
        f"{len(found)} stable phases found.</p>",
    ]
    sections += [
        "<h2>Stable phases found (DFT-verified)</h2>",
        _table(found.assign(cif=[f"hits/{p.name}" for p in cif_paths]))
        if len(found)
        else "<p>No DFT-verified stable compound yet.</p>",
    ]
    known = camp.known_phase_summary(cand)
    if known["known_phases"]:
        above = known["known_above_hull"]
        sections += [
            "<h2>Known phases (computed with the campaign's reference settings)</h2>",
            f"<p><b>Above the campaign's hull: {html.escape(', '.join(above))}</b> (a finding: the settings "
            "or the phase disagree with what was known).</p>"
            if above
            else "<p>Every computed known phase is on the campaign's hull.</p>",
            _table(pd.DataFrame(known["known_phases"])),
        ]
    figures = [
        ("Convex hull", lambda: analysis.hull_figure(cand)),
        ("MLIP vs DFT", lambda: analysis.parity_figure(cand)),
        ("Discovery curve", lambda: analysis.discovery_figure(camp)),
        ("Learning curve", lambda: analysis.learning_figure(camp)),
        ("Which generator found the hits", lambda: analysis.sources_figure(cand)),
    ]
    for title, make in figures:
        try:
            body = _png(make())
        except Exception as err:  # a figure the data cannot support yet is reported, not fatal
            body = f"<p>not available: {html.escape(str(err))}</p>"
        sections += [f"<h2>{title}</h2>", body]
    sections.append(_table(hits_by_source(cand)))  # under the last figure: generator attribution
    if len(found):
        sections += [
            "<h2>Structures of the hits</h2>",
            _png(
                analysis.structure_figure(
                    {f"{r.formula} ({r.id})": camp.structure(r.id, "dft") for r in found.head(12).itertuples()}
                )
            ),
        ]
    rounds = camp.rounds()  # not summary(): that reads every candidate again
    if not rounds.empty:
        sections += ["<h2>Rounds</h2>", _table(rounds)]
    out.mkdir(parents=True, exist_ok=True)
    page = out / "report.html"
    page.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(store_name(camp.path))}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>"
    )
    return page


def round_report(cfg: CampaignConfig, metrics: dict[str, Any], cand: pd.DataFrame) -> str:
    """Markdown for the Prefect UI: the round's numbers, hits per generator and current hits."""
    lines = [f"# {cfg.name}: round {metrics['round']}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in metrics.items() if k != "round"]
    lines += [
        "",
        "## Candidates by generator",
        "",
        "| source | candidates | DFT verified | hits |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['source']} | {r['candidates']} | {r['verified']} | {r['hits']} |"
        for r in hits_by_source(cand).to_dict("records")
    ]
    hits = cand[cand["is_hit"]].sort_values("e_form_dft") if not cand.empty else cand
    lines += [
        "",
        "## Verified stable compounds",
        "",
        "| formula | prototype | E_form DFT (eV/atom) | E_hull DFT | E MLIP - DFT (meV/atom) |",
        "|---|---|---|---|---|",
    ]
    for r in hits.to_dict("records"):
        err = (r["e_mlip_per_atom"] - r["e_dft_per_atom"]) * 1000
        lines.append(
            f"| {r['formula']} | {r['prototype']} | {r['e_form_dft']:.3f} | {r['e_hull_dft']:.3f} | {err:.1f} |"
        )
    return "\n".join(lines)
