"""The ``matdisc`` command: run, deploy, plan, tradeoff, status, report, validate, server start/stop.

User errors (bad config, missing store, unknown element) print one line per problem on
stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from matdisc.errors import UserError

if TYPE_CHECKING:
    pass


def _cmd_validate(args: argparse.Namespace) -> int:
    """Every file checked; exit 2 when any is bad, each problem on a line naming its file."""
    from matdisc.config import load_config

    bad = 0
    for path in args.config:
        try:
            cfg = load_config(path)
        except UserError as err:
            bad += 1
            for line in err.problems:
                print(f"matdisc: {path}: {line}" if len(args.config) > 1 else f"matdisc: {line}", file=sys.stderr)
            continue
        print(f"{path}: valid campaign {cfg.name!r} over {'-'.join(cfg.chemsys)}")
    return 2 if bad else 0


def _cmd_init(args: argparse.Namespace) -> int:
    from matdisc.starter import parse_chemsys, starter

    chemsys = parse_chemsys(args.chemsys)
    out = Path(args.out or f"{'-'.join(chemsys).lower()}.yaml")
    if out.exists():
        raise UserError(f"--out: {out} exists; give another file name (nothing was written)")
    text = starter(chemsys, str(out), args.calculator)
    try:
        out.write_text(text)
    except OSError as err:
        raise UserError(f"--out: {out} cannot be written ({err.strerror or err})") from None
    print(f"wrote {out}: check it with `matdisc validate {out}`, preview it with `matdisc candidates {out}`")
    return 0


def _cmd_candidates(args: argparse.Namespace) -> int:
    """What a round would generate: formula, source, prototype, space group, atoms; nothing computed."""
    cfg = _campaign_args(args)
    if args.round < 1:
        raise UserError("--round: must be at least 1 (round 0 is the cold start's seeds)")
    import contextlib

    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    with contextlib.redirect_stdout(sys.stderr):  # mace prints a notice at import: stdout is for the JSON
        from matdisc.stages.generate import preview_candidates

    cands, report = preview_candidates(cfg, args.round)
    rows = []
    for c in cands:
        try:
            sg, sg_from = SpacegroupAnalyzer(c.structure, symprec=0.1).get_space_group_number(), "spglib"
        except Exception:  # noqa: BLE001 - spglib failed on a cell: the generator's own number, said so
            sg, sg_from = c.spacegroup, "generator"
        rows.append(
            {
                "formula": c.formula,
                "source": c.source,
                "prototype": c.prototype,
                "spacegroup": int(sg),
                "spacegroup_from": sg_from,
                "n_atoms": len(c.structure),
                "aflow": c.aflow,
                "strukturbericht": c.strukturbericht,
                "pearson": c.pearson,
                "parent": c.parent,
                "detail": c.detail,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{cfg.name} round {args.round}: {len(rows)} new candidates (nothing computed)")
    for col in ("formula", "source", "prototype", "space group", "atoms", "Pearson", "from"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["formula"]),
            str(r["source"]),
            str(r["prototype"]),
            str(r["spacegroup"]),
            str(r["n_atoms"]),
            str(r["pearson"]),
            str(r["parent"] or r["detail"]),
        )
    console = Console()
    console.print(table)
    summary = report.as_dict()
    console.print(
        f"generated per source: {summary['generated']}; new: {summary['new']}; "
        f"skipped: {summary['skip_reasons'] or 'none'}"
    )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from matdisc.printouts import spending
    from matdisc.store import open_campaign

    store = open_campaign(args.store)
    summary = {**store.summary(), **spending(store)}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    from matdisc.printouts import print_status

    print_status(summary, args.store)
    return 0


def _campaign_args(args: argparse.Namespace):
    """The campaign file with ``--store`` applied and checked (a store path under a file, or a folder of
    something else: exit 2, nothing written), ``--rounds`` checked (run, plan, tradeoff, candidates)."""
    from matdisc.config import load_config
    from matdisc.locations import as_location
    from matdisc.store.tables import check_store_location

    cfg = load_config(args.config)
    if args.store:
        cfg = cfg.model_copy(update={"store": str(as_location(args.store))})
    check_store_location(cfg.store_path)  # a file, under a file, or a folder of something else: say so now
    if getattr(args, "rounds", None) is not None and args.rounds < 1:
        raise UserError("--rounds: must be at least 1")
    return cfg


def _cmd_plan(args: argparse.Namespace) -> int:
    cfg = _campaign_args(args)
    from matdisc.budget import planning
    from matdisc.budget.probe import probe
    from matdisc.store import open_campaign
    from matdisc.store.tables import store_exists

    store = open_campaign(cfg.store_path) if store_exists(cfg.store_path) else None
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else print
    rates = memory = None
    if not args.no_probe:
        rates, memory = probe(cfg, refresh=args.reprobe, log=say)
        if store is not None:
            rates, _ = planning.campaign_rates(cfg, store)  # the probe is cached: refitted on the store
    plan = planning.plan_campaign(cfg, store, rounds=args.rounds, rates=rates, memory=memory, log=say)
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2, default=float))
        return 0
    from matdisc.printouts import print_plan

    print_plan(plan)
    return 0


def _cmd_tradeoff(args: argparse.Namespace) -> int:
    from matdisc.budget.tradeoff import measure
    from matdisc.store.tables import store_exists

    cfg = _campaign_args(args)
    if args.structures < 2:
        raise UserError("--structures: must be at least 2")
    if not store_exists(cfg.store_path):
        raise UserError(f"{cfg.store_path}: no campaign store: the trade-offs are measured on a campaign's data")
    split = lambda text: [t for t in text.split(",") if t.strip()] if text != "none" else []  # noqa: E731
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else print
    options = measure(
        cfg,
        presets=split(args.presets),
        sizes=split(args.sizes) if args.sizes else None,
        structures=args.structures,
        log=say,
    )
    rows = [vars(o) for o in options]
    if args.json:
        print(json.dumps(rows, indent=2, default=float))
        return 0
    from rich.console import Console

    from matdisc.printouts import print_tradeoffs

    print_tradeoffs(Console(), rows, f"accuracy vs cost on {cfg.name}'s data")
    return 0


def _registered_start(cfg) -> str | None:
    """The sha256 a resumed campaign registered its configured model under (None: a new campaign)."""
    from matdisc.store import open_campaign
    from matdisc.store.tables import store_exists

    if cfg.mlip.is_cold_start or not store_exists(cfg.store_path):
        return None
    from matdisc.stages.registry import registered_start

    return registered_start(open_campaign(cfg.store_path), cfg.mlip.model)


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _campaign_args(args)
    if args.more_rounds is not None and (args.more_rounds < 1 or args.rounds is not None):
        raise UserError("--more-rounds: must be at least 1, and not given together with --rounds")
    from matdisc.store.tables import check_not_locked

    check_not_locked(cfg.store_path)  # another run writing this store: say so now, exit 2
    from matdisc.mlip.model import configured_model, resolve_device

    resolve_device(cfg.mlip.device)  # device: cuda without a GPU is refused here, not inside the flow
    # a model without our elements, no model at all, or a file changed since the campaign registered it: refuse now
    configured_model(cfg.mlip, cfg.chemsys, _registered_start(cfg))
    _engine_environment()
    from matdisc_flows.server import ensure_api, recorded, ui_url

    _console(args)
    api = ensure_api()
    own_server = (recorded() or {}).get("api_url") == api
    print(f"Prefect UI: {ui_url(api)}   store: {cfg.store_path}", flush=True)
    _warn_if_unhealthy(api)
    import httpx

    from matdisc_flows.console import stop_progress_bars
    from matdisc_flows.deployment import run_campaign

    try:
        run_campaign(cfg, rounds=args.rounds, more_rounds=args.more_rounds)
    except httpx.TransportError as err:  # the Prefect server went away mid-run (killed, restarted, network)
        again = " (matdisc starts its server again)" if own_server else ""
        print(
            f"matdisc: lost the Prefect API at {api} ({type(err).__name__}: {err}); every completed batch is in "
            f"{cfg.store_path}: run again to resume{again}",
            file=sys.stderr,
        )
        return 1
    finally:
        stop_progress_bars()
    from rich.console import Console

    from matdisc.printouts import print_hits

    console = Console()
    print_hits(console, cfg.store_path)
    login = "log in with the auth string of `matdisc server env`; " if own_server else ""
    console.print(f"store: {cfg.store_path}\nPrefect UI: {ui_url(api)}  ({login}stop the server: matdisc server stop)")
    return 0


def _console(args: argparse.Namespace) -> None:
    """After Prefect is imported: the flow run's progress on the terminal (log lines, and redrawn
    bars when it is a terminal), Dask's and Prefect's own INFO only with -v."""
    from matdisc_flows.console import show_flow_progress, show_progress_bars

    if not args.verbose:
        show_flow_progress()
    show_progress_bars()


def _engine_environment() -> None:
    """Settings of the flow runs this process starts (or serves), before Prefect is imported."""
    from matdisc_flows.runs import enable_heartbeats

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    enable_heartbeats()


def _cmd_deploy(args: argparse.Namespace) -> int:
    from matdisc.config import load_config

    cfg = load_config(args.config)
    if args.more_rounds < 1:
        raise UserError("--more-rounds: must be at least 1")
    _engine_environment()
    from matdisc_flows.deployment import check_schedule

    check_schedule(args.cron, args.interval)
    from matdisc_flows.server import ensure_api, ui_url

    _console(args)
    api = ensure_api()
    from matdisc_flows.artifacts import slug
    from matdisc_flows.deployment import serve_campaign

    schedule = args.cron or (f"every {args.interval:g} s" if args.interval else "none (runs on demand)")
    print(
        f"Prefect UI: {ui_url(api)}   deployment: matdisc-continue-campaign/{args.name or slug(cfg.name)}   "
        f"schedule: {schedule}   store: {args.store or cfg.store_path}",
        flush=True,
    )
    _warn_if_unhealthy(api)
    serve_campaign(
        args.config,
        cron=args.cron,
        interval=args.interval,
        more_rounds=args.more_rounds,
        name=args.name,
        store=args.store,
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from matdisc.report import write_report
    from matdisc.store.tables import check_output_dir

    if args.out:
        check_output_dir(Path(args.out), "--out")
    page = write_report(args.store, args.out)
    print(f"report: {page}\nverified hits as CIF: {page.parent / 'hits'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """A campaign's results as a table, structures, pymatgen entries or a prediction table."""
    from matdisc.export import export
    from matdisc.store.tables import check_output_dir

    if args.out:
        out = Path(args.out)
        check_output_dir(out if args.format in ("cif", "poscar") else out.parent, "--out")
    path, n = export(args.store, args.format, args.out, stage=args.stage, hits=args.hits)
    print(f"{n} candidate(s) written to {path}")
    return 0


