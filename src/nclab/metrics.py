"""Neural-collapse metrics (docs/metrics.md): pure functions, float64 inside, floats out.

Layout: features are rows, ``H`` of shape (N, d); ``labels`` (N,) integers in 0..K-1;
classifier ``W`` (K, d), ``b`` (K,). numpy arrays and torch tensors on any device are
accepted; everything is computed in float64 on the input's device.

Conventions of :func:`measure` (default, ``preset=None``)
----------------------------------------------------------
=================  ====================================================================
key                definition
=================  ====================================================================
nc1                (1/K) Tr(Σ_W Σ_B⁺), Σ_W = (1/N) Σ_i (h_i-μ_{y_i})(h_i-μ_{y_i})ᵀ,
                   Σ_B = (1/K) Σ_k (μ_k-μ_G)(μ_k-μ_G)ᵀ, μ_G = mean of the K class means
nc1_trace          Tr Σ_W / Tr Σ_B
cdnv               mean over k<k' of (σ_k² + σ_k'²) / (2‖μ_k - μ_k'‖²), σ_k² = mean ‖h-μ_k‖²
nc2_etf            ‖G̃/‖G̃‖_F - E_K‖_F, G̃ = M̃ M̃ᵀ the Gram of the centred means
nc2_of             ‖G/‖G‖_F - O_K‖_F,  G = M Mᵀ the Gram of the uncentred means
nc2w_etf, nc2w_of  the same with W Wᵀ (weights are not centred: a bias absorbs their mean)
nc3_etf            ‖W/‖W‖_F - M̃/‖M̃‖_F‖_F   (alignment with the centred means)
nc3_of             ‖W/‖W‖_F - M/‖M‖_F‖_F    (alignment with the uncentred means)
nc3_duality_etf    ‖W M̃ᵀ/‖W M̃ᵀ‖_F - E_K‖_F  (Zhu et al. 2021)
nc3_duality_of     ‖W Mᵀ/‖W Mᵀ‖_F - O_K‖_F
nc4                fraction of samples with argmin_k ‖h-μ_k‖ ≠ argmax_k (W h + b)_k
=================  ====================================================================

Further metrics (also in the default output; docs/metrics.md §2.1), m̂_k = μ̃_k/‖μ̃_k‖:
``equinorm_*`` std/mean of ‖μ̃_k‖ (features) or ‖w_k‖ (weights); ``equiangular_*`` std over
k≠k' of the cosines; ``maxangle_*`` mean over k≠k' of |cos + 1/(K-1)|; ``hu_log`` mean over
k≠k' of -log‖m̂_k - m̂_k'‖; ``hu_riesz`` mean of ‖m̂_k - m̂_k'‖^(-s); ``uniform_duality``
std_k/mean_k of cos(w_k, μ̃_k); ``cdnv_q<q>`` the CDNV with ‖μ_k - μ_k'‖^q (q != 2).
Every K x K quantity is computed in tiles (:mod:`nclab.tiles`).

(M, M̃ are K x d here: row k is μ_k or μ_k - μ_G; the math of docs/metrics.md writes their
transposes.) E_K, O_K: :func:`nclab.frames.simplex_etf`, :func:`nclab.frames.orthogonal_frame`.

Presets of other papers' conventions (``measure(..., preset=...)``):

* ``"papyan2020"`` (Papyan, Han & Donoho 2020): ``nc1`` = Tr(Σ_W Σ_B⁺) (no 1/K);
  the equinorm, equiangular and maxangle values of features and weights (as above);
  ``nc3`` = ‖W/‖W‖_F - M̃/‖M̃‖_F‖_F² (squared); ``nc4`` as above.
* ``"zhu2021"`` (Zhu et al. 2021): ``nc1`` as default; ``nc2_features`` = nc2_etf;
  ``nc2_weights`` = nc2w_etf; ``nc3`` = nc3_duality_etf; ``nc4``.

Numerics: Σ_B has rank ≤ K-1, so Σ_B⁺ is never formed from the d x d matrix. The K x K
Gram G̃ = V Λ Vᵀ is eigen-decomposed in float64, eigenvalues λ_j > ``rtol`` · max λ are
kept (default ``rtol = 1e-10``: eigenvalue errors are ~K·eps·max λ), U = M̃ᵀ V Λ^{-1/2}
spans the between-class directions and NC1 = Σ_j (u_jᵀ Σ_W u_j) / λ_j, where
u_jᵀ Σ_W u_j is the mean square of the class-centred features projected on u_j. This is
a sum of non-negative terms: NC1 is never negative and is exactly 0 at exact collapse.
NC4's two rules are decided cheaply (nearest mean from the K projections above, logits
in float32 for float32 features) under a proven error bound: a row clear of a tie by more
than the bound gets the answer of exact arithmetic, the others are recomputed in float64
the plain way (see ``_NC4Rule``). So NC4 equals the plain float64 count wherever float64
itself can tell the two best classes apart.

Scale: every metric is invariant to h → a·h (with b → a·b) and to W → c·W (with b → c·b).
Float64 features or weights whose largest entry lies outside [2^-64, 2^64] are first
multiplied by an exact power of two that brings it into [1/2, 1) (:func:`rescaled`), so
features of 1e200 or 1e-300 give the same values as features of 1 (the Grams are squared
in the frame distances, ~entry⁴, and would overflow or underflow otherwise).

The underscored ``*_t`` functions are the batched kernels shared with the UFM engine and
:mod:`nclab.stats`: they take float64 tensors with optional leading batch dimensions
(features (..., N, d), means (..., K, d)) and return tensors, NaN where undefined.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple

import torch

from nclab._validate import (
    _INT_DTYPES, DegenerateError, all_finite, as_float64, as_labels, as_real, check_classifier, check_fits,
    check_rtol, max_abs, to_tensor,
)
from nclab.frames import orthogonal_frame, simplex_etf
from nclab.tiles import (
    BYTES_PER_TILE_ENTRY, DEFAULT_TILE_MEMORY, PairOptions, cdnv_rows, frame_distance, pair_metrics, tile_rows,
)

#: relative eigenvalue cut-off of the centred-mean Gram (see the module docstring)
RTOL = 1e-10

EPS64 = float(torch.finfo(torch.float64).eps)

#: float64 inputs whose largest |entry| a lies outside [2^-SAFE_EXP, 2^SAFE_EXP] are first
#: multiplied (exactly) by the power of two that brings a into [1/2, 1) (see :func:`rescaled`):
#: the frame distances square the Grams, ~a⁴, which must stay well inside float64's range
SAFE_EXP = 64

PRESETS = ("papyan2020", "zhu2021")


# ----------------------------------------------------------------------------- kernels
#: bytes of float64 rows converted at a time: a reused buffer this size stays in cache
#: (a fresh 30 MB allocation per chunk made the pass 2-3x slower: new pages are zeroed)
CHUNK_BYTES = 1 << 23


def _row_chunks(shape: torch.Size, width: int = 0) -> list[slice]:
    """Row slices of an (..., N, d) array whose float64 copy, and a (..., rows, width)
    product of it, take about CHUNK_BYTES each."""
    *batch, N, d = shape
    rows = max(1, CHUNK_BYTES // (8 * max(d, width) * math.prod(batch)))
    return [slice(i, min(i + rows, N)) for i in range(0, N, rows)]


def _float64_chunks(H: torch.Tensor, width: int = 0):
    """Yield (rows, H[..., rows, :] in float64), converting into one reused buffer.

    Chunks are sized for per-row products of ``width`` columns too (:func:`_row_chunks`).
    The yielded tensor is overwritten by the next chunk: use it before asking for more.
    """
    chunks = _row_chunks(H.shape, width)
    if H.dtype == torch.float64:
        yield from ((rows, H[..., rows, :]) for rows in chunks)
        return
    buffer = H.new_empty(*H.shape[:-2], chunks[0].stop, H.shape[-1], dtype=torch.float64)
    for rows in chunks:
        out = buffer[..., : rows.stop - rows.start, :]
        out.copy_(H[..., rows, :])
        yield rows, out


def class_means_t(H: torch.Tensor, y: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means (..., K, d) in float64 and counts (K,) of features H (..., N, d), labels y (N,)."""
    counts = torch.bincount(y, minlength=K).to(torch.float64)
    sums = torch.zeros(*H.shape[:-2], K, H.shape[-1], dtype=torch.float64, device=H.device)
    for rows, Hs in _float64_chunks(H):
        sums.index_add_(-2, y[rows], Hs)
    return sums / counts[:, None], counts


