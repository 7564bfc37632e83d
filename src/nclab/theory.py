"""Exact global optima of the (extended / deep) linear unconstrained-features model.

Pure closed forms (numpy, scipy, math); no optimisation loops. Reference:
``docs/theory.md`` §3 (Tirer & Bruna, ICML 2022, Theorems 3.1, 3.2, 4.1).

**Convention for the regularisation strengths.** ``lams`` holds ONE λ PER FACTOR,
ordered from the features upward, H₁ FIRST and the classifier LAST::

    lams = (λ_H1, λ_W1, ..., λ_WL)          m = len(lams) factors, L = m - 1 weights
    plain UFM:     (λ_H, λ_W)               m = 2
    extended UFM:  (λ_H1, λ_W1, λ_W2)       m = 3

The objective (samples as columns, Y = I_K ⊗ 1_nᵀ, N = Kn, A₁ = H₁, A_{i+1} = W_i) is::

    f(A) = 1/(2N) ‖A_m ⋯ A_1 (+ b 1ᵀ) − Y‖_F² + Σ_i λ_i/2 ‖A_i‖_F²

with an unregularised bias b only when ``bias=True``. Because
min over factorisations of Σ λ_i/2 ‖A_i‖² = (m/2) Λ^{1/m} Σ_j σ_j(Z)^{2/m}, Λ = Π λ_i,
the problem splits into one scalar problem per singular value σ of the targets
(of Y, or of Y P with P = I − 11ᵀ/N when the bias absorbs the mean direction)::

    min_{s ≥ 0} (σ − s)²/(2N) + (m/2) Λ^{1/m} s^{2/m}
      = (σ²/N) min_{t ∈ [0,1]} φ_m(t; c),   c = N Λ^{1/m} σ^{2/m − 2},
    φ_m(t; c) = ½ (t − 1)² + (m/2) c t^{2/m}.

Balanced classes give σ = √n and c = c_m = K (nΛ)^{1/m} (c = K√(nλ_Hλ_W) for m = 2).
The widths must be at least the rank of the targets (d ≥ K, or d ≥ K − 1 with bias);
see :func:`check_width`.

Numerics: products of λs (Λ = 1e-300⁴ underflows, 1e300² overflows) are formed as a float
mantissa times a separate integer power of two (:class:`_Wide`), and m-th roots split that
exponent exactly, so c, f*, t* and the predicted norms are correct for every λ in float64's
normal range (2.2e-308 .. 1.8e308). Subnormal λs (which keep too few digits) are rejected;
a result beyond float64's range is a ValueError naming ``lams``, never inf (c itself may
be +inf internally: then t* = 0, the zero solution).
"""
from __future__ import annotations

import math
import numbers
import os
import sys
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

__all__ = [
    "Prediction",
    "c_crit",
    "c_m",
    "c_value",
    "check_width",
    "f_star",
    "f_star_imbalanced",
    "format_report",
    "phi",
    "predict",
    "predicted_gram",
    "scalar_shrinkage",
    "t_star",
]


# --------------------------------------------------------------------------- validation
#: counts (K, n, n_k) above 2^53 are not exact integers in float64
MAX_COUNT = 2**53

#: the smallest normal float64; below it a λ keeps too few significant digits
TINY = sys.float_info.min


