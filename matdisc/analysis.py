"""Figures and tables of a campaign: what notebooks, ``matdisc report`` and artifacts show.

Plain functions over a :class:`~matdisc.store.Campaign` (or its ``candidates()`` frame),
each returning a matplotlib ``Figure`` built from the store alone, so a notebook, the HTML
report and a test see the same numbers. Figures are made without pyplot (no global state,
no display needed); in Jupyter they render as images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from pymatgen.core import Composition, Structure

from matdisc.errors import UserError
from matdisc.store import Campaign

#: Export formats for structures: file suffix per format.
FORMATS = {"cif": ".cif", "poscar": ".vasp", "extxyz": ".extxyz"}


def chemsys_of(cand: pd.DataFrame) -> list[str]:
    """Elements of the campaign, in the order the elemental references were stored."""
    out: list[str] = []
    for f in cand["formula"]:
        for el in Composition(f).elements:
            if str(el) not in out:
                out.append(str(el))
    return out


def _verified(cand: pd.DataFrame) -> pd.DataFrame:
    return cand[(cand["dft_status"] == "ok") & np.isfinite(cand["e_form_dft"].astype(float))]


# -- hull ---------------------------------------------------------------------------------------
def hull_figure(cand: pd.DataFrame, chemsys: Sequence[str] | None = None) -> Figure:
    """Convex hull: binary as formation energy vs composition with MLIP and DFT points and the
    DFT hull; three or four elements as pymatgen's phase diagram of the DFT entries."""
    chemsys = list(chemsys or chemsys_of(cand))
    if len(chemsys) == 2:
        return _binary_hull(cand, chemsys)
    from pymatgen.analysis.phase_diagram import PDEntry, PDPlotter, PhaseDiagram

    ver = _verified(cand)
    entries = [
        PDEntry(Composition(f), float(e) * Composition(f).num_atoms)
        for f, e in zip(ver["formula"], ver["e_dft_per_atom"])
    ]
    if not entries:
        raise UserError("no DFT-verified candidates yet: nothing to draw a hull of")
    ax = PDPlotter(PhaseDiagram(entries), backend="matplotlib").get_plot()
    assert isinstance(ax, Axes)  # the matplotlib backend draws on Axes
    ax.set_title(f"{'-'.join(chemsys)}: DFT phase diagram ({len(entries)} entries)")
    return cast(Figure, ax.figure)


def composition_fraction(formula: str, element: str) -> float:
    return float(Composition(formula).get_atomic_fraction(element))


def _binary_hull(cand: pd.DataFrame, chemsys: list[str]) -> Figure:
    a, b = chemsys
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    mlip = cand[np.isfinite(cand["e_form_mlip"].astype(float))]
    ver = _verified(cand)
    ax.scatter(
        [composition_fraction(f, b) for f in mlip["formula"]],
        mlip["e_form_mlip"],
        marker="o",
        facecolors="none",
        edgecolors="tab:blue",
        label=f"MLIP ({len(mlip)})",
    )
    ax.scatter(
        [composition_fraction(f, b) for f in ver["formula"]],
        ver["e_form_dft"],
        marker="s",
        color="tab:red",
        label=f"DFT ({len(ver)})",
    )
    on_hull = ver[ver["e_hull_dft"].astype(float) <= 1e-9]
    if len(on_hull):
        x = np.array([composition_fraction(f, b) for f in on_hull["formula"]])
        e = on_hull["e_form_dft"].to_numpy(float)
        keep = pd.DataFrame({"x": x, "e": e}).groupby("x")["e"].min()  # one point per composition
        ax.plot(keep.index, keep.to_numpy(), "k-", lw=1.2, label="DFT hull", gid="hull")
    ax.axhline(0.0, color="0.7", lw=0.8)
    ax.set_xlabel(f"x in {a}(1-x){b}(x)")
    ax.set_ylabel("formation energy (eV/atom)")
    ax.set_title(f"{a}-{b} convex hull")
    ax.legend(frameon=False)
    return fig


