"""The paper's network experiments (Fig 5: ResNet18 on MNIST; Fig 10: ResNet18 on CIFAR-10).

``run_network_experiment(name, out_dir)`` trains every run of the figure and writes::

    out_dir/config.toml        experiment name + one [runs.NAME] table per run; re-run it
                               with ``nclab train --config out_dir/config.toml --out DIR``
    out_dir/metrics.csv        run, epoch, split, layer, metric, value (all runs)
    out_dir/summary.json       experiment, data source, wall time, runs: {NAME: summary}
    out_dir/figure.png, .pdf   the paper's layout (nclab.nets.plots), runs side by side;
                               figure-column.png/.pdf the same at column width; caption.md
    out_dir/NAME/              each run's own config.toml, metrics.csv, summary.json and
                               checkpoint.pt (the figure is the combined one above)

Runs: fig5 = ``mse_nobias`` (MSE, no classifier bias) and ``ce_bias`` (cross-entropy,
bias); fig10 = ``mse_nobias``. Hyper-parameters follow docs/theory.md §5 (SGD momentum 0.9,
batch 128, lr divided by 10 every 40 epochs, weight decay 5e-4). The MSE runs use the UFM
scaling 1/(2N)‖F - Y‖² with lr 0.01 and weight decay 2.5e-3: exactly torch.nn.MSELoss
with lr 0.05 and weight decay 5e-4 (K = 10; step × 2/K, decay × K/2, see
:mod:`nclab.nets.losses`), i.e. the UFM regularisation λ = K·wd/2 = 2.5e-3.

Without ``data`` the runs use scikit-learn's digits (8x8, offline) with a ResNet18 of
width 1/4 for a few minutes on a CPU, and say so; with ``data`` (torchvision's folder
layout) they use MNIST (1x32x32, padded) or CIFAR-10 with the full-width ResNet18 and a
3x3 stem for 200 epochs. An ``out_dir`` that already holds results is an error unless
``resume=True`` (continue every run from its checkpoint; the settings must match) or
``force=True`` (overwrite).

NC3 is measured against the frame of each run's optimum (:func:`nclab.nets.settings.nc3_frame`):
the orthogonal frame of the uncentred means for MSE without bias ("NC3 (OF)": nc3_of,
nc3_duality_of), the simplex ETF of the centred means otherwise ("NC3 (ETF)": nc3_etf,
nc3_duality_etf). NC2 is the centred means vs the simplex ETF (nc2_etf) in every row, as
in the paper's Fig 5. The train objective and accuracy in the figure and report are
measured in eval mode on the measured training subsample.
"""
from __future__ import annotations

import os
import time

from nclab.io import read_toml, toml_text
from nclab.nets.measure import METRIC_COLUMNS, read_metrics_csv
from nclab.nets.settings import TrainSettings, nc3_frame
from nclab.nets.training import run_folder, settings_record, train
from nclab.rundir import Folder
from nclab.settings import valid_name

NETWORK_EXPERIMENTS = ("fig5", "fig10")
_MSE = dict(loss="mse", bias=False)  # lr, wd: the paper's, in the UFM scaling (TrainSettings.sgd_lr)
_CE = dict(loss="ce", bias=True)      # lr, wd: the paper's
RUNS = {"fig5": {"mse_nobias": _MSE, "ce_bias": _CE}, "fig10": {"mse_nobias": _MSE}}
TITLES = {"mse_nobias": "MSE, no bias", "ce_bias": "cross-entropy, bias"}
DATASET = {"fig5": "mnist", "fig10": "cifar10"}
TRAIN_MEASURED = "train (measured subsample, eval mode)"


