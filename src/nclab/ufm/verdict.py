"""A verdict for every UFM run: optimal, stuck at a stationary point the theory knows, or not converged.

**Reduction (docs/theory.md §3, :mod:`nclab.theory`).** For the bias-free linear MSE model with
m = L + 1 factors, λ_i > 0 and Λ = Π λ_i, every stationary point has NC1 (the H1 rows of
a class solve the same linear equation), so the fit only sees the end-to-end map

    P = W_L ⋯ W_1 M_1   (K×K, M_1 the class means of H1 as columns, classes in order),
    fit = 1/(2N) ‖(P − I) D^½‖_F²,   D = diag(n_1, ..., n_K),

and the regulariser, minimised over factorisations, is (m/2) Λ^{1/m} Σ_j s_j^{2/m} over the
singular values s_j of X = P D^½ (those of the output Z). The problem splits along the
singular directions of the targets T = D^½: σ_k = √n_k with direction e_k (class k). At a
stationary point X shares them, so P is diagonal with P_kk = t_k ≥ 0 (within a group of
equal class sizes only up to a rotation), and each direction contributes the scalar problem

    (σ²/N) φ_m(t; c),   φ_m(t; c) = ½ (t − 1)² + (m/2) c t^{2/m},   c = N Λ^{1/m} σ^{2/m − 2},

whose stationary points are t = 0 and the roots of φ_m' = t − 1 + c t^{(2−m)/m}. Its
non-zero local minimum t̂ (the largest root) is the optimum t* when c < c_crit(m); for
m ≥ 3 zero is always a strict local minimum too (docs/theory.md §3.3), so GD can end with some
directions at zero. The value of such a point is

    f_stat = Σ_{k non-zero} (n_k/N) φ_m(t̂_k; c_k) + Σ_{k at zero} n_k/(2N),

which is f* (:func:`nclab.theory.f_star_imbalanced`) when no direction is at zero. With an
unregularised bias the same holds for the centred targets T = (I − n1ᵀ/N) D^½ (singular
values: square roots of the eigenvalues of D − nnᵀ/N, as in the theory), whose
directions mix classes; the mean direction (σ = 0) is fitted by b and left out.
For other models (cross-entropy, ReLU, ...) the same measurement is reported as is: the
theory then predicts neither the t's nor a stationary value.

**Measurement.** P is read from the final parameters as the class means of the output
minus the bias (for the linear model exactly W_L⋯W_1 M_1). For every group g of equal
target singular values σ_g with singular vectors U_g, V_g, the measured t's are the
singular values of U_gᵀ X V_g / σ_g (|P_kk| for a class of its own size); "misalignment"
says how far X is from sharing the targets' singular vectors (0 at a stationary point).
A direction is at zero when its t ≤ ``zero_tol`` · t_ref, t_ref the largest predicted t̂
(1 when the theory predicts none; max(1, largest measured t) for models it does not cover).

**Decision** (``rtol`` relative):

- "optimal": f* is known and (f − f*)/f* ≤ rtol (f − f* ≤ rtol when f* = 0, λ with zeros);
- "stationary": the theory knows the point (f_stat is not None) and |f − f_stat| ≤ rtol·f_stat:
  some directions sit at zero, or (m ≥ 3, c ≥ c_crit) at the non-zero local minimum t̂
  although t* = 0. For models without a known f* (cross-entropy, ReLU with L > 2, a
  regularised bias, imbalanced ReLU), "stationary" means only that the objective has
  stopped falling: it fell by at most rtol (relative) over the last quarter of the run;
- "not_converged": anything else, with the relative gap at the end and how fast it was
  falling (decades per 1000 iterations over the last quarter of the logged history). The
  balanced extended ReLU model has an f* but no known worse critical points: a restart
  stuck at one (fig4, fig9) is "not_converged" with a gap decay near 0.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import brentq

from nclab import theory
from nclab.metrics import class_means_t
from nclab.ufm.engine import NumpyOps, Program
from nclab.ufm.model import UFM

__all__ = ["RTOL", "ZERO_TOL", "end_to_end", "gap_decay", "nonzero_stationary_t", "objective_fall", "scalar_c",
           "stationary_value", "target_directions", "theory_applies", "verdict", "verdict_line", "verdicts"]

#: default relative tolerance on the objective. The paper configs end at relative gaps of
#: 4e-16 (fig3), 1e-9 (fig8), 5e-14 (ufm), 8e-14 (ufm-bias); ReLU at 1e5 iterations
#: 1e-5..2e-5 (fig4's good restarts) and 4e-5 (fig9's best), still falling ~0.1 decade per
#: 10⁴ iterations. docs/theory.md §3.3's stuck example (tests/test_verdict.py) sits 1.4e-2 above f*.
RTOL = 1e-4
#: a direction is at zero when its t is below this fraction of the largest predicted t̂
ZERO_TOL = 1e-3
#: the part of the run (fraction of its iterations, at the end) over which decay is measured
WINDOW = 0.25
#: target singular values closer than this (relative) form one group of directions
_SAME_SIGMA = 1e-9


# ----------------------------------------------------------------------------- the theory's side
def theory_applies(model: UFM, lams) -> bool:
    """Whether the singular-value reduction holds: MSE, no bias or an unregularised one,
    linear (or a single weight layer, where σ plays no part), every λ > 0, and every width
    at least the targets' rank (K, or K − 1 with the bias)."""
    linear = model.activation == "linear" or model.L == 1
    if not (model.loss == "mse" and model.bias in ("none", "free") and linear and min(lams) > 0):
        return False
    try:
        model.check_theorem_width()
    except ValueError:
        return False
    return True


