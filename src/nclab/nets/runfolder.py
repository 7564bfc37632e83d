"""The run-folder policy of ``nclab train`` and the network experiments, in one place.

A folder that already holds a run (or an experiment's results) is never overwritten:
it is an error unless ``resume`` (continue from the checkpoints; the settings must match)
or ``force`` (delete the earlier run's own files first; other files stay). These are the
only functions that decide it; :func:`nclab.nets.train.train` calls :func:`prepare_run`
and :func:`nclab.nets.experiment.train_runs` calls :func:`prepare_experiment`, before
anything is written. (The files are then written by :mod:`nclab.nets.train` (config.toml),
:mod:`nclab.nets.loop` (metrics.csv, summary.json), :mod:`nclab.nets.checkpoint`
(checkpoint.pt) and :mod:`nclab.nets.experiment` (the combined outputs).)
"""
from __future__ import annotations

import os
from pathlib import Path

from nclab.nets.checkpoint import CHECKPOINT, check_resumable
from nclab.nets.settings import TrainSettings

#: the files of one run (``force`` deletes these and nothing else)
RUN_FILES = (CHECKPOINT, "config.toml", "metrics.csv", "summary.json", "figure.png", "figure.pdf")
#: the combined files of an experiment (its runs live in sub-folders)
COMBINED_FILES = ("config.toml", "metrics.csv", "summary.json", "figure.png", "figure.pdf")


def _check_mode(resume: bool, force: bool) -> None:
    if resume and force:
        raise ValueError("resume: --resume and --force exclude each other")


def clear_run(out_dir) -> None:
    """Delete a run's files (RUN_FILES) from out_dir, for ``force``; other files stay."""
    for name in RUN_FILES:
        (Path(out_dir) / name).unlink(missing_ok=True)


def prepare_run(out: Path, *, resume: bool, force: bool) -> bool:
    """Check one run's folder before anything is written; True when the run continues from its checkpoint.

    An existing checkpoint needs ``resume`` or ``force``; ``force`` clears the run's files
    (on rank 0 of a torchrun job). The settings are checked when the checkpoint is loaded.
    """
    _check_mode(resume, force)
    ck = Path(out) / CHECKPOINT
    if ck.exists() and not (resume or force):
        raise ValueError(f"out: {out} already holds a run; pass --resume to continue it, --force to overwrite "
                         "it, or choose a new folder")
    if force and int(os.environ.get("RANK", "0")) == 0:
        clear_run(out)
    return resume and ck.exists()


def holds_results(out_dir, runs) -> bool:
    """Whether out_dir has combined outputs or a checkpoint of one of ``runs``."""
    out = Path(out_dir)
    return any((out / f).exists() for f in COMBINED_FILES) or any((out / r / CHECKPOINT).exists() for r in runs)


def prepare_experiment(runs: dict[str, TrainSettings], out: Path, *, resume: bool, force: bool) -> None:
    """Check an experiment's folder before anything is written: refuse, check resumability, or clear."""
    _check_mode(resume, force)
    if not holds_results(out, runs):
        return
    if not (resume or force):
        raise ValueError(f"out_dir already holds results ({out}); pass --resume or --force")
    if resume:
        for run, settings in runs.items():
            check_resumable(settings, out / run)
        return
    for f in COMBINED_FILES:
        (out / f).unlink(missing_ok=True)
    for run in runs:
        clear_run(out / run)
