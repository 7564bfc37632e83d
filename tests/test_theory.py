"""Tests for nclab.theory: regression values (docs/theory.md §5), the scalar problem φ_m,
brute-force global minima of the actual objective, and exact constructed optima."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize, minimize_scalar

from nclab import theory as T

LAM = 0.005


# --------------------------------------------------------------------------- helpers
def targets(counts, bias=False):
    """Y (K×N, one-hot columns, class-sorted), or Y P when bias (P = I − 11ᵀ/N)."""
    counts = np.asarray(counts)
    Y = np.repeat(np.eye(len(counts)), counts, axis=1)
    if bias:
        Y = Y - Y.mean(axis=1, keepdims=True)
    return Y


def objective_and_grad(factors, Y, lams, b=None):
    """f = 1/(2N)‖A_m⋯A_1 (+ b1ᵀ) − Y‖² + Σ λ_i/2‖A_i‖² and its gradients (docs/theory.md §2):
    R = (P + b1ᵀ − Y)/N, ∇A_i = (A_m⋯A_{i+1})ᵀ R (A_{i−1}⋯A_1)ᵀ + λ_i A_i, ∇b = R 1."""
    N = Y.shape[1]
    below = [None]  # below[i] = A_i ⋯ A_1 (i factors), below[0] = identity
    P = factors[0]
    below.append(P)
    for A in factors[1:]:
        P = A @ P
        below.append(P)
    E = P - Y if b is None else P + b[:, None] - Y
    R = E / N
    f = 0.5 * np.sum(E * E) / N + sum(0.5 * lam * np.sum(A * A) for lam, A in zip(lams, factors))
    m = len(factors)
    grads, above = [None] * m, np.eye(Y.shape[0])  # above = A_m ⋯ A_{i+1}
    for i in range(m - 1, -1, -1):
        G = above.T @ R
        G = G @ below[i].T if i > 0 else G
        grads[i] = G + lams[i] * factors[i]
        above = above @ factors[i]
    gb = None if b is None else R.sum(axis=1)
    return f, grads, gb


def shapes(K, N, d, m):
    return [(d, N)] + [(d, d)] * (m - 2) + [(K, d)]


RESTARTS_M2 = ((0.1, 0), (1.0, 1), (1.0, 2), (0.5, 3))
# m >= 3: every singular direction has a local minimum at 0, so there are rank-deficient
# local minima; width 2K and several scale-1..2 starts find the global one reliably.
RESTARTS_DEEP = ((0.1, 0), (1.0, 1), (1.0, 2), (1.5, 3), (2.0, 4), (1.5, 5))


def brute_force(counts, lams, bias=False, d=None, restarts=None):
    """Minimum of the real objective over several L-BFGS-B restarts (incl. scale-1 starts)."""
    counts = np.asarray(counts)
    K, N = len(counts), int(counts.sum())
    deep = len(lams) > 2
    d = (2 * K if deep else K) if d is None else d
    restarts = (RESTARTS_DEEP if deep else RESTARTS_M2) if restarts is None else restarts
    Y = targets(counts)
    shp = shapes(K, N, d, len(lams))
    sizes = [a * b for a, b in shp]

    def unpack(x):
        out, pos = [], 0
        for (a, b), s in zip(shp, sizes):
            out.append(x[pos:pos + s].reshape(a, b))
            pos += s
        return out, (x[pos:] if bias else None)

    def fun(x):
        fac, b = unpack(x)
        f, g, gb = objective_and_grad(fac, Y, lams, b)
        flat = np.concatenate([gi.ravel() for gi in g] + ([gb] if bias else []))
        return f, flat

    best = np.inf
    for scale, seed in restarts:
        rng = np.random.default_rng(seed)
        x0 = scale * rng.standard_normal(sum(sizes) + (K if bias else 0))
        res = minimize(fun, x0, jac=True, method="L-BFGS-B",
                       options=dict(maxiter=50000, maxfun=100000, ftol=1e-16, gtol=1e-11))
        best = min(best, res.fun)
    return best


def constructed_optimum(K, n, lams, bias=False, d=None, seed=0):
    """Exact optimum from predict(): A_1 = s_1 Q_1 Vᵀ, A_i = s_i Q_i Q_{i−1}ᵀ,
    A_m = s_m U Q_{m−1}ᵀ, s_i = √(β/λ_i), where √n U Vᵀ is the thin SVD of Y (or Y P)."""
    p = T.predict(K, n, lams, bias=bias)
    d = K if d is None else d
    rng = np.random.default_rng(seed)
    if bias:  # orthonormal basis of 1^⊥ in R^K
        U = np.linalg.svd(np.eye(K) - 1.0 / K)[0][:, : K - 1]
    else:
        U = np.eye(K)
    r = U.shape[1]
    V = np.repeat(U, n, axis=0) / math.sqrt(n)  # (I ⊗ 1_n) U / √n
    Qs = [np.linalg.qr(rng.standard_normal((d, r)))[0] for _ in range(p.m - 1)]
    s = [math.sqrt(p.beta / lam) for lam in p.lams]
    fac = [s[0] * Qs[0] @ V.T]
    for i in range(1, p.m - 1):
        fac.append(s[i] * Qs[i] @ Qs[i - 1].T)
    fac.append(s[-1] * U @ Qs[-1].T)
    b = np.full(K, 1.0 / K) if bias else None
    return p, fac, b


def class_means(H, K, n):
    return H.reshape(H.shape[0], K, n).mean(axis=2)


# --------------------------------------------------------------------------- regression (§5)
def test_regression_plain_ufm():
    lams = (LAM, LAM)
    assert T.c_value(4, 50, LAM, LAM) == pytest.approx(0.14142136, abs=5e-9)
    assert T.c_m(4, 50, lams) == pytest.approx(0.14142136, abs=5e-9)
    assert T.f_star(4, 50, lams) == pytest.approx(0.13142136, abs=5e-9)
    assert T.f_star(4, 50, lams, bias=True) == pytest.approx(0.09856602, abs=5e-9)


def test_regression_extended_ufm():
    lams = (LAM, LAM, LAM)
    c3 = T.c_m(4, 50, lams)
    assert c3 == pytest.approx(0.07368063, abs=5e-9)
    assert T.t_star(3, c3) == pytest.approx(0.92436213, abs=5e-9)
    assert T.f_star(4, 50, lams) == pytest.approx(0.10773572, abs=5e-9)
    assert 16 * 4**3 * 50 * LAM**3 < 1  # docs/theory.md §3.3: non-zero iff 16 K³ n Λ < 1
    assert not T.predict(4, 50, lams).collapsed_to_zero


def test_c_crit_values():
    assert T.c_crit(2) == 1.0
    assert T.c_crit(3) == pytest.approx(2 ** (-4 / 3), rel=1e-15)
    assert T.c_crit(3) == pytest.approx(0.396850, abs=5e-7)
    assert T.c_crit(4) == pytest.approx(0.272166, abs=5e-7)
    assert T.c_crit(5) == pytest.approx(0.210367, abs=5e-7)


def test_extended_threshold_matches_16K3nLam():
    # c_3 < c_crit(3)  <=>  K³ n Λ < c_crit(3)³ = 1/16
    assert T.c_crit(3) ** 3 == pytest.approx(1 / 16, rel=1e-14)


# --------------------------------------------------------------------------- scalar problem
def test_t_star_m2_continuous():
    cs = np.linspace(0, 2, 2001)
    ts = np.array([T.t_star(2, c) for c in cs])
    np.testing.assert_allclose(ts, np.maximum(1 - cs, 0), atol=0, rtol=0)
    assert np.max(np.abs(np.diff(ts))) <= 1e-3 + 1e-12
    assert T.t_star(2, 1.0) == 0.0


@pytest.mark.parametrize("m", [3, 4, 5])
def test_jump_at_c_crit(m):
    cc = T.c_crit(m)
    t_jump = (m - 2) / (m - 1)
    # at c_crit, t = (m-2)/(m-1) is a stationary point with φ = ½ = φ(0)
    assert T.phi(m, cc, t_jump) == pytest.approx(0.5, abs=1e-15)
    assert t_jump - 1 + cc * t_jump ** ((2 - m) / m) == pytest.approx(0.0, abs=1e-15)
    below = T.t_star(m, cc * (1 - 1e-9))
    assert below == pytest.approx(t_jump, abs=1e-4)
    assert T.phi(m, cc * (1 - 1e-9), below) < 0.5
    assert T.t_star(m, cc) == 0.0
    assert T.t_star(m, cc * (1 + 1e-9)) == 0.0
    # the switch is where min over (0,1] of φ crosses ½: bisect it numerically
    def interior_min(c):
        return minimize_scalar(lambda t: T.phi(m, c, t), bounds=(t_jump * 0.5, 1.0),
                               method="bounded", options=dict(xatol=1e-12)).fun
    lo, hi = cc * 0.9, cc * 1.1
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if interior_min(mid) < 0.5 else (lo, mid)
    assert lo == pytest.approx(cc, rel=1e-6)


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_t_star_is_global_min_on_grid(m):
    rng = np.random.default_rng(m)
    grid = np.linspace(0, 1, 20001)
    for c in np.concatenate([rng.uniform(0, 1.5 * T.c_crit(m), 25), [0.0, T.c_crit(m)]]):
        t = T.t_star(m, c)
        assert 0 <= t <= 1
        assert T.phi(m, c, t) <= np.min(T.phi(m, c, grid)) + 1e-13
        if 0 < t < 1:  # stationary: t − 1 + c t^{(2−m)/m} = 0
            assert t - 1 + c * t ** ((2 - m) / m) == pytest.approx(0, abs=1e-13)


def test_t_star_c_zero():
    for m in (2, 3, 4):
        assert T.t_star(m, 0.0) == 1.0


@pytest.mark.parametrize("m", [2, 3, 4])
def test_scalar_shrinkage_brute_force(m):
    N, Lam = 12.0, 1e-4
    sig = np.array([0.0, 0.05, 0.3, 1.0, 2.0, 3.5])
    s, val = T.scalar_shrinkage(sig, N, Lam, m)
    assert s.shape == val.shape == sig.shape
    grid = np.linspace(0, 4, 400001)
    for sg, si, vi in zip(sig, s, val):
        g = (sg - grid) ** 2 / (2 * N) + 0.5 * m * Lam ** (1 / m) * grid ** (2 / m)
        assert vi <= g.min() + 1e-12
        assert vi == pytest.approx((sg - si) ** 2 / (2 * N) + 0.5 * m * Lam ** (1 / m) * si ** (2 / m),
                                   abs=1e-15)
    if m == 2:  # soft-thresholding at N√Λ
        np.testing.assert_allclose(s, np.maximum(sig - N * math.sqrt(Lam), 0), atol=1e-15)
    s0, v0 = T.scalar_shrinkage(2.0, N, Lam, m)
    assert isinstance(s0, float) and s0 == s[4] and v0 == val[4]


# --------------------------------------------------------------------------- optimal values
@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_imbalanced_equal_counts_equals_balanced(m, bias):
    for lam in (1e-4, LAM, 0.05, 0.3):
        lams = (lam,) * (m - 1) + (2 * lam,)
        fb = T.f_star(4, 50, lams, bias=bias)
        fi = T.f_star_imbalanced([50] * 4, lams, bias=bias)
        assert fi == pytest.approx(fb, abs=1e-14)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_bias_is_K_minus_1_over_K(m):
    for lam in (1e-3, 0.05, 0.5):
        lams = (lam,) * m
        assert T.f_star(5, 7, lams, bias=True) == pytest.approx(0.8 * T.f_star(5, 7, lams), rel=1e-15)
    assert T.f_star(5, 7, (10.0,) * m, bias=True) == pytest.approx(4 / 10, rel=1e-15)


def test_f_star_m2_closed_forms():
    K, n = 3, 4
    for lH, lW in ((0.01, 0.02), (0.03, 0.09), (0.5, 0.5)):
        c = T.c_value(K, n, lH, lW)
        want = c - c * c / 2 if c <= 1 else 0.5
        assert T.f_star(K, n, (lH, lW)) == want
        assert T.f_star(K, n, (lH, lW), bias=True) == pytest.approx((K - 1) / K * want, rel=1e-15)


BRUTE_CASES = [
    # (counts, lams, bias)             plain UFM below / near / above c = 1
    ((2, 2, 2), (0.05, 0.2), False),
    ((2, 2, 2), (0.1, 0.5), False),
    ((2, 2, 2), (0.5, 0.5), False),
    ((2, 2, 2), (0.05, 0.2), True),
    ((2, 2, 2), (0.5, 0.5), True),
    # extended (m = 3): c ≈ 0.19, 0.35 (below c_crit ≈ 0.397), 0.42 (just above), 0.57
    ((2, 2, 2), (0.05, 0.05, 0.05), False),
    ((2, 2, 2), (0.1, 0.08, 0.1), False),
    ((2, 2, 2), (0.1111, 0.1111, 0.1111), False),
    ((2, 2, 2), (0.15, 0.15, 0.15), False),
    ((2, 2, 2), (0.05, 0.05, 0.05), True),
    ((2, 2, 2), (0.15, 0.15, 0.15), True),
    # imbalanced
    ((1, 2, 4), (0.05, 0.1), False),
    ((1, 2, 4), (0.02, 0.05), False),
    ((1, 2, 4), (0.05, 0.1), True),
    ((1, 2, 4), (0.02, 0.05), True),
    ((1, 2, 4), (0.04, 0.04, 0.04), False),
    ((1, 2, 4), (0.04, 0.04, 0.04), True),
]


@pytest.mark.parametrize("counts,lams,bias", BRUTE_CASES)
def test_f_star_matches_brute_force(counts, lams, bias):
    want = T.f_star_imbalanced(counts, lams, bias=bias)
    if len(set(counts)) == 1:
        assert T.f_star(len(counts), counts[0], lams, bias=bias) == pytest.approx(want, abs=1e-14)
    got = brute_force(counts, lams, bias=bias)
    assert got >= want - 1e-9  # f* is a lower bound: nothing beats it
    assert got == pytest.approx(want, abs=1e-6)


def test_brute_force_regime_labels():
    """Sanity of the cases above: the near-threshold m = 3 case is just above c_crit."""
    assert T.c_m(3, 2, (0.1, 0.08, 0.1)) < T.c_crit(3) < T.c_m(3, 2, (0.1111,) * 3) < 0.43
    assert T.f_star(3, 2, (0.1111,) * 3) == 0.5


def test_wider_features_same_value():
    got = brute_force((2, 2, 2), (0.05, 0.2), d=5, restarts=((0.5, 0), (1.0, 1)))
    assert got == pytest.approx(T.f_star(3, 2, (0.05, 0.2)), abs=1e-6)


# --------------------------------------------------------------------------- structure
@pytest.mark.parametrize("K,n,lH,lW", [(4, 50, LAM, LAM), (3, 5, 0.01, 0.04), (5, 3, 0.02, 0.005)])
def test_plain_ufm_constructed_optimum(K, n, lH, lW):
    p = T.predict(K, n, (lH, lW))
    c = p.c
    assert p.rho == pytest.approx((1 - c) * math.sqrt(lW / (n * lH)), rel=1e-15)
    d = K + 2
    Q = np.linalg.qr(np.random.default_rng(1).standard_normal((d, K)))[0]
    M = math.sqrt(p.rho) * Q
    W = math.sqrt(n * lH / lW) * M.T
    Y = targets([n] * K)
    H = M @ Y
    f, (gH, gW), _ = objective_and_grad([H, W], Y, (lH, lW))
    assert f == pytest.approx(p.f_star, abs=1e-14)
    assert max(np.abs(gH).max(), np.abs(gW).max()) < 1e-14
    assert lW * np.sum(W * W) == pytest.approx(c * (1 - c), abs=1e-14)
    assert lH * np.sum(H * H) == pytest.approx(c * (1 - c), abs=1e-14)
    np.testing.assert_allclose(p.factor_sq_norms, (np.sum(H * H), np.sum(W * W)), rtol=1e-13)
    assert p.lam_sq_norm == pytest.approx(c * (1 - c), rel=1e-13)
    np.testing.assert_allclose(M.T @ M, T.predicted_gram(K, n, (lH, lW)), atol=1e-15)
    np.testing.assert_allclose(W @ M, p.t_star * np.eye(K), atol=1e-14)
    assert p.w_coeff == pytest.approx(math.sqrt(n * lH / lW), rel=1e-14)
    assert p.mean_sq_norms[0] == pytest.approx(p.rho, rel=1e-14)


@pytest.mark.parametrize("K,n,lH,lW", [(4, 50, LAM, LAM), (3, 5, 0.01, 0.04)])
def test_plain_ufm_bias_constructed_optimum(K, n, lH, lW):
    p = T.predict(K, n, (lH, lW), bias=True)
    c = p.c
    Ek = np.eye(K) - 1.0 / K
    Q = np.linalg.qr(np.random.default_rng(2).standard_normal((K + 1, K)))[0]
    M = math.sqrt(p.rho) * Q @ Ek
    W = math.sqrt(n * lH / lW) * M.T
    b = np.full(K, 1.0 / K)
    Y = targets([n] * K)
    H = M @ Y
    f, (gH, gW), gb = objective_and_grad([H, W], Y, (lH, lW), b)
    assert f == pytest.approx(p.f_star, abs=1e-14)
    assert max(np.abs(gH).max(), np.abs(gW).max(), np.abs(gb).max()) < 1e-14
    np.testing.assert_allclose(M.T @ M, (1 - c) * math.sqrt(lW / (n * lH)) * Ek, atol=1e-15)
    np.testing.assert_allclose(M.T @ M, T.predicted_gram(K, n, (lH, lW), bias=True), atol=1e-15)
    assert np.sum(W * W) == pytest.approx((K - 1) * (1 - c) * math.sqrt(n * lH / lW), rel=1e-13)
    assert p.factor_sq_norms[1] == pytest.approx(np.sum(W * W), rel=1e-13)
    assert p.b_star == tuple([1.0 / K] * K)


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_deep_constructed_optimum(m, bias):
    K, n = 4, 6
    lams = tuple(0.004 * (1 + 0.5 * i) for i in range(m))
    p, fac, b = constructed_optimum(K, n, lams, bias=bias, d=K + 1)
    assert not p.collapsed_to_zero
    Y = targets([n] * K)
    f, grads, gb = objective_and_grad(fac, Y, lams, b)
    assert f == pytest.approx(p.f_star, abs=1e-14)
    gmax = max(np.abs(g).max() for g in grads)
    assert gmax < 1e-13 and (gb is None or np.abs(gb).max() < 1e-14)
    np.testing.assert_allclose([np.sum(A * A) for A in fac], p.factor_sq_norms, rtol=1e-13)
    H = fac[0]
    for level in range(1, m):
        M = class_means(H, K, n)
        np.testing.assert_allclose(H, np.repeat(M, n, axis=1), atol=1e-14)  # NC1
        G = T.predicted_gram(K, n, lams, bias=bias, level=level)
        np.testing.assert_allclose(M.T @ M, G, atol=1e-14)
        np.testing.assert_allclose(np.diag(M.T @ M), p.mean_sq_norms[level - 1], rtol=1e-13)
        if level < m - 1:
            H = fac[level] @ H
    W = fac[-1]
    E = np.eye(K) - 1.0 / K if bias else np.eye(K)
    np.testing.assert_allclose(W, p.w_coeff * M.T, atol=1e-13)
    M1 = class_means(fac[0], K, n)
    prod = M1
    for A in fac[1:]:
        prod = A @ prod
    np.testing.assert_allclose(prod, p.end_to_end * E, atol=1e-14)


def test_predict_above_threshold_is_zero():
    for lams, bias in (((0.5, 0.5), False), ((0.5, 0.5), True), ((0.2,) * 3, False)):
        p = T.predict(3, 2, lams, bias=bias)
        assert p.collapsed_to_zero and p.t_star == 0 and p.beta == 0
        assert all(v == 0 for v in p.factor_sq_norms + p.mean_sq_norms)
        assert p.f_star == (0.5 if not bias else 1 / 3)
        assert not T.predicted_gram(3, 2, lams, bias=bias).any()


def test_format_report():
    txt = T.format_report(4, 50, (LAM,) * 3)
    for s in ("m = 3", "H1 first", "λ_H1 = 0.005", "c_crit = 0.39685026", "t* = 0.92436213",
              "f* = 0.10773572", "orthogonal frame", "non-zero"):
        assert s in txt
    txt = T.format_report(4, 50, (LAM, LAM), bias=True)
    assert "simplex ETF" in txt and "0.09856602" in txt and "w_k = √(nλ_H/λ_W) μ_k" in txt
    assert "ZERO" in T.format_report(3, 2, (0.5, 0.5))


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("call,name", [
    (lambda: T.f_star(1, 50, (LAM, LAM)), "K"),
    (lambda: T.f_star(2.5, 50, (LAM, LAM)), "K"),
    (lambda: T.f_star(4, 0, (LAM, LAM)), "n"),
    (lambda: T.f_star(4, 2.5, (LAM, LAM)), "n"),
    (lambda: T.f_star(4, 50, (LAM, 0.0)), "lams[1]"),
    (lambda: T.f_star(4, 50, (-1.0, LAM)), "lams[0]"),
    (lambda: T.f_star(4, 50, (LAM,)), "lams"),
    (lambda: T.c_value(4, 50, 0.0, LAM), "lam_H"),
    (lambda: T.c_crit(1), "m"),
    (lambda: T.t_star(3, -0.1), "c"),
    (lambda: T.t_star(1, 0.1), "m"),
    (lambda: T.f_star_imbalanced([0, 3], (LAM, LAM)), "class_counts"),
    (lambda: T.f_star_imbalanced([1.5, 3], (LAM, LAM)), "class_counts"),
    (lambda: T.f_star_imbalanced([4], (LAM, LAM)), "class_counts"),
    (lambda: T.scalar_shrinkage([-1.0], 10, 1e-4, 2), "sigma"),
    (lambda: T.scalar_shrinkage([1.0], 10, 0.0, 2), "Lam"),
    (lambda: T.predicted_gram(4, 50, (LAM, LAM), level=2), "level"),
    (lambda: T.check_width(3, 4), "d"),
])
def test_bad_inputs(call, name):
    with pytest.raises(ValueError) as exc:
        call()
    assert str(exc.value).startswith(name + ":")


def test_zero_lambda_message_explains():
    with pytest.raises(ValueError, match="lams\\[1\\]: must be > 0.*undefined"):
        T.f_star(4, 50, (LAM, 0))


def test_check_width():
    with pytest.raises(ValueError, match=r"^d: Theorem 3.1 needs d >= K \(got d=3, K=4\)"):
        T.check_width(3, 4)
    T.check_width(4, 4)
    T.check_width(3, 4, bias=True)
    with pytest.raises(ValueError, match="Theorem 3.2 needs d >= K-1"):
        T.check_width(2, 4, bias=True)


# --------------------------------------------------------------------------- extreme λs
def _reference(K, n, lams, bias=False):
    """c, t*, f*, β, ‖A_i‖², g_l, κ, ρ in 40-digit decimal arithmetic (no over/underflow)."""
    import decimal
    from decimal import Decimal as D

    ctx = decimal.Context(prec=40, Emax=10**6, Emin=-10**6)
    with decimal.localcontext(ctx):
        m, lam = len(lams), [D(x) for x in lams]

        def root(x, k):
            return (x.ln() / k).exp()

        Lam = D(1)
        for x in lam:
            Lam *= x
        c = D(K) * root(D(n) * Lam, m)
        cc = D(1) if m == 2 else root(D(m - 2), D(m) / (m - 2)) / root(D(m - 1), D(m) / (2 * m - 2))
        if m == 2:
            t = max(1 - c, D(0))
        elif c >= cc:
            t = D(0)
        else:  # h(t) = t − 1 + c t^p is convex and increasing near its largest root: Newton from 1
            p, t = D(2 - m) / m, D(1)
            for _ in range(200):
                t -= (t - 1 + c * (p * t.ln()).exp()) / (1 + c * p * ((p - 1) * t.ln()).exp())
        phi = D("0.5") if t == 0 else (t - 1) ** 2 / 2 + D(m) / 2 * c * (D(2) / m * t.ln()).exp()
        f = phi * (D(K - 1) / K if bias else 1)
        r = D(K - 1 if bias else K)
        beta = D(0) if t == 0 else root(D(n) * Lam, m) * (D(2) / m * t.ln()).exp()
        gram, cum = [], D(1)
        for l in range(1, m):
            cum *= lam[l - 1]
            gram.append(beta ** l / (D(n) * cum))
        out = dict(c=c, t_star=t, f_star=f, beta=beta, factor_sq_norms=[r * beta / x for x in lam],
                   gram_scale=gram, w_coeff=None if t == 0 else t / gram[-1],
                   rho=max(1 - c, D(0)) * (lam[1] / (D(n) * lam[0])).sqrt() if m == 2 else None)
    return out


EXTREME_LAMS = [
    (1e-300, 1e-300), (1e300, 1e-305), (1e-305, 1e300), (2.3e-308, 1e-3), (1e-300, 1e-300, 1e-300),
    (1e300, 1e-300, 1e-306), (1e-300,) * 4, (1e150, 1e-300, 1e-300, 1e-300), (1e300, 1e300),
    (1e300, 1e-300, 1e-30), (1.7e308, 2.3e-308),
]


@pytest.mark.parametrize("lams", EXTREME_LAMS)
@pytest.mark.parametrize("bias", [False, True])
def test_extreme_lambdas_match_a_40_digit_reference(lams, bias):
    K, n = 4, 50
    ref, p = _reference(K, n, lams, bias), T.predict(K, n, lams, bias=bias)
    assert T.c_m(K, n, lams) == p.c
    assert T.f_star(K, n, lams, bias=bias) == p.f_star
    for key in ("c", "t_star", "f_star", "beta"):
        assert getattr(p, key) == pytest.approx(float(ref[key]), rel=1e-12, abs=0), key
    for key in ("factor_sq_norms", "gram_scale"):
        np.testing.assert_allclose(getattr(p, key), [float(x) for x in ref[key]], rtol=1e-12, atol=0)
    for key in ("w_coeff", "rho"):
        want = ref[key]
        assert getattr(p, key) == (None if want is None else pytest.approx(float(want), rel=1e-12, abs=0)), key
    assert T.f_star_imbalanced([n] * K, lams, bias=bias) == pytest.approx(p.f_star, rel=1e-12)
    txt = T.format_report(K, n, lams, bias=bias)
    assert "inf" not in txt and "nan" not in txt
    assert f"= {T._fixed(p.c)} " in txt and float(T._fixed(p.c)) == pytest.approx(p.c, rel=1e-8, abs=5e-9)  # not 0.0


@pytest.mark.parametrize("scale", [1e-290, 1e-100, 1e100, 1e290])
def test_f_star_depends_on_the_product_of_lambdas_only(scale):
    """c = K(nΛ)^{1/m}: moving a factor between λs changes neither c nor f*; ρ scales by 1/a."""
    lams = (0.005, 0.02)
    moved = (0.005 * scale, 0.02 / scale)
    assert T.c_m(4, 50, moved) == pytest.approx(T.c_m(4, 50, lams), rel=1e-15)
    assert T.f_star(4, 50, moved) == pytest.approx(T.f_star(4, 50, lams), rel=1e-15)
    assert T.predict(4, 50, moved).rho == pytest.approx(T.predict(4, 50, lams).rho / scale, rel=1e-15)
    deep = (0.005 * scale, 0.02 / scale, 0.01)
    assert T.f_star(4, 50, deep) == pytest.approx(T.f_star(4, 50, (0.005, 0.02, 0.01)), rel=1e-14)


def test_c_beyond_float64_is_an_error_but_f_star_answers():
    lams = (1e308, 1e308)
    with pytest.raises(ValueError, match=r"^lams: c_2 = .* ≈ 1e\d+ is beyond float64.*zero solution"):
        T.c_m(10**6, 10**6, lams)
    with pytest.raises(ValueError, match="^lams: c_2"):
        T.predict(10**6, 10**6, lams)
    with pytest.raises(ValueError, match="^lam_H: c = "):
        T.c_value(10**6, 10**6, *lams)
    assert T.f_star(10**6, 10**6, lams) == 0.5
    assert T.f_star(10**6, 10**6, lams, bias=True) == pytest.approx((10**6 - 1) / (2 * 10**6), rel=1e-15)


@pytest.mark.parametrize("argv, match", [
    (["--lam", "1e-320", "1"], r"^nclab theory: error: lams\[0\]: 1e-320 is subnormal"),
    (["--lam", "1", "0"], r"^nclab theory: error: lams\[1\]: must be > 0"),
    (["--lam", "1e308", "1e308", "--K", "1000000", "--n", "1000000"], r"^nclab theory: error: lams: c_2"),
])
def test_cli_theory_bad_lambdas_are_one_line_errors(argv, match, capsys):
    from nclab import cli

    if "--K" not in argv:
        argv = argv + ["--K", "4", "--n", "50"]
    assert cli.main(["theory", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.match(match, err)


@pytest.mark.parametrize("lam", ["1e-300 1e-300", "1e-320 1e-320", "1e300 1e300", "1e-300 1e-300 1e-300",
                                 "1e300 1e-300", "1e-308 1e308"])
def test_cli_theory_never_prints_inf_or_raises(lam, capsys):
    from nclab import cli

    rc = cli.main(["theory", "--K", "4", "--n", "50", "--lam", *lam.split()])
    out, err = capsys.readouterr()
    assert rc in (0, 2) and "inf" not in out and "nan" not in out
    assert (rc == 0) == (not err) and len(err.splitlines()) <= 1


@pytest.mark.parametrize("call, name", [
    (lambda: T.f_star(4, 50, (1e-320, LAM)), "lams[0]"),
    (lambda: T.f_star(4, 50, (LAM, 5e-324)), "lams[1]"),
    (lambda: T.f_star(4, 50, (10**400, LAM)), "lams[0]"),
    (lambda: T.f_star(4, 10**400, (LAM, LAM)), "n"),
    (lambda: T.f_star(4, 2**53 + 2, (LAM, LAM)), "n"),
    (lambda: T.f_star(10**400, 50, (LAM, LAM)), "K"),
    (lambda: T.f_star(True, 50, (LAM, LAM)), "K"),
    (lambda: T.c_value(4, 50, 1e-320, LAM), "lam_H"),
    (lambda: T.c_crit(10**400), "m"),
    (lambda: T.t_star(3, 10**400), "c"),
    (lambda: T.t_star(3, math.inf), "c"),
    (lambda: T.phi(3, 0.1, -1.0), "t"),
    (lambda: T.phi(3, 0.1, [0.5, math.nan]), "t"),
    (lambda: T.phi(2, 1e308, 1e10), "t"),
    (lambda: T.scalar_shrinkage([1.0], 0, 1e-4, 2), "N"),
    (lambda: T.scalar_shrinkage([1.0], 1e-320, 1e-4, 2), "N"),
    (lambda: T.scalar_shrinkage([1.0], 10, 1e-320, 2), "Lam"),
    (lambda: T.scalar_shrinkage(["a"], 10, 1e-4, 2), "sigma"),
    (lambda: T.scalar_shrinkage([1e300], 1e-300, 1e300, 2), "sigma"),
    (lambda: T.f_star_imbalanced([2**54, 3], (LAM, LAM)), "class_counts"),
    (lambda: T.predicted_gram(10**8, 50, (1e-30, 1e-30)), "K"),
    (lambda: T.predict(2**52, 1, (1e-300, 1e-300), bias=True), "K"),
])
def test_bad_or_unrepresentable_inputs(call, name):
    with pytest.raises(ValueError) as exc:
        call()
    assert str(exc.value).startswith(name + ":") and len(str(exc.value).splitlines()) == 1


def test_tiny_and_huge_scalar_arguments_are_answered():
    assert T.t_star(3, 5e-324) == 1.0  # brentq's bracket would underflow; t* = 1 − c
    assert T.t_star(3, 1e-30) == 1.0 and T.t_star(4, 1e300) == 0.0
    sigma, N, Lam = 1e200, 10.0, 1e-4  # c = N√Λ/σ: soft thresholding, value σ√Λ − NΛ/2
    s, val = T.scalar_shrinkage(sigma, N, Lam, 2)
    assert s == pytest.approx(sigma - N * math.sqrt(Lam), rel=1e-15)
    assert val == pytest.approx(sigma * math.sqrt(Lam) - N * Lam / 2, rel=1e-14)
    s, val = T.scalar_shrinkage(5e-324, N, Lam, 3)  # c overflows: t* = 0
    assert s == 0.0 and val == 0.0
    s, val = T.scalar_shrinkage(1e300, 1e-300, 1.0, 2)  # c = 1e-600 underflows; the value does not
    assert s == 1e300 and val == pytest.approx(1e300, rel=1e-15)
    assert T.phi(3, 0.0, 0.0) == 0.5


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-307.5, 308.2), min_size=2, max_size=5), st.integers(2, 10**6),
       st.integers(1, 10**9), st.booleans())
def test_any_normal_lambdas_give_finite_answers_or_a_named_error(log_lams, K, n, bias):
    """Whatever the λs in float64's normal range: a finite prediction, or a one-line
    ValueError naming lams (a result beyond 1.8e308); never inf, NaN or another exception."""
    lams = tuple(10.0**x for x in log_lams)
    try:
        p = T.predict(K, n, lams, bias=bias)
    except ValueError as exc:
        assert str(exc).startswith("lams: ") and "beyond float64" in str(exc)
        if str(exc).startswith("lams: c_"):  # c overflows: far above c_crit, the zero solution
            assert T.f_star(K, n, lams, bias=bias) == ((K - 1) / K * 0.5 if bias else 0.5)
        return
    values = [p.c, p.t_star, p.f_star, p.beta, p.lam_sq_norm, *p.factor_sq_norms, *p.gram_scale,
              *(v for v in (p.w_coeff, p.rho) if v is not None)]
    assert all(math.isfinite(v) and v >= 0 for v in values)
    assert 0 < p.f_star <= 0.5 and 0 <= p.t_star <= 1
    assert p.c == pytest.approx(K * math.exp((math.log(n) + sum(map(math.log, lams))) / len(lams)), rel=1e-9)


# --------------------------------------------------------------------------- imbalanced report
SIZES = [5, 20, 60, 115]


@pytest.mark.parametrize("lams", [(LAM, LAM), (LAM,) * 3, (0.05, 0.05)])
@pytest.mark.parametrize("bias", [False, True])
def test_format_report_of_class_sizes_shows_each_shrinkage(lams, bias):
    txt = T.format_report(4, SIZES, lams, bias=bias)
    m, N = len(lams), sum(SIZES)
    assert "imbalanced class sizes n_k = 5, 20, 60, 115" in txt and f"N = {N}" in txt
    assert f"f* = Σ f* terms = {T._fixed(T.f_star_imbalanced(SIZES, lams, bias=bias))}" in txt
    rows = [line.split() for line in txt.splitlines() if re.match(r"^\s+\d+\s+\S", line)]
    assert len(rows) == 4
    sig = T._target_singular_values(np.array(SIZES, float), bias)
    s, val = T.scalar_shrinkage(sig, N, float(np.prod(lams)), m)
    if bias:  # by σ, largest first; the mean direction (σ = 0) contributes nothing
        order = np.argsort(-sig, kind="stable")
        sig, s, val = sig[order], s[order], val[order]
        assert rows[-1][1:] == ["0", "—", "0.00000000", "0", "0"]
    for row, sg, sk, vk in zip(rows, sig, s, val):  # row: [k, n_k | j], σ, c, t*, s, f* term
        assert float(row[-5]) == pytest.approx(sg, rel=1e-7)
        assert float(row[-2]) == pytest.approx(sk, rel=1e-7, abs=1e-12)
        assert float(row[-1]) == pytest.approx(vk, rel=1e-7)
        if sg and not bias:
            c = N * np.prod(lams) ** (1 / m) * sg ** (2 / m - 2)  # c of this class's scalar problem
            assert float(row[-4]) == pytest.approx(c, rel=1e-7)
            assert float(row[-3]) == pytest.approx(T.t_star(m, c), abs=1e-8)
    vanished = [str(k) for k, row in enumerate(rows, 1) if float(row[-2]) == 0 and float(row[-5]) > 0]
    if len(vanished) == (3 if bias else 4):
        assert "ZERO solution" in txt
    elif vanished:
        assert f"the {'directions' if bias else 'classes'} {', '.join(vanished)} vanish" in txt
    else:
        assert "Optimum: non-zero" in txt


def test_format_report_class_sizes_equal_or_one_is_the_balanced_report():
    balanced = T.format_report(4, 50, (LAM, LAM, LAM))
    assert T.format_report(4, [50] * 4, (LAM, LAM, LAM)) == balanced
    assert T.format_report(4, [50], (LAM, LAM, LAM)) == balanced
    assert T.format_report(4, np.array([50, 50, 50, 50]), (LAM, LAM, LAM)) == balanced


@pytest.mark.parametrize("n, match", [([5, 20, 60], r"^n: give one class size for all classes or K = 4 sizes"),
                                      ([5, 0, 60, 1], r"^n: the samples per class"),
                                      ([5, 2.5, 60, 1], r"^n: the samples per class")])
def test_format_report_bad_class_sizes(n, match):
    with pytest.raises(ValueError, match=match):
        T.format_report(4, n, (LAM, LAM))


def test_cli_theory_class_sizes(capsys):
    from nclab import cli

    assert cli.main(["theory", "--K", "4", "--n", *map(str, SIZES), "--lam", str(LAM), str(LAM)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == T.format_report(4, SIZES, (LAM, LAM)) and "class  n_k" in out
    assert cli.main(["theory", "--K", "4", "--n", "50", "--lam", str(LAM), str(LAM)]) == 0  # one n broadcasts
    assert capsys.readouterr().out.strip() == T.format_report(4, 50, (LAM, LAM))
    assert cli.main(["theory", "--K", "4", "--n", "5", "20", "--lam", str(LAM), str(LAM)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("nclab theory: error: n: give one class size"), err