def experiment_configs(name: str, *, data: str | None = None, device: str = "cpu", epochs: int | None = None,
                       quick: bool = False) -> dict[str, TrainSettings]:
    """The TrainSettings of every run of experiment ``name`` (see the module docstring)."""
    if name not in NETWORK_EXPERIMENTS:
        raise ValueError(f"name: expected one of {NETWORK_EXPERIMENTS}, got {name!r}")
    if data is None:
        base = dict(dataset="digits", width=0.25, epochs=150, lr_step=50, eval_every=3, measure_per_class=20,
                    threads=1)
    else:  # the full-width network and the paper's epochs and schedule: TrainSettings' defaults
        base = dict(dataset=DATASET[name], data=str(data), eval_every=5, measure_per_class=100)
    if quick:
        base.pop("lr_step", None)  # 4 epochs: no lr step
        base |= dict(width=0.125, epochs=4, eval_every=2, measure_per_class=10)
        if data is not None:
            base["per_class"] = 50
    if epochs is not None:
        base["epochs"] = epochs
    return {run: TrainSettings(**base, **hp, device=device) for run, hp in RUNS[name].items()}


def train_runs(runs: dict[str, TrainSettings], out, *, experiment: str = "custom", quiet: bool = False,
               resume: bool = False, force: bool = False) -> dict:
    """Train each run into out/NAME and write the combined outputs (module docstring).

    ``out``: a folder path (opened as a run folder, as :func:`nclab.nets.training.train`
    does) or a :class:`nclab.rundir.Folder` of an open one. ``resume``: continue each run
    from its checkpoint (the settings must match); ``force``: start over, removing only
    nclab's earlier files.
    """
    record = {run: settings_record(s) for run, s in runs.items()}
    with run_folder(out, resume=resume, force=force, part=experiment, record=record) as folder:
        return _train_runs(runs, folder, experiment, quiet=quiet, resume=resume)


def _train_runs(runs: dict[str, TrainSettings], folder: Folder, experiment: str, *, quiet: bool,
                resume: bool) -> dict:
    rank0 = int(os.environ.get("RANK", "0")) == 0
    t0 = time.perf_counter()
    if rank0:
        folder.write_text("config.toml", toml_text({"experiment": experiment,
                                                    "runs": {k: c.to_dict() for k, c in runs.items()}}))
    summaries, rows = {}, {}
    for run, cfg in runs.items():
        summaries[run] = train(cfg, folder.sub(run), resume=resume, quiet=quiet, figure=False)
        rows[run] = read_metrics_csv(folder.path(f"{run}/metrics.csv"))
    first = next(iter(summaries.values()))
    summary = {
        "experiment": experiment,
        "data_source": first["data_source"],
        "real_data": first["real_data"],
        "device": first["device"],
        "wall_time_s": time.perf_counter() - t0,
        "runs": summaries,
    }
    if rank0:
        folder.write_csv("metrics.csv", [{"run": run, **r} for run, rs in rows.items() for r in rs],
                         ["run", *METRIC_COLUMNS])
        folder.write_json("summary.json", summary)
        from nclab.nets.plots import caption, plot_runs, run_title

        plot_runs(rows, "figure", folder, titles={r: run_title(r, summaries[r]) for r in rows},
                  nc3_frames={r: nc3_frame(runs[r].loss, runs[r].bias) for r in rows})
        folder.write_text("caption.md", caption(summary))
    return summary


def run_network_experiment(name: str, out, *, runs: dict[str, TrainSettings] | None = None,
                           data: str | None = None, device: str = "cpu", quiet: bool = False,
                           epochs: int | None = None, quick: bool = False, resume: bool = False,
                           force: bool = False) -> dict:
    """Run the paper's Fig 5 or Fig 10 network experiment into ``out``; returns the summary.

    ``out``: a folder path or a :class:`nclab.rundir.Folder` (see :func:`train_runs`).
    ``runs``: the settings of every run (default: :func:`experiment_configs` of ``data``,
    ``device``, ``epochs``, ``quick``). A folder that already holds results is an error
    unless ``resume`` (continue every run from its checkpoint; the settings must match,
    else ValueError before anything is written) or ``force`` (start over).
    """
    if runs is None:
        runs = experiment_configs(name, data=data, device=device, epochs=epochs, quick=quick)
    first = next(iter(runs.values()))
    if not quiet and first.dataset == "digits":
        print(f"nclab {name}: no --data given; running on scikit-learn's digits (8x8, offline "
              f"stand-in for the paper's data) with a ResNet18 of width {first.width}")
    return train_runs(runs, out, experiment=name, quiet=quiet, resume=resume, force=force)


