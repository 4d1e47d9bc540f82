"""Discovery benchmark: how many DFT calculations the product's campaign needs to find a system's hull.

Each campaign is the product's own: ``matdisc.round.run_campaign`` with the in-process executor
(the round the flow runs, without Prefect or Dask), EMT as the reference calculator, a cold
start, and the acquisition strategy under test. Round 0 (seeds, first committee) is run once per
seed and copied to every strategy, so the strategies of a seed start from the same committee.

The truth is exhaustive: every distinct candidate any campaign of the system generated (the
union of their pools) is relaxed with EMT through the same reference protocol
(``matdisc.dft.run_reference``, two processes). The true hull phases are the compounds on the
hull of all of them (vertices within 0.1 meV/atom); a campaign's DFT calculation recovers a phase
when it verified a structure of that composition within ``PHASE_TOL`` of the phase's true energy.
Calls are the campaign's reference relaxations of compounds in the order it made them (round 0's
compound seeds first: they count against the budget; elements and rattled statics do not).

Per strategy, one JSON line (means over seeds): ``hull_recovered_fraction`` at the budget,
``dft_fraction_of_exhaustive`` (calls to reach ``--target`` recovery over the distinct compounds of
the union pool; a seed that never reaches it counts as the whole pool), ``calls_ratio_vs_random``
(those calls over what random selection without replacement from the union pool needs, averaged
over 2,000 permutations: the baseline of the same run), ``daf`` (share of the budget's calls that
recovered a phase over that share in the pool; calls a campaign that stopped early did not make
count as calls without a find, so an early stop cannot inflate it), ``hull_gap_mev_max`` (how far
the campaign's own DFT hull lies above the true one at a true phase's composition), and per seed the calls, rounds, stop reason
and seconds. ``baseline_calls``: every strategy's mean calls to the target in the same run (and
``random_expected``, the permutation average), so a line says what each baseline needed. The
baselines isolate acquisition: ``greedy`` (the model's ranking alone), ``greedy_spread`` (the same
with ``uncertainty``'s diversity and structure-family spread: what the committee spread adds),
``random`` and ``random_stratified`` (random, one of every structure family first: what the
families alone buy). See docs/benchmarks.md for the recorded results.

Run: ``.venv/bin/python benchmarks/discovery.py --system Cu-Pd --seeds 1`` (a campaign trains
MACE committees for several minutes per round on 2 cores); ``--record`` appends the lines to
``docs/benchmarks/discovery.jsonl``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the EMT pool's processes; torch sets its own threads

REFERENCE = {"calculator": "emt", "fmax": 0.02, "max_steps": 300}
PHASE_TOL = 0.002  # eV/atom: a verified structure this close to a true phase's energy recovers it
#: The campaign's own CPU training (preset ``cpu``) with the diverse-frames policy.
TRAINING = {"preset": "cpu", "frames": "diverse", "frames_per_structure": 6}


def campaign_config(system: str, seed: int, store: Path, args: argparse.Namespace, **active: object):
    from matdisc.config import CampaignConfig

    return CampaignConfig.model_validate(
        {
            "name": f"discovery-{system}-s{seed}",
            "chemsys": system.split("-"),
            "store": str(store),
            "generation": {"max_atoms": args.max_atoms, "seed": seed, "random": {"per_round": args.random}},
            "mlip": {"model": "cold-start", "ensemble": args.ensemble, "device": "cpu", "training": TRAINING,
                     "cold_start": cold_start(args.cold_start)},
            "reference": REFERENCE,
            "active_learning": {"patience": None, **active},
            "compute": {"scheduler": "local", "mlip_workers": 1, "dft_workers": 1},
        }
    )


def cold_start(mode: str) -> dict:
    """flow: the campaign's default seeds (compounds among them, charged to the budget);
    elements: fcc/bcc/hcp only, so acquisition has to find every compound."""
    from matdisc.config import ColdStartConfig

    return {} if mode == "flow" else {"prototypes": [p for p in ColdStartConfig().prototypes if p in ("fcc", "bcc", "hcp")]}


# -- what a campaign did ------------------------------------------------------------------------
def fingerprint(atoms) -> str:
    """Identity of an initial structure: the generator is deterministic, so campaigns that
    generated the same candidate hold the same arrays (its id differs between stores)."""
    parts = [atoms.numbers.astype(np.int64), np.round(atoms.cell.array, 6), np.round(atoms.get_scaled_positions() % 1, 6)]
    return hashlib.sha1(b"".join(np.ascontiguousarray(p).tobytes() for p in parts)).hexdigest()


@dataclass
class Campaign:
    strategy: str
    seed: int
    store: Path
    candidates: dict[str, tuple[str, object]] = field(default_factory=dict)  # fingerprint -> (formula, atoms)
    calls: list[tuple[str, str, float]] = field(default_factory=list)  # (formula, status, e_dft_per_atom)
    rounds: int = 0
    stop: str = ""
    seconds: float = 0.0

    def read(self) -> None:
        from pymatgen.core import Composition

        from matdisc.stages.generate import candidate_atoms
        from matdisc.store import open_campaign

        store = open_campaign(self.store)
        cand = store.table("candidates").drop_duplicates("id").set_index("id")
        for cid, atoms in candidate_atoms(store):
            self.candidates[fingerprint(atoms)] = (cand.loc[cid, "formula"], atoms)
        for row in store.table("dft").to_dict("records"):  # in the order the rounds recorded them
            formula = cand["formula"].get(row["id"])
            if formula is not None and len(Composition(formula).elements) > 1:
                self.calls.append((formula, row["status"], row["e_dft_per_atom"]))
        self.rounds = int(store.rounds()["round"].max())
        stops = store.table("stops")
        self.stop = str(stops["reason"].iloc[-1]) if len(stops) else "rounds done"


def run_strategy(round0: Path, system: str, seed: int, strategy: str, args, tmp: Path, budget: int) -> Campaign:
    from matdisc.executor import InProcess
    from matdisc.round import run_campaign

    store = tmp / f"{strategy}-s{seed}.zarr"
    shutil.copytree(round0, store)
    seeds = _compound_calls(store)
    picks = max(0, budget - seeds)
    cfg = campaign_config(system, seed, store, args, acquisition=strategy, dft_budget=args.per_round,
                          rounds=max(1, math.ceil(picks / args.per_round)), max_dft_total=picks)
    t0 = time.perf_counter()
    run_campaign(cfg, InProcess())
    camp = Campaign(strategy, seed, store, seconds=time.perf_counter() - t0)
    camp.read()
    return camp


def _compound_calls(store: Path) -> int:
    from pymatgen.core import Composition

    from matdisc.store import open_campaign

    camp = open_campaign(store)
    formula = camp.table("candidates").drop_duplicates("id").set_index("id")["formula"]
    ids = camp.table("dft")["id"]
    return int(sum(cid in formula.index and len(Composition(formula[cid]).elements) > 1 for cid in ids))


# -- truth ----------------------------------------------------------------------------------------
def _emt_relax(job):
    from matdisc.config import ReferenceConfig
    from matdisc.dft import run_reference

    key, atoms, workdir = job
    res = run_reference(atoms, ReferenceConfig(**REFERENCE), id=key[:16], workdir=Path(workdir))
    return key, res.status, res.energy_per_atom


def exhaustive(pool: dict[str, tuple[str, object]], workdir: Path) -> dict[str, tuple[str, float]]:
    """fingerprint -> (status, relaxed energy per atom) of every distinct candidate, two processes."""
    with ProcessPoolExecutor(2) as ex:
        out = ex.map(_emt_relax, [(k, a, str(workdir)) for k, (_, a) in pool.items()], chunksize=4)
        return {k: (status, e) for k, status, e in out}


def true_phases(pool: dict, truth: dict, chemsys: list[str]) -> dict[str, float]:
    """True hull phase -> its energy per atom: compounds on the hull of every relaxed candidate."""
    from pymatgen.core import Composition

    from matdisc.thermo import hull_energies

    keys = [k for k in pool if truth[k][0] == "ok"]
    formulas = [pool[k][0] for k in keys]
    e = [truth[k][1] for k in keys]
    e_form, e_hull = hull_energies(formulas, e, chemsys)
    phases: dict[str, float] = {}
    for f, energy, ef, eh in zip(formulas, e, e_form, e_hull):
        if len(Composition(f).elements) > 1 and ef < 0 and eh <= 1e-4:
            phases[f] = min(energy, phases.get(f, np.inf))
    return phases


def recovers(formula: str, status: str, energy: float, phases: dict[str, float]) -> bool:
    return status == "ok" and formula in phases and energy <= phases[formula] + PHASE_TOL


def hull_gap_mev(camp: Campaign, elements: dict[str, float], phases: dict[str, float]) -> float:
    """Largest distance (meV/atom) from the campaign's own DFT hull down to a true phase."""
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
    from pymatgen.core import Composition

    entries = [PDEntry(Composition(el), e) for el, e in elements.items()]
    entries += [PDEntry(Composition(f), e * Composition(f).num_atoms) for f, s, e in camp.calls if s == "ok"]
    pd = PhaseDiagram(entries)
    return 1000 * max((pd.get_hull_energy_per_atom(Composition(f)) - e for f, e in phases.items()), default=0.0)


