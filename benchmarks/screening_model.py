"""Which training data and settings give a screening model good enough to screen (issue 27, item 5)?

Trains the model that screens round R on the frames of rounds < R of a finished campaign store
(selected as the product selects them: ``stages.train.training_set``, reference settings, held-out
structures out) with the product's ``train_committee``, and prints per variant one JSON line with
its energy MAE on round R's new DFT structures (``discovery.new_reference_frames``), the mean
signed error and the largest error; first the store's own screening model on the same frames.

Variants (a JSON object, name -> settings): ``{"start": "previous"}`` fine-tunes the model of round
R-2 as the product does; ``{"training": {...}}`` overrides ``mlip.training`` fields;
``{"extra_prototypes": [...]}`` adds EMT-labelled frames of more cold-start prototypes (relaxation
and three rattled/strained statics each, as a cold start computes them; EMT stores only).

Run: ``.venv/bin/python benchmarks/example_campaign.py STORE`` (the Cu-Pd EMT example, in-process),
then ``.venv/bin/python benchmarks/screening_model.py STORE 2 '{"scratch": {}, "xseeds":
{"extra_prototypes": ["B1", "B3", "diamond", "B8_1"]}}'``.
"""
import json, sys, time, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import numpy as np
from matdisc.config import saved_config
from matdisc.discovery import new_reference_frames
from matdisc.mlip.train import predict_energies, train_committee
from matdisc.stages.train import training_set
from matdisc.store import open_campaign


def main():
    store, R = sys.argv[1], int(sys.argv[2])
    variants = json.loads(sys.argv[3])
    camp = open_campaign(store)
    cfg = saved_config(camp.table("runs")["config"].iloc[-1]) if "config" in camp.table("runs") else None
    frames, groups = training_set(camp, cfg)
    # frames of rounds < R only: the frames table's round column, in the same order training_set keeps
    table = camp.table("frames")
    from matdisc.stages.heldout import group_of
    round_of_group = {}
    for cid, r in zip(table["id"], table["round"]):
        g = group_of(cid)
        round_of_group[g] = min(round_of_group.get(g, 99), int(r))
    keep = [i for i, g in enumerate(groups) if round_of_group.get(g, 99) < R]
    frames = [frames[i] for i in keep]; groups = [groups[i] for i in keep]
    test = new_reference_frames(camp, R)
    ref = np.array([a.info["REF_energy"] / len(a) for a in test])
    print(f"train frames {len(frames)} structures {len(set(groups))}; test structures {len(test)}", flush=True)
    models = camp.models()
    screening = json.loads(models[models["round"] <= R - 1]["paths"].iloc[-1])
    screening = [str(Path(store) / p) if not Path(p).is_absolute() else p for p in screening]
    e = predict_energies(screening, test)
    print(json.dumps({"variant": "the store's screening model", "mae_mev": round(float(np.abs(e - ref).mean() * 1000), 1),
                      "mean_err_mev": round(float((e - ref).mean() * 1000), 1)}), flush=True)
    def extra_seed_frames(names):
        """EMT-labelled frames of more seed prototypes, as a cold start would compute them: the
        relaxation's frames plus rattled and strained statics of the relaxed cell."""
        from ase.calculators.emt import EMT
        from ase.filters import FrechetCellFilter
        from ase.optimize import BFGS
        from pymatgen.io.ase import AseAtomsAdaptor
        from matdisc.dft.protocol import perturbed_copies
        from matdisc.stages.generate import seed_candidates
        c2 = cfg.model_copy(update={"mlip": cfg.mlip.model_copy(update={"cold_start": cfg.mlip.cold_start.model_copy(update={"prototypes": names})})})
        out, grp = [], []
        for k, cand in enumerate(seed_candidates(c2)):
            a = AseAtomsAdaptor.get_atoms(cand.structure)
            traj = []
            def label(x):
                y = x.copy(); y.calc = None
                y.info["REF_energy"] = x.get_potential_energy(); y.arrays["REF_forces"] = x.get_forces(); y.info["REF_stress"] = x.get_stress()
                return y
            a.calc = EMT()
            opt = BFGS(FrechetCellFilter(a), logfile=None)
            opt.attach(lambda: traj.append(label(a)))
            opt.run(fmax=0.02, steps=100)
            for p in perturbed_copies(a, 3, rattle=0.05, strain=0.04, seed=k):
                p.calc = EMT(); traj.append(label(p))
            out += traj; grp += [f"xseed:{k}"] * len(traj)
        return out, grp


    for name, over in variants.items():
        if "extra_prototypes" in over:
            xf, xg = extra_seed_frames(over["extra_prototypes"])
            print(f"{name}: {len(xf)} extra seed frames of {len(set(xg))} structures", flush=True)
            frames_v, groups_v = frames + xf, groups + xg
        else:
            frames_v, groups_v = frames, groups
        tc = cfg.mlip.training.model_copy(update=over.get("training", {}))
        start = None
        if over.get("start") == "previous":
            models = camp.models()
            start = json.loads(models[models["round"] <= R - 2]["paths"].iloc[-1])
            start = [str(Path(store) / p) if not Path(p).is_absolute() else p for p in start]
        t = time.perf_counter()
        members = train_committee(frames_v, groups_v, Path(f"/tmp/item5/w-{name}"), tc, size=over.get("size", 1), seed=R * 100, device="cpu", start_models=start)
        e = predict_energies([str(m.path) for m in members], test)
        err = (e - ref) * 1000
        print(json.dumps({"variant": name, "mae_mev": round(float(np.abs(err).mean()), 1), "mean_err_mev": round(float(err.mean()), 1),
                          "max_abs_mev": round(float(np.abs(err).max()), 1), "seconds": round(time.perf_counter() - t)}), flush=True)


if __name__ == "__main__":  # training processes re-import this module
    main()