def centre(M: torch.Tensor) -> torch.Tensor:
    """M̃ = M - μ_G with μ_G the mean of the K rows (class means), shape (..., K, d)."""
    return M - M.mean(dim=-2, keepdim=True)


def between_class_basis_t(Mc: torch.Tensor, rtol: float = RTOL):
    """Orthonormal basis of the span of the centred means, and Σ_B's scaled eigenvalues.

    Works on whichever of the K x K Gram M̃M̃ᵀ and the d x d matrix M̃ᵀM̃ is smaller: both
    have the same nonzero eigenvalues λ_j (= K · eigenvalues of Σ_B).

    Args:
        Mc: centred means M̃ (..., K, d).
    Returns:
        U (..., d, r), r = min(K, d), whose columns are orthonormal eigenvectors of M̃ᵀM̃
        for kept eigenvalues (λ_j > ``rtol`` · max λ; for K <= d they are u_j = M̃ᵀv_j/sqrt(λ_j)
        from M̃M̃ᵀ v_j = λ_j v_j) and 0 otherwise; inv_lam (..., r) = 1/λ_j for kept
        eigenvalues, else 0. NaN where M̃ = 0.
    """
    K, d = Mc.shape[-2:]
    lam, V = torch.linalg.eigh(Mc @ Mc.mT if K <= d else Mc.mT @ Mc)
    lam_max = lam.amax(dim=-1, keepdim=True)
    keep = lam > rtol * lam_max
    safe = torch.where(keep, lam, torch.ones_like(lam))
    inv_lam = torch.where(keep, 1.0 / safe, torch.zeros_like(lam))
    U = Mc.mT @ (V * inv_lam.sqrt()[..., None, :]) if K <= d else V * keep[..., None, :]
    inv_lam = torch.where(lam_max <= 0, torch.full_like(inv_lam, math.nan), inv_lam)
    return U, inv_lam


class WithinPass(NamedTuple):
    """Results of :func:`within_class_pass_t` (N samples, K classes, r = U's columns)."""

    class_var: torch.Tensor      # σ_k² = mean over class k of ‖h - μ_k‖², (..., K)
    quad: torch.Tensor           # diag(Uᵀ Σ_W U) = mean over samples of (Dᵀu_j)², (..., r)
    nc4: torch.Tensor | None     # NC4 (...), when W is given
    nc1_class: torch.Tensor | None   # per class: (1/N) Σ_{i in k} Σ_j (dᵢᵀu_j)²/λ_j (K,), with inv_lam
    nc4_class: torch.Tensor | None   # per class: number of NC4 mismatches (K,), with W and inv_lam


