"""The UFM engine: analytic gradients vs autograd, GD vs the exact optimum, structure."""
import importlib
import math

import numpy as np
import pytest
import torch

from nclab import theory, ufm
from nclab.ufm.engine import NumpyOps, Program, TorchOps

solve_module = importlib.import_module("nclab.ufm.solve")  # the module, not ufm.solve

VARIANTS = {
    "plain-mse": ufm.UFM(3, 4, (5,), (0.03, 0.02)),
    "plain-mse-freebias": ufm.UFM(3, 4, (5,), (0.03, 0.02), bias="free"),
    "plain-mse-regbias": ufm.UFM(3, 4, (5,), (0.03, 0.02), bias="reg", lam_b=0.05),
    "plain-ce": ufm.UFM(3, 4, (5,), (0.03, 0.02), loss="ce"),
    "plain-ce-bias": ufm.UFM(3, 4, (5,), (0.03, 0.02), loss="ce", bias="free"),
    "extended-linear": ufm.UFM(3, 4, (5, 6), (0.01, 0.02, 0.03)),
    "extended-relu": ufm.UFM(3, 4, (5, 6), (0.01, 0.02, 0.03), activation="relu"),
    "extended-relu-ce-bias": ufm.UFM(3, 4, (5, 6), (0.01, 0.02, 0.03), activation="relu", loss="ce", bias="free"),
    "deep-relu": ufm.UFM(3, (2, 4, 3), (5, 6, 4), (0.01, 0.02, 0.03, 0.01), activation="relu"),
    "deep-linear-imbalanced": ufm.UFM(3, (1, 5, 2), (4, 4, 4), (0.01, 0.02, 0.03, 0.04)),
}


def autograd_objective(model, params):
    """The objective written directly with torch ops (the oracle)."""
    H = params["H1"]
    for l in range(1, model.L):
        H = H @ params[f"W{l}"].T
        if model.activation == "relu":
            H = torch.relu(H)
    Z = H @ params[f"W{model.L}"].T
    if model.has_bias:
        Z = Z + params["b"][0]
    y = torch.as_tensor(model.labels())
    if model.loss == "mse":
        fit = 0.5 / model.N * ((Z - torch.nn.functional.one_hot(y, model.K).double()) ** 2).sum()
    else:
        fit = torch.nn.functional.cross_entropy(Z, y)
    reg = sum(lam / 2 * (params[k] ** 2).sum() for lam, k in zip(model.lams, model.factor_shapes()))
    if model.bias == "reg":
        reg = reg + model.lam_b / 2 * (params["b"] ** 2).sum()
    return fit + reg


def random_params(model, seed=0, std=0.7):
    P = {k: v[0] for k, v in ufm.initial_parameters(model, [seed], std).items()}
    if model.has_bias:
        P["b"] = np.random.default_rng(seed).standard_normal((1, model.K))
    return P


@pytest.mark.parametrize("name", VARIANTS)
def test_gradients_equal_autograd(name):
    model = VARIANTS[name]
    P = random_params(model)
    T = {k: torch.tensor(v, requires_grad=True) for k, v in P.items()}
    f = autograd_objective(model, T)
    f.backward()
    assert ufm.objective(model, P) == pytest.approx(float(f.detach()), rel=1e-13)
    for params in (P, {k: torch.tensor(v) for k, v in P.items()}):  # numpy and torch backends
        g = ufm.gradients(model, params)
        for k, t in T.items():
            got = np.asarray(g[k])
            ref = t.grad.numpy()
            assert np.linalg.norm(got - ref) <= 1e-12 * np.linalg.norm(ref), (name, k)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("ops", [NumpyOps, TorchOps])
@pytest.mark.parametrize("B", [1, 3])
def test_in_place_step_is_one_gd_step(name, ops, B):
    """Two in-place steps (the cached plan reused; fused updates for B = 1 or equal λ, and
    per-problem λ for B = 3) equal two steps X - η ∇X from the analytic gradients."""
    model, lr = VARIANTS[name], 0.05
    lams = np.array([model.lams]) * np.arange(1, B + 1)[:, None]
    prog = Program(model, lams, ops, np.float64 if ops is NumpyOps else torch.float64)
    starts = [random_params(model, seed=s) for s in range(1, B + 1)]
    batched = {k: np.stack([P[k] for P in starts]) for k in starts[0]}
    batched = {k: (v if ops is NumpyOps else torch.tensor(v)) for k, v in batched.items()}
    expected = {k: v * 1 for k, v in batched.items()}
    for _ in range(2):
        expected = {k: expected[k] - lr * g for k, g in prog.gradients(expected).items()}
        prog.step(batched, lr)
    for k in batched:
        assert np.allclose(np.asarray(batched[k]), np.asarray(expected[k]), rtol=0, atol=1e-14), k
    fused = [c for c in prog._plan(batched, lr) if getattr(c.func, "__name__", "") in ("_blas_update", "baddbmm_")]
    assert bool(fused) == (B == 1)  # one BLAS call per update when every problem has the same λ


