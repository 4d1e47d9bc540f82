"""Discovery benchmark: how many DFT calculations each acquisition strategy needs to find the hull.

EMT is the reference calculator (instant and exact for its own physics), so the true hull
of a system can be computed exhaustively:

1. the candidate pool is what matdisc's generator produces for the system in one round
   (decorated prototypes, substitutions, PyXtal random crystals; deduplicated), and the
   elements in fcc/bcc/hcp;
2. every candidate is relaxed with EMT through matdisc's reference protocol (the same
   ``run_reference`` the flow runs; two processes). The true hull phases are the compounds
   on the hull of all of them (vertices, within 0.1 meV/atom); a candidate of such a
   composition whose relaxed energy lies within 2 meV/atom of the hull recovers that phase;
3. each strategy then runs a campaign over the pool with the library functions the flow
   calls. The cold start is the flow's default (``mlip.cold_start.prototypes``): the
   elements in fcc/bcc/hcp and the pool's B2, L1_0 and L1_2 compounds, relaxed with the
   reference, plus rattled/strained copies, train the first committee; the compounds are
   DFT calculations of the campaign, so they are its first calls and count against the
   budget, for every strategy (``--cold-start elements``: elements only, nothing charged).
   Each round a MACE committee (trained here, tiny: 16x0e) relaxes the pool, ``thermo.score``
   puts it on the current DFT hull, ``active.select`` picks ``--per-round`` candidates, their
   EMT results (computed in step 2: EMT is deterministic, so a lookup equals a rerun) join
   the DFT hull and, as diverse frames (the training-set policy), the training set, and the
   committee is fine-tuned. Until ``--budget`` calculations are spent (a campaign that has
   recovered every phase stops early: its curve stays at 1).

``random`` needs no model, and random selection without replacement from the whole pool
(no cold start) is also averaged over 2,000 permutations for the calls it needs to reach the
target recovery (the denominator of ``calls_ratio_vs_random``). Per strategy, one JSON line:

* ``hull_recovered_fraction``: mean over seeds of the true hull phases recovered at the budget;
* ``dft_fraction_of_exhaustive``: mean calls to reach ``--target`` recovery (95 %), over the
  exhaustive count (pool size); a seed that never reaches it counts as the whole pool;
* ``calls_ratio_vs_random``: those mean calls over random selection's expected calls;
* ``daf``: discovery acceleration factor at the budget: the fraction of picks that are on
  the true hull over that fraction in the whole pool;
* ``hull_gap_mev_max``: over seeds, the largest distance between the campaign's DFT hull at
  the budget and the true hull at a true phase's composition (meV/atom): how wrong the hull
  a user would read off is where a phase was missed (0 when all were found).

Systems: Cu-Pd and Cu-Pd-Au, whose EMT hull phases are L1_0/L1_2 compounds that the flow's
cold start itself relaxes (so every strategy has them at once), and Al-Ag, whose phases (L1_1
AlAg, C6 Al2Ag and AlAg2) no cold-start seed is: the case that measures acquisition under the
default configuration.

Run: ``.venv/bin/python benchmarks/discovery.py`` (the three systems, 3 seeds; a model
campaign trains for about 10 minutes on 2 cores on the binaries, more on the ternary; the whole
run takes hours: ``--system``/``--strategies``/``--first-seed`` split it, and two processes share
two cores well), or ``--system Ag-Au --budget 20`` for any EMT system.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REFERENCE = {"calculator": "emt", "fmax": 0.02, "max_steps": 300}
PHASE_TOL = 0.002  # eV/atom: a relaxed candidate this close to the true hull is that phase
#: The campaign's own CPU training (``mlip.training`` defaults, preset ``cpu``: 16x0e, 60 epochs from
#: scratch, 30 fine-tuning, batches of 4) with the diverse-frames policy. A lighter schedule (40/15
#: epochs, batches of 8: a third of the optimizer steps) was used here before; it left the committee
#: unable to rank even its own training compounds (Al-Ag cold start: formation-energy Spearman -0.06
#: over the pool, L1_1 AlAg predicted 52 meV/atom too high), and measured that, not acquisition.
TRAINING = {"preset": "cpu", "frames": "diverse", "frames_per_structure": 6}


# -- pool and truth ------------------------------------------------------------------------------
def build_pool(chemsys: list[str], max_atoms: int, n_random: int, seed: int = 0):
    """(elements, candidates): Candidate lists; candidates are the generator's one-round output."""
    from matdisc.config import GenerationConfig
    from matdisc.generate import generate, prototype_candidates

    gen = GenerationConfig(max_atoms=max_atoms, seed=seed, random={"per_round": n_random},
                           substitution={"per_round": None})
    elements = [c for c in prototype_candidates(chemsys, gen, names=["fcc", "bcc", "hcp"])
                if len(c.structure.composition.elements) == 1]
    cands, _, _ = generate(chemsys, gen, round_=1, existing=[e.structure for e in elements])
    return elements, [c for c in cands if len(c.structure.composition.elements) > 1]


