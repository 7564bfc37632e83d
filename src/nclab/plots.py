"""Figures in the paper's panel layouts, drawn through :mod:`nclab.figstyle` (two sizes, fonts
>= 7 pt); no metric is computed here, so every figure can be redrawn from a run's saved tables."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nclab import figstyle
from nclab.figstyle import plt
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

LEVEL_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown")
FRAME_NAME = {"of": "OF", "etf": "simplex ETF"}
#: gaps below this are rounding noise; they are left out of the log gap panel
GAP_FLOOR = 1e-16


def log_safe(values, floor: float = 0.0):
    """Values for a log axis: non-finite, non-positive or below ``floor`` become NaN (left out)."""
    v = np.asarray(values, dtype=float)
    return np.where(np.isfinite(v) & (v > max(floor, 0.0)), v, np.nan)


def _eng(x, _pos=None) -> str:
    """Short tick text for iterations: 0, 500, 20k, 1.5M."""
    if x == 0:
        return "0"
    for div, suf in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:g}{suf}"
    return f"{x:g}"


def _style_axis(ax, size: str, *, log: bool, iterations: bool = True) -> None:
    if iterations:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=3 if size == "column" else 4, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(_eng))
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, numticks=5 if size == "column" else 6))
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=np.arange(2, 10) * 0.1, numticks=12))
        ax.yaxis.set_minor_formatter(NullFormatter())
        _ensure_log_labels(ax)
    ax.grid(True, which="major", alpha=0.3, lw=0.4)


def _ensure_log_labels(ax) -> None:
    """A log axis spanning less than two decades shows 2-3-5 ticks so it has >= 3 labels."""
    lines = [l for l in ax.get_lines() if l.get_gid() != "ref"]
    ys = np.concatenate([np.asarray(l.get_ydata(), float) for l in lines]) if lines else np.array([])
    ys = ys[np.isfinite(ys) & (ys > 0)]
    if ys.size and np.log10(ys.max() / ys.min()) > 5:  # many decades: minor ticks would clump
        ax.yaxis.set_minor_locator(NullLocator())
    span = np.log10(ys.max() / ys.min()) if ys.size else 9.0
    if span < 1:  # under a decade: a few plain ticks (a log locator would fall back to crowded ones)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=3, min_n_ticks=3))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _p: f"{y:.3g}"))
    elif span < 2:
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _p: f"{y:.2g}"))


def _plot(ax, x, y, **kw):
    """Plot only the finite points (NaN gaps are left out of the data entirely)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    return ax.plot(x[ok], y[ok], **kw)


def wrap(text: str, size: str) -> str:
    """Wrap each line of a title to the figure's width (about 105 or 55 characters at 7-8 pt)."""
    import textwrap

    width = 110 if size == "full" else 58
    return "\n".join(textwrap.fill(line, width) for line in text.split("\n"))


def setting_text(setting: dict) -> str:
    """One line: K, n, d, λ, steps, step size, restarts."""
    keys = ("K", "n", "d", "λ", "steps", "lr", "restarts")
    return ", ".join(f"{k}={setting[k]}" for k in keys if setting.get(k) is not None)


def ufm_figure(size: str, best: dict, restarts: list[dict], levels: list[str], frame: str,
               f_star: float | None, title: str, verdict: str):
    """Objective, gap f - f*, NC1, NC2 (to ``frame``), NC3 against iteration.

    ``best`` and each of ``restarts``: column name -> 1-D array ("iteration", "objective",
    "gap", "H1.nc1", "H1.nc2_<frame>", "H1.nc3", ...). Restarts are thin and light, the best bold.
    """
    has_gap = f_star is not None and math.isfinite(f_star)
    panels = ["objective"] + (["gap"] if has_gap else []) + ["nc1", f"nc2_{frame}", "nc3"]
    fig, axes = figstyle.grid(len(panels), size, rows_of=3 if size == "full" else 2,
                              height_per_row=1.9 if size == "full" else 1.45)
    it = best["iteration"]
    thin = dict(lw=0.5, alpha=0.35)
    for ax, key in zip(axes, panels):
        if key == "objective":
            for r in restarts:
                _plot(ax, r["iteration"], log_safe(r["objective"]), color="gray", **thin)
            _plot(ax, it, log_safe(best["objective"]), color="black", label="f (best)")
            if has_gap and f_star > 0:
                ax.axhline(f_star, color="tab:orange", ls="--", lw=0.8, gid="ref", label=f"f* = {f_star:.4g}")
            ax.set_ylabel("objective f")
            _style_axis(ax, size, log=True)
            note = ("f* = 0 (no log line)" if has_gap and f_star == 0 else
                    f"f* = {f_star:.4g}" if has_gap else "f* unknown")
            if not (has_gap and f_star > 0):
                ax.plot([], [], ls="", label=note)  # the value as a legend line: placed clear of the data
        elif key == "gap":
            for r in restarts:
                _plot(ax, r["iteration"], log_safe(r["gap"], GAP_FLOOR), color="gray", **thin)
            _plot(ax, it, log_safe(best["gap"], GAP_FLOOR), color="black")
            ax.set_ylabel("gap f − f*")
            _style_axis(ax, size, log=True)
        else:
            name = {"nc1": "NC1", "nc3": "NC3"}.get(key, f"NC2 ({FRAME_NAME.get(frame, frame)})")
            for i, level in enumerate(levels):
                color = LEVEL_COLORS[i % len(LEVEL_COLORS)]
                for r in restarts:
                    _plot(ax, r["iteration"], log_safe(r.get(f"{level}.{key}", [])), color=color, **thin)
                _plot(ax, it, log_safe(best[f"{level}.{key}"]), color=color, label=level)
            ax.set_ylabel(name)
            _style_axis(ax, size, log=True)
        ax.set_xlabel("iteration")
    for ax, key in zip(axes, panels):
        if ax.get_legend_handles_labels()[0]:  # the objective falls from the top left: its legend at the middle right
            ax.legend(loc="center right" if key == "objective" else "best", handlelength=1.2)
    fig.suptitle(wrap(f"{title}\n{verdict}", size), fontsize=figstyle.MIN_FONT_PT + (1 if size == "full" else 0))
    return fig