def within_class_pass_t(H, y, M, U, W=None, b=None, inv_lam=None) -> WithinPass:
    """One pass over the class-centred features D = H - M[y], chunk by chunk.

    ``inv_lam`` (r,) (2-D inputs only) also gives the per-class breakdowns: class k's
    part of NC1 (they sum to NC1) and its NC4 mismatches.
    """
    K, N = M.shape[-2], H.shape[-2]
    zeros = dict(dtype=torch.float64, device=H.device)
    sq = torch.zeros(*M.shape[:-1], **zeros)
    quad = torch.zeros(*M.shape[:-2], U.shape[-1], **zeros)
    per_class = inv_lam is not None
    nc1_class = torch.zeros(K, **zeros) if per_class else None
    nc4_class = torch.zeros(K, **zeros) if per_class and W is not None else None
    nc4_rule = None if W is None else _NC4Rule.for_inputs(H, M, U, W, b)
    mismatches = torch.zeros(M.shape[:-2], **zeros)
    buffer = None
    for rows, Hs in _float64_chunks(H, width=K):  # P and NC4's scores have K columns
        ys = y[rows]
        if buffer is None:
            buffer = torch.empty_like(Hs)
        D = torch.index_select(M, -2, ys, out=buffer[..., : Hs.shape[-2], :])
        D = torch.sub(Hs, D, out=D)
        d_norm = torch.linalg.vector_norm(D, dim=-1)
        sq.index_add_(-1, ys, d_norm.square())
        P = D @ U
        P2 = P.square()
        quad += P2.sum(-2)
        if per_class:
            nc1_class.index_add_(0, ys, P2 @ inv_lam)
        if nc4_rule is not None:
            wrong = nc4_rule.mismatch(_Chunk(H[..., rows, :], Hs, ys, d_norm, P))
            mismatches += wrong.sum(-1)
            if nc4_class is not None:
                nc4_class.index_add_(0, ys, wrong.to(torch.float64))
    counts = torch.bincount(y, minlength=K).to(torch.float64)
    nc4 = None if W is None else mismatches / N
    return WithinPass(sq / counts, quad / N, nc4, None if nc1_class is None else nc1_class / N, nc4_class)


class _Chunk(NamedTuple):
    """Rows of the within-class pass: input features (n, d) as given and in float64,
    labels (n,), ‖h - μ_y‖ (n,) and P = (h - μ_y)ᵀU (n, K)."""

    H_in: torch.Tensor
    H64: torch.Tensor
    y: torch.Tensor
    d_norm: torch.Tensor
    P: torch.Tensor


#: the fast NC4 rule keeps K x K and K x r matrices; above this K the plain rule is used
FAST_NC4_MAX_K = 4096


class _NC4Rule:
    """NC4 counted chunk by chunk: plainly (:func:`nc4_t`), or fast with exact decisions.

    The fast rule (2-D inputs) decides most rows cheaply: a row whose top-two margin
    exceeds a bound on the cheap rule's error gets the answer of exact arithmetic; the
    others are recomputed in float64 exactly as :func:`nc4_t` does.

    * nearest mean from the K numbers P = Uᵀd (d = h - μ_y) instead of the d numbers of h:
      ‖h - μ_k‖² = ‖h - μ_G‖² + ‖m̃_k‖² - 2(G̃_{y,k} + m̃_kᵀd) with G̃ = M̃M̃ᵀ, and
      m̃_kᵀd = (A P)_k + E_k d, where A = M̃U and E = M̃ - AUᵀ (zero when U spans the centred
      means; what the eigenvalue cut-off dropped otherwise): each score errs by at most
      2e‖d‖, e = max_k ‖E_k‖, so a margin above 4e‖d‖ plus a rounding bound decides;
    * argmax(Wh + b) in float32 when the features are float32 on the CPU: float32 dot
      products of length d err by at most γ(‖w_k‖‖h‖ + |b_k|), γ = (d+2)·2⁻²⁴, in any
      summation order and with W, b rounded to float32 (Higham, Accuracy and Stability,
      §3.1), so a top-two margin above 2γ(max‖w_k‖‖h‖ + max|b_k|) decides the row.
    """

    def __init__(self, M, W, b, U=None, float32_logits=False):
        self.M, self.W, self.b = M, W, b
        self.fast = U is not None
        self.recomputed = {"means": 0, "logits": 0}  # rows decided by the float64 fallback
        if not self.fast:
            return
        K, d = M.shape
        Mc = centre(M)
        self.A = Mc @ U
        self.G = Mc @ Mc.mT
        self.m_sq = self.G.diagonal()
        m = float(self.m_sq.max().sqrt())
        self.e = float((Mc - self.A @ U.mT).norm(dim=-1).max())
        self.round = 16 * EPS64 * (d + K) * math.sqrt(K) * m  # × (m + ‖d‖) per row
        self.m = m
        self.mu_norm = M.norm(dim=-1)
        self.W32 = W.to(torch.float32) if float32_logits else None
        self.b32 = None if b is None or not float32_logits else b.to(torch.float32)
        self.gamma = 1.01 * (d + 2) * 2.0**-24
        self.w_max = float(W.norm(dim=-1).max())
        self.b_max = 0.0 if b is None else float(b.abs().max())

    @classmethod
    def for_inputs(cls, H, M, U, W, b):
        """The fast rule for 2-D inputs whose K x K Gram is small (FAST_NC4_MAX_K), else the plain one."""
        if H.ndim != 2 or W.ndim != 2 or M.shape[-2] > FAST_NC4_MAX_K:
            return cls(M, W, b)
        return cls(M, W, b, U, float32_logits=H.dtype == torch.float32 and _ieee_float32_matmul(H.device))

    def mismatch(self, c: _Chunk) -> torch.Tensor:
        """Per row of chunk ``c`` (..., n): whether its nearest mean ≠ argmax(W h + b)."""
        if not self.fast:
            return nc4_rows_t(c.H64, self.M, self.W, self.b)
        return self._nearest_mean(c) != self._classifier(c)

    def _nearest_mean(self, c: _Chunk) -> torch.Tensor:
        s = self.m_sq - 2 * (self.G[c.y] + c.P @ self.A.mT)  # ‖h - μ_k‖² - ‖h - μ_G‖²
        tol = 4 * self.e * c.d_norm + self.round * (self.m + c.d_norm)
        choice, unsure = _decide(s.neg(), tol, c, lambda h: -(self.M.square().sum(-1) - 2 * h @ self.M.mT))
        self.recomputed["means"] += unsure
        return choice

    def _classifier(self, c: _Chunk) -> torch.Tensor:
        if self.W32 is None:
            logits = c.H64 @ self.W.mT
            return (logits if self.b is None else logits + self.b).argmax(-1)
        logits = c.H_in @ self.W32.mT
        if self.b32 is not None:
            logits += self.b32
        h_norm = c.d_norm + self.mu_norm[c.y]  # ≥ ‖h‖
        tol = 2 * self.gamma * (self.w_max * h_norm + self.b_max)
        choice, unsure = _decide(logits, tol, c, lambda h: h @ self.W.mT + (0 if self.b is None else self.b))
        self.recomputed["logits"] += unsure
        return choice


