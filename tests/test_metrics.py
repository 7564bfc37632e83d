"""Metrics against hand-built cases with known answers, a plain reference, and invariances."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nclab
from nclab import collapsed_configuration, measure, orthogonal_frame, simplex_etf
from nclab import metrics as M

ETF_OF_DISTANCE = lambda K: math.sqrt(2 - 2 * math.sqrt((K - 1) / K))  # noqa: E731


def reference_metrics(H, y, W=None, b=None):
    """Plain float64 numpy reference, written the way existing NC code does it."""
    H = np.asarray(H, dtype=np.float64)
    y = np.asarray(y)
    K = int(y.max()) + 1
    N, d = H.shape
    means = np.stack([H[y == k].mean(0) for k in range(K)])
    mu_G = means.mean(0)
    Sw = np.zeros((d, d))
    for k in range(K):
        D = H[y == k] - means[k]
        Sw += D.T @ D
    Sw /= N
    Mc = means - mu_G
    Sb = Mc.T @ Mc / K
    # safe cut-off: Σ_B's non-zero eigenvalues are far above 1e-8 of the largest here
    nc1 = np.trace(Sw @ np.linalg.pinv(Sb, rcond=1e-8, hermitian=True)) / K
    var = np.array([((H[y == k] - means[k]) ** 2).sum(1).mean() for k in range(K)])
    pairs = [(i, j) for i in range(K) for j in range(i + 1, K)]
    cdnv = np.mean([(var[i] + var[j]) / (2 * np.sum((means[i] - means[j]) ** 2)) for i, j in pairs])

    def fdist(G, F):
        return np.linalg.norm(G / np.linalg.norm(G) - F)

    E = (np.eye(K) - 1 / K) / np.sqrt(K - 1)
    O = np.eye(K) / np.sqrt(K)
    out = dict(nc1=nc1, nc1_trace=np.trace(Sw) / np.trace(Sb), cdnv=cdnv,
               nc2_etf=fdist(Mc @ Mc.T, E), nc2_of=fdist(means @ means.T, O))
    out |= shape_reference(Mc, "features")
    unit = Mc / np.linalg.norm(Mc, axis=1, keepdims=True)
    dist = np.array([np.linalg.norm(unit[i] - unit[j]) for i in range(K) for j in range(K) if i != j])
    out |= dict(hu_log=np.mean(-np.log(dist)), hu_riesz=np.mean(1 / dist))
    if W is not None:
        out |= shape_reference(np.asarray(W, dtype=np.float64), "weights")
        Wf = np.asarray(W, dtype=np.float64)
        cos = np.array([Wf[k] @ Mc[k] / np.linalg.norm(Wf[k]) / np.linalg.norm(Mc[k]) for k in range(K)])
        out["uniform_duality"] = cos.std(ddof=1) / cos.mean()
    if W is not None:
        W = np.asarray(W, dtype=np.float64)
        logits = H @ W.T + (0 if b is None else np.asarray(b))
        ncc = np.argmin(((H[:, None, :] - means[None]) ** 2).sum(-1), 1)
        out.update(
            nc2w_etf=fdist(W @ W.T, E), nc2w_of=fdist(W @ W.T, O),
            nc3_etf=np.linalg.norm(W / np.linalg.norm(W) - Mc / np.linalg.norm(Mc)),
            nc3_of=np.linalg.norm(W / np.linalg.norm(W) - means / np.linalg.norm(means)),
            nc3_duality_etf=fdist(W @ Mc.T, E), nc3_duality_of=fdist(W @ means.T, O),
            nc4=np.mean(ncc != logits.argmax(1)),
        )
    return out


def shape_reference(X, name):
    """Equinorm, equiangularity and max-angle of the rows of X (K, d), plainly."""
    K = len(X)
    norms = np.linalg.norm(X, axis=1)
    cos = np.array([X[i] @ X[j] / norms[i] / norms[j] for i in range(K) for j in range(K) if i != j])
    return {f"equinorm_{name}": norms.std(ddof=1) / norms.mean(), f"equiangular_{name}": cos.std(ddof=1),
            f"maxangle_{name}": np.mean(np.abs(cos + 1 / (K - 1)))}


@pytest.mark.parametrize("K", [2, 4, 10])
def test_frames_have_unit_norm_and_right_structure(K):
    E, O = simplex_etf(K), orthogonal_frame(K)
    assert torch.linalg.matrix_norm(E) == pytest.approx(1, abs=1e-15)
    assert torch.linalg.matrix_norm(O) == pytest.approx(1, abs=1e-15)
    assert torch.allclose(E.sum(0), torch.zeros(K, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(E @ E * math.sqrt(K - 1), E, atol=1e-14)  # scaled projector


@pytest.mark.parametrize("K", [3, 4, 7])
def test_exact_etf(K):
    H, y, W = collapsed_configuration(K, 2 * K, 5, geometry="etf", seed=K)
    r = measure(H, y, W)
    # float64 class means are exact up to rounding of the sum: 0 to ~1e-30
    assert 0.0 <= r["nc1"] < 1e-28 and 0.0 <= r["nc1_trace"] < 1e-28 and 0.0 <= r["cdnv"] < 1e-28
    for key in ("nc2_etf", "nc2w_etf", "nc3_etf", "nc3_of", "nc3_duality_etf"):
        assert r[key] < 1e-13, key
    assert r["nc2_of"] == pytest.approx(ETF_OF_DISTANCE(K), abs=1e-13)
    assert r["nc2w_of"] == pytest.approx(ETF_OF_DISTANCE(K), abs=1e-13)
    assert r["nc4"] == 0.0
    assert ETF_OF_DISTANCE(4) == pytest.approx(0.5176, abs=1e-4)


@pytest.mark.parametrize("K", [2, 4, 6])
def test_exact_orthogonal_frame(K):
    H, y, W = collapsed_configuration(K, K + 3, 4, geometry="of", seed=1)
    r = measure(H, y, W)
    assert 0.0 <= r["nc1"] < 1e-28
    # an OF centred is an ETF: both frame distances vanish
    for key in ("nc2_of", "nc2_etf", "nc2w_of", "nc3_of", "nc3_duality_of", "nc3_duality_etf"):
        assert r[key] < 1e-13, key
    # the weights are uncentred: an OF is not an ETF, and W is not aligned with M̃
    assert r["nc2w_etf"] == pytest.approx(ETF_OF_DISTANCE(K), abs=1e-13)
    assert r["nc3_etf"] > 0.1


def test_collapsed_float32_gives_exact_zero_and_never_negative():
    H, y, W = collapsed_configuration(5, 12, 30, geometry="etf", scale=3.7, seed=2, dtype=torch.float32)
    assert H.dtype == torch.float32
    r = measure(H, y, W)
    assert r["nc1"] == 0.0 and r["nc1_trace"] == 0.0
    for noise in (1e-12, 1e-8, 1e-3):
        Hn, yn, _ = collapsed_configuration(5, 12, 30, noise=noise, seed=3, dtype=torch.float32)
        v = M.nc1(Hn, yn)
        assert v >= 0.0


def test_nc1_tiny_at_near_collapse_is_accurate():
    """Far below the d x d pinv's default cut-off, NC1 still matches the exact value."""
    K, d, n, s = 4, 20, 50, 1e-12
    H, y, W = collapsed_configuration(K, d, n, geometry="of", seed=0)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(H.shape) * s
    noise -= np.stack([noise[y.numpy() == k].mean(0) for k in range(K)])[y.numpy()]  # keep the means
    r = M.nc1(H.numpy() + noise, y)
    ref = reference_metrics(H.numpy() + noise, y.numpy())["nc1"]
    assert r == pytest.approx(ref, rel=1e-6)
    assert 1e-26 < r < 1e-22


