"""One description of the unconstrained-features model family (docs/theory.md §2).

Layout: samples are rows, as in PyTorch. For L weight layers and feature widths
d_1..d_L the factors are

    H1 (N, d_1),  W_l (d_{l+1}, d_l) for l = 1..L with d_{L+1} = K,  optional b (K,),

the feature levels H_1 = H1, H_{l+1} = σ(H_l W_lᵀ), and the output Z = H_L W_Lᵀ + 1bᵀ.
σ is the identity ("linear") or ReLU. The objective is

    fit(Z, Y) + Σ_i λ_i/2 ‖A_i‖_F² (+ λ_b/2 ‖b‖² when the bias is regularised),

with fit = 1/(2N)‖Z - Y‖_F² ("mse") or the mean cross-entropy ("ce"), Y the one-hot
targets (N, K) of class-sorted labels. λs are ordered H1 first, as in :mod:`nclab.theory`:
``lams = (λ_H1, λ_W1, ..., λ_WL)``.

The plain UFM is L = 1 (lams = (λ_H, λ_W)); the extended UFM of the paper is L = 2
(lams = (λ_H1, λ_W1, λ_W2)).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from nclab.settings import Settings, SettingsError, at_least, setting

LOSSES = ("mse", "ce")
ACTIVATIONS = ("linear", "relu")
BIASES = ("none", "free", "reg")


@dataclass(frozen=True)
class UFM(Settings):
    """A member of the UFM family; see the module docstring for the objective.

    Attributes:
        K: classes. n: samples per class (int) or K class sizes (imbalanced).
        dims: feature widths (d_1, ..., d_L); L = len(dims) weight layers.
        lams: (λ_H1, λ_W1, ..., λ_WL), L + 1 non-negative values.
        activation: "linear" or "relu" (between weight layers; none after the last).
        loss: "mse" or "ce".
        bias: "none", "free" (unregularised) or "reg" (λ_b/2‖b‖²).
        lam_b: λ_b for bias="reg".
    """

    _where = "model"

    K: int = setting(help="number of classes", check=at_least(2))
    n: int | tuple[int, ...] = setting(help="samples per class, or the K class sizes", check=at_least(1))
    dims: tuple[int, ...] = setting(help="feature widths d_1, ..., d_L (L weight layers)", check=at_least(1))
    lams: tuple[float, ...] = setting(help="weight decays λ_H1, λ_W1, ..., λ_WL (H1 first)", check=at_least(0))
    activation: str = setting("linear", help="between weight layers", choices=ACTIVATIONS)
    loss: str = setting("mse", help="fit term", choices=LOSSES)
    bias: str = setting("none", help="classifier bias: none, free (unregularised) or reg", choices=BIASES)
    lam_b: float = setting(0.0, help="λ_b of a regularised bias (bias = reg)", check=at_least(0))
    _counts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def _check_together(self):
        counts = (self.n,) * self.K if isinstance(self.n, int) else self.n
        if len(counts) != self.K:
            raise SettingsError(f"model.n: expected one size or K={self.K} class sizes, got {len(counts)} sizes")
        object.__setattr__(self, "_counts", counts)
        if isinstance(self.n, tuple) and len(set(self.n)) == 1:  # balanced: one way to write it
            object.__setattr__(self, "n", self.n[0])
        if len(self.lams) != len(self.dims) + 1:
            raise SettingsError(f"model.lams: expected {len(self.dims) + 1} values (λ_H1, λ_W1, ..., λ_WL; H1 "
                                f"first) for {len(self.dims)} weight layer(s), got {len(self.lams)}")
        if self.lam_b > 0 and self.bias != "reg":
            raise SettingsError(f"model.lam_b: is only used with bias = 'reg', got lam_b={self.lam_b} "
                                f"with bias={self.bias!r}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def L(self) -> int:
        """Number of weight layers."""
        return len(self.dims)

    @property
    def class_counts(self) -> tuple[int, ...]:
        return self._counts

    @property
    def N(self) -> int:
        return sum(self._counts)

    @property
    def balanced(self) -> bool:
        return len(set(self._counts)) == 1

    @property
    def has_bias(self) -> bool:
        return self.bias != "none"

    def labels(self) -> np.ndarray:
        """Class-sorted labels (N,): n_0 zeros, then n_1 ones, ..."""
        return np.repeat(np.arange(self.K), self._counts)

    def factor_shapes(self) -> dict[str, tuple[int, int]]:
        """Names and shapes of the regularised factors, in λ order: H1, W1, ..., WL."""
        widths = self.dims + (self.K,)
        shapes = {"H1": (self.N, self.dims[0])}
        for l in range(1, self.L + 1):
            shapes[f"W{l}"] = (widths[l], widths[l - 1])
        return shapes

    def with_lams(self, lams) -> "UFM":
        return replace(self, lams=tuple(lams))

    def describe(self) -> str:
        kind = {1: "plain UFM", 2: "extended UFM"}.get(self.L, f"deep UFM (L={self.L})")
        act = "" if self.L == 1 else f", {self.activation}"
        bias = {"none": "no bias", "free": "unregularised bias", "reg": f"bias with λ_b={self.lam_b}"}[self.bias]
        n = self.n if self.balanced else f"{list(self._counts)}"
        return f"{kind}{act}, {self.loss.upper()}, {bias}; K={self.K}, n={n}, dims={self.dims}, λ (H1 first)={self.lams}"

    def check_theorem_width(self) -> None:
        """Raise when d < K where the optimum's theorem needs d >= K (K - 1 with a bias)."""
        need = self.K - 1 if self.has_bias else self.K
        for l, d in enumerate(self.dims, start=1):
            if d < need:
                raise ValueError(f"dims: the theorem needs d_{l} >= {need} (K={self.K}"
                                 f"{', with bias' if self.has_bias else ''}), got d_{l}={d}")


def plain(K: int, n, d: int, lam_H: float, lam_W: float, *, loss: str = "mse",
          bias: str = "none", lam_b: float = 0.0) -> UFM:
    """The plain UFM: features H (N, d) and classifier W (K, d)."""
    return UFM(K, n, (d,), (lam_H, lam_W), loss=loss, bias=bias, lam_b=lam_b)


def extended(K: int, n, d1: int, d2: int, lam_H1: float, lam_W1: float, lam_W2: float, *,
             relu: bool = False, bias: str = "none") -> UFM:
    """The paper's extended UFM: W2 σ(W1 H1), σ = ReLU or identity."""
    return UFM(K, n, (d1, d2), (lam_H1, lam_W1, lam_W2), activation="relu" if relu else "linear", bias=bias)
