"""Phase diagrams: the whole λ grid (and initialisation scales) solved in one batched run.

* ``plain``: the bias-free MSE UFM against c = K sqrt(n λ_H λ_W) (λ_H = λ_W); the
  optimum is non-zero for c < 1 and f* = c - c²/2, then 1/2 (a continuous transition).
* ``extended``: the linear extended UFM against c_3 = K (n λ_H1 λ_W1 λ_W2)^(1/3) (equal
  λs), for several initialisation scales; f* jumps at c_crit = 2^(-4/3) (discontinuous),
  and since 0 is always a local minimum, small initialisations fall to 0 below it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nclab import theory, ufm
from nclab.io import write_csv
from nclab.metrics import class_means_t
from nclab.plots import save_figure, sweep_figure

SWEEPS = ("plain", "extended")


def run_sweep(kind: str, out_dir: Path, *, K: int = 4, n: int = 50, d: int = 20, points: int = 25,
              steps: int | None = None, lr: float = 0.1, init_stds=(0.01, 0.1, 0.5), seed: int = 0,
              device: str = "cpu", quiet: bool = False) -> Path:
    """Solve the grid, write ``out_dir/sweep-<kind>.{csv,png,pdf}``; returns the csv path."""
    if kind not in SWEEPS:
        raise ValueError(f"KIND: expected one of {SWEEPS}, got {kind!r}")
    if points < 2:
        raise ValueError(f"--points: need at least 2 grid points, got {points}")
    m = 2 if kind == "plain" else 3
    c_crit = theory.c_crit(m)
    c_grid = np.linspace(0.04, 2.0 if m == 2 else 2.0 * c_crit, points)
    lam = c_grid / (K * n ** (1 / m))  # equal λs give c_m = K (n λ^m)^(1/m) = K n^(1/m) λ
    stds = (0.1,) if m == 2 else tuple(init_stds)
    model = ufm.UFM(K, n, (d,) * (m - 1), (1.0,) * m)
    lams = lam[:, None] * np.ones((1, m))  # (points, m)
    steps = steps or (20_000 if m == 2 else 30_000)
    results = []
    for j, s in enumerate(stds):  # one batched run per initialisation scale, each with a stable step
        seeds = np.arange(points) + seed + j * points
        step = min(lr, ufm.suggest_lr(model, seeds=seeds, lams=lams, init_std=s))
        if not quiet:
            print(f"sweep {kind}: {points} problems, init std {s:g}, {steps} GD steps of {step:.3g}, "
                  "in one batched run", flush=True)
        results.append(ufm.solve(model, steps=steps, lr=step, seeds=seeds, lams=lams, init_std=s,
                                 device=device, log_every=steps, progress=not quiet))
    return _write(kind, out_dir, results, c_grid, lam, stds, m, c_crit, model)


def end_to_end_scale(result) -> np.ndarray:
    """t = tr(W_L⋯W_1 M_1ᵀ)/K per problem, M_1 the class means of H1 (K, d_1); theory: t*."""
    model = result.model
    prod = result.program().maps_to_output(result.params)[0]  # W_L⋯W_1, (B, K, d_1)
    means, _ = class_means_t(torch.from_numpy(result.params["H1"]), torch.as_tensor(model.labels()), model.K)
    return np.trace(prod @ np.swapaxes(means.numpy(), 1, 2), axis1=1, axis2=2) / model.K


def _write(kind, out_dir, results, c_grid, lam, stds, m, c_crit, model):
    last = f"H{model.L}"
    levels = [f"H{l}" for l in range(1, model.L + 1)]
    t_end = [end_to_end_scale(r) for r in results]
    rows = []
    for s, r, t in zip(stds, results, t_end):
        for i, c in enumerate(c_grid):
            rows.append({"c": c, "lam": lam[i], "init_std": s, "lr": r.settings["lr"],
                         "objective": r.final("objective")[i], "f_star": r.f_star[i], "gap": r.final("gap")[i],
                         "t": t[i], "t_star": theory.t_star(m, c),
                         **{f"{lv}.{k}": r.final(f"{lv}.{k}")[i] for lv in levels for k in ("nc1", "nc2_of", "nc2_etf")}})
    csv_path = out_dir / f"sweep-{kind}.csv"
    write_csv(csv_path, rows)
    fine = np.linspace(c_grid[0], c_grid[-1], 600)
    t_fine = np.array([theory.t_star(m, c) for c in fine])
    f_fine = [theory.phi(m, c, t) if t > 0 else 0.5 for c, t in zip(fine, t_fine)]
    label = lambda s: f"GD, init std {s:g}"  # noqa: E731
    series = lambda key: {label(s): r.final(key) for s, r in zip(stds, results)}  # noqa: E731
    panels = [
        dict(title="final objective vs exact optimum f*", series=series("objective"), theory=(fine, f_fine)),
        dict(title="end-to-end scale t = tr(W⋯W M₁ᵀ)/K vs t*",
             series={label(s): t for s, t in zip(stds, t_end)}, theory=(fine, t_fine)),
        dict(title=f"final NC1 of {last}", series=series(f"{last}.nc1"), log=True),
        dict(title=f"final NC2 (OF) of {last}", series=series(f"{last}.nc2_of"), log=True),
    ]
    x_label = "c = K√(nλ_Hλ_W)" if m == 2 else "c₃ = K(nλ_H1λ_W1λ_W2)^(1/3)"
    title = (f"{'Plain' if m == 2 else 'Extended linear'} UFM phase diagram: K={model.K}, n={model.class_counts[0]}, "
             f"d={model.dims[0]}, equal λ, {results[0].iterations} GD steps (NC metrics are undefined where H = 0)")
    save_figure(sweep_figure(c_grid, x_label, panels, c_crit, title), out_dir / f"sweep-{kind}")
    return csv_path
