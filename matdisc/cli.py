"""The ``matdisc`` command: run, deploy, status, report, validate, server start/stop.

User errors (bad config, missing store, unknown element) print one line per problem on
stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

from matdisc.errors import UserError


def _cmd_validate(args: argparse.Namespace) -> int:
    from matdisc.config import load_config

    cfg = load_config(args.config)
    print(f"{args.config}: valid campaign {cfg.name!r} over {'-'.join(cfg.chemsys)}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from matdisc.store import open_campaign

    summary = open_campaign(args.store).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"campaign store {summary['store']}")
    for col in ("round", "candidates", "relaxed", "DFT verified", "hits", "new hits", "hit rate", "DAF", "model",
                "MAE meV/atom", "MAE retrained"):
        table.add_column(col, justify="right")
    for r in summary["rounds"]:
        table.add_row(str(r["round"]), str(r["candidates"]), str(r["relaxed"]), str(r["dft_verified"]),
                      str(r["hits"]), _fmt(r.get("new_hits"), "d"), _fmt(r.get("hit_rate"), ".2f"),
                      _fmt(r.get("daf"), ".1f"), r["model_sha256"][:12], _fmt(r["mae_mev_per_atom"], ".1f"),
                      _fmt(r.get("mae_after_mev"), ".1f"))
    console = Console()
    console.print(table)
    _print_hits(console, args.store)
    return 0


def _fmt(value: float | int | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return str(int(value)) if spec == "d" else format(value, spec)


def _print_hits(console, store: str | Path) -> None:
    from rich.table import Table

    from matdisc.store import open_campaign

    cand = open_campaign(store).candidates()
    hits = cand[cand["is_hit"]].sort_values("e_form_dft") if not cand.empty else cand
    table = Table(title="stable phases found (DFT-verified)")
    for col in ("formula", "prototype", "E_form DFT eV/atom", "E_hull DFT eV/atom", "MLIP - DFT meV/atom"):
        table.add_column(col, justify="right")
    for r in hits.to_dict("records"):
        table.add_row(r["formula"], r["prototype"], f"{r['e_form_dft']:.3f}", f"{r['e_hull_dft']:.3f}",
                      f"{(r['e_mlip_per_atom'] - r['e_dft_per_atom']) * 1000:.1f}")
    console.print(table if len(hits) else "no DFT-verified stable compound yet")


def _cmd_run(args: argparse.Namespace) -> int:
    from matdisc.config import load_config

    cfg = load_config(args.config)
    if args.store:
        cfg = cfg.model_copy(update={"store": Path(args.store)})
    if args.rounds is not None and args.rounds < 1:
        raise UserError("--rounds: must be at least 1")
    if args.more_rounds is not None and (args.more_rounds < 1 or args.rounds is not None):
        raise UserError("--more-rounds: must be at least 1, and not given together with --rounds")
    from matdisc.store.tables import check_not_locked

    check_not_locked(cfg.store_path)  # another run writing this store: say so now, exit 2
    from matdisc.mlip.model import configured_model

    configured_model(cfg.mlip, cfg.chemsys)  # a model without our elements: refuse before any work
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from matdisc.server import ensure_api, ui_url

    api = ensure_api()
    print(f"Prefect UI: {ui_url(api)}   store: {cfg.store_path}", flush=True)
    from flows.deployment import run_campaign

    run_campaign(cfg, rounds=args.rounds, more_rounds=args.more_rounds)
    from rich.console import Console

    console = Console()
    _print_hits(console, cfg.store_path)
    console.print(f"store: {cfg.store_path}\nPrefect UI: {ui_url(api)}  (stop the server: matdisc server stop)")
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from matdisc.config import load_config

    cfg = load_config(args.config)
    if args.more_rounds < 1:
        raise UserError("--more-rounds: must be at least 1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from matdisc.server import ensure_api, ui_url

    api = ensure_api()
    from flows.artifacts import slug
    from flows.deployment import serve_campaign

    print(f"Prefect UI: {ui_url(api)}   deployment: matdisc-continue-campaign/{args.name or slug(cfg.name)}   "
          f"schedule: {args.cron or 'none (runs on demand)'}   store: {args.store or cfg.store_path}", flush=True)

    serve_campaign(args.config, cron=args.cron, more_rounds=args.more_rounds, name=args.name, store=args.store)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from matdisc.report import write_report

    page = write_report(args.store, args.out)
    print(f"report: {page}\nverified hits as CIF: {page.parent / 'hits'}")
    return 0


def _cmd_server(args: argparse.Namespace) -> int:
    from matdisc import server

    if args.action == "stop":
        print(server.stop())
    else:
        print(f"Prefect API: {server.ensure_api()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matdisc", description="materials discovery campaigns")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run or resume a campaign")
    p.add_argument("config")
    p.add_argument("--store", help="campaign store path (overrides the config)")
    p.add_argument("--rounds", type=int, help="total active-learning rounds (overrides the config)")
    p.add_argument("--more-rounds", type=int, help="this many rounds past the last completed one")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("deploy", help="serve a deployment that continues the campaign (on a cron schedule)")
    p.add_argument("config")
    p.add_argument("--cron", help='schedule, e.g. "0 2 * * *" (nightly at 02:00); none: runs only on demand')
    p.add_argument("--more-rounds", type=int, default=1, help="rounds each run adds (default 1)")
    p.add_argument("--name", help="deployment name (default: the campaign name)")
    p.add_argument("--store", help="campaign store path (overrides the config)")
    p.set_defaults(func=_cmd_deploy)
    p = sub.add_parser("status", help="per-round table of a campaign store")
    p.add_argument("store")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("report", help="HTML report (figures, hits) and the hits as CIF files")
    p.add_argument("store")
    p.add_argument("--out", help="output folder (default: STORE-report beside the store)")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("validate", help="check a campaign file")
    p.add_argument("config")
    p.set_defaults(func=_cmd_validate)
    p = sub.add_parser("server", help="the local Prefect server matdisc starts")
    p.add_argument("action", choices=["start", "stop"])
    p.set_defaults(func=_cmd_server)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 on bad usage
    # import-time notices of the ML stack (e3nn's torch.load, torch.jit deprecations) are not the user's business
    warnings.filterwarnings("ignore", module=r"(e3nn|torch|mace|torch_sim)(\.|$)")
    # model files live beside the tables in STORE/models/: not zarr arrays, and not a problem
    warnings.filterwarnings("ignore", message=r".*not recognized as a component of a Zarr hierarchy")
    try:
        return args.func(args)
    except UserError as err:
        for line in err.problems:
            print(f"matdisc: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("matdisc: interrupted; completed batches are kept, run again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
