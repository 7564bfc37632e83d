"""Phase diagrams: the whole λ grid (and initialisation scales) solved in one batched run.

* ``plain``: the bias-free MSE UFM against c = K sqrt(n λ_H λ_W) (λ_H = λ_W); the
  optimum is non-zero for c < 1 and f* = c - c²/2, then 1/2 (a continuous transition).
* ``extended``: the linear extended UFM against c_3 = K (n λ_H1 λ_W1 λ_W2)^(1/3) (equal
  λs), for several initialisation scales; f* jumps at c_crit = 2^(-4/3) (discontinuous),
  and since 0 is always a local minimum, small initialisations fall to 0 below it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nclab import ufm
from nclab.rundir import Folder
from nclab.settings import PAPER, Settings, SettingsError, at_least, check_device, positive, setting

SWEEPS = ("plain", "extended")
#: GD iterations when ``steps`` is not given
DEFAULT_STEPS = {"plain": 20_000, "extended": 30_000}


@dataclass(frozen=True)
class SweepSettings(Settings):
    """One phase diagram: the model family, the grid in c, and how GD runs."""

    _where = "sweep"

    kind: str = setting(help="plain (c = K√(nλ_Hλ_W)) or extended (c₃, linear)", choices=SWEEPS)
    K: int = setting(4, help="number of classes", check=at_least(2))
    n: int = setting(50, help="samples per class", check=at_least(1))
    d: int = setting(20, help="feature width (every layer)", check=at_least(1))
    points: int = setting(25, help="grid points in c", check=at_least(2))
    steps: int | None = setting(None, help="GD iterations (default 20000 plain, 30000 extended)",
                                check=at_least(1))
    lr: float = setting(PAPER["ufm_lr"], help="GD step size; lowered per initialisation scale where a check "
                        "run shows it unstable", check=positive)
    init_stds: tuple[float, ...] = setting((0.01, 0.1, 0.5), help="initialisation scales (extended sweep)",
                                           check=at_least(0))
    seed: int = setting(0, help="seed of the first problem", check=at_least(0))
    device: str = setting("cpu", help="cpu, cuda or cuda:N", check=check_device)

    def _check_together(self) -> None:
        if self.kind == "plain" and self.init_stds != SweepSettings.__dataclass_fields__["init_stds"].default:
            raise SettingsError("sweep.init_stds: the plain sweep runs from init std 0.1 only (its transition does "
                                "not depend on the start); drop --init-std or sweep extended")
        from nclab._validate import check_fits

        factors = self.K * self.n * self.d + (self.m - 2) * self.d * self.d + self.K * self.d
        check_fits(8 * 8 * self.points * factors, "sweep", f"{self.points} problems of K={self.K}, n={self.n}, "
                   f"d={self.d} (parameters, gradients and buffers)")

    @property
    def m(self) -> int:
        """Number of factors: 2 (plain) or 3 (extended)."""
        return 2 if self.kind == "plain" else 3

    @property
    def gd_steps(self) -> int:
        return self.steps or DEFAULT_STEPS[self.kind]


def run_sweep(settings: SweepSettings, folder: Folder, *, quiet: bool = False) -> dict:
    """Solve the grid, write ``sweep.csv``, ``figure.{png,pdf}`` and ``config.toml`` to ``folder``."""
    from nclab import theory  # scipy: only when a sweep runs (not to parse its flags)
    from nclab.io import toml_text

    folder.write_text("config.toml", toml_text(settings.to_dict()))
    m, K, n, points, steps = settings.m, settings.K, settings.n, settings.points, settings.gd_steps
    c_crit = theory.c_crit(m)
    c_grid = np.linspace(0.04, 2.0 if m == 2 else 2.0 * c_crit, points)
    lam = c_grid / (K * n ** (1 / m))  # equal λs give c_m = K (n λ^m)^(1/m) = K n^(1/m) λ
    stds = (0.1,) if m == 2 else settings.init_stds
    model = ufm.UFM(K, n, (settings.d,) * (m - 1), (1.0,) * m)
    lams = lam[:, None] * np.ones((1, m))  # (points, m)
    results = []
    for j, s in enumerate(stds):  # one batched run per initialisation scale, each with a checked step
        gd = ufm.GD(steps=steps, lr=settings.lr, seed=settings.seed + j * points, init_std=s,
                    device=settings.device, log_every=steps)
        gd = gd.replace(lr=ufm.suggest_lr(model, gd, lams=lams))
        if not quiet:
            print(f"sweep {settings.kind}: {points} problems, init std {s:g}, {steps} GD steps of {gd.lr:.3g}, "
                  "in one batched run", flush=True)
        results.append(ufm.solve(model, gd, lams=lams, progress=not quiet))
    return _write(settings.kind, folder, results, c_grid, lam, stds, m, c_crit, model)


def end_to_end_scale(result) -> np.ndarray:
    """t = tr(W_L⋯W_1 M_1)/K per problem (B,), M_1 the class means of H1; theory: t*."""
    from nclab.ufm.verdict import end_to_end  # torch: only when a sweep has run (not to parse its flags)

    return np.array([np.trace(end_to_end(result, b)) for b in range(len(result.seeds))]) / result.model.K


def _write(kind, folder: Folder, results, c_grid, lam, stds, m, c_crit, model) -> dict:
    from nclab import theory
    from nclab.plots import save_figure, sweep_figure  # matplotlib: only when a sweep is drawn

    last = f"H{model.L}"
    levels = [f"H{l}" for l in range(1, model.L + 1)]
    t_end = [end_to_end_scale(r) for r in results]
    rows = []
    for s, r, t in zip(stds, results, t_end):
        for i, c in enumerate(c_grid):
            rows.append({"c": c, "lam": lam[i], "init_std": s, "lr": r.settings.lr,
                         "objective": r.final("objective")[i], "f_star": r.f_star[i], "gap": r.final("gap")[i],
                         "t": t[i], "t_star": theory.t_star(m, c),
                         **{f"{lv}.{k}": r.final(f"{lv}.{k}")[i] for lv in levels for k in ("nc1", "nc2_of", "nc2_etf")}})
    folder.write_csv("sweep.csv", rows)
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
    save_figure(sweep_figure(c_grid, x_label, panels, c_crit, title), "figure", folder)
    summary = {"kind": kind, "rows": len(rows), "init_stds": list(stds), "lr": [r.settings.lr for r in results],
               "iterations": results[0].iterations}
    folder.write_json("summary.json", summary)
    return summary
