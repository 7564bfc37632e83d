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


#: a sweep point counts as converged when its gap to the exact f* is below this (relative to max(f*, 1e-3))
CONVERGED_REL_GAP = 1e-3


def _write(kind, folder: Folder, results, c_grid, lam, stds, m, c_crit, model) -> dict:
    from nclab import theory

    levels = [f"H{l}" for l in range(1, model.L + 1)]
    t_end = [end_to_end_scale(r) for r in results]
    rows = []
    for s, r, t in zip(stds, results, t_end):
        for i, c in enumerate(c_grid):
            f_star, gap = float(r.f_star[i]), float(r.final("gap")[i])
            converged = bool(np.isfinite(gap) and gap <= CONVERGED_REL_GAP * max(abs(f_star), 1e-3))
            rows.append({"c": c, "lam": lam[i], "init_std": s, "lr": r.settings.lr,
                         "objective": r.final("objective")[i], "f_star": f_star, "gap": gap,
                         "t": t[i], "t_star": theory.t_star(m, c), "converged": int(converged),
                         **{f"{lv}.{k}": r.final(f"{lv}.{k}")[i] for lv in levels for k in ("nc1", "nc2_of", "nc2_etf")}})
    folder.write_csv("sweep.csv", rows)
    summary = {"kind": kind, "m": m, "K": model.K, "n": int(model.class_counts[0]), "d": int(model.dims[0]),
               "c_crit": float(c_crit), "rows": len(rows), "init_stds": list(stds),
               "lr": [r.settings.lr for r in results], "iterations": results[0].iterations}
    folder.write_json("summary.json", summary)
    draw_sweep(folder)
    return summary


def draw_sweep(folder: Folder, **save_kw) -> list:
    """Draw figure{,-column}.{pdf,png} of a sweep folder from sweep.csv and summary.json only
    (``nclab plot`` calls this too). NC values where the solution is H = 0 (theory t* = 0, or a
    point that fell to t < 1e-3) or NaN are left out; unconverged points are hollow."""
    import json

    from nclab import theory
    from nclab.experiments.runner import _read_csv
    from nclab.plots import save_sweep  # matplotlib: only when a sweep is drawn

    summary = json.loads(folder.path("summary.json").read_text())
    tab = _read_csv(folder.path("sweep.csv"))
    m = int(summary.get("m", 2 if summary["kind"] == "plain" else 3))
    c_crit = float(summary.get("c_crit", theory.c_crit(m)))
    stds = sorted(set(tab["init_std"].tolist()))
    last = max(k.split(".")[0] for k in tab if k.startswith("H") and k.endswith(".nc1"))
    first = tab["init_std"] == stds[0]
    c_grid = tab["c"][first]
    label = lambda s: f"GD, init std {s:g}"  # noqa: E731

    def col(key, s, undefined_at_zero=False):
        sel = tab["init_std"] == s
        v = tab[key][sel].astype(float)
        if undefined_at_zero:  # H = 0: NC metrics undefined
            v = np.where((tab["t_star"][sel] == 0) | (np.abs(tab["t"][sel]) < 1e-3), np.nan, v)
        return v

    series = lambda key, z=False: {label(s): col(key, s, z) for s in stds}  # noqa: E731
    converged = {label(s): tab["converged"][tab["init_std"] == s] > 0 for s in stds} if "converged" in tab else None
    fine = np.linspace(c_grid[0], c_grid[-1], 600)
    t_fine = np.array([theory.t_star(m, c) for c in fine])
    f_fine = np.array([theory.phi(m, c, t) if t > 0 else 0.5 for c, t in zip(fine, t_fine)])
    panels = [
        dict(title="final objective f", series=series("objective"), theory=(fine, f_fine)),
        dict(title="scale t (theory t*)", series=series("t"), theory=(fine, t_fine)),
        dict(title=f"NC1 of {last}", series=series(f"{last}.nc1", True), log=True),
        dict(title=f"NC2 (OF) of {last}", series=series(f"{last}.nc2_of", True), log=True),
    ]
    x_label = "c = K√(nλ_Hλ_W)" if m == 2 else "c₃ = K(nλ_H1λ_W1λ_W2)^(1/3)"
    thresholds = {"c = 1": 1.0} if m == 2 else {f"c_crit = 2^(-4/3) ≈ {c_crit:.3g}": c_crit}
    title = (f"{'Plain' if m == 2 else 'Extended linear'} UFM phase diagram: K={summary.get('K')}, "
             f"n={summary.get('n')}, d={summary.get('d')}, equal λ, {summary['iterations']} GD steps\n"
             "NC values left out where H = 0 (undefined); hollow: gap to f* above 1e-3 relative")
    return save_sweep(folder, c_grid, x_label, panels, thresholds, title, converged=converged, save_kw=save_kw)
