"""Exports imported on first use (PEP 562), so that light imports stay light."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, where: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``: name ``n`` comes from ``package.where[n]``.

    The first look-up imports the submodule and stores the value in the package, so later
    look-ups are plain attribute reads.
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name):
        if name in where:
            value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