def target_directions(model: UFM) -> list[dict]:
    """The singular directions of the targets, one dict per direction (σ > 0).

    Without a bias (and with a regularised one) direction k is class k: keys "class" = k,
    "n" = n_k, "sigma" = √n_k, "classes" = the classes of the same size (the group within
    which the direction is only fixed up to a rotation), in class order. With an unregularised bias the
    directions are the singular vectors of T = (I − n1ᵀ/N) D^½ in order of decreasing σ
    ("class" and "n" None, "classes" None). Every dict also has "group": an index into
    :func:`_target_groups`.
    """
    out = []
    for g, (sigma, U, _, classes) in enumerate(_target_groups(model)):
        for i in range(U.shape[1]):
            k = None if classes is None else classes[i]
            out.append({"class": k, "n": None if k is None else model.class_counts[k], "sigma": sigma,
                        "classes": classes, "group": g})
    return out if model.bias == "free" else sorted(out, key=lambda d: d["class"])


def _target_groups(model: UFM) -> list[tuple[float, np.ndarray, np.ndarray, list[int] | None]]:
    """Groups of equal target singular values: (σ, U_g (K, g), V_g (K, g), classes or None).

    Without an unregularised bias T = D^½: one group per distinct class size, U_g = V_g the
    unit vectors of its classes (in class order; groups in order of their first class).
    With one, T = (I − n1ᵀ/N) D^½ by SVD, σ = 0 (the mean direction, fitted by b) left out.
    """
    counts = np.asarray(model.class_counts, dtype=np.float64)
    K = len(counts)
    if model.bias != "free":
        groups = []
        for n in dict.fromkeys(model.class_counts):  # distinct sizes, in order of first class
            classes = [k for k in range(K) if model.class_counts[k] == n]
            E = np.eye(K)[:, classes]
            groups.append((math.sqrt(n), E, E, classes))
        return groups
    T = (np.eye(K) - np.outer(counts, np.ones(K)) / counts.sum()) @ np.diag(np.sqrt(counts))
    U, s, Vt = np.linalg.svd(T)
    keep = s > _SAME_SIGMA * s[0]
    groups, j = [], 0
    while j < K and keep[j]:
        same = [i for i in range(j, K) if keep[i] and abs(s[i] - s[j]) <= _SAME_SIGMA * s[0]]
        groups.append((float(s[j]), U[:, same], Vt[same].T, None))
        j = same[-1] + 1
    return groups


def scalar_c(model: UFM, lams, sigma: float) -> float:
    """c = N Λ^{1/m} σ^{2/m − 2} of the scalar problem of target singular value σ (m = len(lams))."""
    m = len(lams)
    return model.N * math.prod(lams) ** (1.0 / m) * sigma ** (2.0 / m - 2.0)


def nonzero_stationary_t(m: int, c: float) -> float | None:
    """t̂: the non-zero local minimiser of φ_m(·; c) on (0, 1], or None when it has none.

    t̂ = t* whenever t* > 0. m = 2: 1 − c for c < 1. m ≥ 3 and c ≥ c_crit (t* = 0): the
    largest root of h(t) = t − 1 + c t^{(2−m)/m} if h dips below 0 (at its minimum
    t_min = (c(m−2)/m)^{m/(2m−2)} < 1), which happens for c up to a little above c_crit.
    """
    if m == 2:
        return 1.0 - c if c < 1.0 else None
    t = theory.t_star(m, c)
    if t > 0.0:
        return t
    p = (2.0 - m) / m
    h = lambda t: t - 1.0 + c * t ** p  # noqa: E731
    t_min = (c * (m - 2) / m) ** (m / (2.0 * m - 2.0))
    if t_min >= 1.0 or h(t_min) >= 0.0:
        return None
    return brentq(h, t_min, 1.0, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)


