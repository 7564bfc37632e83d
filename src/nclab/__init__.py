"""nclab: a laboratory for neural collapse.

Exact unconstrained-features models (UFM) and their theory, collapse metrics for
features from any model, and the experiments of Tirer & Bruna (ICML 2022).

The exports below are imported on first use (PEP 562), so that ``import nclab`` and the
``nclab`` command's parsing, help and theory do not load torch.
"""
import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it (none of these names is also a submodule of
#: nclab: the import system would replace such an attribute with the module once imported)
_WHERE = {
    "ClassStats": "stats",
    "DegenerateError": "_validate",
    "NC4Counter": "stats",
    "class_means": "metrics",
    "collapsed_configuration": "frames",
    "measure": "metrics",
    "orthogonal_frame": "frames",
    "simplex_etf": "frames",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"nclab.{_WHERE[name]}"), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module 'nclab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
