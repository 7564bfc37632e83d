"""The unconstrained-features model family: description, objective, gradients, GD solver.

    from nclab import ufm
    model = ufm.extended(K=4, n=50, d1=20, d2=20, lam_H1=5e-3, lam_W1=5e-3, lam_W2=5e-3, relu=True)
    result = ufm.solve(model, ufm.GD(steps=20_000, lr=0.1, restarts=8))
    result.final("gap"), result.final("H2.nc1")
"""
from nclab.ufm.engine import gradients, initial_parameters, objective, smoothness_estimate
from nclab.ufm.gd import GD
from nclab.ufm.model import UFM, extended, plain
from nclab.ufm.solve import DivergenceError, Result, optimal_objective, solve, suggest_lr
from nclab.ufm.verdict import verdict_line, verdicts  # the module nclab.ufm.verdict has verdict()

__all__ = ["GD", "UFM", "DivergenceError", "Result", "extended", "gradients", "initial_parameters",
           "objective", "optimal_objective", "plain", "smoothness_estimate", "solve", "suggest_lr",
           "verdict_line", "verdicts"]
