"""``train``: one network training run with layer-wise collapse metrics, checkpoints and resume.

The pieces: :mod:`nclab.nets.settings` (:class:`TrainSettings`), :mod:`nclab.nets.losses`
(the loss scalings), :mod:`nclab.nets.loop` (:class:`Trainer`, one epoch, the main loop),
:mod:`nclab.nets.measure` (the metric pass and metrics.csv rows),
:mod:`nclab.nets.checkpoint` (safe checkpoints) and :mod:`nclab.nets.distributed`
(torchrun's process group, global BatchNorm); the output folder is a run folder
(:mod:`nclab.rundir`: refuse / resume / force, lock, atomic writes). This module puts
them together.

On CPU ``torch.use_deterministic_algorithms(True)`` makes runs bitwise repeatable;
:func:`train` restores the previous setting when it returns. Under
``torchrun --nproc-per-node P -m nclab train ...`` it joins torchrun's process group and
destroys it at the end (:func:`nclab.nets.distributed.process_group`).
"""
from __future__ import annotations

import contextlib
import os

import torch

from nclab.io import toml_text
from nclab.nets.checkpoint import CHECKPOINT
from nclab.nets.distributed import process_group
from nclab.nets.loop import Trainer
from nclab.nets.measure import warn_budget
from nclab.nets.settings import MAY_CHANGE_ON_RESUME, TrainSettings
from nclab.rundir import Folder, RunDir
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


def train(settings: TrainSettings, out, *, resume: bool = False, force: bool = False, quiet: bool = False,
          stop_after: int | None = None, figure: bool = True) -> dict:
    """Train ``settings`` into ``out``; returns the summary dict (also summary.json).

    ``out``: a folder path (opened as a run folder, :mod:`nclab.rundir`: refused when it
    already holds files unless ``resume`` or ``force``, locked, nothing left behind by an
    early failure) or a :class:`nclab.rundir.Folder` of a run folder that is already open.
    Writes config.toml, checkpoint.pt (every epoch, atomically), metrics.csv (after every
    metric pass), summary.json, figure.png/.pdf, figure-column.png/.pdf (the Fig 5 layout) and caption.md at the end.
    ``resume=True`` continues from its checkpoint.pt when there is one (the settings must
    match; ``epochs`` may grow); ``force=True`` removes the files of nclab's earlier run
    first (never the user's). ``stop_after=e`` stops after epoch e as if interrupted (tests).
    """
    if not isinstance(settings, TrainSettings):
        raise TypeError(f"settings: expected TrainSettings, got {type(settings).__name__}")
    with run_folder(out, resume=resume, force=force, part="train", record=settings_record(settings)) as folder:
        return _train(settings, folder, resume=resume, quiet=quiet, stop_after=stop_after, figure=figure)


def _train(settings: TrainSettings, folder: Folder, *, resume: bool, quiet: bool, stop_after: int | None,
           figure: bool) -> dict:
    from_checkpoint = resume and folder.path(CHECKPOINT).is_file()
    with (cpu_threads(settings.threads), deterministic_algorithms(not settings.device.startswith("cuda")),
          process_group(settings.device) as dist):
        trainer = Trainer(settings, folder, quiet=quiet, dist=dist)
        try:
            if from_checkpoint:
                trainer.load_checkpoint(folder.path(CHECKPOINT))
                trainer.log(f"resuming {folder.path()} after epoch {trainer.state.epoch}")
            if dist.rank == 0:
                folder.write_text("config.toml", toml_text(settings.to_dict()))
            summary = trainer.run(stop_after=stop_after)
        finally:
            trainer.close()  # also on errors: DDP must go before its process group
        rows, finished = trainer.state.rows, trainer.state.epoch >= settings.epochs
    if figure and dist.rank == 0 and finished:
        from nclab.nets.plots import caption, plot_runs

        name = folder.path().name or "run"
        plot_runs({name: rows}, "figure", folder, titles={name: _title(settings)},
                  nc3_frames={name: settings.nc3_frame})
        folder.write_text("caption.md", caption(summary, name))
    if dist.rank == 0:
        warn_budget(summary, folder.path())
    return summary


def settings_record(settings: TrainSettings) -> dict:
    """What the run folder records to check ``--resume``: the settings less those that may change,
    with lr and weight decay as SGD uses them (None and the paper's value written out are one run)."""
    record = {k: v for k, v in settings.to_dict().items() if k not in MAY_CHANGE_ON_RESUME}
    return record | {"lr": settings.sgd_lr, "weight_decay": settings.sgd_weight_decay}


@contextlib.contextmanager
def run_folder(out, *, resume: bool, force: bool, part: str, record: dict):
    """A :class:`Folder` to write to: ``out`` itself when it is one, else the run folder at path
    ``out``, opened for this block with ``part`` begun (and completed when the block ends).

    Under torchrun only rank 0 opens (and locks) the folder; the other ranks get a view that
    can read it (to resume) but never writes.
    """
    if isinstance(out, Folder):
        yield out
        return
    if resume and force:
        raise ValueError("--resume, --force: choose one (continue the run, or replace it)")
    if int(os.environ.get("RANK", "0")) != 0:
        yield RunDir(out).folder()
        return
    with RunDir(out, mode="resume" if resume else "force" if force else "new") as rd:
        rd.begin_part(part, record, again=True)  # a complete run may continue with more epochs
        yield rd.folder()
        rd.complete_part(part)


def _title(s: TrainSettings) -> str:
    head = {"mse": "MSE", "mse_torch": "MSE (torch)", "ce": "CE"}[s.loss]
    return f"{s.model} on {s.dataset}, {head}, {'bias' if s.bias else 'no bias'}, wd {s.sgd_weight_decay:g}"
