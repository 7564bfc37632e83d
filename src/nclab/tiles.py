"""The K x K quantities of the class means, computed in row tiles with a bounded working set.

Every metric that compares classes pairwise lives on a K x K matrix: the Grams M̃M̃ᵀ, MMᵀ,
WWᵀ, WM̃ᵀ, WMᵀ (NC2, NC3 duality), the pairwise distances ‖μ_k - μ_k'‖ (CDNV), the cosines
and the distances of the normalised centred means (equiangularity, hyperspherical
uniformity). For K = 32,768 one such matrix is 8.6 GB of float64, so :func:`pair_metrics`
never forms one: it visits the matrices in tiles of ``b`` rows (b x K entries, ``b`` chosen
from a memory budget, see :func:`tile_rows`) and keeps only sums. Symmetric matrices are
visited on and above the diagonal (blocks above counted twice), so each costs K²d/2
multiply-adds. When one tile holds all K rows the Grams are formed whole.

Exactness (docs/metrics.md, "Exact at any K"):

* Frame distances ‖G/‖G‖_F - F‖_F need ‖G‖_F before the first tile. With several tiles
  it is estimated as g' (from the d x d Grams, ‖ABᵀ‖_F² = ⟨AᵀA, BᵀB⟩_F, or a first pass
  over the tiles when d >= K) and the sums are corrected exactly once the true
  g = sqrt(Σ G_ij²) is known: with X = G/g' - F and r = g'/g,
  ‖G/g - F‖² = Σ X² + 2(r - 1) Σ X G/g' + (r - 1)² Σ G²/g'²  (an identity; no cancellation,
  since r - 1 is of the order of rounding).
* Squared distances come from the Gram, D_ij = n_i + n_j - 2 G̃_ij with n_i = ‖μ̃_i‖², whose
  rounding error is at most γ (r_i + r_j)², γ = (d + 4)u/(1 - (d + 4)u), u = 2⁻⁵³, r_i = ‖μ̃_i‖
  (the d-term dot products, the centring and the two additions; Higham, Accuracy and
  Stability, §3.1). A pair whose bound exceeds 2⁻⁴⁰ D_ij (about 9e-13 relative) is
  recomputed from the difference of its uncentred means, so every squared distance, and
  hence every CDNV term and their mean, is exact to 2⁻⁴⁰ relative. The distances of the
  normalised means m̂_i = μ̃_i/r_i (hyperspherical energies) get the same test (bound
  4(2d + 10)u: the cosines' rounding and ‖m̂_i‖² ≠ 1), and uncertified pairs are recomputed
  from m̂_i - m̂_j: accurate to rounding relative to 1, i.e. about u/‖m̂_i - m̂_j‖² relative, the
  conditioning of a direction known only up to the rounding of the centring (2 - 2cos from
  the Gram would lose another factor d, or all digits).
* The spread of the cosines (equiangularity) is merged tile by tile with Chan et al.'s
  update of (count, mean, sum of squared deviations), never as E[c²] - E[c]².
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: bytes of tile work per call when the caller gives no budget (about 12 b x K float64 arrays)
DEFAULT_TILE_MEMORY = 1 << 30
#: bytes per entry of a b x K tile: the Gram tile, the distances, their bounds and masks, the terms
BYTES_PER_TILE_ENTRY = 8 * 12
#: pairs whose squared distance is not certified to this relative accuracy are recomputed
PAIR_RTOL = 2.0**-40
U64 = 2.0**-53


def tile_rows(K: int, memory: int = DEFAULT_TILE_MEMORY) -> int:
    """Rows b of a tile: b x K entries take about ``memory`` bytes (1 <= b <= K)."""
    return max(1, min(K, int(memory) // (BYTES_PER_TILE_ENTRY * K)))


def _gamma(n: int) -> float:
    return n * U64 / (1 - n * U64)


# ----------------------------------------------------------------------------- frames
def frame_entries(kind: str, K: int) -> tuple[float, float]:
    """(diagonal, off-diagonal) entry of the K x K frame: "etf" E_K = (I - 11ᵀ/K)/sqrt(K-1)
    (unit Frobenius norm, the normalised Gram of a simplex ETF) or "of" O_K = I/sqrt(K)."""
    if kind == "etf":
        return (1 - 1 / K) / math.sqrt(K - 1), -1 / (K * math.sqrt(K - 1))
    return 1 / math.sqrt(K), 0.0


class Tile:
    """Rows ``rows`` and columns ``cols`` of a K x K matrix. For a symmetric matrix visited on
    and above the diagonal (``upper``), the first ``rows.stop - cols.start`` columns are the
    diagonal block (weight 1) and the rest stand for their mirror image too (weight 2)."""

    def __init__(self, rows: slice, cols: slice, upper: bool):
        self.rows, self.cols, self.upper = rows, cols, upper
        self.inside = rows.stop - cols.start if upper else cols.stop - cols.start
        first = max(rows.start, cols.start)  # the diagonal entries (i, i) within the tile
        last = min(rows.stop, cols.stop)
        self.diag = (torch.arange(first - rows.start, last - rows.start),
                     torch.arange(first - cols.start, last - cols.start))

    def total(self, X: torch.Tensor) -> float:
        """Σ weight · X over the tile (all weights 1 unless ``upper``)."""
        return float(X[:, :self.inside].sum()) + 2 * float(X[:, self.inside:].sum())

    def total_sq(self, X: torch.Tensor) -> float:
        """Σ weight · X² over the tile (a plain sum of squares: vector_norm's square loses
        about 1e-12 relative on the CPU, too much for a frame distance near 0)."""
        return self.total(X.square())

    def diagonal(self, X: torch.Tensor) -> torch.Tensor:
        """The entries (i, i) of X within the tile (a view-indexed copy)."""
        return X[self.diag[0].to(X.device), self.diag[1].to(X.device)]

    def set_diagonal(self, X: torch.Tensor, value: float) -> None:
        X[self.diag[0].to(X.device), self.diag[1].to(X.device)] = value


class FrameDistance:
    """‖G/‖G‖_F - F‖_F accumulated over tiles of G, given an estimate g' of ‖G‖_F (module docstring)."""

    def __init__(self, kind: str, K: int, g_estimate: float):
        self.diag, self.off = frame_entries(kind, K)
        self.g = float(g_estimate)
        self.sum_x2 = self.sum_x = self.sum_x_diag = self.sum_t2 = 0.0

    def add(self, T: torch.Tensor, tile: Tile) -> None:
        """Tile T of G. Keeps Σ X², Σ X, Σ_diagonal X (X = G/g' - F) and Σ (G/g')², from which
        Σ X·G/g' = Σ X² + off·Σ X + (diag - off)·Σ_diagonal X follows (it only enters times r - 1)."""
        X = torch.div(T, self.g)
        self.sum_t2 += tile.total_sq(X)
        X.sub_(self.off)
        dX = tile.diagonal(X) - (self.diag - self.off)
        tile.set_diagonal(X, 0.0)
        self.sum_x2 += tile.total_sq(X) + float(dX.square().sum())
        self.sum_x += tile.total(X) + float(dX.sum())
        self.sum_x_diag += float(dX.sum())

    @property
    def value(self) -> float:
        if self.sum_t2 == 0.0 or self.g == 0.0:
            return math.nan
        r1 = 1.0 / math.sqrt(self.sum_t2) - 1.0  # g'/g - 1, with g = g' sqrt(Σ (G/g')²)
        sum_xg = self.sum_x2 + self.off * self.sum_x + (self.diag - self.off) * self.sum_x_diag
        D = self.sum_x2 + 2 * r1 * sum_xg + r1 * r1 * self.sum_t2
        return math.sqrt(max(D, 0.0))