def _cmd_retry(args: argparse.Namespace) -> int:
    """Ask the next run of a campaign to compute chosen reference calculations again."""
    from matdisc.stages.verify import request_retries
    from matdisc.store import CampaignWriter
    from matdisc.store.tables import check_not_locked, store_exists

    if not store_exists(args.store):
        raise UserError(f"campaign store {args.store!r} does not exist")
    check_not_locked(args.store)  # a run is writing it: say so, change nothing
    statuses = [t.strip() for t in args.status.split(",") if t.strip()]
    ids = [t.strip() for t in args.ids.split(",") if t.strip()] if args.ids else None
    with CampaignWriter(args.store) as w:
        chosen = request_retries(w, statuses, ids)
    shown = ", ".join(chosen[:8]) + (f" and {len(chosen) - 8} more" if len(chosen) > 8 else "")
    print(f"{len(chosen)} reference calculation(s) will be computed again by the next run of the campaign: {shown}")
    return 0


def _cmd_server(args: argparse.Namespace) -> int:
    from matdisc_flows import server

    if args.action == "stop":
        print(server.stop())
        return 0
    if args.action == "env":
        return _server_env()
    _engine_environment()
    if args.action == "start":
        api = server.ensure_api()
        from matdisc_flows.runs import ensure_zombie_automation

        ensure_zombie_automation()
        print(f"Prefect API: {api}")
        return 0
    return _server_status(args.json)


