"""The paper's Fig 5 / Fig 10 layout for network runs (matplotlib, Agg backend).

One row per run, four panels against epochs: (1) training objective (log, left axis)
and train/test accuracy (right axis); (2) NC1 = (1/K)Tr(Σ_W Σ_B⁺), one line per feature
level; (3) NC2 = distance of the centred class-mean Gram to the simplex ETF (nc2_etf),
one line per level; (4) NC3 = ‖W/‖W‖ - M̃/‖M̃‖‖ (nc3_etf, solid) and Zhu et al.'s duality
‖WM̃ᵀ/‖WM̃ᵀ‖ - E_K‖ (nc3_duality_etf, dotted), penultimate level only (W acts on the
penultimate features; NC3 is undefined elsewhere). NC panels use the measured
training subsample. The numbers are in each run's metrics.csv.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nclab.io import atomic_path  # noqa: E402


def series(rows: list[dict], split: str, layer: str, metric: str) -> tuple[list[int], list[float]]:
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


def _positive(ys):
    return [y if y > 0 else float("nan") for y in ys]


def plot_runs(runs: dict[str, list[dict]], path_stem, titles: dict[str, str] | None = None) -> list[Path]:
    """Draw one Fig-5 row per run; writes ``path_stem``.png and .pdf atomically."""
    titles = titles or {}
    fig, axes = plt.subplots(len(runs), 4, figsize=(17, 3.6 * len(runs)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, (name, rows) in zip(axes, runs.items()):
        lv = levels(rows)
        colours = {lay: cmap(i / max(len(lv) - 1, 1)) for i, lay in enumerate(lv)}
        ax = row[0]
        for split, style in (("train", "-"), ("test", "--")):
            x, y = series(rows, split, "network", "objective")
            if x:
                ax.plot(x, _positive(y), style, color="tab:red", label=f"{split} objective")
        ax.set_yscale("log")
        ax.set_ylabel("objective (loss + wd/2‖θ‖²)")
        acc = ax.twinx()
        for split, style in (("train", "-"), ("test", "--")):
            x, y = series(rows, split, "network", "accuracy")
            if x:
                acc.plot(x, y, style, color="tab:blue", label=f"{split} accuracy")
        acc.set_ylim(0, 1.02)
        acc.set_ylabel("accuracy")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = acc.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center right")
        ax.set_title(titles.get(name, name), fontsize=9, loc="left")
        for ax, metric, label in ((row[1], "nc1", "NC1  (1/K) Tr(Σ_W Σ_B⁺)"),
                                  (row[2], "nc2_etf", "NC2  ‖G̃/‖G̃‖ − ETF‖ (centred means)")):
            for lay in lv:
                x, y = series(rows, "train", lay, metric)
                ax.plot(x, _positive(y), color=colours[lay], label=lay, marker="." if len(x) < 30 else None)
            ax.set_yscale("log")
            ax.set_ylabel(label)
            ax.legend(fontsize=7, title="level", title_fontsize=7)
        ax = row[3]
        for metric, style, label in (("nc3_etf", "-", "‖W/‖W‖ − M̃/‖M̃‖‖ (alignment)"),
                                     ("nc3_duality_etf", ":", "‖WM̃ᵀ/‖WM̃ᵀ‖ − ETF‖ (duality)")):
            x, y = series(rows, "train", "penultimate", metric)
            ax.plot(x, _positive(y), style, color=colours.get("penultimate", "k"), label=label,
                    marker="." if len(x) < 30 else None)
        ax.set_yscale("log")
        ax.set_ylabel("NC3 (penultimate)")
        ax.legend(fontsize=7)
        for ax in row:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3, which="both", lw=0.5)
    fig.tight_layout()
    paths = []
    for ext in ("png", "pdf"):
        path = Path(f"{path_stem}.{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=120)
        paths.append(path)
    plt.close(fig)
    return paths
