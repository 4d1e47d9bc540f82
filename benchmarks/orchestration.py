"""Orchestration overhead: a campaign round's wall time vs the compute time of its tasks.

A real local Prefect server (``prefect server start`` on 127.0.0.1, as ``matdisc run``
starts it) and the campaign's local Dask cluster (one MLIP worker, one DFT worker, as on
this 2-core machine). The campaign is Cu-Pd with EMT as the reference and a tiny MACE
committee (2 x 16x0e):

1. round 0 (not measured): cold start, the seed structures computed with EMT and the first
   committee trained, through the real flow;
2. ``--candidates`` structures (fcc-based Cu-Pd cells of 2-8 atoms, random decoration,
   ±2 % strain) are stored as round 1's candidates, so the round does not spend its time
   generating them;
3. round 1 runs through the real flow: every candidate relaxed by the committee on the MLIP
   worker in tasks of ``mlip.structures_per_task``, scored on the hull, ``dft_budget``
   picks relaxed with EMT on the DFT worker, the committee fine-tuned, artifacts and the
   report written.

4. the same round 1 on a copy of the store as it was before step 3, through the in-process
   executor (``matdisc.round.run_campaign(cfg, InProcess())``: the same round, every job in
   this process, no Prefect and no Dask).

Prints one JSON line: ``wall_s`` is round 1 as its user waits for it (``matdisc run``'s path:
the Dask cluster started, the flow run, the cluster closed), ``task_runs`` the count and summed
run time of each kind of task,
``task_compute_s`` the sum of its task runs' run times (Prefect's ``total_run_time``:
the time each task spent running on a worker), ``overhead_ratio`` their ratio: 1.0 would
mean the flow adds nothing around the tasks (scoring, acquisition and store writes happen in
the flow process and count as overhead). The stages run one after another and each uses one
worker, so the task times add up to the round's critical path. ``overhead_vs_in_process``:
``wall_s`` over the in-process round's wall time (``in_process_s``), the cost of Prefect + Dask
around the same work (target <= 1.10 at >= 2,000 candidates). Both compute with the same
threads: the in-process round with torch's default (every core), the flow's MLIP worker with
``OMP_NUM_THREADS`` = every core (``flows/cluster.py``; its DFT worker and EMT use one).

Run: ``.venv/bin/python benchmarks/orchestration.py [--record]`` (2,000 candidates: about an hour
on 2 cores, the two rounds about equally; nothing else should run meanwhile: both rounds compete
for the same two cores), ``--candidates 200`` for a quick look.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.local_server import prefect_server  # noqa: E402

warnings.filterwarnings("ignore")


def candidates(n: int, seed: int = 0) -> list:
    """Cu-Pd fcc cells of 2, 4 and 8 atoms, randomly decorated and strained."""
    from ase.build import bulk
    from pymatgen.io.ase import AseAtomsAdaptor

    from matdisc.generate import Candidate

    rng = np.random.default_rng(seed)
    shapes = [((2, 1, 1), False), ((1, 1, 1), True), ((2, 1, 1), True)]  # 2, 4, 8 atoms
    out = []
    for i in range(n):
        rep, cubic = shapes[i % len(shapes)]
        a = bulk("Cu", "fcc", a=3.75, cubic=cubic).repeat(rep) if cubic else bulk("Cu", "fcc", a=3.75).repeat(rep)
        a.numbers = rng.choice([29, 46], len(a))
        a.set_cell(a.cell * (1 + rng.uniform(-0.02, 0.02, 3)), scale_atoms=True)
        s = AseAtomsAdaptor.get_structure(a)
        out.append(Candidate(structure=s, source="benchmark", prototype=f"fcc{len(a)}", seed=i))
    return out


async def flow_run_times(name: str) -> tuple[float, dict[str, list[float]]]:
    """(summed task run time, {task name: [count, run seconds]}) of the flow run named ``name``.

    (The flow run's own ``start_time``/``total_run_time`` are not used: they gave 92.0 and 92.5 s
    for runs that logged over 104 s and 620 s.)"""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, TaskRunFilter, TaskRunFilterFlowRunId

    async with get_client() as client:
        (run,) = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        tasks, page = [], None
        while page is None or len(page) == 200:  # the API returns at most 200 per call
            page = await client.read_task_runs(
                task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run.id])),
                limit=200, offset=len(tasks))
            tasks += page
    by_name: dict[str, list[float]] = {}
    for t in tasks:  # 'reference-relax-static-1a2' -> 'reference-relax-static'
        entry = by_name.setdefault(t.name.rsplit("-", 1)[0], [0, 0.0])
        entry[0] += 1
        entry[1] = round(entry[1] + t.total_run_time.total_seconds(), 1)
    return sum(t.total_run_time.total_seconds() for t in tasks), by_name


def in_process_round(cfg) -> float:
    """Wall seconds of round 1 run by the in-process executor (the product's round, no engine)."""
    import logging

    from matdisc.executor import InProcess
    from matdisc.round import run_campaign

    log = logging.getLogger("matdisc.round")  # its stage lines with times, to compare with the flow run's
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d | in-process | %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    t = time.perf_counter()
    run_campaign(cfg, InProcess(), rounds=1)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=2000)
    parser.add_argument("--structures-per-task", type=int, default=200)
    parser.add_argument("--dft-budget", type=int, default=8)
    parser.add_argument("--record", action="store_true", help="append the line to docs/benchmarks/orchestration.jsonl")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="matdisc-orch-"))
    with prefect_server(tmp) as api:  # a real `prefect server start` on 127.0.0.1
        from matdisc.config import CampaignConfig
        from matdisc.stages.generate import add_candidates
        from matdisc.store import CampaignWriter
        from matdisc_flows.deployment import run_campaign, run_name

        cfg = CampaignConfig.model_validate({
            "name": "orchestration-bench", "chemsys": ["Cu", "Pd"], "store": str(tmp / "bench.zarr"),
            "generation": {"max_atoms": 8, "seed": 0},
            "mlip": {"model": "cold-start", "ensemble": 2, "device": "cpu", "fmax": 0.05, "max_steps": 200,
                     "structures_per_task": args.structures_per_task,
                     "training": {"num_channels": 16, "max_L": 0, "r_max": 4.5, "max_num_epochs": 20,
                                  "batch_size": 4},
                     "cold_start": {"perturbed_per_structure": 2}},
            "reference": {"calculator": "emt", "fmax": 0.02, "max_steps": 200},
            "active_learning": {"rounds": 1, "dft_budget": args.dft_budget},
            "compute": {"scheduler": "local", "dft_workers": 1, "mlip_workers": 1},
        })
        t = time.perf_counter()
        run_campaign(cfg, rounds=0)  # round 0: cold start
        t_cold = time.perf_counter() - t
        with CampaignWriter(cfg.store_path) as w:
            pool = candidates(args.candidates)
            add_candidates(w, pool, 1, "generated")
        shutil.copytree(cfg.store_path, tmp / "in-process.zarr")
        t = time.perf_counter()
        run_campaign(cfg, rounds=1)
        wall = time.perf_counter() - t
        compute, by_name = asyncio.run(flow_run_times(run_name(cfg, 1, 1)))
    in_process = in_process_round(cfg.model_copy(update={"store": str(tmp / "in-process.zarr")}))
    result = dict({
        "candidates": args.candidates,
        "wall_s": round(wall, 1),
        "task_compute_s": round(compute, 1),
        "overhead_ratio": round(wall / compute, 3),
        "in_process_s": round(in_process, 1),
        "overhead_vs_in_process": round(wall / in_process, 3),
        "tasks": sum(int(n) for n, _ in by_name.values()),
        "task_runs": by_name,
        "structures_per_task": args.structures_per_task,
        "cold_start_s": round(t_cold, 1),
        "api": api,
    })
    print(json.dumps(result), flush=True)
    if args.record:
        from record import record

        record("orchestration", result)


if __name__ == "__main__":
    main()
