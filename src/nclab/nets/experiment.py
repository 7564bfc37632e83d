"""The paper's network experiments (Fig 5: ResNet18 on MNIST; Fig 10: ResNet18 on CIFAR-10).

``run_network_experiment(name, out_dir)`` trains every run of the figure and writes::

    out_dir/config.toml        experiment name + one [runs.NAME] table per run; re-run it
                               with ``nclab train --config out_dir/config.toml --out DIR``
    out_dir/metrics.csv        run, epoch, split, layer, metric, value (all runs)
    out_dir/summary.json       experiment, data source, wall time, runs: {NAME: summary}
    out_dir/figure.png, .pdf   the paper's layout, one row per run
    out_dir/NAME/              each run's own config.toml, metrics.csv, summary.json and
                               checkpoint.pt (the figure is the combined one above)

Runs: fig5 = ``mse_nobias`` (MSE, no classifier bias) and ``ce_bias`` (cross-entropy,
bias); fig10 = ``mse_nobias``. Hyper-parameters follow THEORY.md §5 (SGD momentum 0.9,
batch 128, lr divided by 10 every 40 epochs, weight decay 5e-4). The MSE runs use the UFM
scaling 1/(2N)‖F - Y‖² with lr 0.01 and weight decay 2.5e-3: exactly torch.nn.MSELoss
with lr 0.05 and weight decay 5e-4 (K = 10; step × 2/K, decay × K/2, see
:mod:`nclab.nets.train`), i.e. the UFM regularisation λ = K·wd/2 = 2.5e-3.

Without ``data`` the runs use scikit-learn's digits (8x8, offline) with a ResNet18 of
width 1/4 for a few minutes on a CPU, and say so; with ``data`` (torchvision's folder
layout) they use MNIST (1x32x32, padded) or CIFAR-10 with the full-width ResNet18 and a
3x3 stem for 200 epochs. An interrupted experiment continues where it stopped when run
again with the same ``out_dir``.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from nclab.io import write_json, write_text
from nclab.nets.train import CHECKPOINT, TrainConfig, load_config_file, read_metrics_csv, train, write_config

NETWORK_EXPERIMENTS = ("fig5", "fig10")
K_PAPER = 10
_MSE = dict(loss="mse", bias=False, lr=0.05 * 2 / K_PAPER, weight_decay=5e-4 * K_PAPER / 2)
_CE = dict(loss="ce", bias=True, lr=0.05, weight_decay=5e-4)
RUNS = {"fig5": {"mse_nobias": _MSE, "ce_bias": _CE}, "fig10": {"mse_nobias": _MSE}}
TITLES = {"mse_nobias": "MSE, no bias", "ce_bias": "cross-entropy, bias"}
DATASET = {"fig5": "mnist", "fig10": "cifar10"}


def experiment_configs(name: str, *, data: str | None = None, device: str = "cpu", epochs: int | None = None,
                       quick: bool = False) -> dict[str, TrainConfig]:
    """The TrainConfig of every run of experiment ``name`` (see the module docstring)."""
    if name not in NETWORK_EXPERIMENTS:
        raise ValueError(f"name: expected one of {NETWORK_EXPERIMENTS}, got {name!r}")
    if data is None:
        base = dict(dataset="digits", width=0.25, epochs=150, lr_step=50, eval_every=3, measure_per_class=20,
                    threads=1)
    else:
        base = dict(dataset=DATASET[name], data=str(data), width=1.0, epochs=200, lr_step=40, eval_every=5,
                    measure_per_class=100)
    if quick:
        base |= dict(width=0.125, epochs=4, lr_step=40, eval_every=2, measure_per_class=10)
        if data is not None:
            base["per_class"] = 50
    if epochs is not None:
        base["epochs"] = epochs
    return {run: TrainConfig(**base, **hp, device=device).validate() for run, hp in RUNS[name].items()}


def train_runs(runs: dict[str, TrainConfig], out_dir, *, experiment: str = "custom", quiet: bool = False,
               resume: bool = True) -> dict:
    """Train each run into out_dir/NAME and write the combined outputs (module docstring)."""
    out = Path(out_dir)
    t0 = time.perf_counter()
    write_config(out / "config.toml", {"experiment": experiment,
                                       "runs": {k: c.to_dict() for k, c in runs.items()}})
    summaries, rows = {}, {}
    for run, cfg in runs.items():
        run_dir = out / run
        summaries[run] = train(cfg, run_dir, resume=resume and (run_dir / CHECKPOINT).exists(), quiet=quiet,
                               figure=False)
        rows[run] = read_metrics_csv(run_dir / "metrics.csv")
    first = next(iter(summaries.values()))
    summary = {
        "experiment": experiment,
        "data_source": first["data_source"],
        "real_data": first["real_data"],
        "device": first["device"],
        "wall_time_s": time.perf_counter() - t0,
        "runs": summaries,
    }
    _write_combined_csv(out / "metrics.csv", rows)
    write_json(out / "summary.json", summary)
    from nclab.nets.plots import plot_runs

    plot_runs(rows, out / "figure", titles={r: f"{TITLES.get(r, r)} ({runs[r].dataset})" for r in rows})
    return summary


def _write_combined_csv(path, rows: dict[str, list[dict]]):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "epoch", "split", "layer", "metric", "value"])
    for run, rs in rows.items():
        w.writerows([run, r["epoch"], r["split"], r["layer"], r["metric"], repr(r["value"])] for r in rs)
    write_text(path, buf.getvalue())


def run_network_experiment(name: str, out_dir: Path, *, data: str | None = None, device: str = "cpu",
                           quiet: bool = False, epochs: int | None = None, quick: bool = False) -> dict:
    """Run the paper's Fig 5 or Fig 10 network experiment into ``out_dir``; returns the summary."""
    runs = experiment_configs(name, data=data, device=device, epochs=epochs, quick=quick)
    if not quiet and data is None:
        print(f"nclab {name}: no --data given; running on scikit-learn's digits (8x8, offline "
              "stand-in for the paper's data) with a ResNet18 of width "
              f"{next(iter(runs.values())).width}")
    return train_runs(runs, out_dir, experiment=name, quiet=quiet)


