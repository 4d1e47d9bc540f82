"""Verification starts from the MLIP geometry when it can be trusted, from the generated structure
when not, and says which per calculation."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from pymatgen.io.ase import AseAtomsAdaptor

from matdisc.config import CampaignConfig
from matdisc.records import RelaxResult
from matdisc.store import CampaignWriter, open_campaign


def _l10() -> Atoms:
    """CuPd L1_0 in its primitive tetragonal cell (c/a = sqrt 2: the fcc-based ordering)."""
    ap = 3.8 / np.sqrt(2)
    return Atoms("CuPd", cell=[ap, ap, 3.8], scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5)], pbc=True)


def test_the_start_is_the_mlip_structure_unless_its_relaxation_cannot_be_trusted(tmp_path):
    from conftest import emt_config

    from matdisc.generate import Candidate
    from matdisc.stages.generate import add_candidates
    from matdisc.stages.relax import record_relaxations
    from matdisc.stages.start import reference_starts

    cfg = CampaignConfig.model_validate(emt_config(tmp_path))
    initial = _l10()
    relaxed_ok = initial.copy()
    relaxed_ok.set_cell(initial.cell * [1.01, 1.01, 0.97], scale_atoms=True)  # a relaxed L1_0
    squeezed = initial.copy()
    squeezed.set_cell(initial.cell * 0.88, scale_atoms=True)  # -32 % volume
    bain = initial.copy()  # the same volume, c/a 1: B2 CsCl, another structure reached along the Bain path
    f = (np.sqrt(2)) ** (1 / 3)
    bain.set_cell(initial.cell * [f, f, 1 / f**2], scale_atoms=True)
    outcomes = {"ok": ("ok", relaxed_ok), "exploded": ("exploded", initial), "unconverged": ("unconverged", relaxed_ok),
                "squeezed": ("ok", squeezed), "bain": ("symmetry_changed", bain)}
    with CampaignWriter(cfg.store_path) as w:
        cands = [Candidate(structure=AseAtomsAdaptor.get_structure(initial), source="benchmark", prototype=name,
                           seed=i) for i, name in enumerate(outcomes)]
        add_candidates(w, cands, 1, "generated")
        table = w.table("candidates")
        ids = dict(zip(table["prototype"], table["id"]))
        results = [RelaxResult(ids[name], status, "" if status == "ok" else status, atoms, energy=-1.0)
                   for name, (status, atoms) in outcomes.items()]
        record_relaxations(w, "r1/mlip/test", 1, results, "sha")
        starts = reference_starts(w, cfg.reference, [ids[n] for n in outcomes])
        never = reference_starts(w, cfg.reference.model_copy(update={"start": "initial"}), [ids["ok"]])

    by_name = {name: starts[ids[name]] for name in outcomes}
    assert by_name["ok"].start == "mlip" and by_name["ok"].reason == ""
    assert np.allclose(by_name["ok"].atoms.cell[:], relaxed_ok.cell[:])
    assert by_name["exploded"].reason == "MLIP outcome exploded"
    assert by_name["unconverged"].reason == "MLIP outcome unconverged"
    assert by_name["squeezed"].reason == "MLIP volume change -32%"
    assert by_name["bain"].reason == "MLIP structure no longer matches the generated one"
    for name in ("exploded", "unconverged", "squeezed", "bain"):
        assert by_name[name].start == "initial"
        assert np.allclose(by_name[name].atoms.cell[:], initial.cell[:])
    assert never[ids["ok"]].start == "initial" and never[ids["ok"]].reason == ""


def test_the_campaigns_verifications_start_where_the_dft_table_says(campaign_store):
    """The session's EMT campaign (rounds 1-2 verified through the flow): each verification's first
    evaluated frame is the structure its ``start`` names, the MLIP one of that round or the
    generated one; seeds start from their generated structure. BFGS started from the committee's
    Hessian exactly where the start is the MLIP structure."""
    cfg, _ = campaign_store
    camp = open_campaign(cfg.store_path)
    dft, frames_table, mlip = camp.table("dft"), camp.table("frames"), camp.table("mlip")
    frames, mlip_frames, cand_frames = camp.frames("frames"), camp.frames("mlip"), camp.frames("candidates")
    cand_row = {cid: i for i, cid in enumerate(camp.table("candidates")["id"])}
    assert set(dft["start"][dft["round"] == 0]) == {"initial"} and set(dft["hessian"][dft["round"] == 0]) == {"default"}
    later = dft[dft["round"] >= 1]
    assert len(later) >= 4 and (later["start"] == "mlip").sum() >= 1
    for row in later.to_dict("records"):
        first = frames_table.index[(frames_table["id"] == row["id"]) & (frames_table["round"] == row["round"])][0]
        start = frames.atoms(first)
        if row["start"] == "mlip":
            rows = mlip.index[(mlip["id"] == row["id"]) & (mlip["round"] == row["round"])]
            expected = mlip_frames.atoms(rows[-1])
            assert row["hessian"] == "mlip", row["id"]  # BFGS started from the committee's curvature there
        else:
            assert row["start_reason"]  # the configuration asked for the MLIP start: it says why not
            assert row["hessian"] == "default", row["id"]
            expected = cand_frames.atoms(cand_row[row["id"]])
        assert np.allclose(start.cell[:], expected.cell[:], atol=1e-8), row["id"]
        assert np.allclose(start.positions, expected.positions, atol=1e-8), row["id"]


def _perturbed_cu3pd(seed: int = 0) -> Atoms:
    """L1_2 Cu3Pd (4 atoms) strained and rattled off its EMT minimum, as a model's error leaves it."""
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    a = bulk("Cu", "fcc", a=3.70, cubic=True)
    a.symbols[0] = "Pd"
    eps = rng.uniform(-0.03, 0.03, (3, 3))
    a.set_cell(a.cell[:] @ (np.eye(3) + (eps + eps.T) / 2), scale_atoms=True)
    a.positions += rng.normal(0, 0.03, a.positions.shape)
    return a


