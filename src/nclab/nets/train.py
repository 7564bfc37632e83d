"""Training with layer-wise collapse metrics, checkpoints, resume and torch.distributed.

Objectives (N samples, one-hot targets y_i in R^K, network output f(x_i) in R^K):

* ``loss="mse"``: the UFM scaling, 1/(2N) Σ_i ‖f(x_i) - y_i‖² (THEORY.md §2). With SGD
  weight decay wd the objective is 1/(2N)‖F - Y‖² + wd/2 ‖θ‖², i.e. λ = wd per factor.
  ``torch.nn.MSELoss()`` (mean over N·K entries) equals (2/K) times this loss, so
  MSELoss + wd/2‖θ‖² = (2/K)·[1/(2N)‖F - Y‖² + (K·wd/2)/2 ‖θ‖²]: training with
  torch.nn.MSELoss and weight decay wd is the UFM with λ = K·wd/2 (and SGD on it with
  step η equals SGD on ours with step 2η/K and weight decay K·wd/2).
  ``loss="mse_torch"`` trains with torch.nn.MSELoss itself.
* ``loss="ce"``: mean cross-entropy.

The reported ``objective`` is the measured mean loss plus wd/2 Σ‖θ‖² over all parameters
(SGD's weight decay applies to all of them).

Schedule (THEORY.md §5 defaults): SGD, momentum 0.9, lr 0.05 divided by 10 every 40
epochs (``lr_step``, ``lr_gamma``), weight decay 5e-4, batch 128. These are the values
for cross-entropy and torch.nn.MSELoss; for ``loss="mse"`` (the UFM scaling) the same
training is lr 0.05·2/K = 0.01 and weight decay 5e-4·K/2 = 2.5e-3 (K = 10 classes for
every built-in dataset), which is what ``lr=None`` / ``weight_decay=None`` resolve to (at
the paper's lr 0.05 the UFM-scaled MSE diverges).

Data stay in tensors (on the GPU when they fit); each epoch uses the permutation drawn
from a generator seeded with (seed, epoch), so an epoch's batches do not depend on what
ran before: resuming from the checkpoint of epoch e gives the same run as not stopping.
An epoch is the N // B full batches of B = min(batch_size, N) samples; the last N mod B
samples of the permutation are dropped (a different set each epoch), and the running
loss/accuracy average over the N - N mod B samples used. On CPU
``torch.use_deterministic_algorithms(True)`` makes runs bitwise repeatable; :func:`train`
restores the previous setting when it returns.

Metric pass (every ``eval_every`` epochs and after the last): one forward pass in eval
mode, in float32 (never under bf16 autocast), under ``torch.inference_mode`` over a fixed
balanced subsample of the training set (``measure_per_class`` samples per class, drawn
once from the seed; None = auto, about 10% of the training set: see
:func:`auto_measure_per_class`), and the same number per class of the test set, all levels
at once (:func:`nclab.nets.probe.measure_layers`). A pass over the whole training set
would cost about a third of a training epoch; the subsample keeps the pass under 15% of an
epoch (the summary records the measured ratio; :func:`train` warns above 0.15).

Distributed (``torchrun --nproc-per-node P -m nclab train ...``): rank r takes elements
r, r+P, ... of every global batch of B samples (the same batches as one process: full
batches only); the per-process loss is scaled so that DDP's gradient average equals the
gradient of the global-batch mean, and BatchNorm uses the statistics of the global batch
(SyncBatchNorm on CUDA, :class:`GlobalBatchNorm` on CPU/gloo), so P processes train the
same network as one. :func:`train` joins torchrun's process group and destroys it at the
end when it created it.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import gc
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nclab.io import atomic_path, toml_text, write_csv, write_json, write_text
from nclab.nets.data import DATASETS, ImageData, balanced_subset, load_data, to_device
from nclab.nets.models import MODELS, STEMS, build_model
from nclab.nets.probe import PENULTIMATE, batches, measure_layers
from nclab.threads import cpu_threads

LOSSES = ("mse", "mse_torch", "ce")
CHECKPOINT = "checkpoint.pt"
RUN_FILES = (CHECKPOINT, "config.toml", "metrics.csv", "summary.json", "figure.png", "figure.pdf")
METRIC_COLUMNS = ["epoch", "split", "layer", "metric", "value"]
MEASURE_BUDGET = 0.15  # metric pass / training epoch


def nc3_frame(loss: str, bias: bool) -> str:
    """The frame NC3 is measured against: "of" for bias-free MSE, else "etf" (THEORY §3.1, §4).

    The bias-free MSE optimum has W ∝ Mᵀ with the *uncentred* means M (an orthogonal
    frame); with a bias, or with cross-entropy, W ∝ M̃ᵀ with the centred means (simplex ETF).
    """
    return "of" if loss in ("mse", "mse_torch") and not bias else "etf"


#: THEORY.md §5 (for cross-entropy / torch.nn.MSELoss) and the classes of every built-in dataset
PAPER_LR, PAPER_WD, PAPER_K = 0.05, 5e-4, 10


@dataclass
class TrainConfig:
    """Everything that defines a run (saved as config.toml; None values are omitted).

    ``validate`` stores ``data`` as an absolute path, so a saved config works from any
    folder; ``measure_per_class=None`` means :func:`auto_measure_per_class`.
    """

    dataset: str = "digits"
    data: str | None = None
    per_class: int | None = None
    model: str = "resnet18"
    stem: str = "small"
    width: float = 1.0
    bias: bool = False
    loss: str = "mse"
    epochs: int = 200
    batch_size: int = 128
    lr: float | None = None  # None: the paper's value in the loss's scaling (module docstring)
    momentum: float = 0.9
    weight_decay: float | None = None
    lr_step: int = 40
    lr_gamma: float = 0.1
    eval_every: int = 5
    measure_per_class: int | None = None
    measure_batch_size: int = 1000
    seed: int = 0
    device: str = "cpu"
    bf16: bool = True
    channels_last: bool = True
    threads: int | None = None

    def validate(self) -> "TrainConfig":
        choices = {"dataset": DATASETS, "model": MODELS, "stem": STEMS, "loss": LOSSES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.model != "resnet18" and self.stem != "small":
            raise ValueError(f"stem: only resnet18 has a stem; drop --stem {self.stem} for --model {self.model}")
        for name in ("epochs", "batch_size", "lr_step", "eval_every", "measure_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size: BatchNorm needs at least 2 samples per batch, got {self.batch_size}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads: expected a positive integer (or none), got {self.threads!r}")
        for name in ("per_class", "measure_per_class"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 2):
                raise ValueError(f"{name}: expected an integer >= 2 (or none), got {v!r}")
        self._resolve_paper_defaults()
        for name in ("lr", "width"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        for name in ("momentum", "weight_decay", "lr_gamma"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a non-negative number, got {getattr(self, name)!r}")
        if self.data is not None:
            self.data = str(Path(self.data).expanduser().absolute())
        return self

    def _resolve_paper_defaults(self) -> None:
        """lr/weight_decay None -> 0.05 / 5e-4 (CE, MSELoss), or 0.05·2/K / 5e-4·K/2 for "mse"."""
        ufm_scaled = self.loss == "mse"
        if self.lr is None:
            self.lr = PAPER_LR * 2 / PAPER_K if ufm_scaled else PAPER_LR
        if self.weight_decay is None:
            self.weight_decay = PAPER_WD * PAPER_K / 2 if ufm_scaled else PAPER_WD

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict, name: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{name}: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**d).validate()


def auto_measure_per_class(n_min: int) -> int:
    """Default samples per class of the metric pass: ~10% of the smallest class (>= 5).

    ``n_min``: training samples of the smallest class. MNIST: 542 per class (5420 of
    60000); digits: 14 (140 of 1437). Never more than ``n_min``.
    """
    return min(n_min, max(5, n_min // 10))


def settings_mismatch(saved: dict, cfg: TrainConfig) -> list[str]:
    """Names of the settings in which a checkpoint's config differs from ``cfg``.

    Settings that may change on resume (epochs, device, speed options) are not compared.
    """
    old = TrainConfig.from_dict(saved)
    for name in ("epochs", "device", "bf16", "channels_last", "measure_batch_size", "threads"):
        setattr(old, name, getattr(cfg, name))
    return [f.name for f in dataclasses.fields(cfg) if getattr(old, f.name) != getattr(cfg, f.name)]


def check_resumable(cfg: TrainConfig, run_dir) -> None:
    """ValueError when run_dir/checkpoint.pt was written with other settings than ``cfg``."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return
    diff = settings_mismatch(torch.load(path, map_location="cpu", weights_only=False)["config"], cfg)
    if diff:
        raise ValueError(f"resume: {path} was written with different settings ({', '.join(diff)}); "
                         "resume with the same config, pass --force to overwrite, or use a new --out folder")


