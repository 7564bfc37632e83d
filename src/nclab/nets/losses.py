"""The training losses and the reported objective.

Objectives (N samples, one-hot targets y_i in R^K, network output f(x_i) in R^K):

* ``loss="mse"``: the UFM scaling, 1/(2N) Σ_i ‖f(x_i) - y_i‖² (docs/theory.md §2). With SGD
  weight decay wd the objective is 1/(2N)‖F - Y‖² + wd/2 ‖θ‖², i.e. λ = wd per factor.
  ``torch.nn.MSELoss()`` (mean over N·K entries) equals (2/K) times this loss, so
  MSELoss + wd/2‖θ‖² = (2/K)·[1/(2N)‖F - Y‖² + (K·wd/2)/2 ‖θ‖²]: training with
  torch.nn.MSELoss and weight decay wd is the UFM with λ = K·wd/2 (and SGD on it with
  step η equals SGD on ours with step 2η/K and weight decay K·wd/2). This is why the
  paper's lr and weight decay are rescaled for "mse" (:mod:`nclab.nets.settings`).
  ``loss="mse_torch"`` trains with torch.nn.MSELoss itself.
* ``loss="ce"``: mean cross-entropy.

The reported ``objective`` is the measured mean loss plus wd/2 Σ‖θ‖² over all parameters
(SGD's weight decay applies to all of them).
"""
from __future__ import annotations

import torch
from torch import nn


def sample_losses(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample loss (B,): ½‖f - e_y‖² ("mse"), ‖f - e_y‖²/K ("mse_torch") or CE ("ce")."""
    if loss == "ce":
        return nn.functional.cross_entropy(logits, y, reduction="none")
    sq = (logits - nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype)).square().sum(1)
    return sq / 2 if loss == "mse" else sq / logits.shape[1]


def weight_norm_sq(model: nn.Module) -> float:
    """Σ‖θ‖² over all parameters."""
    with torch.no_grad():
        return float(sum(p.detach().double().square().sum() for p in model.parameters()))
