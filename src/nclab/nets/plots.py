"""The paper's Fig 5 / Fig 10 layout for network runs, in the one figure style (:mod:`nclab.figstyle`).

Per run, five panels of the PENULTIMATE features (measured training subsample, eval mode;
dashed: the held-out set where drawn):

1. NC1 = (1/K)Tr(Σ_W Σ_B⁺) against epoch (log), training and held-out;
2. NC2 = distance of the centred class-mean Gram to the simplex ETF (nc2_etf) (log);
3. NC3 against the frame of the run's optimum (``nc3_frame``, :func:`nclab.nets.settings.nc3_frame`):
   "of" (MSE, no bias): ‖W/‖W‖ − Mᵀ/‖M‖‖ (nc3_of, alignment) and ‖WM/‖WM‖ − O_K‖
   (nc3_duality_of, duality), M the uncentred class means; "etf" (bias or cross-entropy):
   the same with the centred means M̃ and the simplex ETF (nc3_etf, nc3_duality_etf) (log);
4. accuracy of the network on the training subsample and the held-out set (and the
   nearest-class-mean accuracy of the penultimate features when the rows hold ``ncc_accuracy``);
5. depthwise collapse: NC1 per level (stage) in network order at the first and last
   measured epoch, and on the held-out set at the last (log).

``figstyle.save`` draws it at full width (runs side by side, each run two panels wide) and
at column width (runs stacked). Only finite values are plotted (non-positive ones are left
out of log axes). :func:`redraw` redraws a run folder's figures from its metrics.csv and
summary.json, with a caption.md.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from nclab import figstyle  # noqa: E402

PEN = "penultimate"
NC3_LINES = {
    "of": (("nc3_of", "-", "W vs Mᵀ"), ("nc3_duality_of", ":", "WM vs OF")),
    "etf": (("nc3_etf", "-", "W vs M̃ᵀ"), ("nc3_duality_etf", ":", "WM̃ vs ETF")),
}
PANELS = 5
TITLES = {"mse_nobias": "MSE, no bias", "ce_bias": "cross-entropy, bias"}
LOSS_NAME = {"mse": "MSE", "mse_torch": "MSE (torch)", "ce": "cross-entropy"}


def series(rows: list[dict], split: str, layer: str, metric: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of one metric, sorted by epoch."""
    pts = sorted((r["epoch"], r["value"]) for r in rows
                 if r["split"] == split and r["layer"] == layer and r["metric"] == metric)
    return [p[0] for p in pts], [p[1] for p in pts]


def finite(x, y, *, log: bool = False) -> tuple[list, list]:
    """The points with a finite y (and y > 0 on a log axis)."""
    keep = [(a, b) for a, b in zip(x, y) if math.isfinite(b) and (b > 0 or not log)]
    return [a for a, _ in keep], [b for _, b in keep]


def levels(rows: list[dict]) -> list[str]:
    """Feature levels in forward order (as first recorded), ``penultimate`` last."""
    seen = []
    for r in rows:
        if r["split"] == "train" and r["layer"] not in ("network", *seen):
            seen.append(r["layer"])
    return seen


def short_level(level: str) -> str:
    """A short tick label of a level: stem, L1..L4 (layerN), S1.. (stageN), pen."""
    if level == PEN:
        return "pen."
    for long, short in (("layer", "L"), ("stage", "S")):
        if level.startswith(long) and level[len(long):].isdigit():
            return short + level[len(long):]
    return level


def _epoch_axis(ax) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))


def _log_lines(ax, rows, specs, ylabel: str) -> None:
    """specs: (metric, style, colour, label[, split]); penultimate rows (train unless given) against epoch, log y."""
    for metric, style, colour, label, *split in specs:
        x, y = finite(*series(rows, split[0] if split else "train", PEN, metric), log=True)
        if x:
            ax.plot(x, y, style, color=colour, label=label, marker="." if len(x) < 30 else None, ms=3)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    _epoch_axis(ax)


def _accuracy_panel(ax, rows) -> None:
    specs = [("train", "network", "accuracy", "-", "tab:blue", "train"),
             ("test", "network", "accuracy", "--", "tab:blue", "held-out"),
             ("train", PEN, "ncc_accuracy", "-", "tab:orange", "NCC train"),
             ("test", PEN, "ncc_accuracy", "--", "tab:orange", "NCC held-out")]
    lowest = 1.0
    for split, layer, metric, style, colour, label in specs:
        x, y = finite(*series(rows, split, layer, metric))
        if x:
            ax.plot(x, y, style, color=colour, label=label, marker="." if len(x) < 30 else None, ms=3)
            lowest = min(lowest, *y)
    ax.set_ylim(accuracy_floor(lowest), 1.0 + (1.0 - accuracy_floor(lowest)) * 0.03)
    ax.set_ylabel("accuracy")
    _epoch_axis(ax)
    if ax.lines:
        _legend(ax, loc="lower right")