def _decide(scores, tol, c: _Chunk, exact: Callable) -> tuple[torch.Tensor, int]:
    """argmax per row of ``scores`` (n, K; overwritten). Rows whose top-two margin is not
    above ``tol`` (n,), or is not finite, get the argmax of ``exact(h)`` computed from their
    float64 features. Returns the choices (n,) and how many rows were recomputed."""
    best, choice = scores.max(dim=-1)
    runner_up = scores.scatter_(-1, choice[:, None], -math.inf).amax(dim=-1)  # (topk is slow)
    unsure = ~(best - runner_up > tol.to(scores.dtype))
    rows = unsure.nonzero().squeeze(1)
    if len(rows):
        choice[rows] = exact(c.H64[rows]).argmax(-1)
    return choice, len(rows)


def _ieee_float32_matmul(device: torch.device) -> bool:
    """True when float32 matmuls on ``device`` are plain IEEE float32 (no TF32/bf16)."""
    if device.type != "cpu" or torch.get_float32_matmul_precision() != "highest":
        return False
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    return getattr(mkldnn, "fp32_precision", "none") in ("none", "ieee")


def nc1_t(quad: torch.Tensor, inv_lam: torch.Tensor):
    """NC1 = (1/K) Tr(Σ_W Σ_B⁺) = Σ_j (u_jᵀ Σ_W u_j)/λ_j, shape (...).

    ``quad`` = diag(Uᵀ Σ_W U) (..., K) for the basis U of :func:`between_class_basis_t`,
    from the features (:func:`within_class_pass_t`) or from a streamed Σ_W.
    """
    return (quad * inv_lam).sum(-1)


def nc1_trace_t(class_var: torch.Tensor, counts: torch.Tensor, Mc: torch.Tensor):
    """Tr Σ_W / Tr Σ_B, with Tr Σ_W = Σ_k n_k σ_k² / N and Tr Σ_B = ‖M̃‖²/K."""
    tr_w = (class_var * counts).sum(-1) / counts.sum()
    tr_b = Mc.square().sum((-2, -1)) / Mc.shape[-2]
    return tr_w / tr_b


def cdnv_t(class_var: torch.Tensor, M: torch.Tensor):
    """Mean over pairs k<k' of (σ_k² + σ_k'²) / (2‖μ_k - μ_k'‖²), shape (...).

    The distances come from ``cdist`` on the differences (not the Gram trick, which
    cancels): K x K memory instead of the K(K-1)/2 x d of indexing the pairs.
    """
    K = M.shape[-2]
    i, j = torch.triu_indices(K, K, offset=1, device=M.device)
    dist2 = torch.cdist(M, M, compute_mode="donot_use_mm_for_euclid_dist")[..., i, j].square()
    return ((class_var[..., i] + class_var[..., j]) / (2 * dist2)).mean(-1)


def frame_distance_t(G: torch.Tensor, frame: torch.Tensor):
    """‖G/‖G‖_F - frame‖_F for K x K matrices G (..., K, K)."""
    return (G / torch.linalg.matrix_norm(G)[..., None, None] - frame).flatten(-2).norm(dim=-1)


def alignment_t(W: torch.Tensor, M: torch.Tensor):
    """‖W/‖W‖_F - M/‖M‖_F‖_F for (..., K, d) tensors."""
    Wn = W / torch.linalg.matrix_norm(W)[..., None, None]
    Mn = M / torch.linalg.matrix_norm(M)[..., None, None]
    return (Wn - Mn).flatten(-2).norm(dim=-1)


def nearest_mean_t(M: torch.Tensor, HMt: torch.Tensor) -> torch.Tensor:
    """The nearest class mean of each sample, argmin_k ‖h - μ_k‖² = argmin_k ‖μ_k‖² - 2 μ_kᵀh,
    from the means M (..., K, d) and the products HMt = H Mᵀ (..., N, K): indices (..., N)."""
    return (M.square().sum(-1)[..., None, :] - 2 * HMt).argmin(-1)


def nc4_rows_chunked_t(H: torch.Tensor, M: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
                       e: int = 0) -> torch.Tensor:
    """:func:`nc4_rows_t` of H·2^-e (N, d) for any N and K: float64 row chunks whose 2K
    scores per row stay near CHUNK_BYTES. Returns (N,) booleans."""
    return torch.cat([nc4_rows_t(times_power_of_two(Hs, -e), M, W, b)
                      for _, Hs in _float64_chunks(H, width=2 * M.shape[-2])])


def nc4_rows_t(H: torch.Tensor, M: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None):
    """Per sample (..., N): whether the nearest class mean ≠ argmax(W h + b).

    The nearest mean is argmin_k ‖μ_k‖² - 2 μ_kᵀh (= argmin ‖h - μ_k‖²), computed in
    float64 with one matmul for both rules.
    """
    K = M.shape[-2]
    scores = H @ torch.cat([M, W], dim=-2).mT
    ncc = nearest_mean_t(M, scores[..., :K])
    logits = scores[..., K:]
    if b is not None:
        logits = logits + b[..., None, :]
    return ncc != logits.argmax(-1)


def nc4_t(H: torch.Tensor, M: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None):
    """Fraction of samples where nearest class mean ≠ argmax(W h + b), shape (...)."""
    return nc4_rows_t(H, M, W, b).to(torch.float64).mean(-1)


