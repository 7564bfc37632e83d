"""A UFM experiment as typed settings: one TOML file, one frozen :class:`UFMRun`.

A config has top-level strings and three tables; every key is optional except
model.K, model.n, model.dims and model.lams (defaults: :class:`nclab.ufm.UFM`,
:class:`nclab.ufm.GD`)::

    name = "fig4"            # a plain name: it becomes a folder name
    title = "Extended UFM with ReLU (paper Fig. 4)"
    description = "..."
    [model]      K, n, dims, lams (H1 first), activation, loss, bias, lam_b
    [solver]     steps, lr, momentum, seed, restarts, init_std, dtype, device, backend, log_every, tol,
                 threads, metrics
    [expect]     frame = "of" | "etf"   (the geometry the theory predicts; default from the model)

Validation names the offending key: ``solver.steps: must be an integer, got 'many'``;
an unknown key gets a close-match suggestion. ``UFMRun.from_dict(run.to_dict()) == run``.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

from nclab.io import read_toml, toml_text, tomllib
from nclab.settings import SettingsError, valid_name
from nclab.ufm import GD, UFM

CONFIG_DIR = Path(__file__).parent / "configs"
TOP_LEVEL = ("name", "title", "description")
SECTIONS = ("model", "solver", "expect")
FRAMES = ("of", "etf")
#: the paper's UFM experiments, in report order
PAPER_ORDER = ("ufm", "ufm-bias", "ufm-ce", "ufm-unregularized", "fig3", "fig4", "fig8", "fig9")


@dataclass(frozen=True)
class UFMRun:
    """Everything that defines one UFM experiment: what to solve and how."""

    model: UFM
    solver: GD = field(default_factory=GD)
    name: str = "run"
    title: str = ""
    description: str = ""
    frame: str | None = None  # [expect] frame; None: from the model

    def __post_init__(self):
        for key in TOP_LEVEL:
            if not isinstance(getattr(self, key), str):
                raise SettingsError(f"config: {key} must be a string, got {getattr(self, key)!r}")
        problem = valid_name(self.name)
        if problem:
            raise SettingsError(f"config: name {problem}, got {self.name!r}")
        if not self.solver.metrics:
            raise SettingsError("solver.metrics: an experiment records the NC metrics of every level (its table and "
                                "figure need them); leave it true, or call nclab.ufm.solve directly")
        if self.frame is not None and self.frame not in FRAMES:
            raise SettingsError(f"config: expect.frame must be one of {', '.join(FRAMES)}, got {self.frame!r}")

    @property
    def expected_frame(self) -> str:
        """"of" for the bias-free MSE models, "etf" with a bias or cross-entropy, unless set."""
        if self.frame:
            return self.frame
        return "of" if self.model.loss == "mse" and self.model.bias == "none" else "etf"

    @property
    def display_title(self) -> str:
        return self.title or self.name

    def replace(self, **changes) -> "UFMRun":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in TOP_LEVEL if getattr(self, k)}
        out |= {"model": self.model.to_dict(), "solver": self.solver.to_dict()}
        if self.frame:
            out["expect"] = {"frame": self.frame}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "UFMRun":
        for key in data:
            if key not in TOP_LEVEL + SECTIONS:
                close = difflib.get_close_matches(str(key), TOP_LEVEL + SECTIONS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(TOP_LEVEL + SECTIONS)}"
                raise SettingsError(f"config: unknown key {key!r}{hint}")
        if "model" not in data:
            raise SettingsError("config: missing table [model] (K, n, dims, lams)")
        for section in SECTIONS:
            if section in data and not isinstance(data[section], dict):
                raise SettingsError(f"config: {section} must be a table [{section}], got {data[section]!r}")
        for key in UFM.field_names()[:4]:
            if key not in data["model"]:
                raise SettingsError(f"config: missing required key model.{key}")
        expect = data.get("expect", {})
        if not isinstance(expect, dict) or set(expect) - {"frame"}:
            raise SettingsError("config: [expect] may only hold frame = \"of\" or \"etf\"")
        return cls(model=UFM.from_dict(data["model"]), solver=GD.from_dict(data.get("solver", {})),
                   frame=expect.get("frame"), **{k: data[k] for k in TOP_LEVEL if k in data})

    def dumps(self) -> str:
        """TOML text (reads back equal through :func:`loads`)."""
        return toml_text(self.to_dict())


def loads(text: str, source: str = "CONFIG") -> UFMRun:
    try:
        return UFMRun.from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: not valid TOML ({exc})") from None


def load(path) -> UFMRun:
    """Read and validate a TOML config; one-line ValueErrors for unreadable files and bad keys."""
    return UFMRun.from_dict(read_toml(path, "CONFIG"))


def builtin(name: str) -> UFMRun:
    """A named paper config shipped with nclab (see :func:`builtin_names`)."""
    path = CONFIG_DIR / f"{name}.toml"
    if not path.is_file():
        close = difflib.get_close_matches(name, builtin_names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"NAME: unknown experiment {name!r}{hint} (choose from {', '.join(builtin_names())})")
    return load(path)


def builtin_names() -> list[str]:
    found = {p.stem for p in CONFIG_DIR.glob("*.toml")}
    return [n for n in PAPER_ORDER if n in found] + sorted(found - set(PAPER_ORDER))


def apply_overrides(run: UFMRun, assignments: list[str]) -> UFMRun:
    """Apply ``section.key=value`` strings (values in TOML syntax; a bare word is a string)."""
    data = run.to_dict()
    for item in assignments or []:
        if "=" not in item:
            raise ValueError(f"--set: expected section.key=value, got {item!r}")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        if len(parts) == 1 and parts[0] in TOP_LEVEL:
            data[parts[0]] = value if isinstance(value, str) else text
        elif len(parts) == 2 and parts[0] in SECTIONS:
            data.setdefault(parts[0], {})[parts[1]] = value
        else:
            known = [*TOP_LEVEL, *(f"model.{k}" for k in UFM.field_names()),
                     *(f"solver.{k}" for k in GD.field_names()), "expect.frame"]
            close = difflib.get_close_matches(dotted.strip(), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"--set: unknown key {dotted.strip()!r}{hint} (a key is section.key with a section in "
                             f"{', '.join(SECTIONS)}, or one of {', '.join(TOP_LEVEL)})")
    try:
        return UFMRun.from_dict(data)
    except SettingsError as exc:
        raise ValueError(f"--set: {exc}") from None
