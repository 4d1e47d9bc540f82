"""What writing a campaign store on an object store costs per commit, against a local store.

The flow commits one row per finished calculation, so a store at a URL pays one push (the
changed chunks, then the commit log) per calculation. This appends ``--commits`` single-record
DFT batches (a relaxed structure of ~20 atoms each, the flow's pattern) to a local store and to
the same store at an S3 URL, in the same run. By default the S3 API is moto's server on
127.0.0.1 (a lower bound on latency: no network); ``--url s3://bucket/x.zarr`` uses a real one
with credentials from the environment. Prints one JSON line.

    python benchmarks/remote_store.py [--commits 200] [--url s3://bucket/bench.zarr]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.store import make_batch  # noqa: E402
from matdisc.store import CampaignWriter, Frames, open_campaign  # noqa: E402


def _moto_url() -> tuple[str, object]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log lines

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    import s3fs

    s3fs.S3FileSystem().mkdir("bench")
    return "s3://bench/bench.zarr", server


def _commits(store: str | Path, batches: list) -> float:
    t0 = time.perf_counter()
    with CampaignWriter(store) as w:
        for i, (atoms, forces, energy) in enumerate(batches):
            w.append_records("dft", f"c{i}", [{"id": f"c{i}", "round": 1, "status": "ok", "reason": "",
                                               "energy": float(energy[0]), "walltime_s": 1.0}],
                             Frames.from_atoms(atoms, forces=forces))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commits", type=int, default=200)
    ap.add_argument("--url", default=None, help="an S3 (or other fsspec) URL; default: moto on 127.0.0.1")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    batches = [make_batch(rng, 1) for _ in range(args.commits)]
    tmp = Path(tempfile.mkdtemp())
    os.environ["MATDISC_HOME"] = str(tmp / "home")
    server = None
    try:
        url, server = (args.url, None) if args.url else _moto_url()
        local_s = _commits(tmp / "bench.zarr", batches)
        remote_s = _commits(url, batches)
        assert len(open_campaign(url).table("dft")) == len(open_campaign(tmp / "bench.zarr").table("dft"))
        print(json.dumps({"commits": args.commits, "endpoint": "moto-127.0.0.1" if server else url,
                          "local_ms_per_commit": round(1e3 * local_s / args.commits, 2),
                          "remote_ms_per_commit": round(1e3 * remote_s / args.commits, 2),
                          "remote_ratio_vs_local": round(remote_s / local_s, 2)}))
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
