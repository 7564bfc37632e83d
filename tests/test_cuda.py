"""CUDA paths (skipped without a GPU; run by benchmarks/gpu_all.sh on a GPU machine)."""
import numpy as np
import pytest
import torch

from nclab import collapsed_configuration, measure, ufm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_measure_on_cuda_equals_cpu():
    H, y, W = collapsed_configuration(10, 64, 50, noise=0.3, seed=0, dtype=torch.float32)
    cpu = measure(H, y, W)
    gpu = measure(H.cuda(), y.cuda(), W.cuda())
    for k in cpu:
        assert gpu[k] == pytest.approx(cpu[k], rel=1e-9, abs=1e-12), k


def test_ufm_solve_on_cuda_equals_cpu_in_float64():
    model = ufm.extended(4, 10, 8, 8, 0.005, 0.005, 0.005, relu=True)
    cpu = ufm.solve(model, ufm.GD(steps=2000, lr=0.1, log_every=500), seeds=range(3))
    gpu = ufm.solve(model, ufm.GD(steps=2000, lr=0.1, log_every=500, device="cuda"), seeds=range(3))
    assert gpu.settings["backend"] == "torch"
    np.testing.assert_allclose(gpu.history["objective"], cpu.history["objective"], rtol=1e-10)
    np.testing.assert_allclose(gpu.history["H2.nc1"], cpu.history["H2.nc1"], rtol=1e-6, atol=1e-20)


def test_ufm_float32_batch_on_cuda_converges():
    model = ufm.extended(4, 50, 20, 20, 0.005, 0.005, 0.005)
    r = ufm.solve(model, ufm.GD(steps=20_000, lr=0.1, dtype="float32", device="cuda", log_every=20_000), seeds=range(256))
    assert np.median(np.abs(r.final("gap") / r.f_star)) < 1e-4


def test_network_training_on_cuda(tmp_path):
    from nclab.nets.experiment import run_network_experiment

    summary = run_network_experiment("fig5", tmp_path / "fig5", device="cuda", quiet=True, quick=True)
    assert (tmp_path / "fig5" / "figure.png").is_file()
    assert summary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_stats_on_cuda_from_low_precision_batches(dtype):
    """Streamed on the GPU from float32/bfloat16 batches (float64 inside), tiled metrics on the GPU = CPU."""
    from nclab import ClassStats

    H, y, W = collapsed_configuration(300, 32, 6, noise=0.5, seed=1, dtype=torch.float32)
    H = H.to(dtype)
    gpu, cpu = ClassStats(300, 32, device="cuda"), ClassStats(300, 32)
    for i in range(0, len(y), 256):
        gpu.update(H[i:i + 256].cuda(), y[i:i + 256].cuda())
        cpu.update(H[i:i + 256], y[i:i + 256])
    assert gpu.means.dtype == torch.float64 and gpu.means.is_cuda
    want = cpu.metrics(W, tile_memory=1 << 20)
    got = gpu.metrics(W.cuda(), tile_memory=1 << 20)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k
