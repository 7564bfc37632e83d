"""Run one UFM experiment from its settings and write its folder.

The folder (a :class:`nclab.rundir.Folder`) receives ``config.toml`` (everything needed to
rerun), ``metrics.csv`` (one row per logged iteration), ``summary.json``, ``figure.png``
and ``figure.pdf``, each written atomically; the run folder marks the part complete.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch

from nclab import theory, ufm
from nclab.experiments.config import UFMRun
from nclab.metrics import class_means_t
from nclab.rundir import Folder
from nclab.ufm.verdict import verdict_line, verdicts
from nclab.ufm.solve import LEVEL_METRICS

LEVEL_COLUMNS = ("nc1", "nc1_trace", "cdnv", "nc2_etf", "nc2_of", "nc3") + LEVEL_METRICS[5:]


def run_experiment(run: UFMRun, folder: Folder, *, quiet: bool = False) -> dict:
    """Solve the run's UFM by GD and write ``folder``; returns the summary dict."""
    folder.write_text("config.toml", run.dumps())
    result = ufm.solve(run.model, run.solver,
                       progress=None if quiet else _progress_printer(run.name, run.solver.steps))
    frame = run.expected_frame
    best = int(np.nanargmin(result.final("objective")))
    rows = _rows(result, best, frame)
    summary = _summary(run, result, best, frame)
    _write_outputs(folder, run, rows, _restart_rows(result, frame), summary, frame)
    return summary


def _restart_rows(result, frame) -> list[dict]:
    """restarts.csv rows: every restart's objective, gap and per-level NC1/NC2/NC3 history."""
    levels = [f"H{l}" for l in range(1, result.model.L + 1)]
    out = []
    for b in range(len(result.final("objective"))):
        for r in result.rows(b):
            row = {"restart": b, "iteration": r["iteration"], "objective": r["objective"], "gap": r["gap"]}
            for level in levels:
                row.update({f"{level}.nc1": r[f"{level}.nc1"], f"{level}.nc2_{frame}": r[f"{level}.nc2_{frame}"],
                            f"{level}.nc3": r[f"{level}.nc3_{frame}"]})
            out.append(row)
    return out


def _rows(result, best, frame) -> list[dict]:
    """metrics.csv rows of the best restart, with ``H<l>.nc3`` the expected-frame alignment."""
    rows = result.rows(best)
    levels = [f"H{l}" for l in range(1, result.model.L + 1)]
    out = []
    for r in rows:
        row = {k: r[k] for k in ("iteration", "objective", "fit", "reg", "gap")}
        for level in levels:
            r[f"{level}.nc3"] = r[f"{level}.nc3_{frame}"]
            row.update({f"{level}.{m}": r[f"{level}.{m}"] for m in LEVEL_COLUMNS})
        if f"{levels[-1]}.nc4" in r:
            row[f"{levels[-1]}.nc4"] = r[f"{levels[-1]}.nc4"]
        out.append(row)
    return out


def _summary(run: UFMRun, result, best, frame) -> dict:
    """summary.json: the best restart's values, the theory's, and every restart's verdict."""
    model, f_star = run.model, result.f_star[best]
    every = verdicts(result)
    best_verdict = every[best]
    obj = float(result.final("objective")[best])
    levels = {}
    for l in range(1, model.L + 1):
        key = f"H{l}"
        levels[key] = {m: _clean(result.final(f"{key}.{m}")[best]) for m in
                       ("nc1", "nc1_trace", "nc2_of", "nc2_etf")}
        levels[key]["nc3"] = _clean(result.final(f"{key}.nc3_{frame}")[best])
        levels[key]["mean_sq_norm"] = _mean_sq_norm(result, best, l)
    return {
        "name": run.name, "title": run.display_title, "model": model.describe(), "K": model.K,
        "objective": obj, "objective_optimal": None if math.isnan(f_star) else float(f_star),
        "gap": None if math.isnan(f_star) else obj - float(f_star),
        "relative_gap": None if math.isnan(f_star) or f_star == 0 else (obj - float(f_star)) / float(f_star),
        "expected_frame": frame, "iterations": result.iterations, "seconds": round(result.seconds, 3),
        "verdict": best_verdict["verdict"], "verdict_line": verdict_line(best_verdict),
        "zero_singular_values": best_verdict["zero_singular_values"],
        "stationary_value": best_verdict["stationary_value"], "verdict_details": best_verdict,
        "best_restart": best, "restart_objectives": [float(v) for v in result.final("objective")],
        "restart_verdicts": [verdict_line(v) for v in every],
        "levels": levels, "factor_sq_norms": {k: float(np.sum(v[best] ** 2)) for k, v in result.params.items()},
        "theory": _theory(model),
    }


def _mean_sq_norm(result, best, level) -> float:
    """Mean over classes of ‖μ_k‖² at feature level ``level`` of the final parameters."""
    H = result.program().forward(result.params)[0][level - 1][best]
    means, _ = class_means_t(torch.from_numpy(H), torch.as_tensor(result.model.labels()), result.model.K)
    return float(means.square().sum(1).mean())