def gram_norm_estimate(A: torch.Tensor, B: torch.Tensor, rows: int) -> float:
    """‖A Bᵀ‖_F for A (K_a, d), B (K_b, d): through the d x d Grams when d < K_b, else tile by tile."""
    d = A.shape[1]
    if d < B.shape[0]:
        return math.sqrt(max(float((A.mT @ A * (B.mT @ B)).sum()), 0.0))
    total = 0.0
    for i in range(0, A.shape[0], rows):
        total += float((A[i:i + rows] @ B.mT).square().sum())
    return math.sqrt(total)


# ----------------------------------------------------------------------------- running spread
@dataclass
class Spread:
    """Count, mean and sum of squared deviations of a stream of numbers (Chan et al.)."""

    n: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, values: torch.Tensor, times: int = 1) -> None:
        """Fold in ``values`` (any shape), each counted ``times`` times."""
        nb = values.numel()
        if nb == 0:
            return
        var, mb = torch.var_mean(values, correction=0)
        nb, m2b, mb = nb * times, float(var) * nb * times, float(mb)
        n = self.n + nb
        delta = mb - self.mean
        self.mean += delta * nb / n
        self.m2 += m2b + delta * delta * self.n * nb / n
        self.n = n

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1 in the denominator, as torch.std)."""
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else math.nan


# ----------------------------------------------------------------------------- pairwise distances
def certified_sq_dist(T: torch.Tensor, sq: torch.Tensor, tile: Tile, slack: float,
                      exact) -> tuple[torch.Tensor, int]:
    """Squared distances of a tile from its Gram tile, exact to PAIR_RTOL (module docstring).

    Args:
        T: Gram tile P[rows] P[cols]ᵀ (b, c); sq: ‖p_i‖² (K,); slack: γ of the rounding
        bound γ(‖p_i‖ + ‖p_j‖)² <= 2γ(‖p_i‖² + ‖p_j‖²); exact(i, j): the squared distances of
        the pairs (i, j) (index tensors into 0..K-1) computed without cancellation.
    Returns:
        (D (b, c), number of recomputed pairs). Diagonal entries (i = j) are left as computed.
    """
    rows, cols = tile.rows, tile.cols
    S = sq[rows, None] + sq[None, cols]
    D = torch.add(S, T, alpha=-2)
    unsure = ~(D >= S.mul_(2 * slack / PAIR_RTOL))  # also NaN
    tile.set_diagonal(unsure, False)
    bi, bj = unsure.nonzero(as_tuple=True)
    if len(bi):
        D[bi, bj] = exact(bi + rows.start, bj + cols.start)
    return D, len(bi)


def mean_differences(M: torch.Tensor):
    """exact(i, j) of :func:`certified_sq_dist` for the class means: ‖μ_i - μ_j‖² from the
    uncentred means (the difference is exact to rounding of its own size)."""
    return lambda i, j: (M[i] - M[j]).square().sum(-1)


def unit_differences(unit: torch.Tensor):
    """exact(i, j) for the normalised centred means m̂ (K, d): ‖m̂_i - m̂_j‖² from their
    difference, accurate to rounding relative to 1. Closer accuracy is not in float64's
    reach: the direction of μ̃_i = μ_i - μ_G is known to about u from the rounded centring,
    so the distance of two directions θ apart has a relative condition number ~ 1/θ."""
    return lambda i, j: (unit[i] - unit[j]).square().sum(-1)


# ----------------------------------------------------------------------------- the pass
@dataclass
class PairOptions:
    """Knobs of the pairwise metrics: the generalised CDNV's distance exponent q, the Riesz
    energy's s, and the tile memory in bytes."""

    cdnv_exponent: float = 2.0
    riesz_s: float = 1.0
    memory: int = DEFAULT_TILE_MEMORY