def _emt_relax(job):
    from matdisc.config import ReferenceConfig
    from matdisc.dft import run_reference

    cid, atoms, workdir = job
    res = run_reference(atoms, ReferenceConfig(**REFERENCE), id=cid, workdir=Path(workdir))
    return cid, res


def exhaustive(jobs: list[tuple[str, object]], workdir: Path) -> dict:
    """id -> ReferenceResult for every structure, two processes."""
    with ProcessPoolExecutor(2) as pool:
        return dict(pool.map(_emt_relax, [(cid, a, str(workdir)) for cid, a in jobs], chunksize=4))


def true_hull(results: dict, formulas: dict[str, str], chemsys: list[str]) -> tuple[dict[str, str], set[str]]:
    """(candidate id -> hull phase it recovers, set of true hull phases) from exhaustive results.

    A true hull phase is a compound on the hull (a vertex: within 0.1 meV/atom, the noise of
    converged relaxations); a candidate recovers it when its relaxed energy lies within
    ``PHASE_TOL`` of the hull at that composition. A compound merely near the hull at a
    composition with no vertex is not a phase to find.
    """
    from pymatgen.core import Composition

    from matdisc.thermo import hull_energies

    ids = [cid for cid, r in results.items() if r.status == "ok"]
    e = [results[cid].energy_per_atom for cid in ids]
    e_form, e_hull = hull_energies([formulas[c] for c in ids], e, chemsys)
    compound = {c: len(Composition(formulas[c]).elements) > 1 for c in ids}
    phases = {formulas[c] for c, ef, eh in zip(ids, e_form, e_hull) if compound[c] and ef < 0 and eh <= 1e-4}
    phase_of = {c: formulas[c] for c, eh in zip(ids, e_hull) if formulas[c] in phases and eh <= PHASE_TOL}
    return phase_of, phases


def hull_gap_mev(verified: list[str], truth: dict, formulas: dict[str, str], phases: set[str]) -> float:
    """Largest distance (meV/atom) between the hull of ``verified`` and the true hull, over the
    true phases' compositions: 0 when every phase (or a degenerate polymorph) was found."""
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
    from pymatgen.core import Composition

    ok = [c for c in truth if truth[c].status == "ok"]
    entries = [PDEntry(Composition(formulas[c]), truth[c].energy_per_atom * Composition(formulas[c]).num_atoms)
               for c in verified if truth[c].status == "ok"]
    pd = PhaseDiagram(entries)
    best = {f: min(truth[c].energy_per_atom for c in ok if formulas[c] == f) for f in phases}
    return 1000 * max(pd.get_hull_energy_per_atom(Composition(f)) - e for f, e in best.items())