# ----------------------------------------------------------------------------- losses
def sample_losses(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample loss (B,): ½‖f - e_y‖² ("mse"), ‖f - e_y‖²/K ("mse_torch") or CE ("ce")."""
    if loss == "ce":
        return nn.functional.cross_entropy(logits, y, reduction="none")
    sq = (logits - nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype)).square().sum(1)
    return sq / 2 if loss == "mse" else sq / logits.shape[1]


def weight_norm_sq(model: nn.Module) -> float:
    """Σ‖θ‖² over all parameters."""
    with torch.no_grad():
        return float(sum(p.detach().double().square().sum() for p in model.parameters()))


# ----------------------------------------------------------------------------- distributed
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all torch.distributed processes (any backend).

    Mean and (biased) variance come from two differentiable all-reduces of per-channel
    sums (the first also carries the sample count, in float64), so P processes with B/P
    samples each normalise exactly like one with B; running statistics use the unbiased
    variance and ``momentum`` (None: cumulative average), as nn.BatchNorm does. Outside
    training or without a process group it is an ordinary BatchNorm.
    """

    def _check_input_dim(self, x):
        if x.ndim < 2:
            raise ValueError(f"GlobalBatchNorm: expected (B, C, ...) input, got {tuple(x.shape)}")

    def forward(self, x):
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        return self.normalise(x, all_reduce)

    def normalise(self, x: torch.Tensor, all_reduce) -> torch.Tensor:
        """Training-mode output for x (B, C, ...), with ``all_reduce`` summing over processes.

        ``all_reduce``: a differentiable sum over processes (identity for one process).
        """
        dims = [0] + list(range(2, x.ndim))
        shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
        local = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)
        sums = all_reduce(torch.cat([x.sum(dims).double(), local]))  # (C + 1,): channel sums, count
        count = float(sums[-1].detach())
        mean = (sums[:-1] / count).to(x.dtype)
        centred = x - mean.view(shape)
        var = all_reduce(centred.square().sum(dims)) / count
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach() * count / max(count - 1, 1))
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased_var, factor)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d by a :class:`GlobalBatchNorm` with the same state."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module