def collapse_metrics_t(H, y, K, W=None, b=None, rtol: float = RTOL, means=None,
                       extras: PairOptions | None = None, count_nc4: bool = True) -> dict[str, torch.Tensor]:
    """All default metrics as float64 tensors of shape (...) for features H (..., N, d).

    ``means``: the (M, counts) of :func:`class_means_t` when already computed;
    ``extras``: also the further metrics of :func:`summary_metrics_t` (2-D inputs);
    ``count_nc4=False`` leaves NC4 out (the caller counts it on a sample).
    """
    M, counts = means if means is not None else class_means_t(H, y, K)
    U, inv_lam = between_class_basis_t(centre(M), rtol)
    within = within_class_pass_t(H, y, M, U, W if count_nc4 else None, b)
    out = summary_metrics_t(M, counts, within.class_var, nc1_t(within.quad, inv_lam), W, extras)
    if within.nc4 is not None:
        out["nc4"] = within.nc4
    return out


#: the order of the default metrics in every result dict
ORDER = ("nc1", "nc1_trace", "cdnv", "nc2_etf", "nc2_of", "nc2w_etf", "nc2w_of", "nc3_etf", "nc3_of",
         "nc3_duality_etf", "nc3_duality_of")
#: the further metrics (``extras``), in their order
EXTRAS = ("equinorm_features", "equiangular_features", "maxangle_features", "hu_log", "hu_riesz",
          "equinorm_weights", "equiangular_weights", "maxangle_weights", "uniform_duality")


def summary_metrics_t(M, counts, class_var, nc1=None, W=None, extras: PairOptions | None = None):
    """Every metric except NC4 from class statistics (shared by in-memory and streaming).

    Args:
        M: class means (..., K, d); counts: (K,); class_var: σ_k² (..., K);
        nc1: the value of :func:`nc1_t`, or None to leave it out; W: (..., K, d) or None;
        extras: with :class:`nclab.tiles.PairOptions`, also the further metrics (EXTRAS,
            and cdnv_q when its exponent is not 2); 2-D inputs only.
    Small K without extras (the UFM solver's per-step log, batched over problems) forms the
    K x K Grams whole; otherwise :func:`nclab.tiles.pair_metrics` visits them in tiles.
    """
    K = M.shape[-2]
    if extras is None and (M.ndim > 2 or tile_rows(K) == K):
        return _batched_summary(M, counts, class_var, nc1, W)
    if M.ndim != 2:
        raise ValueError(f"means: the tiled metrics take one problem (K, d), got shape {tuple(M.shape)}")
    Mc = centre(M)
    pairs = pair_metrics(M, class_var, W, extras or PairOptions())
    out = {} if nc1 is None else {"nc1": nc1}
    out["nc1_trace"] = nc1_trace_t(class_var, counts, Mc)
    if W is not None:
        out["nc3_etf"], out["nc3_of"] = (float(v) for v in alignment_t(W, torch.stack([Mc, M])))
    out |= {k: pairs[k] for k in ORDER if k in pairs}
    if extras is None:
        return {key: out[key] for key in ORDER if key in out}
    r = Mc.norm(dim=-1)
    out |= {k: pairs[k] for k in ("equiangular_features", "maxangle_features", "hu_log", "hu_riesz")}
    out["equinorm_features"] = r.std() / r.mean()
    if W is not None:
        w = W.norm(dim=-1)
        out |= {"equinorm_weights": w.std() / w.mean(), "equiangular_weights": pairs["equiangular_weights"],
                "maxangle_weights": pairs["maxangle_weights"], "uniform_duality": uniform_duality_t(W, Mc)}
    ordered = {key: out[key] for key in ORDER + EXTRAS if key in out}
    if "cdnv_q" in pairs:
        ordered[cdnv_q_key(extras.cdnv_exponent)] = pairs["cdnv_q"]
    return ordered


#: the default keys that need the classifier weights
WEIGHT_KEYS = ("nc2w_etf", "nc2w_of", "nc3_etf", "nc3_of", "nc3_duality_etf", "nc3_duality_of")


def metric_keys(nc1: bool = True, weights: bool = False) -> tuple[str, ...]:
    """The keys of ``ClassStats.metrics`` (and of ``measure`` without nc4): the default ones
    (with nc1, with the weights' ones) and the further ones that need no option."""
    keep = [k for k in ORDER if (nc1 or k != "nc1") and (weights or k not in WEIGHT_KEYS)]
    return (*keep, *(k for k in EXTRAS if weights or not (k.endswith("_weights") or k == "uniform_duality")))


def finite_values(raw: dict) -> dict[str, float]:
    """``raw`` as Python floats. An undefined default metric raises :class:`DegenerateError`
    (:func:`finite_value`); an undefined further metric (EXTRAS, cdnv_q: e.g. the angles of a
    zero weight row, or a class mean at the global mean) is left out, so the rest survive."""
    out = {}
    for key, value in raw.items():
        if key in EXTRAS or key.startswith("cdnv_q"):
            value = float(value)
            if math.isfinite(value):
                out[key] = value
        else:
            out[key] = finite_value(key, value)
    return out


def cdnv_q_key(q: float) -> str:
    """Result key of the generalised CDNV with distance exponent q, e.g. cdnv_q1 or cdnv_q0.5."""
    return f"cdnv_q{q:g}"


def uniform_duality_t(W: torch.Tensor, Mc: torch.Tensor):
    """Coefficient of variation std_k(c_k)/mean_k(c_k) of c_k = cos(w_k, μ_k - μ_G) (K values)."""
    c = (W * Mc).sum(-1) / (W.norm(dim=-1) * Mc.norm(dim=-1))
    return c.std() / c.mean()


def _batched_summary(M, counts, class_var, nc1, W):
    """The default metrics with whole K x K Grams, batched over leading dimensions."""
    K = M.shape[-2]
    E, O = simplex_etf(K, device=M.device), orthogonal_frame(K, device=M.device)
    Mc = centre(M)
    out = {} if nc1 is None else {"nc1": nc1}
    out["nc1_trace"] = nc1_trace_t(class_var, counts, Mc)
    out["cdnv"] = cdnv_t(class_var, M)
    grams = {"nc2_etf": (Mc @ Mc.mT, E), "nc2_of": (M @ M.mT, O)}
    if W is not None:
        WWt = W @ W.mT
        grams.update(nc2w_etf=(WWt, E), nc2w_of=(WWt, O),
                     nc3_duality_etf=(W @ Mc.mT, E), nc3_duality_of=(W @ M.mT, O))
        aligned = alignment_t(W[..., None, :, :], torch.stack([Mc, M], dim=-3))
        out["nc3_etf"], out["nc3_of"] = aligned[..., 0], aligned[..., 1]
    # one batched call for all frame distances (small problems are bound by per-call cost)
    dist = frame_distance_t(torch.stack([g for g, _ in grams.values()], dim=-3),
                            torch.stack([f for _, f in grams.values()]))
    out.update({key: dist[..., i] for i, key in enumerate(grams)})
    return {key: out[key] for key in ORDER if key in out}