# -- the benchmark --------------------------------------------------------------------------------
def strategy_stats(mine: list, phases: dict, elements: dict, budget: int, n_compounds: int, prevalence: float,
                   target: float) -> dict[str, list]:
    """Per seed of one strategy: recovery at the budget, calls to ``target`` (the whole pool when never
    reached), DAF at the budget and the hull gap."""
    from pymatgen.core import Composition

    from matdisc.metrics import calls_to_reach, recovery_curve

    out: dict[str, list] = {"recovered": [], "calls": [], "dafs": [], "gaps": [], "per_seed": []}
    for camp in mine:
        keys = [str(i) for i in range(len(camp.calls))]
        phase_of = {k: f for k, (f, s, e) in zip(keys, camp.calls) if recovers(f, s, e, phases)}
        curve = recovery_curve(keys[:budget], phase_of, len(phases))
        need = calls_to_reach(curve, target)
        out["recovered"].append(float(curve[-1]) if len(curve) else 0.0)
        out["calls"].append(need if need is not None else n_compounds)
        # at the budget: calls a campaign did not make (it stopped early) count as calls without a find
        on_phase = sum(k in phase_of for k in keys[:budget])
        out["dafs"].append(on_phase / budget / prevalence if budget and prevalence else float("nan"))
        out["gaps"].append(hull_gap_mev(camp, elements, phases))
        out["per_seed"].append({
            "seed": camp.seed, "recovered": round(out["recovered"][-1], 3), "calls_to_target": need,
            "calls_spent": len(camp.calls), "hull_gap_mev": round(out["gaps"][-1], 2), "rounds": camp.rounds,
            "stop": camp.stop, "seconds": round(camp.seconds, 1),
            "pool": sum(len(Composition(f).elements) > 1 for f, _ in camp.candidates.values())})
    return out