def _float(x) -> float | None:
    """A real number (not bool) as a finite float, else None (also for ints beyond float64)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    try:
        x = float(x)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def _check_K(K) -> int:
    if isinstance(K, bool) or not isinstance(K, numbers.Integral) or not 2 <= K <= MAX_COUNT:
        raise ValueError(f"K: the number of classes must be an integer in 2..2^53 (got {K!r})")
    return int(K)


def _check_n(n) -> float:
    x = _float(n)
    if x is None or not 1 <= x <= MAX_COUNT or x != int(x):
        raise ValueError(f"n: the samples per class must be an integer in 1..2^53 (got {n!r})")
    return x


def _check_m(m) -> int:
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not 2 <= m <= MAX_COUNT:
        raise ValueError(f"m: the number of factors must be an integer in 2..2^53 (got {m!r}); "
                         "m = 2 is the plain UFM (H, W), m = 3 the extended UFM")
    return int(m)


def _check_c(c) -> float:
    x = _float(c)
    if x is None or not x >= 0:
        raise ValueError(f"c: must be a finite real number >= 0 (got {c!r})")
    return x


def _check_lam(lam, name: str) -> float:
    x = _float(lam)
    if x is None:
        raise ValueError(f"{name}: must be a finite positive real number (got {lam!r})")
    if x <= 0:
        raise ValueError(
            f"{name}: must be > 0 (got {lam!r}); with a zero regularisation the infimum is "
            "attained by any interpolating factorisation (or not at all), so the theorem's "
            "unique structure is undefined -- pass a small positive value instead")
    if x < TINY:
        raise ValueError(f"{name}: {lam!r} is subnormal (below {TINY:.4g}, the smallest normal "
                         "float64) and keeps too few significant digits; pass a value >= 2.3e-308")
    return x


def _check_lams(lams) -> tuple[float, ...]:
    if isinstance(lams, (str, bytes)) or not hasattr(lams, "__len__"):
        raise ValueError(f"lams: expected a sequence of λs, one per factor, H1 first "
                         f"(got {lams!r})")
    lams = list(np.ravel(lams)) if isinstance(lams, np.ndarray) else list(lams)
    if len(lams) < 2:
        raise ValueError(f"lams: need at least 2 factors (λ_H, λ_W), H1 first; got {len(lams)}")
    return tuple(_check_lam(x, f"lams[{i}]") for i, x in enumerate(lams))


def _check_counts(class_counts) -> np.ndarray:
    try:
        arr = np.asarray(class_counts)
    except Exception:  # pragma: no cover - exotic input
        raise ValueError("class_counts: expected a sequence of positive integers") from None
    ok = arr.ndim == 1 and arr.size >= 2 and arr.dtype != bool
    if ok and arr.dtype.kind == "f":
        ok = bool(np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)))
    elif ok:
        ok = arr.dtype.kind in "iu"
    if not ok or np.any(arr < 1) or np.any(arr > MAX_COUNT):
        raise ValueError("class_counts: expected a 1-D sequence of at least 2 integers in "
                         f"1..2^53, one per class (got {class_counts!r})")
    return arr.astype(np.float64)


def _check_fits(nbytes: int, name: str, what: str) -> None:
    """Raise ValueError naming ``name`` when ``nbytes`` exceed this machine's memory."""
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf: assume 1 TiB
        have = 1 << 40
    if nbytes > have:
        raise ValueError(f"{name}: {what} would need about {nbytes / 2**30:.3g} GiB of memory, "
                         f"more than the {have / 2**30:.3g} GiB this machine has")


# --------------------------------------------------------------------------- wide numbers
@dataclass(frozen=True)
class _Wide:
    """x = f · 2^e with a float f (1/2 <= f < 1, or 0) and an unbounded int e (x >= 0).

    Products, quotients and m-th roots of λs, n and σ never overflow or underflow here;
    each step rounds f once, as the plain float operation would. ``float(x)`` is exact
    or the nearest float64, and +inf beyond float64's range (see :func:`_finite`).
    """

    f: float
    e: int

    @staticmethod
    def of(x: float) -> "_Wide":
        return _Wide(*math.frexp(x))

    def __mul__(self, other: "_Wide") -> "_Wide":
        f, e = math.frexp(self.f * other.f)
        return _Wide(f, self.e + other.e + e)

    def __truediv__(self, other: "_Wide") -> "_Wide":
        f, e = math.frexp(self.f / other.f)
        return _Wide(f, self.e - other.e + e)

    def root(self, m: int) -> "_Wide":
        """x^{1/m}: with e = q m + r (0 <= r < m), (f 2^r)^{1/m} · 2^q, the exponent split exactly."""
        q, r = divmod(self.e, m)
        if m == 2:
            g = math.sqrt(math.ldexp(self.f, r))  # correctly rounded, as math.sqrt(x) is
        elif r < 1000:
            g = math.ldexp(self.f, r) ** (1.0 / m)
        else:  # f 2^r itself would overflow
            g = self.f ** (1.0 / m) * 2.0 ** (r / m)
        f, e = math.frexp(g)
        return _Wide(f, q + e)

    def __float__(self) -> float:
        try:
            return math.ldexp(self.f, self.e)
        except OverflowError:
            return math.inf

    def log10(self) -> float:
        return (math.log2(self.f) + self.e) * math.log10(2) if self.f else -math.inf