def runs_from_config(path) -> tuple[str, dict[str, TrainSettings]]:
    """(experiment, runs) of a config file: ``[runs.NAME]`` tables, or one flat run."""
    raw = read_toml(path, "config")
    if "runs" in raw:
        extra = sorted(set(raw) - {"runs", "experiment"})
        if extra:
            raise ValueError(f"config: unknown top-level key(s) {extra} next to [runs]")
        if not isinstance(raw["runs"], dict) or not raw["runs"] or not all(
                isinstance(v, dict) for v in raw["runs"].values()):
            raise ValueError("config: runs must hold one table [runs.NAME] of settings per run, e.g. "
                             "[runs.mse] with loss = \"mse\"")
        for name in raw["runs"]:
            problem = valid_name(name)
            if problem:
                raise ValueError(f"config: run name {problem}, got {name!r}")
        if not isinstance(raw.get("experiment", "custom"), str) or valid_name(raw.get("experiment", "custom")):
            raise ValueError(f"config: experiment must be a plain name, got {raw.get('experiment')!r}")
        return raw.get("experiment", "custom"), {k: TrainSettings.from_dict(v, f"config [runs.{k}]")
                                                  for k, v in raw["runs"].items()}
    return "", {"": TrainSettings.from_dict(raw)}


def nc3_label(frame: str) -> str:
    """"NC3 (OF)" or "NC3 (ETF)"."""
    return f"NC3 ({frame.upper()})"


def report_markdown(summary: dict, rel_dir: str) -> str:
    """A report section: figure link, data source, final per-level NC1/NC2/NC3 and accuracy.

    NC3 is per run: nc3_of for MSE without bias, nc3_etf otherwise (:func:`nc3_frame`).
    """
    name = summary.get("experiment", "network")
    real = summary.get("real_data", False)
    lines = [f"## {name}: ResNet18 layer-wise collapse", "",
             f"![{name}]({rel_dir}/figure.png)", "",
             f"Data: {summary.get('data_source', '?')} — "
             + ("real data." if real else "**scikit-learn digits, an offline stand-in; not the paper's data.**"),
             f"Wall time {summary.get('wall_time_s', float('nan')):.0f} s on {summary.get('device', '?')}.", ""]
    for run, s in summary["runs"].items():
        lines += _run_section(run, s)
    return "\n".join(lines)


def _run_section(run: str, s: dict) -> list[str]:
    """Markdown lines of one run: settings (lr and weight decay as SGD used them), the final metrics."""
    cfg, fin = s["config"], s["final"]
    frame = nc3_frame(cfg["loss"], cfg.get("bias", False))
    lr, wd = s.get("sgd_lr", cfg.get("lr")), s.get("sgd_weight_decay", cfg.get("weight_decay"))
    lines = [f"**{TITLES.get(run, run)}** ({cfg['loss']}, lr {lr:g}, weight decay {wd:g}, width "
             f"{cfg['width']:g}, {s['final_epoch']} epochs; metric pass / epoch = "
             f"{s['metric_pass_over_epoch']:.3f})", "",
             f"Final metrics of the measured training subsample (eval mode); {nc3_label(frame)} = "
             f"nc3_{frame} at the penultimate level (W acts there only).", "",
             f"| level | NC1 | NC2 (ETF) | {nc3_label(frame)} | NC4 |", "|---|---|---|---|---|"]
    for level, m in fin["train"].items():
        if level == "network":
            continue
        nc3 = f"{m[f'nc3_{frame}']:.3g}" if f"nc3_{frame}" in m else "—"
        nc4 = f"{m['nc4']:.3g}" if "nc4" in m else "—"
        lines.append(f"| {level} | {m['nc1']:.3g} | {m['nc2_etf']:.3g} | {nc3} | {nc4} |")
    acc = ", ".join(f"{_split_label(split)} {fin[split]['network']['accuracy']:.3f}" for split in fin)
    lines += ["", f"Accuracy: {acc}. Objective, {TRAIN_MEASURED}: {fin['train']['network']['objective']:.3g}.",
              ""]
    return lines


def _split_label(split: str) -> str:
    return TRAIN_MEASURED if split == "train" else f"{split} (measured subsample, eval mode)"
