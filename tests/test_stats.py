"""Streaming statistics equal the in-memory metrics; merges are exact; all_reduce works."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nclab import ClassStats, NC4Counter, measure


def _data(seed=0, offset=0.0, K=6, d=12, n=40):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat(np.arange(K), rng.integers(n // 2, n, size=K)))
    H = rng.standard_normal((len(y), d)) + 3 * rng.standard_normal((K, d))[y] + offset
    W = rng.standard_normal((K, d))
    return H, y, W


def _stream(H, y, K, batch, full=True):
    s = ClassStats(K, H.shape[1], full=full)
    for i in range(0, len(y), batch):
        s.update(H[i:i + batch], y[i:i + batch])
    return s


@pytest.mark.parametrize("batch", [1, 7, 64, 10_000])
def test_streaming_equals_in_memory(batch):
    H, y, W = _data()
    ref = measure(H, y, W)
    got = _stream(H, y, 6, batch).metrics(W)
    assert set(got) == set(ref) - {"nc4"}
    assert {"hu_log", "uniform_duality", "equinorm_features", "equiangular_weights"} <= set(got)
    for k, v in got.items():
        assert v == pytest.approx(ref[k], rel=1e-10), k


def test_large_offset_costs_no_precision():
    H, y, W = _data(seed=1, offset=1e6)
    ref = measure(H, y, W)
    got = _stream(H, y, 6, 17).metrics(W)
    for k, v in got.items():
        assert v == pytest.approx(ref[k], rel=1e-8), k
    # what the naive Σh² - nμ² formula would give is far off: the test can fail
    naive_tr = sum(((H[y == k] ** 2).sum() - (y == k).sum() * (H[y == k].mean(0) ** 2).sum())
                   for k in range(6))
    exact_tr = sum(((H[y == k] - H[y == k].mean(0)) ** 2).sum() for k in range(6))
    assert abs(naive_tr - exact_tr) / exact_tr > 1e-8
    assert float(_stream(H, y, 6, 17).m2.sum()) == pytest.approx(exact_tr, rel=1e-9)


def test_merge_is_exact_and_order_independent():
    H, y, W = _data(seed=2)
    a, b = _stream(H[:100], y[:100], 6, 13), _stream(H[100:], y[100:], 6, 29)
    ab = _stream(H[:100], y[:100], 6, 13).merge(b)
    ba = _stream(H[100:], y[100:], 6, 29).merge(a)
    whole = _stream(H, y, 6, len(y))
    for s in (ab, ba):
        assert torch.allclose(s.means, whole.means, rtol=1e-13, atol=1e-13)
        assert torch.allclose(s.scatter, whole.scatter, rtol=1e-11, atol=1e-11)
        assert torch.allclose(s.m2, whole.m2, rtol=1e-12)


def test_light_mode_keeps_only_k_by_d():
    H, y, W = _data(seed=3)
    s = _stream(H, y, 6, 50, full=False)
    assert s.scatter is None
    got, ref = s.metrics(W), measure(H, y, W)
    assert "nc1" not in got
    for k, v in got.items():
        assert v == pytest.approx(ref[k], rel=1e-10), k
    with pytest.raises(ValueError, match="full=True"):
        s.within_covariance


def test_nc4_counter_second_pass():
    H, y, W = _data(seed=4)
    b = np.linspace(-1, 1, 6)
    s = _stream(H, y, 6, 32)
    c = NC4Counter(s.means, W, b)
    for i in range(0, len(y), 32):
        c.update(H[i:i + 32])
    assert c.value == pytest.approx(measure(H, y, W, b)["nc4"], abs=1e-15)


def test_bad_updates_are_rejected():
    s = ClassStats(3, 4)
    with pytest.raises(ValueError, match="columns"):
        s.update(np.zeros((2, 5)), np.array([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        s.update(np.zeros((2, 4)), np.array([0, 3]))
    with pytest.raises(ValueError, match="NaN"):
        s.update(np.full((2, 4), np.nan), np.array([0, 1]))
    s.update(np.ones((2, 4)), np.array([0, 1]))
    with pytest.raises(ValueError, match="no samples"):
        s.metrics()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, H, y, W, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        K = W.shape[0]
        part = slice(rank, None, world)  # each rank sees an interleaved shard
        s = _stream(H[part], y[part], K, 11).all_reduce()
        c = NC4Counter(s.means, W)
        c.update(H[part]).all_reduce()
        stats = tuple(t.numpy().copy() for t in (s.counts, s.means, s.m2, s.scatter))  # numpy: sent by value
        queue.put((rank, s.metrics(W), c.value, stats))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("K, d, n", [(6, 12, 40), (1000, 8, 3)])
def test_all_reduce_two_processes_gloo(K, d, n):
    """Two gloo processes: the all-reduced statistics equal one-shot ones to 1e-12, the metrics too."""
    H, y, W = _data(seed=5, K=K, d=d, n=n)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, H, y, W, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: (m, v, st) for r, m, v, st in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ref = measure(H, y, W)
    one_shot = ClassStats(K, d).update(H, y)
    for metrics, nc4, stats in results.values():
        assert nc4 == pytest.approx(ref["nc4"])
        for k, v in metrics.items():
            assert v == pytest.approx(ref[k], rel=1e-10), k
        for got, want in zip(stats, (one_shot.counts, one_shot.means, one_shot.m2, one_shot.scatter)):
            want = want.numpy()
            assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()
    (m0, v0, s0), (m1, v1, s1) = results[0], results[1]
    assert all(np.array_equal(a, b) for a, b in zip(s0, s1))  # bitwise: rank 0's merge is broadcast
    assert v0 == v1 and m0 == pytest.approx(m1, rel=1e-12)  # metrics: GEMMs may round by buffer alignment


# ----------------------------------------------------------------- extreme inputs
@pytest.mark.parametrize("scale", [2.0**300, 2.0**-300, 1e100, 1e-100, 1e110])
def test_streaming_metrics_are_scale_invariant_within_float64_moments(scale):
    """Within MOMENT_EXP the moments fit float64; the readout rescales the means so the
    squared Grams of the frame distances fit too."""
    H, y, W = _data(seed=6)
    ref = _stream(H, y, 6, 50).metrics(W)
    got = _stream(H * scale, y, 6, 50).metrics(W * 1e200)
    for k, v in got.items():
        assert v == pytest.approx(ref[k], rel=1e-12), k


@pytest.mark.parametrize("scale, word", [(1e200, "large"), (1e160, "large"), (1e-300, "small"),
                                         (1e-150, "small")])
def test_squares_outside_float64_are_a_clear_error(scale, word):
    H, y, _ = _data(seed=7)
    s = ClassStats(6, H.shape[1])
    with pytest.raises(ValueError, match=rf"^features: entries up to .* too {word} for ClassStats.*2\.0\*\*-?\d+"):
        s.update(H * scale, y)
    assert s.total == 0  # nothing was merged


@pytest.mark.parametrize("scale", [1e37, 1e-37])
def test_float32_features_always_fit_the_float64_moments(scale):
    H, y, W = _data(seed=7)
    ref = _stream(H.astype(np.float32).astype(np.float64), y, 6, 40).metrics(W)
    got = _stream((H * scale).astype(np.float32), y, 6, 40).metrics(W)
    for k, v in got.items():
        assert v == pytest.approx(ref[k], rel=1e-5), k


@pytest.mark.parametrize("scale", [1e200, 1e-300, 1e300])
def test_nc4_counter_handles_extreme_magnitudes(scale):
    H, y, W = _data(seed=8)
    b = np.linspace(-1, 1, 6)
    means = _stream(H, y, 6, 64).means
    want = NC4Counter(means, W, b).update(H).value
    assert NC4Counter(means * scale, W, b * scale).update(H * scale).value == want
    w_scale = 1e-250 if scale > 1 else 1e250
    assert NC4Counter(means * scale, W * w_scale, b * scale * w_scale).update(H * scale).value == want
    assert want == pytest.approx(measure(H, y, W, b)["nc4"], abs=1e-15)


@pytest.mark.parametrize("args, kwargs, match", [
    ((10**9, 10**5), {}, r"^num_classes: ClassStats\(num_classes=1000000000, dim=100000, full=True\) "
                         r"would need about .* GiB of memory, more than"),
    ((10**12, 10), dict(full=False), r"^num_classes: .* GiB"),
    ((2, 10**7), {}, r"^num_classes: .* GiB"),
    ((2.5, 3), {}, r"^num_classes: need an integer"),
    ((True, 3), {}, r"^num_classes: need an integer"),
    ((1, 3), {}, r"^num_classes: need an integer number of classes >= 2"),
    ((3, 0), {}, r"^dim: expected a positive integer"),
    ((3, 4.0), {}, r"^dim: expected a positive integer"),
])
def test_bad_or_huge_constructor_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassStats(*args, **kwargs)


def test_memory_estimate_formula_covers_the_stored_statistics():
    assert ClassStats.memory_bytes(10, 4, full=False) == 8 * 2 * (10 * 4 + 20)
    assert ClassStats.memory_bytes(10, 4) == 8 * 2 * (10 * 4 + 20 + 16)
    for full in (True, False):
        s = ClassStats(300, 17, full=full).update(np.ones((5, 17)), np.arange(5))
        stored = sum(t.numel() * t.element_size() for t in (s.counts, s.means, s.m2, s.scatter) if t is not None)
        assert stored <= ClassStats.memory_bytes(300, 17, full) <= 2 * stored


@pytest.mark.parametrize("labels, match", [
    (np.array([0.0, 1.0]), "labels: expected integer"),
    (np.array([True, False]), "labels: expected integer"),
    (np.array([0, 1, 2]), "labels: expected integer shape"),
])
def test_bad_labels_in_updates(labels, match):
    with pytest.raises(ValueError, match=match):
        ClassStats(3, 4).update(np.ones((2, 4)), labels)


@pytest.mark.parametrize("rtol", [0, 2, float("nan"), 1e-30])
def test_bad_rtol_in_metrics(rtol):
    H, y, W = _data(seed=9)
    with pytest.raises(ValueError, match="^rtol: "):
        _stream(H, y, 6, 100).metrics(W, rtol=rtol)


def test_nc4_counter_and_merge_reject_mismatched_inputs():
    H, y, W = _data(seed=10)
    c = NC4Counter(_stream(H, y, 6, 64).means, W)
    with pytest.raises(ValueError, match=r"^features: expected 12 columns"):
        c.update(H[:, :5])
    with pytest.raises(ValueError, match="^features: contains NaN"):
        c.update(np.full((2, 12), np.nan))
    with pytest.raises(TypeError, match="^other: expected a ClassStats"):
        ClassStats(6, 12).merge({"counts": 1})
