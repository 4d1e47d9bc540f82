"""The CUDA path of the MLIP stage: training, batched relaxation and the Dask MLIP worker on a GPU.

These run only where CUDA is visible (``pytest -m gpu``); CI has no GPU, so they are skipped
there and run on a GPU machine (see docs/stages/relax.md, "GPU"). Each compares the GPU result with the CPU
result of the same model, so a wrong device, dtype or batching on CUDA fails them.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from test_mlip import FORCE_RMSE_BOUND, TRAINING, emt_frames, rattled  # noqa: E402

from matdisc.config import MLIPConfig, TrainingConfig  # noqa: E402
from matdisc.mlip import evaluate, predict_energies, relax_many, train_committee  # noqa: E402
from matdisc.mlip.model import resolve_device  # noqa: E402


@pytest.fixture(scope="module")
def cuda_models(tmp_path_factory):
    frames, groups = emt_frames(40, seed=0)
    trained = train_committee(frames, groups, tmp_path_factory.mktemp("mace-cuda"), TRAINING, size=2, seed=0,
                              device="cuda")
    return trained


def test_auto_device_is_cuda_and_gpu_preset_is_larger():
    assert resolve_device("auto") == "cuda"
    gpu = TrainingConfig().sized("cuda")
    assert gpu.preset == "gpu" and gpu.num_channels > TrainingConfig().sized("cpu").num_channels


def test_training_on_cuda_reaches_the_cpu_force_bound(cuda_models):
    held_out, _ = emt_frames(8, seed=7)
    for m in cuda_models:
        assert m.path.exists() and m.n_train > 0
        on_gpu = evaluate(str(m.path), held_out, device="cuda")
        assert on_gpu["forces_rmse"] < FORCE_RMSE_BOUND
        # saved with --save_cpu: the same file gives the same numbers on the CPU
        on_cpu = evaluate(str(m.path), held_out, device="cpu")
        assert abs(on_cpu["energy_mae_per_atom"] - on_gpu["energy_mae_per_atom"]) < 1e-6


def test_committee_energies_agree_across_devices(cuda_models):
    frames, _ = emt_frames(6, seed=3)
    paths = [str(m.path) for m in cuda_models]
    e_gpu = predict_energies(paths, frames, device="cuda")
    e_cpu = predict_energies(paths, frames, device="cpu")
    assert e_gpu.shape == e_cpu.shape == (len(frames),)
    np.testing.assert_allclose(e_gpu, e_cpu, atol=1e-8)  # float64 on both


SIGMA_TOL = 1e-3  # eV/atom, see below


# Both sides stop anywhere inside fmax 0.05 eV/A, so their energies differ by up to about
# fmax^2 / (2 k) per atom (k ~ 5 eV/A^2 for these metals): 2.5e-4 eV/atom in float64 (measured on
# an H200: 2.8e-5 for a cell whose FIRE path changed its symmetry); float32 adds its own rounding.
@pytest.mark.parametrize("dtype,tol", [("float64", 2.5e-4), ("float32", 2e-3)])
def test_batched_relaxation_on_cuda_matches_cpu(cuda_models, dtype, tol):
    structures = rattled(12, seed=5)
    paths = [str(m.path) for m in cuda_models]
    cfg = MLIPConfig(fmax=0.05, max_steps=300, engine="torch-sim", dtype=dtype)
    gpu = relax_many(structures, paths, cfg.model_copy(update={"device": "cuda"}))
    cpu = relax_many(structures, paths, cfg.model_copy(update={"device": "cpu", "dtype": "float64"}))
    from matdisc.mlip.batched import _GPU_BATCH_ATOMS, GPU_BATCH_ATOMS_CAP

    assert _GPU_BATCH_ATOMS, "the GPU batch size comes from one probe pass, cached"
    assert all(8 <= n <= GPU_BATCH_ATOMS_CAP for n in _GPU_BATCH_ATOMS.values())
    for g, c in zip(gpu, cpu):
        assert g.id == c.id
        assert g.status in ("ok", "symmetry_changed"), g
        assert abs(g.energy_per_atom - c.energy_per_atom) < tol
        # the relaxation minimises the committee mean, so the mean is flat at the end point but each
        # member's energy (and so sigma) moves to first order with the end point: |dsigma| ~ force
        # spread x end-point shift ~ 0.05 eV/A x 0.01 A (measured on an H200: 3.2e-4 eV/atom)
        assert g.sigma >= 0 and abs(g.sigma - c.sigma) < max(tol, SIGMA_TOL)
        assert np.abs(g.forces).max() < 0.05 + 1e-6


def test_local_cluster_puts_the_mlip_worker_on_the_gpu():
    from distributed import Client

    from matdisc.config import ComputeConfig
    from matdisc_flows.cluster import MLIP, campaign_cluster

    def where() -> tuple[str, str]:
        import os

        return os.environ.get("CUDA_VISIBLE_DEVICES", ""), resolve_device("auto")

    with campaign_cluster(ComputeConfig(mlip_workers=1, dft_workers=1)) as address, Client(address) as client:
        visible, device = client.submit(where, resources=MLIP, pure=False).result(timeout=120)
    assert visible == "0" and device == "cuda"