@dataclass
class Dist:
    """This process's place in torch.distributed (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1


@contextlib.contextmanager
def process_group(device: str):
    """Join torchrun's process group (env WORLD_SIZE > 1) for the block, then destroy it.

    Does nothing without torchrun or when a group already exists (its owner destroys it).
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        yield
        return
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def init_distributed(device: str) -> Dist:
    """This process's place in torchrun's process group (env WORLD_SIZE > 1), else Dist().

    Joins the group when nobody has yet (prefer :func:`process_group`, which also ends it).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local)


# ----------------------------------------------------------------------------- the run
@dataclass
class _State:
    epoch: int = 0
    rows: list = field(default_factory=list)
    epoch_times: list = field(default_factory=list)
    measure_times: list = field(default_factory=list)


class Trainer:
    """One training run in ``out_dir`` (see the module docstring); use :func:`train`."""

    def __init__(self, config: TrainConfig, out_dir: Path, *, quiet: bool = False, data: ImageData | None = None):
        self.cfg, self.out, self.quiet = config.validate(), Path(out_dir), quiet
        self.dist = init_distributed(config.device)
        self.device = self._device()
        self.cuda = self.device.type == "cuda"
        if data is None:  # (benchmarks pass synthetic data)
            data = load_data(config.dataset, config.data, per_class=config.per_class, seed=config.seed)
        self.data: ImageData = to_device(data, self.device)
        if min(config.batch_size, len(self.data.y_train)) < self.dist.world:
            raise ValueError(f"batch_size: {config.batch_size} leaves some of the {self.dist.world} processes "
                             "without samples; use a larger batch or fewer processes")
        self.measured_per_class = self._measured_per_class()
        self.measure_sets = self._measure_sets()
        torch.manual_seed(config.seed)
        model = build_model(config.model, data.num_classes, data.input_shape, stem=config.stem,
                            width=config.width, bias=config.bias)
        if self.dist.active:
            model = convert_batchnorm(model) if not self.cuda else nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        if self.cuda and config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp = self.model
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.cuda else None)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                   weight_decay=config.weight_decay)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, config.lr_step, config.lr_gamma)
        self.state = _State()

    def close(self) -> None:
        """Release the DDP wrapper (before the process group is destroyed: freeing it later can hang)."""
        self.ddp = self.model
        gc.collect()

    def _device(self) -> torch.device:
        dev = torch.device(self.cfg.device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device: CUDA is not available here; use --device cpu")
            if self.dist.active:
                dev = torch.device("cuda", self.dist.local_rank)
            elif dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(dev)
        return dev

    def _measured_per_class(self) -> int:
        """``measure_per_class``, or :func:`auto_measure_per_class` of the training set."""
        if self.cfg.measure_per_class is not None:
            return self.cfg.measure_per_class
        return auto_measure_per_class(int(torch.bincount(self.data.y_train.cpu()).min()))

    def _measure_sets(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Fixed balanced subsamples (this rank's share) of the training and test sets."""
        sets = {}
        for split, x, y in (("train", self.data.x_train, self.data.y_train),
                            ("test", self.data.x_test, self.data.y_test)):
            if x is None:
                continue
            n_min = int(torch.bincount(y.cpu()).min())
            if self.measured_per_class < n_min:
                idx = balanced_subset(y.cpu(), self.measured_per_class, self.cfg.seed + 1).to(y.device)
            else:
                idx = torch.arange(len(y), device=y.device)
            idx = idx[self.dist.rank::self.dist.world]
            sets[split] = (x[idx], y[idx])
        return sets

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        """bf16 autocast for training on CUDA (``bf16``); the metric pass never uses it."""
        if self.cuda and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.cuda and self.cfg.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def log(self, msg: str):
        if not self.quiet and self.dist.rank == 0:
            from tqdm import tqdm

            tqdm.write(msg)

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the full shuffled global batches; running loss/accuracy of the samples used."""
        cfg, (x, y) = self.cfg, (self.data.x_train, self.data.y_train)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(y), generator=gen).to(y.device)
        self.ddp.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros_like(loss_sum)
        size = min(cfg.batch_size, len(y))
        used = len(y) // size * size  # drop the incomplete last batch, for every number of processes
        for start in range(0, used, size):
            batch = perm[start:start + size]
            idx = batch[self.dist.rank::self.dist.world]
            xb, yb = self.prepare(x[idx]), y[idx].to(self.device, non_blocking=True)
            with self.autocast():
                logits = self.ddp(xb)
            losses = sample_losses(logits.float(), yb, cfg.loss)
            self.opt.zero_grad(set_to_none=True)
            (losses.sum() * (self.dist.world / len(batch))).backward()
            self.opt.step()
            loss_sum += losses.detach().sum()
            correct += (logits.detach().argmax(1) == yb).sum()
        self.sched.step()
        totals = torch.stack([loss_sum, correct])
        if self.dist.active:
            import torch.distributed as dist

            dist.all_reduce(totals)
        if not torch.isfinite(totals[0]):
            raise ValueError(f"lr: training diverged in epoch {epoch} (loss {float(totals[0])}); "
                             "lower --lr or --weight-decay")
        return {"running_loss": float(totals[0]) / used, "running_accuracy": float(totals[1]) / used}

    # ------------------------------------------------------------------ metric pass
    def measure(self) -> dict[str, dict[str, dict[str, float]]]:
        """{split: {level: {metric: value}}} from one eval-mode float32 pass per split.

        No bf16 autocast here: features rounded to bf16 would blur NC1 near collapse.
        """
        self.model.eval()
        wd_term = self.cfg.weight_decay / 2 * weight_norm_sq(self.model)
        out = {}
        for split, (x, y) in self.measure_sets.items():
            res = measure_layers(self.model, batches(x, y, self.cfg.measure_batch_size), self.data.num_classes,
                                 sample_loss=lambda f, t: sample_losses(f, t, self.cfg.loss),
                                 prepare=self.prepare, distributed=self.dist.active)
            res["network"]["objective"] = res["network"]["loss"] + wd_term
            out[split] = res
        return out

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "epoch": self.state.epoch,
            "rows": self.state.rows,
            "epoch_times": self.state.epoch_times,
            "measure_times": self.state.measure_times,
            # torch's default CPU generator: model initialisation (batches use their own seeded generator)
            "rng": {"torch": torch.get_rng_state()},
        }

    def save_checkpoint(self):
        if self.dist.rank != 0:
            return
        with atomic_path(self.out / CHECKPOINT) as tmp:
            torch.save(self.checkpoint(), tmp)

    def load_checkpoint(self, path: Path):
        ck = torch.load(path, map_location=self.device, weights_only=False)
        diff = settings_mismatch(ck["config"], self.cfg)
        if diff:
            raise ValueError(f"resume: {path} was written with different settings ({', '.join(diff)}); "
                             "resume with the same config or use a new --out folder")
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.state = _State(ck["epoch"], ck["rows"], ck["epoch_times"], ck["measure_times"])
        torch.set_rng_state(ck["rng"]["torch"].cpu())

    # ------------------------------------------------------------------ outputs
    def record(self, epoch: int, values: dict[str, dict[str, dict[str, float]]]):
        for split, levels in values.items():
            for layer, metrics in levels.items():
                for metric, value in metrics.items():
                    self.state.rows.append({"epoch": epoch, "split": split, "layer": layer,
                                            "metric": metric, "value": value})

    def write_metrics(self):
        if self.dist.rank == 0:
            write_csv(self.out / "metrics.csv", self.state.rows, METRIC_COLUMNS)

    def summary(self) -> dict:
        s = self.state
        final = {}
        last = max((r["epoch"] for r in s.rows), default=0)
        for r in s.rows:
            if r["epoch"] == last:
                final.setdefault(r["split"], {}).setdefault(r["layer"], {})[r["metric"]] = r["value"]
        epoch_time = statistics.fmean(s.epoch_times) if s.epoch_times else math.nan
        measure_time = statistics.fmean(s.measure_times) if s.measure_times else math.nan
        return {
            "config": self.cfg.to_dict(),
            "data_source": self.data.source,
            "real_data": self.cfg.dataset != "digits",
            "processes": self.dist.world,
            "device": str(self.device),
            "epochs_done": s.epoch,
            "final_epoch": last,
            "levels": [k for k in final.get("train", {}) if k != "network"],
            "measured_per_class": self.measured_per_class,
            "nc3_frame": nc3_frame(self.cfg.loss, self.cfg.bias),
            "final": final,
            "epoch_time_s": epoch_time,
            "metric_pass_time_s": measure_time,
            "metric_pass_over_epoch": measure_time / epoch_time if s.epoch_times else math.nan,
        }

    # ------------------------------------------------------------------ main loop
    def run(self, *, stop_after: int | None = None) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        last = min(cfg.epochs, stop_after) if stop_after is not None else cfg.epochs
        bar = tqdm(range(self.state.epoch + 1, last + 1), desc=self.out.name or "train", unit="epoch",
                   disable=self.quiet or self.dist.rank != 0, initial=self.state.epoch, total=cfg.epochs,
                   mininterval=1.0)
        for epoch in bar:
            self._sync()
            t0 = time.perf_counter()
            running = self.train_epoch(epoch)
            self._sync()
            self.state.epoch_times.append(time.perf_counter() - t0)
            self.state.epoch = epoch
            self.record(epoch, {"train": {"network": running | {"lr": self.opt.param_groups[0]["lr"]}}})
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                t0 = time.perf_counter()
                values = self.measure()
                self._sync()
                self.state.measure_times.append(time.perf_counter() - t0)
                self.record(epoch, values)
                self.write_metrics()
                tr = values["train"]
                bar.set_postfix(loss=f"{running['running_loss']:.3g}", acc=f"{tr['network']['accuracy']:.3f}",
                                nc1=f"{tr[PENULTIMATE]['nc1']:.3g}", refresh=False)
            self.save_checkpoint()
        bar.close()
        summary = self.summary()
        if self.dist.rank == 0:
            self.write_metrics()
            if self.state.epoch >= cfg.epochs:
                write_json(self.out / "summary.json", summary)
        return summary


def read_metrics_csv(path) -> list[dict]:
    """Rows of a metrics.csv (long format: epoch, split, layer, metric, value)."""
    with open(path, newline="") as f:
        return [{**r, "epoch": int(r["epoch"]), "value": float(r["value"])} for r in csv.DictReader(f)]


@contextlib.contextmanager
def deterministic_algorithms(on: bool):
    """Deterministic algorithms (``warn_only``) for the block when ``on``; then the previous setting.

    ``torch.use_deterministic_algorithms`` is process-wide, so a run must not leave it set.
    """
    old, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if on:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old, warn_only=old_warn)


def clear_run(out_dir) -> None:
    """Delete a run's files (RUN_FILES) from out_dir, for ``force``; other files stay."""
    for name in RUN_FILES:
        (Path(out_dir) / name).unlink(missing_ok=True)


