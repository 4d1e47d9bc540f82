"""The terminal: what a run prints (its progress and warnings, not Dask's and Prefect's own INFO),
--version, validate over several files, init's starter file, and help on every positional."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ANSI, emt_config, run_in_terminal

from matdisc.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]

_EMIT = """
import logging
from matdisc_flows.console import quiet_environment, show_flow_progress
quiet_environment()
import distributed, prefect
show_flow_progress()
flow = {"flow_run_name": "brown-penguin", "flow_run_id": "x"}
task = {"task_run_name": "relax r1-0000 +9", "task_run_id": "y"}
logging.getLogger("prefect.task_runs").info("TASK-INFO", extra=task)
logging.getLogger("prefect.task_runs").warning("TASK-WARNING", extra=task)
logging.getLogger("prefect.flow_runs").info("FLOW-PROGRESS", extra=flow)
logging.getLogger("distributed.scheduler").info("DASK-INFO")
logging.getLogger("distributed.scheduler").warning("DASK-WARNING")
"""


def test_a_run_prints_its_progress_and_warnings_but_not_the_engines_info(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PREFECT_API_URL": "http://127.0.0.1:9/api",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
    }
    out = subprocess.run([sys.executable, "-c", _EMIT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    printed = out.stdout + out.stderr
    for shown in ("FLOW-PROGRESS", "TASK-WARNING", "DASK-WARNING"):
        assert shown in printed, printed
    for hidden in ("TASK-INFO", "DASK-INFO"):
        assert hidden not in printed, printed
    # what the quiet environment gives worker processes: Dask at WARNING, Prefect's console at WARNING
    probe = "import logging, distributed; print(logging.getLogger('distributed').getEffectiveLevel())"
    level = subprocess.run(
        [sys.executable, "-c", f"from matdisc_flows.console import quiet_environment;quiet_environment(); {probe}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert level.stdout.strip() == "30", level.stderr[-2000:]


_BARS = """
import logging, sys
from matdisc_flows.console import quiet_environment, show_flow_progress, show_progress_bars
quiet_environment()
import prefect
show_flow_progress()
shown = show_progress_bars()
print("bars:", shown, flush=True)
if shown:
    from matdisc_flows import console
    flow = {"flow_run_name": "brown-penguin", "flow_run_id": "x"}
    task = console.BARS.add("round 1 MLIP relaxations", 4, "0/4, about 1 min left (predicted)")
    for i in range(1, 5):
        console.BARS.update(task, i, f"{i}/4")
        console.BARS.bars.refresh()
        logging.getLogger("prefect.flow_runs").info("RELAXED-%d", i, extra=flow)
    print("live after the last:", console.BARS.bars.live.is_started)