@pytest.mark.parametrize("seed", range(4))
def test_random_features_match_plain_reference(seed):
    rng = np.random.default_rng(seed)
    K, d = rng.integers(2, 8), rng.integers(3, 30)
    counts = rng.integers(2, 20, size=K)
    y = rng.permutation(np.repeat(np.arange(K), counts))
    H = rng.standard_normal((len(y), d)) + rng.standard_normal((K, d))[y]
    W, b = rng.standard_normal((K, d)), rng.standard_normal(K)
    ours, ref = measure(H, y, W, b), reference_metrics(H, y, W, b)
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-15), k


def test_imbalanced_means_use_mean_of_class_means():
    H = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    y = np.array([0, 0, 0, 1])
    # μ_G = (0 + 2)/2 = 1, not the sample mean 0.5: Tr Σ_B = ((1)² + (1)²)/2 = 1
    assert M.nc1_trace(H + np.array([0, 1.0]) * y[:, None], y) == 0.0
    r = measure(np.array([[0.0], [0.2], [-0.2], [2.0]]), y, num_classes=2)
    assert r["nc1_trace"] == pytest.approx((0.08 / 4) / 1.0)


def test_invariances():
    rng = np.random.default_rng(5)
    K, d = 5, 16
    y = np.repeat(np.arange(K), 7)
    H = rng.standard_normal((len(y), d)) + 2 * rng.standard_normal((K, d))[y]
    W, b = rng.standard_normal((K, d)), 0.1 * rng.standard_normal(K)
    base = measure(H, y, W, b)
    perm = rng.permutation(len(y))
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    for name, args in {
        "permutation": (H[perm], y[perm], W, b),
        "rotation": (H @ Q, y, W @ Q, b),
        "scaling": (3.5 * H, y, 0.2 * W, b),
    }.items():
        # scaling H by a and W by b scales logits by ab: argmax unchanged only with b scaled too
        if name == "scaling":
            args = (3.5 * H, y, 0.2 * W, 0.7 * b)
        got = measure(*args)
        for k in base:
            assert got[k] == pytest.approx(base[k], rel=1e-9, abs=1e-12), (name, k)


