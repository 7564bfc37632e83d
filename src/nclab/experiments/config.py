"""Experiment configs: TOML files with a validated schema.

A config has three tables (every key optional except model.K, model.n, model.dims,
model.lams; defaults below)::

    name = "fig4"
    title = "Extended UFM with ReLU (paper Fig. 4)"
    [model]      K, n, dims, lams (H1 first), activation, loss, bias, lam_b
    [solver]     steps, lr, momentum, seed, restarts, init_std, dtype, device, backend, log_every
    [expect]     frame = "of" | "etf"   (the geometry the theory predicts; NC2/NC3 panels)

Validation names the offending key: an unknown key, a wrong type or a negative λ is a
ValueError like ``config: solver.steps must be an integer, got 'many'``.
"""
from __future__ import annotations

import copy
from pathlib import Path

from nclab.io import read_toml, tomllib, toml_text
from nclab.ufm.model import ACTIVATIONS, BIASES, LOSSES, UFM

CONFIG_DIR = Path(__file__).parent / "configs"

_INT, _FLOAT, _STR = "integer", "number", "string"

SCHEMA: dict[str, dict[str, tuple]] = {
    "model": {
        "K": (_INT, None), "n": ("integer or list of integers", None),
        "dims": ("list of integers", None), "lams": ("list of numbers", None),
        "activation": (_STR, "linear"), "loss": (_STR, "mse"), "bias": (_STR, "none"),
        "lam_b": (_FLOAT, 0.0),
    },
    "solver": {
        "steps": (_INT, 10_000), "lr": (_FLOAT, 0.1), "momentum": (_FLOAT, 0.0),
        "seed": (_INT, 0), "restarts": (_INT, 1), "init_std": (_FLOAT, 0.1),
        "dtype": (_STR, "float64"), "device": (_STR, "cpu"), "backend": (_STR, "auto"),
        "log_every": (_INT, 100),
    },
    "expect": {"frame": (_STR, None)},
}
TOP_LEVEL = {"name": _STR, "title": _STR, "description": _STR}
CHOICES = {
    "model.activation": ACTIVATIONS, "model.loss": LOSSES, "model.bias": BIASES,
    "solver.dtype": ("float64", "float32"), "solver.backend": ("auto", "numpy", "torch"),
    "expect.frame": ("of", "etf"),
}


def _type_ok(kind: str, value) -> bool:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = is_int or isinstance(value, float)
    if kind == _INT:
        return is_int
    if kind == _FLOAT:
        return is_num
    if kind == _STR:
        return isinstance(value, str)
    if kind == "integer or list of integers":
        return is_int or (isinstance(value, list) and all(_type_ok(_INT, v) for v in value))
    if kind == "list of integers":
        return isinstance(value, list) and bool(value) and all(_type_ok(_INT, v) for v in value)
    if kind == "list of numbers":
        return isinstance(value, list) and bool(value) and all(_type_ok(_FLOAT, v) for v in value)
    raise AssertionError(kind)


def validate(cfg: dict) -> dict:
    """Check every key and type, fill defaults; returns a new dict. Raises ValueError."""
    out = {}
    for key, value in cfg.items():
        if key in SCHEMA:
            continue
        if key not in TOP_LEVEL:
            raise ValueError(f"config: unknown key {key!r} (known: {sorted(TOP_LEVEL) + sorted(SCHEMA)})")
        if not isinstance(value, str):
            raise ValueError(f"config: {key} must be a string, got {value!r}")
        out[key] = value
    out.setdefault("name", "run")
    for section, keys in SCHEMA.items():
        given = cfg.get(section, {})
        if not isinstance(given, dict):
            raise ValueError(f"config: [{section}] must be a table")
        unknown = set(given) - set(keys)
        if unknown:
            raise ValueError(f"config: unknown key {section}.{sorted(unknown)[0]} (known: {sorted(keys)})")
        out[section] = {}
        for key, (kind, default) in keys.items():
            if key not in given:
                if default is None and section == "model":
                    raise ValueError(f"config: missing required key {section}.{key}")
                if default is not None:
                    out[section][key] = default
                continue
            value = given[key]
            if not _type_ok(kind, value):
                raise ValueError(f"config: {section}.{key} must be a {kind}, got {value!r}")
            if kind == _FLOAT:
                value = float(value)
            choices = CHOICES.get(f"{section}.{key}")
            if choices and value not in choices:
                raise ValueError(f"config: {section}.{key} must be one of {list(choices)}, got {value!r}")
            out[section][key] = value
    _check_ranges(out)
    return out


