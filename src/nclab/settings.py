"""Typed, frozen settings: each default written once, strict validation, exact TOML round trip.

Every concern has one frozen dataclass built on :class:`Settings`: the UFM model
(:class:`nclab.ufm.UFM`), gradient descent (:class:`nclab.ufm.GD`), network training
(:class:`nclab.nets.TrainSettings`) and sweeps (:class:`nclab.experiments.sweep.SweepSettings`).
A field is declared with :func:`setting`, which carries its help text, its allowed
choices and an optional range check; ``__post_init__`` checks every field against its
annotation with strict types:

* ``int``: an int, never a bool or a float; ``float``: an int or a float (stored as a
  finite float; NaN and ±Inf are errors); ``bool``: True or False only, never a string;
  ``str``: a string, checked against its choices; ``X | None``: None or an X;
  ``tuple[int, ...]`` / ``tuple[float, ...]``: a non-empty list or tuple of those.

``to_dict`` gives plain TOML-able data (None omitted, tuples as lists) and ``from_dict``
reads it back: ``from_dict(s.to_dict()) == s`` exactly, for every settings class.

The paper's values (Tirer & Bruna, ICML 2022, and the best knowledge of the network
schedule; see docs) live in :data:`PAPER`, the one table every default refers to.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
import types
import typing

#: The paper's settings, written once. UFM experiments: plain GD with step 0.1 from an
#: i.i.d. Gaussian initialisation of std 0.1. Networks (for cross-entropy and
#: torch.nn.MSELoss): SGD, momentum 0.9, lr 0.05 divided by 10 every 40 epochs, weight
#: decay 5e-4, batch 128, 200 epochs; every built-in data set has 10 classes.
PAPER = {
    "ufm_lr": 0.1,
    "ufm_init_std": 0.1,
    "net_lr": 0.05,
    "net_momentum": 0.9,
    "net_weight_decay": 5e-4,
    "net_batch_size": 128,
    "net_lr_step": 40,
    "net_lr_gamma": 0.1,
    "net_epochs": 200,
    "net_classes": 10,
}

#: a name that may become a file or folder name: no separators, no "..", no leading dot
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")


def setting(default=dataclasses.MISSING, *, help: str, choices=None, check=None):
    """A dataclass field with its help text, its allowed ``choices`` and a ``check``.

    ``check(value)`` returns None when the value is acceptable, else the reason (a
    phrase such as "must be > 0"), which becomes ``"<where>.<name>: must be > 0, got …"``.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "check": check}
    return dataclasses.field(default=default, metadata=meta)


class SettingsError(ValueError):
    """A setting has a wrong type or value; the message names it and says what fits."""


class Settings:
    """Mixin for frozen dataclasses of settings (see the module docstring).

    Subclasses set ``_where`` (the name used in messages, e.g. "solver") and may define
    ``_check_together(self)`` for rules that involve several fields.
    """

    _where = "settings"

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if not f.init:  # derived, not a setting
                continue
            value = _coerce(getattr(self, f.name), hints[f.name], f"{self._where}.{f.name}")
            _check_field(f, value, self._where)
            object.__setattr__(self, f.name, value)
        self._check_together()

    def _check_together(self) -> None:
        """Rules across fields; raise SettingsError. Nothing by default."""

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise SettingsError(_unknown_message(self._where, unknown[0], type(self).field_names()))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain data for TOML: None values omitted, tuples as lists."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or not f.init:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str | None = None):
        """Settings from plain data (e.g. a TOML table); unknown keys are errors with a suggestion."""
        where = where or cls._where
        if not isinstance(data, dict):
            raise SettingsError(f"{where}: expected a table of settings, got {type(data).__name__}")
        names = cls.field_names()
        for key in data:
            if key not in names:
                raise SettingsError(_unknown_message(where, key, names))
        return cls(**data)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of field ``name`` with its default and choices."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            text += f"; one of {', '.join(map(str, f.metadata['choices']))}"
        if f.default is not dataclasses.MISSING and f.default is not None:
            text += f" (default {f.default})"
        return text


def _unknown_message(where: str, key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
    return f"{where}: unknown key {key!r}{hint}"


# ----------------------------------------------------------------------------- strict types
def _coerce(value, hint, name: str):
    """``value`` checked against the annotation ``hint``; ints become floats where floats belong."""
    options = _union_members(hint)
    if value is None:
        if type(None) in options:
            return None
        raise SettingsError(f"{name}: is required (got nothing)")
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _coerce_one(value, option, name)
        except SettingsError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    kinds = " or ".join(_kind_name(o) for o in options if o is not type(None))
    raise SettingsError(f"{name}: must be {kinds}, got {value!r}")


def _union_members(hint) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _kind_name(hint) -> str:
    if typing.get_origin(hint) is tuple:
        return {int: "a list of integers", float: "a list of numbers"}[typing.get_args(hint)[0]]
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[hint]


def _coerce_one(value, hint, name: str):
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if hasattr(value, "ndim") and getattr(value, "ndim") == 1:  # a numpy array or tensor
            value = value.tolist()
        if not isinstance(value, (list, tuple)) or not value:
            raise SettingsError(f"{name}: must be {_kind_name(hint)} (non-empty), got {value!r}")
        return tuple(_coerce_one(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{name}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise SettingsError(f"{name}: must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise SettingsError(f"{name}: must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise SettingsError(f"{name}: must be a finite number, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise SettingsError(f"{name}: must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported settings annotation {hint!r}")  # a programming error


def _check_field(f: dataclasses.Field, value, where: str) -> None:
    name = f"{where}.{f.name}"
    choices = f.metadata.get("choices")
    if choices and value is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SettingsError(f"{name}: must be one of {', '.join(map(str, choices))}; got {value!r}{hint}")
    check = f.metadata.get("check")
    if check is not None and value is not None:
        problem = check(value)
        if problem:
            raise SettingsError(f"{name}: {problem}, got {value!r}")


# ----------------------------------------------------------------------------- common checks
def positive(value) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value) -> str | None:
    return None if value >= 0 else "must be >= 0"


def at_least(bound):
    def check(value) -> str | None:
        values = value if isinstance(value, tuple) else (value,)
        return None if all(v >= bound for v in values) else f"must be >= {bound}"

    return check


def fraction(value) -> str | None:
    """A number in [0, 1)."""
    return None if 0 <= value < 1 else "must be in [0, 1)"


def valid_name(value: str) -> str | None:
    """A name usable as one folder name (no path separators, no '..', no leading dot)."""
    if NAME_PATTERN.fullmatch(value) and ".." not in value:
        return None
    return ("must be a plain name of letters, digits and _ . + - (no '/', no '..', not starting with '.'; "
            "it becomes a folder name)")


def check_device(value: str) -> str | None:
    """"cpu", "cuda" or "cuda:N", and present on this machine."""
    if value == "cpu":
        return None
    match = re.fullmatch(r"cuda(?::(\d+))?", value)
    if not match:
        close = difflib.get_close_matches(value, ["cpu", "cuda"], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"must be 'cpu', 'cuda' or 'cuda:N'{hint}"
    import torch

    if not torch.cuda.is_available():
        return "names a CUDA device, but CUDA is not available here; use 'cpu'"
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        return f"names CUDA device {index}, but this machine has {torch.cuda.device_count()}"
    return None
