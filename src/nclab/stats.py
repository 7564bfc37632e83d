"""Streaming class statistics: collapse metrics without holding the features in memory.

:class:`ClassStats` accumulates, batch by batch, per class k the count n_k, the mean μ_k
and the within-class sum of squares m2_k = Σ_{i in k} ‖h_i - μ_k‖², and (``full=True``)
the pooled within-class scatter S_W = Σ_i (h_i - μ_{y_i})(h_i - μ_{y_i})ᵀ, so that
Σ_W = S_W / N. Memory: O(K·d + d²) with ``full=True``, O(K·d) without (then every metric
except the pseudo-inverse NC1 is available).

Partial results merge exactly with Chan et al.'s pairwise update (no Σh² - nμ² anywhere,
so a large common offset costs no precision): for parts A and B of class k with
δ_k = μ_k^B - μ_k^A,

    n_k = n_k^A + n_k^B,   μ_k = μ_k^A + δ_k n_k^B / n_k,
    m2_k = m2_k^A + m2_k^B + (n_k^A n_k^B / n_k) ‖δ_k‖²,
    S_W = S_W^A + S_W^B + Σ_k (n_k^A n_k^B / n_k) δ_k δ_kᵀ.

NC4 needs the final class means before it can look at a sample, so it takes a second
pass: :class:`NC4Counter`.
"""
from __future__ import annotations

import math
import numbers

import torch

from nclab._validate import (
    _INT_DTYPES, all_finite, as_float64, as_real, check_classifier, check_fits, check_rtol, max_abs, to_tensor,
)
from nclab.metrics import (
    RTOL, between_class_basis_t, centre, check_memory, finite_value, nc1_t, nc4_t, power_of_two_exponent,
    scaled_bias, summary_metrics_t, times_power_of_two,
)

#: ClassStats accepts float64 batches whose largest |entry| a has 2^-MOMENT_EXP <= a <=
#: 2^MOMENT_EXP (or a = 0): then every square, and every sum of up to 2^100 of them, is a
#: normal float64. Other dtypes always qualify (float32's range is 2^-149..2^128).
MOMENT_EXP = 400


