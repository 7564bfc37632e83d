"""The metric pass of training: the measured subsets, one eval-mode pass, and metrics.csv rows.

Every ``eval_every`` epochs and after the last: one forward pass in eval mode, in float32
(never under bf16 autocast: features rounded to bf16 would blur NC1 near collapse), under
``torch.inference_mode`` over a fixed balanced subsample of the training set
(``measure_per_class`` samples per class, drawn once from the seed; None = auto, about 10%
of the training set: see :func:`auto_measure_per_class`), and the same number per class of
the test set, all levels at once (:func:`nclab.nets.probe.measure_layers`). A pass over
the whole training set would cost about a third of a training epoch; the subsample keeps
the pass under :data:`MEASURE_BUDGET` of an epoch (the summary records the measured
ratio; :func:`warn_budget` warns above it).

Rows (metrics.csv, long format): ``epoch, split, layer, metric, value``
(:data:`METRIC_COLUMNS`).
"""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from nclab.nets.data import ImageData, balanced_subset
from nclab.nets.distributed import Dist
from nclab.nets.losses import sample_losses, weight_norm_sq
from nclab.nets.probe import batches, measure_layers
from nclab.nets.settings import TrainSettings

METRIC_COLUMNS = ["epoch", "split", "layer", "metric", "value"]
MEASURE_BUDGET = 0.15  # metric pass / training epoch
BUDGET_MIN_EPOCH_S = 1.0  # epochs shorter than this (smoke runs) are all overhead: no budget warning

#: {split: {level: {metric: value}}}
Values = dict[str, dict[str, dict[str, float]]]


def auto_measure_per_class(n_min: int) -> int:
    """Default samples per class of the metric pass: ~10% of the smallest class (>= 5).

    ``n_min``: training samples of the smallest class. MNIST: 542 per class (5420 of
    60000); digits: 14 (140 of 1437). Never more than ``n_min``.
    """
    return min(n_min, max(5, n_min // 10))


def measured_per_class(settings: TrainSettings, data: ImageData) -> int:
    """``measure_per_class``, or :func:`auto_measure_per_class` of the training set."""
    if settings.measure_per_class is not None:
        return settings.measure_per_class
    return auto_measure_per_class(int(torch.bincount(data.y_train.cpu()).min()))


def measure_sets(data: ImageData, per_class: int, seed: int,
                 where: Dist) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed balanced subsamples (this rank's share) of the training and test sets."""
    sets = {}
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        if x is None:
            continue
        n_min = int(torch.bincount(y.cpu()).min())
        if per_class < n_min:
            idx = balanced_subset(y.cpu(), per_class, seed + 1).to(y.device)
        else:
            idx = torch.arange(len(y), device=y.device)
        idx = idx[where.rank::where.world]
        sets[split] = (x[idx], y[idx])
    return sets


def measure(model: nn.Module, sets: dict, settings: TrainSettings, num_classes: int, *,
            prepare: Callable[[torch.Tensor], torch.Tensor], where: Dist) -> Values:
    """{split: {level: {metric: value}}} from one eval-mode float32 pass per split (module docstring)."""
    model.eval()
    wd_term = settings.sgd_weight_decay / 2 * weight_norm_sq(model)
    out = {}
    for split, (x, y) in sets.items():
        res = measure_layers(model, batches(x, y, settings.measure_batch_size), num_classes,
                             sample_loss=lambda f, t: sample_losses(f, t, settings.loss),
                             prepare=prepare, distributed=where.active)
        res["network"]["objective"] = res["network"]["loss"] + wd_term
        out[split] = res
    return out


def rows_of(epoch: int, values: Values) -> list[dict]:
    """metrics.csv rows of one epoch's values (values as plain floats)."""
    return [{"epoch": epoch, "split": split, "layer": layer, "metric": metric, "value": float(value)}
            for split, levels in values.items() for layer, metrics in levels.items()
            for metric, value in metrics.items()]


def read_metrics_csv(path) -> list[dict]:
    """Rows of a metrics.csv (long format: epoch, split, layer, metric, value)."""
    with open(path, newline="") as f:
        return [{**r, "epoch": int(r["epoch"]), "value": float(r["value"])} for r in csv.DictReader(f)]


def warn_budget(summary: dict, out: Path) -> None:
    """One line on stderr when the metric pass took more than MEASURE_BUDGET of an epoch
    (of at least BUDGET_MIN_EPOCH_S seconds: in shorter ones fixed costs dominate both)."""
    ratio = summary.get("metric_pass_over_epoch", math.nan)
    if ratio > MEASURE_BUDGET and summary.get("epoch_time_s", math.nan) >= BUDGET_MIN_EPOCH_S:
        print(f"nclab train: warning: {out}: the metric pass took {ratio:.2f} of a training epoch (budget "
              f"{MEASURE_BUDGET}); lower --measure-per-class ({summary.get('measured_per_class')}) or raise "
              "--eval-every", file=sys.stderr)