def run_system(args, system: str) -> list[dict]:
    from matdisc.executor import InProcess
    from matdisc.metrics import expected_random_calls
    from matdisc.round import run_campaign
    from matdisc.stages.generate import preview_candidates

    chemsys = system.split("-")
    tmp = Path(tempfile.mkdtemp(prefix=f"discovery-{system}-"))
    strategies = args.strategies.split(",")
    camps: list[Campaign] = []
    budget = args.budget
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        round0 = tmp / f"round0-s{seed}.zarr"
        cfg = campaign_config(system, seed, round0, args)
        if budget is None:  # a quarter of round 1's compounds
            first, _ = preview_candidates(cfg, 1)
            budget = math.ceil(0.25 * sum(len(c.structure.composition.elements) > 1 for c in first))
        t0 = time.perf_counter()
        run_campaign(cfg, InProcess(), rounds=0)
        print(f"# {system} seed {seed}: round 0 in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        for strategy in strategies:
            camp = run_strategy(round0, system, seed, strategy, args, tmp, budget)
            camps.append(camp)
            print(f"#   {strategy} seed {seed}: {len(camp.calls)} calls, {camp.rounds} rounds, "
                  f"{camp.seconds:.0f} s ({camp.stop})", file=sys.stderr, flush=True)
    pool: dict[str, tuple[str, object]] = {}
    for camp in camps:
        pool.update(camp.candidates)
    t0 = time.perf_counter()
    truth = exhaustive(pool, tmp / "emt")
    t_exh = time.perf_counter() - t0
    phases = true_phases(pool, truth, chemsys)
    from pymatgen.core import Composition

    elements = {el: min(truth[k][1] for k, (f, _) in pool.items() if Composition(f).reduced_formula == el
                        and truth[k][0] == "ok") for el in chemsys}
    compounds = [k for k, (f, _) in pool.items() if len(Composition(f).elements) > 1]
    on_phase = {k: pool[k][0] for k in compounds if recovers(pool[k][0], *truth[k], phases)}
    random_calls = expected_random_calls(on_phase, compounds, args.target, len(phases))
    prevalence = len(on_phase) / len(compounds)
    print(f"# {system}: union pool {len(compounds)} compounds, {len(phases)} true hull phases {sorted(phases)}, "
          f"{len(on_phase)} candidates on them; budget {budget}; random needs {random_calls:.1f} calls for "
          f"{args.target:.0%} (exhaustive EMT {t_exh:.0f} s)", file=sys.stderr, flush=True)
    stats = {strategy: strategy_stats([c for c in camps if c.strategy == strategy], phases, elements, budget,
                                      len(compounds), prevalence, args.target)
             for strategy in strategies}
    baseline_calls = {strategy: round(float(np.mean(st["calls"])), 1) for strategy, st in stats.items()}
    baseline_calls["random_expected"] = round(random_calls, 1)
    lines = []
    for strategy, st in stats.items():
        line = {
            "system": system, "strategy": strategy, "seeds": len(st["per_seed"]), "runs": "matdisc.round.run_campaign",
            "hull_recovered_fraction": round(float(np.mean(st["recovered"])), 3),
            "dft_fraction_of_exhaustive": round(float(np.mean(st["calls"])) / len(compounds), 3),
            "calls_ratio_vs_random": round(float(np.mean(st["calls"])) / random_calls, 3),
            "daf": round(float(np.nanmean(st["dafs"])), 2), "hull_gap_mev_max": round(float(np.max(st["gaps"])), 2),
            "exhaustive_calls": len(compounds), "budget": budget, "per_round": args.per_round,
            "target": args.target, "cold_start": args.cold_start, "true_hull_phases": sorted(phases),
            "random_expected_calls": round(random_calls, 1), "baseline_calls": baseline_calls,
            "per_seed": st["per_seed"],
        }
        print(json.dumps(line), flush=True)
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", action="append", help="A-B or A-B-C of EMT elements (default: Cu-Pd, Al-Ag)")
    parser.add_argument("--budget", type=int, help="DFT calculations per campaign (default: 25 %% of round 1's pool)")
    parser.add_argument("--per-round", type=int, default=4, help="DFT picks per round")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed ... first-seed + seeds - 1")
    parser.add_argument("--ensemble", type=int, default=3, help="MACE committee size")
    parser.add_argument("--max-atoms", type=int, default=6)
    parser.add_argument("--random", type=int, default=20, help="PyXtal random crystals per round")
    parser.add_argument("--target", type=float, default=0.95, help="recovery the call counts are measured at")
    parser.add_argument("--strategies", default="uncertainty,greedy,greedy_spread,random,random_stratified")
    parser.add_argument("--cold-start", choices=["flow", "elements"], default="flow",
                        help="flow: the campaign's default seeds; elements: fcc/bcc/hcp only")
    parser.add_argument("--record", action="store_true", help="append the lines to docs/benchmarks/discovery.jsonl")
    args = parser.parse_args()
    for system in args.system or ["Cu-Pd", "Al-Ag"]:
        lines = run_system(args, system)
        if args.record:
            from record import record

            for line in lines:
                record("discovery", line)


if __name__ == "__main__":
    main()
