"""Layer-wise collapse metrics of any torch.nn.Module in one streaming pass.

Forward hooks record, for every batch, the output of each feature level (4-D outputs
(B, C, H, W) are global-average-pooled to (B, C), others flattened to (B, d)) and the
*input* of the classifier (the penultimate features h, (B, d)); each level feeds a
:class:`nclab.stats.ClassStats`, so all levels are measured together in one forward pass
and no feature matrix is kept except the penultimate one of the measured samples.

Metrics (names and conventions of :mod:`nclab.metrics`): every level gets nc1, nc1_trace,
cdnv, nc2_etf, nc2_of; the ``penultimate`` level also gets the classifier metrics
(nc2w_*, nc3_*) and nc4. NC3 is undefined at the other levels (W acts on the penultimate
features only); nc4 is NaN, like the other metrics, when the level is degenerate (class
means coincide). NC4 needs the final class means, so it is a second pass over the stored
penultimate features of the measured samples (:class:`nclab.stats.NC4Counter`), not over
the images. Under ``torch.distributed`` each process measures its share of the samples
and the statistics are merged exactly (``ClassStats.all_reduce``).
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Callable, Iterable

import torch
from torch import nn

from nclab._validate import DegenerateError
from nclab.nets.models import stage_modules
from nclab.stats import ClassStats, NC4Counter

PENULTIMATE = "penultimate"


def pooled(out: torch.Tensor) -> torch.Tensor:
    """Feature vectors (B, d) of a module output: GAP over spatial dims, else flatten."""
    if out.ndim == 4:
        return out.float().mean(dim=(2, 3))
    return out.float().flatten(1)


@contextlib.contextmanager
def record_features(model: nn.Module, layers: dict[str, nn.Module] | None = None,
                    classifier: nn.Module | None = None):
    """Attach forward hooks; yields a dict name -> features (B, d) of the latest forward.

    Args:
        model: any module. layers: name -> submodule whose output is a feature level
            (default :func:`nclab.nets.models.stage_modules`). classifier: the final
            linear layer (default ``model.fc``); its input is recorded as ``penultimate``.
    The hooks are removed on exit, also after an exception.
    """
    layers = stage_modules(model) if layers is None else OrderedDict(layers)
    classifier = model.fc if classifier is None else classifier
    feats: dict[str, torch.Tensor] = OrderedDict()
    handles = []
    for name, module in layers.items():
        def hook(_m, _inp, out, name=name):
            feats[name] = pooled(out).detach()
        handles.append(module.register_forward_hook(hook))

    def pre_hook(_m, inp):
        feats[PENULTIMATE] = inp[0].detach().float().flatten(1)
    handles.append(classifier.register_forward_pre_hook(pre_hook))
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(y), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


def _level_metrics(stats: ClassStats, W) -> dict[str, float]:
    """ClassStats.metrics, with NaN for every metric when the level is degenerate.

    A level whose class means coincide (e.g. all ReLU outputs dead after a diverging step)
    has no defined NC metrics; a training run records NaN there instead of stopping.
    """
    try:
        return stats.metrics(W)
    except DegenerateError:
        names = ["nc1", "nc1_trace", "cdnv", "nc2_etf", "nc2_of"]
        if W is not None:
            names += ["nc2w_etf", "nc2w_of", "nc3_etf", "nc3_of", "nc3_duality_etf", "nc3_duality_of"]
        return {k: math.nan for k in names}


def _nc4(stats: ClassStats, kept: list[torch.Tensor], W, b, distributed: bool, metrics: dict) -> float:
    """NC4 over the stored penultimate features (B_i, d); NaN where the level is degenerate."""
    if any(math.isnan(v) for v in metrics.values()):  # the same on every rank: merged statistics
        return math.nan
    nc4 = NC4Counter(stats.means, W, b).update(torch.cat(kept))
    if distributed:
        nc4.all_reduce()
    return nc4.value


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
        prepare: applied to each x before the forward (e.g. device / memory format).
        autocast: factory of the context each forward runs in (e.g. bf16 autocast).
        distributed: merge the statistics of all torch.distributed processes.
    Returns:
        {level: {metric: value}} with the levels in forward order and ``penultimate``
        last, plus ``network``: loss (mean per-sample loss, when sample_loss is given),
        accuracy, samples.
    """
    classifier = model.fc if classifier is None else classifier
    stats: dict[str, ClassStats] = OrderedDict()
    kept, loss_sum, correct, seen = [], 0.0, 0.0, 0
    with record_features(model, layers, classifier) as feats:
        for xb, yb in data:
            with autocast():
                logits = model(prepare(xb)).float()
            yb = yb.to(logits.device)  # data may stay on the CPU while the model is on the GPU
            for name, h in feats.items():
                if name not in stats:
                    stats[name] = ClassStats(num_classes, h.shape[1], device=h.device)
                stats[name].update(h, yb)
            kept.append(feats[PENULTIMATE])
            correct = correct + (logits.argmax(1) == yb).sum().double()
            if sample_loss is not None:
                loss_sum = loss_sum + sample_loss(logits, yb).sum().double()
            seen += len(yb)
    if not stats:
        raise ValueError("data: no batches to measure")
    device = kept[0].device
    totals = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                          for v in (loss_sum, correct, float(seen))])
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(totals)
        for s in stats.values():
            s.all_reduce()
    stats.move_to_end(PENULTIMATE)
    W = classifier.weight.detach()
    b = None if classifier.bias is None else classifier.bias.detach()
    out = OrderedDict()
    for name, s in stats.items():
        out[name] = _level_metrics(s, W if name == PENULTIMATE else None)
    out[PENULTIMATE]["nc4"] = _nc4(stats[PENULTIMATE], kept, W, b, distributed, out[PENULTIMATE])
    loss, acc, n = (float(v) for v in totals)
    out["network"] = ({"loss": loss / n} if sample_loss is not None else {}) | {"accuracy": acc / n, "samples": n}
    return out