def accuracy_floor(lowest: float) -> float:
    """The bottom of the accuracy axis: the multiple of 0.1 at or below lowest - (1 - lowest) - 0.02
    (at least 0), so that the curves (near 1 late in training) fill the upper half and stay apart,
    and the legend has the lower half."""
    if not math.isfinite(lowest):
        return 0.0
    return max(0.0, math.floor((2 * lowest - 1.02) * 10) / 10)


def _depth_panel(ax, rows) -> None:
    """NC1 per level in network order at the first and the last measured epoch (train), and held-out at the last."""
    lv = levels(rows)
    epochs = sorted({r["epoch"] for r in rows if r["split"] == "train" and r["metric"] == "nc1"})
    picks = [("train", epochs[0], ":", "0.55", f"epoch {epochs[0]}")] if len(epochs) > 1 else []
    picks += [("train", e, "-", "k", f"epoch {e}") for e in epochs[-1:]]
    picks += [("test", e, "--", "tab:blue", "held-out") for e in epochs[-1:]]
    for split, epoch, style, colour, label in picks:
        values = {r["layer"]: r["value"] for r in rows
                  if r["split"] == split and r["metric"] == "nc1" and r["epoch"] == epoch}
        x, y = finite(range(len(lv)), [values.get(level, math.nan) for level in lv], log=True)
        if x:
            ax.plot(x, y, style, color=colour, marker="o", ms=3, label=label)
    ax.set_yscale("log")
    plotted = [v for line in ax.lines for v in line.get_ydata()]
    if plotted and max(plotted) > min(plotted):  # room below the lowest point for the legend
        lo, hi = min(plotted), max(plotted)
        ax.set_ylim(lo / (hi / lo) ** 0.6, hi * (hi / lo) ** 0.08)
    ax.set_xticks(range(len(lv)), [short_level(level) for level in lv], rotation=90)
    ax.set_xlim(-0.4, len(lv) - 0.6)
    ax.set_xlabel("level (network order)")
    ax.set_ylabel("NC1")
    if ax.lines:
        _legend(ax, loc="lower left")  # NC1 falls with depth: the lower left stays free


def _legend(ax, loc: str = "best") -> None:
    ax.legend(loc=loc, handlelength=1.5, frameon=True, framealpha=0.85, edgecolor="none", borderpad=0.2,
              labelspacing=0.2, handletextpad=0.4)


def draw_run(axes, rows: list[dict], frame: str) -> None:
    """Fill the five panels of one run (see the module docstring)."""
    _log_lines(axes[0], rows, [("nc1", "-", "k", "train"), ("nc1", "--", "tab:blue", "held-out", "test")], "NC1")
    if len(axes[0].lines) > 1:
        _legend(axes[0])
    _log_lines(axes[1], rows, [("nc2_etf", "-", "k", "NC2")], "NC2 (ETF)")
    _log_lines(axes[2], rows, [(m, s, "k", lab) for m, s, lab in NC3_LINES[frame]], f"NC3 ({frame.upper()})")
    if axes[2].lines:
        _legend(axes[2])
    _accuracy_panel(axes[3], rows)
    _depth_panel(axes[4], rows)
    for ax in axes:
        ax.grid(alpha=0.3, which="major", lw=0.4)


