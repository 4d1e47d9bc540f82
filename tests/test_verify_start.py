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
    from matdisc.stages.verify import reference_starts

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
    generated one; seeds start from their generated structure."""
    cfg, _ = campaign_store
    camp = open_campaign(cfg.store_path)
    dft, frames_table, mlip = camp.table("dft"), camp.table("frames"), camp.table("mlip")
    frames, mlip_frames, cand_frames = camp.frames("frames"), camp.frames("mlip"), camp.frames("candidates")
    cand_row = {cid: i for i, cid in enumerate(camp.table("candidates")["id"])}
    assert set(dft["start"][dft["round"] == 0]) == {"initial"}
    later = dft[dft["round"] >= 1]
    assert len(later) >= 4 and (later["start"] == "mlip").sum() >= 1
    for row in later.to_dict("records"):
        first = frames_table.index[(frames_table["id"] == row["id"]) & (frames_table["round"] == row["round"])][0]
        start = frames.atoms(first)
        if row["start"] == "mlip":
            rows = mlip.index[(mlip["id"] == row["id"]) & (mlip["round"] == row["round"])]
            expected = mlip_frames.atoms(rows[-1])
        else:
            assert row["start_reason"]  # the configuration asked for the MLIP start: it says why not
            expected = cand_frames.atoms(cand_row[row["id"]])
        assert np.allclose(start.cell[:], expected.cell[:], atol=1e-8), row["id"]
        assert np.allclose(start.positions, expected.positions, atol=1e-8), row["id"]