def _product(xs) -> _Wide:
    out = _Wide.of(1.0)
    for x in xs:
        out = out * _Wide.of(x)
    return out


def _finite(x: _Wide, name: str, what: str, why: str = "") -> float:
    """float(x), or a ValueError naming ``name`` when ``what`` exceeds float64."""
    v = float(x)
    if math.isinf(v):
        raise ValueError(f"{name}: {what} ≈ 1e{x.log10():.0f} is beyond float64's range "
                         f"(1.8e308) for these λs, K and n{why}")
    return v


def check_width(d, K, bias: bool = False) -> None:
    """Raise ValueError unless the feature width d can carry the optimum.

    Theorem 3.1 (no bias) needs d ≥ K; Theorem 3.2 (unregularised bias) needs d ≥ K − 1.
    """
    K = _check_K(K)
    need, thm = (K - 1, "3.2") if bias else (K, "3.1")
    if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < need:
        raise ValueError(f"d: Theorem {thm} needs d >= {'K-1' if bias else 'K'} "
                         f"(got d={d!r}, K={K}); increase the feature width")


# --------------------------------------------------------------------------- scalars
def c_value(K, n, lam_H, lam_W) -> float:
    """Plain-UFM constant c = K √(n λ_H λ_W) (docs/theory.md §3.1)."""
    K, n = _check_K(K), _check_n(n)
    lam_H, lam_W = _check_lam(lam_H, "lam_H"), _check_lam(lam_W, "lam_W")
    return _finite(_c_wide(K, n, (lam_H, lam_W)), "lam_H", "c = K√(nλ_Hλ_W)",
                   "; far above c_crit = 1, so the optimum is the zero solution")


def _c_wide(K: int, n: float, lams: tuple[float, ...]) -> _Wide:
    """c_m = K (nΛ)^{1/m}, formed without overflow or underflow."""
    return _Wide.of(K) * _product((n, *lams)).root(len(lams))


def _c_m(K: int, n: float, lams: tuple[float, ...]) -> float:
    """c_m as a float, +inf beyond float64 (then t* = 0: the zero solution)."""
    return float(_c_wide(K, n, lams))


def c_m(K, n, lams) -> float:
    """Depth-m constant c_m = K (nΛ)^{1/m}, Λ = Π λ_i, m = len(lams) (docs/theory.md §3.3).

    For m = 2 this equals :func:`c_value` (computed as K √(nΛ))."""
    K, n, lams = _check_K(K), _check_n(n), _check_lams(lams)
    c = float(_c_wide(K, n, lams))
    if math.isinf(c):  # f_star still answers: t* = 0, the zero solution
        _finite(_c_wide(K, n, lams), "lams", f"c_{len(lams)} = K(nΛ)^(1/m)",
                "; far above c_crit, so the optimum is the zero solution (f_star gives its value)")
    return c


def c_crit(m) -> float:
    """Threshold c_crit(m) = (m−2)^{(m−2)/m} / (m−1)^{(2m−2)/m} for m ≥ 3, and 1 for m = 2.

    At c = c_crit both t = 0 and t = (m−2)/(m−1) minimise φ_m (value ½)."""
    m = _check_m(m)
    if m == 2:
        return 1.0
    return (m - 2) ** ((m - 2) / m) / (m - 1) ** ((2 * m - 2) / m)


def phi(m, c, t):
    """φ_m(t; c) = ½ (t − 1)² + (m/2) c t^{2/m} (vectorised in t, t ≥ 0)."""
    m, c = _check_m(m), _check_c(c)
    t = np.asarray(t, dtype=np.float64)
    if not np.all(t >= 0) or not np.all(np.isfinite(t)):
        raise ValueError("t: must be finite and >= 0 (φ_m uses t^{2/m})")
    with np.errstate(over="ignore"):
        out = 0.5 * (t - 1.0) ** 2 + 0.5 * m * c * t ** (2.0 / m)
    if not np.all(np.isfinite(out)):
        raise ValueError("t: φ_m(t; c) exceeds float64's range (1.8e308) for these t and c")
    return float(out) if out.ndim == 0 else out