def train(config: TrainConfig, out_dir, *, resume: bool = False, force: bool = False, quiet: bool = False,
          stop_after: int | None = None, figure: bool = True) -> dict:
    """Train ``config`` into ``out_dir``; returns the summary dict (also summary.json).

    Writes config.toml, checkpoint.pt (every epoch, atomically), metrics.csv (after every
    metric pass), summary.json and figure.png/.pdf (the Fig 5 layout) at the end.
    ``resume=True`` continues from out_dir/checkpoint.pt when there is one (the settings
    must match); ``force=True`` deletes an earlier run's files first; with neither, an
    existing run in out_dir is an error, never overwritten. ``stop_after=e`` stops after
    epoch e as if interrupted (for tests).
    """
    out = Path(out_dir)
    config = copy.deepcopy(config).validate()
    ck = out / CHECKPOINT
    if resume and force:
        raise ValueError("resume: --resume and --force exclude each other")
    if ck.exists() and not (resume or force):
        raise ValueError(f"out: {out} already holds a run; pass --resume to continue it, --force to overwrite "
                         "it, or choose a new folder")
    if force and int(os.environ.get("RANK", "0")) == 0:
        clear_run(out)
    with (cpu_threads(config.threads), deterministic_algorithms(not config.device.startswith("cuda")),
          process_group(config.device)):
        trainer = Trainer(config, out, quiet=quiet)
        try:
            if resume and ck.exists():
                trainer.load_checkpoint(ck)
                trainer.log(f"resuming {out} after epoch {trainer.state.epoch}")
            if trainer.dist.rank == 0:
                write_text(out / "config.toml", toml_text(config.to_dict()))
            summary = trainer.run(stop_after=stop_after)
        finally:
            trainer.close()  # also on errors: DDP must go before its process group
        rows, rank0, finished = trainer.state.rows, trainer.dist.rank == 0, trainer.state.epoch >= config.epochs
    if figure and rank0 and finished:
        from nclab.nets.plots import plot_runs

        name = out.name or "run"
        plot_runs({name: rows}, out / "figure", titles={name: _title(config)},
                  nc3_frames={name: nc3_frame(config.loss, config.bias)})
    if rank0:
        warn_budget(summary, out)
    return summary


def warn_budget(summary: dict, out: Path) -> None:
    """One line on stderr when the metric pass took more than MEASURE_BUDGET of an epoch."""
    ratio = summary.get("metric_pass_over_epoch", math.nan)
    if ratio > MEASURE_BUDGET:
        print(f"nclab train: warning: {out}: the metric pass took {ratio:.2f} of a training epoch (budget "
              f"{MEASURE_BUDGET}); lower --measure-per-class ({summary.get('measured_per_class')}) or raise "
              "--eval-every", file=sys.stderr)


def _title(cfg: TrainConfig) -> str:
    head = {"mse": "MSE", "mse_torch": "MSE (torch)", "ce": "CE"}[cfg.loss]
    return f"{cfg.model} on {cfg.dataset}, {head}, {'bias' if cfg.bias else 'no bias'}, wd {cfg.weight_decay:g}"