def runs_from_config(path) -> tuple[str, dict[str, TrainConfig]]:
    """(experiment, runs) of a config file: ``[runs.NAME]`` tables, or one flat run."""
    raw = load_config_file(path)
    if "runs" in raw:
        extra = sorted(set(raw) - {"runs", "experiment"})
        if extra:
            raise ValueError(f"config: unknown top-level key(s) {extra} next to [runs]")
        return raw.get("experiment", "custom"), {k: TrainConfig.from_dict(v, f"config [runs.{k}]")
                                                  for k, v in raw["runs"].items()}
    return "", {"": TrainConfig.from_dict(raw)}


def report_markdown(summary: dict, rel_dir: str) -> str:
    """A report section: figure link, data source, final per-level NC1/NC2/NC3 and accuracy."""
    name = summary.get("experiment", "network")
    real = summary.get("real_data", False)
    lines = [f"## {name}: ResNet18 layer-wise collapse", "",
             f"![{name}]({rel_dir}/figure.png)", "",
             f"Data: {summary.get('data_source', '?')} — "
             + ("real data." if real else "**scikit-learn digits, an offline stand-in; not the paper's data.**"),
             f"Wall time {summary.get('wall_time_s', float('nan')):.0f} s on {summary.get('device', '?')}.", ""]
    for run, s in summary["runs"].items():
        cfg, fin = s["config"], s["final"]
        lines += [f"**{TITLES.get(run, run)}** ({cfg['loss']}, lr {cfg['lr']:g}, weight decay "
                  f"{cfg['weight_decay']:g}, width {cfg['width']:g}, {s['final_epoch']} epochs; metric pass / "
                  f"epoch = {s['metric_pass_over_epoch']:.3f})", "",
                  "| level | NC1 | NC2 (ETF) | NC3 (ETF) | NC4 |", "|---|---|---|---|---|"]
        for level, m in fin["train"].items():
            if level == "network":
                continue
            nc3 = f"{m['nc3_etf']:.3g}" if "nc3_etf" in m else "—"
            nc4 = f"{m['nc4']:.3g}" if "nc4" in m else "—"
            lines.append(f"| {level} | {m['nc1']:.3g} | {m['nc2_etf']:.3g} | {nc3} | {nc4} |")
        acc = " / ".join(f"{split} {fin[split]['network']['accuracy']:.3f}" for split in fin)
        lines += ["", f"Accuracy: {acc}; train objective {fin['train']['network']['objective']:.3g}.", ""]
    return "\n".join(lines)
