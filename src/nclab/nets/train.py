"""``train``: one network training run with layer-wise collapse metrics, checkpoints and resume.

The pieces: :mod:`nclab.nets.settings` (:class:`TrainSettings`), :mod:`nclab.nets.losses`
(the loss scalings), :mod:`nclab.nets.loop` (:class:`Trainer`, one epoch, the main loop),
:mod:`nclab.nets.measure` (the metric pass and metrics.csv rows),
:mod:`nclab.nets.checkpoint` (safe checkpoints), :mod:`nclab.nets.distributed`
(torchrun's process group, global BatchNorm) and :mod:`nclab.nets.runfolder` (refuse /
resume / force). This module puts them together.

On CPU ``torch.use_deterministic_algorithms(True)`` makes runs bitwise repeatable;
:func:`train` restores the previous setting when it returns. Under
``torchrun --nproc-per-node P -m nclab train ...`` it joins torchrun's process group and
destroys it at the end (:func:`nclab.nets.distributed.process_group`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from nclab.io import toml_text, write_text
from nclab.nets.checkpoint import CHECKPOINT
from nclab.nets.distributed import process_group
from nclab.nets.loop import Trainer
from nclab.nets.measure import warn_budget
from nclab.nets.runfolder import prepare_run
from nclab.nets.settings import TrainSettings
from nclab.threads import cpu_threads

__all__ = ["TrainSettings", "Trainer", "deterministic_algorithms", "train"]


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


def train(settings: TrainSettings, out_dir, *, resume: bool = False, force: bool = False, quiet: bool = False,
          stop_after: int | None = None, figure: bool = True) -> dict:
    """Train ``settings`` into ``out_dir``; returns the summary dict (also summary.json).

    Writes config.toml, checkpoint.pt (every epoch, atomically), metrics.csv (after every
    metric pass), summary.json and figure.png/.pdf (the Fig 5 layout) at the end.
    ``resume=True`` continues from out_dir/checkpoint.pt when there is one (the settings
    must match); ``force=True`` deletes an earlier run's files first; with neither, an
    existing run in out_dir is an error, never overwritten. ``stop_after=e`` stops after
    epoch e as if interrupted (for tests).
    """
    if not isinstance(settings, TrainSettings):
        raise TypeError(f"settings: expected TrainSettings, got {type(settings).__name__}")
    out = Path(out_dir)
    from_checkpoint = prepare_run(out, resume=resume, force=force)
    with (cpu_threads(settings.threads), deterministic_algorithms(not settings.device.startswith("cuda")),
          process_group(settings.device) as dist):
        trainer = Trainer(settings, out, quiet=quiet, dist=dist)
        try:
            if from_checkpoint:
                trainer.load_checkpoint(out / CHECKPOINT)
                trainer.log(f"resuming {out} after epoch {trainer.state.epoch}")
            if dist.rank == 0:
                write_text(out / "config.toml", toml_text(settings.to_dict()))
            summary = trainer.run(stop_after=stop_after)
        finally:
            trainer.close()  # also on errors: DDP must go before its process group
        rows, finished = trainer.state.rows, trainer.state.epoch >= settings.epochs
    if figure and dist.rank == 0 and finished:
        from nclab.nets.plots import plot_runs

        name = out.name or "run"
        plot_runs({name: rows}, out / "figure", titles={name: _title(settings)},
                  nc3_frames={name: settings.nc3_frame})
    if dist.rank == 0:
        warn_budget(summary, out)
    return summary


def _title(s: TrainSettings) -> str:
    head = {"mse": "MSE", "mse_torch": "MSE (torch)", "ce": "CE"}[s.loss]
    return f"{s.model} on {s.dataset}, {head}, {'bias' if s.bias else 'no bias'}, wd {s.sgd_weight_decay:g}"
