"""The unconstrained-features model family: description, objective, gradients, GD solver.

    from nclab import ufm
    model = ufm.extended(K=4, n=50, d1=20, d2=20, lam_H1=5e-3, lam_W1=5e-3, lam_W2=5e-3, relu=True)
    result = ufm.solve(model, ufm.GD(steps=20_000, lr=0.1, restarts=8))
    result.final("gap"), result.final("H2.nc1")

The names are imported on first use (PEP 562): the settings classes (:class:`GD`,
:class:`UFM`) load without torch, which only the solver needs.
"""
from nclab._lazy import lazy_exports
import sys
import types

#: public name -> the submodule that defines it
_WHERE = {
    "gradients": "engine", "initial_parameters": "engine", "objective": "engine", "smoothness_estimate": "engine",
    "GD": "gd",
    "UFM": "model", "extended": "model", "plain": "model",
    "DivergenceError": "solve", "Result": "solve", "optimal_objective": "solve", "solve": "solve",
    "suggest_lr": "solve",
    "verdict_line": "verdict", "verdicts": "verdict",  # the module nclab.ufm.verdict has verdict()
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)


class _Package(types.ModuleType):
    """Keeps ``ufm.solve`` the function: importing the submodule ``nclab.ufm.solve`` makes
    the import system set the package's attribute ``solve`` to that module; the function
    of the same name is stored instead (as the eager ``from ... import solve`` did)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{name}" \
                and _WHERE.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