def save_ufm(folder, best, restarts, levels, frame, f_star, title, verdict, **save_kw) -> list[Path]:
    """:func:`ufm_figure` at every size into ``folder`` (``save_kw``: sizes, formats of figstyle.save)."""
    return figstyle.save(lambda size: ufm_figure(size, best, restarts, levels, frame, f_star, title, verdict),
                         folder, "figure", **save_kw)


def sweep_figure(size: str, x, x_label: str, panels: list[dict], thresholds: dict, title: str,
                 converged=None):
    """Phase diagram: one panel per quantity against x, theory curve where known.

    Each panel: ``title`` (y label), ``series`` {label: values}, optional ``theory`` (x, y),
    ``log``. ``converged`` {label: bool array}: unconverged points get hollow markers.
    ``thresholds`` {text: x}: labelled vertical lines. Non-finite values are left out.
    """
    fig, axes = figstyle.grid(len(panels), size, rows_of=2 if size == "full" else 2,
                              height_per_row=2.2 if size == "full" else 1.5)
    x = np.asarray(x, float)
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    pad = 0.03 * (hi - lo)
    colors = LEVEL_COLORS
    any_hollow = False
    for ax, panel in zip(axes, panels):
        if panel.get("theory") is not None:
            tx, ty = panel["theory"]
            _plot(ax, tx, log_safe(ty) if panel.get("log") else ty, color="black", lw=1.2, label="theory")
        for j, (label, v) in enumerate(panel["series"].items()):
            v = np.asarray(log_safe(v) if panel.get("log") else v, float)
            ok = np.asarray(converged[label], bool) if converged and label in converged else np.ones(len(x), bool)
            col = colors[j % len(colors)]
            _plot(ax, x[ok], v[ok], ls="", marker="o", ms=3, color=col, label=label)
            if (~ok & np.isfinite(v)).any():
                any_hollow = True
                _plot(ax, x[~ok], v[~ok], ls="", marker="o", ms=3, mfc="none", color=col)
        for k, (text, xv) in enumerate(thresholds.items()):
            ax.axvline(xv, color="gray", ls=":" if k == 0 else "--", lw=0.8, label=text, gid="ref")
        ax.set_xlim(lo - pad, hi + pad)
        has_data = any(np.size(l.get_ydata()) for l in ax.get_lines() if l.get_gid() != "ref")
        if not has_data:
            ax.text(0.5, 0.5, "undefined at every point\n(H = 0 or NaN)", transform=ax.transAxes,
                    ha="center", va="center")
            ax.set_yticks([])
        elif panel.get("log"):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, numticks=5))
            ax.yaxis.set_minor_formatter(NullFormatter())
            _ensure_log_labels(ax)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.set_xlabel(x_label if size == "full" else x_label.split(" = ")[0])  # column: defined in the title
        ax.set_ylabel(panel["title"] if size == "full" else panel["title"].split(" (")[0])
        ax.grid(True, alpha=0.3, lw=0.4)
    handles, labels = axes[0].get_legend_handles_labels()
    if any_hollow:
        handles.append(plt.Line2D([], [], ls="", marker="o", ms=3, mfc="none", color="gray"))
        labels.append("not converged")
    fig.legend(handles, labels, loc="outside lower center", ncol=3 if size == "full" else 2)
    if size == "column":
        title = f"{title}\n{x_label}"
    fig.suptitle(wrap(title, size), fontsize=figstyle.MIN_FONT_PT + (1 if size == "full" else 0))
    return fig


def save_sweep(folder, *args, save_kw=None, **kw) -> list[Path]:
    """:func:`sweep_figure` at every size into ``folder`` (``save_kw``: sizes, formats of figstyle.save)."""
    return figstyle.save(lambda size: sweep_figure(size, *args, **kw), folder, "figure", **(save_kw or {}))
