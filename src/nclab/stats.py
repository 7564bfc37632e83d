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
    RTOL, between_class_basis_t, centre, check_memory, class_subset, finite_values, nc1_t,
    nc4_rows_chunked_t, pair_options, power_of_two_exponent, scaled_bias, summary_metrics_t, times_power_of_two,
    unscale_cdnv_q,
)
from nclab.tiles import DEFAULT_TILE_MEMORY, cdnv_rows

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
        """Bytes of the statistics, about: K·d + 2K float64 values (+ d² with ``full``), twice
        (a merge of all classes, :meth:`merge` or :meth:`all_reduce`, builds new ones). An
        update touches only the classes of its batch (its own (B, d) copies are the caller's
        to size)."""
        K, d = num_classes, dim
        return 8 * 2 * (K * d + 2 * K + (d * d if full else 0))

    # ------------------------------------------------------------------ accumulate
    def update(self, features, labels) -> "ClassStats":
        """Add a batch: features (B, d) (any float dtype, e.g. float32 or bfloat16, on any
        device), labels (B,) in 0..K-1. Accumulated in float64; only the classes present in
        the batch are touched, so a batch costs O(B·d + d²), not O(K·d)."""
        H = as_real(features, "features", ndim=2, device=self.counts.device, check_finite=False)
        if H.shape[1] != self.dim:
            raise ValueError(f"features: expected {self.dim} columns, got {H.shape[1]}")
        _check_moment_range(H)
        H = H.to(torch.float64)
        y = batch_labels(labels, H.shape[0], self.num_classes, H.device)
        if self.counts.is_inference() and not torch.is_inference_mode_enabled():
            self._own_tensors()  # made under torch.inference_mode: in-place updates need normal tensors
        present, local = torch.unique(y, return_inverse=True)  # the batch's classes, relabelled 0..u-1
        u = len(present)
        counts = torch.bincount(local, minlength=u).to(H.dtype)
        means = torch.zeros(u, self.dim, dtype=H.dtype, device=H.device).index_add_(0, local, H) / counts[:, None]
        D = H - means[local]
        m2 = torch.zeros(u, dtype=H.dtype, device=H.device).index_add_(0, local, D.square().sum(1))
        scatter = D.T @ D if self.full else None
        self._merge(counts, means, m2, scatter, rows=present)
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

    def _own_tensors(self) -> None:
        self.counts, self.means, self.m2 = self.counts.clone(), self.means.clone(), self.m2.clone()
        self.scatter = None if self.scatter is None else self.scatter.clone()

    def _merge(self, counts, means, m2, scatter, rows=None):
        """Chan et al.'s update (module docstring) of the classes ``rows`` (all when None)."""
        old_n = self.counts if rows is None else self.counts[rows]
        old_mu = self.means if rows is None else self.means[rows]
        n = old_n + counts
        safe = n.clamp(min=1)
        delta = means - old_mu
        w = old_n * counts / safe
        mu = old_mu + delta * (counts / safe)[:, None]
        new_m2 = (self.m2 if rows is None else self.m2[rows]) + m2 + w * delta.square().sum(1)
        if self.full:
            self.scatter = self.scatter + scatter + delta.T @ (delta * w[:, None])
        if rows is None:
            self.counts, self.means, self.m2 = n, mu, new_m2
        else:
            self.counts[rows], self.means[rows], self.m2[rows] = n, mu, new_m2

    def all_reduce(self, group=None) -> "ClassStats":
        """Combine the statistics of every process of ``torch.distributed`` in place.

        Gathers each rank's (counts, means, m2, scatter) and merges them in rank order;
        the merge of the group's first rank is then broadcast, so every rank ends with
        bitwise identical, exactly merged statistics (BLAS may round a product differently
        with the alignment of its buffers, so merging alone can differ in the last bit).
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
        merged = torch.cat([result.counts, result.means.flatten(), result.m2]
                           + ([result.scatter.flatten()] if self.full else []))
        dist.broadcast(merged, src=0 if group is None else dist.get_global_rank(group, 0), group=group)
        self.counts, self.means, self.m2 = merged[:K], merged[K:K + K * d].view(K, d), merged[K + K * d:2 * K + K * d]
        self.scatter = merged[2 * K + K * d:].view(d, d) if self.full else None
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

    def metrics(self, weights=None, rtol: float = RTOL, *, cdnv_exponent: float = 2.0, riesz_s: float = 1.0,
                tile_memory: int = DEFAULT_TILE_MEMORY) -> dict[str, float]:
        """The metrics of :func:`nclab.measure` except nc4 (and nc1 when ``full=False``).

        Memory beyond the statistics: :func:`nclab.metrics.metrics_memory_bytes` (the K x K
        quantities in tiles of ``tile_memory`` bytes); NC1 through the smaller of the K x K
        and d x d eigenproblems.
        """
        rtol = check_rtol(rtol)
        options = pair_options(cdnv_exponent, riesz_s, tile_memory)
        M, class_var, W, e = self._scaled(weights, options.memory)
        nc1 = None
        if self.full:
            U, inv_lam = between_class_basis_t(centre(M), rtol)
            Sigma_W = times_power_of_two(self.within_covariance, -2 * e)
            nc1 = nc1_t(((Sigma_W @ U) * U).sum(0), inv_lam)  # Σ_j u_jᵀΣ_W u_j / λ_j
        raw = summary_metrics_t(M, self.counts, class_var, nc1, W, extras=options)
        unscale_cdnv_q(raw, options, e)
        return finite_values(raw)

    def per_class(self, weights=None, *, tile_memory: int = DEFAULT_TILE_MEMORY) -> dict:
        """Each class's part of the metrics, numpy arrays (K,): count, variance σ_k²,
        variance_share n_k σ_k² / Σ n σ² (class k's part of Tr Σ_W, hence of nc1_trace),
        cdnv_row (mean CDNV term against the other classes), mean_norm ‖μ_k - μ_G‖ and, with
        weights, weight_norm ‖w_k‖ and duality cos(w_k, μ_k - μ_G). NC1 shares and NC4 error
        rates need the samples again (:func:`nclab.per_class` on features, or
        :class:`NC4Counter`'s per_class_errors)."""
        options = pair_options(tile_memory=tile_memory)
        M, class_var, W, e = self._scaled(weights, options.memory)
        Mc = centre(M)
        mean_norm = Mc.norm(dim=-1)
        spread = self.counts * class_var
        out = {"count": self.counts, "variance": times_power_of_two(class_var, 2 * e),
               "variance_share": spread / spread.sum(), "cdnv_row": cdnv_rows(M, class_var, options),
               "mean_norm": times_power_of_two(mean_norm, e)}
        if W is not None:
            w = W.norm(dim=-1)
            out |= {"weight_norm": as_float64(weights, "weights", ndim=2).norm(dim=-1),
                    "duality": (W * Mc).sum(-1) / (w * mean_norm)}
        return {k: v.cpu().numpy() for k, v in out.items()}

    def subset(self, classes) -> "ClassStats":
        """The statistics of some classes only, relabelled 0..M-1 in the given order:
        ``classes`` a list of labels, or an int M for the M most frequent. The result has
        full=False (the pooled scatter cannot be split by class), so every metric but nc1."""
        sel = class_subset(self.counts, classes).to(self.counts.device)
        out = ClassStats(len(sel), self.dim, full=False, device=self.counts.device)
        out.counts, out.means, out.m2 = self.counts[sel].clone(), self.means[sel].clone(), self.m2[sel].clone()
        return out

    def _scaled(self, weights, tile_memory):
        """(M·2^-e, σ²·2^-2e, W·2^-e_W, e): the means at an ordinary scale (their Grams' squares fit)."""
        empty = torch.nonzero(self.counts == 0).flatten().tolist()
        if empty:
            raise ValueError(f"labels: class(es) {empty[:10]} received no samples")
        check_memory(self.num_classes, self.dim, self.counts.device, tile_memory)
        W = None
        if weights is not None:
            W, _ = check_classifier(weights, None, self.num_classes, self.dim, device=self.counts.device)
            W = times_power_of_two(W, -power_of_two_exponent(max_abs(W)))  # its metrics are scale-free
        e = power_of_two_exponent(max_abs(self.means))
        M = times_power_of_two(self.means, -e)
        return M, times_power_of_two(self.m2 / self.counts, -2 * e), W, e


def batch_labels(labels, n: int, K: int, device) -> torch.Tensor:
    """The labels of a batch of n samples as int64 (n,) in 0..K-1 on ``device``, or a ValueError naming them."""
    y = to_tensor(labels, "labels", device=device)
    if y.dtype not in _INT_DTYPES or y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels: expected integer shape ({n},), got {y.dtype} {tuple(y.shape)}")
    y = y.long()
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= K):
        raise ValueError(f"labels: values must lie in 0..{K - 1}")
    return y


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
        self.class_errors = torch.zeros(K, dtype=torch.float64, device=self.means.device)
        self.class_seen = torch.zeros_like(self.class_errors)

    def update(self, features, labels=None) -> "NC4Counter":
        """Count a batch of features (B, d); with labels (B,) also per class (:attr:`per_class_errors`).

        Rows go through in chunks whose 2K scores per row stay near a few MB, so any K works.
        """
        H = as_real(features, "features", ndim=2, device=self.means.device, check_finite=False)
        K, d = self.means.shape
        if H.shape[1] != d:
            raise ValueError(f"features: expected {d} columns (the means' d), got {H.shape[1]}")
        y = None if labels is None else batch_labels(labels, H.shape[0], K, H.device)
        a = max_abs(H)
        if not math.isfinite(a):
            raise ValueError("features: contains NaN or Inf; remove or fix those entries first")
        e = power_of_two_exponent(max(a, self.means_max))
        M, b = times_power_of_two(self.means, -e), scaled_bias(self.b, e)
        wrong = nc4_rows_chunked_t(H, M, self.W, b, e).to(torch.float64)
        self.mismatches += wrong.sum()
        if y is not None:
            self.class_errors.index_add_(0, y, wrong)
            self.class_seen.index_add_(0, y, torch.ones_like(wrong))
        self.seen += H.shape[0]
        return self

    @property
    def per_class_errors(self):
        """NC4 error rate per class (K,) numpy, over the labelled batches (NaN for classes not seen)."""
        return (self.class_errors / self.class_seen).cpu().numpy()

    def all_reduce(self, group=None) -> "NC4Counter":
        import torch.distributed as dist

        both = torch.cat([torch.stack([self.mismatches, self.seen]), self.class_errors, self.class_seen])
        dist.all_reduce(both, group=group)
        K = len(self.class_errors)
        self.mismatches, self.seen = both[0], both[1]
        self.class_errors, self.class_seen = both[2:2 + K], both[2 + K:]
        return self

    @property
    def value(self) -> float:
        if float(self.seen) == 0:
            raise ValueError("NC4Counter: no samples seen")
        return float(self.mismatches / self.seen)
