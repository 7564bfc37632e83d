"""Layer-wise collapse metrics of the networks of :mod:`nclab.nets` in one streaming pass.

The machinery (forward hooks, per-level :class:`nclab.stats.ClassStats`, the second look
for ``ncc_accuracy`` and NC4, merging under ``torch.distributed``) is
:class:`nclab.monitor.CollapseMonitor`'s; this module adds the defaults of the networks
of :mod:`nclab.nets` (levels from :func:`nclab.nets.models.stage_modules`, classifier
``model.fc``) and the network's own loss and accuracy.

Metrics (names and conventions of :mod:`nclab.metrics`): every level gets nc1, nc1_trace,
cdnv, nc2_etf, nc2_of (and any further key of ``ClassStats.metrics``) and ncc_accuracy;
the ``penultimate`` level also gets the classifier metrics (nc2w_*, nc3_*) and nc4. A
degenerate level (class means coincide) gets NaN for every metric.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable, Iterable

import torch
from torch import nn

from nclab.monitor import PENULTIMATE, CollapseMonitor, hooked, pooled  # noqa: F401 (pooled: re-exported)
from nclab.nets.models import stage_modules


@contextlib.contextmanager
def record_features(model: nn.Module, layers: dict[str, nn.Module] | None = None,
                    classifier: nn.Module | None = None):
    """Attach forward hooks; yields a dict name -> features (B, d) of the latest forward.

    Args:
        model: any module. layers: name -> submodule whose output is a feature level
            (default :func:`nclab.nets.models.stage_modules`). classifier: the final
            linear layer (default ``model.fc``); its input is recorded as ``penultimate``.
    The hooks are removed on exit, also after an exception (:func:`nclab.monitor.hooked`).
    """
    layers = stage_modules(model) if layers is None else OrderedDict(layers)
    with hooked(layers, model.fc if classifier is None else classifier) as feats:
        yield feats


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(y), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


@torch.inference_mode()
def measure_layers(model: nn.Module, data: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int, *,
                   sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                   layers: dict[str, nn.Module] | None = None, classifier: nn.Module | None = None,
                   prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                   distributed: bool = False) -> dict[str, dict[str, float]]:
    """Collapse metrics of every feature level from one pass over ``data``.

    Args:
        model: put in eval mode by the caller if wanted (BatchNorm!).
        data: iterable of (x (B, ...), y (B,)) batches; every class must occur.
        sample_loss: (logits (B, K), y) -> per-sample loss (B,), for ``loss``.
        layers: name -> module (default :func:`nclab.nets.models.stage_modules`);
            classifier: default ``model.fc``.
        prepare: applied to each x before the forward (e.g. device / memory format).
        autocast: factory of the context each forward runs in (e.g. bf16 autocast).
        distributed: merge the statistics of all torch.distributed processes.
    Returns:
        {level: {metric: value}} with the levels in the order of ``layers`` and
        ``penultimate`` last, plus ``network``: loss (mean per-sample loss, when
        sample_loss is given), accuracy, samples.
    """
    monitor = CollapseMonitor(model, stage_modules(model) if layers is None else layers, num_classes,
                              classifier=model.fc if classifier is None else classifier, distributed=distributed)
    loss_sum, correct, seen = 0.0, 0.0, 0
    with monitor.collect():
        for xb, yb in data:
            with autocast():
                logits = model(prepare(xb)).float()
            yb = yb.to(logits.device)  # data may stay on the CPU while the model is on the GPU
            monitor.update(yb)
            correct = correct + (logits.argmax(1) == yb).sum().double()
            if sample_loss is not None:
                loss_sum = loss_sum + sample_loss(logits, yb).sum().double()
            seen += len(yb)
        out = monitor.compute()
        device = logits.device
    totals = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                          for v in (loss_sum, correct, float(seen))])
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(totals)
    loss, acc, n = (float(v) for v in totals)
    out["network"] = ({"loss": loss / n} if sample_loss is not None else {}) | {"accuracy": acc / n, "samples": n}
    return out