# -- one campaign -------------------------------------------------------------------------------
class Campaign:
    """One strategy, one seed: the loop of the flow, with the heavy steps called in-process."""

    def __init__(self, strategy: str, seed: int, chemsys, elements, pool, truth, workdir: Path, *, ensemble: int,
                 per_round: int, budget: int, round0_models: list[str] | None, seeds: list | None = None):
        seeds = seeds or []
        self.strategy, self.seed, self.chemsys = strategy, seed, chemsys
        self.elements, self.pool, self.truth = elements, pool, truth
        self.workdir, self.ensemble, self.per_round, self.budget = workdir, ensemble, per_round, budget
        self.models = round0_models
        self.order: list[str] = []  # DFT calculations in the order acquisition spent them
        self.frames: list = []
        self.groups: list[str] = []
        self.seconds = {"train": 0.0, "relax": 0.0, "select": 0.0}
        for c in elements + seeds:  # cold start: relaxed seeds and their perturbed copies
            self.add_training(c.id, truth[c.id].frames)
            self.add_training(c.id, perturbed_frames(truth[c.id], seed))
        self.order += [c.id for c in seeds]  # compound seeds are DFT calls: they count against the budget

    def add_training(self, cid: str, frames: list) -> None:
        from matdisc.mlip.train import diverse_frames

        usable = [f for f in frames if np.isfinite(f.info.get("REF_energy", np.nan))]
        if not usable:
            return
        e = np.array([f.info["REF_energy"] / len(f) for f in usable])
        fmax = np.array([np.linalg.norm(f.arrays["REF_forces"], axis=1).max() for f in usable])
        for j in diverse_frames(e, fmax, TRAINING["frames_per_structure"]):
            self.frames.append(usable[j])
            self.groups.append(cid)

    def train(self, round_: int) -> None:
        from matdisc.config import TrainingConfig
        from matdisc.mlip import train_committee

        t0 = time.perf_counter()
        trained = train_committee(self.frames, self.groups, self.workdir / f"train-r{round_}", TrainingConfig(**TRAINING),
                                  size=self.ensemble, seed=self.seed * 100 + round_, device="cpu",
                                  start_models=self.models)
        self.models = [str(m.path) for m in trained]
        self.seconds["train"] += time.perf_counter() - t0

    def table(self) -> pd.DataFrame:
        """The candidates frame acquisition sees: MLIP results and DFT results so far."""
        from matdisc.config import MLIPConfig
        from matdisc.mlip import relax_many
        from matdisc.thermo import score

        everything = [(c.id, c.atoms) for c in self.elements + self.pool]
        done = set(self.order) | {c.id for c in self.elements}
        if self.strategy == "random":
            res = {cid: None for cid, _ in everything}
        else:
            t0 = time.perf_counter()
            out = relax_many(everything, self.models, MLIPConfig(device="cpu", fmax=0.05, max_steps=200))
            res = {r.id: r for r in out}
            self.seconds["relax"] += time.perf_counter() - t0
        rows = []
        for c in self.elements + self.pool:
            r = res[c.id]
            ref = self.truth[c.id]
            dft_ok = c.id in done and ref.status == "ok"
            rows.append({"id": c.id, "formula": c.formula, "prototype": c.prototype, "source": c.source,
                         "mlip_status": "ok" if r is None else r.status,
                         "e_mlip_per_atom": 0.0 if r is None else r.energy_per_atom,
                         "sigma": 0.0 if r is None else r.sigma,
                         "dft_status": ("ok" if dft_ok else ref.status) if c.id in done else "",
                         "e_dft_per_atom": ref.energy_per_atom if dft_ok else np.nan})
        df = pd.DataFrame(rows)
        usable = df["mlip_status"].isin(["ok", "symmetry_changed"])
        scores = score(list(df["formula"]), np.where(usable, df["e_mlip_per_atom"], np.nan),
                       df["e_dft_per_atom"].to_numpy(), self.chemsys)
        self._relaxed = res
        return df.assign(**scores)

    def run(self, target_phases: set[str], phase_of: dict[str, str]) -> None:
        from pymatgen.io.ase import AseAtomsAdaptor

        from matdisc.active import select, structure_families
        from matdisc.config import ActiveLearningConfig

        round_ = 0
        while len(self.order) < self.budget:
            round_ += 1
            if self.models is None and self.strategy != "random":
                self.train(0)
            df = self.table()
            t0 = time.perf_counter()
            structure_of = verified = None
            diversity = self.strategy == "uncertainty"
            if diversity:
                structure_of = lambda cid: AseAtomsAdaptor.get_structure(self._relaxed[cid].atoms)  # noqa: E731
                verified = {}
                for cid, f in zip(df["id"], df["formula"]):
                    if cid in self.order and self._relaxed[cid].status in ("ok", "symmetry_changed"):
                        verified.setdefault(f, []).append(structure_of(cid))
            n = min(self.per_round, self.budget - len(self.order))
            al = ActiveLearningConfig()  # the defaults a campaign runs with
            picks = select(df, n, strategy=self.strategy, kappa=al.kappa, explore_fraction=al.explore_fraction,
                           seed=self.seed * 1000 + round_, structure_of=structure_of, verified=verified,
                           max_per_composition=al.max_per_composition if diversity else None,
                           families=structure_families(df) if diversity and al.structure_spread else None)
            self.seconds["select"] += time.perf_counter() - t0
            if not picks:
                break
            for p in picks:
                self.order.append(p.id)
                self.add_training(p.id, self.truth[p.id].frames)
            if {phase_of[c] for c in self.order if c in phase_of} >= target_phases:
                break  # every phase found: the curve stays at 1 up to the budget
            if self.strategy != "random" and len(self.order) < self.budget:
                self.train(round_)
        self.rounds = round_


