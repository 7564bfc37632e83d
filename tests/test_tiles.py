"""Metrics at large K: tiles equal whole Grams, the further metrics' known answers, class subsets, per class."""
import math

import numpy as np
import pytest
import torch

import nclab
from nclab import ClassStats, NC4Counter, collapsed_configuration, measure
from nclab import metrics as M
from nclab.tiles import (
    FrameDistance, PairOptions, Spread, Tile, certified_sq_dist, mean_differences, pair_metrics, tile_rows,
)


def _clusters(K, d, n, seed=0, spread=3.0, offset=0.0):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat(np.arange(K), n))
    H = rng.standard_normal((len(y), d)) + spread * rng.standard_normal((K, d))[y] + offset
    W = rng.standard_normal((K, d))
    return H, y, W, 0.1 * rng.standard_normal(K)


@pytest.mark.parametrize("K, d", [(300, 20), (120, 150)])
def test_tiles_equal_one_whole_gram(K, d):
    """Many small tiles (1 MiB: 3-29 rows) give what one tile gives, to 1e-12, for d < K and d > K."""
    H, y, W, b = _clusters(K, d, 3)
    whole = measure(H, y, W, b, cdnv_exponent=1.0)
    assert tile_rows(K, 1 << 20) < K
    tiled = measure(H, y, W, b, cdnv_exponent=1.0, tile_memory=1 << 20)
    assert set(whole) == set(tiled)
    for k in whole:
        assert tiled[k] == pytest.approx(whole[k], rel=1e-12, abs=1e-15), k


def test_frame_distance_corrects_a_wrong_norm_estimate():
    """The correction identity: a g' off by 1e-6 still gives the exact distance."""
    rng = np.random.default_rng(1)
    G = torch.tensor(rng.standard_normal((40, 40)))
    G = G @ G.T
    g = float(torch.linalg.matrix_norm(G))
    exact = float(torch.linalg.matrix_norm(G / g - nclab.simplex_etf(40)))
    fd = FrameDistance("etf", 40, g * (1 + 1e-6))
    for i in range(0, 40, 7):
        fd.add(G[i:i + 7], Tile(slice(i, min(i + 7, 40)), slice(0, 40), upper=False))
    assert fd.value == pytest.approx(exact, rel=1e-12)


def test_certified_distances_recompute_what_the_gram_cannot_certify():
    """Two means 1e-9 apart at norm 1e3: the Gram trick loses everything; the recomputed pair is exact."""
    P = torch.tensor([[1e3, 0.0], [1e3, 1e-9], [0.0, 1e3]], dtype=torch.float64)
    T = P @ P.T
    sq = P.square().sum(1)
    D, recomputed = certified_sq_dist(T, sq, Tile(slice(0, 3), slice(0, 3), upper=False), 4 * 2.0**-53,
                                      mean_differences(P))
    assert recomputed == 2  # (0, 1) and (1, 0); the far pairs are certified
    assert float(D[0, 1]) == pytest.approx(1e-18, rel=1e-12)
    assert float(D[0, 2]) == pytest.approx(2e6, rel=1e-15)


def test_spread_merges_exactly():
    x = torch.tensor(np.random.default_rng(2).standard_normal(1000) * 1e-9 + 0.5)
    s = Spread()
    for i in range(0, 1000, 77):
        s.add(x[i:i + 77])
    assert s.std == pytest.approx(float(x.std()), rel=1e-10)
    assert s.mean == pytest.approx(float(x.mean()), rel=1e-15)


@pytest.mark.parametrize("K", [3, 5, 10])
def test_further_metrics_of_an_exact_etf(K):
    """Simplex ETF: equal norms and angles (cos = -1/(K-1)), ‖m̂_k - m̂_k'‖² = 2K/(K-1), W aligned."""
    H, y, W = collapsed_configuration(K, K + 2, 4, geometry="etf", seed=K)
    r = measure(H, y, W, riesz_s=2.0, cdnv_exponent=1.0)
    for key in ("equinorm_features", "equiangular_features", "maxangle_features", "equinorm_weights",
                "equiangular_weights", "maxangle_weights", "uniform_duality", "cdnv_q1"):
        assert abs(r[key]) < 1e-13, key
    dist2 = 2 * K / (K - 1)
    assert r["hu_log"] == pytest.approx(-0.5 * math.log(dist2), abs=1e-14)
    assert r["hu_riesz"] == pytest.approx(1 / dist2, rel=1e-14)