# -- model quality ------------------------------------------------------------------------------
def parity_data(cand: pd.DataFrame) -> pd.DataFrame:
    """Verified candidates with both formation energies (eV/atom): the parity plot's points."""
    ver = _verified(cand)
    ver = ver[np.isfinite(ver["e_form_mlip"].astype(float))]
    return ver[["id", "formula", "e_form_dft", "e_form_mlip"]].reset_index(drop=True)


def formation_mae_mev(cand: pd.DataFrame) -> float:
    """MAE of MLIP vs DFT formation energies over verified candidates (meV/atom)."""
    pts = parity_data(cand)
    return float(np.mean(np.abs(pts["e_form_mlip"] - pts["e_form_dft"]))) * 1000 if len(pts) else float("nan")


def parity_figure(cand: pd.DataFrame) -> Figure:
    """MLIP vs DFT formation energy of every verified candidate, with the MAE in the title."""
    pts = parity_data(cand)
    mae = formation_mae_mev(cand)
    fig = Figure(figsize=(4.8, 4.6))
    ax = fig.add_subplot()
    ax.scatter(pts["e_form_dft"], pts["e_form_mlip"], s=18, color="tab:purple")
    if len(pts):
        lo = float(min(pts["e_form_dft"].min(), pts["e_form_mlip"].min()))
        hi = float(max(pts["e_form_dft"].max(), pts["e_form_mlip"].max()))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=0.8)
    ax.set_xlabel("DFT formation energy (eV/atom)")
    ax.set_ylabel("MLIP formation energy (eV/atom)")
    ax.set_title(f"MAE {mae:.1f} meV/atom (n = {len(pts)})")
    return fig


