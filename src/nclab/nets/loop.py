"""The training loop: :class:`Trainer` builds a run and trains it epoch by epoch.

Schedule: SGD with ``momentum``, the lr multiplied by ``lr_gamma`` every ``lr_step``
epochs, the lr and weight decay of :attr:`TrainSettings.sgd_lr` /
:attr:`TrainSettings.sgd_weight_decay` (the paper's, in the loss's scaling, unless set).

Data stay in tensors (on the GPU when they fit); each epoch uses the permutation drawn
from a generator seeded with (seed, epoch), so an epoch's batches do not depend on what
ran before: resuming from the checkpoint of epoch e gives the same run as not stopping.
On CUDA with ``compile`` the training forward runs through ``torch.compile`` (the metric
pass through the plain model: its forward hooks). An epoch is the N // B full batches of B = min(batch_size, N) samples; the last N mod B
samples of the permutation are dropped (a different set each epoch), and the running
loss/accuracy average over the N - N mod B samples used. Distributed: see
:mod:`nclab.nets.distributed`; the metric pass: :mod:`nclab.nets.measure`; checkpoints:
:mod:`nclab.nets.checkpoint`.
"""
from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nclab.eta import notice_if_long
from nclab.nets import checkpoint
from nclab.nets.data import ImageData, load_data, to_device
from nclab.nets.distributed import Dist, all_reduce_sum, convert_batchnorm, current
from nclab.nets.losses import sample_losses
from nclab.nets.measure import (MEASURE_BUDGET, METRIC_COLUMNS, Values, measure, measure_sets, measured_per_class,
                               rows_of)
from nclab.nets.models import build_model
from nclab.nets.probe import PENULTIMATE
from nclab.nets.settings import TrainSettings
from nclab.rundir import Folder, RunDir


@dataclass
class _State:
    """What a run has done so far (all of it goes into the checkpoint)."""

    epoch: int = 0
    rows: list = field(default_factory=list)
    epoch_times: list = field(default_factory=list)
    measure_times: list = field(default_factory=list)