def test_etf_minimises_the_energies():
    """Random unit-ish means have higher log and Riesz energies than the ETF (its universal optimality)."""
    K = 6
    H, y, _, _ = _clusters(K, 12, 5, spread=10.0)
    r = measure(H, y)
    dist2 = 2 * K / (K - 1)
    assert r["hu_log"] > -0.5 * math.log(dist2)
    assert r["hu_riesz"] > dist2 ** -0.5


def test_scale_laws():
    """Every metric is scale-invariant except cdnv_q, which scales as c^(2-q)."""
    H, y, W, b = _clusters(8, 6, 5, seed=3)
    a = measure(H, y, W, b, cdnv_exponent=1.5)
    c = measure(H * 2.0**300, y, W, b, cdnv_exponent=1.5)
    for k in a:
        want = a[k] * (2.0**300) ** 0.5 if k == "cdnv_q1.5" else a[k]
        assert c[k] == pytest.approx(want, rel=1e-12), k


def test_generalised_cdnv_matches_a_plain_loop():
    H, y, _, _ = _clusters(5, 4, 6, seed=4)
    means = np.stack([H[y == k].mean(0) for k in range(5)])
    var = np.array([((H[y == k] - means[k]) ** 2).sum(1).mean() for k in range(5)])
    q = 0.7
    want = np.mean([(var[i] + var[j]) / (2 * np.linalg.norm(means[i] - means[j]) ** q)
                    for i in range(5) for j in range(i + 1, 5)])
    assert measure(H, y, cdnv_exponent=q)["cdnv_q0.7"] == pytest.approx(want, rel=1e-12)


def test_uniform_duality_is_the_spread_of_the_class_cosines():
    """Hand-built: μ̃ = ±e1, w_1 = e1 (cos 1), w_2 = -(e1 + e2) (cos 1/√2): CoV = std/mean, ddof 1."""
    H = np.array([[1.0, 0.0], [-1.0, 0.0]])
    W = np.array([[1.0, 0.0], [-1.0, -1.0]])
    cos = np.array([1.0, 1 / math.sqrt(2)])
    assert measure(H, [0, 1], W)["uniform_duality"] == pytest.approx(cos.std(ddof=1) / cos.mean(), rel=1e-14)


def test_class_subsets():
    H, y, W, b = _clusters(6, 5, 4, seed=5)
    keep = y < 6
    keep[np.flatnonzero(y == 2)[:2]] = False  # class 2 is the least frequent
    keep[np.flatnonzero(y == 4)[:1]] = False
    H, y = H[keep], y[keep]
    sel = [0, 5, 3]
    mask = np.isin(y, sel)
    relabel = {c: i for i, c in enumerate(sel)}
    want = measure(H[mask], [relabel[c] for c in y[mask]], W[sel], b[sel])
    got = measure(H, y, W, b, classes=sel)
    assert got == pytest.approx(want, rel=1e-13)
    top = measure(H, y, W, b, classes=4)  # drops classes 2 and 4
    rest = [0, 1, 3, 5]
    m2 = np.isin(y, rest)
    assert top == pytest.approx(measure(H[m2], [rest.index(c) for c in y[m2]], W[rest], b[rest]), rel=1e-13)
    stats = ClassStats(6, 5)
    stats.update(H, y)
    sub = stats.subset(sel).metrics(W[sel])
    assert "nc1" not in sub
    assert sub == pytest.approx({k: v for k, v in got.items() if k in sub}, rel=1e-10)
    for bad in (1, 7, [0, 0], [0, 9], [0.5, 1.0]):
        with pytest.raises(ValueError, match="^classes: "):
            measure(H, y, classes=bad)


