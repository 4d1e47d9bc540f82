"""What the ``matdisc`` command prints: rich tables sized for an 80-column terminal (short headers,
no vertical rules, the columns explained below them)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table


def compact_table(title: str) -> Table:
    """A rich table that fits 80 columns: no vertical rules, no padding at the edges."""
    from rich import box
    from rich.table import Table

    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)


def fmt(value: float | int | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return str(int(value)) if spec == "d" else format(value, spec)


def print_status(summary: dict, store: str | Path) -> None:
    """``matdisc status``: rounds, hits, known phases, costs and budgets."""
    from rich.console import Console

    # fits 80 columns: short headers, no vertical rules, the columns explained below it
    table = compact_table(f"campaign store {summary['store']}")
    for col in ("round", "cand.", "relaxed", "DFT", "hits", "new", "rate", "DAF", "model", "MAE", "re"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in summary["rounds"]:
        table.add_row(
            str(r["round"]),
            str(r["candidates"]),
            str(r["relaxed"]),
            str(r["dft_verified"]),
            str(r["hits"]),
            fmt(r.get("new_hits"), "d"),
            fmt(r.get("hit_rate"), ".2f"),
            fmt(r.get("daf"), ".1f"),
            r["model_sha256"][:8],
            fmt(r["mae_mev_per_atom"], ".1f"),
            fmt(r.get("mae_after_mev"), ".1f"),
        )
    console = Console()
    console.print(table)
    console.print(
        "DFT: verified this round; rate: new hits per DFT call; MAE: the screening model's energy error on the "
        "round's new DFT structures, re: the retrained model's (meV/atom)"
    )
    engines = [
        f"round {r['round']}: " + ", ".join(f"{k} {n}" for k, n in r["mlip_engines"].items())
        for r in summary["rounds"]
        if r["mlip_engines"]
    ]
    if engines:
        console.print("MLIP results by engine: " + "; ".join(engines))
    print_hits(console, store)
    print_spending(console, summary)


def spending(store) -> dict:
    """Cost per round and stage, budgets (limits from the store's latest run config), why it stopped."""
    from matdisc.budget import planning, tradeoff
    from matdisc.config import saved_config

    costs = planning.round_costs(store)
    out: dict = {
        "costs": [
            {
                k: (None if isinstance(v, float) and math.isnan(v) else int(v) if k in ("round", "jobs") else v)
                for k, v in r.items()
            }
            for r in costs.to_dict("records")
        ],
        "budget": {},
        "stopped": None,
    }
    runs = store.runs()
    if not runs.empty:
        try:
            cfg = saved_config(runs["config"].iloc[-1])
            out["budget"] = planning.budget_status(cfg, store)
        except ValueError:  # a store written by an older matdisc, or a model file since moved
            pass
    out["tradeoffs"] = [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in tradeoff.latest(store)
    ]
    stops = store.table("stops")
    if not stops.empty:
        last = stops.iloc[-1]
        out["stopped"] = {"round": int(last["round"]), "reason": str(last["reason"])}
    return out


def print_spending(console, summary: dict) -> None:
    from rich.table import Table

    if summary["costs"]:
        table = Table(title="cost per stage: predicted vs actual compute seconds")
        for col in ("round", "stage", "jobs", "predicted s", "actual s", "predicted/actual", "wall s"):
            table.add_column(col, justify="right")
        for r in summary["costs"]:
            table.add_row(
                str(r["round"]),
                r["stage"],
                str(r["jobs"]),
                fmt(r["predicted_s"], ".1f"),
                fmt(r["actual_s"], ".1f"),
                fmt(r["ratio"], ".2f"),
                fmt(r["wall_s"], ".1f"),
            )
        console.print(table)
    for name, b in summary["budget"].items():
        limit = "no limit" if b["limit"] is None else f"{b['limit']:.4g} h, {b['remaining']:.4g} h left"
        console.print(f"budget.{name}: spent {b['spent']:.4g} h ({limit})")
    if summary["tradeoffs"]:
        print_tradeoffs(console, summary["tradeoffs"], "accuracy vs cost (matdisc tradeoff)")
    if summary["stopped"]:
        console.print(f"stopped before round {summary['stopped']['round']}: {summary['stopped']['reason']}")


def print_hits(console, store: str | Path) -> None:
    from matdisc.store import open_campaign

    camp = open_campaign(store)
    cand = camp.candidates()
    known = camp.known_phase_summary(cand)
    hits = cand[cand["is_hit"]].sort_values("e_form_dft")
    table = compact_table("stable phases found (DFT-verified; E in eV/atom, MLIP - DFT in meV/atom)")
    cols = ("formula", "prototype", "E_form DFT", "E_hull DFT", "MLIP - DFT")
    for col in cols + (("novel",) if known["known_phases"] else ()):
        table.add_column(col, justify="right", no_wrap=True)
    for r in hits.to_dict("records"):
        row = [
            r["formula"],
            r["prototype"] or "",
            f"{r['e_form_dft']:.3f}",
            f"{r['e_hull_dft']:.3f}",
            f"{(r['e_mlip_per_atom'] - r['e_dft_per_atom']) * 1000:.1f}",
        ]
        if known["known_phases"]:
            row.append("new" if r["novel"] else f"known: {r['known_match']}")
        table.add_row(*row)
    console.print(table if len(hits) else "no DFT-verified stable compound yet")
    if known["known_phases"]:
        kt = compact_table("known phases (computed with the campaign's reference settings; eV/atom)")
        for col in ("known phase", "formula", "source", "DFT", "E_form", "E_hull", ""):
            kt.add_column(col, justify="right", no_wrap=True)
        for k in known["known_phases"]:
            kt.add_row(
                k["known_id"],
                k["formula"],
                Path(k["source"]).name,
                k["dft_status"] or "pending",
                fmt(k["e_form_dft"], ".3f"),
                fmt(k["e_hull_dft"], ".3f"),
                "ABOVE the hull" if k["above_hull"] else "",
            )
        console.print(kt)


def print_tradeoffs(console, rows: list[dict], title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in (
        "kind",
        "option",
        "error meV/atom",
        "vs",
        "forces eV/Å",
        "seconds",
        "relative cost",
        "µs/atom",
        "structures",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["kind"],
            r["option"],
            fmt(r["error_mev_per_atom"], ".1f"),
            r["against"],
            fmt(r["forces_rmse"], ".4f"),
            fmt(r["seconds"], ".1f"),
            fmt(r["relative_cost"], ".2f"),
            fmt(r["infer_us_per_atom"], ".0f"),
            str(r["n_structures"]),
        )
    console.print(table)


def print_plan(plan) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=f"plan for {plan.campaign}: compute seconds (wall seconds on "
        f"{plan.workers.mlip} MLIP + {plan.workers.dft} DFT workers)"
    )
    for col in (
        "round",
        "new candidates",
        "relaxations",
        "DFT calcs",
        "generate",
        "MLIP relax",
        "DFT",
        "training",
        "wall",
    ):
        table.add_column(col, justify="right")

    def cell(r, stage: str) -> str:
        s = r.stages.get(stage)
        return "-" if s is None else f"{s.compute_s:.0f} ({s.wall_s:.0f})"

    for r in plan.rounds:
        table.add_row(
            str(r.round),
            str(r.candidates),
            str(r.relaxations),
            str(r.dft_calcs),
            cell(r, "generate"),
            cell(r, "relax"),
            cell(r, "dft"),
            cell(r, "train"),
            f"{r.wall_s / 60:.1f} min",
        )
    console.print(table)
    total = plan.totals()
    console.print(
        f"total: {total['wall_s'] / 3600:.2f} h wall, {total['dft_cpu_hours']:.3f} DFT CPU-hours, "
        f"{total['gpu_hours']:.3f} MLIP worker hours; peak memory per worker: "
        + ", ".join(f"{k} {v:.2f} GB" for k, v in plan.memory.items())
    )
    sources = sorted({plan.rates.origin(k) for k in plan.rates.as_dict() if k != "source"})
    console.print(f"rates from: {', '.join(sources)}")
    for name, b in plan.budget.items():
        if b["limit"] is not None:
            verdict = (
                "fits"
                if b["fits"]
                else (
                    "does NOT fit: the campaign will screen picks with cheaper DFT where that pays "
                    "(budget.screening), shrink DFT batches, then stop"
                )
            )
            console.print(
                f"budget.{name}: {b['spent']:.3g} h spent + {b['planned']:.3g} h planned of {b['limit']:.3g} h"
                f" — {verdict}"
            )
