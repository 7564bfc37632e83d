"""Input checking and conversion at the public boundary.

Every public function of nclab accepts numpy arrays or torch tensors (any device) and
turns them into float64 torch tensors here, with one clear error per kind of bad input.
"""
from __future__ import annotations

import math
import numbers
import os

import numpy as np
import torch

Array = "np.ndarray | torch.Tensor"

EPS64 = float(np.finfo(np.float64).eps)


class DegenerateError(ValueError):
    """A metric is undefined for this input (e.g. all class means coincide)."""


def to_tensor(x, name: str, *, device=None) -> torch.Tensor:
    """Return ``x`` as a torch tensor (no copy when it already is one), or raise TypeError."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name}: got a numpy array of Python objects; pass a numeric array")
        if x.dtype.kind not in "biufc":
            raise TypeError(f"{name}: numpy dtype {x.dtype} is not numeric; pass numbers (e.g. float32/float64)")
        if not x.dtype.isnative:  # big-endian data, e.g. from another machine's file
            x = x.astype(x.dtype.newbyteorder("="))
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, (list, tuple)):
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name}: could not read as a numeric array ({exc})") from None
    else:
        raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(x).__name__}")
    if device is not None:
        t = t.to(device)
    return t


def as_real(x, name: str, *, ndim: int | tuple[int, ...], device=None, check_finite: bool = True) -> torch.Tensor:
    """Floating tensor of the given rank with only finite values, else a clear error.

    Floating inputs keep their dtype (kernels convert chunks to float64 as they go, so
    a large float32 array is never copied whole); integer inputs become float64.
    ``check_finite=False`` leaves the NaN/Inf test to the caller (who may fold it into
    a pass it makes anyway).
    """
    t = to_tensor(x, name, device=device)
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in _INT_DTYPES):
        raise TypeError(f"{name}: expected real numbers, got dtype {t.dtype}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if t.ndim not in ndims:
        want = " or ".join(f"{k}-D" for k in ndims)
        raise ValueError(f"{name}: expected a {want} array, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if check_finite and not all_finite(t):
        raise ValueError(f"{name}: contains NaN or Inf; remove or fix those entries first")
    return t


def all_finite(t: torch.Tensor) -> bool:
    """True when every entry is finite.

    A float64 sum is finite exactly when every entry is (NaN and Inf propagate, and
    float32/16 values cannot overflow it); only when it is not (or for float64 input
    whose sum may overflow) is the elementwise check run. Twice as fast on large arrays.
    """
    if t.numel() == 0:
        return True
    if math.isfinite(float(t.sum(dtype=torch.float64))):
        return True
    return bool(torch.isfinite(t).all())


def max_abs(t: torch.Tensor) -> float:
    """max_i |t_i| as a float (NaN when an entry is NaN, 0 for an empty tensor).

    One pass, no temporary: ``aminmax`` costs about what ``t.sum()`` does.
    """
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t)
    return float(torch.maximum(-lo, hi))


def check_rtol(rtol) -> float:
    """The relative eigenvalue cut-off as a float with eps <= rtol < 1, else a clear error.

    Below float64's eps (2.2e-16) a cut-off cannot tell a zero eigenvalue of the K x K
    Gram from its rounding error (~K·eps·max λ), so NC1 would count noise.
    """
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real):
        raise TypeError(f"rtol: expected a real number, got {type(rtol).__name__}; the default is 1e-10")
    if not EPS64 <= rtol < 1:  # NaN fails too
        raise ValueError(f"rtol: the relative eigenvalue cut-off must satisfy {EPS64:.3g} (float64 eps) "
                         f"<= rtol < 1, got {rtol!r}; the default is 1e-10")
    return float(rtol)


def total_memory(device=None) -> int:
    """Bytes of memory of ``device``: the GPU's, or this machine's RAM (1 TiB if unknown)."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return 1 << 40


def check_fits(nbytes: int, name: str, what: str, device=None) -> None:
    """Raise ValueError naming ``name`` when ``nbytes`` exceed the memory of ``device``."""
    have = total_memory(device)
    if nbytes > have:
        raise ValueError(f"{name}: {what} need about {_gib(nbytes)} of memory, more than the "
                         f"{_gib(have)} this machine has; use fewer classes or a smaller dimension")


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def as_float64(x, name: str, *, ndim: int | tuple[int, ...], device=None) -> torch.Tensor:
    """Like :func:`as_real`, converted to float64."""
    return as_real(x, name, ndim=ndim, device=device).to(torch.float64)


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def as_labels(labels, n: int, *, num_classes: int | None = None, device=None) -> tuple[torch.Tensor, int]:
    """Integer labels (n,) in 0..K-1 with every class present; returns (labels, K)."""
    y = to_tensor(labels, "labels", device=device)
    if y.dtype not in _INT_DTYPES:
        raise TypeError(
            f"labels: expected integer class indices, got dtype {y.dtype}; "
            "convert with labels.astype(int) / labels.long()"
        )
    if y.ndim != 1:
        raise ValueError(f"labels: expected shape (N,), got {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"labels: has {y.shape[0]} entries but features has {n} rows; they must match")
    if n == 0:
        raise ValueError("features: no samples")
    y = y.long()
    lo, hi = int(y.min()), int(y.max())
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
                                    or num_classes < 1):
        raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        K = hi + 1 if num_classes is None else num_classes
        raise ValueError(f"labels: values must lie in 0..{K - 1}, found range {lo}..{hi}")
    # every class needs a sample, so K <= N: checked before bincount allocates K counts
    if num_classes is None and hi >= n:
        raise ValueError(
            f"labels: the largest label {hi} means K = {hi + 1} classes, but there are only "
            f"N = {n} samples and every class needs one; relabel to 0..K-1 without gaps "
            "(e.g. np.unique(labels, return_inverse=True)[1])")
    if num_classes is not None and num_classes > n:
        raise ValueError(f"num_classes: {num_classes} classes need at least {num_classes} samples "
                         f"(every class must occur), but there are N = {n}")
    num_classes = hi + 1 if num_classes is None else int(num_classes)
    if num_classes < 2:
        raise ValueError("labels: need at least 2 classes to measure collapse")
    counts = torch.bincount(y, minlength=num_classes)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(
            f"labels: class(es) {empty[:10]} have no samples; relabel to 0..K-1 without gaps "
            "or drop those classes"
        )
    return y, int(num_classes)


def check_classifier(weights, bias, K: int, d: int, *, device=None):
    """Validate W (K, d) and b (K,); returns float64 tensors (bias may be None)."""
    W = as_float64(weights, "weights", ndim=2, device=device)
    if W.shape != (K, d):
        raise ValueError(
            f"weights: expected shape (K, d) = ({K}, {d}) to match labels and features, "
            f"got {tuple(W.shape)}"
        )
    b = None
    if bias is not None:
        b = as_float64(bias, "bias", ndim=1, device=device)
        if b.shape != (K,):
            raise ValueError(f"bias: expected shape (K,) = ({K},), got {tuple(b.shape)}")
    return W, b