def test_torch_and_numpy_inputs_agree_and_return_floats():
    H, y, W = collapsed_configuration(4, 8, 10, noise=0.3, seed=9)
    a = measure(H, y, W)
    b = measure(H.numpy(), y.numpy(), W.numpy())
    assert a == b
    assert all(type(v) is float for v in a.values())


def test_presets():
    H, y, W = collapsed_configuration(4, 8, 10, noise=0.1, seed=4)
    base = measure(H, y, W)
    pap = measure(H, y, W, preset="papyan2020")
    assert pap["nc1"] == pytest.approx(4 * base["nc1"], rel=1e-14)
    assert pap["nc3"] == pytest.approx(base["nc3_etf"] ** 2, rel=1e-14)
    assert pap["equinorm_weights"] < 1e-14 and pap["maxangle_weights"] < 1e-14
    zhu = measure(H, y, W, preset="zhu2021")
    assert zhu == {"nc1": base["nc1"], "nc2_features": base["nc2_etf"],
                   "nc2_weights": base["nc2w_etf"], "nc3": base["nc3_duality_etf"], "nc4": base["nc4"]}
    with pytest.raises(ValueError, match="preset"):
        measure(H, y, W, preset="papyan")


def test_nc4_counts_disagreements():
    H = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    y = np.array([0, 0, 1, 1])
    W = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert M.nc4(H, y, W) == 0.0
    assert M.nc4(H, y, W, bias=np.array([0.0, 10.0])) == 0.5  # bias sends class 0 to 1


def test_degenerate_features_raise_clear_error():
    H = np.zeros((6, 3))
    y = np.array([0, 0, 1, 1, 2, 2])
    with pytest.raises(nclab.DegenerateError, match="undefined"):
        measure(H, y)


def test_batched_kernels_equal_single_problems():
    gens = [collapsed_configuration(3, 6, 5, noise=0.2, seed=s) for s in range(3)]
    H = torch.stack([g[0] for g in gens])
    W = torch.stack([g[2] for g in gens])
    y = gens[0][1]
    batched = M.collapse_metrics_t(H, y, 3, W)
    for i, (Hi, yi, Wi) in enumerate(gens):
        single = measure(Hi, yi, Wi)
        assert set(batched) <= set(single)
        for k in batched:
            v = single[k]
            assert float(batched[k][i]) == pytest.approx(v, rel=1e-12, abs=1e-15), k