# ------------------------------------------------------------------ scale
def power_of_two_exponent(a: float) -> int:
    """e with a·2^-e in [1/2, 1) when a > 0 lies outside [2^-SAFE_EXP, 2^SAFE_EXP], else 0."""
    if a == 0.0 or 2.0**-SAFE_EXP <= a <= 2.0**SAFE_EXP:
        return 0
    return math.frexp(a)[1]


def times_power_of_two(t: torch.Tensor, e: int) -> torch.Tensor:
    """t · 2^e, exact unless a result leaves float64's normal range (two factors: 2^e
    alone need not be a float64 when t is subnormal)."""
    if e == 0:
        return t
    half = e // 2
    return t * 2.0**half * 2.0 ** (e - half)


def rescaled(H, W=None, b=None, with_exponent: bool = False):
    """(H·2^-e_H, W·2^-e_W, b·2^-(e_H+e_W)) with ordinary magnitudes (see SAFE_EXP),
    and e_H as a fourth element when ``with_exponent``.

    Every metric is invariant under these: the Σs scale together, the frames are
    normalised, and argmax(Wh + b) is that of 2^-(e_H+e_W)(Wh + b). Only float64
    features can need it (the squares of any other dtype fit float64), so the extra pass
    over H (``aminmax``, also the NaN/Inf check) is made for float64 features only.
    """
    e_h = 0
    if H.dtype == torch.float64:
        a = max_abs(H)
        if not math.isfinite(a):
            raise ValueError("features: contains NaN or Inf; remove or fix those entries first")
        e_h = power_of_two_exponent(a)
    e_w = 0 if W is None else power_of_two_exponent(max_abs(W))
    W = None if W is None else times_power_of_two(W, -e_w)
    out = times_power_of_two(H, -e_h), W, scaled_bias(b, e_h + e_w)
    return (*out, e_h) if with_exponent else out


def scaled_bias(b: torch.Tensor | None, e: int):
    """b · 2^-e for logits scaled by 2^-e, or a clear error when that overflows."""
    if b is None or e == 0:
        return b
    b = times_power_of_two(b, -e)
    if not all_finite(b):
        raise ValueError("bias: some entries are more than 1e308 times the logits W h (features and "
                         "weights this small), so W h + b overflows once rescaled; scale weights and bias together")
    return b


def metrics_memory_bytes(K: int, d: int, tile_memory: int = DEFAULT_TILE_MEMORY) -> int:
    """Working memory of the metrics beyond the class statistics, about: six K x d float64
    copies (centred, normalised, scaled means and weights), the tiles of the K x K
    quantities (at most ``tile_memory``), four r x r matrices of the eigen-decomposition
    (r = min(K, d)) and three d x d Grams of the frame-norm estimates."""
    r = min(K, d)
    return 8 * (6 * K * d + 4 * r * r + 3 * d * d) + min(tile_memory, BYTES_PER_TILE_ENTRY * K * K)


def check_memory(K: int, d: int, device=None, tile_memory: int = DEFAULT_TILE_MEMORY) -> None:
    """Raise before allocating when the metrics' working memory (:func:`metrics_memory_bytes`) cannot fit."""
    check_fits(metrics_memory_bytes(K, d, tile_memory), "labels", f"the metrics of K = {K} classes in d = {d}",
               device)


# ------------------------------------------------------------------ public functions
def _prepare(features, labels, num_classes=None, check_finite: bool = True, tile_memory=DEFAULT_TILE_MEMORY):
    H = as_real(features, "features", ndim=2, check_finite=check_finite)
    if H.shape[1] == 0:
        raise ValueError("features: has 0 columns; need a feature dimension d >= 1")
    y, K = as_labels(labels, H.shape[0], num_classes=num_classes, device=H.device)
    check_memory(K, H.shape[1], H.device, tile_memory)
    return H, y, K


def finite_value(name: str, value: torch.Tensor) -> float:
    """``value`` as a float, or a DegenerateError naming metric ``name`` when it is NaN/Inf."""
    v = float(value)
    if not math.isfinite(v):
        raise DegenerateError(
            f"{name} is undefined for these inputs (the class means coincide, or a "
            "Gram/weight matrix is zero); nothing has collapsed to a frame to measure"
        )
    return v


def class_means(features, labels, num_classes: int | None = None) -> torch.Tensor:
    """Class means μ_k as a float64 tensor (K, d), for any label order and class sizes.

    Summed at a power-of-two scale when the features are extreme, so the sums never overflow.
    """
    H, y, K = _prepare(features, labels, num_classes)
    e = power_of_two_exponent(max_abs(H)) if H.dtype == torch.float64 else 0
    return times_power_of_two(class_means_t(times_power_of_two(H, -e), y, K)[0], e)


def nc1(features, labels, num_classes=None, rtol: float = RTOL) -> float:
    """NC1 = (1/K) Tr(Σ_W Σ_B⁺) (see the module docstring for the numerics)."""
    return measure(features, labels, num_classes=num_classes, rtol=rtol)["nc1"]


def nc1_trace(features, labels, num_classes=None) -> float:
    """Tr Σ_W / Tr Σ_B (no pseudo-inverse)."""
    return measure(features, labels, num_classes=num_classes)["nc1_trace"]


def cdnv(features, labels, num_classes=None) -> float:
    """Class-distance normalised variance (Galanti et al. 2022), averaged over pairs."""
    return measure(features, labels, num_classes=num_classes)["cdnv"]