def test_per_class_breakdowns():
    H, y, W, b = _clusters(5, 7, 8, seed=6, spread=1.0)
    r, pc = measure(H, y, W, b), nclab.per_class(H, y, W, b)
    assert set(pc) == {"count", "variance", "nc1_share", "cdnv_row", "mean_norm", "weight_norm", "duality",
                       "nc4_error"}
    assert pc["nc1_share"].sum() == pytest.approx(1.0, rel=1e-13)
    assert pc["cdnv_row"].mean() == pytest.approx(r["cdnv"], rel=1e-13)
    assert np.average(pc["nc4_error"], weights=pc["count"]) == pytest.approx(r["nc4"], rel=1e-13)
    means = np.stack([H[y == k].mean(0) for k in range(5)])
    np.testing.assert_allclose(pc["mean_norm"], np.linalg.norm(means - means.mean(0), axis=1), rtol=1e-13)
    np.testing.assert_allclose(pc["weight_norm"], np.linalg.norm(W, axis=1), rtol=1e-14)
    # one class's NC1 share by hand: its scatter through the pseudo-inverse of Σ_B
    Mc = means - means.mean(0)
    Sb_pinv = np.linalg.pinv(Mc.T @ Mc / 5)
    D = H[y == 3] - means[3]
    share = np.trace(D.T @ D / len(y) @ Sb_pinv) / 5 / r["nc1"]
    assert pc["nc1_share"][3] == pytest.approx(share, rel=1e-9)
    # streamed: the same rows; NC4 errors per class from the second pass
    stats = ClassStats(5, 7).update(H, y)
    st = stats.per_class(W)
    for k in ("count", "variance", "cdnv_row", "mean_norm", "weight_norm", "duality"):
        np.testing.assert_allclose(st[k], pc[k], rtol=1e-11, err_msg=k)
    nc4 = NC4Counter(stats.means, W, b).update(H, y)
    np.testing.assert_allclose(nc4.per_class_errors, pc["nc4_error"], rtol=1e-13)


def test_nc4_on_a_sample_says_so():
    H, y, W, b = _clusters(4, 3, 50, seed=7, spread=0.5)
    full, sampled = measure(H, y, W, b), measure(H, y, W, b, nc4_rows=60)
    assert sampled["nc4_rows"] == 60 and "nc4_rows" not in full
    assert {k: v for k, v in sampled.items() if not k.startswith("nc4")} == pytest.approx(
        {k: v for k, v in full.items() if k != "nc4"}, rel=1e-14)
    assert abs(sampled["nc4"] - full["nc4"]) < 0.2
    assert measure(H, y, W, b, nc4_rows=10**6)["nc4"] == full["nc4"]  # more rows than N: all of them


@pytest.mark.parametrize("kwargs, match", [
    (dict(cdnv_exponent=0), "^cdnv_exponent: "), (dict(riesz_s=float("nan")), "^riesz_s: "),
    (dict(tile_memory=1000), "^tile_memory: "), (dict(nc4_rows=0), "^nc4_rows: "),
])
def test_bad_options(kwargs, match):
    H, y, W, b = _clusters(3, 2, 3)
    with pytest.raises(ValueError, match=match):
        measure(H, y, W, b, **kwargs)


def test_huge_k_is_refused_before_allocating():
    with pytest.raises(ValueError, match=r"^num_classes: .* need about .* GiB"):
        ClassStats(10**7, 10**5)


