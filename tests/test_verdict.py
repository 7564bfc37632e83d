"""The verdict on a UFM run: optimal, stationary at a point the theory knows, or not converged.

The default rtol (1e-4) against the paper configs' final relative gaps (measured with
their own settings): fig3 3.9e-16, fig8 9.9e-10, ufm 5.5e-14, ufm-bias 7.8e-14 (linear);
fig4 (ReLU, 1e5 it, 4 restarts) 2.1e-5, 1.3e-5, 9.9e-6 and 4.3e-2 (a worse critical
point); fig9 3.8e-5 for its best restart. The stationary point below lies 1.4e-2 above f*.
"""
import json
import math

import numpy as np
import pytest
import torch

from nclab import theory, ufm
from nclab.ufm import verdict as V

#: docs/theory.md §3.3's example: from init std 0.1 GD leaves the smallest class's direction at zero
IMBALANCED = ufm.UFM(K=4, n=(5, 20, 60, 115), dims=(20, 20), lams=(0.005, 0.005, 0.005))


def run(model, *, steps, lr=0.1, seeds=(0,), init_std=0.1, log_every=500):
    """GD through ufm.solve (the one place that knows its signature), float64, no NC metrics."""
    settings = ufm.GD(steps=steps, lr=lr, log_every=log_every, metrics=False, backend="numpy")
    return ufm.solve(model, settings, seeds=list(seeds), init_std=init_std)


def stationary_point(model, t, Q=None, seed=0):
    """λ-balanced factors of the linear bias-free model with output Z = Ẽ Q diag(s) Qᵀ,
    Ẽ = E D^{-½} (E the one-hot labels), s_k = √n_k t_k: every factor carries the singular
    values a_i = (Λ^{1/m} s^{2/m} / λ_i)^{1/2} (Π_i a_i = s). The end-to-end map is
    P = Q diag(s) Qᵀ D^{-½}, i.e. Q diag(t) Qᵀ when Q only rotates classes of equal size."""
    K, lams, m = model.K, np.asarray(model.lams), len(model.lams)
    counts = np.asarray(model.class_counts, dtype=np.float64)
    Q = np.eye(K) if Q is None else Q
    s = np.sqrt(counts) * np.asarray(t, dtype=np.float64)
    a = [np.sqrt(np.prod(lams) ** (1 / m) * s ** (2 / m) / lam) for lam in lams]
    rng = np.random.default_rng(seed)
    J = [np.linalg.qr(rng.standard_normal((d, K)))[0].T for d in model.dims]  # (K, d), orthonormal rows
    E_tilde = np.eye(K)[model.labels()] / np.sqrt(counts)
    params = {"H1": E_tilde @ Q @ np.diag(a[0]) @ J[0]}
    for l in range(1, model.L):
        params[f"W{l}"] = J[l].T @ np.diag(a[l]) @ J[l - 1]
    params[f"W{model.L}"] = Q @ np.diag(a[model.L]) @ J[model.L - 1]
    return params


def fake_result(model, params, objective_log=None):
    """A Result holding one problem at ``params`` (history: two logs of its objective)."""
    f = ufm.objective(model, params)
    f_star = ufm.optimal_objective(model)
    objective = np.array([[f], [f]]) if objective_log is None else np.asarray(objective_log)[:, None]
    return ufm.Result(model=model, lams=np.array([model.lams], dtype=np.float64), seeds=np.array([0]),
                      f_star=np.array([np.nan if f_star is None else f_star]),
                      history={"iteration": np.linspace(0, 1000, len(objective)).astype(int),
                               "objective": objective, "gap": objective - (f_star or np.nan)},
                      params={k: v[None] for k, v in params.items()}, iterations=1000, seconds=0.0)


def t_hat(model, zero=()):
    """The non-zero stationary t of every class, 0 for the classes in ``zero``."""
    m = len(model.lams)
    return [0.0 if k in zero else V.nonzero_stationary_t(m, V.scalar_c(model, model.lams, math.sqrt(n)))
            for k, n in enumerate(model.class_counts)]


# --------------------------------------------------------------------------- stationary values
@pytest.mark.parametrize("model", [
    ufm.plain(4, 50, 20, 0.005, 0.005),
    ufm.extended(4, 50, 20, 20, 0.005, 0.005, 0.005),
    ufm.extended(5, 100, 20, 20, 0.001, 0.0025, 0.005),
    ufm.UFM(3, 5, (6, 6, 6), (0.01, 0.02, 0.03, 0.04)),
    IMBALANCED,
    ufm.UFM(4, (3, 5, 8, 8), (20,), (0.005, 0.01)),
    ufm.plain(4, 50, 20, 0.005, 0.005, bias="free"),
    ufm.UFM(4, (3, 5, 8, 8), (20, 20), (0.005, 0.005, 0.005), bias="free"),
], ids=lambda model: model.describe())
def test_stationary_value_without_zeros_is_f_star(model):
    expected = theory.f_star_imbalanced(model.class_counts, model.lams, bias=model.bias == "free")
    assert V.stationary_value(model) == pytest.approx(expected, rel=1e-13)
    assert V.stationary_value(model) == pytest.approx(ufm.optimal_objective(model), rel=1e-13)


