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
        part = slice(rank, None, world)  # each rank sees an interleaved shard
        s = _stream(H[part], y[part], 6, 11).all_reduce()
        c = NC4Counter(s.means, W)
        c.update(H[part]).all_reduce()
        queue.put((rank, s.metrics(W), c.value))
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_processes_gloo():
    H, y, W = _data(seed=5)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, H, y, W, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (m, v)) for r, m, v in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ref = measure(H, y, W)
    for metrics, nc4 in results.values():
        assert nc4 == pytest.approx(ref["nc4"])
        for k, v in metrics.items():
            assert v == pytest.approx(ref[k], rel=1e-10), k
    assert results[0] == results[1]
