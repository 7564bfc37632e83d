"""Neural collapse metrics in Lightning training: :class:`NeuralCollapseCallback`.

Needs Lightning (``pip install "nclab[lightning]"``); ``lightning.pytorch`` is used, or
``pytorch_lightning`` when only that is installed.

At the end of every n-th training epoch the callback runs a
:class:`nclab.CollapseMonitor` over a dataloader (eval mode, ``torch.inference_mode``,
the modules' modes restored after) and logs, through ``pl_module.log_dict``, one value
per metric and layer under ``<metric>/<layer>``: ``nc1/penultimate``,
``nc2_etf/layer1``, ``ncc_accuracy/layer1``, ... They reach every logger of the trainer
(e.g. CSVLogger, TensorBoardLogger) and ``trainer.callback_metrics``.

Why ``on_train_epoch_end`` and not ``on_validation_epoch_end``: it runs exactly once per
training epoch whether validation runs or not (no validation data, ``limit_val_batches=0``,
``check_val_every_n_epoch > 1``) and never in the sanity check or ``trainer.validate()``;
and Lightning calls it before the metric-monitoring callbacks (ModelCheckpoint,
EarlyStopping), which can therefore monitor e.g. ``nc1/penultimate``. The validation of
that epoch, when it runs at the epoch's end, has already happened, so ``dataloader="val"``
finds the validation loader.

Under DDP each process measures its own share of the data (Lightning's distributed
sampler) and the monitor merges the statistics exactly with ``all_reduce``: every rank
logs the same values, so the log needs no ``sync_dist``.
"""
from __future__ import annotations

import numbers

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise ImportError('nclab.lightning needs Lightning: pip install "nclab[lightning]" '
                          "(or lightning / pytorch_lightning itself)") from None

from nclab.monitor import CollapseMonitor

__all__ = ["NeuralCollapseCallback"]

DATALOADERS = ("train", "val")


class NeuralCollapseCallback(pl.Callback):
    """Log layer-wise collapse metrics every ``every_n_epochs`` training epochs.

    Args:
        layers: the feature levels, as for :class:`nclab.CollapseMonitor`: dotted names of
            ``pl_module.named_modules()`` (e.g. ``["net.1", "net.3"]``), submodules, or a
            dict name -> module; the ``penultimate`` level (the classifier's input) comes
            on top.
        num_classes: K.
        every_n_epochs: measure after epochs n, 2n, ... (counting from 1).
        dataloader: ``"train"`` (the trainer's training loader), ``"val"`` (its first
            validation loader), or any iterable of (x, y) batches.
        classifier: as for CollapseMonitor (default: ``fc`` or the last nn.Linear).
        max_batches: measure at most this many batches (a subsample; None: all).
        full: keep the d x d scatter per level (needed for ``nc1``).
    After each measurement, ``callback.results`` holds ``{layer: {metric: value}}``.
    """

    def __init__(self, layers, num_classes: int, *, every_n_epochs: int = 1, dataloader="train",
                 classifier=None, max_batches: int | None = None, full: bool = True):
        super().__init__()
        if not isinstance(every_n_epochs, numbers.Integral) or isinstance(every_n_epochs, bool) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs: expected a positive integer, got {every_n_epochs!r}")
        if isinstance(dataloader, str) and dataloader not in DATALOADERS:
            raise ValueError(f"dataloader: expected 'train', 'val' or an iterable of (x, y) batches, got {dataloader!r}")
        if dataloader is None:
            raise ValueError("dataloader: expected 'train', 'val' or an iterable of (x, y) batches, got None")
        self.layers, self.num_classes, self.classifier = layers, num_classes, classifier
        self.every_n_epochs, self.dataloader, self.max_batches, self.full = every_n_epochs, dataloader, max_batches, full
        self.monitor: CollapseMonitor | None = None
        self.results: dict[str, dict[str, float]] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Build the monitor once the module is known: bad layer names fail before training."""
        self.monitor = CollapseMonitor(pl_module, self.layers, self.num_classes, classifier=self.classifier,
                                       full=self.full)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.results = self.monitor.measure(self._loader(trainer), device=pl_module.device,
                                            max_batches=self.max_batches)
        values = {f"{metric}/{layer}": float(v) for layer, metrics in self.results.items()
                  for metric, v in metrics.items()}
        pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=False)

    def _loader(self, trainer):
        if not isinstance(self.dataloader, str):
            return self.dataloader
        loaders = trainer.train_dataloader if self.dataloader == "train" else trainer.val_dataloaders
        if isinstance(loaders, dict):
            loaders = next(iter(loaders.values()), None)
        elif isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None:
            raise ValueError(f"dataloader: the trainer has no {self.dataloader!r} dataloader at the end of epoch "
                             f"{trainer.current_epoch} (validation may not have run yet); pass a DataLoader instead")
        return loaders
