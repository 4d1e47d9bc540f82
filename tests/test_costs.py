"""Cost forms, calibration and budget arithmetic on hand-built inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from ase.build import bulk

from matdisc.budget.costs import (
    K_OVERHEAD,
    Rates,
    bands,
    calibrate,
    dft_seconds,
    dft_work,
    irreducible_kpoints,
    makespan,
    relax_tasks,
)
from matdisc.budget.planning import affordable, budget_status, spent, train_cost, workers
from matdisc.config import CampaignConfig, ReferenceConfig


def test_makespan_schedules_longest_first_on_the_least_loaded_worker():
    assert makespan([4, 3, 3, 2], 2) == 6  # 4+2 | 3+3
    assert makespan([5, 1, 1, 1], 3) == 5  # one long job bounds the stage
    assert makespan([2, 2, 2], 1) == 6
    assert makespan([], 4) == 0


def test_affordable_is_the_longest_prefix_within_what_is_left():
    assert affordable([10.0, 10.0, 10.0], 25.0) == 2
    assert affordable([10.0, 10.0, 10.0], None) == 3  # no budget
    assert affordable([10.0, 1.0], 5.0) == 0  # ranked order is kept: never skip to a cheaper pick
    assert affordable([], 5.0) == 0


def test_dft_work_follows_the_stated_form():
    cu = bulk("Cu", "fcc", a=3.6)
    emt = ReferenceConfig(calculator="emt")
    assert dft_work(cu * (2, 1, 1), emt) == 2.0  # any calculator but GPAW: atoms
    fast, tighter = ReferenceConfig(calculator="gpaw"), ReferenceConfig(calculator="gpaw", ecut=600.0)
    kpts = irreducible_kpoints(cu, (8, 8, 8))  # the 2.5 Å⁻¹ density on this cell
    # GPAW's default bands: 11 valence electrons -> ceil(1.2 x 5.5) + 4 = 11, capped at Cu's 9 bound orbitals
    assert bands(cu) == 9

    def planewaves(ref):
        return (dft_work(cu, ref) / kpts - K_OVERHEAD) / 9

    assert planewaves(fast) == pytest.approx(cu.get_volume() * (2 * 300 / 27.2114) ** 1.5 / 0.529177**3 / (6 * math.pi**2))
    assert planewaves(tighter) / planewaves(fast) == pytest.approx((600 / 300) ** 1.5)  # plane waves ∝ ecut^1.5
    # the Monkhorst-Pack meshes GPAW reduces (even sizes offset from Γ): fcc 4x4x4 -> 10, 8x8x8 -> 60
    assert irreducible_kpoints(cu, (4, 4, 4)) == 10 and kpts == 60
    odd = cu * (1, 1, 2)
    odd.rattle(0.05, seed=1)  # a rattled cell keeps only time reversal: half the mesh (+ the self-inverse points)
    assert irreducible_kpoints(odd, (4, 4, 4)) == 4 * 4 * 4 // 2


def test_dft_seconds_and_relax_tasks_apply_the_rates():
    rates = Rates(dft_s=0.5, dft_call_s=2.0, relax_s=0.01, relax_task_s=3.0, mlip_steps=10)
    emt = ReferenceConfig(calculator="emt")
    atoms = bulk("Cu", "fcc", a=3.6) * (2, 2, 1)  # 4 atoms
    # a relaxation of 5 steps: 6 configurations and the final static, each a full SCF cycle
    assert dft_seconds(atoms, emt, rates, steps=5) == pytest.approx(2.0 + 0.5 * 4 * 7)
    assert dft_seconds(atoms, emt, rates, steps=None) == pytest.approx(2.0 + 0.5 * 4)  # a static
    # 5 structures of 4 atoms, 2 per task: tasks of 2, 2, 1 structures
    assert relax_tasks([4] * 5, 2, rates) == pytest.approx([3 + 0.01 * 10 * 8] * 2 + [3 + 0.01 * 10 * 4])


def test_calibration_recovers_the_rates_the_records_were_made_with():
    true = Rates(relax_s=3e-4, dft_s=2e-3, train_s=5e-3)
    prior = Rates()
    rows = []
    for work, jobs in ((1e4, 3), (3e4, 5)):
        # the second relax stage was its flow run's first: 12 s of it were the workers' imports
        rows.append({"stage": "relax", "jobs": jobs, "work": work, "actual_s": jobs * prior.relax_task_s + true.relax_s * work,
                     "wall_s": 10.0 + (12.0 if jobs == 5 else 0.0), "ideal_wall_s": 9.0,
                     "start_s": 12.0 if jobs == 5 else 0.0, "workers": 1})
        rows.append({"stage": "dft", "jobs": jobs, "work": work, "actual_s": jobs * prior.dft_call_s + true.dft_s * work,
                     "wall_s": 5.0, "ideal_wall_s": 5.0, "workers": 1})
        rows.append({"stage": "train", "jobs": 2, "work": work,
                     "actual_s": 2 * prior.train_member_s + true.train_s * work, "wall_s": 1.0, "ideal_wall_s": 1.0,
                     "workers": 1})
    mlip = pd.DataFrame({"status": ["ok", "ok", "exploded"], "n_steps": [20, 40, 3]})
    dft = pd.DataFrame({"round": [0, 0, 1, 2], "n_steps": [10, 20, 4, 6]})
    # generation stages: 3.0 and 2.0 s in all, of which the generators' own timings 2.5 and 1.5 s
    rows += [{"stage": "generate", "round": r, "jobs": 1, "work": 0.0, "actual_s": t, "wall_s": t, "ideal_wall_s": t,
              "workers": 1} for r, t in ((1, 3.0), (2, 2.0))]
    generation = pd.DataFrame({"round": [1, 1, 2], "source": ["prototype", "dedup", "prototype"],
                               "seconds": [2.0, 0.5, 1.5]})
    fitted = calibrate(prior, pd.DataFrame(rows), mlip, dft, generation)
    assert fitted.store_write_s == pytest.approx(0.5)
    assert fitted.relax_s == pytest.approx(true.relax_s)
    assert fitted.dft_s == pytest.approx(true.dft_s)
    assert fitted.train_s == pytest.approx(true.train_s)
    assert (fitted.mlip_steps, fitted.seed_steps, fitted.dft_steps) == (30.0, 15.0, 5.0)  # exploded ones excluded
    # relax stages waited 1 s beyond their compute and the workers' start, DFT stages none: 2 s over 16 tasks
    assert fitted.task_s == pytest.approx(2.0 / 16)
    assert {fitted.origin(k) for k in ("relax_s", "dft_s", "train_s", "mlip_steps")} == {"store"}
    assert fitted.dft_call_s == pytest.approx(prior.dft_call_s)  # both parts fitted: the records tell them apart
    assert fitted.origin("dft_call_s") == "store" and fitted.origin("seed_steps") == "store"


def test_calibration_of_a_cheap_calculator_drops_a_per_job_prior_the_records_contradict():
    # 40 EMT calculations took 26 s in all: less than the 2 s per calculation the prior assumes
    from matdisc.store import schema

    costs = schema.conform("costs", pd.DataFrame([{"stage": "dft", "jobs": 40, "work": 100.0, "actual_s": 26.0,
                                                   "wall_s": 26.0, "ideal_wall_s": 26.0, "workers": 1}]))
    fitted = calibrate(Rates(dft_call_s=2.0), costs, schema.empty("mlip"), schema.empty("dft"))
    assert fitted.dft_call_s == 0.0 and fitted.dft_s == pytest.approx(0.26)


def test_the_first_mlip_stage_of_a_flow_run_waits_for_its_workers_to_start():
    from matdisc.budget.planning import StageCost

    cost = StageCost(jobs=2, work=1.0, compute_s=20.0, wall_s=21.0)
    started = cost.started(11.0)
    assert (started.wall_s, started.start_s, started.compute_s) == (32.0, 11.0, 20.0)  # wall only: no compute


def test_training_members_share_the_cores():
    cfg = CampaignConfig(name="t", chemsys=["Cu"], mlip={"ensemble": 3}, compute={"scheduler": "local"})
    rates = Rates(train_s=1e-3, train_member_s=10.0, task_s=0.0)
    w = workers(cfg)
    w.mlip_cores = 2
    cost = train_cost(1000.0, cfg, rates, w, epochs=10)
    member = 10.0 + 1e-3 * 1000 * 0.9 * 0.9 * 10  # valid split 0.1, subsample 0.9
    assert cost.compute_s == pytest.approx(3 * member)
    assert cost.wall_s == pytest.approx(2 * member)  # 2 side by side, then the third


class _Store:
    """The read API budget accounting needs: a ``costs`` table (rows carry their round, as
    ``record_stage`` writes them), no calculation tables."""

    def __init__(self, costs: pd.DataFrame):
        self._costs = costs

    def table(self, name: str) -> pd.DataFrame:
        return self._costs if name == "costs" else pd.DataFrame()


def test_spending_counts_cores_per_calculation_and_the_remaining_budget():
    cfg = CampaignConfig(name="t", chemsys=["Cu"], budget={"dft_cpu_hours": 1.0, "gpu_hours": 0.5},
                         compute={"threads_per_dft_worker": 2})
    costs = pd.DataFrame({"round": [1, 1, 1, 1], "stage": ["dft", "relax", "train", "generate"],
                          "actual_s": [900.0, 360.0, 360.0, 5.0],
                          "wall_s": [600.0, 300.0, 300.0, 5.0]})
    used = spent(_Store(costs), cfg)
    assert used["dft_cpu_hours"] == pytest.approx(900 * 2 / 3600)
    assert used["gpu_hours"] == pytest.approx(720 / 3600)
    assert used["wall_hours"] == pytest.approx(1205 / 3600)
    b = budget_status(cfg, _Store(costs))
    assert b["dft_cpu_hours"]["remaining"] == pytest.approx(0.5)
    assert b["gpu_hours"]["remaining"] == pytest.approx(0.3)
    assert b["wall_hours"]["limit"] is None and b["wall_hours"]["remaining"] is None
    assert math.isclose(spent(None, cfg)["dft_cpu_hours"], 0.0)
    assert np.isfinite(used["wall_hours"])
