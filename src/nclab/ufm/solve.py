"""The batched plain-GD solver with theory and collapse metrics at every logged step."""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from nclab import theory
from nclab.metrics import collapse_metrics_t
from nclab.threads import SMALL_WORK, cpu_threads
from nclab.ufm.engine import NumpyOps, Program, TorchOps, as_float, initial_parameters, smoothness_estimate
from nclab.ufm.gd import GD
from nclab.ufm.model import UFM

#: problems with N · width below this step fastest on numpy at any batch size (see _pick_backend)
SMALL_PROBLEM = 1 << 14

#: metrics recorded for every feature level (keys of nclab.metrics.collapse_metrics_t)
LEVEL_METRICS = ("nc1", "nc1_trace", "cdnv", "nc2_etf", "nc2_of", "nc3_etf", "nc3_of",
                 "nc3_duality_etf", "nc3_duality_of")


class DivergenceError(ValueError):
    """Gradient descent diverged (NaN/Inf or a million-fold growth of the objective).

    A ValueError: the step size (or λ, or the initialisation) is a bad input.
    ``suggested_lr`` is a step size that ran stably from the same start, or None.
    """

    def __init__(self, message: str, suggested_lr: float | None = None):
        super().__init__(message)
        self.suggested_lr = suggested_lr


def optimal_objective(model: UFM, lams=None, *, strict: bool = True) -> float | None:
    """The exact global minimum f* when docs/theory.md §3 knows it, else None.

    Known: MSE without bias or with an unregularised bias, any depth with σ = identity,
    and the extended (L = 2) ReLU model (same value as linear, §3.4), for balanced
    classes; any class sizes for the linear models. With some λ = 0 the infimum is 0
    (not always attained). Deeper ReLU models and cross-entropy have no closed form: None.
    The theorems need every width >= K (K - 1 with a bias): narrower models raise a
    ValueError naming the width, or give None with ``strict=False`` (as :func:`solve` does).
    """
    lams = tuple(model.lams if lams is None else lams)
    if model.loss != "mse" or model.bias == "reg":
        return None
    if model.activation == "relu" and model.L > 2:
        return None
    try:
        model.check_theorem_width()
    except ValueError:
        if strict:
            raise
        return None
    if min(lams) == 0:
        return 0.0
    bias = model.bias == "free"
    if model.balanced:
        return theory.f_star(model.K, model.class_counts[0], lams, bias=bias)
    if model.activation == "relu" and model.L > 1:
        return None
    return theory.f_star_imbalanced(model.class_counts, lams, bias=bias)


def suggest_lr(model: UFM, settings: GD | None = None, *, seeds=None, lams=None, init_std=None) -> float:
    """A step size that GD runs stably from these problems' initial points.

    ``settings.lr`` itself when a check run of :data:`CHECK_STEPS` iterations (at most
    ``settings.steps``) from the same start does not diverge; else the largest of 1/L,
    1/(2L), ... (L the largest Hessian eigenvalue at the start,
    :func:`nclab.ufm.smoothness_estimate`) for which that check run is stable. The check
    runs on the CPU in float64 without metrics.
    """
    settings = settings or GD()
    B, seeds, lam_arr, std = _broadcast_batch(model, settings, seeds, lams, init_std, None)
    P0 = initial_parameters(model, seeds, std)
    if _runs_stably(model, settings, lam_arr, P0, settings.lr):
        return settings.lr
    return _verified_lr(model, settings, lam_arr, P0)


#: iterations of the check run behind every suggested step size
CHECK_STEPS = 5000


def _runs_stably(model, settings: GD, lam_arr, P0, lr: float) -> bool:
    """Whether ``CHECK_STEPS`` GD iterations (at most settings.steps) from P0 stay finite."""
    check = settings.replace(steps=max(1, min(CHECK_STEPS, settings.steps)), lr=lr, momentum=settings.momentum,
                             metrics=False, log_every=CHECK_STEPS, tol=None, device="cpu", backend="numpy",
                             dtype="float64")
    try:
        _solve(model, check, P0, lam_arr, np.zeros(len(lam_arr), dtype=np.int64), None, None)
    except _Diverged:
        return False
    return True


