"""The declared store schema: every table's columns, empty tables with their columns, the writer
refusing undeclared columns, and stores written by an earlier layout opening and resuming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from matdisc.errors import StoreError
from matdisc.store import CampaignWriter, open_campaign, schema

#: A two-round (0 and 1) EMT Cu-Pd campaign written by main at commit 9d49511, before the schema
#: existed (one-member 8-channel MACE; calculation and training folders left out).
FIXTURE = Path(__file__).parent / "data" / "store-9d49511.zarr"


def test_an_empty_table_comes_back_with_its_declared_columns(tmp_path):
    with CampaignWriter(tmp_path / "new.zarr") as w:
        for name, table in schema.TABLES.items():
            df = w.table(name)
            assert df.empty and list(df.columns) == list(table.columns), name
        assert w.table("dft")["e_dft_per_atom"].dtype == np.float64 and w.table("mlip")["n_steps"].dtype == np.int64
        assert w.candidates().empty and {"id", "e_hull_dft", "mlip_status", "is_hit"} <= set(w.candidates().columns)
        with pytest.raises(StoreError, match="no table 'nosuch'"):
            w.table("nosuch")


def test_the_writer_refuses_a_column_its_table_does_not_declare_and_writes_nothing(tmp_path):
    with CampaignWriter(tmp_path / "s.zarr") as w:
        with pytest.raises(StoreError, match="table 'stops' declares no column 'reson'"):
            w.append_records("stops", "r1/stop/0", [{"round": 1, "reson": "typo", "time": 0.0}])
        assert w.table("stops").empty and not w.has_batch("stops", "r1/stop/0")
        w.append_records("models", "r0/model", [{"round": 0, "sha256": "x", "stress_rmse": 0.1}])  # open metrics
        assert w.models()["stress_rmse"].iloc[0] == 0.1


def test_rows_from_before_a_column_existed_get_its_migrated_value():
    old_dft = pd.DataFrame({"id": ["a", "b"], "settings_hash": ["s1", "s2"], "status": ["ok", "ok"]})
    dft = schema.conform("dft", old_dft)
    assert list(dft["reference_set"]) == ["s1", "s2"]  # stores before reference sets: by settings hash
    assert list(dft["scf_rung"]) == [-1, -1] and dft["e_dft_per_atom"].isna().all()  # not recorded
    assert list(schema.conform("screening", pd.DataFrame({"id": ["a"]}))["geometry"]) == ["mlip"]
    assert list(dft.columns[: len(schema.TABLES["dft"].columns)]) == list(schema.TABLES["dft"].columns)


def test_the_fixture_store_is_committed_whole():
    """Every file of the fixture is in git: an ignore rule (``runs/``) once left its ``runs`` table
    out of the commit, and only a clean clone found it."""
    import subprocess

    root = Path(__file__).parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout: nothing to compare against")
    files = sorted(str(p.relative_to(root)) for p in FIXTURE.rglob("*") if p.is_file())
    tracked = subprocess.run(["git", "ls-files", str(FIXTURE.relative_to(root))], cwd=root, capture_output=True,
                             text=True, check=True).stdout.split()
    assert files and sorted(tracked) == files
    assert {p.name for p in FIXTURE.iterdir() if p.is_dir()} >= {"runs", "candidates", "models", "_commits"}


def test_a_store_written_by_the_previous_main_opens_and_resumes(tmp_path):
    from matdisc.config import CampaignConfig
    from matdisc.executor import InProcess
    from matdisc.round import run_campaign

    store = tmp_path / "old.zarr"
    shutil.copytree(FIXTURE, store)
    old = open_campaign(store)
    before = {p.name: p.read_text() for p in (store / "_commits").glob("*.jsonl")}
    cand = old.candidates()
    assert list(old.rounds()["round"]) == [0, 1] and len(cand) >= 10
    assert {"e_hull_dft", "known_match", "novel", "mlip_status"} <= set(cand.columns)
    hits = cand[cand["is_hit"]]
    assert len(hits) >= 1 and (hits["e_form_dft"] < 0).all() and np.allclose(hits["e_hull_dft"], 0, atol=1e-9)

    data = json.loads(old.runs()["config"].iloc[-1])
    data["store"] = str(store)
    summary = run_campaign(CampaignConfig.model_validate(data), InProcess(), rounds=2)

    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    after = {p.name: p.read_text() for p in (store / "_commits").glob("*.jsonl")}
    assert all(after[name].startswith(text) for name, text in before.items())  # appended, nothing rewritten
    new = open_campaign(store)
    models = new.models()
    trained = models[models["source"] == "trained"]
    assert trained["round"].tolist() == [0, 1, 2]
    # round 2's committee judged against round 1's on the held-out structures round 2 verified (the
    # old store's models saw every earlier structure): a kept committee is registered again, and said
    decision = new.table("model_checks").set_index("round").loc[2, "decision"]
    kept = models[models["source"] == "kept_previous"]
    assert (decision == "kept_previous") == (len(kept) == 1) and len(models) == 3 + len(kept)
    assert (kept["sha256"] == trained["sha256"].iloc[1]).all() and (kept["data_round"] == 1).all()
    assert (new.table("selections")["round"] == 2).sum() == data["active_learning"]["dft_budget"]


def test_each_typed_row_class_is_its_table_s_declared_columns(tmp_path):
    from dataclasses import fields

    from matdisc.store.rows import ROWS, Selection, StageRun

    for name, kind in ROWS.items():
        assert [f.name for f in fields(kind)] == list(schema.table(name).columns), name
    with CampaignWriter(tmp_path / "rows.zarr") as w:
        w.append_rows("selections", "r1/selection", [Selection("c1", 1, "greedy", -0.1, 0.0, 0.01, 0, 2.5)])
        w.append_rows("selections", "r2/selection", [])  # a round that picked nothing is recorded
        with pytest.raises(StoreError, match="StageRun"):
            w.append_rows("costs", "r1/relax/x", [Selection("c1", 1, "greedy", -0.1, 0.0, 0.01, 0, 2.5)])
        sel = w.table("selections")
        assert sel["id"].tolist() == ["c1"] and np.isnan(sel["e_hull_screen"].iloc[0])
        assert w.has_batch("selections", "r2/selection") and len(w.table("costs")) == 0
    assert StageRun.__dataclass_fields__.keys() == schema.table("costs").columns.keys()