def test_bfgs_started_from_the_curvature_takes_fewer_reference_steps_to_the_same_minimum(tmp_path):
    """The reference protocol with BFGS's initial Hessian from a calculator's curvature at the start
    (here EMT's own, the best a model could give): fewer steps to the same energy, in process and
    through the isolated calculation process (the Hessian travels in its job file)."""
    from ase.calculators.emt import EMT

    from matdisc.ase_relax import MIN_CURVATURE, relaxation_hessian
    from matdisc.config import ReferenceConfig
    from matdisc.dft import run_reference

    start = _perturbed_cu3pd()
    hessian = relaxation_hessian(start, EMT())
    assert hessian.shape == (3 * 4 + 9, 3 * 4 + 9) and np.allclose(hessian, hessian.T)
    assert np.linalg.eigvalsh(hessian).min() >= MIN_CURVATURE - 1e-9  # positive definite for BFGS
    ref = ReferenceConfig(calculator="emt", fmax=0.02, max_steps=200)
    plain = run_reference(start, ref, id="plain", workdir=tmp_path)
    seeded = run_reference(start, ref, id="seeded", workdir=tmp_path, hessian=hessian)
    isolated = run_reference(start, ref.model_copy(update={"isolate": True}), id="iso", workdir=tmp_path,
                             hessian=hessian)
    assert plain.status == seeded.status == isolated.status == "ok"
    assert seeded.n_steps <= plain.n_steps / 2, (seeded.n_steps, plain.n_steps)
    assert isolated.n_steps == seeded.n_steps
    assert abs(seeded.energy_per_atom - plain.energy_per_atom) < 1e-4
    # the relaxation's first frame is the start itself: only the curvature differs
    assert np.allclose(seeded.frames[0].positions, start.positions)


def test_a_lost_hessian_job_leaves_bfgs_with_the_default_guess_and_says_why(campaign_store, tmp_path):
    """The committee's Hessians are one MLIP job: when it is lost, the verifications still go out,
    each with ASE's guess and the reason in its ``curvature`` (what the dft table records); when it
    runs, each MLIP start gets the committee's Hessian in the relaxation's coordinates."""
    from conftest import copy_campaign

    from matdisc import jobs
    from matdisc.executor import InProcess
    from matdisc.stages.context import Run
    from matdisc.stages.start import with_hessians

    class Lost(InProcess):
        def submit(self, fn, *args, resource):
            if fn is jobs.hessians:
                fn = _lost_job
            return super().submit(fn, *args, resource=resource)

    cfg, _ = campaign_store
    here = copy_campaign(cfg, tmp_path, "hessians.zarr")
    with CampaignWriter(here.store_path) as w:
        from matdisc.stages.start import reference_starts

        dft = w.table("dft")
        mine = dft[dft["start"] == "mlip"]
        round_, ids = int(mine["round"].iloc[0]), list(mine["id"][mine["round"] == mine["round"].iloc[0]])
        starts = reference_starts(w, here.reference, ids)
        lost = with_hessians(Run(w, here, Lost()).round(round_), starts)
        ran = with_hessians(Run(w, here, InProcess()).round(round_), starts)
    for cid in ids:
        assert starts[cid].start == "mlip"
        assert lost[cid].hessian is None
        assert lost[cid].curvature == "default: model Hessian job failed: RuntimeError: worker lost three times"
        n = 3 * len(starts[cid].atoms) + 9
        assert ran[cid].curvature == "mlip" and ran[cid].hessian.shape == (n, n)


def _lost_job(*args):
    raise RuntimeError("worker lost three times")