def _verified_lr(model, settings: GD, lam_arr, P0) -> float | None:
    """The largest of 1/L, 1/(2L), ... (at most settings.lr / 2) that a check run shows stable."""
    prog = Program(model, lam_arr, NumpyOps, np.float64)
    P = {k: np.array(v, dtype=np.float64) for k, v in P0.items()}
    with np.errstate(all="ignore"):  # an estimate at an extreme point may overflow: it is advice only
        est = smoothness_estimate(prog, P)
    lr = settings.lr / 2
    if np.isfinite(est).all() and est.max() > 0:
        lr = min(lr, float(1.0 / est.max()))
    for _ in range(40):
        lr = _three_digits_down(lr)  # the value printed is the value checked
        if _runs_stably(model, settings, lam_arr, P0, lr):
            return lr
        lr /= 2
    return None


def _three_digits_down(x: float) -> float:
    """x rounded down to 3 significant digits (x > 0)."""
    unit = 10.0 ** (math.floor(math.log10(x)) - 2)
    return math.floor(x / unit) * unit


@dataclass
class Result:
    """What :func:`solve` returns.

    Attributes:
        model: the UFM; lams: (B, L+1) λ of each problem (H1 first); seeds: (B,).
        f_star: (B,) exact optimum or NaN where unknown.
        history: "iteration" (T,) and, for every other key, (T, B) arrays: objective,
            fit, reg, gap (objective - f*), and "<level>.<metric>" for level H1..HL.
        params: final parameters, float64 numpy arrays with leading axis B.
        iterations: iterations run; seconds: wall time of the loop; stopped_early: bool.
        settings: the :class:`GD` settings of the run; init_std: (B,) initialisation
            scales; backend: "numpy" or "torch".
    """

    model: UFM
    lams: np.ndarray
    seeds: np.ndarray
    f_star: np.ndarray
    history: dict[str, np.ndarray]
    params: dict[str, np.ndarray]
    iterations: int
    seconds: float
    stopped_early: bool = False
    settings: GD = field(default_factory=GD)
    init_std: np.ndarray | None = None
    backend: str = "numpy"

    def program(self) -> Program:
        """A float64 numpy :class:`Program` of these problems, e.g. to evaluate ``params``."""
        return Program(self.model, self.lams, NumpyOps, np.float64)

    def final(self, key: str) -> np.ndarray:
        """Last logged value of ``key`` for every problem, shape (B,)."""
        return self.history[key][-1]

    def rows(self, problem: int = 0) -> list[dict]:
        """The history of one problem as a list of dicts (one per logged iteration)."""
        keys = [k for k in self.history if k != "iteration"]
        return [{"iteration": int(it), **{k: float(self.history[k][t, problem]) for k in keys}}
                for t, it in enumerate(self.history["iteration"])]


def solve(model: UFM, settings: GD | None = None, *, seeds=None, lams=None, init_std=None, init: dict | None = None,
          progress=None) -> Result:
    """Plain full-batch gradient descent on B independent problems at once.

    Args:
        model: the UFM (structure, and λ unless ``lams`` is given).
        settings: how to run (:class:`nclab.ufm.GD`: steps, lr, momentum, seed, restarts,
            init_std, dtype, device, backend, log_every, tol, threads, metrics);
            default ``GD()``.
        seeds: one initialisation seed per problem (default: settings.seed, +1, ... for B
            problems); lams: (B, L+1) per-problem λ, H1 first; init_std: per-problem
            initialisation std (B,); init: given initial parameters instead (dict of
            arrays, leading axis B or none). B is the common length of these (and of
            settings.restarts); a length of 1 broadcasts.
        progress: None/False, True (a tqdm bar), or a callable(iteration, recorder).
    Raises:
        ValueError for bad arguments; DivergenceError when the run diverges, naming η
        and a step size that a check run from the same start showed to be stable.
    """
    settings = settings or GD()
    if not isinstance(settings, GD):
        raise TypeError(f"settings: expected nclab.ufm.GD, got {type(settings).__name__}")
    if init is not None:
        _check_init(model, init)
    B, seeds, lam_arr, init_std = _broadcast_batch(model, settings, seeds, lams, init_std, init)
    P0 = init if init is not None else initial_parameters(model, seeds, init_std)
    try:
        return _solve(model, settings, P0, lam_arr, seeds, init_std, progress)
    except _Diverged as exc:
        advice = _verified_lr(model, settings, lam_arr[exc.problems], {k: _rows(v, exc.problems) for k, v in P0.items()})
        raise DivergenceError(exc.message(settings.lr, advice), advice) from None


def _rows(v, problems):
    v = as_float(v)
    return v[problems] if v.ndim == 3 and v.shape[0] > 1 else v