def rel_gap(result):
    return abs(float(result.final("objective")[0]) - result.f_star[0]) / result.f_star[0]


def test_plain_ufm_reaches_theorem_3_1_optimum_as_orthogonal_frame():
    model = ufm.plain(4, 10, 8, 0.005, 0.01)
    r = ufm.solve(model, ufm.GD(steps=30_000, lr=0.5, tol=1e-10, log_every=500))
    assert rel_gap(r) < 1e-8
    assert r.f_star[0] == pytest.approx(theory.f_star(4, 10, (0.005, 0.01)), rel=1e-15)
    assert r.final("H1.nc1")[0] < 1e-12
    assert r.final("H1.nc2_of")[0] < 1e-6 and r.final("H1.nc3_of")[0] < 1e-6
    # balance identity λ_W WᵀW = λ_H HᵀH (rows are samples here) at a critical point
    H, W = r.params["H1"][0], r.params["W1"][0]
    assert np.allclose(0.01 * W.T @ W, 0.005 * H.T @ H, atol=1e-9)
    # w_k = sqrt(nλ_H/λ_W) μ_k
    means = H.reshape(4, 10, 8).mean(1)
    assert np.allclose(W, math.sqrt(10 * 0.005 / 0.01) * means, atol=1e-7)


def test_plain_ufm_with_bias_reaches_theorem_3_2_optimum_as_etf():
    model = ufm.plain(4, 10, 8, 0.005, 0.01, bias="free")
    r = ufm.solve(model, ufm.GD(steps=30_000, lr=0.5, tol=1e-10, log_every=500))
    assert rel_gap(r) < 1e-8
    assert r.final("H1.nc2_etf")[0] < 1e-6
    assert r.final("H1.nc2_of")[0] == pytest.approx(math.sqrt(2 - 2 * math.sqrt(3 / 4)), abs=1e-5)
    assert np.allclose(r.params["b"][0], 0.25, atol=1e-8)


def test_extended_linear_fig3_setting_reaches_f_star():
    model = ufm.extended(4, 50, 20, 20, 0.005, 0.005, 0.005)
    r = ufm.solve(model, ufm.GD(steps=20_000, lr=0.1, tol=1e-9, log_every=1000))
    assert r.f_star[0] == pytest.approx(0.10773572, abs=1e-8)
    assert rel_gap(r) < 1e-8
    for level in ("H1", "H2"):
        assert r.final(f"{level}.nc1")[0] < 1e-10 and r.final(f"{level}.nc2_of")[0] < 1e-4


def test_deep_linear_m4_reaches_f_star_from_large_init():
    lams = (0.01, 0.01, 0.01, 0.01)
    model = ufm.UFM(3, 5, (6, 6, 6), lams)
    pred = theory.predict(3, 5, lams)
    assert not pred.collapsed_to_zero
    r = ufm.solve(model, ufm.GD(steps=20_000, lr=0.2, tol=1e-10, log_every=500, backend="numpy"),
                  init_std=0.3, seeds=range(3))
    best = np.min(np.abs(r.final("objective") - r.f_star) / r.f_star)
    assert best < 1e-8


def test_above_threshold_everything_goes_to_zero():
    plain = ufm.plain(4, 10, 8, 0.2, 0.2)  # c = 4 * sqrt(10) * 0.2 > 1
    assert theory.c_value(4, 10, 0.2, 0.2) > 1
    r = ufm.solve(plain, ufm.GD(steps=3000, lr=0.2, tol=1e-10))
    assert r.f_star[0] == 0.5 and rel_gap(r) < 1e-8
    lam = 0.06  # c_3 = 4 (10 λ³)^(1/3) = 0.52 > 2^(-4/3)
    assert theory.c_m(4, 10, (lam,) * 3) > theory.c_crit(3)
    ext = ufm.extended(4, 10, 8, 8, lam, lam, lam)
    r = ufm.solve(ext, ufm.GD(steps=3000, lr=0.2, tol=1e-10))
    assert r.f_star[0] == 0.5 and rel_gap(r) < 1e-8
    assert all(np.abs(v).max() < 1e-3 for v in r.params.values())