def nc2(features, labels, frame: str = "etf", num_classes=None) -> float:
    """Distance of the normalised class-mean Gram to a frame: "etf" (centred) or "of" (uncentred)."""
    if frame not in ("etf", "of"):
        raise ValueError(f"frame: expected 'etf' or 'of', got {frame!r}")
    H, y, K = _prepare(features, labels, num_classes)
    H, _, _ = rescaled(H)
    M, _ = class_means_t(H, y, K)
    return finite_value(f"nc2_{frame}", frame_distance(centre(M) if frame == "etf" else M, frame))


def nc2_weights(weights, frame: str = "etf") -> float:
    """Distance of the normalised W Wᵀ (K x K, visited in tiles) to the simplex ETF or orthogonal frame."""
    W = as_float64(weights, "weights", ndim=2)
    K = W.shape[0]
    if frame not in ("etf", "of"):
        raise ValueError(f"frame: expected 'etf' or 'of', got {frame!r}")
    if K < 2:
        raise ValueError("weights: need at least 2 rows (classes)")
    check_memory(K, W.shape[1], W.device)
    W = times_power_of_two(W, -power_of_two_exponent(max_abs(W)))
    return finite_value(f"nc2w_{frame}", frame_distance(W, frame))


def nc4(features, labels, weights, bias=None, num_classes=None) -> float:
    """Fraction of samples where the nearest-class-mean rule disagrees with argmax(Wh + b)."""
    return measure(features, labels, weights, bias, num_classes=num_classes)["nc4"]


@torch.inference_mode()
def measure(features, labels, weights=None, bias=None, preset: str | None = None,
            num_classes: int | None = None, rtol: float = RTOL, *, cdnv_exponent: float = 2.0,
            riesz_s: float = 1.0, classes=None, nc4_rows: int | None = None,
            tile_memory: int = DEFAULT_TILE_MEMORY) -> dict[str, float]:
    """Every collapse metric of docs/metrics.md for features from anywhere.

    Args:
        features: (N, d) array or tensor; labels: (N,) integers in 0..K-1 (any order,
        any class sizes, every class present); weights: optional (K, d); bias: optional
        (K,); preset: None, "papyan2020" or "zhu2021" (see the module docstring);
        num_classes: K when it is not max(labels) + 1 (K <= N: every class occurs);
        rtol: relative eigenvalue cut-off for Σ_B⁺, float64 eps <= rtol < 1;
        cdnv_exponent: q of the generalised CDNV (also reported as cdnv_q<q> when q != 2);
        riesz_s: s of the Riesz energy hu_riesz; classes: measure only these classes (a
        list of labels, relabelled in that order), or an int M for the M most frequent;
        nc4_rows: count NC4 on a seeded uniform sample of this many rows (reported as
        nc4_rows when that is fewer than N; all rows otherwise); tile_memory: bytes of working memory for the K x K quantities.
    Returns:
        A flat dict of Python floats. Without a preset: nc1, nc1_trace, cdnv, nc2_etf,
        nc2_of and, with weights, nc2w_etf, nc2w_of, nc3_etf, nc3_of, nc3_duality_etf,
        nc3_duality_of; then equinorm_features, equiangular_features, maxangle_features,
        hu_log, hu_riesz and, with weights, equinorm_weights, equiangular_weights,
        maxangle_weights, uniform_duality, nc4 (nc4_rows when sampled).
    Raises:
        TypeError / ValueError naming the bad argument; DegenerateError (a ValueError)
        when a metric is undefined (all class means equal, zero weights).
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset: expected None or one of {PRESETS}, got {preset!r}")
    rtol = check_rtol(rtol)
    options = pair_options(cdnv_exponent, riesz_s, tile_memory)
    H, y, K, W, b = _prepare_all(features, labels, weights, bias, num_classes, classes, options.memory)
    if preset in ("papyan2020",) and W is None:
        raise ValueError(f"weights: preset {preset!r} needs the classifier weights")
    nc4_rows = check_count(nc4_rows, "nc4_rows")
    H, W, b, e = rescaled(H, W, b, with_exponent=True)
    means = class_means_t(H, y, K)
    if not bool(torch.isfinite(means[0]).all()) and not all_finite(H):  # NaN/Inf reach the means
        raise ValueError("features: contains NaN or Inf; remove or fix those entries first")
    sample = nc4_rows is not None and nc4_rows < H.shape[0]
    raw = collapse_metrics_t(H, y, K, W, None if sample else b, rtol, means=means, extras=options,
                             count_nc4=not sample)
    unscale_cdnv_q(raw, options, e)
    if sample and W is not None:
        rows = torch.randperm(H.shape[0], generator=torch.Generator().manual_seed(0))[:nc4_rows].to(H.device)
        raw["nc4"] = nc4_rows_chunked_t(H[rows], means[0], W, b).to(torch.float64).mean()
        raw["nc4_rows"] = float(nc4_rows)
    if preset == "papyan2020":
        raw = _papyan2020(raw, K)
    elif preset == "zhu2021":
        keep = {"nc1": "nc1", "nc2_etf": "nc2_features", "nc2w_etf": "nc2_weights",
                "nc3_duality_etf": "nc3", "nc4": "nc4", "nc4_rows": "nc4_rows"}
        raw = {new: raw[old] for old, new in keep.items() if old in raw}
    return finite_values(raw)


def pair_options(cdnv_exponent=2.0, riesz_s=1.0, tile_memory=DEFAULT_TILE_MEMORY) -> PairOptions:
    """Checked :class:`nclab.tiles.PairOptions` (errors name the argument)."""
    for name, v in (("cdnv_exponent", cdnv_exponent), ("riesz_s", riesz_s)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name}: expected a positive finite number, got {v!r}")
    if isinstance(tile_memory, bool) or not isinstance(tile_memory, numbers.Integral) or tile_memory < 1 << 20:
        raise ValueError(f"tile_memory: expected bytes as an integer >= 2**20 (1 MiB), got {tile_memory!r}; "
                         f"the default is {DEFAULT_TILE_MEMORY} (1 GiB)")
    return PairOptions(float(cdnv_exponent), float(riesz_s), int(tile_memory))


def unscale_cdnv_q(raw: dict, options: PairOptions, e: int) -> None:
    """cdnv_q of features scaled by 2^-e back to their scale: × 2^(e(2 - q)) (the only metric with units)."""
    key = cdnv_q_key(options.cdnv_exponent)
    if key in raw and e:
        log2 = math.log2(raw[key]) + e * (2 - options.cdnv_exponent) if raw[key] > 0 else -math.inf
        if log2 >= 1024:
            raise ValueError(f"cdnv_exponent: {key} of features this large (about 2^{e}) exceeds float64 "
                             f"(2^{log2:.0f}); scale the features down, or use q = 2 (scale-free)")
        raw[key] = raw[key] * 2.0 ** (e * (2 - options.cdnv_exponent)) if log2 > -1074 else 0.0


def check_count(n, name: str) -> int | None:
    """None, or a positive integer (else ValueError naming ``name``)."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{name}: expected a positive integer, got {n!r}")
    return int(n)


