"""Reference frames and exactly collapsed configurations.

Both frames are K x K Gram matrices with unit Frobenius norm, the targets that NC2/NC3
compare normalised Gram matrices against (docs/theory.md §1).
"""
from __future__ import annotations

import math

import torch


def simplex_etf(K: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """Simplex ETF Gram ``E_K = (I_K - 11ᵀ/K) / sqrt(K - 1)``, shape (K, K), ‖E_K‖_F = 1."""
    _check_K(K)
    eye = torch.eye(K, dtype=dtype, device=device)
    return (eye - 1.0 / K) / math.sqrt(K - 1)


def orthogonal_frame(K: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """Orthogonal-frame Gram ``O_K = I_K / sqrt(K)``, shape (K, K), ‖O_K‖_F = 1."""
    _check_K(K)
    return torch.eye(K, dtype=dtype, device=device) / math.sqrt(K)


def _check_K(K):
    if not isinstance(K, int) or K < 2:
        raise ValueError(f"K: expected an integer number of classes >= 2, got {K!r}")


def collapsed_configuration(
    K: int,
    d: int,
    n: int | list[int],
    *,
    geometry: str = "etf",
    noise: float = 0.0,
    scale: float = 1.0,
    seed: int = 0,
    dtype=torch.float64,
):
    """Features, labels and weights in an exactly known collapsed geometry.

    The K class means are ``scale`` times a random isometric embedding (d >= K) of
    the frame: for ``geometry="of"`` the means are orthonormal (uncentred Gram ∝ I_K);
    for ``"etf"`` they are centred and their Gram is ∝ I_K - 11ᵀ/K. The classifier rows
    equal the means (W = M, perfect NC3) and every sample is its class mean plus
    i.i.d. N(0, noise²) entries (noise = 0 gives NC1 = 0 exactly).

    Args:
        K, d: number of classes and feature dimension (d >= K).
        n: samples per class (int) or a list of K class sizes (imbalanced).
    Returns:
        features (N, d), labels (N,) int64 class-sorted, weights (K, d).
    """
    _check_K(K)
    if d < K:
        raise ValueError(f"d: need d >= K to embed the frame, got d={d} < K={K}")
    counts = [n] * K if isinstance(n, int) else list(n)
    if len(counts) != K or min(counts) < 1:
        raise ValueError(f"n: expected a positive int or K={K} positive class sizes, got {n!r}")
    if geometry not in ("etf", "of"):
        raise ValueError(f"geometry: expected 'etf' or 'of', got {geometry!r}")
    if noise < 0:
        raise ValueError(f"noise: must be >= 0, got {noise}")
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, K, generator=gen, dtype=torch.float64))  # d x K, QᵀQ = I
    frame = torch.eye(K, dtype=torch.float64)
    if geometry == "etf":
        frame = (frame - 1.0 / K) * math.sqrt(K / (K - 1))  # unit-norm centred vectors
    means = scale * frame @ Q.T  # (K, d)
    labels = torch.repeat_interleave(torch.arange(K), torch.tensor(counts))
    features = means[labels] + noise * torch.randn(len(labels), d, generator=gen, dtype=torch.float64)
    return features.to(dtype), labels, means.clone().to(dtype)