@dataclass
class _MeansPass:
    """Sums over the pairs of classes of the centred-mean Gram G̃ (one visit per tile)."""

    K: int
    options: PairOptions
    cdnv_rows: torch.Tensor
    cdnv_q_sum: float = 0.0
    log_energy: float = 0.0
    riesz_energy: float = 0.0
    recomputed: int = 0


def pair_metrics(M: torch.Tensor, class_var: torch.Tensor, W: torch.Tensor | None = None,
                 options: PairOptions | None = None) -> dict[str, torch.Tensor | float | int]:
    """Every K x K-based metric of class means M (K, d), σ_k² (K,) and weights W (K, d).

    Returns floats: cdnv, cdnv_q (when q != 2), hu_log, hu_riesz, nc2_etf, nc2_of,
    equiangular_features, maxangle_features and, with W, nc2w_etf, nc2w_of,
    nc3_duality_etf, nc3_duality_of, equiangular_weights, maxangle_weights; the tensor
    cdnv_row (K,) (each class's mean CDNV term over the other classes); the int
    recomputed_pairs (pairs whose distance the Gram could not certify). Formulas:
    docs/metrics.md.
    """
    options = options or PairOptions()
    K, d = M.shape
    b = tile_rows(K, options.memory)
    Mc = M - M.mean(0, keepdim=True)
    out: dict = {}
    sym = [("nc2_etf", Mc, "etf", True), ("nc2_of", M, "of", False)]
    if W is not None:
        sym.append(("nc2w", W, None, True))
    for key, A, kind, angles in sym:
        out |= _symmetric_pass(key, A, kind, b, angles, (Mc, M, class_var, options))
    if W is not None:
        out |= _duality_pass(W, Mc, M, b)
    return out