def _t_star(m: int, c: float) -> float:
    if m == 2:
        return max(1.0 - c, 0.0)
    if c < 2.0**-60:  # t* = 1 − c + O(c²): exact in float64 (and brentq's bracket would underflow)
        return 1.0 - c
    if c >= c_crit(m):
        return 0.0
    p = (2.0 - m) / m
    h = lambda t: t - 1.0 + c * t ** p  # noqa: E731  (φ_m'(t) = h(t))
    # h' = 0 at t_min; h(t_min) < 0 < h(1) = c for every c < c_crit (< m/(m−2)).
    t_min = (c * (m - 2) / m) ** (m / (2.0 * m - 2.0))
    return brentq(h, t_min, 1.0, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)


def t_star(m, c) -> float:
    """Global minimiser t* of φ_m(t; c) on [0, 1].

    - m = 2: t* = max(1 − c, 0) (continuous).
    - m ≥ 3: φ_m'(t) = h(t) = t − 1 + c t^{(2−m)/m}. For c < c_crit(m), t* is the largest
      root of h (found by brentq between argmin h = (c(m−2)/m)^{m/(2m−2)} and 1), and
      φ_m(t*) < ½ = φ_m(0). For c ≥ c_crit(m), t* = 0: the minimiser jumps from
      (m−2)/(m−1) to 0. At c = c_crit exactly both are optimal; 0 is returned.
    """
    return _t_star(_check_m(m), _check_c(c))


def scalar_shrinkage(sigma, N, Lam, m):
    """Exact solution of min_{s ≥ 0} (σ − s)²/(2N) + (m/2) Λ^{1/m} s^{2/m}, per σ.

    With s = σ t the objective is (σ²/N) φ_m(t; c), c = N Λ^{1/m} σ^{2/m − 2}, so
    s = σ t*(c) and value = (σ²/N) φ_m(t*; c); σ = 0 gives (0, 0). For m = 2 this is
    soft-thresholding, s = max(σ − N√Λ, 0). Vectorised over σ ≥ 0; returns (s, value)
    as arrays of σ's shape (floats for a scalar σ).
    """
    m = _check_m(m)
    x = _float(N)
    if x is None or not x >= TINY:
        raise ValueError(f"N: the total number of samples must be a finite number > 0 (got {N!r})")
    Lam = _check_lam(Lam, "Lam")
    try:
        sig = np.asarray(sigma, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"sigma: expected singular values as numbers (got {sigma!r})") from None
    if not np.all(np.isfinite(sig)) or np.any(sig < 0):
        raise ValueError("sigma: singular values must be finite and >= 0")
    return _shrinkage(sig, x, _Wide.of(Lam).root(m), m)


def _shrinkage(sig: np.ndarray, N: float, root: _Wide, m: int):
    """:func:`scalar_shrinkage` with root = Λ^{1/m}.

    c = N Λ^{1/m} (σ²)^{1/m} / σ² may over- or underflow (t* is right either way); the value
    is then the objective itself at s = σ t*, (σ − s)²/(2N) + (m/2) Λ^{1/m} (s²)^{1/m}, a sum
    of two non-negative terms that never involves c.
    """
    s, val = np.zeros_like(sig), np.zeros_like(sig)
    for idx in np.ndindex(sig.shape):
        if sig[idx] == 0.0:
            continue
        sg = float(sig[idx])
        sq = _Wide.of(sg) * _Wide.of(sg)
        t = _t_star(m, float(_Wide.of(N) * root * sq.root(m) / sq))  # c = +inf: t* = 0
        s[idx] = sg * t
        miss, kept = _Wide.of(sg) * _Wide.of(1.0 - t), _Wide.of(sg) * _Wide.of(t)  # σ − s, s
        fit = miss * miss / _Wide.of(N) * _Wide.of(0.5)
        penalty = _Wide.of(m / 2) * root * (kept * kept).root(m)
        val[idx] = _finite(fit, "sigma", "(σ − s)²/(2N)") + _finite(penalty, "sigma", "(m/2)Λ^{1/m}s^{2/m}")
        if math.isinf(val[idx]):
            raise ValueError("sigma: the optimal value exceeds float64's range (1.8e308)")
    if sig.ndim == 0:
        return float(s), float(val)
    return s, val


def _phi(m: int, c: float, t: float) -> float:
    if m == 2:
        return 0.5 * (t - 1.0) ** 2 + c * t
    return 0.5 * (t - 1.0) ** 2 + 0.5 * m * c * t ** (2.0 / m)


