"""Reference calculations inside a campaign: a killed Dask worker's candidate is retried and lands
once; a change of reference settings starts a new reference set instead of mixing energies."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import emt_config

from matdisc import reference_phases
from matdisc.config import CampaignConfig
from matdisc.dft import run_reference, settings_hash
from matdisc.round import record_run
from matdisc.stages.generate import add_candidates, candidate_atoms
from matdisc.stages.score import update_scores
from matdisc.stages.verify import record_reference
from matdisc.store import CampaignWriter


def _kill_first_attempt(calc_root: Path, cid: str, killed: dict, timeout: float = 120.0) -> None:
    """SIGKILL the Dask worker running ``cid`` once its DFT child process has started."""
    run = calc_root / cid / "attempt-1"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "worker.pid").is_file() and (run / "runner-0.pid").is_file():
            killed["worker"] = int((run / "worker.pid").read_text())
            killed["child"] = int((run / "runner-0.pid").read_text())
            os.kill(killed["worker"], signal.SIGKILL)
            return
        time.sleep(0.05)


def test_a_killed_workers_candidate_is_retried_and_lands_once(prefect_api, tmp_path):
    from ase.build import bulk
    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from matdisc.stages.context import Run
    from matdisc.stages.verify import reference_stage
    from matdisc_flows.cluster import campaign_cluster
    from matdisc_flows.executor import PrefectDask

    cfg = CampaignConfig.model_validate(emt_config(
        tmp_path, chemsys=["Al", "Si"],
        reference={"calculator": "gpaw", "ecut": 250.0, "kpoint_density": 1.5, "max_steps": 3},
        compute={"scheduler": "local", "dft_workers": 1, "mlip_workers": 1}))
    jobs = [("si", bulk("Si", "diamond", a=5.5)), ("al", bulk("Al", "fcc", a=4.1))]

    @flow(name="verify")
    def verify(config: dict) -> None:
        c = CampaignConfig.model_validate(config)
        with CampaignWriter(c.store_path) as w:
            record_run(w, c)
            reference_stage(Run(w, c, PrefectDask()).round(1), jobs, verified=True)

    killed: dict = {}
    calc_root = cfg.store_path / "calculations" / "r1"
    watcher = threading.Thread(target=_kill_first_attempt, args=(calc_root, "si", killed), daemon=True)
    watcher.start()
    with campaign_cluster(cfg.compute) as address:
        verify.with_options(task_runner=DaskTaskRunner(address=address))(cfg.model_dump(mode="json"))
    watcher.join(1)
    assert killed, "the worker was never killed: the test did not exercise a lost worker"

    with CampaignWriter(cfg.store_path) as w:
        dft = w.table("dft")
    assert sorted(dft["id"]) == ["al", "si"]  # each candidate exactly once
    si = dft.set_index("id").loc["si"]
    assert si["status"] == "ok" and si["attempt"] == 2  # retried on the restarted worker
    assert dft.set_index("id").loc["al", "status"] == "ok"
    first = calc_root / "si" / "attempt-1"
    assert first.is_dir() and not (first / "result.pkl").exists()  # the lost attempt is kept, unfinished
    assert not Path(f"/proc/{killed['child']}").exists()  # its DFT process died with the worker


def _run_and_record(w: CampaignWriter, cfg: CampaignConfig, jobs, round_: int = 0) -> None:
    ref_set = settings_hash(cfg.reference)
    for cid, atoms in jobs:
        res = run_reference(atoms, cfg.reference, id=cid, workdir=w.path / "calculations" / f"r{round_}")
        record_reference(w, round_, res, ref_set, verified=True)


def test_changed_reference_settings_start_a_new_reference_set(tmp_path):
    from matdisc.generate import prototype_candidates

    base = emt_config(tmp_path, reference={"calculator": "emt", "fmax": 0.01})
    cfg_a = CampaignConfig.model_validate(base)
    cfg_b = CampaignConfig.model_validate({**base, "reference": {"calculator": "emt", "fmax": 0.01,
                                                                 "parameters": {"asap_cutoff": True}}})
    assert settings_hash(cfg_a.reference) != settings_hash(cfg_b.reference)
    b2 = [c for c in prototype_candidates(cfg_a.chemsys, cfg_a.generation, names=["B2"])][:1]
    with CampaignWriter(cfg_a.store_path) as w:
        record_run(w, cfg_a)
        elements = reference_phases.reference_set_jobs(w, cfg_a)
        assert len(elements) == 6  # Cu and Pd in fcc, bcc and hcp
        _run_and_record(w, cfg_a, elements)
        add_candidates(w, b2, 1, "generated")
        compound = candidate_atoms(w)[-1]
        _run_and_record(w, cfg_a, [compound], 1)
        hull_a = update_scores(w, cfg_a, 1, "r1/scores").set_index("id")
        assert np.isfinite(hull_a.loc[compound[0], "e_hull_dft"])
        assert reference_phases.reference_set_jobs(w, cfg_a) == []  # nothing missing in set A

        # new settings: nothing of set A shows, the elements are due again, and a compound verified
        # before its elements has no hull energy rather than one against set A's elements
        record_run(w, cfg_b)
        assert (w.candidates()["dft_status"] == "").all()
        _run_and_record(w, cfg_b, [compound], 1)
        no_elements = update_scores(w, cfg_b, 1, "r1/scores-b0").set_index("id")
        assert np.isnan(no_elements.loc[compound[0], "e_hull_dft"])
        again = reference_phases.reference_set_jobs(w, cfg_b)
        assert sorted(cid for cid, _ in again) == sorted(cid for cid, _ in elements)
        _run_and_record(w, cfg_b, again)
        hull_b = update_scores(w, cfg_b, 1, "r1/scores-b1").set_index("id")
        e_a, e_b = hull_a.loc[compound[0], "e_form_dft"], hull_b.loc[compound[0], "e_form_dft"]
        assert np.isfinite(e_b) and e_a != pytest.approx(e_b, abs=1e-6)
        dft = w.table("dft")
        assert (dft["id"] == compound[0]).sum() == 2  # both sets kept in the store
        assert set(dft["reference_set"]) == {settings_hash(cfg_a.reference), settings_hash(cfg_b.reference)}
        assert w.candidates(settings_hash(cfg_a.reference)).set_index("id").loc[compound[0], "dft_status"] == "ok"


def test_the_reference_set_is_the_elemental_structures_not_every_elemental_candidate(tmp_path):
    """A pool of strained fcc cells shares the dedup key of fcc Cu (one site after reduction): the
    reference set still holds one calculation per element and structure, the first stored
    candidate that is that structure, not every candidate with the key."""
    from ase.build import bulk
    from pymatgen.io.ase import AseAtomsAdaptor

    from matdisc.generate import Candidate

    cfg = CampaignConfig.model_validate(emt_config(tmp_path))
    rng = np.random.default_rng(0)
    strained = []
    for i in range(12):
        a = bulk(["Cu", "Pd"][i % 2], "fcc", a=3.8)
        a.set_cell(a.cell * (1 + rng.uniform(-0.02, 0.02, 3)), scale_atoms=True)
        strained.append(Candidate(AseAtomsAdaptor.get_structure(a), "benchmark", prototype="fcc1", seed=i))
    with CampaignWriter(cfg.store_path) as w:
        record_run(w, cfg)
        add_candidates(w, strained, 1, "generated")
        jobs = reference_phases.reference_set_jobs(w, cfg)
        assert len(jobs) == 6  # Cu and Pd in fcc, bcc and hcp
        cand = w.table("candidates").set_index("id")
        sources = [cand.loc[cid, "source"] for cid, _ in jobs]
        # fcc Cu and fcc Pd are strained candidates already stored (StructureMatcher calls them fcc);
        # bcc and hcp were missing and were added as reference candidates
        assert sorted(sources) == ["benchmark"] * 2 + ["reference"] * 4
        n_stored = len(w.table("candidates"))
        assert [cid for cid, _ in reference_phases.reference_set_jobs(w, cfg)] == [cid for cid, _ in jobs]
        assert len(w.table("candidates")) == n_stored  # asked again: nothing added
