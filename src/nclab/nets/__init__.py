"""Collapse in real networks: ResNet18/MLP, image data, training with layer-wise metrics.

* :mod:`nclab.nets.models`: ``resnet18`` (small / imagenet stem, width, bias), ``MLP``.
* :mod:`nclab.nets.data`: ``load_data`` (offline: the real 5,000-image MNIST sample ``mnist5k`` and
  scikit-learn's ``digits``; MNIST, CIFAR-10 from ``--data DIR``).
* :mod:`nclab.nets.probe`: ``record_features`` (forward hooks on any nn.Module) and
  ``measure_layers`` (all levels' metrics in one streaming pass), both built on
  :class:`nclab.CollapseMonitor` (:mod:`nclab.monitor`).
* :mod:`nclab.nets.settings`: ``TrainSettings`` (frozen, checked settings of a run).
* :mod:`nclab.nets.training`: ``train`` (MSE/CE, SGD, checkpoint/resume, torch.distributed),
  built from :mod:`~nclab.nets.loop` (the training loop), :mod:`~nclab.nets.measure` (the
  metric pass), :mod:`~nclab.nets.checkpoint` (safe checkpoints),
  :mod:`~nclab.nets.distributed` (process group, global BatchNorm),
  :mod:`~nclab.nets.losses`; output folders are run folders (:mod:`nclab.rundir`).
* :mod:`nclab.nets.experiment`: ``run_network_experiment("fig5" | "fig10", out_dir)``,
  ``report_markdown``.
* :mod:`nclab.nets.cli`: the ``nclab train`` command.
"""
from nclab._lazy import lazy_exports

#: public name -> the module that defines it; imported on first use, so that reading the
#: settings (the ``nclab`` command's flags) does not load the network code and torch
_WHERE = {"NETWORK_EXPERIMENTS": "experiment", "report_markdown": "experiment",
          "run_network_experiment": "experiment", "measure_layers": "probe", "record_features": "probe",
          "TrainSettings": "settings", "train": "training"}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

__all__ = ["NETWORK_EXPERIMENTS", "TrainSettings", "measure_layers", "record_features", "report_markdown",
           "run_network_experiment", "train"]
