"""Campaign config validation and the CLI's user-error contract (exit 2, one line, no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import emt_config

from matdisc.cli import main
from matdisc.config import load_config


def write(tmp_path, cfg) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_valid_config_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, {"chemsys": ["Cu", "Pd"]}))
    assert cfg.name == "c" and cfg.reference.calculator == "gpaw" and cfg.mlip.model == "cold-start"
    assert str(cfg.store_path) == "runs/c.zarr"
    assert main(["validate", write(tmp_path, emt_config(tmp_path))]) == 0


@pytest.mark.parametrize(
    ("patch", "field", "words"),
    [
        ({"chemsys": ["Cu", "Xx"]}, "chemsys", "unknown element 'Xx'"),
        ({"chemsys": []}, "chemsys", "empty chemical system"),
        ({"active_learning": {"dft_budget": -1}}, "active_learning.dft_budget", "greater than or equal to 0"),
        ({"reference": {"calculator": "vasp9000"}}, "reference.calculator", "unknown calculator"),
        ({"reference": {"calculator": "nosuchmodule:Calc"}}, "reference.calculator", "cannot be imported"),
        ({"reference": {"calculator": "nosuch.module:Calc"}}, "reference.calculator", "cannot be imported"),
        ({"reference": {"calculator": "ase.calculators.emt:NoSuch"}}, "reference.calculator", "has no NoSuch"),
        ({"mlip": {"model": "models/missing.model"}}, "mlip.model", "does not exist"),
        ({"mlip": {"model": "huge-9"}}, "mlip.model", "mace_mp name"),
        ({"mlip": {"fmx": 0.1}}, "mlip.fmx", "unknown field"),
        ({"compute": {"scheduler": "mars"}}, "compute.scheduler", "tcp://host:8786"),
        ({"chemsys": ["Cu", "Si"], "reference": {"calculator": "emt"}}, "reference.calculator", "no parameters for Si"),
        ({"compute": {"slurm": {"walltime": "4h"}}}, "compute.slurm.walltime", "is not a Slurm time"),
        # the accurate preset's 6 h calculation in the default 4 h Slurm job would never finish
        ({"compute": {"scheduler": "slurm"}, "reference": {"preset": "accurate"}}, "reference.walltime_s",
         "may take 6 h (accurate preset unless set) but compute.slurm.walltime gives a DFT job 4 h"),
    ],
)
def test_invalid_config_exits_2_naming_the_field(tmp_path, capsys, patch, field, words):
    cfg = {"name": "x", "chemsys": ["Cu", "Pd"], **patch}
    assert main(["validate", write(tmp_path, cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"matdisc: {field}: ") and words in err[0], err[0]


def test_several_problems_one_line_each(tmp_path, capsys):
    cfg = {"chemsys": ["Qq"], "active_learning": {"rounds": 0, "dft_budget": -2}}
    assert main(["validate", write(tmp_path, cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("matdisc: ") for line in err)


def test_cli_user_errors_have_no_traceback(tmp_path):
    cases = [
        ["validate", str(tmp_path / "missing.yaml")],
        ["status", str(tmp_path / "missing.zarr")],
        ["run", str(tmp_path / "missing.yaml")],
        ["plan", str(tmp_path / "missing.yaml")],
    ]
    (tmp_path / "bad.yaml").write_text("chemsys: [Cu\n")
    cases.append(["validate", str(tmp_path / "bad.yaml")])
    (tmp_path / "binary.yaml").write_bytes(bytes(range(128, 256)) * 3)  # garbage, as a new user might pass
    cases.append(["validate", str(tmp_path / "binary.yaml")])
    (tmp_path / "list.yaml").write_text("- Cu\n- Pd\n")
    cases.append(["validate", str(tmp_path / "list.yaml")])
    for args in cases:
        proc = subprocess.run([sys.executable, "-m", "matdisc.cli", *args], capture_output=True, text=True)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_without_the_gpaw_extra_a_gpaw_campaign_is_refused_in_one_line_and_others_validate(tmp_path):
    """GPAW is the ``gpaw`` extra: where it is not installed (Python's own import blocking, as on a
    machine that never installed it), the default calculator is refused naming the extra, and a
    campaign whose reference is another ASE calculator validates."""
    block = "import sys; sys.modules['gpaw'] = None; from matdisc.cli import main; sys.exit(main(sys.argv[1:]))"
    gpaw = write(tmp_path, {"chemsys": ["Cu", "Pd"]})  # the default reference: gpaw
    other = tmp_path / "emt.yaml"
    other.write_text(yaml.safe_dump(emt_config(tmp_path)))
    proc = subprocess.run([sys.executable, "-c", block, "validate", gpaw], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "pip install 'matdisc[gpaw]'" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", block, "validate", str(other)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_bad_budget_and_plan_arguments_are_one_line_errors(tmp_path, capsys):
    cfg = emt_config(tmp_path, budget={"dft_cpu_hours": -1})
    assert main(["validate", write(tmp_path, cfg)]) == 2
    assert capsys.readouterr().err.strip() == "matdisc: budget.dft_cpu_hours: Input should be greater than 0"
    assert main(["plan", write(tmp_path, emt_config(tmp_path)), "--rounds", "0", "--no-probe"]) == 2
    assert capsys.readouterr().err.strip() == "matdisc: --rounds: must be at least 1"
    assert not (tmp_path / "cu-pd.zarr").exists()


def test_bad_run_leaves_no_store(tmp_path):
    cfg = emt_config(tmp_path)
    cfg["active_learning"]["dft_budget"] = -1
    assert main(["run", write(tmp_path, cfg)]) == 2
    assert not (tmp_path / "cu-pd.zarr").exists()



def test_run_refuses_what_cannot_work_before_anything_starts(tmp_path, capsys):
    """One line each, exit 2, nothing written: a store path under a file, a store path that is a
    folder of something else, an empty or corrupt model file, and device cuda on a machine without
    one (where this machine has a GPU, that case is skipped: it is not an error there)."""
    import torch

    (tmp_path / "afile").write_text("not a folder")
    other = tmp_path / "results"
    other.mkdir()
    (other / "notes.txt").write_text("someone's work")
    (tmp_path / "empty.model").write_bytes(b"")
    (tmp_path / "corrupt.model").write_bytes(bytes(range(256)) * 8)
    cases = [
        ({"store": str(tmp_path / "afile" / "c.zarr")}, "lies under the file"),
        ({"store": str(other)}, "is a non-empty folder that is not a campaign store"),
        ({"mlip": {"model": str(tmp_path / "empty.model")}}, "is empty"),
        ({"mlip": {"model": str(tmp_path / "corrupt.model")}}, "cannot be read as a MACE model: UnpicklingError"),
    ]
    if not torch.cuda.is_available():
        cases.append(({"mlip": {"device": "cuda"}}, "mlip.device: cuda requested but no CUDA device is visible"))
    for patch, words in cases:
        cfg = emt_config(tmp_path)
        for key, value in patch.items():
            cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
        assert main(["run", write(tmp_path, cfg)]) == 2, patch
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (patch, err)
    assert not (tmp_path / "cu-pd.zarr").exists() and sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "afile").is_dir()


def test_status_never_imports_the_calculator_module_a_stores_config_names(tmp_path):
    """A store is data: looking at it (``matdisc status``) must not run code its saved config points
    to. The config names a calculator module that writes a file when imported; status reads the store
    (budget included) and the file never appears."""
    import json

    from matdisc.config import CampaignConfig
    from matdisc.round import package_versions
    from matdisc.store import CampaignWriter

    (tmp_path / "evilcalc.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').write('ran')\nclass Calc:\n    pass\n")
    cfg = CampaignConfig.model_validate(emt_config(tmp_path))
    saved = json.loads(cfg.model_dump_json())
    saved["reference"]["calculator"] = "evilcalc:Calc"
    with CampaignWriter(cfg.store_path) as w:
        w.record_run(json.dumps(saved), package_versions(), {"calculator": "evilcalc:Calc"})
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "matdisc.cli", "status", str(cfg.store_path), "--json"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "budget" in json.loads(proc.stdout)
    assert not (tmp_path / "imported").exists()
    # the check can fail: importing the module does write the file
    subprocess.run([sys.executable, "-c", "import evilcalc"], env=env, cwd=tmp_path, check=True)
    assert (tmp_path / "imported").exists()


def test_slurm_times_in_every_form_slurm_accepts():
    from matdisc.config import slurm_seconds

    assert [slurm_seconds(t) for t in ("30", "30:15", "04:00:00", "1-12", "1-12:30", "2-00:00:00")] == [
        1800, 1815, 14400, 129600, 131400, 172800]
    for bad in ("4h", "1-2:3:4:5", "-1", ""):
        with pytest.raises(ValueError, match="is not a Slurm time"):
            slurm_seconds(bad)


@pytest.mark.parametrize("example", sorted(p.name for p in (Path(__file__).parents[1] / "examples").glob("*.yaml")))
def test_every_example_campaign_validates(example, capsys):
    """The example files are what a new user copies first (the foundation-model one cannot run here:
    it downloads a model and wants a GPU, so validating it is what the suite can check)."""
    assert main(["validate", str(Path(__file__).parents[1] / "examples" / example)]) == 0
    assert "valid campaign" in capsys.readouterr().out