def test_extended_relu_best_restart_matches_f_star():
    model = ufm.extended(4, 10, 8, 8, 0.005, 0.005, 0.005, relu=True)
    r = ufm.solve(model, ufm.GD(steps=30_000, lr=0.1, momentum=0.9, log_every=1000, backend="numpy"),
                  seeds=range(4))
    gaps = (r.final("objective") - r.f_star) / r.f_star
    assert gaps.min() < 1e-6
    assert gaps.min() > -1e-9  # nothing beats the linear value (docs/theory.md §3.4)
    best = int(np.argmin(gaps))
    assert r.final("H2.nc1")[best] < 1e-8 and r.final("H2.nc2_of")[best] < 1e-3


def test_cross_entropy_ufm_ends_in_etf_with_mean_weight_relation():
    lam_H, lam_W, n = 0.005, 0.005, 5
    model = ufm.plain(4, n, 8, lam_H, lam_W, loss="ce", bias="free")
    r = ufm.solve(model, ufm.GD(steps=20_000, lr=0.5, log_every=1000))
    assert r.f_star[0] != r.f_star[0]  # NaN: no closed form
    assert r.final("H1.nc1")[0] < 1e-10 and r.final("H1.nc2_etf")[0] < 1e-6
    assert r.final("H1.nc2w_etf" if "H1.nc2w_etf" in r.history else "H1.nc3_etf")[0] < 1e-6
    H, W = r.params["H1"][0], r.params["W1"][0]
    means = H.reshape(4, n, 8).mean(1)
    assert np.allclose(means, math.sqrt(lam_W / (n * lam_H)) * W, atol=1e-7)


def test_batch_equals_single_runs():
    model = ufm.extended(3, 4, 5, 5, 0.01, 0.02, 0.01, relu=True)
    lams = np.array([[0.01, 0.02, 0.01], [0.02, 0.01, 0.005], [0.001, 0.001, 0.001]])
    batch = ufm.solve(model, ufm.GD(steps=500, lr=0.1, backend="torch", log_every=100), seeds=[3, 4, 5],
                      lams=lams, init_std=[0.1, 0.3, 0.2])
    for i, (seed, std) in enumerate(zip([3, 4, 5], [0.1, 0.3, 0.2])):
        single = ufm.solve(model, ufm.GD(steps=500, lr=0.1, backend="numpy", log_every=100), seeds=[seed],
                           lams=lams[i], init_std=std)
        for k in single.params:
            assert np.allclose(batch.params[k][i], single.params[k][0], rtol=0, atol=1e-12), k
        assert np.allclose(batch.history["objective"][:, i], single.history["objective"][:, 0], rtol=1e-12)


def test_history_has_every_level_metric_and_gap():
    model = ufm.extended(3, 4, 5, 5, 0.01, 0.01, 0.01)
    r = ufm.solve(model, ufm.GD(steps=250, lr=0.1, log_every=100))
    assert list(r.history["iteration"]) == [0, 100, 200, 250]
    for key in ("objective", "fit", "reg", "gap", "H1.nc1", "H1.nc1_trace", "H1.nc2_etf", "H1.nc2_of",
                "H1.nc3_of", "H2.nc3_etf", "H2.nc4"):
        assert r.history[key].shape == (4, 1), key
    assert np.allclose(r.history["objective"], r.history["fit"] + r.history["reg"])
    assert np.allclose(r.history["gap"], r.history["objective"] - r.f_star)


def test_divergence_names_step_size_and_suggests_one():
    model = ufm.plain(4, 10, 8, 0.005, 0.005)
    with pytest.raises(ufm.DivergenceError, match=r"lr \(η\) = 50.*try lr <=") as info:
        ufm.solve(model, ufm.GD(steps=500, lr=50.0), init_std=1.0)
    assert info.value.suggested_lr is not None


@pytest.mark.parametrize("model, lr, steps", [
    (ufm.plain(4, 10, 8, 0.005, 0.005), 50.0, 20_000),
    (ufm.extended(4, 50, 20, 20, 0.005, 0.005, 0.005, relu=True), 50.0, 20_000),
    (ufm.extended(4, 50, 20, 20, 0.005, 0.005, 0.005), 50.0, 20_000),
])
def test_suggested_step_size_converges_from_the_same_start(model, lr, steps):
    """The advice of a DivergenceError is a step that was checked, and the full run with it is stable."""
    gd = ufm.GD(steps=steps, lr=lr, log_every=steps, metrics=False)
    with pytest.raises(ufm.DivergenceError) as info:
        ufm.solve(model, gd)
    advice = info.value.suggested_lr
    assert advice is not None and advice < lr and f"try lr <= {advice:.3g}" in str(info.value)
    r = ufm.solve(model, gd.replace(lr=advice))
    assert np.isfinite(r.final("objective")).all()
    assert r.final("objective")[0] < r.history["objective"][0, 0]
    assert ufm.suggest_lr(model, gd) == advice  # the same check behind both