def _plain_nc4_choices(H64, means, W, b):
    """Nearest class mean and argmax(Wh + b) per row, plainly in float64."""
    ncc = (means.square().sum(-1) - 2 * H64 @ means.mT).argmin(-1)
    logits = H64 @ W.mT + (0 if b is None else b)
    return ncc, logits.argmax(-1)


def _fast_nc4_choices(H, y, W, b):
    """The same two choices from the within-class pass's fast NC4 rule."""
    H, y = torch.as_tensor(H), torch.as_tensor(y)
    K = int(y.max()) + 1
    means, _ = M.class_means_t(H, y, K)
    U, _ = M.between_class_basis_t(M.centre(means))
    rule = M._NC4Rule.for_inputs(H, means, U, W, b)
    assert rule.fast
    H64 = H.double()
    D = H64 - means[y]
    chunk = M._Chunk(H, H64, y, D.norm(dim=-1), D @ U)
    return (rule._nearest_mean(chunk), rule._classifier(chunk)), means, rule


def _nc4_case(name, rng):
    K, d, n = 8, 24, 150
    y = np.repeat(np.arange(K), n)
    mu = rng.standard_normal((K, d))
    W = rng.standard_normal((K, d))
    b = 0.1 * rng.standard_normal(K)
    noise = rng.standard_normal((K * n, d))
    if name == "overlapping":  # means 1e-3 apart inside unit noise, near-tied logits
        H, W, b = 1e-3 * mu[y] + noise, W[:1] + 1e-6 * W, 1e-6 * b
    elif name == "rank-deficient":  # K = 12 means in d = 5 dimensions
        K, d = 12, 5
        y = np.repeat(np.arange(K), n)
        H = rng.standard_normal((K, d))[y] + 0.5 * rng.standard_normal((K * n, d))
        W, b = rng.standard_normal((K, d)), 0.1 * rng.standard_normal(K)
    elif name == "dropped-direction":  # classes 0 and 1 differ in a direction the cut-off drops
        mu[1] = mu[0]
        mu[1, 0] += 1e-7
        H = mu[y] + 1e-8 * noise
    elif name == "offset":  # a common offset of 1e6
        H = 1e6 + mu[y] + 0.3 * noise
    else:
        H = mu[y] + 0.5 * noise
    return H, y, W, b


