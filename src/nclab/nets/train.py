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
epochs (``lr_step``, ``lr_gamma``), weight decay 5e-4, batch 128.

Data stay in tensors (on the GPU when they fit); each epoch uses the permutation drawn
from a generator seeded with (seed, epoch), so an epoch's batches do not depend on what
ran before: resuming from the checkpoint of epoch e gives the same run as not stopping.
On CPU ``torch.use_deterministic_algorithms(True)`` makes runs bitwise repeatable.

Metric pass (every ``eval_every`` epochs and after the last): one forward pass in eval
mode under ``torch.inference_mode`` over a fixed balanced subsample of the training set
(``measure_per_class`` samples per class, drawn once from the seed; None = all), and the
same for the test set, all levels at once (:func:`nclab.nets.probe.measure_layers`).
A pass over the whole training set would cost about a third of a training epoch; the
subsample keeps the pass under 15% of an epoch (the summary records the measured ratio).

Distributed (``torchrun --nproc-per-node P -m nclab train ...``): rank r takes elements
r, r+P, ... of every global batch of ``batch_size`` samples; the per-process loss is
scaled so that DDP's gradient average equals the gradient of the global-batch mean, and
BatchNorm uses the statistics of the global batch (SyncBatchNorm on CUDA,
:class:`GlobalBatchNorm` on CPU/gloo), so P processes train the same network as one.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nclab.io import atomic_path, write_json, write_text
from nclab.nets.data import DATASETS, ImageData, balanced_subset, load_data, to_device
from nclab.nets.models import MODELS, STEMS, build_model
from nclab.nets.probe import PENULTIMATE, batches, measure_layers

LOSSES = ("mse", "mse_torch", "ce")
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Everything that defines a run (saved as config.toml; None values are omitted)."""

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
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_step: int = 40
    lr_gamma: float = 0.1
    eval_every: int = 5
    measure_per_class: int | None = 100
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
        for name in ("epochs", "batch_size", "lr_step", "eval_every", "measure_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads: expected a positive integer (or none), got {self.threads!r}")
        for name in ("per_class", "measure_per_class"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 2):
                raise ValueError(f"{name}: expected an integer >= 2 (or none), got {v!r}")
        for name in ("lr", "width"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        for name in ("momentum", "weight_decay", "lr_gamma"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a non-negative number, got {getattr(self, name)!r}")
        return self

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict, name: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{name}: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**d).validate()


# ----------------------------------------------------------------------------- config files
def load_config_file(path) -> dict:
    """Read a TOML config: flat TrainConfig keys, or ``[runs.NAME]`` tables (several runs)."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config: {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config: {path} is not valid TOML ({exc})") from None