class Trainer:
    """One training run writing to ``folder`` (see the module docstring); use :func:`nclab.nets.training.train`.

    ``folder``: a :class:`nclab.rundir.Folder` (only rank 0 writes), or a path for a run
    that writes nothing (benchmarks, tests of one epoch). ``dist``: this process's place
    in torch.distributed (default: the existing process group, if any); ``data``: the data
    set (default: loaded from the settings).
    """

    def __init__(self, settings: TrainSettings, folder: Folder | str | Path, *, quiet: bool = False,
                 data: ImageData | None = None, dist: Dist | None = None):
        if not isinstance(settings, TrainSettings):
            raise TypeError(f"settings: expected TrainSettings, got {type(settings).__name__}")
        if not isinstance(folder, Folder):
            folder = RunDir(folder).folder()  # not opened: writing is refused
        self.cfg, self.folder, self.quiet = settings, folder, quiet
        self.dist = dist if dist is not None else current()
        self.device = self._device()
        self.cuda = self.device.type == "cuda"
        if data is None:  # (benchmarks pass synthetic data)
            data = load_data(settings.dataset, settings.data, per_class=settings.per_class, seed=settings.seed)
        self.data: ImageData = to_device(data, self.device)
        if min(settings.batch_size, len(self.data.y_train)) < self.dist.world:
            raise ValueError(f"batch_size: {settings.batch_size} leaves some of the {self.dist.world} processes "
                             "without samples; use a larger batch or fewer processes")
        self.measured_per_class = measured_per_class(settings, self.data)
        self.measure_sets = measure_sets(self.data, self.measured_per_class, settings.seed, self.dist)
        torch.manual_seed(settings.seed)
        model = build_model(settings.model, data.num_classes, data.input_shape, stem=settings.stem,
                            width=settings.width, bias=settings.bias)
        if self.dist.active:
            model = convert_batchnorm(model) if not self.cuda else nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        if self.cuda and settings.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp = self.model
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.cuda else None)
        if self.cuda and settings.compile:  # training forward only: the metric pass hooks the plain model
            self.ddp = torch.compile(self.ddp)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=settings.sgd_lr, momentum=settings.momentum,
                                   weight_decay=settings.sgd_weight_decay)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, settings.lr_step, settings.lr_gamma)
        self.state = _State()

    def close(self) -> None:
        """Release the DDP wrapper (before the process group is destroyed: freeing it later can hang)."""
        self.ddp = self.model
        gc.collect()

    def _device(self) -> torch.device:
        """The settings' device (checked there); under torchrun on CUDA, this process's GPU."""
        dev = torch.device(self.cfg.device)
        if dev.type == "cuda":
            if self.dist.active:
                dev = torch.device("cuda", self.dist.local_rank)
            elif dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(dev)
        return dev

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
        totals = all_reduce_sum(torch.stack([loss_sum, correct]), self.dist)
        if not torch.isfinite(totals[0]):
            raise ValueError(f"lr: training diverged in epoch {epoch} (loss {float(totals[0])}); "
                             "lower --lr or --weight-decay")
        return {"running_loss": float(totals[0]) / used, "running_accuracy": float(totals[1]) / used}

    def measure(self) -> Values:
        """{split: {level: {metric: value}}}: the metric pass (:func:`nclab.nets.measure.measure`)."""
        return measure(self.model, self.measure_sets, self.cfg, self.data.num_classes, prepare=self.prepare,
                       where=self.dist)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """checkpoint.pt in the run folder (rank 0 only)."""
        if self.dist.rank != 0:
            return
        checkpoint.save(self.folder, settings=self.cfg, model=self.model.state_dict(),
                        optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                        epoch=self.state.epoch, rows=self.state.rows, epoch_times=self.state.epoch_times,
                        measure_times=self.state.measure_times)

    def load_checkpoint(self, path: Path) -> None:
        """Continue from ``path`` (written with the same settings, else ValueError naming the differences)."""
        ck = checkpoint.load(path, map_location=self.device)
        checkpoint.check_same_settings(path, ck, self.cfg)
        try:
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
            self.sched.load_state_dict(ck["scheduler"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            raise checkpoint.not_ours(path, f"its state does not fit this model: {exc}") from None
        self.state = _State(ck["epoch"], ck["rows"], ck["epoch_times"], ck["measure_times"])
        torch.set_rng_state(ck["rng"]["torch"].cpu())

    # ------------------------------------------------------------------ outputs
    def record(self, epoch: int, values: Values) -> None:
        self.state.rows.extend(rows_of(epoch, values))

    def write_metrics(self) -> None:
        if self.dist.rank == 0:
            self.folder.write_csv("metrics.csv", self.state.rows, METRIC_COLUMNS)

    def data_record(self) -> dict:
        """summary.json's data block: name, train_size, test_size (0 without a test set), image_shape [C, H, W]."""
        d = self.data
        return {"name": d.name, "train_size": len(d.y_train), "test_size": 0 if d.y_test is None else len(d.y_test),
                "image_shape": list(d.input_shape)}

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
            **self.cfg.resolved(),
            "data": self.data_record(),
            "data_source": self.data.source,
            "real_data": self.cfg.dataset != "digits",
            "processes": self.dist.world,
            "device": str(self.device),
            "epochs_done": s.epoch,
            "final_epoch": last,
            "levels": [k for k in final.get("train", {}) if k != "network"],
            "measured_per_class": self.measured_per_class,
            "nc3_frame": self.cfg.nc3_frame,
            "final": final,
            "epoch_time_s": epoch_time,
            "metric_pass_time_s": measure_time,
            "metric_pass_over_epoch": measure_time / epoch_time if s.epoch_times else math.nan,
        }

    # ------------------------------------------------------------------ main loop
    def run(self, *, stop_after: int | None = None) -> dict:
        """Train from the current epoch to ``epochs`` (or ``stop_after``); returns the summary.

        Writes metrics.csv after every metric pass, checkpoint.pt after every epoch and
        summary.json once all epochs are done (rank 0).
        """
        from tqdm import tqdm

        cfg = self.cfg
        last = min(cfg.epochs, stop_after) if stop_after is not None else cfg.epochs
        bar = tqdm(range(self.state.epoch + 1, last + 1), desc=self.folder.path().name or "train", unit="epoch",
                   disable=self.quiet or self.dist.rank != 0, initial=self.state.epoch, total=cfg.epochs,
                   mininterval=1.0)
        first = self.state.epoch + 1
        for epoch in bar:
            self._sync()
            t0 = time.perf_counter()
            running = self.train_epoch(epoch)
            self._sync()
            self.state.epoch_times.append(time.perf_counter() - t0)
            self.state.epoch = epoch
            if epoch == first and not self.quiet and self.dist.rank == 0:  # the pace of the first epoch
                per_epoch = self.state.epoch_times[-1] * (1 + MEASURE_BUDGET / self.cfg.eval_every)
                notice_if_long(f"training {self.folder.path().name or 'the network'}", 1, last - first + 1,
                               per_epoch, "epochs")
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
                self.folder.write_json("summary.json", summary)
        return summary