def _phi_star(m: int, c: float) -> float:
    """min_{[0,1]} φ_m = c − c²/2 (m = 2, c ≤ 1), φ_m(t*) (m ≥ 3, c < c_crit), else ½."""
    if m == 2:
        return c - 0.5 * c * c if c <= 1.0 else 0.5
    t = _t_star(m, c)
    return 0.5 if t == 0.0 else _phi(m, c, t)


# --------------------------------------------------------------------------- optimal values
def f_star(K, n, lams, bias: bool = False) -> float:
    """Optimal objective of the balanced linear UFM with m = len(lams) factors.

    Without bias: f* = min φ_m = c − c²/2 (m = 2, c ≤ 1), φ_m(t*; c_m) (m ≥ 3,
    c_m < c_crit), and ½ otherwise (the zero solution).

    With an unregularised bias (docs/theory.md §3.2): eliminating b leaves the targets Y P,
    P = I − 11ᵀ/N, whose singular values are √n (K − 1 times) and 0, each with the same
    c_m, so f* = ((K − 1)/K) · min φ_m, i.e. ((K − 1)/K)(c − c²/2) for m = 2 below
    threshold and (K − 1)/(2K) above it.
    """
    K, n, lams = _check_K(K), _check_n(n), _check_lams(lams)
    val = _phi_star(len(lams), _c_m(K, n, lams))
    return (K - 1) / K * val if bias else val


def _target_singular_values(counts: np.ndarray, bias: bool) -> np.ndarray:
    """√n_k (Y), or the square roots of the eigenvalues of diag(n) − n nᵀ/N (Y P)."""
    if not bias:
        return np.sqrt(counts)
    N = counts.sum()
    ev = np.linalg.eigvalsh(np.diag(counts) - np.outer(counts, counts) / N)
    ev[ev < 1e-12 * counts.max()] = 0.0  # the exact zero of the mean direction 1
    return np.sqrt(ev)


def f_star_imbalanced(class_counts, lams, bias: bool = False) -> float:
    """Optimal objective for class sizes n_k (any m = len(lams)).

    f* = Σ_j min_{s ≥ 0} [(σ_j − s)²/(2N) + (m/2) Λ^{1/m} s^{2/m}], N = Σ n_k, over the
    singular values σ_j of the targets: √n_k without bias; with bias those of Y P
    (P = I − 11ᵀ/N), the square roots of the eigenvalues of diag(n) − n nᵀ/N, one of which
    is 0 (the mean direction, fitted exactly by b, contributes nothing). Equal counts give
    :func:`f_star` (see its docstring).
    """
    counts, lams = _check_counts(class_counts), _check_lams(lams)
    m = len(lams)
    if bias:
        _check_fits(3 * 8 * len(counts) ** 2, "class_counts", f"the {len(counts)}² eigenproblem of Y P")
    sig = _target_singular_values(counts, bias)
    _, val = _shrinkage(sig, float(counts.sum()), _product(lams).root(m), m)
    return float(np.sum(val))


# --------------------------------------------------------------------------- structure
@dataclass(frozen=True)
class Prediction:
    """Predicted global optimum of the balanced linear UFM (docs/theory.md §3.1–§3.3).

    ``factor_sq_norms`` follows the order of ``lams`` (H₁ first); ``mean_sq_norms[l-1]``
    is ‖μ_{l,k}‖² at feature level l = 1..m−1 (H_l = A_l⋯A_1); ``gram_scale[l-1]`` is
    g_l = β^l/(n Π_{i≤l} λ_i), the class-mean Gram being g_l I (no bias: an orthogonal
    frame) or g_l (I − 11ᵀ/K) (bias: a simplex ETF). ``end_to_end`` is t*: the
    end-to-end map W_L⋯W_1 M_1 equals t* I (t* (I − 11ᵀ/K) with bias). ``w_coeff`` is κ
    in W_L = κ M_{m−1}ᵀ (κ = √(nλ_H/λ_W) for m = 2). ``lam_sq_norm`` is the common
    λ_i‖A_i‖² (= c(1 − c) for m = 2 without bias). ``rho`` (m = 2 only) is
    (1 − c)√(λ_W/(nλ_H)). ``b_star`` is (1/K)1 with bias, else None.
    """

    K: int
    n: float
    lams: tuple[float, ...]
    bias: bool
    m: int
    c: float
    c_crit: float
    t_star: float
    f_star: float
    collapsed_to_zero: bool
    beta: float
    factor_sq_norms: tuple[float, ...]
    mean_sq_norms: tuple[float, ...]
    gram_scale: tuple[float, ...]
    end_to_end: float
    lam_sq_norm: float
    w_coeff: float | None
    rho: float | None
    b_star: tuple[float, ...] | None


