"""Analysis figures, the HTML report and the notebooks, on the EMT campaign store the flow writes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient
from pymatgen.core import Structure

from matdisc import analysis
from matdisc.store import open_campaign

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def camp(campaign_store):
    cfg, _ = campaign_store
    return open_campaign(cfg.store_path)


def test_parity_mae_label_is_the_store_mae(camp):
    cand = camp.candidates()
    both = cand[(cand["dft_status"] == "ok") & cand["e_form_dft"].notna() & cand["e_form_mlip"].notna()]
    assert len(both) >= 5
    expected = np.mean(np.abs(both["e_form_mlip"] - both["e_form_dft"])) * 1000
    fig = analysis.parity_figure(cand)
    title = fig.axes[0].get_title()
    assert title == f"MAE {expected:.1f} meV/atom (n = {len(both)})"
    xy = fig.axes[0].collections[0].get_offsets()
    assert sorted(xy[:, 0]) == pytest.approx(sorted(both["e_form_dft"]))


def test_binary_hull_runs_through_the_verified_hits_and_elements(camp):
    cand = camp.candidates()
    fig = analysis.hull_figure(cand)
    (hull,) = [line for line in fig.axes[0].lines if line.get_gid() == "hull"]
    x, e = hull.get_xdata(), hull.get_ydata()
    found = cand[cand["is_hit"]]
    assert len(found) >= 1
    for f, ef in zip(found["formula"], found["e_form_dft"]):
        k = int(np.argmin(np.abs(x - analysis.composition_fraction(f, "Pd"))))
        assert e[k] == pytest.approx(ef)
    assert x[0] == 0.0 and x[-1] == 1.0 and e[0] == pytest.approx(0.0) and e[-1] == pytest.approx(0.0)
    assert np.all(e <= 1e-9)


def test_ternary_hull_uses_the_phase_diagram():
    cand = pd.DataFrame({
        "formula": ["Cu", "Pd", "Au", "CuPd", "CuAu", "PdAu", "CuPdAu"],
        "dft_status": ["ok"] * 7,
        "e_dft_per_atom": [-1.0, -2.0, -3.0, -1.8, -2.1, -2.4, -2.2],
        "e_form_dft": [0, 0, 0, -0.3, -0.1, 0.1, -0.2],
    })
    fig = analysis.hull_figure(cand)
    assert "Cu-Pd-Au" in fig.axes[0].get_title() and "7 entries" in fig.axes[0].get_title()


def test_discovery_and_learning_curves_follow_the_rounds(camp):
    rounds = camp.rounds()
    fig = analysis.discovery_figure(camp)
    (curve,) = [line for line in fig.axes[0].lines if line.get_gid() == "campaign"]
    np.testing.assert_allclose(curve.get_xdata(), rounds["dft_calls_total"].fillna(0))
    np.testing.assert_allclose(curve.get_ydata(), rounds["hits"])
    learning = analysis.learning_figure(camp)
    (after,) = [line for line in learning.axes[0].lines if line.get_gid() == "mae_after_mev"]
    np.testing.assert_allclose(after.get_ydata(), rounds["mae_after_mev"])
    (held_out,) = [line for line in learning.axes[1].lines if line.get_gid() == "energy_mae_per_atom"]
    np.testing.assert_allclose(held_out.get_ydata(), camp.models()["energy_mae_per_atom"] * 1000)
    sources = analysis.sources_figure(camp.candidates())
    hits_bars = [p.get_height() for p in sources.axes[0].patches if p.get_gid() == "hits"]
    assert sum(hits_bars) == int(camp.candidates()["is_hit"].sum())


def test_exported_structures_read_back(camp, tmp_path):
    found = analysis.hits(camp.candidates())
    for fmt in analysis.FORMATS:
        paths = analysis.export_structures(camp, list(found["id"]), tmp_path / fmt, fmt)
        assert len(paths) == len(found)
    cif = Structure.from_file(tmp_path / "cif" / f"{found['id'][0]}.cif")
    assert cif.composition.reduced_formula == found["formula"][0]
    with pytest.raises(Exception, match="format 'xyz' is not one of cif, poscar, extxyz"):
        analysis.export_structures(camp, list(found["id"]), tmp_path, "xyz")


def test_report_holds_every_hit_and_valid_cifs(camp, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "matdisc.cli", "report", str(camp.path), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    page = (out / "report.html").read_text()
    found = analysis.hits(camp.candidates())
    for cid, formula in zip(found["id"], found["formula"]):
        assert formula in page and cid in page
        s = Structure.from_file(out / "hits" / f"{cid}.cif")
        assert s.composition.reduced_formula == formula
    assert len(list((out / "hits").glob("*.cif"))) == len(found)
    assert page.count("data:image/png;base64,") >= 5
    assert re.search(r"MAE|Convex hull", page)


def test_report_of_a_missing_store_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "matdisc.cli", "report", str(tmp_path / "none.zarr")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"matdisc: campaign store '{tmp_path / 'none.zarr'}' does not exist"]
    assert not (tmp_path / "none-report").exists()


def _run(name: str, parameters: str, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    cell.source = parameters
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def test_analysis_notebook_runs_top_to_bottom(camp, tmp_path):
    nb = _run("analysis.ipynb", f"store = {str(camp.path)!r}", tmp_path)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # hull, parity, learning, discovery, sources, structures
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"formation-energy MAE {analysis.formation_mae_mev(camp.candidates()):.1f} meV/atom" in text


def test_explore_notebook_exports_what_it_filtered(camp, tmp_path):
    _run("explore_hits.ipynb", f"store = {str(camp.path)!r}\nexport_dir = 'out'\nmax_e_hull = 0.01\n"
                               "formats = ['cif', 'poscar', 'extxyz']", tmp_path)
    near = analysis.hits(camp.candidates(), max_e_hull=0.01)
    assert len(near) >= 1
    for fmt, suffix in analysis.FORMATS.items():
        assert sorted(p.name for p in (tmp_path / "out" / fmt).iterdir()) == sorted(f"{i}{suffix}" for i in near["id"])


@pytest.mark.parametrize("name", ["analysis.ipynb", "explore_hits.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


def test_flow_links_its_report_in_the_prefect_ui(campaign_store):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    cfg, _ = campaign_store
    page = cfg.store_path.parent / f"{cfg.store_path.name.removesuffix('.zarr')}-report" / "report.html"
    html = page.read_text()
    for formula in analysis.hits(open_campaign(cfg.store_path).candidates())["formula"]:
        assert formula in html

    async def links():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["cu-pd-emt-report"])))

    (artifact,) = asyncio.run(links())  # the report's path and the command that writes it anywhere
    assert artifact.type == "markdown" and str(page) in str(artifact.data) and "matdisc report" in str(artifact.data)