def learning_figure(camp: Campaign) -> Figure:
    """How the models improved: per round, the screening model against the round's new DFT
    results (before and after retraining) and the held-out errors of each trained model."""
    rounds, models = camp.rounds(), camp.models()
    fig = Figure(figsize=(9.6, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    for col, label in (
        ("mae_mev_per_atom", "screening model vs new DFT (relaxed)"),
        ("mae_before_mev", "before retraining (static)"),
        ("mae_after_mev", "after retraining"),
        ("heldout_mae_previous_mev", "held-out set: previous committee"),
        ("heldout_mae_new_mev", "held-out set: new committee"),
    ):
        if col in rounds and rounds[col].notna().any():
            ax1.plot(rounds["round"], rounds[col], "o-", label=label, gid=col)
    ax1.set_xlabel("round")
    ax1.set_ylabel("energy MAE (meV/atom)")
    ax1.set_title("MLIP error on new DFT data")
    ax1.legend(frameon=False, fontsize=8)
    models = models[~models["source"].isin(("kept_previous", "training_failed"))]  # drawn where it was trained
    if not models.empty:
        for col, label in (("energy_mae_per_atom", "energy MAE (meV/atom)"), ("forces_rmse", "force RMSE (meV/Å)")):
            if col in models:
                ax2.plot(models["round"], models[col].astype(float) * 1000, "s-", label=label, gid=col)
        ax2.legend(frameon=False, fontsize=8)
    ax2.set_xlabel("round")
    ax2.set_title("held-out error of each trained committee")
    return fig


# -- discovery ----------------------------------------------------------------------------------
def discovery_figure(camp: Campaign) -> Figure:
    """Verified hits vs DFT calculations spent by acquisition, with the random-selection
    expectation (hits at the cold start + calls × estimated prevalence) when known."""
    rounds = camp.rounds()
    fig = Figure(figsize=(5.6, 4.2))
    ax = fig.add_subplot()
    if not rounds.empty:
        calls = rounds["dft_calls_total"].fillna(0).to_numpy(float)
        hits = rounds["hits"].to_numpy(float)
        ax.plot(calls, hits, "o-", color="tab:green", label="campaign", gid="campaign")
        prevalence = rounds["prevalence_est"].dropna()
        if len(prevalence):
            ax.plot(
                calls,
                hits[0] + calls * float(prevalence.iloc[-1]),
                "--",
                color="0.5",
                label=f"random (prevalence {prevalence.iloc[-1]:.2f})",
                gid="random",
            )
    ax.set_xlabel("DFT calculations (acquisition)")
    ax.set_ylabel("verified hits")
    ax.set_title("discovery curve")
    ax.legend(frameon=False)
    return fig


def sources_figure(cand: pd.DataFrame) -> Figure:
    """Candidates, DFT-verified and hits per generator."""
    table = hits_by_source(cand)
    fig = Figure(figsize=(5.6, 3.6))
    ax = fig.add_subplot()
    x = np.arange(len(table))
    for k, col in enumerate(("candidates", "verified", "hits")):
        ax.bar(x + (k - 1) * 0.27, table[col], width=0.27, label=col, gid=col)
    ax.set_xticks(x, table["source"])
    ax.set_yscale("symlog")
    ax.set_title("generator attribution")
    ax.legend(frameon=False)
    return fig


# -- hits and structures ------------------------------------------------------------------------
def hits(cand: pd.DataFrame, max_e_hull: float | None = None) -> pd.DataFrame:
    """Verified candidates on (or, with ``max_e_hull``, within that of) the DFT hull, most stable first."""
    ver = _verified(cand)
    keep = ver["is_hit"] if max_e_hull is None else ver["e_hull_dft"].astype(float) <= max_e_hull
    out = ver[keep].sort_values(["e_hull_dft", "e_form_dft"]).copy()
    out["mlip_error_mev"] = (out["e_mlip_per_atom"] - out["e_dft_per_atom"]) * 1000
    cols = [
        "id",
        "formula",
        "prototype",
        "source",
        "round",
        "e_form_dft",
        "e_hull_dft",
        "e_form_mlip",
        "mlip_error_mev",
        "sigma",
        "novel",
        "known_match",
    ]
    return out[[c for c in cols if c in out]].reset_index(drop=True)


def structure_figure(structures: Mapping[str, Structure], ncols: int = 4) -> Figure:
    """Static pictures of structures (ASE's matplotlib renderer), titled by their keys."""
    from ase.visualize.plot import plot_atoms
    from pymatgen.io.ase import AseAtomsAdaptor

    n = max(len(structures), 1)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(2.6 * ncols, 2.6 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax, (label, s) in zip(axes, structures.items()):
        plot_atoms(AseAtomsAdaptor.get_atoms(s), ax, rotation="10x,20y,0z", radii=0.4)
        ax.set_title(label, fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    return fig


def interactive_view(structure: Structure):
    """A 3D view for a live notebook (ASE's X3D viewer: HTML, no extra packages)."""
    from ase.visualize.x3d import view_x3d
    from pymatgen.io.ase import AseAtomsAdaptor

    return view_x3d(AseAtomsAdaptor.get_atoms(structure))


def export_structures(
    camp: Campaign, ids: Sequence[str], directory: str | Path, fmt: str = "cif", stage: str = "dft"
) -> list[Path]:
    """Write each candidate's ``stage`` structure as ``directory/<id><suffix>`` (an id is data: any
    character a path could take otherwise becomes ``_``); returns the paths."""
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    from matdisc.dft.runner import dir_name

    if fmt not in FORMATS:
        raise UserError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    structures = camp.structures(stage)  # one read of the stage, not one per candidate
    missing = [cid for cid in ids if cid not in structures]
    if missing:
        raise KeyError(f"candidate {missing[0]!r} has no {stage} structure")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for cid in ids:
        path = directory / f"{dir_name(cid)}{FORMATS[fmt]}"
        if fmt == "extxyz":
            write(path, structures[cid], format="extxyz")
        else:
            structure = AseAtomsAdaptor.get_structure(structures[cid])
            structure.to(filename=str(path), fmt="cif" if fmt == "cif" else "poscar")
        paths.append(path)
    return paths


def hits_by_source(cand: pd.DataFrame) -> pd.DataFrame:
    """Candidates, DFT-verified and hits per generator: which source produced the hits."""
    if cand.empty:
        return pd.DataFrame(columns=["source", "candidates", "verified", "hits"])
    return (
        cand.assign(verified=cand["dft_status"] == "ok")
        .groupby("source")
        .agg(candidates=("id", "size"), verified=("verified", "sum"), hits=("is_hit", "sum"))
        .reset_index()
    )