def predict(K, n, lams, bias: bool = False) -> Prediction:
    """Predicted optimum structure, balanced classes, any depth m = len(lams).

    β = Λ^{1/m} (√n t*)^{2/m}: every factor has r equal singular values √(β/λ_i)
    (r = K, or K − 1 with bias), so ‖A_i‖² = r β/λ_i and λ_i‖A_i‖² = r β; features at
    level l have NC1 and ‖μ_{l,k}‖² = g_l (1 − 1/K if bias), g_l = β^l/(n Π_{i≤l} λ_i).
    For m = 2: β = √(nλ_Hλ_W)(1 − c), ρ = g_1 = (1 − c)√(λ_W/(nλ_H)),
    λ_W‖W‖² = λ_H‖H‖² = c(1 − c) (times (K−1)/K with bias), w_k = √(nλ_H/λ_W) μ_k.
    Above the threshold everything is 0 (b* = (1/K)1 remains with bias).
    """
    K, n, lams = _check_K(K), _check_n(n), _check_lams(lams)
    bias = bool(bias)
    if bias:
        _check_fits(16 * K, "K", f"b* = (1/K)1 for K = {K} classes")
    m = len(lams)
    c = c_m(K, n, lams)
    t = _t_star(m, c)
    beta = _beta(n, lams, t)
    r = _Wide.of(K - 1 if bias else K)
    gram = [beta_l / (_Wide.of(n) * _product(lams[:l])) for l, beta_l in enumerate(_powers(beta, m - 1), 1)]
    diag = (K - 1) / K if bias else 1.0
    zero = t == 0.0
    g = [_finite(x, "lams", f"the level-{l} Gram scale g_{l}") for l, x in enumerate(gram, 1)]
    return Prediction(
        K=K, n=n, lams=lams, bias=bias, m=m, c=c, c_crit=c_crit(m), t_star=t,
        f_star=f_star(K, n, lams, bias=bias), collapsed_to_zero=zero, beta=float(beta),
        factor_sq_norms=tuple(_finite(r * beta / _Wide.of(lam), "lams", f"‖A_{i}‖²")
                              for i, lam in enumerate(lams, 1)),
        mean_sq_norms=tuple(x * diag for x in g), gram_scale=tuple(g),
        end_to_end=t, lam_sq_norm=float(r * beta),
        w_coeff=None if zero else _finite(_Wide.of(t) / gram[-1], "lams", "κ = t*/g_{m-1}"),
        rho=_rho(c, n, lams) if m == 2 else None,
        b_star=tuple([1.0 / K] * K) if bias else None,
    )


def _beta(n: float, lams: tuple[float, ...], t: float) -> _Wide:
    """β = (nΛ)^{1/m} t^{2/m} = Λ^{1/m} (√n t)^{2/m} (≤ c/K ≤ 1/K, so never overflows)."""
    m = len(lams)
    return _product((n, *lams)).root(m) * _Wide.of(t if m == 2 else t ** (2.0 / m))


def _powers(x: _Wide, count: int) -> list[_Wide]:
    """[x, x², ..., x^count]."""
    out = [x]
    while len(out) < count:
        out.append(out[-1] * x)
    return out


def _rho(c: float, n: float, lams: tuple[float, ...]) -> float:
    """ρ = (1 − c)√(λ_W/(nλ_H)) for c ≤ 1, else 0 (m = 2, lams = (λ_H, λ_W))."""
    ratio = (_Wide.of(lams[1]) / (_Wide.of(n) * _Wide.of(lams[0]))).root(2)
    return _finite(_Wide.of(max(1.0 - c, 0.0)) * ratio, "lams", "ρ = (1 − c)√(λ_W/(nλ_H))")