class ClassStats:
    """Per-class count, mean, sum of squares (and pooled scatter) over batches.

    Args:
        num_classes: K. dim: d. full: keep the d x d scatter (needed for ``nc1``).
        device: where the statistics live (float64).
    Raises:
        ValueError naming ``num_classes`` when :meth:`memory_bytes` exceeds the device's
        memory (before allocating); in :meth:`update`, naming ``features`` for float64
        batches beyond 2^±MOMENT_EXP, whose squares would leave float64 (the error says
        which power of two to multiply by: every metric is scale-invariant).
    """

    def __init__(self, num_classes: int, dim: int, *, full: bool = True, device=None):
        if not _is_int(num_classes) or num_classes < 2:
            raise ValueError(f"num_classes: need an integer number of classes >= 2, got {num_classes!r}")
        if not _is_int(dim) or dim < 1:
            raise ValueError(f"dim: expected a positive integer feature dimension, got {dim!r}")
        num_classes, dim, full = int(num_classes), int(dim), bool(full)
        check_fits(self.memory_bytes(num_classes, dim, full), "num_classes",
                   f"ClassStats(num_classes={num_classes}, dim={dim}, full={full}) would", device)
        self.num_classes, self.dim, self.full = num_classes, dim, full
        kw = dict(dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, **kw)
        self.means = torch.zeros(num_classes, dim, **kw)
        self.m2 = torch.zeros(num_classes, **kw)
        self.scatter = torch.zeros(dim, dim, **kw) if full else None

    @staticmethod
    def memory_bytes(num_classes: int, dim: int, full: bool = True) -> int:
        """Peak bytes, about: K·d + 2K stored float64 values (+ d² with ``full``), and as
        many again three times over for an update's batch means, sums and merge (the
        batch's own (B, d) copies are the caller's to size)."""
        K, d = num_classes, dim
        return 8 * 4 * (K * d + 2 * K + (d * d if full else 0))

    # ------------------------------------------------------------------ accumulate
    def update(self, features, labels) -> "ClassStats":
        """Add a batch: features (B, d) (any float dtype/device), labels (B,) in 0..K-1."""
        H = as_real(features, "features", ndim=2, device=self.counts.device, check_finite=False)
        if H.shape[1] != self.dim:
            raise ValueError(f"features: expected {self.dim} columns, got {H.shape[1]}")
        _check_moment_range(H)
        H = H.to(torch.float64)
        y = to_tensor(labels, "labels", device=H.device)
        if y.dtype not in _INT_DTYPES or y.ndim != 1 or y.shape[0] != H.shape[0]:
            raise ValueError(f"labels: expected integer shape ({H.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        y = y.long()
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels: values must lie in 0..{self.num_classes - 1}")
        K = self.num_classes
        counts = torch.bincount(y, minlength=K).to(H.dtype)
        sums = torch.zeros(K, self.dim, dtype=H.dtype, device=H.device).index_add_(0, y, H)
        means = sums / counts.clamp(min=1)[:, None]
        D = H - means[y]
        m2 = torch.zeros(K, dtype=H.dtype, device=H.device).index_add_(0, y, D.square().sum(1))
        scatter = D.T @ D if self.full else None
        self._merge(counts, means, m2, scatter)
        return self

    def merge(self, other: "ClassStats") -> "ClassStats":
        """Fold another accumulator (same K, d) into this one, exactly (Chan et al.)."""
        if not isinstance(other, ClassStats):
            raise TypeError(f"other: expected a ClassStats, got {type(other).__name__}")
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise ValueError("other: merging statistics of a different K or d")
        scatter = other.scatter if self.full else None
        if self.full and scatter is None:
            raise ValueError("other: has no scatter (full=False); cannot merge into full=True")
        self._merge(other.counts, other.means, other.m2, scatter)
        return self

    def _merge(self, counts, means, m2, scatter):
        n = self.counts + counts
        safe = n.clamp(min=1)
        delta = means - self.means
        w = self.counts * counts / safe
        self.means = self.means + delta * (counts / safe)[:, None]
        self.m2 = self.m2 + m2 + w * delta.square().sum(1)
        if self.full:
            self.scatter = self.scatter + scatter + delta.T @ (delta * w[:, None])
        self.counts = n

    def all_reduce(self, group=None) -> "ClassStats":
        """Combine the statistics of every process of ``torch.distributed`` in place.

        Gathers each rank's (counts, means, m2, scatter) and merges them in rank order,
        so every rank ends with identical, exactly merged statistics.
        """
        import torch.distributed as dist

        world = dist.get_world_size(group)
        parts = [self.counts, self.means.flatten(), self.m2]
        if self.full:
            parts.append(self.scatter.flatten())
        flat = torch.cat(parts)
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat, group=group)
        K, d = self.num_classes, self.dim
        result = ClassStats(K, d, full=self.full, device=flat.device)
        for g in gathered:
            c, m, s = g[:K], g[K:K + K * d].view(K, d), g[K + K * d:2 * K + K * d]
            sc = g[2 * K + K * d:].view(d, d) if self.full else None
            result._merge(c, m, s, sc)
        self.counts, self.means, self.m2, self.scatter = result.counts, result.means, result.m2, result.scatter
        return self

    # ------------------------------------------------------------------ read out
    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def within_covariance(self) -> torch.Tensor:
        """Σ_W = S_W / N, shape (d, d) (``full=True`` only)."""
        if not self.full:
            raise ValueError("within_covariance needs full=True statistics")
        return self.scatter / self.counts.sum()

    def metrics(self, weights=None, rtol: float = RTOL) -> dict[str, float]:
        """The metrics of :func:`nclab.measure` except nc4 (and nc1 when ``full=False``)."""
        rtol = check_rtol(rtol)
        empty = torch.nonzero(self.counts == 0).flatten().tolist()
        if empty:
            raise ValueError(f"labels: class(es) {empty[:10]} received no samples")
        check_memory(self.num_classes, self.dim, self.counts.device)
        W = None
        if weights is not None:
            W, _ = check_classifier(weights, None, self.num_classes, self.dim, device=self.counts.device)
            W = times_power_of_two(W, -power_of_two_exponent(max_abs(W)))  # its metrics are scale-free
        # at the scale 2^-e that brings the means to ordinary size (the Grams' squares fit)
        e = power_of_two_exponent(max_abs(self.means))
        M = times_power_of_two(self.means, -e)
        nc1 = None
        if self.full:
            U, inv_lam = between_class_basis_t(centre(M), rtol)
            Sigma_W = times_power_of_two(self.within_covariance, -2 * e)
            nc1 = nc1_t(torch.einsum("dr,de,er->r", U, Sigma_W, U), inv_lam)  # Σ_j u_jᵀΣ_W u_j / λ_j
        class_var = times_power_of_two(self.m2 / self.counts, -2 * e)
        raw = summary_metrics_t(M, self.counts, class_var, nc1, W)
        return {k: finite_value(k, v) for k, v in raw.items()}


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_moment_range(H: torch.Tensor) -> None:
    """NaN/Inf, or float64 magnitudes whose squares leave float64 (see MOMENT_EXP): an error."""
    if H.dtype != torch.float64:
        if not all_finite(H):
            raise ValueError("features: contains NaN or Inf; remove or fix those entries first")
        return
    a = max_abs(H)
    if not math.isfinite(a):
        raise ValueError("features: contains NaN or Inf; remove or fix those entries first")
    if a != 0.0 and not 2.0**-MOMENT_EXP <= a <= 2.0**MOMENT_EXP:
        e = math.frexp(a)[1]
        raise ValueError(
            f"features: entries up to {a:.3g} are too {'large' if e > 0 else 'small'} for ClassStats, "
            f"whose float64 second moments would {'overflow' if e > 0 else 'underflow'}; multiply "
            f"every batch by the same constant, e.g. 2.0**{-e} (every metric is scale-invariant)")