def stationary_value(model: UFM, zero=(), lams=None) -> float | None:
    """The exact objective of the stationary point with the directions ``zero`` at t = 0.

    f_stat = Σ_j (σ_j²/N) φ_m(t_j; c_j) over :func:`target_directions` (indices = classes
    without a bias), t_j = 0 (contributing σ_j²/(2N)) for j in ``zero`` and t̂_j
    (:func:`nonzero_stationary_t`) otherwise. None where the theory does not apply
    (:func:`theory_applies`) or some non-zero direction has no t̂. With no zeros and every
    t̂ = t* this is f* (:func:`nclab.theory.f_star_imbalanced`).
    """
    lams = tuple(float(x) for x in (model.lams if lams is None else lams))
    if not theory_applies(model, lams):
        return None
    directions, m, zero = target_directions(model), len(lams), set(zero)
    if not zero <= set(range(len(directions))):
        raise ValueError(f"zero: direction indices must be in 0..{len(directions) - 1}, got {sorted(zero)}")
    total = 0.0
    for j, d in enumerate(directions):
        c = scalar_c(model, lams, d["sigma"])
        t = 0.0 if j in zero else nonzero_stationary_t(m, c)
        if t is None:
            return None
        total += d["sigma"] ** 2 / model.N * theory.phi(m, c, t)
    return total


# ----------------------------------------------------------------------------- the run's side
def _evaluate(result, problem: int) -> tuple[float, np.ndarray]:
    """(f, P): the float64 objective at the final parameters of ``problem`` and the
    end-to-end map P (K, K), column k = mean output of class k minus the bias."""
    model = result.model
    params = {k: np.asarray(v[problem:problem + 1], dtype=np.float64) for k, v in result.params.items()}
    prog = Program(model, result.lams[problem:problem + 1], NumpyOps, np.float64)
    fit, reg = prog.objective(params)
    Z = prog.forward(params)[2][0]
    if model.has_bias:
        Z = Z - params["b"][0]
    means, _ = class_means_t(torch.from_numpy(Z), torch.from_numpy(model.labels()), model.K)
    return float((fit + reg)[0]), means.numpy().T


def end_to_end(result, problem: int = 0) -> np.ndarray:
    """P (K, K) of ``problem``: column k is the mean output of class k minus the bias.

    For the linear model this is exactly W_L ⋯ W_1 M_1 (M_1 the class means of H1 as
    columns); through a ReLU it is the class-mean output the theory would compare."""
    return _evaluate(result, problem)[1]


def _measured_t(P: np.ndarray, model: UFM, groups) -> tuple[list[np.ndarray], float]:
    """Per group the t's, singular values of B_g = U_gᵀ X V_g / σ_g (descending), X = P D^½;
    and the misalignment ‖X − Σ_g σ_g U_g S_g V_gᵀ‖_F / ‖X‖_F, S_g the positive
    semidefinite part of (B_g + B_gᵀ)/2. At a stationary point of the linear model X shares
    the targets' singular vectors (B_g = Q diag(t) Qᵀ), so the misalignment is 0."""
    X = P * np.sqrt(np.asarray(model.class_counts, dtype=np.float64))
    ts, aligned = [], np.zeros_like(X)
    for sigma, U, V, _ in groups:
        B = U.T @ X @ V / sigma
        ts.append(np.linalg.svd(B, compute_uv=False))
        w, Q = np.linalg.eigh((B + B.T) / 2)
        aligned += sigma * U @ (Q * np.maximum(w, 0.0)) @ Q.T @ V.T
    norm = np.linalg.norm(X)
    return ts, float(np.linalg.norm(X - aligned) / norm) if norm > 0 else 0.0


def _entry(model: UFM, sigma: float, U: np.ndarray, classes, t: float) -> dict:
    """One direction as plain data: class (or None), classes of its group, n, σ, t, label."""
    size = U.shape[1]
    if classes is None:
        what = f"centred-target direction{'s' if size > 1 else ''} with σ²={sigma ** 2:.4g}"
        label = f"1 of the {size} {what}" if size > 1 else f"the {what}"
        return {"class": None, "classes": None, "n": None, "sigma": sigma, "t": t, "of": size, "label": label}
    n = model.class_counts[classes[0]]
    if size == 1:
        label = f"class {classes[0]} (n={n})"
    else:
        label = f"1 of the {size} directions of the classes with n={n} ({', '.join(map(str, classes))})"
    return {"class": classes[0] if size == 1 else None, "classes": list(classes), "n": n, "sigma": sigma,
            "t": t, "of": size, "label": label}