@pytest.mark.parametrize("model, zero", [
    (IMBALANCED, [0]),
    (IMBALANCED, [0, 2]),
    (ufm.UFM(4, (3, 5, 8, 8), (10,), (0.005, 0.01)), [1]),  # m = 2: a saddle, still stationary
    (ufm.UFM(3, (4, 6, 9), (5, 5, 5), (0.01, 0.02, 0.03, 0.04)), [2]),
])
def test_stationary_value_is_the_objective_at_a_constructed_stationary_point(model, zero):
    params = stationary_point(model, t_hat(model, zero))
    grad = ufm.gradients(model, params)
    assert max(np.abs(g).max() for g in grad.values()) < 1e-12  # it is a stationary point
    f_stat = V.stationary_value(model, zero)
    assert ufm.objective(model, params) == pytest.approx(f_stat, rel=1e-10)
    assert f_stat > ufm.optimal_objective(model) * (1 + 1e-6)


def test_stationary_value_of_the_example_by_hand():
    """Class 0 (n = 5) at zero contributes n/(2N) instead of (n/N) φ_3(t*; c)."""
    N, lam = 200, 0.005
    c0 = N * lam * math.sqrt(5) ** (2 / 3 - 2)  # N Λ^{1/3} σ^{2/3 − 2}, σ = √5
    t0 = theory.t_star(3, c0)
    phi0 = 0.5 * (t0 - 1) ** 2 + 1.5 * c0 * t0 ** (2 / 3)
    f_star = theory.f_star_imbalanced((5, 20, 60, 115), (lam,) * 3)
    assert V.stationary_value(IMBALANCED, [0]) == pytest.approx(f_star - 5 / N * phi0 + 5 / (2 * N), rel=1e-13)


def test_stationary_value_is_none_where_the_theory_knows_no_point():
    assert V.stationary_value(ufm.plain(4, 10, 8, 0.005, 0.01, loss="ce")) is None
    assert V.stationary_value(ufm.extended(4, 10, 8, 8, 0.005, 0.005, 0.005, relu=True)) is None
    assert V.stationary_value(ufm.plain(4, 10, 8, 0.005, 0.01, bias="reg", lam_b=0.1)) is None
    assert V.stationary_value(ufm.plain(4, 10, 8, 0.0, 0.01)) is None
    with pytest.raises(ValueError, match="zero"):
        V.stationary_value(IMBALANCED, [4])


def test_nonzero_stationary_t_is_the_local_minimum_beyond_the_threshold():
    m, c = 3, theory.c_crit(3) * 1.02
    assert theory.t_star(m, c) == 0.0
    t = V.nonzero_stationary_t(m, c)
    assert (c / 3) ** 0.75 < t < 0.5  # between argmin φ' and (m − 2)/(m − 1), its value at c_crit
    assert abs(t - 1 + c * t ** (-1 / 3)) < 1e-14  # φ' = 0
    assert theory.phi(m, c, t) < theory.phi(m, c, [t * 0.99, t * 1.01]).min()  # a minimum
    assert V.nonzero_stationary_t(m, 1.0) is None  # φ' > 0 on (0, 1]: no stationary point there
    assert V.nonzero_stationary_t(2, 0.3) == pytest.approx(0.7) and V.nonzero_stationary_t(2, 1.2) is None


# --------------------------------------------------------------------------- verdicts at constructed points
def test_constructed_point_with_class_0_at_zero_is_stationary_at_class_0():
    v = V.verdict(fake_result(IMBALANCED, stationary_point(IMBALANCED, t_hat(IMBALANCED, [0]))), 0)
    assert v["verdict"] == "stationary"
    assert [(e["class"], e["n"], e["label"]) for e in v["zero_singular_values"]] == [(0, 5, "class 0 (n=5)")]
    assert v["relative_gap"] == pytest.approx(V.stationary_value(IMBALANCED, [0]) / v["f_star"] - 1, rel=1e-8)
    assert v["misalignment"] < 1e-12 and v["last_gap"] is None and v["gap_decay"] is None
    assert V.verdict_line(v) == (f"stationary: class 0 (n=5) at zero, f = {v['objective']:.4g} "
                                 f"> f* = {v['f_star']:.4g}")


