"""Checkpoints of a training run: plain data and tensors only, loaded with ``weights_only=True``.

A checkpoint (``checkpoint.pt``, written atomically after every epoch) is a dict of

* ``format``: :data:`FORMAT`; ``settings``: the run's :meth:`TrainSettings.to_dict` (plain data);
* ``model``, ``optimizer``, ``scheduler``: their ``state_dict()`` (tensors and plain data);
* ``epoch`` (epochs done), ``rows`` (the metric rows so far: plain dicts of
  :data:`nclab.nets.measure.METRIC_COLUMNS`), ``epoch_times``, ``measure_times`` (floats);
* ``rng``: ``{"torch": torch.get_rng_state()}`` (a uint8 tensor).

:func:`load` reads it with ``torch.load(..., weights_only=True)``, so unpickling can only
build tensors and plain containers, never run code from the file, and checks every key:
a truncated, empty, foreign or crafted file is a one-line ValueError
"resume: <path> is not an nclab checkpoint (...)", never a traceback. Checkpoints written
before the ``format`` key existed (with ``config`` for ``settings``) still load.
"""
from __future__ import annotations

import numbers
import warnings
from pathlib import Path

import torch

from nclab.io import one_line
from nclab.nets.measure import METRIC_COLUMNS
from nclab.nets.settings import MAY_CHANGE_ON_RESUME, TrainSettings
from nclab.settings import SettingsError

CHECKPOINT = "checkpoint.pt"
FORMAT = "nclab.nets.checkpoint/1"
_KEYS = ("settings", "model", "optimizer", "scheduler", "epoch", "rows", "epoch_times", "measure_times", "rng")


def save(folder, *, settings: TrainSettings, model: dict, optimizer: dict, scheduler: dict, epoch: int,
         rows: list[dict], epoch_times: list[float], measure_times: list[float]) -> None:
    """Write ``folder``/checkpoint.pt atomically (a reader sees the old file or the new one, never
    a part); ``folder`` is a :class:`nclab.rundir.Folder`. The checkpoint is a result kept
    even if the run fails later."""
    data = {
        "format": FORMAT,
        "settings": settings.to_dict(),
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "epoch": int(epoch),
        "rows": [{"epoch": int(r["epoch"]), "split": str(r["split"]), "layer": str(r["layer"]),
                  "metric": str(r["metric"]), "value": float(r["value"])} for r in rows],
        "epoch_times": [float(t) for t in epoch_times],
        "measure_times": [float(t) for t in measure_times],
        # torch's default CPU generator: model initialisation (batches use their own seeded generator)
        "rng": {"torch": torch.get_rng_state()},
    }
    with folder.atomic(CHECKPOINT) as tmp:
        torch.save(data, tmp)
    folder.keep()


def not_ours(path, reason: str) -> ValueError:
    """The one-line error for a file that is not a checkpoint nclab can resume from."""
    reason = one_line(reason, 160)
    return ValueError(f"resume: {path} is not an nclab checkpoint ({reason}); remove it or use --force / a new --out")


def load(path, map_location="cpu") -> dict:
    """The checked contents of a checkpoint (keys as in the module docstring); ValueError if it is not one."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # e.g. about a foreign pickle's protocol: the error below says it all
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, empty, not a torch file, or objects weights_only refuses
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise not_ours(path, f"{type(exc).__name__}: {first}" if first else type(exc).__name__) from None
    problem = _problem(ck)
    if problem:
        raise not_ours(path, problem)
    if "settings" not in ck:
        ck["settings"] = ck.pop("config")
    return ck


def _problem(ck) -> str | None:
    """Why ``ck`` is not a checkpoint of ours, or None."""
    if not isinstance(ck, dict):
        return f"it holds a {type(ck).__name__}, not a dict"
    if "format" in ck and ck["format"] != FORMAT:
        return f"format {ck['format']!r}, expected {FORMAT!r}"
    keys = set(ck) | ({"settings"} if "format" not in ck and "config" in ck else set())
    missing = [k for k in _KEYS if k not in keys]
    if missing:
        return f"no {', '.join(missing)}"
    settings = ck.get("settings", ck.get("config"))
    for name, value in (("settings", settings), ("model", ck["model"]), ("optimizer", ck["optimizer"]),
                        ("scheduler", ck["scheduler"]), ("rng", ck["rng"])):
        if not isinstance(value, dict):
            return f"{name} is a {type(value).__name__}, not a dict"
    if not all(isinstance(v, torch.Tensor) for v in ck["model"].values()):
        return "model holds something other than tensors"
    epoch = ck["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        return f"epoch {epoch!r} is not a count of epochs"
    rows = ck["rows"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) and set(r) == set(METRIC_COLUMNS) for r in rows):
        return "rows are not metric rows"
    for name in ("epoch_times", "measure_times"):
        times = ck[name]
        if not isinstance(times, list) or not all(isinstance(t, numbers.Real) for t in times):
            return f"{name} is not a list of numbers"
    rng = ck["rng"].get("torch")
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.ndim != 1:
        return "rng has no torch generator state"
    return None


def saved_settings(path, ck: dict, current: TrainSettings) -> TrainSettings:
    """The settings a checkpoint was written with, with ``current``'s values for MAY_CHANGE_ON_RESUME.

    (A run written on a CUDA machine resumes on another device: its saved device is not checked.)
    """
    saved = {k: v for k, v in ck["settings"].items() if k not in MAY_CHANGE_ON_RESUME}
    saved |= {k: v for k, v in current.to_dict().items() if k in MAY_CHANGE_ON_RESUME}
    try:
        return TrainSettings.from_dict(saved)
    except (SettingsError, TypeError) as exc:
        raise not_ours(path, f"its settings: {exc}") from None


def check_same_settings(path, ck: dict, current: TrainSettings) -> None:
    """ValueError naming the settings in which the checkpoint ``ck`` (read from ``path``) differs from ``current``."""
    diff = saved_settings(path, ck, current).differences(current)
    if diff:
        raise ValueError(f"resume: {path} was written with different settings ({', '.join(diff)}); "
                         "resume with the same config, pass --force to overwrite, or use a new --out folder")
