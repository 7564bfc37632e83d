"""Figures in the paper's panel layouts (matplotlib, Agg backend); no metric is computed here."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


LEVEL_STYLE = {"H1": dict(color="tab:blue"), "H2": dict(color="tab:red"),
               "H3": dict(color="tab:green"), "H4": dict(color="tab:purple")}
FRAME_NAME = {"of": "orthogonal frame", "etf": "simplex ETF"}


def log_safe(values):
    """Values for a log axis: non-positive entries (exact zeros) become NaN gaps."""
    v = np.asarray(values, dtype=float)
    return np.where(v > 0, v, np.nan)


def ufm_panels(axes, history: dict, levels: list[str], frame: str, f_star: float | None, label: str = ""):
    """Fill one row of four panels: objective (f* dashed), NC1, NC2 to ``frame``, NC3.

    ``history``: column name -> 1-D array ("iteration", "objective", "H1.nc1", ...).
    """
    it = history["iteration"]
    ax = axes[0]
    ax.plot(it, history["objective"], color="black", label="objective f")
    if f_star is not None and np.isfinite(f_star):
        ax.axhline(f_star, color="gray", ls="--", label=f"f* = {f_star:.6g}")
        if f_star > 0:  # the gap on a twin log axis: convergence is invisible on the objective's scale
            twin = ax.twinx()
            twin.plot(it, log_safe(history["gap"]), color="tab:green", lw=1, label="f - f*")
            twin.set_yscale("log")
            twin.set_ylabel("f - f*", color="tab:green")
            twin.legend(fontsize=8, loc="center right")
    ax.set_yscale("log")
    ax.set_title(f"objective{label}")
    for ax, key, title in ((axes[1], "nc1", "NC1: (1/K) Tr(Σ_W Σ_B⁺)"),
                           (axes[2], f"nc2_{frame}", f"NC2: distance to {FRAME_NAME[frame]}"),
                           (axes[3], "nc3", "NC3: alignment of W with means")):
        for level in levels:
            ax.plot(it, log_safe(history[f"{level}.{key}"]), label=level, **LEVEL_STYLE.get(level, {}))
        ax.set_yscale("log")
        ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)


def save_figure(fig, stem: str, folder) -> list[Path]:
    """Write ``stem``.png and ``stem``.pdf atomically into ``folder`` (a
    :class:`nclab.rundir.Folder`) and close the figure; returns the paths."""
    paths = []
    try:
        for ext in ("png", "pdf"):
            with folder.atomic(f"{stem}.{ext}") as tmp:
                fig.savefig(tmp, format=ext, dpi=120, bbox_inches="tight")
            paths.append(folder.path(f"{stem}.{ext}"))
    finally:
        plt.close(fig)
    return paths


def ufm_figure(history: dict, levels: list[str], frame: str, f_star: float | None, title: str):
    """The paper's layout for one model: a 1 x 4 row of panels."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    ufm_panels(axes, history, levels, frame, f_star)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def sweep_figure(x, x_label: str, panels: list[dict], threshold: float, title: str):
    """Phase diagram: one panel per quantity against x, the theory's curve where known.

    Each panel is a dict: ``title``, ``series`` {label: values (len(x))}, optional
    ``theory`` (x_fine, y_fine) drawn as a black line, ``log`` (log y axis).
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4))
    for ax, panel in zip(np.atleast_1d(axes), panels):
        if panel.get("theory") is not None:
            ax.plot(*panel["theory"], color="black", lw=2, label="theory")
        for label, v in panel["series"].items():
            ax.plot(x, log_safe(v) if panel.get("log") else v, "o", ms=4, alpha=0.8, label=label)
        ax.axvline(threshold, color="gray", ls=":", label=f"threshold {threshold:.4g}")
        if panel.get("log"):
            ax.set_yscale("log")
        ax.set_xlabel(x_label)
        ax.set_title(panel["title"])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