def test_constructed_optimum_is_optimal_and_zero_free():
    v = V.verdict(fake_result(IMBALANCED, stationary_point(IMBALANCED, t_hat(IMBALANCED))), 0)
    assert v["verdict"] == "optimal" and v["zero_singular_values"] == []
    assert abs(v["relative_gap"]) < 1e-12
    np.testing.assert_allclose(v["t"], v["t_star"], rtol=1e-10)
    assert V.verdict_line(v).startswith("optimal (gap ")


def test_equal_class_sizes_name_zero_directions_only_up_to_rotation():
    model = ufm.extended(4, 10, 8, 8, 0.005, 0.005, 0.005)
    Q = np.linalg.qr(np.random.default_rng(1).standard_normal((4, 4)))[0]
    t = V.nonzero_stationary_t(3, theory.c_m(4, 10, model.lams))
    params = stationary_point(model, [t, t, 0.0, 0.0], Q=Q)
    v = V.verdict(fake_result(model, params), 0)
    assert v["verdict"] == "stationary"
    assert v["stationary_value"] == pytest.approx(V.stationary_value(model, [0, 1]), rel=1e-14)
    assert [e["class"] for e in v["zero_singular_values"]] == [None, None]
    label = "1 of the 4 directions of the classes with n=10 (0, 1, 2, 3)"
    assert [e["label"] for e in v["zero_singular_values"]] == [label, label]
    assert "2 of the 4 directions of the classes with n=10 (0, 1, 2, 3) at zero" in V.verdict_line(v)
    assert V.end_to_end(fake_result(model, params)) == pytest.approx(Q @ np.diag([t, t, 0, 0]) @ Q.T, abs=1e-12)


def test_nonzero_local_minimum_above_the_threshold_is_stationary():
    lam = (theory.c_crit(3) * 1.02 / 4) / 10 ** (1 / 3)  # c_3 = 4 (10 λ³)^{1/3} = 1.02 c_crit
    model = ufm.extended(4, 10, 8, 8, lam, lam, lam)
    assert theory.predict(4, 10, model.lams).collapsed_to_zero
    v = V.verdict(fake_result(model, stationary_point(model, t_hat(model))), 0)
    assert v["verdict"] == "stationary" and v["zero_singular_values"] == []
    assert len(v["nonzero_above_threshold"]) == 4 and v["f_star"] == 0.5
    assert "4 of the 4 directions" in V.verdict_line(v) and "where t* = 0" in V.verdict_line(v)


def test_a_perturbed_point_is_neither_optimal_nor_stationary():
    params = stationary_point(IMBALANCED, t_hat(IMBALANCED, [0]))
    params["H1"] = params["H1"] * 1.01
    v = V.verdict(fake_result(IMBALANCED, params), 0)
    assert v["verdict"] == "not_converged" and v["last_gap"] > 0.014


# --------------------------------------------------------------------------- verdicts of GD runs
@pytest.fixture(scope="module")
def imbalanced_runs():
    """docs/theory.md §3.3's example, GD step 0.1: two restarts from init std 0.1, two from 0.3."""
    return run(IMBALANCED, steps=15_000, seeds=(0, 1, 0, 1), init_std=(0.1, 0.1, 0.3, 0.3))


@pytest.mark.parametrize("problem", [0, 1])
def test_small_init_ends_stationary_with_class_0_at_zero(imbalanced_runs, problem):
    v = V.verdict(imbalanced_runs, problem)
    assert v["verdict"] == "stationary"
    assert [e["class"] for e in v["zero_singular_values"]] == [0]
    assert v["relative_gap"] == pytest.approx(0.01447, abs=1e-4)  # above f*, not a rounding matter
    assert abs(v["objective"] - v["stationary_value"]) <= v["rtol"] * v["stationary_value"]


@pytest.mark.parametrize("problem", [2, 3])
def test_larger_init_reaches_f_star(imbalanced_runs, problem):
    v = V.verdict(imbalanced_runs, problem)
    assert v["verdict"] == "optimal" and v["zero_singular_values"] == []
    assert v["stationary_value"] == pytest.approx(v["f_star"], rel=1e-13)
    assert V.verdict(imbalanced_runs, problem, rtol=1e-9)["verdict"] == "not_converged"  # rtol decides


def test_balanced_plain_run_to_optimum_is_optimal():
    v = V.verdict(run(ufm.plain(4, 10, 8, 0.005, 0.01), steps=5_000, lr=0.5), 0)
    assert v["verdict"] == "optimal" and v["relative_gap"] < 1e-8 and v["zero_singular_values"] == []
    assert v["t"] == pytest.approx([theory.t_star(2, theory.c_value(4, 10, 0.005, 0.01))] * 4, rel=1e-6)