class NC4Counter:
    """Second-pass NC4: counts samples whose nearest class mean ≠ argmax(W h + b).

    Args:
        means: final class means (K, d), e.g. ``ClassStats.means``; weights (K, d); bias (K,) or None.

    Extreme magnitudes are handled by powers of two (exact): W, b by 2^-e_W at the start,
    each batch's H, the means and b by the 2^-e of that batch (:func:`nclab.metrics.rescaled`).
    """

    def __init__(self, means, weights, bias=None):
        self.means = as_float64(means, "means", ndim=2)
        K, d = self.means.shape
        W, b = check_classifier(weights, bias, K, d, device=self.means.device)
        e_w = power_of_two_exponent(max_abs(W))
        self.W, self.b = times_power_of_two(W, -e_w), scaled_bias(b, e_w)
        self.means_max = max_abs(self.means)
        self.mismatches = torch.zeros((), dtype=torch.float64, device=self.means.device)
        self.seen = torch.zeros_like(self.mismatches)

    def update(self, features) -> "NC4Counter":
        """Count a batch of features (B, d)."""
        H = as_real(features, "features", ndim=2, device=self.means.device, check_finite=False)
        if H.shape[1] != self.means.shape[1]:
            raise ValueError(f"features: expected {self.means.shape[1]} columns (the means' d), got {H.shape[1]}")
        a = max_abs(H)
        if not math.isfinite(a):
            raise ValueError("features: contains NaN or Inf; remove or fix those entries first")
        e = power_of_two_exponent(max(a, self.means_max))
        H, M = times_power_of_two(H.to(torch.float64), -e), times_power_of_two(self.means, -e)
        self.mismatches += nc4_t(H, M, self.W, scaled_bias(self.b, e)) * H.shape[0]
        self.seen += H.shape[0]
        return self

    def all_reduce(self, group=None) -> "NC4Counter":
        import torch.distributed as dist

        both = torch.stack([self.mismatches, self.seen])
        dist.all_reduce(both, group=group)
        self.mismatches, self.seen = both[0], both[1]
        return self

    @property
    def value(self) -> float:
        if float(self.seen) == 0:
            raise ValueError("NC4Counter: no samples seen")
        return float(self.mismatches / self.seen)