def _check_ranges(cfg):
    m, s = cfg["model"], cfg["solver"]
    for i, lam in enumerate(m["lams"]):
        if lam < 0:
            raise ValueError(f"config: model.lams[{i}] must be >= 0 (λ, H1 first), got {lam}")
    for key in ("steps", "log_every", "restarts"):
        if s[key] < (0 if key == "steps" else 1):
            raise ValueError(f"config: solver.{key} must be positive, got {s[key]}")
    if s["lr"] <= 0:
        raise ValueError(f"config: solver.lr must be > 0, got {s['lr']}")
    if not 0 <= s["momentum"] < 1:
        raise ValueError(f"config: solver.momentum must be in [0, 1), got {s['momentum']}")
    if s["init_std"] < 0:
        raise ValueError(f"config: solver.init_std must be >= 0, got {s['init_std']}")
    try:
        model_from(cfg)
    except ValueError as exc:
        raise ValueError(f"config: model.{exc}") from None


def model_from(cfg: dict) -> UFM:
    """The UFM a (validated) config describes."""
    m = cfg["model"]
    n = m["n"] if isinstance(m["n"], int) else tuple(m["n"])
    return UFM(m["K"], n, tuple(m["dims"]), tuple(m["lams"]), activation=m.get("activation", "linear"),
               loss=m.get("loss", "mse"), bias=m.get("bias", "none"), lam_b=m.get("lam_b", 0.0))


def expected_frame(cfg: dict) -> str:
    """"of" for the bias-free MSE models, "etf" with a bias or cross-entropy, unless set."""
    frame = cfg.get("expect", {}).get("frame")
    if frame:
        return frame
    m = cfg["model"]
    return "of" if m.get("loss", "mse") == "mse" and m.get("bias", "none") == "none" else "etf"


def load(path) -> dict:
    """Read and validate a TOML config; a one-line ValueError for unreadable files."""
    return validate(read_toml(path, "CONFIG"))


def builtin(name: str) -> dict:
    """A named paper config shipped with nclab (see :func:`builtin_names`)."""
    path = CONFIG_DIR / f"{name}.toml"
    if not path.is_file():
        raise ValueError(f"NAME: unknown experiment {name!r}; choose from {builtin_names()}")
    return load(path)


def builtin_names() -> list[str]:
    order = ["ufm", "ufm-bias", "ufm-ce", "ufm-unregularized", "fig3", "fig4", "fig8", "fig9"]
    found = {p.stem for p in CONFIG_DIR.glob("*.toml")}
    return [n for n in order if n in found] + sorted(found - set(order))


def apply_overrides(cfg: dict, assignments: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values in TOML syntax) and re-validate."""
    cfg = copy.deepcopy(cfg)
    for item in assignments or []:
        if "=" not in item:
            raise ValueError(f"--set: expected section.key=value, got {item!r}")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) == 1 and parts[0] in TOP_LEVEL:
            cfg[parts[0]] = text
            continue
        if len(parts) != 2 or parts[0] not in SCHEMA:
            raise ValueError(f"--set: {dotted!r} is not section.key with a section in {sorted(SCHEMA)}")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare word: a string
        cfg.setdefault(parts[0], {})[parts[1]] = value
    return validate(cfg)


def dumps(cfg: dict) -> str:
    """TOML text of a config (round-trips through :func:`validate`)."""
    return toml_text(cfg)
