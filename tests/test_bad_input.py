"""Every bad input gets one line: the battery of what a new user gets wrong, across the commands and
the store API. Each case exits 2 with at most three lines and no traceback, and the campaign store
that exists beside them is byte-identical afterwards (``test_config_cli.py`` holds the first cases)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import emt_config

from matdisc.cli import main
from matdisc.config import CampaignConfig
from matdisc.errors import UserError
from matdisc.round import package_versions
from matdisc.store import CampaignWriter, open_campaign
from matdisc.store.tables import FORMAT_ATTR, STORE_FORMAT


def _snapshot(*stores: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for s in stores for p in sorted(s.rglob("*")) if p.is_file()}


@pytest.fixture()
def world(tmp_path):
    """An existing store, one a newer matdisc wrote, and the things users pass by mistake."""
    cfg = emt_config(tmp_path)
    store = Path(cfg["store"])
    with CampaignWriter(store) as w:
        w.record_run(CampaignConfig.model_validate(cfg).model_dump_json(), package_versions(), {"calculator": "emt"})
    newer = tmp_path / "newer.zarr"
    shutil.copytree(store, newer)
    meta = json.loads((newer / "zarr.json").read_text())
    meta["attributes"][FORMAT_ATTR] = STORE_FORMAT + 1
    (newer / "zarr.json").write_text(json.dumps(meta))
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("someone's work")
    import torch

    torch.save({"weights": [1, 2, 3]}, tmp_path / "dict.model")
    whole = (tmp_path / "dict.model").read_bytes()
    (tmp_path / "truncated.model").write_bytes(whole[: len(whole) // 2])
    return tmp_path, cfg, store, newer


def _file(tmp_path: Path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(yaml.safe_dump(content))
    return str(path)


def _patched(cfg: dict, section: str, **values) -> dict:
    return {**cfg, section: {**cfg.get(section, {}), **values}}


def _cases(tmp_path: Path, cfg: dict, store: Path, newer: Path) -> list[tuple[list[str], str]]:
    """(arguments, words the one line must hold)."""
    good = _file(tmp_path, "good.yaml", cfg)
    on_newer = _file(tmp_path, "on-newer.yaml", {**cfg, "store": str(newer)})
    bad = lambda name, content: _file(tmp_path, name, content)  # noqa: E731
    afile, results = str(tmp_path / "afile"), str(tmp_path / "results")
    newer_words = f"was written by a newer matdisc (store format {STORE_FORMAT + 1}"
    return [
        # validate: files that are not campaign files, and absurd values
        (["validate", str(tmp_path)], "is a folder, not a campaign file"),
        (["validate", bad("empty.yaml", "")], "is empty (a campaign needs at least chemsys)"),
        (["validate", bad("scalar.yaml", "just a sentence\n")], "holds a str, not a mapping of settings"),
        (["validate", bad("sha.yaml", _patched(cfg, "mlip", model_sha256="abc"))], "mlip.model_sha256: String should"),
        (["validate", bad("pin.yaml", _patched(cfg, "mlip", model_sha256="0" * 64))], "mlip.model is cold-start"),
        (["validate", bad("wall.yaml", _patched(cfg, "reference", walltime_s=-5))], "reference.walltime_s: Input should"),
        (["validate", bad("ens.yaml", _patched(cfg, "mlip", ensemble=0))], "mlip.ensemble: Input should"),
        (["validate", bad("atoms.yaml", _patched(cfg, "generation", max_atoms=0))], "generation.max_atoms: Input"),
        (["validate", bad("known.yaml", {**cfg, "known_phases": {"files": [str(tmp_path / "gone.cif")]}})],
         "known_phases: " + str(tmp_path / "gone.cif") + " does not exist"),
        (["validate", bad("garbage.yaml", {**cfg, "known_phases": {"files": [bad("garbage.cif", bytes(range(256)))]}})],
         "garbage.cif: cannot be read"),
        (["validate", bad("chemsys.yaml", {**cfg, "chemsys": "CuPd"})], "chemsys: Input should be a valid list"),
        (["validate", bad("rounds.yaml", _patched(cfg, "active_learning", rounds=10**9))],
         "active_learning.rounds: Input should be less than or equal to 1000"),
        (["validate", bad("budget.yaml", _patched(cfg, "active_learning", dft_budget=10**9))],
         "active_learning.dft_budget: Input should be less than or equal to 100000"),
        (["validate", bad("nan.yaml", "chemsys: [Cu, Pd]\nmlip:\n  fmax: .nan\n")], "mlip.fmax: Input should"),
        (["validate", bad("hours.yaml", {**cfg, "budget": {"dft_cpu_hours": 0}})], "budget.dft_cpu_hours: Input should"),
        # run, on the existing store: refused before anything starts
        (["run", good, "--rounds", "0"], "--rounds: must be at least 1"),
        (["run", good, "--more-rounds", "0"], "--more-rounds: must be at least 1"),
        (["run", bad("dict.yaml", _patched(cfg, "mlip", model=str(tmp_path / "dict.model")))],
         "holds a dict, not a MACE model"),
        (["run", bad("trunc.yaml", _patched(cfg, "mlip", model=str(tmp_path / "truncated.model")))],
         "truncated.model cannot be read as a MACE model"),
        (["run", good, "--store", afile], "is a file, not a folder a campaign store can live in"),
        (["run", good, "--store", str(tmp_path / "afile" / "x.zarr")], "lies under the file"),
        (["run", on_newer], newer_words),
        # status and report
        (["status", afile], "is not a campaign store"),
        (["status", results], "is not a campaign store"),
        (["status", "--json", str(tmp_path / "gone.zarr")], "does not exist"),
        (["status", str(newer)], newer_words),
        (["report", str(tmp_path / "gone.zarr")], "does not exist"),
        (["report", str(store), "--out", str(tmp_path / "afile" / "report")], "--out: "),
        (["report", results], "is not a campaign store"),
        (["report", str(newer)], newer_words),
        # plan and candidates
        (["plan", good, "--rounds", "-1", "--no-probe"], "--rounds: must be at least 1"),
        (["plan", good, "--store", afile, "--no-probe"], "is a file, not a folder"),
        (["plan", on_newer, "--no-probe"], newer_words),
        (["candidates", good, "--round", "-1"], "--round: must be at least 1"),
        (["candidates", good, "--store", str(tmp_path / "afile" / "x.zarr")], "lies under the file"),
        (["candidates", bad("binary.yaml", bytes(range(128, 256)))], "is not a text file"),
        (["candidates", good, "--store", results], "is a non-empty folder that is not a campaign store"),
        (["candidates", on_newer], newer_words),
    ]


def test_every_bad_input_gets_one_line_exit_2_and_leaves_the_store_as_it_was(world, capsys):
    tmp_path, cfg, store, newer = world
    cases = _cases(tmp_path, cfg, store, newer)
    before = _snapshot(store, newer, tmp_path / "results")
    for args, words in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert 1 <= len(err) <= 3 and words in err[0] and err[0].startswith("matdisc: "), (args, err)
        assert not any("Traceback" in line for line in err)
    assert _snapshot(store, newer, tmp_path / "results") == before
    assert not (tmp_path / "gone.zarr").exists() and (tmp_path / "afile").is_file()
    assert len(cases) >= 38


def test_the_store_api_refuses_what_is_not_a_store_it_can_read_in_one_line(world):
    tmp_path, _, store, newer = world
    before = _snapshot(store, newer)
    cases = [
        (lambda: open_campaign(tmp_path / "gone.zarr"), "does not exist"),
        (lambda: open_campaign(tmp_path / "afile"), "is not a campaign store"),
        (lambda: open_campaign(newer), "was written by a newer matdisc"),
        (lambda: CampaignWriter(newer), "was written by a newer matdisc"),
        (lambda: CampaignWriter(tmp_path / "afile" / "x.zarr"), "lies under the file"),
    ]
    for call, words in cases:
        with pytest.raises(UserError) as err:
            call()
        assert len(str(err.value).splitlines()) == 1 and words in str(err.value), str(err.value)
    assert _snapshot(store, newer) == before
    assert open_campaign(store).table("runs").shape[0] == 1  # the store itself still reads