def cold_start_seeds(pool: list, mode: str) -> list:
    """The pool's compounds a campaign's cold start relaxes with the reference before any model
    exists (``mlip.cold_start.prototypes`` beyond fcc/bcc/hcp), or none."""
    from matdisc.config import ColdStartConfig

    if mode == "elements":
        return []
    names = set(ColdStartConfig().prototypes) - {"fcc", "bcc", "hcp"}
    return [c for c in pool if c.prototype in names]


def perturbed_frames(result, seed: int) -> list:
    """Rattled/strained EMT statics of a relaxed element (the flow's cold-start perturbations)."""
    from ase.calculators.emt import EMT

    from matdisc.dft import perturbed_copies
    from matdisc.records import labelled

    out = []
    for a in perturbed_copies(result.atoms, 3, rattle=0.05, strain=0.04, seed=seed):
        a.calc = EMT()
        out.append(labelled(a, a.get_potential_energy(), a.get_forces(), a.get_stress()))
    return out


# -- the benchmark ------------------------------------------------------------------------------
class Item:
    def __init__(self, cid: str, cand):
        from pymatgen.io.ase import AseAtomsAdaptor

        self.id, self.formula, self.atoms = cid, cand.formula, AseAtomsAdaptor.get_atoms(cand.structure)
        self.prototype, self.source = cand.prototype, cand.source


