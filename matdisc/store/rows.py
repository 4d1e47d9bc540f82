"""Typed rows of the tables a stage fills field by field: a pick (``selections``) and a stage
run's cost (``costs``). Results with a domain class of their own are recorded from it
(:class:`~matdisc.records.RelaxResult`, :class:`~matdisc.records.ReferenceResult`,
:class:`~matdisc.generate.Candidate`, the registry's ``ModelRecord``). Each class's fields are
its table's declared columns (tested), so a row cannot miss or invent one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Selection:
    """One DFT pick, as acquisition saw it when it picked."""

    id: str
    round: int
    strategy: str
    score: float
    e_hull_pred: float
    sigma: float
    rank: int
    predicted_s: float
    e_hull_screen: float = float("nan")
    kind: str = ""  # exploit, explore, failed_relaxation or random (matdisc.active.Pick)


@dataclass(frozen=True)
class StageRun:
    """One run of a stage: its predicted and measured cost (a resumed stage adds another)."""

    round: int
    stage: str
    jobs: int
    work: float
    workers: int
    predicted_s: float
    predicted_wall_s: float
    actual_s: float
    wall_s: float
    ideal_wall_s: float
    start_s: float
    recorded: float


#: table -> the class of its rows.
ROWS: dict[str, type] = {"selections": Selection, "costs": StageRun}
