"""nclab: a laboratory for neural collapse.

Exact unconstrained-features models (UFM) and their theory, collapse metrics for
features from any model, and the experiments of Tirer & Bruna (ICML 2022).
"""
from nclab._validate import DegenerateError
from nclab.frames import collapsed_configuration, orthogonal_frame, simplex_etf
from nclab.metrics import class_means, measure
from nclab.stats import ClassStats, NC4Counter

__version__ = "0.1.0"
__all__ = [
    "ClassStats",
    "DegenerateError",
    "NC4Counter",
    "class_means",
    "collapsed_configuration",
    "measure",
    "orthogonal_frame",
    "simplex_etf",
]
