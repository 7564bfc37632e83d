"""Neural collapse, layer by layer, in any training loop: :class:`CollapseMonitor`.

Forward hooks record, for every batch, the output of each chosen layer (4-D outputs
(B, C, H, W) are global-average-pooled to (B, C), others flattened to (B, d)) and the
*input* of the classifier (the penultimate features h, (B, d), recorded as
``penultimate``). Each level feeds a streaming :class:`nclab.stats.ClassStats`, so all
levels are measured together in one forward pass.

Metrics per level: those of ``ClassStats.metrics`` (names and conventions of
:mod:`nclab.metrics`: nc1, nc1_trace, cdnv, nc2_etf, nc2_of, ...) and ``ncc_accuracy``;
the ``penultimate`` level also gets the classifier metrics (nc2w_*, nc3_*) and nc4. NC3
is undefined at the other levels (W acts on the penultimate features only). A level
whose class means coincide (e.g. dead ReLUs after a diverging step) gets NaN for every
metric instead of an error.

``ncc_accuracy`` is the fraction of measured samples whose nearest class mean
argmin_k ‖h_i - μ_k‖² (Euclidean, means μ_k of the same pass) is their label y_i; ``nc4``
the fraction whose nearest class mean is not argmax_k (W h_i + b)_k. Both need the final
means before they can look at a sample, so the features of every level are kept (on their
device, float32 unless they came as float64) and looked at a second time after the pass:
memory N·Σ_level d_level·4 bytes for N measured samples, e.g. 4 KB a sample for a
width-1 ResNet18's five levels (64 + 64 + 128 + 256 + 512 channels), 40 MB for 10,000
samples; time: one (B, d) x (d, K) product per batch and level. Measure a subsample
(``max_batches``) when the data set is large.

Under ``torch.distributed`` each process measures its own share of the samples; the
statistics are merged exactly (``ClassStats.all_reduce``) and the counts of the second
look summed, so every rank gets the same result, equal to one process seeing all samples.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import itertools
import math
import numbers
from collections import OrderedDict
from typing import Iterable, Mapping

import torch
from torch import nn

from nclab._validate import DegenerateError, max_abs
from nclab.metrics import metric_keys, nearest_mean_t, power_of_two_exponent, times_power_of_two
from nclab.stats import ClassStats, NC4Counter

PENULTIMATE = "penultimate"

# ---------------------------------------------------------------------- features
def pooled(out: torch.Tensor) -> torch.Tensor:
    """Feature vectors (B, d) of a module output (B, ...): GAP over the spatial dims of a
    4-D output (B, C, H, W) -> (B, C), else flattened; half precision becomes float32.
    Always a copy: a later in-place op (``ReLU(inplace=True)``) must not change what was seen."""
    out = out.detach()
    if out.dtype not in (torch.float32, torch.float64):
        return out.float().mean(dim=(2, 3)) if out.ndim == 4 else out.float().flatten(1)
    return out.mean(dim=(2, 3)) if out.ndim == 4 else out.flatten(1).clone()


def _flat(x: torch.Tensor) -> torch.Tensor:
    """The classifier input (B, ...) as (B, d), half precision as float32; a copy (see :func:`pooled`)."""
    x = x.detach()
    return x.flatten(1).clone() if x.dtype in (torch.float32, torch.float64) else x.float().flatten(1)


@contextlib.contextmanager
def hooked(layers: Mapping[str, nn.Module], classifier: nn.Module | None):
    """Attach forward hooks; yields a dict name -> features (B, d) of the latest forward.

    ``layers[name]``'s output is stored under ``name`` (:func:`pooled`), the classifier's
    input under ``penultimate``. The hooks are removed on exit, also after an exception.
    """
    feats: dict[str, torch.Tensor] = OrderedDict()
    handles = []
    try:
        for name, module in layers.items():
            def hook(_m, _inp, out, name=name):
                feats[name] = pooled(out)
            handles.append(module.register_forward_hook(hook))
        if classifier is not None:
            def pre_hook(_m, inp):
                feats[PENULTIMATE] = _flat(inp[0])
            handles.append(classifier.register_forward_pre_hook(pre_hook))
        yield feats
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------- arguments
def resolve_layers(model: nn.Module, layers) -> "OrderedDict[str, nn.Module]":
    """name -> module from a list of dotted names of ``model.named_modules()`` and/or
    submodules of ``model``, or a dict name -> module (any modules)."""
    if isinstance(layers, (str, nn.Module)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers: expected a list of layer names or modules, or a dict name -> module; "
                        f"got {type(layers).__name__} (wrap a single layer in a list)")
    if isinstance(layers, Mapping):
        out = OrderedDict(layers)
        for name, module in out.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"layers: dict keys must be non-empty names, got {name!r}")
            if not isinstance(module, nn.Module):
                raise TypeError(f"layers[{name!r}]: expected an nn.Module, got {type(module).__name__}")
    else:
        named = dict(model.named_modules())
        out = OrderedDict()
        for item in layers:
            name = _layer_name(named, item, "layers")
            out[name] = named[name]
    if PENULTIMATE in out:
        raise ValueError(f"layers: the name {PENULTIMATE!r} is reserved for the classifier's input; rename that layer")
    return out


def _layer_name(named: dict[str, nn.Module], item, arg: str) -> str:
    """The dotted name of ``item`` (a name or a module) in ``named`` (model.named_modules())."""
    if isinstance(item, str):
        if item not in named or not item:
            close = difflib.get_close_matches(item, [n for n in named if n], n=5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else \
                f"; its layers are {', '.join(repr(n) for n in list(named)[1:9])}{', ...' if len(named) > 9 else ''}"
            raise ValueError(f"{arg}: {item!r} is not a layer of the model (a dotted name of "
                             f"model.named_modules()){hint}")
        return item
    if isinstance(item, nn.Module):
        for name, module in named.items():
            if module is item:
                if not name:
                    raise ValueError(f"{arg}: the model itself has no name; pass a dict, e.g. {'output': model}")
                return name
        raise ValueError(f"{arg}: the {type(item).__name__} given is not a submodule of the model; "
                         "pass a dict name -> module to hook modules outside it")
    raise TypeError(f"{arg}: expected layer names (str) or nn.Modules, got {type(item).__name__}")


def default_classifier(model: nn.Module) -> nn.Module | None:
    """``model.fc`` when it is an nn.Linear, else the last nn.Linear of ``model.modules()``."""
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Linear):
        return fc
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def resolve_classifier(model: nn.Module, classifier, num_classes: int) -> nn.Module | None:
    """The classifier module (its ``weight`` (K, d) and ``bias`` (K,) or None), or None."""
    if classifier is False:
        return None
    if classifier is None:
        classifier = default_classifier(model)
        if classifier is None:
            return None
    elif isinstance(classifier, str):
        named = dict(model.named_modules())
        classifier = named[_layer_name(named, classifier, "classifier")]
    if not isinstance(classifier, nn.Module):
        raise TypeError(f"classifier: expected an nn.Module (e.g. the final nn.Linear), its name, None "
                        f"(default: model.fc or the last nn.Linear) or False (none); got {type(classifier).__name__}")
    W = getattr(classifier, "weight", None)
    if not isinstance(W, torch.Tensor) or W.ndim != 2:
        raise TypeError(f"classifier: expected a linear layer with weight (K, d), got a {type(classifier).__name__}; "
                        "pass classifier=... explicitly, or classifier=False to measure without one")
    if W.shape[0] != num_classes:
        raise ValueError(f"classifier: its weight has {W.shape[0]} rows but num_classes is {num_classes}; "
                         "pass the final layer as classifier=..., or classifier=False")
    return classifier


# ---------------------------------------------------------------------- statistics
def level_metrics(stats: ClassStats, W) -> tuple[dict[str, float], bool]:
    """(``stats.metrics(W)``, False), or (NaN for each of its keys, True) when the level is
    degenerate (class means coincide, zero weights)."""
    try:
        return stats.metrics(W), False
    except DegenerateError:
        return {k: math.nan for k in metric_keys(stats.full, W is not None)}, True


def nearest_mean(H: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """argmin_k ‖h_i - μ_k‖² = argmin_k ‖μ_k‖² - 2 μ_kᵀh_i for H (B, d), means M (K, d):
    (B,) class indices, in float64 at the exact power-of-two scale that keeps the squares
    finite (like :class:`nclab.stats.NC4Counter`)."""
    e = power_of_two_exponent(max(max_abs(H), max_abs(M)))
    H, M = times_power_of_two(H.to(torch.float64), -e), times_power_of_two(M.to(torch.float64), -e)
    return nearest_mean_t(M, H @ M.T)


class LevelStats:
    """Streaming statistics of named feature levels, and their features for a second look.

    Args:
        num_classes: K. names: the levels, in output order. full: ClassStats' ``full``.
    ``update(feats, labels)`` adds a batch (feats: name -> (B, d), labels (B,));
    ``metrics(classifier, distributed)`` returns {level: {metric: value}} (module docstring).
    """

    def __init__(self, num_classes: int, names: Iterable[str], *, full: bool = True):
        self.num_classes, self.names, self.full = num_classes, list(names), full
        self.stats: dict[str, ClassStats] = {}
        self.kept: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        self.labels: list[torch.Tensor] = []

    def update(self, feats: Mapping[str, torch.Tensor], labels) -> None:
        y = None
        for name in self.names:
            h = feats[name]
            if name not in self.stats:
                self.stats[name] = ClassStats(self.num_classes, h.shape[1], full=self.full, device=h.device)
            self.stats[name].update(h, labels)
            if y is None:  # checked by ClassStats.update: integers (B,) in 0..K-1
                y = torch.as_tensor(labels).to(h.device)
            self.kept[name].append(h)
        self.labels.append(y)

    @property
    def batches(self) -> int:
        return len(self.labels)

    def metrics(self, classifier: nn.Module | None, distributed: bool, device=None) -> dict:
        """{level: {metric: value}}; ``distributed``: merge all processes (``device``: where
        this process's collectives run when it measured nothing)."""
        _check_some_batches(self.batches, distributed, device)
        stats = {n: copy.deepcopy(self.stats[n]) for n in self.names}
        if distributed:
            for s in stats.values():
                s.all_reduce()
        W = b = None
        if classifier is not None:
            W = classifier.weight.detach()
            b = None if classifier.bias is None else classifier.bias.detach()
        out, degenerate = OrderedDict(), {}
        for name in self.names:
            out[name], degenerate[name] = level_metrics(stats[name], W if name == PENULTIMATE else None)
        for name, value in zip(self.names, self._ncc_accuracy(stats, distributed)):
            out[name]["ncc_accuracy"] = math.nan if degenerate[name] else value
        if PENULTIMATE in stats:
            out[PENULTIMATE]["nc4"] = math.nan if degenerate[PENULTIMATE] else \
                self._nc4(stats[PENULTIMATE], W, b, distributed)
        return out

    def _ncc_accuracy(self, stats: dict[str, ClassStats], distributed: bool) -> list[float]:
        """Per level: Σ_i [nearest_mean(h_i) = y_i] / N over the kept features."""
        correct = []
        for name in self.names:
            M = stats[name].means
            hits = sum((nearest_mean(h, M) == y.to(M.device)).sum() for h, y in zip(self.kept[name], self.labels))
            correct.append(torch.as_tensor(hits, dtype=torch.float64, device=M.device).cpu())
        counts = torch.stack(correct + [torch.tensor(float(sum(len(y) for y in self.labels)), dtype=torch.float64)])
        if distributed:
            counts = _all_reduce_sum(counts, next(iter(stats.values())).means.device)
        return (counts[:-1] / counts[-1]).tolist()

    def _nc4(self, stats: ClassStats, W, b, distributed: bool) -> float:
        nc4 = NC4Counter(stats.means, W, b)
        for h in self.kept[PENULTIMATE]:
            nc4.update(h)
        if distributed:
            nc4.all_reduce()
        return nc4.value


def _all_reduce_sum(t: torch.Tensor, device) -> torch.Tensor:
    import torch.distributed as dist

    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def _check_some_batches(batches: int, distributed: bool, device) -> None:
    """A ValueError (on every rank together) when a process measured no batch."""
    fewest = batches
    if distributed:
        fewest = int(_all_reduce_min(torch.tensor(float(batches)), device))
    if fewest == 0:
        where = "on every process" if not distributed or batches == 0 else "on another process"
        raise ValueError(f"data: no batches to measure ({where}); give each process at least one (x, y) batch")


def _all_reduce_min(t: torch.Tensor, device) -> torch.Tensor:
    import torch.distributed as dist

    t = t.to("cpu" if device is None else device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.cpu()


def distributed_active() -> bool:
    """True when a torch.distributed process group is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


# ---------------------------------------------------------------------- the monitor
class CollapseMonitor:
    """Layer-wise neural collapse metrics of ``model`` from forward hooks.

    Args:
        model: any nn.Module whose ``model(x)`` runs the layers.
        layers: the feature levels: a list of dotted names of ``model.named_modules()``
            (e.g. ``["layer1", "layer2.1.relu"]``) and/or submodules of ``model``, or a
            dict name -> module. Empty: the penultimate features only.
        num_classes: K; labels lie in 0..K-1 and every class must occur in a pass.
        classifier: the final linear layer (weight (K, d), bias (K,) or None), or its
            name; its input is the ``penultimate`` level, which gets NC2 of W, NC3 and
            NC4 from its weights. Default: ``model.fc`` when it is an nn.Linear, else the
            last nn.Linear in ``model.modules()``; ``False``: none.
        full: keep each level's d x d within-class scatter (needed for ``nc1``; memory
            8·d² bytes a level); ``False`` gives every other metric in O(K·d).
        distributed: merge the statistics of all torch.distributed processes; default:
            whenever a process group is initialised.
    Results: ``{level: {metric: value}}``, the levels in the order given and
    ``penultimate`` last (see the module docstring for the metrics and their cost).
    """

    def __init__(self, model: nn.Module, layers, num_classes: int, *, classifier=None, full: bool = True,
                 distributed: bool | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes: need an integer number of classes >= 2, got {num_classes!r}")
        self.model, self.num_classes, self.full, self.distributed = model, int(num_classes), bool(full), distributed
        self.layers = resolve_layers(model, layers)
        self.classifier = resolve_classifier(model, classifier, self.num_classes)
        if not self.layers and self.classifier is None:
            raise ValueError("layers: nothing to measure; name some layers or give classifier=... "
                             "(the model has no nn.Linear to take as the classifier)")
        self._feats: dict | None = None
        self._levels: LevelStats | None = None

    @property
    def levels(self) -> list[str]:
        """The level names of the results, in order."""
        return list(self.layers) + ([PENULTIMATE] if self.classifier is not None else [])

    def __repr__(self) -> str:
        return f"CollapseMonitor(levels={self.levels}, num_classes={self.num_classes})"

    # ------------------------------------------------------------------ your own loop
    @contextlib.contextmanager
    def collect(self):
        """Hooks attached for the ``with`` block; after each forward, :meth:`update` with
        the batch's labels. Starts afresh; :meth:`compute` gives the metrics (inside the
        block or after it). The hooks are removed on exit, also after an exception.

        The forward passes are yours: put the model in eval mode and under
        ``torch.no_grad()`` if you want (BatchNorm, dropout).
        """
        if self._feats is not None:
            raise RuntimeError("collect: this monitor is already collecting (nested `with monitor.collect()`)")
        self._levels = LevelStats(self.num_classes, self.levels, full=self.full)
        with hooked(self.layers, self.classifier) as feats:
            self._feats = feats
            try:
                yield self
            finally:
                self._feats = None

    def update(self, labels) -> None:
        """Pair the features of the latest forward pass with ``labels`` (B,) in 0..K-1."""
        if self._feats is None:
            raise RuntimeError("update: call it inside `with monitor.collect():`, after a forward pass")
        missing = [n for n in self.levels if n not in self._feats]
        if missing:
            raise RuntimeError(f"update: no features from {missing} since the last update; run the model "
                               "on the batch (model(x)) before monitor.update(y)")
        with torch.no_grad():
            self._levels.update(self._feats, labels)
        self._feats.clear()

    def compute(self) -> dict[str, dict[str, float]]:
        """{level: {metric: value}} of the batches collected so far (all processes merged
        when distributed; call it on every rank then)."""
        if self._levels is None:
            raise RuntimeError("compute: nothing collected; use `with monitor.collect():` or monitor.measure(loader)")
        distributed = distributed_active() if self.distributed is None else self.distributed
        with torch.no_grad():
            return self._levels.metrics(self.classifier, distributed, device=self._device())

    def reset(self) -> None:
        """Drop the collected statistics and kept features."""
        self._levels = None

    # ------------------------------------------------------------------ one pass over a loader
    def measure(self, loader: Iterable, *, device=None, max_batches: int | None = None) -> dict[str, dict[str, float]]:
        """Metrics from one pass over ``loader`` of (x, y) batches (x (B, ...), y (B,)).

        The model runs in eval mode under ``torch.inference_mode()``; each module's
        train/eval mode is restored afterwards. ``device``: where x goes (default: that of
        the model's first parameter); ``max_batches``: stop after this many batches.
        """
        if max_batches is not None and (not isinstance(max_batches, numbers.Integral) or max_batches < 1):
            raise ValueError(f"max_batches: expected a positive integer or None, got {max_batches!r}")
        device = self._device() if device is None else torch.device(device)
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.eval()
            with torch.inference_mode(), self.collect():
                for batch in itertools.islice(loader, max_batches):
                    x, y = _pair(batch)
                    self.model(x.to(device) if isinstance(x, torch.Tensor) else x)
                    self.update(y)
                return self.compute()
        finally:
            self.reset()
            for m, training in modes:
                m.training = training

    def _device(self) -> torch.device:
        p = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
        return torch.device("cpu") if p is None else p.device


def _pair(batch):
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"loader: expected batches (x, y), got {type(batch).__name__}; wrap the loader to "
                    "yield (inputs, labels), or use `with monitor.collect():` in your own loop")