@pytest.mark.parametrize("case", ["plain", "overlapping", "rank-deficient", "dropped-direction", "offset"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fast_nc4_rule_decides_every_row_as_float64_does(case, dtype, with_bias):
    H, y, W, b = _nc4_case(case, np.random.default_rng(1))
    H = H.astype(dtype)
    W64, b64 = torch.as_tensor(W.astype(dtype)).double(), torch.as_tensor(b.astype(dtype)).double()
    b64 = b64 if with_bias else None
    (ncc, cls), means, rule = _fast_nc4_choices(H, y, W64, b64)
    want_ncc, want_cls = _plain_nc4_choices(torch.as_tensor(H).double(), means, W64, b64)
    assert torch.equal(ncc, want_ncc)
    assert torch.equal(cls, want_cls)
    assert (rule.W32 is not None) == (dtype == np.float32)
    if case == "dropped-direction":
        assert rule.e > 1e-9  # the cut-off dropped a direction, and the rule knows it



def test_fast_nc4_rule_recomputes_near_ties_in_float64():
    """The cases above do reach the float64 fallback (else they would test little)."""
    for case, rows in (("overlapping", "logits"), ("dropped-direction", "means")):
        H, y, W, b = _nc4_case(case, np.random.default_rng(1))
        _, _, rule = _fast_nc4_choices(H.astype(np.float32), y, torch.as_tensor(W), torch.as_tensor(b))
        assert rule.recomputed[rows] > 0, case


def test_fast_nc4_in_measure_equals_plain_count():
    H, y, W, b = _nc4_case("overlapping", np.random.default_rng(2))
    H32 = H.astype(np.float32)
    means, _ = M.class_means_t(torch.as_tensor(H32), torch.as_tensor(y), 8)
    want = M.nc4_t(torch.as_tensor(H32).double(), means, torch.as_tensor(W), torch.as_tensor(b))
    assert measure(H32, y, W, b)["nc4"] == float(want)


def test_float32_logits_only_under_ieee_float32_matmul():
    assert M._ieee_float32_matmul(torch.device("cpu"))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # may allow bf16 products
        assert not M._ieee_float32_matmul(torch.device("cpu"))
    finally:
        torch.set_float32_matmul_precision(before)
    assert not M._ieee_float32_matmul(torch.device("meta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_chunks_equal_one_chunk(monkeypatch, dtype):
    """Chunked passes (reused buffers, a short last chunk, batched or not) change nothing."""
    gens = [collapsed_configuration(4, 6, 25, noise=0.3, seed=s) for s in range(2)]
    H = torch.stack([g[0] for g in gens]).to(dtype)
    W, y = torch.stack([g[2] for g in gens]), gens[0][1]
    whole = [M.collapse_metrics_t(H, y, 4, W), measure(H[0], y, W[0])]
    monkeypatch.setattr(M, "CHUNK_BYTES", 8 * 6 * 2 * 7)  # 7 rows per chunk, 100 rows
    assert len(M._row_chunks(H.shape)) == 15
    chunked = [M.collapse_metrics_t(H, y, 4, W), measure(H[0], y, W[0])]
    for k, v in whole[0].items():
        assert torch.allclose(chunked[0][k], v, rtol=1e-12, atol=1e-15), k
    assert chunked[1] == pytest.approx(whole[1], rel=1e-12, abs=1e-15)


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 5), st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**32 - 1),
       st.sampled_from([np.float32, np.float64]), st.booleans())
def test_fast_nc4_rule_on_integer_data_full_of_ties(K, d, n, seed, dtype, with_bias):
    """Small integer data makes exact ties common. Where float64 can tell the two best
    classes apart, the fast rule agrees with it row by row; at a tie it picks one of the
    tied classes (which one is up to rounding, for the plain float64 rule as well)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(K), n)
    H = rng.integers(-2, 3, (K * n, d)).astype(dtype)
    W = torch.as_tensor(rng.integers(-2, 3, (K, d))).double()
    b = torch.as_tensor(rng.integers(-1, 2, K)).double() if with_bias else None
    means, _ = M.class_means_t(torch.as_tensor(H), torch.as_tensor(y), K)
    if float(M.centre(means).abs().max()) == 0:
        return  # all means equal: measure raises DegenerateError (tested elsewhere)
    (ncc, cls), means, _ = _fast_nc4_choices(H, y, W, b)
    H64 = torch.as_tensor(H).double()
    for choice, scores in ((ncc, -((H64[:, None, :] - means) ** 2).sum(-1)),
                           (cls, H64 @ W.mT + (0 if b is None else b))):
        top = scores.topk(2, dim=-1).values
        clear = top[:, 0] - top[:, 1] > 1e-9 * (1 + top.abs().max())
        assert torch.equal(choice[clear], scores.argmax(-1)[clear])
        picked = scores.gather(1, choice[:, None])[:, 0]
        assert torch.all(picked >= top[:, 0] - 1e-9 * (1 + top.abs().max()))  # a best class


# ----------------------------------------------------------------- extreme magnitudes
def _scaled_problem(seed=11, K=5, d=16):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(K), 7)
    H = rng.standard_normal((len(y), d)) + 2 * rng.standard_normal((K, d))[y]
    return H, y, rng.standard_normal((K, d)), 0.3 * rng.standard_normal(K)


SCALES = [1e200, 1e-300, 1e300, 1e-200, 2.0**70, 2.0**-70, 1e-310]


@pytest.mark.parametrize("scale, w_scale", [(a, 1.0) for a in SCALES] + [
    (1e200, 1e-250), (1e-300, 1e250), (1e-300, 1e-5), (1.0, 1e250), (1.0, 1e-250), (1e100, 1e100)])
def test_extreme_feature_and_weight_magnitudes_give_the_unscaled_metrics(scale, w_scale):
    """Every metric is invariant to h -> a h, W -> c W, b -> a c b: powers of two rescale
    the extreme inputs (eigh would not converge at 1e200, squares underflow at 1e-300)."""
    H, y, W, b = _scaled_problem()
    base = measure(H, y, W, b)
    got = measure(H * scale, y, W * w_scale, b * scale * w_scale)
    rel = 1e-7 if scale < 2.2e-308 else 1e-12  # subnormal inputs keep only ~10 digits
    for k in base:
        assert got[k] == pytest.approx(base[k], rel=rel), k
    assert measure(H * scale, y, preset="zhu2021", rtol=1e-8)["nc1"] == pytest.approx(base["nc1"], rel=rel)


@pytest.mark.parametrize("scale", [1e200, 1e-300])
def test_extreme_magnitudes_in_the_other_public_functions(scale):
    H, y, W, _ = _scaled_problem()
    assert M.nc2(H * scale, y) == pytest.approx(M.nc2(H, y), rel=1e-12)
    assert M.nc2(H * scale, y, frame="of") == pytest.approx(M.nc2(H, y, frame="of"), rel=1e-12)
    assert M.nc2_weights(W * scale) == pytest.approx(M.nc2_weights(W), rel=1e-12)
    means = M.class_means(H * scale, y)
    assert torch.allclose(means / scale, M.class_means(H, y), rtol=1e-12, atol=0)


def test_class_means_whose_sums_overflow():
    """Sums of 1e307s overflow float64; the means are summed at a smaller power of two."""
    H = np.array([[1.5e307, -1e307], [1.7e307, 1e307], [-1e307, 0.0], [-1.2e307, 1.0]])
    y = np.array([0, 0, 1, 1])
    got = M.class_means(H, y).numpy()
    np.testing.assert_allclose(got / 1e307, [[1.6, 0.0], [-1.1, 0.5e-307]], rtol=1e-15)
    assert measure(H, y)["nc1_trace"] == pytest.approx(measure(H / 1e307, y)["nc1_trace"], rel=1e-12)


def test_ordinary_magnitudes_are_not_copied_or_rescaled():
    H = torch.randn(20, 3, dtype=torch.float64)
    W = torch.randn(4, 3, dtype=torch.float64)
    assert M.power_of_two_exponent(float(H.abs().max())) == 0
    H2, W2, b2 = M.rescaled(H, W, None)
    assert H2 is H and W2 is W and b2 is None
    assert M.power_of_two_exponent(3e200) == math.frexp(3e200)[1]
    tiny = torch.tensor([1e-310], dtype=torch.float64)  # subnormal: 2^1100 alone is not a float64
    assert M.times_power_of_two(tiny, 1100).item() == math.ldexp(1e-310, 1100)


def test_bias_that_overflows_once_rescaled_is_named():
    H, y, W, b = _scaled_problem()
    with pytest.raises(ValueError, match="^bias: .*scale weights and bias together"):
        measure(H * 1e-300, y, W, b * 1e10)


def test_chunks_are_sized_for_k_wide_products():
    """With K > d the per-chunk (rows, K) products set the chunk size, not the rows."""
    assert len(M._row_chunks((100_000, 4))) == 1
    assert len(M._row_chunks((100_000, 4), width=50_000)) == 100_000 // (M.CHUNK_BYTES // (8 * 50_000))


def test_cdnv_kernel_equals_pairwise_differences():
    rng = np.random.default_rng(3)
    means = torch.as_tensor(rng.standard_normal((2, 7, 5)) + 1e6)  # a large common offset
    var = torch.as_tensor(rng.random((2, 7)))
    i, j = np.triu_indices(7, 1)
    dist2 = ((means[:, i] - means[:, j]) ** 2).sum(-1)
    want = ((var[:, i] + var[:, j]) / (2 * dist2)).mean(-1)
    torch.testing.assert_close(M.cdnv_t(var, means), want, rtol=1e-14, atol=0)
