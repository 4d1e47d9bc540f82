"""Known phases: files and the Materials Project in, computed into the hull, hits told new from known."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import emt_config
from pymatgen.core import Lattice, Structure
from pymatgen.entries.computed_entries import ComputedStructureEntry
from pymatgen.io.cif import CifWriter

from matdisc import known_phases
from matdisc.config import CampaignConfig, KnownPhasesConfig
from matdisc.errors import UserError
from matdisc.store import open_campaign


def _cupd(name: str) -> Structure:
    from matdisc.config import GenerationConfig
    from matdisc.generate import prototype_candidates

    (cand,) = [c for c in prototype_candidates(["Cu", "Pd"], GenerationConfig(max_atoms=8), names=[name])
               if c.formula == "CuPd"][:1]
    return cand.structure


def write_cif(path, *structures: Structure) -> None:
    """One CIF file, a data block per structure (block names made unique, as CIF requires)."""
    path.write_text("".join(str(CifWriter(s)).replace("data_", f"data_{i}_", 1) for i, s in enumerate(structures)))


# -- reading --------------------------------------------------------------------------------------
def test_cif_extxyz_and_json_files_are_read_with_ids(tmp_path):
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    l10, b32 = _cupd("L1_0"), _cupd("B32")
    write_cif(tmp_path / "two.cif", l10, b32)
    atoms = AseAtomsAdaptor.get_atoms(b32)
    atoms.info["material_id"] = "mine-7"
    write(tmp_path / "one.extxyz", [atoms], format="extxyz")
    entries = [ComputedStructureEntry(l10, -10.0, entry_id="e-1", parameters={"settings_hash": "abc"}).as_dict(),
               b32.as_dict()]
    (tmp_path / "list.json").write_text(json.dumps(entries))

    phases = known_phases.from_files([str(tmp_path / "two.cif")], ["Cu", "Pd"])
    assert [p.id for p in phases] == ["two.cif:0", "two.cif:1"]
    assert [p.structure.get_space_group_info()[1] for p in phases] == [123, 227]  # L1_0, B32 (spglib)
    folder = known_phases.from_files([str(tmp_path)], ["Cu", "Pd"])  # a folder: its files, sorted
    assert [p.id for p in folder] == ["e-1", "list.json:1", "mine-7", "two.cif:0", "two.cif:1"]
    by_id = {p.id: p for p in folder}
    # an entry computed with some settings keeps its energy (reused only when they are the campaign's)
    assert by_id["e-1"].energy == -10.0 and by_id["e-1"].settings_hash == "abc"
    assert by_id["list.json:1"].energy is None and by_id["mine-7"].energy is None
    assert len(known_phases.from_files([str(tmp_path / "*.cif")], ["Cu", "Pd"])) == 2  # a glob


@pytest.mark.parametrize("content, words", [
    (None, "does not exist"),
    ("\x00\x01 not a cif at all", "cannot be read (Invalid CIF file with no structures"),
    ("oxide", "has O, outside the chemical system Cu-Pd"),
    ('[{"@class": "Molecule"}]', "item 0 is neither"),
    ("repeated", "data block name repeated (CuPd)"),
    ("disordered", "disordered (partial occupancies)"),
])
def test_a_bad_known_phases_file_is_one_line_exit_2_and_no_store(tmp_path, capsys, content, words):
    path = tmp_path / ("phases.json" if content and content.startswith("[") else "phases.cif")
    if content == "oxide":
        write_cif(path, Structure(Lattice.cubic(4.2), ["Cu", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]))
    elif content == "disordered":
        write_cif(path, Structure(Lattice.cubic(3.7), [{"Cu": 0.5, "Pd": 0.5}], [[0, 0, 0]]))
    elif content == "repeated":
        path.write_text(2 * str(CifWriter(_cupd("B2"))))
    elif content is not None:
        path.write_text(content)
    cfg = emt_config(tmp_path, known_phases={"files": [str(path)]})
    config = tmp_path / "c.yaml"
    import yaml

    config.write_text(yaml.safe_dump(cfg))
    from matdisc.cli import main

    for command in ("validate", "run", "candidates"):
        assert main([command, str(config)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and words in lines[0], lines
    assert not (tmp_path / "cu-pd.zarr").exists()


def test_matches_tell_the_same_structure_from_another():
    l10, b32 = _cupd("L1_0"), _cupd("B32")
    strained = l10.copy()
    strained.apply_strain(0.03)
    swapped = b32.copy()
    swapped.replace_species({"Cu": "Pd", "Pd": "Cu"})  # B32 is symmetric under the swap: still B32
    found = known_phases.matches({"a": strained, "b": swapped, "c": _cupd("B2")}, {"k1": l10, "k2": b32})
    assert found == {"a": "k1", "b": "k2", "c": ""}


# -- the Materials Project, through mp-api against a server in its schema ---------------------------
class _MaterialsProject(BaseHTTPRequestHandler):
    """Answers mp-api's heartbeat and summary search as the Materials Project does, for one key."""

    key = "k" * 32
    docs: list[dict] = []
    queries: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path.startswith("/heartbeat"):
            return self._send(200, {"db_version": "2025_09_25", "access_controlled_batch_ids": [],
                                    "version": "0.87.3"})
        if self.headers.get("x-api-key") != self.key:
            return self._send(401, {"detail": "Invalid API key"})
        self.queries.append(self.path)
        from urllib.parse import parse_qs, urlparse

        q = parse_qs(urlparse(self.path).query)
        systems = set(",".join(q.get("chemsys", [""])).split(","))
        emax = float(q.get("energy_above_hull_max", ["inf"])[0])
        data = [d for d in self.docs if d["chemsys"] in systems and d["energy_above_hull"] <= emax]
        fields = q.get("_fields", [""])[0].split(",")
        self._send(200, {"data": [{k: d[k] for k in fields if k in d} for d in data],
                         "meta": {"total_doc": len(data)}})

    def _send(self, status: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture()
def materials_project():
    l10, b32 = _cupd("L1_0"), _cupd("B32")
    cu = Structure(Lattice.cubic(3.6), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    _MaterialsProject.docs = [
        {"material_id": "mp-30", "chemsys": "Cu", "formula_pretty": "Cu", "energy_above_hull": 0.0,
         "structure": cu.as_dict()},
        {"material_id": "mp-1018029", "chemsys": "Cu-Pd", "formula_pretty": "CuPd", "energy_above_hull": 0.02,
         "structure": l10.as_dict()},
        {"material_id": "mp-999", "chemsys": "Cu-Pd", "formula_pretty": "CuPd", "energy_above_hull": 0.4,
         "structure": b32.as_dict()},
        {"material_id": "mp-19009", "chemsys": "Cu-O", "formula_pretty": "CuO", "energy_above_hull": 0.0,
         "structure": Structure(Lattice.cubic(4.2), ["Cu", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]).as_dict()},
    ]
    _MaterialsProject.queries = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MaterialsProject)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


def test_materials_project_phases_of_every_subsystem_within_the_cutoff(materials_project):
    cfg = KnownPhasesConfig.model_validate({"materials_project": {
        "enabled": True, "endpoint": materials_project, "max_e_above_hull": 0.05}})
    phases = known_phases.load(cfg, ["Cu", "Pd"], environ={"MP_API_KEY": _MaterialsProject.key})
    assert [p.id for p in phases] == ["mp-1018029", "mp-30"]  # not the B32 above 0.05, not Cu-O
    assert all(p.source == "materials_project" and p.energy is None for p in phases)  # no MP energy kept
    assert phases[0].structure.get_space_group_info()[1] == 123
    (query,) = _MaterialsProject.queries
    assert "chemsys=Cu%2CPd%2CCu-Pd" in query or "chemsys=Cu,Pd,Cu-Pd" in query, query

    with pytest.raises(UserError, match=r"^known_phases.materials_project: enabled, but MP_API_KEY is not set"):
        known_phases.load(cfg, ["Cu", "Pd"], environ={})
    with pytest.raises(UserError, match=r"^known_phases.materials_project: http://127.0.0.1:\d+/: ") as err:
        known_phases.load(cfg, ["Cu", "Pd"], environ={"MP_API_KEY": "w" * 32})
    assert "\n" not in str(err.value)


# -- in a campaign: computed, on the hull, hits compared (the session's EMT campaign) ---------------
def test_known_phases_join_the_hull_and_hits_say_whether_they_are_new(campaign_store):
    cfg, _ = campaign_store
    camp = open_campaign(cfg.store_path)
    summary = camp.summary()
    known = {k["known_id"]: k for k in summary["known_phases"]}
    assert set(known) == {"known.cif:0", "known.cif:1"}
    l10, b32 = known["known.cif:0"], known["known.cif:1"]
    cand = camp.candidates().set_index("id")
    # L1_0 CuPd is the cold start's own seed: computed once, as that candidate; B32 is a new candidate
    assert cand.loc[l10["candidate"], "source"] == "seed" and cand.loc[b32["candidate"], "source"] == "known"
    assert l10["dft_status"] == b32["dft_status"] == "ok"
    # EMT puts L1_0 CuPd on the hull (its 1:1 ground state) and B32 CuPd above it: that is reported
    assert l10["e_hull_dft"] == pytest.approx(0.0, abs=1e-9) and not l10["above_hull"]
    assert b32["e_hull_dft"] > 0.02 and b32["above_hull"]
    assert summary["known_above_hull"] == ["known.cif:1"]
    hits = {h["id"]: h for h in summary["hits"]}
    assert hits[l10["candidate"]]["novel"] is False and hits[l10["candidate"]]["known_match"] == "known.cif:0"
    others = [h for cid, h in hits.items() if cid != l10["candidate"]]
    assert others and all(h["novel"] is True and h["known_match"] is None for h in others)
    assert all(h["prototype"] for h in hits.values())
    # every verified candidate is compared, hits or not; nothing unverified is called novel
    assert cand.loc[b32["candidate"], "known_match"] == "known.cif:1"
    assert cand[cand["dft_status"] != "ok"]["novel"].isna().all()


def test_status_table_and_report_show_novelty_and_the_phase_above_the_hull(campaign_store, tmp_path):
    cfg, _ = campaign_store
    proc = subprocess.run([sys.executable, "-m", "matdisc.cli", "status", str(cfg.store_path)],
                          capture_output=True, text=True, timeout=120, env={**__import__("os").environ,
                                                                          "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "known: known.cif:0" in proc.stdout and " new " in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if "known.cif:1" in x)
    assert "ABOVE the hull" in line
    from matdisc.report import write_report

    page = write_report(cfg.store_path, tmp_path / "report").read_text()
    assert "Known phases" in page and "Above the campaign's hull: known.cif:1" in page


def test_an_entry_with_the_campaigns_settings_is_taken_as_it_is(tmp_path):
    from matdisc import reference_phases
    from matdisc.dft import settings_hash
    from matdisc.round import record_run
    from matdisc.store import CampaignWriter

    data = emt_config(tmp_path)
    base = CampaignConfig.model_validate(data)
    ours, theirs = settings_hash(base.reference), "0" * 16
    l10, b32 = _cupd("L1_0"), _cupd("B32")
    entries = [ComputedStructureEntry(l10, -1.5, entry_id="same", parameters={"settings_hash": ours}).as_dict(),
               ComputedStructureEntry(b32, -3.0, entry_id="other", parameters={"settings_hash": theirs}).as_dict()]
    (tmp_path / "entries.json").write_text(json.dumps(entries))
    cfg = CampaignConfig.model_validate({**data, "known_phases": str(tmp_path / "entries.json")})
    write_cif(tmp_path / "b2.cif", _cupd("B2"))
    more = CampaignConfig.model_validate({**data, "known_phases": [str(tmp_path / "entries.json"),
                                                                   str(tmp_path / "b2.cif")]})
    with CampaignWriter(cfg.store_path) as w:
        record_run(w, cfg)
        jobs = reference_phases.known_phase_jobs(w, cfg)
        again = reference_phases.known_phase_jobs(w, cfg)  # recorded once: a resumed run finds the same
        dft = w.table("dft")
        added = reference_phases.known_phase_jobs(w, more)  # a file added to the config later is read then
    known = open_campaign(cfg.store_path).table("known_phases")
    assert list(known["known_id"]) == ["same", "other", "same", "other", "b2.cif:0"]
    same, other = known["candidate"][:2]
    assert list(known["candidate"][2:4]) == [same, other]  # the same structures: the same candidates
    b2 = known["candidate"].iloc[4]
    assert [cid for cid, _ in added] == [other, b2] and len(set(known["candidate"])) == 3
    assert [cid for cid, _ in jobs] == [other] == [cid for cid, _ in again]  # only the foreign one is computed
    row = dft[dft["id"] == same].iloc[0]
    assert row["status"] == "ok" and row["energy"] == -1.5 and row["settings_hash"] == ours
    assert "taken from" in row["notes"]
    assert np.isclose(row["e_dft_per_atom"], -1.5 / len(l10))
