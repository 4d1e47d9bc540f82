"""The local Dask cluster: workers by resource, and the threads each kind may use."""

from __future__ import annotations

import os
import subprocess
import sys

import dask
import pytest
from distributed import Client, Security

from matdisc.config import ComputeConfig
from matdisc_flows.cluster import DFT, MLIP, campaign_cluster, local_worker_specs


def _malloc_trim() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def _threads() -> tuple[str, int, int]:
    """(OMP_NUM_THREADS, torch's threads as the worker started, after an MLIP job's set-up)."""
    import torch

    from matdisc.mlip.model import worker_threads

    return os.environ.get("OMP_NUM_THREADS", ""), torch.get_num_threads(), worker_threads()


def test_gpu_workers_rotate_the_inherited_device_list(monkeypatch):
    """Under Slurm ``--gres`` (or MIG) the job sees devices 3 and 5: the two MLIP workers get 3 and 5
    as their ``cuda:0``, not 0 and 1, and keep a thread limit like every worker."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    specs = local_worker_specs(ComputeConfig(mlip_workers=4, dft_workers=1, threads_per_mlip_worker=2), cuda_devices=2)
    assert [k for k in specs if k.startswith("mlip")] == ["mlip-0", "mlip-1"]  # one per visible GPU
    assert specs["mlip-0"]["options"]["env"] == {"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "3,5"}
    assert specs["mlip-1"]["options"]["env"] == {"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "5,3"}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    plain = local_worker_specs(ComputeConfig(mlip_workers=2, dft_workers=1), cuda_devices=2)
    assert [plain[f"mlip-{i}"]["options"]["env"]["CUDA_VISIBLE_DEVICES"] for i in (0, 1)] == ["0,1", "1,0"]


def test_a_cpu_mlip_worker_uses_every_core_and_dft_workers_their_share():
    """A round never runs MLIP and DFT stages at once, so the MLIP worker's torch gets all the
    cores (it had one: relaxations ran 1.4x slower under the flow than in-process on 2 cores), and
    an MLIP job applies that to torch, which the worker process started with one thread."""
    cores = os.cpu_count() or 1
    specs = local_worker_specs(ComputeConfig(mlip_workers=1, dft_workers=1))
    assert specs["mlip-0"]["options"]["env"] == {"OMP_NUM_THREADS": str(cores)}
    assert specs["dft-0"]["options"]["env"] == {"OMP_NUM_THREADS": "1"}
    two = local_worker_specs(ComputeConfig(mlip_workers=2, dft_workers=1))
    assert two["mlip-1"]["options"]["env"] == {"OMP_NUM_THREADS": str(max(1, cores // 2))}
    # on a shared machine (this suite runs two test processes on two cores) one thread is asked for
    one = local_worker_specs(ComputeConfig(mlip_workers=1, dft_workers=1, threads_per_mlip_worker=1))
    assert one["mlip-0"]["options"]["env"] == {"OMP_NUM_THREADS": "1"}
    with campaign_cluster(ComputeConfig(mlip_workers=1, dft_workers=1)) as address, Client(address) as client:
        # a worker runs what a client sends it: the cluster speaks TLS, and admits only clients holding
        # its certificates (this process's clients have them by default while it runs)
        assert address.startswith("tls://127.0.0.1:")
        with pytest.raises(OSError):  # certificates of another cluster
            Client(address, security=Security.temporary(), timeout="3s")
        plain = subprocess.run([sys.executable, "-c", f"from distributed import Client; Client({address!r}, timeout='3s')"],
                               capture_output=True, text=True, timeout=120)
        assert plain.returncode != 0 and ("TLS expects" in plain.stderr or "Timed out" in plain.stderr), plain.stderr
        # the nanny starts workers with one thread whatever the spec says: the job sets its own
        assert client.submit(_threads, resources=MLIP, pure=False).result() == (str(cores), 1, cores)
        assert client.submit(_threads, resources=DFT, pure=False).result() == ("1", 1, 1)
        # Dask's MALLOC_TRIM_THRESHOLD_=65536 cost torch's relaxations a fifth of their time: not set,
        # also for a worker the nanny restarts
        assert client.submit(_malloc_trim, resources=MLIP, pure=False).result() is None
        client.restart_workers([w for w, info in client.scheduler_info()["workers"].items() if "MLIP" in info["resources"]])
        assert client.submit(_malloc_trim, resources=MLIP, pure=False).result() is None
        # a worker's event loop held past Dask's 30 s default (seen: 33.7 s under load) no longer
        # drops it for good: scheduler and workers (restarted ones too) wait 300 s on a connection,
        # and every worker imported the task module before it joined
        assert client.run_on_scheduler(lambda: dask.config.get("distributed.comm.timeouts.tcp")) == "300s"
        # and may start processes of their own (training forks its members: not daemonic)
        on_workers = client.run(lambda: (dask.config.get("distributed.comm.timeouts.tcp"),
                                         "matdisc_flows.tasks" in sys.modules,
                                         __import__("multiprocessing").current_process().daemon))
        assert sorted(on_workers.values()) == [("300s", True, False)] * 2, on_workers