def predicted_gram(K, n, lams, bias: bool = False, level: int = 1) -> np.ndarray:
    """K×K class-mean Gram M_lᵀM_l at feature level l (1 ≤ l ≤ m−1; H₁ is level 1).

    g_l I without bias (an orthogonal frame; ρ I for m = 2), g_l (I − 11ᵀ/K) with bias
    (a simplex ETF), g_l = β^l/(n Π_{i≤l} λ_i); the zero matrix above the threshold.
    """
    p = predict(K, n, lams, bias=bias)
    if isinstance(level, bool) or not isinstance(level, numbers.Integral) or not 1 <= level < p.m:
        raise ValueError(f"level: must be an integer feature level in 1..{p.m - 1} "
                         f"(1 = H1) for m = {p.m} factors (got {level!r})")
    _check_fits(3 * 8 * p.K**2, "K", f"the {p.K} x {p.K} Gram")
    g = p.gram_scale[level - 1]
    eye = np.eye(p.K)
    return g * (eye - np.full((p.K, p.K), 1.0 / p.K)) if p.bias else g * eye


# --------------------------------------------------------------------------- report
def _factor_names(m: int) -> list[str]:
    return ["H1"] + [f"W{i}" for i in range(1, m)] if m > 2 else ["H", "W"]


def _fixed(x: float) -> str:
    """8 decimals for ordinary values; 8 significant digits for tiny or huge ones (a c of
    1e-300 must not print as 0.00000000, nor one of 1e300 as 301 digits)."""
    return f"{x:.8f}" if x == 0 or 1e-4 <= abs(x) < 1e8 else f"{x:.8e}"


def format_report(K, n, lams, bias: bool = False) -> str:
    """Human-readable summary of :func:`predict` (model, thresholds, optimum, geometry).

    ``n`` is the number of samples per class, or a sequence of the K class sizes n_k (one
    size, or K equal ones, is the balanced model). Imbalanced sizes give the report of
    :func:`f_star_imbalanced`: the scalar problem of every singular value σ of the targets
    (σ_k = √n_k, one per class, without bias), its c, t* and shrunk value s = σ t*.
    """
    if isinstance(n, (list, tuple, np.ndarray)):
        K = _check_K(K)
        sizes = list(np.ravel(n)) if isinstance(n, np.ndarray) else list(n)
        if len(sizes) == 1:
            sizes = sizes * K
        if len(sizes) != K:
            raise ValueError(f"n: give one class size for all classes or K = {K} sizes, one per class "
                             f"(got {len(sizes)})")
        for x in sizes:
            _check_n(x)  # names n, as the command's --n
        counts = _check_counts(sizes)
        if np.any(counts != counts[0]):
            return _imbalanced_report(counts, lams, bool(bias))
        n = counts[0]
    p = predict(K, n, lams, bias=bias)
    names = _factor_names(p.m)
    kind = {2: "plain UFM", 3: "extended UFM (linear)"}.get(p.m, f"deep linear UFM, L = {p.m - 1}")
    lam_s = ", ".join(f"λ_{nm} = {lam:g}" for nm, lam in zip(names, p.lams))
    cname = "c = K√(nλ_Hλ_W)" if p.m == 2 else f"c_{p.m} = K(nΛ)^(1/{p.m})"
    lines = [
        f"Model: {kind}, m = {p.m} factors, K = {p.K}, n = {p.n:g}, N = {p.K * p.n:g}, "
        f"{'unregularised bias' if p.bias else 'no bias'}",
        f"  λ (H1 first): {lam_s}",
        f"  {cname} = {_fixed(p.c)}    c_crit = {_fixed(p.c_crit)}"
        + ("" if p.m == 2 else "  (transition is discontinuous; 0 is always a local min)"),
        f"  t* = {_fixed(p.t_star)}    f* = {_fixed(p.f_star)}",
    ]
    if p.collapsed_to_zero:
        lines.append("  Optimum: ZERO solution (c >= c_crit): all factors vanish"
                     + (", b* = (1/K)1" if p.bias else ""))
        return "\n".join(lines)
    lines.append("  Optimum: non-zero, NC1 at every feature level")
    for nm, v in zip(names, p.factor_sq_norms):
        lines.append(f"    ‖{nm}‖_F² = {v:.8g}")
    lines.append(f"    λ_i‖A_i‖² = {p.lam_sq_norm:.8g} for every factor (balanced)")
    geom = "a simplex ETF, Gram g(I − 11ᵀ/K)" if p.bias else "an orthogonal frame, Gram g I"
    for l, (g, mu) in enumerate(zip(p.gram_scale, p.mean_sq_norms), start=1):
        lvl = "H" if p.m == 2 else f"H{l}"
        lines.append(f"    level {lvl}: class means form {geom}, g = {g:.8g}, ‖μ_k‖² = {mu:.8g}")
    e2e = "t*(I − 11ᵀ/K)" if p.bias else "t* I"
    lines.append(f"    end-to-end: W_L⋯W_1 M_1 = {e2e}")
    if p.m == 2:
        lines.append(f"    W–H relation: w_k = √(nλ_H/λ_W) μ_k = {p.w_coeff:.8g} μ_k;  ρ = {p.rho:.8g}")
    else:
        lines.append(f"    classifier: W_{p.m - 1} = κ M_{p.m - 1}ᵀ, κ = {p.w_coeff:.8g}")
    if p.bias:
        lines.append(f"    bias: b* = (1/K)1 = {1.0 / p.K:.8g}·1, global mean μ_G = 0")
    return "\n".join(lines)