"""


def test_on_a_terminal_stages_draw_bars_under_the_log_lines_and_a_pipe_gets_lines_only(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PREFECT_API_URL": "http://127.0.0.1:9/api",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    code, raw = run_in_terminal([sys.executable, "-c", _BARS], env, timeout=120, cwd=ROOT)
    assert code == 0, raw[-2000:]
    text = ANSI.sub("", raw)
    assert "bars: True" in text and "live after the last: False" in text, text  # the last stage gone: display off
    # the bar is redrawn in place (erase the line, draw again) with its counts, the prediction first
    draws = [d for d in raw.split("\x1b[2K") if d.startswith("round 1 MLIP relaxations")]
    assert len(draws) >= 4 and "0/4, about 1 min left (predicted)" in draws[0], draws
    assert any(ANSI.sub("", d).rstrip().endswith("3/4") for d in draws), draws
    # every log line printed once, in order, on a line of its own above the bar
    lines = [line for line in text.replace("\r", "\n").splitlines() if "RELAXED-" in line]
    assert [line.split(" - ")[-1].strip() for line in lines] == [f"RELAXED-{i}" for i in range(1, 5)], lines
    assert raw.rstrip().endswith("\x1b[?25h") or "\x1b[?25h" in raw  # the cursor is given back
    piped = subprocess.run([sys.executable, "-c", _BARS], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert piped.stdout.strip() == "bars: False" and "\x1b[" not in piped.stdout + piped.stderr, piped


def test_generation_says_its_sources_with_the_time_left_from_the_last_round(tmp_path, caplog):
    """Sources differ a lot in cost, so once the store has a round's generation, the time left is
    what the sources still to run took then; a first round has only its rate so far."""
    import logging
    import re
    from types import SimpleNamespace

    from matdisc.config import CampaignConfig
    from matdisc.executor import InProcess, duration
    from matdisc.stages.generate import GenerationProgress, add_candidates, round_candidates
    from matdisc.store import CampaignWriter

    cfg = CampaignConfig.model_validate(emt_config(tmp_path))
    made: dict[int, tuple] = {}

    class Executor(InProcess):
        def progress(self, cfg, round_, what, total, expected_s=None):
            made[round_] = (what, total, expected_s, super().progress(cfg, round_, what, total, expected_s))
            return made[round_][3]

    log = logging.getLogger("test-generation")
    with CampaignWriter(cfg.store_path) as w, caplog.at_level(logging.INFO, "test-generation"):
        for r in (1, 2):
            ctx = SimpleNamespace(w=w, cfg=cfg, number=r, log=log, executor=Executor())
            new, keys = round_candidates(w, cfg, r, GenerationProgress(ctx))
            add_candidates(w, new, r, "generated", keys)
        gen = w.table("generation")
    first = dict(zip(gen[gen["round"] == 1]["source"], gen[gen["round"] == 1]["seconds"]))
    sources = ["prototype", "substitution", "random", "dedup"]
    assert made[1][:3] == ("generation", 4, None)  # nothing to predict from
    assert made[2][:3] == ("generation", 4, sum(first[s] for s in sources))
    assert made[1][3].done == made[2][3].done == 4
    said = {r: [m.getMessage() for m in caplog.records if m.getMessage().startswith(f"round {r} generation: ")]
            for r in (1, 2)}
    for r in (1, 2):
        shown = [re.match(rf"round {r} generation: (\w+): \d+ structures in [\d.]+ s \(sources (\d)/4", m)
                 for m in said[r]]
        assert [(m[1], int(m[2])) for m in shown if m] == [(s, k) for k, s in enumerate(sources[:3], start=1)]
        assert said[r][-1].startswith(f"round {r} generation: deduplicating ")
    for k, line in enumerate(said[2][:3], start=1):  # round 2: what the sources still to run took in round 1
        assert line.endswith(f"(sources {k}/4, about {duration(sum(first[s] for s in sources[k:]))} left)"), line


def test_version(capsys):
    from importlib.metadata import version

    try:
        main(["--version"])
    except SystemExit as done:
        assert done.code == 0
    assert capsys.readouterr().out.strip() == f"matdisc {version('matdisc')}"


def test_validate_takes_several_files_and_exits_2_when_any_is_bad(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(emt_config(tmp_path)))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**emt_config(tmp_path), "mlip": {"ensemble": 0}}))
    assert main(["validate", str(good), str(good)]) == 0
    assert main(["validate", str(good), str(bad)]) == 2
    out = capsys.readouterr()
    assert out.out.count("valid campaign") == 3
    assert out.err.strip().splitlines() == [
        f"matdisc: {bad}: mlip.ensemble: Input should be greater than or equal to 1"
    ]


def test_init_writes_a_starter_file_that_validates_and_is_never_overwritten(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "Cu-Pd", "--calculator", "emt"]) == 0
    text = (tmp_path / "cu-pd.yaml").read_text()
    assert "chemsys: [Cu, Pd]" in text and text.count("#") > 15  # every setting it writes is explained
    assert main(["validate", "cu-pd.yaml"]) == 0
    assert main(["init", "CuPd"]) == 2  # the same file: refused, left as it was
    assert (tmp_path / "cu-pd.yaml").read_text() == text
    assert main(["init", "Cu-Xx"]) == 2
    assert main(["init", "Al,Li", "--out", "al-li-gpaw.yaml"]) == 0
    assert main(["validate", "al-li-gpaw.yaml"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "matdisc: --out: cu-pd.yaml exists; give another file name (nothing was written)",
        "matdisc: CHEMSYS: 'Xx' is not an element symbol",
    ]


def test_every_positional_argument_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        for action in command._actions:
            if not action.option_strings and action.dest != "help":
                assert action.help, f"matdisc {name}: {action.dest} has no help"


def test_status_fits_an_80_column_terminal(campaign_store):
    cfg, _ = campaign_store
    out = subprocess.run(
        [sys.executable, "-m", "matdisc.cli", "status", str(cfg.store_path)],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(line.split()[:2] == ["round", "cand."] for line in lines if line.strip()), out.stdout
    assert max(len(line) for line in lines) <= 80 and "…" not in out.stdout, out.stdout


def test_progress_counts_say_how_long_is_left_at_the_rate_so_far(monkeypatch):
    import time

    from matdisc.executor import counts

    monkeypatch.setattr(time, "monotonic", lambda: 1000.0)
    assert counts(0, 40, 1000.0) == "0/40"  # nothing to go on yet
    assert counts(10, 40, 970.0) == "10/40, about 2 min left"  # 3 s each, 30 more: 90 s
    assert counts(10, 40, 980.0) == "10/40, about 60 s left"  # 2 s each, 30 more
    assert counts(20, 40, 400.0) == "20/40, about 10 min left"
    assert counts(40, 40, 400.0) == "40/40"
    # before the first result, the cost model's prediction less the time spent, said as predicted
    assert counts(0, 40, 970.0, expected_s=150.0) == "0/40, about 2 min left (predicted)"
    assert counts(0, 40, 700.0, expected_s=150.0) == "0/40, over the predicted 2 min"
    assert counts(10, 40, 970.0, expected_s=10_000.0) == "10/40, about 2 min left"  # then the rate so far
    assert counts(1, 4, 990.0, left_s=9000.0) == "1/4, about 2.5 h left"  # the stage knows better