def cdnv_rows(M: torch.Tensor, class_var: torch.Tensor, options: PairOptions | None = None) -> torch.Tensor:
    """Each class's mean CDNV term over the other classes (K,): the ``cdnv_row`` of
    :func:`pair_metrics` from the one pass over the centred-mean Gram it needs."""
    options = options or PairOptions()
    Mc = M - M.mean(0, keepdim=True)
    b = tile_rows(M.shape[0], options.memory)
    return _symmetric_pass("nc2_etf", Mc, "etf", b, True, (Mc, M, class_var, options))["cdnv_row"]


def frame_distance(A: torch.Tensor, kind: str, memory: int = DEFAULT_TILE_MEMORY) -> float:
    """‖AAᵀ/‖AAᵀ‖_F - F‖_F for A (K, d) in tiles; F the "etf" or "of" frame (:func:`frame_entries`)."""
    return _symmetric_pass("gram", A, kind, tile_rows(A.shape[0], memory), False)["gram"]


def _symmetric_pass(key, A, kind, b, angles, means_of=None) -> dict:
    """One pass over the upper tiles of A Aᵀ: its frame distance(s) (``kind`` None: both), with
    ``angles`` the spread of its cosines, and with ``means_of`` = (M̃, M, σ², options) and
    A = M̃ the CDNV and hyperspherical sums of the centred means."""
    K = A.shape[0]
    Mc, M, class_var, options = means_of or (None, None, None, None)
    g = gram_norm_estimate(A, A, b) if b < K else None
    kinds = ("etf", "of") if kind is None else (kind,)
    norms = A.norm(dim=-1)
    inv_norms = 1.0 / norms
    angle_acc = _Angles(K)
    means = _MeansPass(K, options, torch.zeros(K, dtype=torch.float64, device=A.device)) if A is Mc else None
    unit = None if means is None else Mc / norms[:, None]  # the normalised centred means m̂
    frames = None
    for i in range(0, K, b):
        tile = Tile(slice(i, min(i + b, K)), slice(i, K), upper=True)
        T = A[tile.rows] @ A[tile.cols].mT
        if frames is None:  # with one tile, the Gram's exact norm
            frames = {k: FrameDistance(k, K, g or float(torch.linalg.vector_norm(T))) for k in kinds}
        for f in frames.values():
            f.add(T, tile)
        if not angles:
            continue
        cos = T * inv_norms[tile.rows, None]
        cos.mul_(inv_norms[None, tile.cols])
        angle_acc.add(cos, tile)
        if means is not None:
            _add_means_tile(means, T, cos, tile, Mc, M, norms, unit, class_var)
    if key == "nc2w":
        return {"nc2w_etf": frames["etf"].value, "nc2w_of": frames["of"].value,
                "equiangular_weights": angle_acc.cosines.std, "maxangle_weights": angle_acc.maxangle}
    out = {key: frames[kind].value}
    if means is not None:
        out |= _means_results(means, angle_acc)
    return out