def _server_env() -> int:
    """The variables that point a shell's Prefect (``prefect worker start``, ``prefect deploy``) at
    the server matdisc started, as ``export`` lines (``eval "$(matdisc server env)"``)."""
    import shlex

    from matdisc_flows import server

    info = server.recorded()
    if info is None or not server.healthy(info["api_url"]):
        raise UserError("no Prefect server started by matdisc is running (matdisc server start)")
    print(f"export PREFECT_API_URL={shlex.quote(info['api_url'])}")
    if info.get("auth"):
        print(f"export PREFECT_API_AUTH_STRING={shlex.quote(info['auth'])}")
    return 0


def _server_status(as_json: bool) -> int:
    """Exit 0 when the API answers and nothing fails, 1 with each problem listed otherwise."""
    from matdisc_flows import server

    api = server.configured_api()
    if not api:
        raise UserError(
            "no Prefect API: PREFECT_API_URL is unset and matdisc has started no server (matdisc server start)"
        )
    from matdisc_flows.health import check

    health = check(api)
    if as_json:
        print(json.dumps(health.as_dict(), indent=2))
        return 0 if not health.problems else 1
    who = f"started by matdisc, log {health.log}" if health.started_by_matdisc else "not started by matdisc"
    print(
        f"Prefect API {api}: {'answers' if health.reachable else 'DOES NOT ANSWER'}"
        + (f" (Prefect {health.version}, {who})" if health.reachable else "")
    )
    if health.reachable:
        if health.started_by_matdisc:
            print(
                "services: "
                + (f"{len(health.services)} failing" if health.services else "no errors logged")
                + (
                    f"; {health.other_errors.count} other server error(s) logged, the last at "
                    f"{health.other_errors.last_time}: {health.other_errors.last_error}"
                    if health.other_errors.count
                    else ""
                )
            )
        else:
            print("services: not a server matdisc started; its own log holds their errors")
        print(
            f"scheduler: {health.scheduled_deployments} deployment(s) with an active schedule, "
            f"{len(health.unscheduled)} without a run scheduled ahead"
        )
        print(f"zombie-run automation: {health.zombie_automation}")
    for problem in health.problems:
        print(f"problem: {problem}")
    return 0 if not health.problems else 1


