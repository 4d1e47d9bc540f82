"""The campaign store: what a campaign knows, as append-only tables.

Tables (all append-only; a later row for the same key supersedes an earlier one):

- ``candidates``  id, formula, round, source, prototype + initial structure
- ``mlip``        id, round, model_sha256, status, reason, energy, e_mlip_per_atom, sigma + relaxed structure
- ``dft``         id, round, reference_set, settings_hash, status, reason, energy, e_dft_per_atom,
                  scf_rung, attempt, workdir, notes + relaxed structure
- ``frames``      training frames: id, round, source, energy, stress + structure and forces
- ``scores``      id, round, e_form/e_hull (MLIP and DFT), is_hit: recomputed every round
- ``rounds``      per-round metrics (candidates, relaxed, dft_verified, hits, model, MAE, ...)
- ``models``      model registry: round, sha256, path, n_train_frames, metrics
- ``runs``        provenance of each ``matdisc run``: config, package versions, calculator
- ``known_phases`` known_id, formula, source, candidate: the configured known phases and which
                  candidate computes each (see :mod:`matdisc.known_phases`)

Model files live beside the tables in ``models/<sha256>.model``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pymatgen.core import Structure

from matdisc.errors import StoreError, UserError
from matdisc.store import schema
from matdisc.store.frames import Frames
from matdisc.store.rows import ROWS
from matdisc.store.tables import Batch, TableStore, local_path, store_url

if TYPE_CHECKING:
    from ase import Atoms

STAGES = {"initial": "candidates", "mlip": "mlip", "dft": "dft"}


def _latest(df: pd.DataFrame, key: str | list[str]) -> pd.DataFrame:
    """Last row per key: later appends supersede earlier ones."""
    return df.drop_duplicates(subset=key, keep="last").reset_index(drop=True)


def in_reference_set(dft: pd.DataFrame, reference: str) -> pd.Series:
    """Which ``dft`` rows belong to a reference set (the schema gives rows of stores before reference
    sets their settings hash)."""
    return dft["reference_set"] == reference


def _frame(cols: Mapping[str, np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame({k: (list(v) if v.ndim > 1 else v) for k, v in cols.items()})


class Campaign:
    """Read-only view of a campaign store (what notebooks and ``matdisc status`` use)."""

    def __init__(self, path: str | Path, *, _tables: TableStore | None = None):
        url = store_url(path)  # read-only analysis of a store at an fsspec URL (s3://, https://, ...)
        # workers and subprocesses may run elsewhere: a local store is named by its absolute path
        self.path: Path | str = url or local_path(path).absolute()
        if _tables is None and url is None and not Path(self.path).exists():
            raise StoreError(f"campaign store {str(self.path)!r} does not exist")
        self.location: Path | str = self.path  # where users name it (a writer's working copy differs)
        self.tables = _tables or TableStore(self.path)

    # -- tables as DataFrames ---------------------------------------------------------------
    def table(self, name: str) -> pd.DataFrame:
        """All committed rows of a table (including superseded ones), in append order, with every
        column the table declares (:mod:`matdisc.store.schema`), even when it has no rows."""
        schema.table(name)
        if name not in self.tables.tables():
            return schema.empty(name)
        return schema.conform(name, _frame(self.tables.read(name)))

    def reference_set(self) -> str | None:
        """Settings hash of the latest run's reference calculator (None for stores without one)."""
        runs = self.table("runs")
        if runs.empty:
            return None
        return str(runs["reference_set"].iloc[-1]) or None

    def candidates(self, reference: str | None = None) -> pd.DataFrame:
        """One row per candidate with its latest MLIP, DFT and hull results.

        DFT results come from one reference set (settings hash): ``reference``, or by
        default the latest run's, so energies from other settings never mix in.
        """
        cand = _latest(self.table("candidates"), "id")
        mlip = _latest(self.table("mlip"), "id")
        mlip = mlip[["id", "status", "reason", "model_sha256", "e_mlip_per_atom", "sigma", "n_steps", "force_std"]]
        mlip = mlip.rename(columns={"status": "mlip_status", "reason": "mlip_reason", "n_steps": "mlip_steps"})
        cand = cand.merge(mlip, on="id", how="left")
        dft = self.table("dft")
        reference = reference or self.reference_set()
        if reference is not None:
            dft = dft[in_reference_set(dft, reference)]
        dft = _latest(dft, "id")[
            ["id", "status", "reason", "e_dft_per_atom", "settings_hash", "scf_rung", "attempt", "workdir"]
        ]
        cand = cand.merge(dft.rename(columns={"status": "dft_status", "reason": "dft_reason"}), on="id", how="left")
        cand = cand.merge(_latest(self.table("scores"), "id").drop(columns=["round"]), on="id", how="left")
        for col in ("mlip_status", "dft_status"):
            cand[col] = cand[col].fillna("")
        cand["is_hit"] = cand["is_hit"].fillna(False).astype(bool)
        cand["known_match"] = cand["known_match"].fillna("").astype(str)
        # novel: a verified candidate no known phase matches (None: no known phases to tell, or no DFT)
        has_known = not self.table("known_phases").empty
        cand["novel"] = [
            (km == "") if has_known and d == "ok" else None for km, d in zip(cand["known_match"], cand["dft_status"])
        ]
        cand["status"] = [_status(m, d, h) for m, d, h in zip(cand["mlip_status"], cand["dft_status"], cand["is_hit"])]
        return cand

    def structure(self, candidate_id: str, stage: str = "initial") -> Structure:
        """The structure of a candidate at a stage: ``initial``, ``mlip`` or ``dft``."""
        if stage not in STAGES:
            raise UserError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
        table = STAGES[stage]
        if table not in self.tables.tables():
            raise KeyError(f"no {stage} structures in {self.path}")
        ids = self.tables.read(table, ["id"])["id"]
        rows = np.flatnonzero(ids == candidate_id)
        if not len(rows):
            raise KeyError(f"candidate {candidate_id!r} has no {stage} structure")
        return self.tables.read_frames(table, [int(rows[-1])]).structure(0)

    def structures(self, stage: str = "initial") -> dict[str, Atoms]:
        """Every candidate's latest structure at a stage (``initial``, ``mlip``, ``dft``), read in one
        pass: id -> ASE Atoms."""
        if stage not in STAGES:
            raise UserError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
        frames, row_of = self.latest_frames(STAGES[stage])
        return {cid: frames.atoms(i) for cid, i in row_of.items()} if frames is not None else {}

    def frames(self, table: str = "frames") -> Frames:
        return self.tables.read_frames(table)

    def latest_frames(self, table: str, rows: pd.DataFrame | None = None) -> tuple[Frames | None, dict[str, int]]:
        """A table's structures and the row of each id's latest one (later rows supersede), read once;
        ``rows``: the table as the caller already read it."""
        rows = self.table(table) if rows is None else rows
        if rows.empty:
            return None, {}
        return self.frames(table), {cid: i for i, cid in enumerate(rows["id"])}

    def rounds(self) -> pd.DataFrame:
        df = _latest(self.table("rounds"), "round")
        return df.sort_values("round").reset_index(drop=True)

    def models(self) -> pd.DataFrame:
        return self.table("models")

    def runs(self) -> pd.DataFrame:
        return self.table("runs")

    def orchestrator_runs(self) -> list[str]:
        """Workflow-engine ids of the runs that wrote this store, oldest first (stores written
        before they were recorded have none)."""
        runs = self.runs()
        if runs.empty:
            return []
        return [r for r in runs["orchestrator_run"].astype(str) if r]

    def summary(self) -> dict[str, Any]:
        """What ``matdisc status --json`` prints."""
        rounds = self.rounds()
        cand = self.candidates()
        round_rows = []
        for rec in rounds.to_dict("records"):
            round_rows.append(
                {
                    "round": int(rec["round"]),
                    "candidates": int(rec["candidates"]),
                    "relaxed": int(rec["relaxed"]),
                    "dft_verified": int(rec["dft_verified"]),
                    "hits": int(rec["hits"]),
                    "model_sha256": rec["model_sha256"],
                    "mae_mev_per_atom": None if pd.isna(rec["mae_mev_per_atom"]) else float(rec["mae_mev_per_atom"]),
                    **{k: _json_value(rec[k]) for k in DISCOVERY_KEYS if k in rec},
                }
            )
        engines = self.mlip_engines()
        for row in round_rows:
            row["mlip_engines"] = engines.get(row["round"], {})
        hits = cand[cand["is_hit"]]
        return {
            "store": str(self.location),
            "rounds": round_rows,
            "hits": [
                {
                    "id": r["id"],
                    "formula": r["formula"],
                    "prototype": r.get("prototype", "") or "",
                    "e_hull_dft": float(r["e_hull_dft"]),
                    "novel": r.get("novel"),
                    "known_match": r.get("known_match") or None,
                }
                for r in hits.to_dict("records")
            ],
            **self.known_phase_summary(cand),
        }

    def mlip_engines(self) -> dict[int, dict[str, int]]:
        """Per round, MLIP results by the engine that produced them: ``torch-sim``, ``ase``,
        ``ase (fallback)`` (the batched engine failed on it; the row's ``engine`` says why) or
        ``unrecorded`` (stores written before engines were recorded)."""
        mlip = self.table("mlip")
        engine = mlip["engine"].astype(str)
        kind = ["ase (fallback)" if e.startswith("ase (fallback") else (e or "unrecorded") for e in engine]
        counts = pd.DataFrame({"round": mlip["round"].astype(int), "engine": kind}).value_counts(sort=False)
        out: dict[int, dict[str, int]] = {}
        for (round_, engine), n in counts.items():
            out.setdefault(int(round_), {})[str(engine)] = int(n)
        return out

    def known_phase_summary(self, cand: pd.DataFrame | None = None) -> dict[str, Any]:
        """``known_phases``: each configured known phase with its DFT result against the campaign's
        hull; ``known_above_hull``: the ids of those the hull puts above it (a finding: the
        campaign's settings, or the phase, disagree with what was known)."""
        known = self.table("known_phases")
        if known.empty:
            return {"known_phases": [], "known_above_hull": []}
        cand = self.candidates() if cand is None else cand
        by_id = {r["id"]: r for r in cand.to_dict("records")}
        tolerance = self._hull_tolerance()
        rows = []
        for k in _latest(known, "known_id").to_dict("records"):
            c = by_id.get(k["candidate"], {})
            e_hull = c.get("e_hull_dft", np.nan)
            finite = e_hull is not None and np.isfinite(e_hull)
            rows.append(
                {
                    "known_id": k["known_id"],
                    "formula": k["formula"],
                    "source": k["source"],
                    "candidate": k["candidate"],
                    "dft_status": c.get("dft_status", "") or "",
                    "e_form_dft": _json_value(c.get("e_form_dft", np.nan)),
                    "e_hull_dft": float(e_hull) if finite else None,
                    "above_hull": bool(finite and e_hull > tolerance + 1e-6),
                }
            )
        return {"known_phases": rows, "known_above_hull": [r["known_id"] for r in rows if r["above_hull"]]}

    def _hull_tolerance(self) -> float:
        """``active_learning.hull_tolerance`` of the latest run (0 for stores without a run record)."""
        runs = self.runs()
        if runs.empty:
            return 0.0
        try:
            return float(json.loads(runs["config"].iloc[-1]).get("active_learning", {}).get("hull_tolerance", 0.0))
        except (ValueError, TypeError, AttributeError):
            return 0.0