def _solve(model, settings: GD, P0, lam_arr, seeds, init_std, progress) -> Result:
    """:func:`solve` after its checks; raises _Diverged."""
    B = len(lam_arr)
    ops = _pick_backend(settings.backend, settings.device, B, model.N * max(model.dims + (model.K,)))
    np_dtype, t_dtype = np.dtype(settings.dtype), getattr(torch, settings.dtype)
    prog = Program(model, lam_arr, ops, np_dtype if ops is NumpyOps else t_dtype, settings.device)
    P = {k: _to_backend(v, B, ops, np_dtype, t_dtype, settings.device) for k, v in P0.items()}
    f_star = np.array([_nan_if_none(optimal_objective(model, row, strict=False)) for row in lam_arr])
    y = torch.as_tensor(model.labels(), device=settings.device if ops is TorchOps else "cpu")
    small = settings.device == "cpu" and B * model.N * max(model.dims + (model.K,)) < SMALL_WORK
    # tiny tensors: 1 thread never stalls on a busy machine; overflow is detected and reported below
    with cpu_threads(1 if small else None), np.errstate(over="ignore", invalid="ignore"):
        return _gd_loop(model, prog, P, f_star, y, lam_arr, seeds, init_std, settings, progress, ops.name)


def _gd_loop(model, prog, P, f_star, y, lam_arr, seeds, init_std, settings: GD, progress, backend) -> Result:
    """The iterations of :func:`solve` (arguments validated there)."""
    steps, log_every = settings.steps, settings.log_every
    recorder = _Recorder(prog, f_star, y, settings.metrics)
    stepper = _Stepper(prog, P, settings.lr, settings.momentum, settings.threads or _usable_cores())
    bar = _progress_bar(progress, steps)
    start, stopped, it = time.perf_counter(), False, 0
    first = recorder.log(0, P)
    initial_objective = np.maximum(first, 1e-300)
    _check_finite(first, initial_objective, 0)
    try:
        while it < steps:
            n = min(log_every - it % log_every, CHECK_EVERY - it % CHECK_EVERY, steps - it)
            stepper.run(n)
            it += n
            if it % log_every == 0 or it == steps:
                obj = recorder.log(it, P)
                _check_finite(obj, initial_objective, it)
                _report(bar, progress, it, recorder)
                if settings.tol is not None and _converged(obj, f_star, settings.tol):
                    stopped = it < steps
                    break
            else:
                fit, reg = prog.objective(P)
                _check_finite(as_float(fit + reg), initial_objective, it)
    finally:
        stepper.close()
        if bar is not None:
            bar.close()
    return Result(model=model, lams=lam_arr, seeds=np.asarray(seeds), f_star=f_star,
                  history=recorder.history(), params={k: as_float(v) for k, v in P.items()},
                  iterations=it, seconds=time.perf_counter() - start, stopped_early=stopped,
                  settings=settings, init_std=np.asarray(init_std), backend=backend)


#: iterations between divergence tests when no log falls in between
CHECK_EVERY = 100