def run_system(args, system: str) -> list[dict]:
    from matdisc.metrics import calls_to_reach, expected_random_calls, recovery_curve

    chemsys = system.split("-")
    t0 = time.perf_counter()
    elements, pool = build_pool(chemsys, args.max_atoms, args.random)
    elements = [Item(f"el-{i}-{c.formula}-{c.prototype}", c) for i, c in enumerate(elements)]
    pool = [Item(f"c{i:03d}-{c.formula}-{c.prototype or c.source}", c) for i, c in enumerate(pool)]
    t_gen = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix=f"discovery-{system}-"))
    t0 = time.perf_counter()
    truth = exhaustive([(c.id, c.atoms) for c in elements + pool], tmp / "emt")
    t_exh = time.perf_counter() - t0
    formulas = {c.id: c.formula for c in elements + pool}
    seeds = cold_start_seeds(pool, args.cold_start)
    phase_of, phases = true_hull(truth, formulas, chemsys)
    n = len(pool)
    budget = args.budget or math.ceil(0.25 * n)
    per_round = args.per_round or max(4, budget // 4)
    prevalence = sum(1 for c in pool if c.id in phase_of) / n
    ids = [c.id for c in pool]
    random_calls = expected_random_calls(phase_of, ids, args.target, len(phases))
    print(f"# {system}: {n} candidates ({len(elements)} elemental references), {len(phases)} true hull phases "
          f"{sorted(phases)}, {sum(1 for c in pool if c.id in phase_of)} candidates on them; budget {budget} "
          f"({len(seeds)} cold-start seeds: {sorted(c.formula + ' ' + c.prototype for c in seeds)}); "
          f"random needs {random_calls:.1f} calls for {args.target:.0%} (generation {t_gen:.0f} s, "
          f"exhaustive EMT {t_exh:.0f} s)", file=sys.stderr, flush=True)
    lines = []
    round0: dict[int, list[str]] = {}
    for strategy in args.strategies.split(","):
        recovered, calls, dafs, per_seed, gaps = [], [], [], [], []
        t_s = time.perf_counter()
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            camp = Campaign(strategy, seed, chemsys, elements, pool, truth, tmp / f"{strategy}-s{seed}",
                            ensemble=args.ensemble, per_round=per_round, budget=budget,
                            round0_models=round0.get(seed), seeds=seeds)
            if strategy != "random" and seed not in round0:
                camp.train(0)
                round0[seed] = camp.models  # the same cold-start committee for every strategy of a seed
            camp.run(phases, phase_of)
            curve = recovery_curve(camp.order, phase_of, len(phases))
            if len(curve) and curve[-1] >= 1.0:
                full = np.concatenate([curve, np.ones(budget - len(curve))])
            else:
                full = curve
                if strategy == "random" and calls_to_reach(curve, args.target) is None:
                    rest = [i for i in np.random.default_rng(seed).permutation(ids) if i not in set(camp.order)]
                    full = recovery_curve(camp.order + rest, phase_of, len(phases))
            at_budget = full[min(budget, len(full)) - 1] if len(full) else 0.0
            need = calls_to_reach(full, args.target)
            recovered.append(float(at_budget))
            calls.append(need if need is not None else n)
            on_hull = sum(1 for c in camp.order if c in phase_of)
            dafs.append((on_hull / len(camp.order)) / prevalence if camp.order and prevalence else float("nan"))
            found_at = {}
            for k, cid in enumerate(camp.order, 1):
                found_at.setdefault(phase_of.get(cid), k)
            found_at.pop(None, None)
            gap = hull_gap_mev([c.id for c in elements] + camp.order[:budget], truth, formulas, phases)
            gaps.append(gap)
            per_seed.append({"seed": seed, "recovered": round(float(at_budget), 3), "calls_to_target": need,
                             "phase_found_at_call": found_at, "hull_gap_mev": round(gap, 2), "calls": camp.order,
                             "calls_spent": len(camp.order), "rounds": camp.rounds,
                             "seconds": {k: round(v, 1) for k, v in camp.seconds.items()}})
            print(f"#   {strategy} seed {seed}: {per_seed[-1]}", file=sys.stderr, flush=True)
        line = {
            "system": system, "strategy": strategy, "seeds": args.seeds,
            "hull_recovered_fraction": round(float(np.mean(recovered)), 3),
            "dft_fraction_of_exhaustive": round(float(np.mean(calls)) / n, 3),
            "calls_ratio_vs_random": round(float(np.mean(calls)) / random_calls, 3),
            "daf": round(float(np.nanmean(dafs)), 2),
            "hull_gap_mev_max": round(float(np.max(gaps)), 2),
            "exhaustive_calls": n, "budget": budget, "per_round": per_round, "target": args.target,
            "true_hull_phases": sorted(phases), "random_expected_calls": round(random_calls, 1),
            "cold_start": args.cold_start, "cold_start_calls": len(seeds),
            "per_seed": per_seed, "wall_s": round(time.perf_counter() - t_s, 1),
        }
        print(json.dumps(line), flush=True)
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", action="append",
                        help="A-B or A-B-C of EMT elements (default: Cu-Pd, Al-Ag and Cu-Pd-Au)")
    parser.add_argument("--budget", type=int, help="DFT calculations per campaign (default: 25 %% of the pool)")
    parser.add_argument("--per-round", type=int, help="DFT picks per round (default: a quarter of the budget, at least 4)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed ... first-seed + seeds - 1")
    parser.add_argument("--ensemble", type=int, default=3, help="MACE committee size")
    parser.add_argument("--max-atoms", type=int, default=6)
    parser.add_argument("--random", type=int, default=60, help="PyXtal random crystals in the pool")
    parser.add_argument("--target", type=float, default=0.95, help="recovery the call counts are measured at")
    parser.add_argument("--strategies", default="uncertainty,greedy,random")
    parser.add_argument("--cold-start", choices=["flow", "elements"], default="flow",
                        help="flow: the campaign's default seeds (mlip.cold_start.prototypes), compounds charged "
                             "to the budget; elements: fcc/bcc/hcp elements only")
    args = parser.parse_args()
    for system in args.system or ["Cu-Pd", "Al-Ag", "Cu-Pd-Au"]:
        run_system(args, system)


if __name__ == "__main__":
    main()