@pytest.mark.parametrize("call, match", [
    (lambda: ufm.plain(4, 10, 8, -0.1, 0.1), "lams"),
    (lambda: ufm.UFM(4, 10, (8,), (0.1,)), "lams: expected 2"),
    (lambda: ufm.UFM(4, [3, 3], (8,), (0.1, 0.1)), "n:"),
    (lambda: ufm.UFM(1, 3, (8,), (0.1, 0.1)), "K:"),
    (lambda: ufm.UFM(3, 3, (8,), (0.1, 0.1), loss="hinge"), "loss"),
    (lambda: ufm.solve(ufm.plain(4, 10, 8, 0.1, 0.1), ufm.GD(steps=10, lr=0.0)), "lr"),
    (lambda: ufm.solve(ufm.plain(4, 10, 8, 0.1, 0.1), ufm.GD(steps=10, lr=-1.0)), "lr"),
    (lambda: ufm.solve(ufm.plain(4, 10, 8, 0.1, 0.1), ufm.GD(steps=10, lr=0.1), lams=[[0.1, -0.2]]), "lams"),
    (lambda: ufm.solve(ufm.plain(4, 10, 8, 0.1, 0.1), ufm.GD(steps=10, lr=0.1), seeds=[1, 2],
                       lams=[[.1, .1]] * 3),
     "batch sizes"),
    (lambda: ufm.optimal_objective(ufm.plain(4, 10, 3, 0.1, 0.1)), "d_1 >= 4"),
    (lambda: ufm.solve(ufm.plain(4, 10, 8, 0.1, 0.1), ufm.GD(steps=10, lr=0.1),
                       init={"H1": np.zeros((30, 8)), "W1": np.zeros((4, 8))}), "init"),
])
def test_bad_input_gets_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batch_in_threaded_shards_equals_one_unsplit_batch(dtype, monkeypatch):
    """Shards stepping in threads (numpy backend) give bit-identical results."""
    from nclab.ufm.solve import _Stepper

    model = ufm.extended(3, 4, 5, 5, 0.01, 0.02, 0.01, relu=True, bias="free")
    B = 40
    lams = np.abs(np.random.default_rng(0).normal(0.01, 0.005, (B, 3)))
    monkeypatch.setattr(solve_module, "CHECK_EVERY", 30)  # divergence tests between logs too
    runs = [ufm.solve(model, ufm.GD(steps=350, lr=0.1, dtype=dtype, backend="numpy", log_every=100, threads=t),
                      seeds=range(B), lams=lams) for t in (1, 2)]
    for k in runs[0].params:
        assert np.array_equal(runs[0].params[k], runs[1].params[k]), k
    for k in runs[0].history:
        assert np.array_equal(runs[0].history[k], runs[1].history[k], equal_nan=True), k
    prog = runs[0].program()
    P = {k: v.copy() for k, v in runs[0].params.items()}
    stepper = _Stepper(prog, P, 0.1, 0.0, threads=2)
    assert [len(shard["H1"]) for _, shard in stepper.shards] == [20, 20]
    stepper.close()


def test_divergence_is_caught_in_threaded_shards():
    model = ufm.plain(3, 4, 5, 0.01, 0.01)
    with pytest.raises(ufm.DivergenceError, match=r"lr \(η\) = 50"):
        ufm.solve(model, ufm.GD(steps=300, lr=50.0, backend="numpy", threads=2, metrics=False),
                  seeds=range(32))


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2"])
def test_bad_thread_count_is_refused(threads):
    with pytest.raises(ValueError, match="threads"):
        ufm.solve(ufm.plain(3, 4, 5, 0.01, 0.01), ufm.GD(steps=1, lr=0.1, threads=threads))


def test_backend_choice_by_problem_size():
    from nclab.ufm.solve import _pick_backend
    from nclab.ufm.engine import NumpyOps, TorchOps

    assert _pick_backend("auto", "cpu", 1024, 200 * 20) is NumpyOps  # many small problems: threaded numpy
    assert _pick_backend("auto", "cpu", 64, 1000 * 64) is TorchOps  # larger problems: fused torch matmuls
    assert _pick_backend("auto", "cpu", 1, 1000 * 64) is NumpyOps