def test_streaming_bfloat16_and_float32_accumulate_in_float64():
    H, y, W, _ = _clusters(50, 16, 20, seed=8)
    H32 = torch.tensor(H, dtype=torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        Hd = H32.to(dtype)
        s = ClassStats(50, 16)
        for i in range(0, len(y), 64):
            s.update(Hd[i:i + 64], y[i:i + 64])
        assert s.means.dtype == torch.float64
        ref = measure(Hd.to(torch.float64), y, W)
        got = s.metrics(W)
        for k in got:
            assert got[k] == pytest.approx(ref[k], rel=1e-11), (dtype, k)


def test_pair_metrics_counts_each_pair_once():
    """cdnv_row's mean is cdnv; the hu energies average over K(K-1) ordered pairs."""
    Mm = torch.tensor(np.random.default_rng(9).standard_normal((37, 5)))
    var = torch.rand(37, dtype=torch.float64)
    one = pair_metrics(Mm, var, options=PairOptions())
    many = pair_metrics(Mm, var, options=PairOptions(memory=BYTES_PER_TILE(37) * 4))
    for k in ("cdnv", "hu_log", "hu_riesz", "equiangular_features", "maxangle_features", "nc2_etf", "nc2_of"):
        assert many[k] == pytest.approx(one[k], rel=1e-12), k
    torch.testing.assert_close(many["cdnv_row"], one["cdnv_row"], rtol=1e-12, atol=0)
    assert float(one["cdnv_row"].mean()) == pytest.approx(one["cdnv"], rel=1e-14)


def BYTES_PER_TILE(K):
    from nclab.tiles import BYTES_PER_TILE_ENTRY

    return BYTES_PER_TILE_ENTRY * K


def test_metrics_memory_estimate_is_bounded():
    """K = 32,768, d = 1,024: the metrics' working set is a few GB, not the 8.6 GB of one K x K matrix."""
    assert M.metrics_memory_bytes(32768, 1024) < 4 * 2**30
    assert M.metrics_memory_bytes(1000, 512) < 2**30


@pytest.mark.parametrize("K, d", [(50, 30), (20, 64), (200, 8)])
def test_existing_results_unchanged(K, d):
    """The whole-Gram kernels (the UFM solver's, and measure's before tiles) and the tiled pass agree to 1e-12."""
    H, y, W, _ = _clusters(K, d, 4, seed=K)
    Hm = torch.tensor(H)
    means, counts = M.class_means_t(Hm, torch.tensor(y), K)
    var = torch.tensor([((H[y == k] - H[y == k].mean(0)) ** 2).sum(1).mean() for k in range(K)])
    Wt = torch.tensor(W)
    whole = M._batched_summary(means, counts, var, None, Wt)
    for memory in (M.DEFAULT_TILE_MEMORY, 1 << 20):
        tiled = M.summary_metrics_t(means, counts, var, None, Wt, extras=PairOptions(memory=memory))
        for k, v in whole.items():
            assert float(tiled[k]) == pytest.approx(float(v), rel=1e-12, abs=1e-300), (memory, k)


def test_energies_of_nearly_parallel_means_are_exact():
    """Two centred means 1e-9 apart in angle: 2 - 2cos from the Gram would keep no digit of their
    squared distance (6e-19); recomputed from m̂_i - m̂_j it keeps about u/6e-19 ~ 1e-7 relative
    of it (the direction's own conditioning), and hu_log, hu_riesz match 50-digit arithmetic."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    rng = np.random.default_rng(11)
    Mm = rng.standard_normal((6, 4))
    Mm[5] = Mm[4] * 1.7 + 1e-9 * rng.standard_normal(4)
    Mm[0] = -Mm[1:].sum(0)  # mean 0: the centred means 4 and 5 stay nearly parallel
    Mt = torch.tensor(Mm)
    got = pair_metrics(Mt, torch.ones(6, dtype=torch.float64), options=PairOptions(riesz_s=1.0))
    rows = [[mpmath.mpf(float(v)) for v in r] for r in Mm]
    mean = [sum(r[c] for r in rows) / 6 for c in range(4)]
    unit = []
    for r in rows:
        c = [r[k] - mean[k] for k in range(4)]
        n = mpmath.sqrt(sum(v * v for v in c))
        unit.append([v / n for v in c])
    dist = [mpmath.sqrt(sum((unit[i][k] - unit[j][k]) ** 2 for k in range(4)))
            for i in range(6) for j in range(6) if i != j]
    assert got["hu_log"] == pytest.approx(float(sum(-mpmath.log(x) for x in dist) / 30), rel=1e-10)
    assert got["hu_riesz"] == pytest.approx(float(sum(1 / x for x in dist) / 30), rel=1e-7)
    assert got["recomputed_pairs"] >= 2


def test_an_undefined_further_metric_is_left_out_not_fatal():
    """A class mean at the global mean (its direction undefined) or a zero weight row: the
    angles that need them are left out; every default metric is still there."""
    centres = np.array([[2.0, 0.0], [0.0, 0.0], [-2.0, 0.0]])
    offsets = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    H = np.concatenate([c + offsets for c in centres])
    y = np.repeat(np.arange(3), 4)
    r = measure(H, y)
    assert r["nc1"] == pytest.approx(0.0625) and "hu_log" not in r and "equiangular_features" not in r
    W = np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    r = measure(H + np.array([0.0, 0.5]) * (y == 1)[:, None], y, W)
    assert "equiangular_weights" not in r and "nc2w_etf" in r
    stats = ClassStats(3, 2).update(H, y)
    assert stats.metrics()["nc1"] == pytest.approx(0.0625)


def test_class_stats_made_under_inference_mode_update_outside_it():
    with torch.inference_mode():
        s = ClassStats(3, 2).update(np.eye(3, 2), [0, 1, 2])
    s.update(np.eye(3, 2), [0, 1, 2])
    assert float(s.counts.sum()) == 6