class _Stepper:
    """Runs GD steps on the parameters P (in place) of a batch of independent problems.

    Plain GD on the numpy backend splits the batch into shards of up to SHARD_SIZE
    problems (views into P) that step in ``threads`` threads: numpy releases the GIL
    inside its calls, and a shard of small problems stays in cache. Every problem's
    arithmetic is the same as in one unsplit batch, so the results are identical.
    Heavy ball (momentum > 0) runs :meth:`Program.gradients` on the whole batch.
    """

    #: problems per shard: large enough that numpy work outweighs the Python work done
    #: with the GIL held, small enough to stay in cache (fig4 float32, 2 cores: 64
    #: problems ran 57k problem-it/s unsplit, 113k as two shards of 32 in 2 threads)
    SHARD_SIZE = 32

    def __init__(self, prog: Program, P: dict, lr: float, momentum: float, threads: int):
        self.prog, self.P, self.lr, self.momentum = prog, P, lr, momentum
        self.V = {k: v * 0 for k, v in P.items()} if momentum else None
        self.shards = [(prog, P)]
        if not momentum and prog.ops is NumpyOps and threads > 1 and prog.B >= 16:
            size = min(self.SHARD_SIZE, -(-prog.B // threads))
            self.shards = [self._shard(slice(i, i + size)) for i in range(0, prog.B, size)]
        self.pool = ThreadPoolExecutor(min(threads, len(self.shards))) if len(self.shards) > 1 else None

    def _shard(self, rows: slice):
        p = self.prog
        sub = Program(p.model, p.lams[rows], NumpyOps, p.dtype, lam_b=p.lam_b_values[rows])
        return sub, {k: v[rows] for k, v in self.P.items()}

    def run(self, n: int) -> None:
        """``n`` iterations on every problem."""
        if self.V is not None:
            for _ in range(n):
                G = self.prog.gradients(self.P)
                for k in self.P:
                    self.V[k] = self.momentum * self.V[k] + G[k]
                    self.P[k] = self.P[k] - self.lr * self.V[k]
        elif self.pool is None:
            self._steps(self.shards[0], n)
        else:
            list(self.pool.map(lambda shard: self._steps(shard, n), self.shards))

    def _steps(self, shard, n: int) -> None:
        prog, P = shard
        with np.errstate(over="ignore", invalid="ignore"):  # errstate is per thread
            for _ in range(n):
                prog.step(P, self.lr)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- recording
class _Recorder:
    """Collects objective, gap and per-level metrics at logged iterations."""

    def __init__(self, prog: Program, f_star: np.ndarray, y: torch.Tensor, metrics: bool):
        self.prog, self.f_star, self.y, self.metrics = prog, f_star, y, metrics
        self.rows: dict[str, list] = {}

    def log(self, it: int, P) -> np.ndarray:
        levels, _, Z = self.prog.forward(P)
        fit, reg = as_float(self.prog.fit_and_residual(Z)[0]), as_float(self.prog.regulariser(P))
        obj = fit + reg
        self._add("iteration", it)
        self._add("objective", obj)
        self._add("fit", fit)
        self._add("reg", reg)
        self._add("gap", obj - self.f_star)
        if self.metrics and np.isfinite(obj).all():
            self._level_metrics(levels, P)
        return obj

    @torch.inference_mode()  # no autograd bookkeeping: ~20% less per-op cost on small problems
    def _level_metrics(self, levels, P):
        """NC metrics of every level; levels of equal width share one batched kernel call."""
        ops, model = self.prog.ops, self.prog.model
        maps = self.prog.maps_to_output(P)
        b = ops.to_torch(P["b"])[:, 0, :].double() if model.has_bias else None
        by_width: dict[int, list[int]] = {}
        for l, H in enumerate(levels):
            by_width.setdefault(H.shape[-1], []).append(l)
        for group in by_width.values():
            H = torch.cat([ops.to_torch(levels[l]).to(torch.float64) for l in group])  # float64 once
            W = torch.cat([ops.to_torch(maps[l]) for l in group]).double()
            bias = None if b is None else b.repeat(len(group), 1)  # used by nc4, kept for the last level only
            vals = collapse_metrics_t(H, self.y, model.K, W, bias)
            keys = LEVEL_METRICS + ("nc4",)
            table = as_float(torch.stack([vals[key] for key in keys]))  # one copy to numpy: (keys, levels·B)
            for j, l in enumerate(group):
                last = l == model.L - 1
                rows = slice(j * self.prog.B, (j + 1) * self.prog.B)
                for i, key in enumerate(keys if last else LEVEL_METRICS):
                    self._add(f"H{l + 1}.{key}", table[i, rows])

    def _add(self, key, value):
        self.rows.setdefault(key, []).append(value)

    def history(self) -> dict[str, np.ndarray]:
        n = len(self.rows["iteration"])
        out = {"iteration": np.asarray(self.rows["iteration"])}
        for k, v in self.rows.items():
            if k != "iteration":
                arr = np.asarray(v, dtype=np.float64)
                if len(arr) < n:  # metrics skipped at a non-finite step: pad with NaN
                    arr = np.concatenate([np.full((n - len(arr), arr.shape[1]), np.nan), arr])
                out[k] = arr
        return out


# ----------------------------------------------------------------------------- helpers
def _broadcast_batch(model, settings: GD, seeds, lams, init_std, init):
    """(B, seeds (B,), λ (B, L+1), init std (B,)) from per-problem overrides and the settings."""
    lam_arr = np.atleast_2d(np.asarray(model.lams if lams is None else lams, dtype=np.float64))
    if lam_arr.ndim != 2 or lam_arr.shape[1] != model.L + 1:
        raise ValueError(f"lams: expected rows of {model.L + 1} values (H1 first), got shape {lam_arr.shape}")
    if (lam_arr < 0).any() or not np.isfinite(lam_arr).all():
        raise ValueError("lams: every λ must be finite and >= 0")
    std = np.atleast_1d(np.asarray(settings.init_std if init_std is None else init_std, dtype=np.float64))
    if std.ndim != 1 or not np.isfinite(std).all() or (std < 0).any():
        raise ValueError(f"init_std: expected finite values >= 0, got {init_std}")
    sizes = {settings.restarts, len(lam_arr), len(std)}
    if seeds is not None:
        seeds = np.atleast_1d(np.asarray(seeds))
        if seeds.ndim != 1 or len(seeds) == 0 or not np.issubdtype(seeds.dtype, np.integer):
            raise ValueError(f"seeds: expected a non-empty list of integers, got {seeds.tolist()!r}")
        sizes.add(len(seeds))
    if init is not None:
        h = init["H1"]
        sizes.add(h.shape[0] if h.ndim == 3 else 1)
    sizes.discard(1)
    if len(sizes) > 1:
        raise ValueError(f"seeds/lams/init_std/init/restarts: batch sizes {sorted(sizes)} disagree; give one B or 1")
    B = sizes.pop() if sizes else 1
    if seeds is None:
        seeds = settings.seed + np.arange(B)
    return (B, np.broadcast_to(seeds.astype(np.int64), (B,)).copy(),
            np.broadcast_to(lam_arr, (B, model.L + 1)).copy(), np.broadcast_to(std, (B,)).copy())


def _pick_backend(backend, device, B: int, work: int):
    """numpy on the CPU for small problems (lower per-call overhead; a batch steps in
    shards on several threads), torch for large ones (fused, multi-threaded matmuls) and
    on CUDA. ``work`` = N · the widest level of one problem. Measured on 2 cores, problem-
    iterations/s numpy vs torch: fig4 (work 4,000) B = 1024 float32 74k vs 56k; plain
    K = 10, n = 100, d = 64 (work 64,000) B = 64 float32 7k vs 27k."""
    if backend == "numpy":
        return NumpyOps
    if backend == "torch" or str(device).startswith("cuda"):
        return TorchOps
    return NumpyOps if B * work < SMALL_WORK or work < SMALL_PROBLEM else TorchOps


def _check_init(model: UFM, init: dict) -> None:
    """Given initial parameters must have exactly the model's factors and shapes."""
    expected = dict(model.factor_shapes())
    if model.has_bias:
        expected["b"] = (1, model.K)
    if set(init) != set(expected):
        raise ValueError(f"init: expected the keys {sorted(expected)}, got {sorted(init)}")
    for k, shape in expected.items():
        got = tuple(init[k].shape[-2:])
        if got != shape or init[k].ndim not in (2, 3):
            hint = " (N = the sum of the class sizes n)" if k == "H1" else ""
            raise ValueError(f"init: {k} must have shape {shape} or (B, {shape[0]}, {shape[1]}){hint}, "
                             f"got {tuple(init[k].shape)}")


def _to_backend(v, B, ops, np_dtype, t_dtype, device):
    t = torch.as_tensor(as_float(v))
    if t.ndim == 2:
        t = t[None]
    t = t.expand(B, *t.shape[1:]).contiguous() if t.shape[0] == 1 else t
    if ops is NumpyOps:
        return t.numpy().astype(np_dtype)
    return t.to(device=device, dtype=t_dtype)


def _nan_if_none(x):
    return np.nan if x is None else x


class _Diverged(Exception):
    """Raised inside the loop; :func:`solve` turns it into a DivergenceError with advice."""

    def __init__(self, it: int, problems: np.ndarray, non_finite: bool):
        self.it, self.problems, self.non_finite = it, problems, non_finite

    def message(self, lr: float, advice: float | None) -> str:
        what = "non-finite" if self.non_finite else "a million times larger"
        hint = (f"; try lr <= {advice:.3g} (that step ran stably from the same start over {CHECK_STEPS} iterations)"
                if advice is not None else "; no smaller step size ran stably either: check λ and init_std")
        return (f"lr: gradient descent diverged at iteration {self.it} for problem(s) "
                f"{self.problems[:8].tolist()} with lr (η) = {lr}: the objective became {what}{hint}")


def _check_finite(obj, initial, it):
    bad = ~np.isfinite(obj) | (obj > 1e6 * initial)
    if bad.any():
        raise _Diverged(it, np.flatnonzero(bad), not np.isfinite(obj).all())


def _converged(obj, f_star, tol) -> bool:
    if np.isnan(f_star).any():
        return False
    return bool((np.abs(obj - f_star) <= tol * np.maximum(np.abs(f_star), 1e-300)).all())


def _progress_bar(progress, steps):
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm(total=steps, unit="it", leave=False, mininterval=0.5)
    return None


def _report(bar, progress, it, recorder):
    if bar is not None:
        gap = recorder.rows["gap"][-1]
        bar.n = it
        bar.set_postfix_str(f"gap {np.nanmax(gap):.2e}" if np.isfinite(gap).any() else "", refresh=False)
        bar.refresh()
    elif callable(progress):
        progress(it, recorder)