class _Angles:
    """Spread of the cosines over k ≠ k' and Σ |cos + 1/(K-1)| (equiangularity, max-angle)."""

    def __init__(self, K: int):
        self.K, self.cosines, self.maxangle_sum = K, Spread(), 0.0

    def add(self, cos: torch.Tensor, tile: Tile) -> None:
        inside = cos[:, :tile.inside]
        off = torch.ones_like(inside, dtype=torch.bool)
        tile.set_diagonal(off, False)
        self.cosines.add(inside[off], 1)
        self.cosines.add(cos[:, tile.inside:], 2)
        c = 1 / (self.K - 1)
        shifted = torch.add(cos, c).abs_()
        self.maxangle_sum += tile.total(shifted) - float(tile.diagonal(shifted).sum())

    @property
    def maxangle(self) -> float:
        return self.maxangle_sum / (self.K * (self.K - 1))


def _add_means_tile(acc: _MeansPass, T, cos, tile: Tile, Mc, M, norms, unit, class_var) -> None:
    """CDNV and hyperspherical-uniformity sums of one tile of G̃ (module docstring)."""
    d = Mc.shape[1]
    D, n_re = certified_sq_dist(T, norms.square(), tile, _gamma(d + 4), mean_differences(M))
    terms = class_var[tile.rows, None] + class_var[None, tile.cols]
    q = acc.options.cdnv_exponent
    if q != 2.0:
        gen = torch.div(terms, D.pow(q / 2))
        tile.set_diagonal(gen, 0.0)
        acc.cdnv_q_sum += 0.5 * tile.total(gen)
    terms.div_(D).mul_(0.5)
    tile.set_diagonal(terms, 0.0)
    _add_rows(acc.cdnv_rows, terms, tile)
    # unit vectors m̂ = μ̃/‖μ̃‖: ‖m̂_i - m̂_j‖² = 2 - 2 cos_ij, certified like D
    U2, n_re_u = certified_sq_dist(cos, torch.ones_like(norms), tile, _gamma(2 * d + 10), unit_differences(unit))
    tile.set_diagonal(U2, 1.0)  # log 1 = 0; 1^(-s/2) = 1 (taken off below)
    acc.log_energy += -0.5 * tile.total(torch.log(U2))
    acc.riesz_energy += tile.total(U2.pow_(-acc.options.riesz_s / 2)) - len(tile.diag[0])
    acc.recomputed += n_re + n_re_u


def _add_rows(row_sums: torch.Tensor, terms: torch.Tensor, tile: Tile) -> None:
    """Add a symmetric matrix's upper tile to its row sums: row i gets Σ_j terms_ij, and the
    mirrored block beyond the diagonal block adds its column sums to rows j."""
    row_sums[tile.rows] += terms.sum(1)
    row_sums[tile.rows.stop:tile.cols.stop] += terms[:, tile.inside:].sum(0)


def _means_results(acc: _MeansPass, angles: _Angles) -> dict:
    K, pairs = acc.K, acc.K * (acc.K - 1)
    out = {"cdnv": float(acc.cdnv_rows.sum()) / pairs, "cdnv_row": acc.cdnv_rows / (K - 1)}
    if acc.options.cdnv_exponent != 2.0:
        out["cdnv_q"] = acc.cdnv_q_sum / pairs
    out |= {"hu_log": acc.log_energy / pairs, "hu_riesz": acc.riesz_energy / pairs,
            "equiangular_features": angles.cosines.std, "maxangle_features": angles.maxangle,
            "recomputed_pairs": acc.recomputed}
    return out


def _duality_pass(W, Mc, M, b) -> dict:
    """NC3 duality: W M̃ᵀ against the ETF and W Mᵀ against the OF, row tiles of W."""
    K = W.shape[0]
    frames = {}
    for key, B, kind in (("nc3_duality_etf", Mc, "etf"), ("nc3_duality_of", M, "of")):
        g = gram_norm_estimate(W, B, b) if b < K else None
        acc = None
        for i in range(0, K, b):
            tile = Tile(slice(i, min(i + b, K)), slice(0, K), upper=False)
            T = W[tile.rows] @ B.mT
            if acc is None:
                acc = FrameDistance(kind, K, g or float(torch.linalg.vector_norm(T)))
            acc.add(T, tile)
        frames[key] = acc.value
    return frames