#: Discovery metrics of a round record that ``summary()`` passes on (see ``matdisc.discovery.round_metrics``).
DISCOVERY_KEYS = (
    "dft_calls",
    "dft_calls_total",
    "new_hits",
    "hit_rate",
    "precision_stable",
    "daf",
    "mae_before_mev",
    "mae_after_mev",
    "hull_phases",
    "new_phases",
    "removed_phases",
    "heldout_mae_previous_mev",
    "heldout_mae_new_mev",
    "model_decision",
)


def _json_value(value: Any) -> Any:
    """A stored round value as JSON: NaN -> None, JSON-encoded lists decoded, numpy scalars plain."""
    if isinstance(value, str) and value.startswith("["):
        return json.loads(value)
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


def _status(mlip: str, dft: str, is_hit: bool) -> str:
    from matdisc.records import USABLE  # records imports the store: import when called

    if dft:
        return ("hit" if is_hit else "dft_verified") if dft == "ok" else f"dft_{dft}"
    if mlip:
        return "relaxed" if mlip in USABLE else f"mlip_{mlip}"
    return "generated"


class CampaignWriter(Campaign):
    """The single writer of a campaign store (the orchestrating process).

    A store at an fsspec URL is written through a local working copy (``self.path``) that is
    leased and pulled here and pushed after every commit (:mod:`matdisc.store.remote`);
    ``location`` is then the URL.
    """

    path: Path  # always a local directory (a store at a URL is written through its working copy)

    def __init__(self, path: str | Path):
        url = store_url(path)
        self.remote = None
        if url is not None:
            from matdisc.store.remote import RemoteStore

            self.remote = RemoteStore(url)
            path = self.remote.open()
        try:
            tables = TableStore(path, write=True, on_commit=self.remote.push if self.remote else None)
            if self.remote is not None:
                tables.generation = self.remote.lease.generation
        except BaseException:
            if self.remote is not None:
                self.remote.lease.release()
            raise
        super().__init__(path, _tables=tables)
        self.location = url or self.path
        (self.path / "models").mkdir(exist_ok=True)

    def close(self) -> None:
        try:
            if self.remote is not None:
                self.remote.close()
        finally:
            self.tables.close()

    def __enter__(self) -> CampaignWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has_batch(self, table: str, key: str) -> bool:
        return self.tables.has_batch(table, key)

    def append(self, table: str, key: str, columns: Mapping[str, Any], frames: Frames | None = None) -> bool:
        """Append one batch atomically (False: that batch was committed before)."""
        schema.check_columns(table, columns)
        return self.tables.append(table, key, columns, frames, row_dim=schema.table(table).row_dim)

    def append_together(self, batches: Sequence[Batch]) -> bool:
        """Batches of different tables as one commit (:meth:`TableStore.append_together`): the last
        decides, and a kill keeps all of them or none."""
        for b in batches:
            schema.check_columns(b.table, b.columns)
        return self.tables.append_together([b._replace(row_dim=schema.table(b.table).row_dim) for b in batches])

    def append_records(
        self, table: str, key: str, records: Sequence[Mapping[str, Any]], frames: Frames | None = None
    ) -> bool:
        """Append dict records (same keys each); ``frames`` holds one structure per record."""
        if not records:
            return self.append(table, key, {}, frames) if frames is not None and len(frames) == 0 else False
        return self.append(table, key, record_columns(records), frames)

    def append_rows(self, table: str, key: str, rows: Sequence[Any]) -> bool:
        """Append typed rows (:mod:`matdisc.store.rows`) of ``table``; none commits the key with no rows."""
        from dataclasses import astuple, fields

        kind = ROWS[table]
        if any(type(r) is not kind for r in rows):
            raise StoreError(f"{table}: rows must be {kind.__name__}")
        names = [f.name for f in fields(kind)]
        values = [astuple(r) for r in rows]
        return self.append(table, key, {n: [_plain(v[i]) for v in values] for i, n in enumerate(names)})

    def record_run(
        self,
        config_json: str,
        versions: Mapping[str, str],
        calculator: Mapping[str, Any],
        reference_set: str = "",
        orchestrator_run: str = "",
    ) -> None:
        """Provenance of one ``matdisc run``: config, package versions, calculator parameters, the
        settings hash of its reference set (what ``candidates()`` shows by default) and the id the
        workflow engine gave the run (a Prefect flow-run id; empty when run without one)."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.append_records(
            "runs",
            f"run-{time.time_ns()}",
            [
                {
                    "started": stamp,
                    "config": config_json,
                    "versions": json.dumps(dict(versions)),
                    "calculator": json.dumps(dict(calculator), default=str),
                    "reference_set": reference_set,
                    "orchestrator_run": orchestrator_run,
                }
            ],
        )


def record_columns(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Columns of dict records (the keys of the first; nested values as JSON)."""
    return {n: [_plain(r.get(n)) for r in records] for n in records[0]}


def _plain(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return value


def open_campaign(path: str | Path) -> Campaign:
    """Open a campaign store read-only: a path, or an fsspec URL of a copy (``s3://bucket/x.zarr``;
    credentials come from the protocol's usual environment, never from matdisc's configs)."""
    return Campaign(path)
