"""Rescoring vs relaxing every candidate again: MLIP work per round of the product's campaign.

Two campaigns of the product's round (``matdisc.round.run_campaign`` with the in-process
executor), from the same round-0 store (cold start: EMT seeds and a first committee): one with
``mlip.rescore`` at its default (a new committee rescores every candidate relaxed before, then
relaxes again those whose rescore ranks them within ``mlip.relax_again_per_pick`` x the DFT
budget), one with ``rescore: false`` (every candidate relaxed again by every committee).
Cu-Pd-Au with EMT as the reference, the AFLOW library up to ``--max-atoms``, a 2-member committee.

Prints one JSON line: per round the MLIP work in atom-steps (a relaxation: its FIRE steps x atoms;
a rescore: two evaluations x atoms, as the cost model counts it) of both, ``mlip_work_ratio_vs_rerelax``
(round ``--rounds``'s work with rescoring over without; target <= 0.3 at round 5), the cumulative
ratio, ``hull_equal`` (the same DFT hull phases at the end) and both hulls and wall times.

Run: ``.venv/bin/python benchmarks/rescoring.py [--rounds 5] [--record]`` (about 20 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")


def config(store: Path, args: argparse.Namespace, rescore: bool):
    from matdisc.config import CampaignConfig

    return CampaignConfig.model_validate(
        {
            "name": "rescoring-bench",
            "chemsys": ["Cu", "Pd", "Au"],
            "store": str(store),
            "generation": {"max_atoms": args.max_atoms, "seed": 0, "random": {"per_round": 8}},
            "mlip": {
                "model": "cold-start",
                "ensemble": 2,
                "device": "cpu",
                "fmax": 0.05,
                "max_steps": 200,
                "rescore": rescore,
                "training": {
                    "num_channels": 16,
                    "max_L": 0,
                    "r_max": 4.5,
                    "max_num_epochs": 30,
                    "batch_size": 4,
                    "finetune_epochs": 10,
                },
                "cold_start": {"perturbed_per_structure": 2},
            },
            "reference": {"calculator": "emt", "fmax": 0.02, "max_steps": 300},
            "active_learning": {"rounds": args.rounds, "dft_budget": 2, "patience": None},
            "compute": {"scheduler": "local", "threads_per_mlip_worker": 1},
        }
    )


def work_per_round(store: Path) -> dict[int, float]:
    from matdisc.stages.relax import RESCORE_STEPS
    from matdisc.store import open_campaign

    camp = open_campaign(store)
    mlip = camp.table("mlip")
    n_atoms = dict(zip(camp.table("candidates")["id"], camp.table("candidates")["n_atoms"]))
    atoms = np.array([n_atoms[c] for c in mlip["id"]], dtype=float)
    steps = np.where(mlip["kind"] == "rescore", RESCORE_STEPS, mlip["n_steps"].astype(float))
    work = atoms * steps
    return {int(r): float(work[(mlip["round"] == r).to_numpy()].sum()) for r in sorted(set(mlip["round"])) if r >= 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-atoms", type=int, default=6)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    from matdisc.executor import InProcess
    from matdisc.round import run_campaign
    from matdisc.store import open_campaign

    tmp = Path(tempfile.mkdtemp(prefix="matdisc-rescoring-"))
    run_campaign(config(tmp / "round0.zarr", args, True), InProcess(), rounds=0)
    per_pick = config(tmp / "x", args, True).mlip.relax_again_per_pick
    out: dict = {"rounds": args.rounds, "relax_again_per_pick": per_pick}
    for name, rescore in (("rescore", True), ("rerelax", False)):
        store = tmp / f"{name}.zarr"
        shutil.copytree(tmp / "round0.zarr", store)
        t = time.perf_counter()
        run_campaign(config(store, args, rescore), InProcess(), rounds=args.rounds)
        camp = open_campaign(store)
        mlip = camp.table("mlip")
        out[name] = {
            "seconds": round(time.perf_counter() - t, 1),
            "work_atom_steps": {str(k): v for k, v in work_per_round(store).items()},
            "rescored": int((mlip["kind"] == "rescore").sum()),
            "relaxed_again": int(mlip[mlip["kind"] == "rescore"].merge(mlip[mlip["kind"] == "relax"],
                                                                      on=["id", "model_sha256"]).shape[0]),
            "relaxed": int(((mlip["kind"] == "relax") & (mlip["round"] >= 1)).sum()),
            "hull_phases": json.loads(camp.rounds()["hull_phases"].iloc[-1]),
            "rounds_done": int(camp.rounds()["round"].max()),
        }
    last = str(min(out["rescore"]["rounds_done"], out["rerelax"]["rounds_done"]))
    a, b = out["rescore"]["work_atom_steps"], out["rerelax"]["work_atom_steps"]
    out["mlip_work_ratio_vs_rerelax"] = round(a.get(last, np.nan) / b[last], 3) if b.get(last) else None
    shared = [k for k in a if k in b]
    out["cumulative_ratio"] = round(sum(a[k] for k in shared) / sum(b[k] for k in shared), 3) if shared else None
    out["hull_equal"] = out["rescore"]["hull_phases"] == out["rerelax"]["hull_phases"]
    print(json.dumps(out))
    if args.record:
        from record import record

        record("rescoring", out)


if __name__ == "__main__":
    main()
