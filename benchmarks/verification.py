"""Verification from the MLIP geometry vs from the generated structure: the same picks, both ways.

The product's own pieces: the picks are the acquisition order of a campaign's round
(``stages.select.rank_for_reference``), the starts are ``stages.verify.reference_starts`` (the
MLIP structure where it can be trusted, the generated one where not: those count the same on
both sides), and each calculation is the reference job the DFT workers run (``jobs.reference``).

Two sets:

* ``emt``: a Cu-Pd-Au campaign with EMT as the reference, run here in-process from a cold start
  through round 1 (AFLOW prototypes up to 6 atoms, a 2-member committee); its first
  ``--emt-picks`` picks of round 1.
* ``gpaw``: with ``--store DEMO.zarr`` (a store ``make demo`` or ``benchmarks/demo_seeds.py``
  wrote), the first ``--gpaw-picks`` of the demo's DFT-verified round-1 and round-2 picks, with
  the demo's own GPAW settings, from the store's latest MLIP structures.

Per set and overall: ``dft_steps_initial``, ``dft_steps_mlip`` and ``steps_ratio`` (target
<= 0.5), ``dft_seconds_ratio``, ``max_abs_dE_same_minimum_mev`` (both relaxations end in the
same structure by StructureMatcher: target <= 1 meV/atom), ``different_minimum`` (count) and
``different`` (each one: formula, both energies, which is lower), ``fallbacks`` (picks the start
rule sent to the generated structure, with the reason).

Run: ``.venv/bin/python benchmarks/verification.py [--store runs/quickstart-al-li.zarr] [--record]``
(EMT set about 4 minutes on 2 cores; the GPAW set about a minute per pick).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")


def verify_both_ways(store: Path, cfg, ids: list[str], workdir: Path) -> dict:
    """Each id verified three ways: from its generated structure with ASE's initial Hessian (what
    verification did before), from the product's start with ASE's Hessian (the start alone), and
    as the product verifies it (its start, with the committee's Hessian at an MLIP start)."""
    from pymatgen.core.structure_matcher import StructureMatcher
    from pymatgen.io.ase import AseAtomsAdaptor

    from matdisc import jobs
    from matdisc.executor import InProcess
    from matdisc.stages.context import Run
    from matdisc.stages.start import reference_starts, with_hessians
    from matdisc.store import CampaignWriter

    ref = cfg.reference
    with CampaignWriter(store) as w:
        sel = w.table("selections")
        picked_in = dict(zip(sel["id"], sel["round"]))
        start_only = reference_starts(w, ref.model_copy(update={"start": "mlip"}), ids)
        t = time.perf_counter()
        run = Run(w, cfg.model_copy(update={"reference": ref.model_copy(update={"start": "mlip", "hessian": "mlip"})}),
                  InProcess())
        product = {}
        for round_ in sorted({int(picked_in.get(cid, 1)) for cid in ids}):  # the committee that screened its round
            mine = {cid: start_only[cid] for cid in ids if int(picked_in.get(cid, 1)) == round_}
            product.update(with_hessians(run.round(round_), mine))
        hessian_seconds = time.perf_counter() - t
        initial = reference_starts(w, ref.model_copy(update={"start": "initial"}), ids)
        formula = dict(zip(w.table("candidates")["id"], w.table("candidates")["formula"]))
    settings = ref.model_dump(mode="json")
    rows = []
    for cid in ids:
        res = {}
        for side, start in (("initial", initial[cid]), ("start_only", start_only[cid]), ("mlip", product[cid])):
            if side != "initial" and start.start == "initial":
                res[side] = res["initial"]  # the rule fell back: the product runs the same calculation
                continue
            t = time.perf_counter()
            r = jobs.reference(cid, start.atoms, settings, str(workdir / side), start.hessian)
            res[side] = (r, time.perf_counter() - t)
        (ri, ti), (rs, _), (rm, tm) = res["initial"], res["start_only"], res["mlip"]
        same = (ri.ok and rm.ok and StructureMatcher().fit(AseAtomsAdaptor.get_structure(ri.atoms),
                                                           AseAtomsAdaptor.get_structure(rm.atoms)))
        rows.append({"id": cid, "formula": formula[cid], "start": product[cid].start,
                     "reason": product[cid].reason, "hessian": product[cid].curvature,
                     "steps_initial": ri.n_steps, "steps_start_only": rs.n_steps, "steps_mlip": rm.n_steps,
                     "seconds_initial": ti, "seconds_mlip": tm, "status_initial": ri.status,
                     "status_mlip": rm.status, "e_initial": ri.energy_per_atom, "e_mlip": rm.energy_per_atom,
                     "same_minimum": bool(same)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {**summarise(rows), "hessian_seconds": round(hessian_seconds, 1)}


def summarise(rows: list[dict]) -> dict:
    si, sm = sum(r["steps_initial"] for r in rows), sum(r["steps_mlip"] for r in rows)
    ss = sum(r["steps_start_only"] for r in rows)
    ti, tm = sum(r["seconds_initial"] for r in rows), sum(r["seconds_mlip"] for r in rows)
    same = [abs(r["e_mlip"] - r["e_initial"]) * 1000 for r in rows if r["same_minimum"]]
    different = [{"formula": r["formula"], "id": r["id"], "e_initial": round(r["e_initial"], 5),
                  "e_mlip": round(r["e_mlip"], 5), "status": [r["status_initial"], r["status_mlip"]],
                  "lower": "mlip" if r["e_mlip"] < r["e_initial"] else "initial"}
                 for r in rows if not r["same_minimum"]]
    return {"picks": len(rows), "from_mlip": sum(r["start"] == "mlip" for r in rows),
            "fallbacks": [f"{r['formula']}: {r['reason']}" for r in rows if r["start"] != "mlip"],
            "with_model_hessian": sum(r["hessian"] == "mlip" for r in rows),
            "dft_steps_initial": si, "dft_steps_mlip": sm, "steps_ratio": round(sm / si, 3) if si else None,
            "dft_steps_start_only": ss, "steps_ratio_start_only": round(ss / si, 3) if si else None,
            "dft_seconds_initial": round(ti, 1), "dft_seconds_mlip": round(tm, 1),
            "dft_seconds_ratio": round(tm / ti, 3) if ti else None,
            "max_abs_dE_same_minimum_mev": round(max(same), 3) if same else None,
            "different_minimum": len(different), "different": different,
            "converged_initial": sum(r["status_initial"] == "ok" for r in rows),
            "converged_mlip": sum(r["status_mlip"] == "ok" for r in rows)}


def emt_set(n: int, workdir: Path) -> dict:
    """Round 1 of an in-process EMT campaign, its first ``n`` picks verified both ways."""
    from matdisc.config import CampaignConfig
    from matdisc.executor import InProcess
    from matdisc.round import run_campaign
    from matdisc.stages.select import rank_for_reference
    from matdisc.store import CampaignWriter

    cfg = CampaignConfig.model_validate({
        "name": "verification-bench", "chemsys": ["Cu", "Pd", "Au"], "store": str(workdir / "emt.zarr"),
        "generation": {"max_atoms": 6, "seed": 0, "random": {"per_round": 8}},
        "mlip": {"model": "cold-start", "ensemble": 2, "device": "cpu", "fmax": 0.05, "max_steps": 200,
                 "training": {"num_channels": 16, "max_L": 0, "r_max": 4.5, "max_num_epochs": 40, "batch_size": 4},
                 "cold_start": {"perturbed_per_structure": 2}},
        "reference": {"calculator": "emt", "fmax": 0.02, "max_steps": 300},
        "active_learning": {"rounds": 1, "dft_budget": 2},
        "compute": {"scheduler": "local"},
    })
    run_campaign(cfg, InProcess(), rounds=1)
    ranked_cfg = cfg.model_copy(update={"active_learning": cfg.active_learning.model_copy(update={"dft_budget": n})})
    with CampaignWriter(cfg.store_path) as w:
        sel = w.table("selections")
        ids = list(sel["id"][sel["round"] == 1])
        ids += [p.id for p in rank_for_reference(w, ranked_cfg, 1) if p.id not in ids]
    return verify_both_ways(cfg.store_path, cfg, ids[:n], workdir / "emt-calcs")


def gpaw_set(store: Path, n: int, workdir: Path) -> dict:
    """The demo store's verified picks of rounds 1-2, with its own reference settings."""
    import shutil

    from matdisc.config import CampaignConfig
    from matdisc.store import open_campaign

    copy = workdir / "demo.zarr"
    shutil.copytree(store, copy)  # the writer's lock and nothing else: the benchmark never writes results there
    camp = open_campaign(copy)
    cfg = CampaignConfig.model_validate_json(camp.runs()["config"].iloc[-1])
    sel = camp.table("selections")
    dft = camp.table("dft")
    verified = set(dft["id"][dft["status"] == "ok"])
    ids = [cid for cid in sel["id"] if cid in verified][:n]
    return verify_both_ways(copy, cfg, ids, workdir / "gpaw-calcs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emt-picks", type=int, default=16)
    parser.add_argument("--store", help="a demo store (Al-Li, GPAW) for the GPAW set")
    parser.add_argument("--gpaw-picks", type=int, default=4)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="matdisc-verification-"))
    result: dict = {"emt": emt_set(args.emt_picks, workdir)}
    if args.store:
        result["gpaw"] = gpaw_set(Path(args.store), args.gpaw_picks, workdir)
    sets = list(result.values())
    si, sm = sum(s["dft_steps_initial"] for s in sets), sum(s["dft_steps_mlip"] for s in sets)
    ti, tm = sum(s["dft_seconds_initial"] for s in sets), sum(s["dft_seconds_mlip"] for s in sets)
    same = [s["max_abs_dE_same_minimum_mev"] for s in sets if s["max_abs_dE_same_minimum_mev"] is not None]
    result.update(dft_steps_initial=si, dft_steps_mlip=sm, steps_ratio=round(sm / si, 3) if si else None,
                  dft_seconds_ratio=round(tm / ti, 3) if ti else None,
                  max_abs_dE_same_minimum_mev=max(same) if same else None,
                  different_minimum=sum(s["different_minimum"] for s in sets))
    print(json.dumps(result))
    if args.record:
        from record import record

        record("verification", result)


if __name__ == "__main__":
    main()
