"""Every table of the campaign store, declared: columns, dtypes, row dimension, commit-key form.

The writer refuses a column a table does not declare (a typo would otherwise become a new
column silently), and readers get every declared column even from an empty table or from a
store written before a column existed: :func:`conform` is the one migration point, where a
column added later gets its value for old rows (a default, or one derived from other columns).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from matdisc.errors import StoreError
from matdisc.store.tables import fill_value

#: Column dtypes: ``str``, ``int``, ``float``, ``bool``; ``float[6]`` is a row of six floats (stress).
DTYPES = {"str": object, "int": np.int64, "float": np.float64, "bool": bool, "float[6]": object}


@dataclass(frozen=True)
class Table:
    """One append-only table: ``key`` is the form of its commit keys (one batch each)."""

    name: str
    row_dim: str
    key: str
    columns: dict[str, str]
    doc: str
    structures: bool = False
    #: further float columns are allowed (metrics whose names come from the trainer)
    open_metrics: bool = False
    #: column -> how old rows get it from the other columns (default: the table layer's fill value)
    migrate: dict[str, Callable[[pd.DataFrame], pd.Series]] = field(default_factory=dict)


_RESULT = {  # what every relaxation result records (matdisc.records.RelaxResult)
    "id": "str",
    "status": "str",
    "reason": "str",
    "energy": "float",
    "n_steps": "int",
    "sigma": "float",
    "force_std": "float",
    "walltime_s": "float",
    "engine": "str",  # stores before engines were recorded: "" (unknown)
}
_REFERENCE = {  # ... and every reference result (matdisc.records.ReferenceResult)
    **_RESULT,
    "settings_hash": "str",
    "magmom": "float",
    "scf_rung": "int",
    "attempt": "int",
    "workdir": "str",
    "notes": "str",
}

TABLES: dict[str, Table] = {
    t.name: t
    for t in [
        Table(
            "candidates",
            "candidate",
            "r{round}/{source}",
            {
                "id": "str",
                "formula": "str",
                "round": "int",
                "source": "str",
                "prototype": "str",
                "parent": "str",
                "probability": "float",
                "spacegroup": "int",
                "gen_seed": "int",
                "detail": "str",
                "aflow": "str",
                "strukturbericht": "str",
                "pearson": "str",
                "dedup_key": "str",
                "n_atoms": "int",
            },
            "every candidate with its provenance and initial structure",
            structures=True,
        ),
        Table(
            "mlip",
            "relaxation",
            "r{round}/mlip/{model_sha256[:12]}/{sha1 of the batch's ids}",
            {**_RESULT, "round": "int", "model_sha256": "str", "e_mlip_per_atom": "float", "kind": "str"},
            "MLIP results per model: relaxations (kind relax: outcome, energy, committee spread, relaxed "
            "structure) and rescores (kind rescore: a later committee's energy and spread at the latest "
            "relaxed structure, which keeps its outcome)",
            structures=True,
            migrate={"kind": lambda df: pd.Series("relax", index=df.index)},  # stores before rescoring
        ),
        Table(
            "dft",
            "calculation",
            "r{round}/{id}/{reference_set}[/attempt{n}]",
            {
                **_REFERENCE,
                "round": "int",
                "reference_set": "str",
                "e_dft_per_atom": "float",
                "start": "str",
                "start_reason": "str",
                "hessian": "str",
            },
            "verified reference calculations: one per candidate and reference set, with the relaxed structure, "
            "where the relaxation started (mlip or initial, and why initial) and the Hessian BFGS started with "
            "(mlip: the screening committee's; default: ASE's guess, with the reason where mlip was asked for)",
            structures=True,
            migrate={
                "reference_set": lambda df: df["settings_hash"],  # stores before reference sets
                "start": lambda df: pd.Series("initial", index=df.index),  # stores before MLIP starts
                "hessian": lambda df: pd.Series("default", index=df.index),  # stores before model Hessians
            },
        ),
        Table(
            "frames",
            "frame",
            "r{round}/{id}/{reference_set}",
            {"id": "str", "round": "int", "settings_hash": "str", "energy": "float", "stress": "float[6]"},
            "training frames: every configuration a reference calculation evaluated, with forces",
            structures=True,
        ),
        Table(
            "screening",
            "screen",
            "r{round}/{id}/{settings_hash}/{geometry}",
            {**_REFERENCE, "round": "int", "geometry": "str", "e_screen_per_atom": "float"},
            "cheaper single points that rank picks when the budget runs short (never training data)",
            migrate={"geometry": lambda df: pd.Series("mlip", index=df.index)},  # stores before geometries
        ),
        Table(
            "scores",
            "score",
            "r{round}/scores[-mlip]",
            {
                "id": "str",
                "round": "int",
                "e_form_mlip": "float",
                "e_hull_mlip": "float",
                "e_hull_pred": "float",
                "e_form_dft": "float",
                "e_hull_dft": "float",
                "is_hit": "bool",
                "known_match": "str",
            },
            "every candidate on the MLIP and DFT hulls, recomputed each round",
        ),
        Table(
            "selections",
            "pick",
            "r{round}/selection",
            {
                "id": "str",
                "round": "int",
                "strategy": "str",
                "score": "float",
                "e_hull_pred": "float",
                "sigma": "float",
                "rank": "int",
                "predicted_s": "float",
                "e_hull_screen": "float",
                "kind": "str",
            },
            "each round's DFT picks in acquisition order, with their predicted cost",
        ),
        Table(
            "rounds",
            "round_record",
            "r{round}",
            {
                "round": "int",
                "candidates": "int",
                "relaxed": "int",
                "dft_verified": "int",
                "dft_failed": "int",
                "hits": "int",
                "model_sha256": "str",
                "mae_mev_per_atom": "float",
                "dft_calls": "int",
                "screened": "int",
                "dft_calls_total": "int",
                "new_hits": "int",
                "hit_rate": "float",
                "precision_stable": "float",
                "prevalence_est": "float",
                "hull_phases": "str",
                "new_phases": "str",
                "removed_phases": "str",
                "daf": "float",
                "mae_before_mev": "float",
                "mae_after_mev": "float",
                "trained_model_sha256": "str",
                "trained_energy_rmse_per_atom": "float",
                "trained_forces_rmse": "float",
                "heldout_mae_previous_mev": "float",
                "heldout_mae_new_mev": "float",
                "model_decision": "str",
            },
            "per-round discovery metrics (JSON lists for the hull phases)",
        ),
        Table(
            "model_checks",
            "model_check",
            "r{round}/model-check",
            {
                "round": "int",
                "previous_sha256": "str",
                "new_sha256": "str",
                "heldout_structures": "int",
                "heldout_frames": "int",
                "heldout_mae_previous_mev": "float",
                "heldout_mae_new_mev": "float",
                "noise_mev": "float",
                "decision": "str",
            },
            "each retrained committee against the previous on the held-out frames, and which one screens next",
        ),
        Table(
            "models",
            "model",
            "r{round}/model[-kept|-untrained]",
            {
                "round": "int",
                "sha256": "str",
                "paths": "str",
                "members": "str",
                "n_train_frames": "int",
                "source": "str",
                "mode": "str",
                "device": "str",
                "dtype": "str",
                "r_max": "float",
                "elements": "str",
                "energy_rmse_per_atom": "float",
                "energy_mae_per_atom": "float",
                "forces_rmse": "float",
                "forces_mae": "float",
                "heldout_fraction": "float",
                "data_round": "int",
            },
            "the model registry: each committee's sha256, files (JSON list), training and held-out errors, and "
            "which campaign data it saw (data through data_round, less the held-out share heldout_fraction)",
            open_metrics=True,
            migrate={  # stores before the held-out set: a trained model saw every frame of its round
                "heldout_fraction": lambda df: pd.Series(0.0, index=df.index),
                "data_round": lambda df: df["round"].where(df["source"] == "trained", -1),
            },
        ),
        Table(
            "runs",
            "run",
            "run-{time_ns}",
            {
                "started": "str",
                "config": "str",
                "versions": "str",
                "calculator": "str",
                "reference_set": "str",
                "orchestrator_run": "str",
            },
            "provenance of every run: config, package versions, calculator, the engine's run id",
        ),
        Table(
            "training_failures",
            "training_failure",
            "r{round}/training-failed/{time_ns}",
            {"round": "int", "reason": "str", "time": "float"},
            "training jobs that failed (a mace error, a lost worker): the round goes on with its previous "
            "committee, registered again for it (source training_failed)",
        ),
        Table(
            "retries",
            "retry_request",
            "retry/{time_ns}",
            {"id": "str", "reference_set": "str", "status": "str", "attempts_before": "int", "requested": "float"},
            "reference calculations asked to run again (matdisc retry): each is pending while its candidate has "
            "attempts_before results in the set, and the next run computes it",
        ),
        Table(
            "known_phases",
            "known_phase",
            "known/{settings_hash}",
            {"known_id": "str", "formula": "str", "source": "str", "candidate": "str", "settings_hash": "str"},
            "the configured known phases and the candidate that computes each",
        ),
        Table(
            "costs",
            "stage_run",
            "r{round}/{stage}/{uuid}",
            {
                "round": "int",
                "stage": "str",
                "jobs": "int",
                "work": "float",
                "workers": "int",
                "predicted_s": "float",
                "predicted_wall_s": "float",
                "actual_s": "float",
                "wall_s": "float",
                "ideal_wall_s": "float",
                "start_s": "float",
                "recorded": "float",
            },
            "each stage run's predicted and measured cost",
        ),
        Table(
            "generation",
            "generator_run",
            "r{round}/generation",
            {"round": "int", "source": "str", "generated": "int", "new": "int", "seconds": "float"},
            "per round and generator: structures made, new after dedup, seconds",
        ),
        Table(
            "generation_skips",
            "skip",
            "r{round}/skips",
            {"round": "int", "source": "str", "formula": "str", "spacegroup": "int", "reason": "str"},
            "what a generator could not make, and why",
        ),
        Table(
            "stops",
            "stop",
            "r{round}/stop/{n}",
            {"round": "int", "reason": "str", "time": "float"},
            "why a campaign stopped before a round",
        ),
        Table(
            "tradeoffs",
            "option",
            "tradeoff/{uuid}",
            {
                "kind": "str",
                "option": "str",
                "error_mev_per_atom": "float",
                "seconds": "float",
                "relative_cost": "float",
                "n_structures": "int",
                "against": "str",
                "forces_rmse": "float",
                "infer_us_per_atom": "float",
                "failed": "int",
                "measured": "float",
            },
            "measured error and cost of reference settings and MLIP sizes (``matdisc tradeoff``)",
        ),
    ]
}


def table(name: str) -> Table:
    """The declaration of ``name``; :class:`StoreError` for a table the store does not have."""
    try:
        return TABLES[name]
    except KeyError:
        raise StoreError(f"the campaign store has no table {name!r} (tables: {', '.join(TABLES)})") from None


def check_columns(name: str, columns: Iterable[str]) -> None:
    """Refuse a batch with a column its table does not declare."""
    t = table(name)
    unknown = [c for c in columns if c not in t.columns]
    if unknown and not t.open_metrics:
        raise StoreError(f"table {name!r} declares no column {unknown[0]!r} (matdisc.store.schema)")


def empty(name: str) -> pd.DataFrame:
    """A table with no rows and every declared column, in its dtype."""
    return pd.DataFrame({c: pd.Series(dtype=DTYPES[d]) for c, d in table(name).columns.items()})


def conform(name: str, df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (rows read from the store) with every declared column: columns a store written before
    they existed get their migrated or default values, in declared order, then any extra ones."""
    t = table(name)
    if df.empty and not len(df.columns):
        return empty(name)
    missing = [c for c in t.columns if c not in df]
    # rows written before a migrated column existed, in a table whose later rows have it, hold the
    # table layer's fill value there: they get the migrated value too
    partial = {c: _unset(df[c], t.columns[c]) for c in t.migrate if c in df}
    partial = {c: rows for c, rows in partial.items() if rows.any()}
    if missing or partial:
        df = df.copy()
        for c in missing:
            df[c] = t.migrate[c](df) if c in t.migrate else _filled(t.columns[c], df.index)
        for c, rows in partial.items():
            df.loc[rows, c] = t.migrate[c](df)[rows]
    return df[[*t.columns, *(c for c in df.columns if c not in t.columns)]]


def _unset(column: pd.Series, dtype: str) -> pd.Series:
    """Rows holding the fill value of a column (NaN, -1 or ""): not written by their writer."""
    fill = fill_value(DTYPES[dtype])
    return column.isna() if isinstance(fill, float) else column == fill


def _filled(dtype: str, index: pd.Index) -> pd.Series:
    if dtype == "float[6]":
        return pd.Series([np.full(6, np.nan) for _ in index], index=index, dtype=object)
    return pd.Series(fill_value(DTYPES[dtype]), index=index, dtype=DTYPES[dtype])
