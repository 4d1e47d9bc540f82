"""The library stays engine-free: nothing under ``matdisc/`` but the CLI (the application layer)
imports the workflow engine, so a notebook, a test or a benchmark can use any of it without
Prefect or Dask, and the engine side (``flows/``) is the only place that knows where things run."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = {"prefect", "distributed", "dask", "dask_jobqueue", "dask_cuda", "flows", "matdisc_flows"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth (imports inside functions too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_no_module_of_the_library_but_the_cli_imports_the_engine():
    offenders = {}
    for path in sorted((ROOT / "matdisc").rglob("*.py")):
        if path == ROOT / "matdisc" / "cli.py":
            continue
        engine = imported_modules(path) & ENGINE
        if engine:
            offenders[str(path.relative_to(ROOT))] = sorted(engine)
    assert not offenders, f"engine imports in the library: {offenders}"
    assert {"prefect", "dask", "matdisc_flows"} <= imported_modules(ROOT / "flows" / "executor.py")  # the check sees imports
    assert "matdisc_flows" in imported_modules(ROOT / "matdisc" / "cli.py")


def test_the_engine_side_installs_as_matdisc_flows_and_no_top_level_flows():
    """The folder ``flows/`` is the package ``matdisc_flows``: installing matdisc never puts a
    top-level ``flows`` package (a name other projects use) on anyone's path."""
    import subprocess
    import sys
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "flows" not in setup["packages"] and setup["package-dir"] == {"matdisc_flows": "flows"}
    probe = "import importlib.util, matdisc_flows; print(matdisc_flows.__file__, importlib.util.find_spec('flows'))"
    out = subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(ROOT / "flows" / "__init__.py"), "None"]
