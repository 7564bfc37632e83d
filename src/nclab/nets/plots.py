"""The paper's Fig 5 / Fig 10 layout for network runs (matplotlib, Agg backend).

One row per run, four panels against epochs: (1) objective (loss + wd/2‖θ‖², log, left
axis) and accuracy (right axis), measured in eval mode on the measured subsamples of the
training and test sets; (2) NC1 = (1/K)Tr(Σ_W Σ_B⁺), one line per feature level;
(3) NC2 = distance of the centred class-mean Gram to the simplex ETF (nc2_etf, the
paper's Fig 5 panel for every row), one line per level; (4) NC3 against the frame of the
run's optimum (``nc3_frames``, see :func:`nclab.nets.settings.nc3_frame`), penultimate level
only (W acts on the penultimate features; NC3 is undefined elsewhere):

* "of" (MSE, no bias), labelled "NC3 (OF)": ‖W/‖W‖ − Mᵀ/‖M‖‖ (nc3_of, solid) and
  ‖WM/‖WM‖ − O_K‖ (nc3_duality_of, dotted), M the uncentred class means (d, K);
* "etf" (bias or cross-entropy), labelled "NC3 (ETF)": the same with the centred means
  M̃ and the simplex ETF E_K (nc3_etf, nc3_duality_etf).

NC panels use the measured training subsample. The numbers are in each run's metrics.csv.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from nclab.plots import log_safe, save_figure  # noqa: E402

OBJECTIVE_LABEL = "objective (loss + wd/2‖θ‖²)"
NC3_LINES = {
    "of": (("nc3_of", "-", "‖W/‖W‖ − Mᵀ/‖M‖‖ (alignment)"),
           ("nc3_duality_of", ":", "‖WM/‖WM‖ − O_K‖ (duality)")),
    "etf": (("nc3_etf", "-", "‖W/‖W‖ − M̃ᵀ/‖M̃‖‖ (alignment)"),
            ("nc3_duality_etf", ":", "‖WM̃/‖WM̃‖ − E_K‖ (duality)")),
}
SPLIT_LABEL = {"train": "train (measured subsample, eval mode)", "test": "test (measured subsample, eval mode)"}


def series(rows: list[dict], split: str, layer: str, metric: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of one metric, sorted by epoch."""
    pts = sorted((r["epoch"], r["value"]) for r in rows
                 if r["split"] == split and r["layer"] == layer and r["metric"] == metric)
    return [p[0] for p in pts], [p[1] for p in pts]


def levels(rows: list[dict]) -> list[str]:
    """Feature levels in forward order (as first recorded), ``penultimate`` last."""
    seen = []
    for r in rows:
        if r["split"] == "train" and r["layer"] not in ("network", *seen):
            seen.append(r["layer"])
    return seen


def _marker(x) -> str | None:
    return "." if len(x) < 30 else None


def _objective_panel(ax, rows: list[dict], title: str) -> None:
    """Objective (log) and accuracy (twin axis) of the measured train/test subsamples."""
    for split, style in (("train", "-"), ("test", "--")):
        x, y = series(rows, split, "network", "objective")
        if x:
            ax.plot(x, log_safe(y), style, color="tab:red", label=f"objective, {SPLIT_LABEL[split]}")
    ax.set_yscale("log")
    ax.set_ylabel(OBJECTIVE_LABEL)
    acc = ax.twinx()
    for split, style in (("train", "-"), ("test", "--")):
        x, y = series(rows, split, "network", "accuracy")
        if x:
            acc.plot(x, y, style, color="tab:blue", label=f"accuracy, {SPLIT_LABEL[split]}")
    acc.set_ylim(0, 1.02)
    acc.set_ylabel("accuracy")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = acc.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=6, loc="center right")
    ax.set_title(title, fontsize=9, loc="left")


def _level_panel(ax, rows: list[dict], metric: str, label: str, colours: dict) -> None:
    """One line per feature level of ``metric`` on the measured training subsample."""
    for lay, colour in colours.items():
        x, y = series(rows, "train", lay, metric)
        ax.plot(x, log_safe(y), color=colour, label=lay, marker=_marker(x))
    ax.set_yscale("log")
    ax.set_ylabel(label)
    ax.legend(fontsize=7, title="level", title_fontsize=7)


def _nc3_panel(ax, rows: list[dict], frame: str, colour) -> None:
    """Alignment and duality NC3 of the penultimate level against ``frame`` ("of" or "etf")."""
    for metric, style, label in NC3_LINES[frame]:
        x, y = series(rows, "train", "penultimate", metric)
        ax.plot(x, log_safe(y), style, color=colour, label=label, marker=_marker(x))
    ax.set_yscale("log")
    ax.set_ylabel(f"NC3 ({frame.upper()}), penultimate")
    ax.set_title(f"NC3 ({frame.upper()})", fontsize=9, loc="left")
    ax.legend(fontsize=7)


def plot_runs(runs: dict[str, list[dict]], stem: str, folder, *, titles: dict[str, str] | None = None,
              nc3_frames: dict[str, str] | None = None) -> list[Path]:
    """Draw one Fig-5 row per run; writes ``stem``.png and .pdf atomically into ``folder``
    (a :class:`nclab.rundir.Folder`; see :func:`nclab.plots.save_figure`).

    Args:
        runs: run name -> metrics.csv rows (dicts with epoch, split, layer, metric, value).
        titles: run name -> row title. nc3_frames: run name -> "of" or "etf" (default "etf").
    """
    titles, nc3_frames = titles or {}, nc3_frames or {}
    fig, axes = plt.subplots(len(runs), 4, figsize=(17, 3.6 * len(runs)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, (name, rows) in zip(axes, runs.items()):
        lv = levels(rows)
        colours = {lay: cmap(0.85 * i / max(len(lv) - 1, 1)) for i, lay in enumerate(lv)}  # no pale yellow
        _objective_panel(row[0], rows, titles.get(name, name))
        _level_panel(row[1], rows, "nc1", "NC1  (1/K) Tr(Σ_W Σ_B⁺)", colours)
        _level_panel(row[2], rows, "nc2_etf", "NC2 (ETF)  ‖G̃/‖G̃‖ − ETF‖ (centred means)", colours)
        _nc3_panel(row[3], rows, nc3_frames.get(name, "etf"), "k")
        for ax in row:
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3, which="both", lw=0.5)
    fig.tight_layout()
    return save_figure(fig, stem, folder)