def test_too_short_run_is_not_converged_with_a_falling_gap():
    r = run(ufm.extended(4, 50, 20, 20, 0.005, 0.005, 0.005), steps=3_000, log_every=100)
    v = V.verdict(r, 0)
    assert v["verdict"] == "not_converged"
    assert v["last_gap"] == pytest.approx((r.final("objective")[0] - r.f_star[0]) / r.f_star[0], rel=1e-8)
    assert v["last_gap"] > 1e-3 and v["gap_decay"] > 0.1
    rel = r.history["gap"][:, 0] / r.f_star[0]  # the decay over the last quarter, by hand
    i0 = list(r.history["iteration"]).index(2_300)  # the first log at or after 0.75 · 3000 = 2250
    assert v["gap_decay"] == pytest.approx(math.log10(rel[i0] / rel[-1]) / 0.7, rel=1e-12)
    assert V.verdict_line(v) == f"not converged: gap {v['last_gap']:.1e}, falling {v['gap_decay']:.2f} decades/1000 it"


def test_without_f_star_the_verdict_follows_the_objective():
    model = ufm.plain(4, 10, 8, 0.005, 0.01, loss="ce")
    short, long = V.verdict(run(model, steps=1_000, lr=0.2), 0), V.verdict(run(model, steps=20_000, lr=0.2), 0)
    assert short["verdict"] == "not_converged" and short["objective_fall"] > 1e-3
    assert long["verdict"] == "stationary" and abs(long["objective_fall"]) <= long["rtol"]
    for v in (short, long):
        assert v["f_star"] is None and v["relative_gap"] is None and v["stationary_value"] is None
        assert v["last_gap"] is None and v["gap_decay"] is None
    assert "no exact f*" in V.verdict_line(long) and "no exact f*" in V.verdict_line(short)


def test_verdict_is_plain_json_data(imbalanced_runs):
    for v in V.verdicts(imbalanced_runs):
        assert json.loads(json.dumps(v, allow_nan=False)) == v
    assert len(V.verdicts(imbalanced_runs)) == 4


def test_end_to_end_is_the_product_of_the_weights_and_the_class_means(imbalanced_runs):
    P = V.end_to_end(imbalanced_runs, 1)
    params = {k: torch.from_numpy(v[1]) for k, v in imbalanced_runs.params.items()}
    counts = torch.tensor(IMBALANCED.class_counts, dtype=torch.float64)
    M1 = torch.zeros(4, 20, dtype=torch.float64).index_add_(0, torch.from_numpy(IMBALANCED.labels()), params["H1"])
    expected = params["W2"] @ params["W1"] @ (M1 / counts[:, None]).T
    np.testing.assert_allclose(P, expected.numpy(), atol=1e-13)


def test_misalignment_measures_how_far_p_is_from_the_class_directions():
    t = t_hat(IMBALANCED)
    theta = 0.3  # rotate the directions of classes 0 and 1 (sizes 5 and 20) into each other
    Q = np.eye(4)
    Q[:2, :2] = [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
    v = V.verdict(fake_result(IMBALANCED, stationary_point(IMBALANCED, t, Q=Q)), 0)
    s = np.sqrt(IMBALANCED.class_counts) * t  # X = P D^½ = Q diag(s) Qᵀ: its off-diagonal part is off the classes
    off = math.sqrt(2) * abs(s[1] - s[0]) * math.sin(theta) * math.cos(theta)
    assert v["misalignment"] == pytest.approx(off / np.linalg.norm(s), rel=1e-10)
    assert v["verdict"] == "not_converged"


def test_free_bias_run_is_optimal_along_the_centred_directions():
    model = ufm.UFM(4, (3, 5, 8, 8), (20,), (0.005, 0.005), bias="free")
    v = V.verdict(run(model, steps=10_000, lr=0.2), 0)
    assert v["verdict"] == "optimal" and v["misalignment"] < 1e-4  # 3e-6 at 10k it, 4e-14 at 30k
    assert len(v["t"]) == 3  # the mean direction is the bias's
    np.testing.assert_allclose(v["t"], v["t_star"], rtol=1e-7)


def test_too_narrow_a_model_has_no_stationary_value():
    assert V.stationary_value(ufm.extended(4, 10, 3, 8, 0.005, 0.005, 0.005)) is None  # d1 < K: rank ≤ 3
    assert V.stationary_value(ufm.plain(4, 10, 3, 0.005, 0.005, bias="free")) is not None  # d ≥ K − 1