def figure(runs: dict[str, list[dict]], size: str, *, titles: dict[str, str] | None = None,
           nc3_frames: dict[str, str] | None = None):
    """The figure at ``size`` ("full": runs side by side, each run two panels wide, or three
    for a single run; "column": runs stacked, two panels per row)."""
    titles, nc3_frames = titles or {}, nc3_frames or {}
    n = max(len(runs), 1)
    width = figstyle.WIDTH_IN[size]
    if size == "full":
        cols = 3 if n == 1 else 2
        rows_per = -(-PANELS // cols)
        panel_h = 1.55 if n == 1 else 1.45
        fig = plt.figure(figsize=(width, rows_per * panel_h + 0.3))
        subs = fig.subfigures(1, n, squeeze=False).flat
    else:
        cols, rows_per = 2, -(-PANELS // 2)
        fig = plt.figure(figsize=(width, n * (rows_per * 1.45 + 0.3)))
        subs = fig.subfigures(n, 1, squeeze=False).flat
    for sub, (name, rows) in zip(subs, runs.items()):
        axes = sub.subplots(rows_per, cols, squeeze=False).flat
        axes = list(axes)
        for ax in axes[PANELS:]:
            ax.remove()
        draw_run(axes[:PANELS], rows, nc3_frames.get(name, "etf"))
        sub.suptitle(titles.get(name, name), fontsize=8)
    return fig


def plot_runs(runs: dict[str, list[dict]], stem: str, folder, *, titles: dict[str, str] | None = None,
              nc3_frames: dict[str, str] | None = None, sizes=figstyle.SIZES,
              formats=("pdf", "png")) -> list[Path]:
    """Save the figure of ``runs`` (run name -> metrics.csv rows) at both sizes into ``folder``
    (a :class:`nclab.rundir.Folder`): ``stem``.pdf/.png and ``stem``-column.pdf/.png.
    titles: run name -> title; nc3_frames: run name -> "of" or "etf" (default "etf")."""
    return figstyle.save(lambda size: figure(runs, size, titles=titles, nc3_frames=nc3_frames), folder, stem,
                         sizes=sizes, formats=formats)


# ---------------------------------------------------------------------------- redraw, caption
def _runs_of(summary: dict, name: str) -> dict[str, dict]:
    """run name -> run summary, for an experiment summary ({runs: ...}) or a single run's."""
    return summary["runs"] if "runs" in summary else {name: summary}


def run_title(name: str, run: dict) -> str:
    cfg = run.get("config", {})
    head = TITLES.get(name) or f"{LOSS_NAME.get(cfg.get('loss'), cfg.get('loss', '?'))}, " \
                               f"{'bias' if cfg.get('bias') else 'no bias'}"
    return f"{head} ({cfg.get('model', '?')} on {cfg.get('dataset', '?')})"


def caption(summary: dict, name: str = "run") -> str:
    """caption.md: the setting of every run and what the paper claims."""
    runs = _runs_of(summary, name)
    exp = summary.get("experiment", "")
    head = {"fig5": "Fig. 5 (ResNet18 on MNIST)", "fig10": "Fig. 10 (ResNet18 on CIFAR-10)"}.get(exp, exp or name)
    lines = [f"# {head}: collapse of the penultimate features during training, and NC1 through depth", ""]
    data = summary.get("data_source") or next(iter(runs.values()), {}).get("data_source", "?")
    real = summary.get("real_data", next(iter(runs.values()), {}).get("real_data", False))
    if not real:
        stand_in = "" if "stand-in" in str(data) else " (an offline stand-in, not the paper's data)"
    else:
        stand_in = "" if summary.get("paper_data", True) else " (real images, but a stand-in for the paper's data)"
    lines += [f"Data: {data}{stand_in}.", ""]
    for run, s in runs.items():
        cfg = s.get("config", {})
        lr, wd = s.get("sgd_lr", cfg.get("lr")), s.get("sgd_weight_decay", cfg.get("weight_decay"))
        frame = s.get("nc3_frame", "etf")
        lines.append(f"- **{run_title(run, s)}**: dataset {cfg.get('dataset', '?')}, model {cfg.get('model', '?')}, "
                     f"width {cfg.get('width', '?')}, loss {cfg.get('loss', '?')}, "
                     f"{'with' if cfg.get('bias') else 'without'} classifier bias, SGD lr {_g(lr)}, weight decay "
                     f"{_g(wd)} (as SGD used them), momentum {cfg.get('momentum', '?')}, "
                     f"{s.get('final_epoch', cfg.get('epochs', '?'))} epochs, batch size {cfg.get('batch_size', '?')}; "
                     f"NC3 against the {'orthogonal frame (OF)' if frame == 'of' else 'simplex ETF'}.")
    lines += ["", "Panels per run (penultimate features, measured training subsample, eval mode): NC1 (and on "
              "the held-out set, dashed), NC2 (centred class means vs the simplex ETF), NC3 (alignment of W "
              "with the class means, and duality), accuracy (training subsample and held-out set; NCC = "
              "nearest class mean of the penultimate features, where measured), and NC1 per level in network "
              "order at the first and last measured epoch (and held-out at the last).", "",
              "The paper's claims: collapse grows through training (NC1, NC2, NC3 decrease with the "
              "epochs), and NC1 decreases with depth (the deeper the level, the more collapsed).", ""]
    return "\n".join(lines)


def _g(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def redraw(run_dir: Path, folder, *, sizes=figstyle.SIZES, formats=("pdf", "png")) -> list[Path]:
    """Redraw the figures (figure[-column].pdf/.png) and caption.md of a network experiment's
    or a single train run's folder ``run_dir`` from its metrics.csv and summary.json, writing
    through ``folder`` (a :class:`nclab.rundir.Folder`); returns the paths written.
    ``sizes``/``formats``: as :func:`nclab.figstyle.save`."""
    import json

    from nclab.nets.measure import read_metrics_csv

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    name = run_dir.name or "run"
    runs_summary = _runs_of(summary, name)
    rows = read_metrics_csv(run_dir / "metrics.csv")
    grouped: dict[str, list[dict]] = {}
    for r in rows:
        grouped.setdefault(r.pop("run", None) or name, []).append(r)
    if "runs" not in summary:
        grouped = {name: [r for rs in grouped.values() for r in rs]}
    titles = {run: run_title(run, runs_summary.get(run, {})) for run in grouped}
    frames = {run: runs_summary.get(run, {}).get("nc3_frame", "etf") for run in grouped}
    paths = plot_runs(grouped, "figure", folder, titles=titles, nc3_frames=frames, sizes=sizes, formats=formats)
    paths.append(folder.write_text("caption.md", caption(summary, name)))
    return paths