def write_config(path, obj: dict) -> None:
    import tomli_w

    write_text(path, tomli_w.dumps(obj))


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
    sums, so P processes with B/P samples each normalise exactly like one with B; running
    statistics use the unbiased variance, as nn.BatchNorm does. Outside training or
    without a process group it is an ordinary BatchNorm.
    """

    def _check_input_dim(self, x):
        if x.ndim < 2:
            raise ValueError(f"GlobalBatchNorm: expected (B, C, ...) input, got {tuple(x.shape)}")

    def forward(self, x):
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.ndim))
        shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
        count = all_reduce(torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device))
        mean = all_reduce(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = all_reduce(centred.square().sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                n = float(count)
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * n / max(n - 1, 1), self.momentum)
                self.num_batches_tracked += 1
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out


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


def init_distributed(device: str) -> Dist:
    """Join the process group that torchrun describes (env WORLD_SIZE > 1), else Dist()."""
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
        if not self.cuda:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if data is None:  # (benchmarks pass synthetic data)
            data = load_data(config.dataset, config.data, per_class=config.per_class, seed=config.seed)
        self.data: ImageData = to_device(data, self.device)
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

    def _measure_sets(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Fixed balanced subsamples (this rank's share) of the training and test sets."""
        sets = {}
        for split, x, y in (("train", self.data.x_train, self.data.y_train),
                            ("test", self.data.x_test, self.data.y_test)):
            if x is None:
                continue
            n_min = int(torch.bincount(y.cpu()).min())
            if self.cfg.measure_per_class is not None and self.cfg.measure_per_class < n_min:
                idx = balanced_subset(y.cpu(), self.cfg.measure_per_class, self.cfg.seed + 1).to(y.device)
            else:
                idx = torch.arange(len(y), device=y.device)
            idx = idx[self.dist.rank::self.dist.world]
            sets[split] = (x[idx], y[idx])
        return sets

    # ------------------------------------------------------------------ helpers
    def autocast(self):
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
        """One pass over the training set in shuffled global batches; running loss/accuracy."""
        cfg, (x, y) = self.cfg, (self.data.x_train, self.data.y_train)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(y), generator=gen).to(y.device)
        self.ddp.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros_like(loss_sum)
        for start in range(0, len(y), cfg.batch_size):
            batch = perm[start:start + cfg.batch_size]
            if len(batch) < self.dist.world:
                continue
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
        return {"running_loss": float(totals[0]) / len(y), "running_accuracy": float(totals[1]) / len(y)}

    # ------------------------------------------------------------------ metric pass
    def measure(self) -> dict[str, dict[str, dict[str, float]]]:
        """{split: {level: {metric: value}}} from one eval-mode pass per split."""
        self.model.eval()
        wd_term = self.cfg.weight_decay / 2 * weight_norm_sq(self.model)
        out = {}
        for split, (x, y) in self.measure_sets.items():
            res = measure_layers(self.model, batches(x, y, self.cfg.measure_batch_size), self.data.num_classes,
                                 sample_loss=lambda f, t: sample_losses(f, t, self.cfg.loss),
                                 prepare=self.prepare, autocast=self.autocast, distributed=self.dist.active)
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
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if self.cuda else None},
        }

    def save_checkpoint(self):
        if self.dist.rank != 0:
            return
        with atomic_path(self.out / CHECKPOINT) as tmp:
            torch.save(self.checkpoint(), tmp)

    def load_checkpoint(self, path: Path):
        ck = torch.load(path, map_location=self.device, weights_only=False)
        saved = TrainConfig.from_dict(ck["config"])
        mine = self.cfg
        for name in ("epochs", "device", "bf16", "channels_last", "measure_batch_size", "threads"):
            setattr(saved, name, getattr(mine, name))
        if saved != mine:
            diff = [f.name for f in dataclasses.fields(mine) if getattr(saved, f.name) != getattr(mine, f.name)]
            raise ValueError(f"resume: {path} was written with different settings ({', '.join(diff)}); "
                             "resume with the same config or use a new --out folder")
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.state = _State(ck["epoch"], ck["rows"], ck["epoch_times"], ck["measure_times"])
        torch.set_rng_state(ck["rng"]["torch"].cpu())
        np.random.set_state(ck["rng"]["numpy"])
        random.setstate(ck["rng"]["python"])
        if self.cuda and ck["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state_all([s.cpu() for s in ck["rng"]["cuda"]])

    # ------------------------------------------------------------------ outputs
    def record(self, epoch: int, values: dict[str, dict[str, dict[str, float]]]):
        for split, levels in values.items():
            for layer, metrics in levels.items():
                for metric, value in metrics.items():
                    self.state.rows.append({"epoch": epoch, "split": split, "layer": layer,
                                            "metric": metric, "value": value})

    def write_metrics(self):
        if self.dist.rank == 0:
            write_metrics_csv(self.out / "metrics.csv", self.state.rows)

    def summary(self) -> dict:
        s = self.state
        final = {}
        last = max((r["epoch"] for r in s.rows), default=0)
        for r in s.rows:
            if r["epoch"] == last:
                final.setdefault(r["split"], {}).setdefault(r["layer"], {})[r["metric"]] = r["value"]
        epoch_time = float(np.mean(s.epoch_times)) if s.epoch_times else math.nan
        measure_time = float(np.mean(s.measure_times)) if s.measure_times else math.nan
        return {
            "config": self.cfg.to_dict(),
            "data_source": self.data.source,
            "real_data": self.cfg.dataset != "digits",
            "processes": self.dist.world,
            "device": str(self.device),
            "epochs_done": s.epoch,
            "final_epoch": last,
            "levels": [k for k in final.get("train", {}) if k != "network"],
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


def write_metrics_csv(path, rows: list[dict]) -> None:
    """Long format: one row per (epoch, split, layer, metric) with its value."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["epoch", "split", "layer", "metric", "value"], lineterminator="\n")
    w.writeheader()
    w.writerows({**r, "value": repr(float(r["value"]))} for r in rows)
    write_text(path, buf.getvalue())


def read_metrics_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return [{**r, "epoch": int(r["epoch"]), "value": float(r["value"])} for r in csv.DictReader(f)]


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run with ``n`` intra-op CPU threads (None: leave torch's setting), then restore it.

    Small networks gain little from several threads, and when other processes share the
    cores, OpenMP threads that spin-wait for each other can slow a run down 20x or more
    (measured here: a quick digits run took 6.6 s with 1 thread and 150 s with 2 on a
    busy 2-core machine), so the digits experiments use 1.
    """
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train(config: TrainConfig, out_dir, *, resume: bool = False, quiet: bool = False,
          stop_after: int | None = None, figure: bool = True) -> dict:
    """Train ``config`` into ``out_dir``; returns the summary dict (also summary.json).

    Writes config.toml, checkpoint.pt (every epoch, atomically), metrics.csv (after every
    metric pass), summary.json and figure.png/.pdf (the Fig 5 layout) at the end.
    ``resume=True`` continues from out_dir/checkpoint.pt when there is one (the settings
    must match); without it an existing run in out_dir is an error, never overwritten.
    ``stop_after=e`` stops after epoch e as if interrupted (for tests).
    """
    out = Path(out_dir)
    config = copy.deepcopy(config).validate()
    ck = out / CHECKPOINT
    if ck.exists() and not resume:
        raise ValueError(f"out: {out} already holds a run; pass --resume to continue it or choose a new folder")
    with cpu_threads(config.threads):
        trainer = Trainer(config, out, quiet=quiet)
        if resume and ck.exists():
            trainer.load_checkpoint(ck)
            trainer.log(f"resuming {out} after epoch {trainer.state.epoch}")
        if trainer.dist.rank == 0:
            write_config(out / "config.toml", config.to_dict())
        summary = trainer.run(stop_after=stop_after)
    if figure and trainer.dist.rank == 0 and trainer.state.epoch >= config.epochs:
        from nclab.nets.plots import plot_runs

        plot_runs({out.name or "run": trainer.state.rows}, out / "figure", titles={out.name or "run": _title(config)})
    return summary


def _title(cfg: TrainConfig) -> str:
    head = {"mse": "MSE", "mse_torch": "MSE (torch)", "ce": "CE"}[cfg.loss]
    return f"{cfg.model} on {cfg.dataset}, {head}, {'bias' if cfg.bias else 'no bias'}, wd {cfg.weight_decay:g}"