def _warn_if_unhealthy(api: str) -> None:
    """One line per failing service of the server before a run starts: visible, never fatal."""
    from matdisc_flows.health import check

    try:
        health = check(api)
    except Exception as err:  # noqa: BLE001 - a status look must never stop a campaign
        print(
            f"matdisc: warning: could not check the Prefect server's health ({type(err).__name__}: {err})",
            file=sys.stderr,
        )
        return
    for problem in health.problems:
        if "zombie-run automation" not in problem:  # the run itself creates it
            print(f"matdisc: warning: Prefect server: {problem} (matdisc server status)", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matdisc", description="materials discovery campaigns")
    parser.add_argument("--version", action="version", version=f"matdisc {_version()}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show Dask's and Prefect's own INFO logs (off by default)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run or resume a campaign")
    p.add_argument("config", help="campaign file (YAML)")
    p.add_argument("--store", help="campaign store: a path or an fsspec URL, e.g. s3://b/x.zarr (overrides the config)")
    p.add_argument("--rounds", type=int, help="total active-learning rounds (overrides the config)")
    p.add_argument("--more-rounds", type=int, help="this many rounds past the last completed one")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("deploy", help="serve a deployment that continues the campaign (on a cron schedule)")
    p.add_argument("config", help="campaign file (YAML)")
    p.add_argument("--cron", help='schedule, e.g. "0 2 * * *" (nightly at 02:00); none: runs only on demand')
    p.add_argument("--interval", type=float, help="schedule: seconds between runs (instead of --cron)")
    p.add_argument("--more-rounds", type=int, default=1, help="rounds each run adds (default 1)")
    p.add_argument("--name", help="deployment name (default: the campaign name)")
    p.add_argument("--store", help="campaign store: a path or an fsspec URL, e.g. s3://b/x.zarr (overrides the config)")
    p.set_defaults(func=_cmd_deploy)
    p = sub.add_parser("plan", help="estimate a campaign's cost per round before running it")
    p.add_argument("config", help="campaign file (YAML)")
    p.add_argument("--store", help="campaign store: a path or an fsspec URL, e.g. s3://b/x.zarr (overrides the config)")
    p.add_argument("--rounds", type=int, help="total active-learning rounds (overrides the config)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--reprobe", action="store_true", help="measure this machine again (ignore the probe cache)")
    p.add_argument("--no-probe", action="store_true", help="no measurements: cached rates, the store's, or priors")
    p.set_defaults(func=_cmd_plan)
    p = sub.add_parser("tradeoff", help="measured error vs cost of the DFT presets and MACE sizes on a campaign's data")
    p.add_argument("config", help="campaign file (YAML)")
    p.add_argument("--store", help="campaign store: a path or an fsspec URL, e.g. s3://b/x.zarr (overrides the config)")
    p.add_argument("--presets", default="fast,accurate", help="reference presets to compare (none: skip)")
    p.add_argument(
        "--sizes", help="MACE sizes CHANNELSxL, e.g. 8x0e,16x0e (default: half, configured, double; none: skip)"
    )
    p.add_argument("--structures", type=int, default=4, help="verified structures the presets recompute")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_tradeoff)
    p = sub.add_parser("candidates", help="what a round would generate, computing nothing and writing no store")
    p.add_argument("config", help="campaign file (YAML)")
    p.add_argument("--round", type=int, default=1, help="the round to preview (default 1)")
    p.add_argument("--store", help="campaign store to deduplicate against (overrides the config; read only)")
    p.add_argument(
        "--json",
        action="store_true",
        help='JSON list of {"formula", "source", "prototype", "spacegroup", "n_atoms", ...}',
    )
    p.set_defaults(func=_cmd_candidates)
    p = sub.add_parser("status", help="per-round table of a campaign store")
    p.add_argument("store", help="campaign store: a path or an fsspec URL (s3://bucket/x.zarr)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("report", help="HTML report (figures, hits) and the hits as CIF files")
    p.add_argument("store", help="campaign store: a path or an fsspec URL (s3://bucket/x.zarr)")
    p.add_argument("--out", help="output folder (default: STORE-report beside the store)")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("validate", help="check campaign files (exit 2 when any is bad)")
    p.add_argument("config", nargs="+", help="campaign files (YAML)")
    p.set_defaults(func=_cmd_validate)
    p = sub.add_parser("init", help="write a starter campaign file for a chemical system, with comments")
    p.add_argument("chemsys", help="the elements, e.g. Al-Li or Cu,Pd,Au")
    p.add_argument("--out", help="the file to write (default: the system's name, e.g. al-li.yaml; never overwritten)")
    p.add_argument("--calculator", default="gpaw", help="reference calculator: gpaw (default), emt, or module:Class")
    p.set_defaults(func=_cmd_init)
    p = sub.add_parser(
        "export",
        help="a campaign's results for other tools: csv, parquet, extxyz, cif, poscar, entries "
        "(pymatgen ComputedStructureEntry JSON), matbench (MLIP prediction beside the DFT truth)",
    )
    p.add_argument("store", help="the campaign store (a path or a URL)")
    p.add_argument("--format", required=True, help="csv, parquet, extxyz, cif, poscar, entries or matbench")
    p.add_argument("--stage", default="dft", help="structures of extxyz/cif/poscar: initial, mlip or dft (default)")
    p.add_argument("--hits", action="store_true", help="only the DFT-verified stable candidates")
    p.add_argument("--out", default=None, help="file (folder for cif, poscar); default: in the current folder")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "retry",
        help="ask the next run to compute reference calculations again (after raising a wall time, "
        "fixing a calculator); infrastructure errors are retried without asking, up to three results",
    )
    p.add_argument("store", help="the campaign store")
    p.add_argument(
        "--status",
        default="error",
        help="comma-separated outcomes of the latest result to retry (default: error; e.g. timeout,failed)",
    )
    p.add_argument("--ids", default="", help="comma-separated candidate ids (default: every one with --status)")
    p.set_defaults(func=_cmd_retry)

    p = sub.add_parser(
        "server",
        help="the local Prefect server matdisc starts: start, stop, its status "
        "(failing services, schedules without runs, the zombie-run automation), or env (its URL and auth string "
        "as export lines for a shell)",
    )
    p.add_argument(
        "action", choices=["start", "stop", "status", "env"], help="start, stop, status (health), env (export lines)"
    )
    p.add_argument("--json", action="store_true", help="status as JSON")
    p.set_defaults(func=_cmd_server)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("matdisc")
    except PackageNotFoundError:  # a source tree that was never installed
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 on bad usage
    if not args.verbose and args.command in ("run", "deploy"):  # before Dask or Prefect is imported
        from matdisc_flows.console import quiet_environment

        quiet_environment()
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