def class_subset(counts: torch.Tensor, classes) -> torch.Tensor:
    """The labels of a subset of classes (M,): ``classes`` as given (distinct labels in
    0..K-1, at least 2), or for an int M the M most frequent (ties: the smaller label)."""
    K = len(counts)
    if isinstance(classes, numbers.Integral) and not isinstance(classes, bool):
        if not 2 <= classes <= K:
            raise ValueError(f"classes: the number of most frequent classes must lie in 2..{K}, got {classes}")
        order = torch.sort(-counts.to(torch.float64), stable=True).indices
        return order[: int(classes)]
    sel = to_tensor(classes, "classes").flatten()
    if sel.dtype not in _INT_DTYPES or len(sel) < 2:
        raise ValueError("classes: expected an int M (the M most frequent) or a list of at least 2 class labels")
    sel = sel.long().to(counts.device)
    if int(sel.min()) < 0 or int(sel.max()) >= K or len(torch.unique(sel)) != len(sel):
        raise ValueError(f"classes: the labels must be distinct and lie in 0..{K - 1}")
    return sel


def _prepare_all(features, labels, weights, bias, num_classes, classes, tile_memory):
    """Checked (H, y, K, W, b), restricted to ``classes`` (relabelled 0..M-1 in their order)."""
    H, y, K = _prepare(features, labels, num_classes, check_finite=False, tile_memory=tile_memory)
    W = b = None
    if weights is not None:
        W, b = check_classifier(weights, bias, K, H.shape[1], device=H.device)
    elif bias is not None:
        raise ValueError("bias: given without weights; pass weights=W (K, d) as well")
    if classes is None:
        return H, y, K, W, b
    sel = class_subset(torch.bincount(y, minlength=K), classes)
    new_label = torch.full((K,), -1, dtype=torch.long, device=y.device)
    new_label[sel] = torch.arange(len(sel), device=y.device)
    keep = new_label[y] >= 0
    W = None if W is None else W[sel]
    b = None if b is None else b[sel]
    return H[keep], new_label[y[keep]], len(sel), W, b


def _papyan2020(raw, K):
    out = {"nc1": raw["nc1"] * K}
    for name in ("features", "weights"):
        for kind in ("equinorm", "equiangular", "maxangle"):
            out[f"{kind}_{name}"] = raw[f"{kind}_{name}"]
    out["nc3"] = raw["nc3_etf"] ** 2
    out["nc4"] = raw["nc4"]
    return out | ({"nc4_rows": raw["nc4_rows"]} if "nc4_rows" in raw else {})


@torch.inference_mode()
def per_class(features, labels, weights=None, bias=None, num_classes: int | None = None, rtol: float = RTOL,
              *, classes=None, tile_memory: int = DEFAULT_TILE_MEMORY) -> dict:
    """Each class's part of the collapse metrics, as numpy arrays of shape (K,).

    Returns:
        count n_k; variance σ_k²; nc1_share, class k's part of NC1 (the shares sum to 1):
        (1/(N·NC1)) Σ_{i in k} Σ_j (dᵢᵀu_j)²/λ_j with dᵢ = hᵢ - μ_k and the eigenpairs
        (λ_j, u_j) of M̃ᵀM̃; cdnv_row, the mean over k' ≠ k of (σ_k² + σ_k'²)/(2‖μ_k - μ_k'‖²)
        (their mean is cdnv); mean_norm ‖μ_k - μ_G‖; and with weights: weight_norm ‖w_k‖,
        duality cos(w_k, μ_k - μ_G), nc4_error, the fraction of class k's samples whose
        nearest class mean ≠ argmax(W h + b). nc1_share is NaN when NC1 = 0. ``classes``:
        as in :func:`measure` (the arrays then follow the subset's order).
    """
    options = pair_options(tile_memory=tile_memory)
    H, y, K, W, b = _prepare_all(features, labels, weights, bias, num_classes, classes, options.memory)
    rtol = check_rtol(rtol)
    weight_norm = None if W is None else W.to(torch.float64).norm(dim=-1)
    H, W, b, e = rescaled(H, W, b, with_exponent=True)
    M, counts = class_means_t(H, y, K)
    Mc = centre(M)
    U, inv_lam = between_class_basis_t(Mc, rtol)
    within = within_class_pass_t(H, y, M, U, W, b, inv_lam=inv_lam)
    mean_norm = Mc.norm(dim=-1)
    out = {"count": counts, "variance": times_power_of_two(within.class_var, 2 * e),
           "nc1_share": within.nc1_class / within.nc1_class.sum(),
           "cdnv_row": cdnv_rows(M, within.class_var, options),
           "mean_norm": times_power_of_two(mean_norm, e)}
    if W is not None:
        w = W.norm(dim=-1)
        out |= {"weight_norm": weight_norm, "duality": (W * Mc).sum(-1) / (w * mean_norm), "nc4_error": within.nc4_class / counts}
    return {k: v.cpu().numpy() for k, v in out.items()}