def _structure(model: UFM, lams: tuple[float, ...], P: np.ndarray, zero_tol: float) -> dict:
    """Measured t's against the theory: zero directions, their indices, the predictions."""
    groups, directions = _target_groups(model), target_directions(model)
    ts, misalignment = _measured_t(P, model, groups)
    known, m = theory_applies(model, lams), len(lams)
    cs = [scalar_c(model, lams, sigma) for sigma, *_ in groups] if known else [None] * len(groups)
    t_hat = [nonzero_stationary_t(m, c) if known else None for c in cs]
    t_star = [theory.t_star(m, c) if known else None for c in cs]
    predicted = [t for t in t_hat if t]
    t_ref = (max(predicted) if predicted else 1.0) if known else max(1.0, max(float(t.max()) for t in ts))
    zero, above, zero_index = [], [], []
    for g, ((sigma, U, _, classes), t) in enumerate(zip(groups, ts)):
        at_zero = t <= zero_tol * t_ref  # t is descending: the zeros come last
        index = [j for j, d in enumerate(directions) if d["group"] == g]
        zero_index += index[len(index) - int(at_zero.sum()):]
        zero += [_entry(model, sigma, U, classes, float(x)) for x in t[at_zero]]
        if known and t_star[g] == 0.0:
            above += [_entry(model, sigma, U, classes, float(x)) for x in t[~at_zero]]
    per_direction = {g: list(t) for g, t in enumerate(ts)}
    return {"zero": zero, "nonzero_above_threshold": above, "zero_index": zero_index,
            "t": [float(per_direction[d["group"]].pop(0)) for d in directions],
            "t_star": [t_star[d["group"]] for d in directions], "misalignment": misalignment}


# ----------------------------------------------------------------------------- history
def _window(iterations: np.ndarray) -> tuple[int, int] | None:
    """Indices (i0, i1) of the logs spanning the last WINDOW of the run (at least the
    last two logs); None with fewer than two logs."""
    if len(iterations) < 2:
        return None
    i1 = len(iterations) - 1
    i0 = int(np.searchsorted(iterations, iterations[i1] * (1.0 - WINDOW)))
    return min(i0, i1 - 1), i1


def gap_decay(result, problem: int = 0) -> float | None:
    """How fast the relative gap was falling at the end, in decades per 1000 iterations.

    (log10 g(i0) − log10 g(i1)) / ((it(i1) − it(i0)) / 1000) over the last quarter of the
    logged history, g = |f − f*| / f* (|f − f*| when f* = 0, floored at the smallest
    float). None without f* or with fewer than two logs."""
    f_star, win = float(result.f_star[problem]), _window(result.history["iteration"])
    if math.isnan(f_star) or win is None:
        return None
    it, gap = result.history["iteration"], np.abs(result.history["gap"][:, problem])
    g = np.maximum(gap / (f_star if f_star > 0 else 1.0), np.finfo(float).tiny)
    i0, i1 = win
    return float((np.log10(g[i0]) - np.log10(g[i1])) / ((it[i1] - it[i0]) / 1000.0))


def objective_fall(result, problem: int = 0) -> float | None:
    """Relative fall of the objective over the last quarter of the logged history,
    (f(i0) − f(i1)) / |f(i1)|; None with fewer than two logs."""
    win = _window(result.history["iteration"])
    if win is None:
        return None
    f = result.history["objective"][:, problem]
    i0, i1 = win
    return float((f[i0] - f[i1]) / max(abs(f[i1]), np.finfo(float).tiny))


# ----------------------------------------------------------------------------- the verdict
def _relative(f: float, ref: float) -> float:
    """(f − ref)/ref, or f − ref when ref = 0 (f* = 0: some λ = 0)."""
    return (f - ref) / ref if ref > 0 else f - ref