def _imbalanced_report(counts: np.ndarray, lams, bias: bool) -> str:
    """:func:`format_report` for class sizes that differ: one line per singular value σ."""
    lams = _check_lams(lams)
    m, K, N = len(lams), len(counts), float(counts.sum())
    if bias:
        _check_fits(3 * 8 * K**2, "n", f"the {K}² eigenproblem of Y P")
    names = _factor_names(m)
    kind = {2: "plain UFM", 3: "extended UFM (linear)"}.get(m, f"deep linear UFM, L = {m - 1}")
    root = _product(lams).root(m)
    sig = _target_singular_values(counts, bias)
    s, val = _shrinkage(sig, N, root, m)
    cname = "c = N√Λ/σ" if m == 2 else f"c = NΛ^(1/{m})σ^(2/{m}−2)"
    lines = [
        f"Model: {kind}, m = {m} factors, K = {K}, imbalanced class sizes n_k = "
        f"{', '.join(f'{x:g}' for x in counts)}, N = {N:g}, {'unregularised bias' if bias else 'no bias'}",
        "  λ (H1 first): " + ", ".join(f"λ_{nm} = {lam:g}" for nm, lam in zip(names, lams)),
        "  one scalar problem per singular value σ of the targets "
        + ("(those of Y P, P = I − 11ᵀ/N: the bias fits the mean direction)" if bias else "(σ_k = √n_k)")
        + f", each with its own {cname}; c_crit = {_fixed(c_crit(m))}",
        f"    {'j' if bias else 'class  n_k':>10}  {'σ':>14}  {'c':>14}  {'t*':>10}  {'s = σt*':>14}  {'f* term':>14}",
    ]
    order = range(K) if not bias else np.argsort(-sig, kind="stable")
    zero = []
    for j, idx in enumerate(order, 1):
        sg = float(sig[idx])
        if sg == 0.0:
            c_txt, t = "—", 0.0
        else:
            sq = _Wide.of(sg) * _Wide.of(sg)
            c = float(_Wide.of(N) * root * sq.root(m) / sq)
            c_txt, t = (_fixed(c) if math.isfinite(c) else "> 1.8e308"), float(s[idx]) / sg
            if t == 0.0:
                zero.append(str(j))
        head = f"{j}" if bias else f"{j:>5}  {counts[idx]:>3g}"
        lines.append(f"    {head:>10}  {sg:>14.8g}  {c_txt:>14}  {t:>10.8f}  {float(s[idx]):>14.8g}  "
                     f"{float(val[idx]):>14.8g}")
    lines.append(f"  f* = Σ f* terms = {_fixed(float(np.sum(val)))}")
    what = "directions" if bias else "classes"
    if len(zero) == (K - 1 if bias else K):
        lines.append("  Optimum: ZERO solution (every c >= c_crit): all factors vanish" + (", b* = n/N" if bias else ""))
    elif zero:
        lines.append(f"  Optimum: the {what} {', '.join(zero)} vanish (c >= c_crit: t* = 0); the others are "
                     "shrunk to s = σ t*")
    else:
        lines.append(f"  Optimum: non-zero: every σ{' but the mean direction' if bias else ''} is shrunk to s = σ t* > 0")
    return "\n".join(lines)
