"""nclab: a laboratory for neural collapse.

Exact unconstrained-features models (UFM) and their theory, collapse metrics for
features from any model, and the experiments of Tirer & Bruna (ICML 2022).

The exports below are imported on first use (PEP 562), so that ``import nclab`` and the
``nclab`` command's parsing, help and theory do not load torch.
"""
from nclab._lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> the module that defines it (none of these names is also a submodule of
#: nclab: the import system would replace such an attribute with the module once imported)
_WHERE = {
    "ClassStats": "stats",
    "CollapseMonitor": "monitor",
    "DegenerateError": "_validate",
    "NC4Counter": "stats",
    "class_means": "metrics",
    "collapsed_configuration": "frames",
    "measure": "metrics",
    "orthogonal_frame": "frames",
    "per_class": "metrics",
    "simplex_etf": "frames",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