def verdict(result, problem: int = 0, *, rtol: float = RTOL, zero_tol: float = ZERO_TOL) -> dict:
    """The verdict on one problem of a finished run (:class:`nclab.ufm.Result`), as plain data.

    Keys (None where not applicable; see the module docstring for the decision):
        verdict: "optimal", "stationary" or "not_converged". rtol, zero_tol: used.
        problem, iterations. objective: f at the final parameters (float64).
        f_star, gap (f − f*), relative_gap ((f − f*)/f*). stationary_value: f_stat of the
            measured zero pattern (the exact value of that stationary point).
        zero_singular_values: one dict per direction at zero (smallest t first within a
            group): "class" (k, or None when the direction is only fixed up to a rotation
            among equal class sizes, or mixes classes with a bias), "classes" (the classes
            of that group; None with a bias), "n" (their size; None with a bias), "sigma"
            (σ of the targets), "t" (measured), "of" (directions in the group), "label"
            (e.g. "class 0 (n=5)", "1 of the 4 directions of the classes with n=50 (0, 1, 2, 3)").
        nonzero_above_threshold: the same for directions at their non-zero local minimum
            t̂ although their optimum is t* = 0 (m ≥ 3, c ≥ c_crit).
        t, t_star: measured and optimal t per direction (:func:`target_directions` order:
            by class without a bias). misalignment: how far P is from the targets'
            directions (0 at a stationary point of the linear model).
        last_gap, gap_decay: for "not_converged" with a known f*: the relative gap and
            :func:`gap_decay`. objective_fall: without f*, :func:`objective_fall`.
    """
    model = result.model
    lams = tuple(float(x) for x in result.lams[problem])
    f, P = _evaluate(result, problem)
    shape = _structure(model, lams, P, zero_tol)
    f_star = None if math.isnan(result.f_star[problem]) else float(result.f_star[problem])
    f_stat = stationary_value(model, shape["zero_index"], lams)
    rel = None if f_star is None else _relative(f, f_star)
    fall = objective_fall(result, problem) if f_star is None else None
    if rel is not None and rel <= rtol:
        word = "optimal"
    elif f_stat is not None and abs(f - f_stat) <= rtol * f_stat:
        word = "stationary"
    elif f_star is None and fall is not None and abs(fall) <= rtol:
        word = "stationary"
    else:
        word = "not_converged"
    late = word == "not_converged" and f_star is not None
    return {
        "verdict": word, "rtol": rtol, "zero_tol": zero_tol, "problem": problem, "iterations": int(result.iterations),
        "objective": f, "f_star": f_star, "gap": None if f_star is None else f - f_star, "relative_gap": rel,
        "stationary_value": f_stat, "zero_singular_values": shape["zero"],
        "nonzero_above_threshold": shape["nonzero_above_threshold"], "t": shape["t"], "t_star": shape["t_star"],
        "misalignment": shape["misalignment"], "last_gap": rel if late else None,
        "gap_decay": gap_decay(result, problem) if late else None, "objective_fall": fall,
    }


def verdicts(result, *, rtol: float = RTOL, zero_tol: float = ZERO_TOL) -> list[dict]:
    """:func:`verdict` of every problem of the batch, in order."""
    return [verdict(result, b, rtol=rtol, zero_tol=zero_tol) for b in range(len(result.lams))]


# ----------------------------------------------------------------------------- one line
def verdict_line(v: dict) -> str:
    """One short line for a figure title or a report, e.g.

    "optimal (gap 3.1e-09)", "stationary: class 0 (n=5) at zero, f = 0.2311 > f* = 0.2104",
    "not converged: gap 1.2e-03, falling 0.80 decades/1000 it".
    """
    f, f_star = v["objective"], v["f_star"]
    if v["verdict"] == "optimal":
        return f"optimal (gap {v['relative_gap']:.1e})"
    if v["verdict"] == "stationary":
        if v["stationary_value"] is None:
            return f"stationary: objective stopped falling at f = {f:.4g} (no exact f*)"
        where = _directions_text(v["zero_singular_values"], "at zero")
        above = _directions_text(v["nonzero_above_threshold"], "at a local minimum where t* = 0")
        ref = f" > f* = {f_star:.4g}" if f_star is not None else ""
        return f"stationary: {'; '.join(x for x in (where, above) if x)}, f = {f:.4g}{ref}"
    if f_star is None:
        fall = v["objective_fall"]
        return (f"not converged: f = {f:.4g}" if fall is None else
                f"not converged: f = {f:.4g}, fell {fall:.1e} (relative) over the last quarter, no exact f*")
    decay = "" if v["gap_decay"] is None else f", falling {v['gap_decay']:.2f} decades/1000 it"
    return f"not converged: gap {v['last_gap']:.1e}{decay}"


def _directions_text(entries: list[dict], where: str) -> str:
    """"class 0 (n=5) at zero", or "2 of the 4 directions of the classes with n=50 (...) at zero"."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["label"]] = counts.get(e["label"], 0) + 1
    parts = [label if k == 1 else f"{k}{label[1:]}" for label, k in counts.items()]
    return f"{', '.join(parts)} {where}" if parts else ""