def _theory(model) -> dict | None:
    """The predicted optimum when docs/theory.md §3 gives one (MSE, no/free bias, balanced)."""
    if ufm.optimal_objective(model, strict=False) is None or not model.balanced or min(model.lams) <= 0:
        return None
    p = theory.predict(model.K, model.class_counts[0], model.lams, bias=model.bias == "free")
    linear = model.activation == "linear" or model.L == 1
    out = {"f_star": p.f_star, "c": p.c, "c_crit": p.c_crit, "t_star": p.t_star,
           "collapsed_to_zero": p.collapsed_to_zero}
    if linear:  # norms are predicted for the linear models only
        out["factor_sq_norms"] = dict(zip(model.factor_shapes(), p.factor_sq_norms))
        out["mean_sq_norms"] = {f"H{l + 1}": v for l, v in enumerate(p.mean_sq_norms)}
    return out


def _clean(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _write_outputs(folder: Folder, run: UFMRun, rows, restart_rows, summary, frame) -> None:
    folder.write_csv("metrics.csv", rows)
    folder.write_csv("restarts.csv", restart_rows)
    folder.write_json("summary.json", summary)
    draw_ufm(folder)


def _read_csv(path) -> dict[str, np.ndarray]:
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return {k: np.array([float(r[k]) if r[k] not in ("", None) else np.nan for r in rows]) for k in rows[0]}


def draw_ufm(folder: Folder, **save_kw) -> list:
    """Draw figure.{pdf,png}, figure-column.{pdf,png} and caption.md of a UFM run folder from its
    saved tables (metrics.csv, restarts.csv when present, summary.json, config.toml); nothing is
    recomputed, so ``nclab plot`` calls this too."""
    from nclab.io import read_toml
    from nclab.plots import save_ufm, setting_text

    summary = json.loads(folder.path("summary.json").read_text())
    config = read_toml(folder.path("config.toml"))
    best = _read_csv(folder.path("metrics.csv"))
    restarts = []
    if folder.path("restarts.csv").is_file():
        table = _read_csv(folder.path("restarts.csv"))
        for b in np.unique(table["restart"]):
            sel = table["restart"] == b
            restarts.append({k: v[sel] for k, v in table.items()})
    frame = summary["expected_frame"]
    for key in [k for k in best if k.endswith(f".nc2_{frame}")]:
        best.setdefault(key, best[key])
    levels = sorted({k.split(".")[0] for k in best if k.startswith("H") and k.endswith(".nc1")})
    model, solver = config.get("model", {}), config.get("solver", {})
    lams = model.get("lams", model.get("lam"))
    setting = {"K": summary.get("K"), "n": model.get("n"), "d": model.get("dims", model.get("d")),
               "λ": lams, "steps": solver.get("steps"), "lr": solver.get("lr"),
               "restarts": solver.get("restarts")}
    title = f"{summary['title']}\n{setting_text(setting)}"
    paths = save_ufm(folder, best, restarts, levels, frame, summary.get("objective_optimal"), title,
                     summary["verdict_line"], **save_kw)
    theory_ = summary.get("theory") or {}
    f_star = summary.get("objective_optimal")
    lines = [f"# {summary['name']}: {summary['title']}", "",
             f"**Setting.** {summary.get('model')}; " + setting_text(setting)
             + f"; seed={solver.get('seed')}, init std={solver.get('init_std')}.", "",
             "**Theory.** " + (f"f* = {f_star:.6g}" if f_star is not None else "no closed-form f* for this model")
             + f"; expected structure: collapse to the {frame.upper()} frame"
             + (f", c = {theory_['c']:.4g}, c_crit = {theory_['c_crit']:.4g}, t* = {theory_['t_star']:.4g}"
                if theory_ else "") + ".", "",
             f"**Verdict.** {summary['verdict_line']}", "",
             "Panels: objective (restarts thin gray, best black, f* dashed), gap f − f* (log; gaps below "
             "1e-16 left out), NC1, NC2 against the expected frame, NC3, per feature level.", ""]
    folder.write_text("caption.md", "\n".join(lines))
    return paths


def _progress_printer(name: str, steps: int):
    """A callable for ufm.solve's ``progress``: a line about every 10% of the run, and a notice
    when the pace of its first seconds says the whole run will take long (:mod:`nclab.eta`)."""
    import time

    from nclab.eta import notice_if_long

    state = {"start": time.perf_counter(), "next": 0, "judged": False}

    def report(it, recorder):
        elapsed = time.perf_counter() - state["start"]
        if not state["judged"] and (elapsed >= 2.0 or it == steps) and it > 0:
            state["judged"] = True
            notice_if_long(name, it, steps, elapsed, "iterations")
        if it < state["next"] and it != steps:
            return
        state["next"] = it + max(steps // 10, 1)
        gap = np.asarray(recorder.rows["gap"][-1])
        gap_txt = f"gap {np.nanmin(gap):.2e}" if np.isfinite(gap).any() else "objective " \
            f"{np.nanmin(recorder.rows['objective'][-1]):.4g}"
        print(f"  {name}: {it:>7d}/{steps} iterations  {it / max(elapsed, 1e-9):8.0f} it/s  {gap_txt}",
              flush=True)

    return report


def load_summary(folder: Folder, required: str = "levels", outputs=("metrics.csv", "figure.png")) -> dict | None:
    """The summary.json of a finished folder (holding key ``required``, beside the files
    ``outputs``), or None when any of them is missing or unreadable."""
    try:
        summary = json.loads(folder.path("summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(summary, dict) and required in summary):
        return None
    return summary if all(folder.path(name).is_file() for name in outputs) else None
