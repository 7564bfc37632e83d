"""Objective, analytic gradients and batched plain gradient descent for the UFM family.

Every array carries a leading batch axis B of independent problems (seeds, λ grids,
initialisation scales): H1 (B, N, d_1), W_l (B, d_{l+1}, d_l), b (B, 1, K). The same code
runs on numpy arrays (lowest per-call overhead: fastest for single small problems on a
CPU) or torch tensors (batched matmuls on CPU or CUDA); autograd is never used here (it is
the tests' oracle).

Gradients (R = ∂fit/∂Z: (Z - Y)/N for MSE, (softmax(Z) - Y)/N for CE; G_l = ∂fit/∂H_l):

    ∇W_L = Rᵀ H_L + λ_WL W_L,   G_L = R W_L,   ∇b = Σ_i R_i (+ λ_b b),
    for l = L-1..1:  Δ_l = G_{l+1} ⊙ σ'(A_l) with A_l = H_l W_lᵀ,
                     ∇W_l = Δ_lᵀ H_l + λ_Wl W_l,   G_l = Δ_l W_l,
    ∇H1 = G_1 + λ_H1 H1.

Plain GD (the paper's method) updates every factor at once, X ← X - η ∇X; with
momentum μ > 0 it is heavy ball, V ← μV + ∇X, X ← X - ηV.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.linalg import blas

from nclab.ufm.model import UFM


# ----------------------------------------------------------------------------- backends
class NumpyOps:
    """The handful of array operations the engine needs, for numpy."""

    name = "numpy"

    @staticmethod
    def relu(x):
        return np.maximum(x, 0.0)

    # the library's own functions (each takes out=): the step plan binds them directly
    matmul, greater, multiply, subtract = np.matmul, np.greater, np.multiply, np.subtract

    @staticmethod
    def empty(shape, dtype, device):
        return np.empty(shape, dtype=dtype)

    @staticmethod
    def sumsq(x):
        """Σ x² over the last two axes, shape (B,)."""
        return np.einsum("bij,bij->b", x, x)

    @staticmethod
    def softmax_and_logsumexp(Z):
        zmax = Z.max(axis=-1, keepdims=True)
        E = np.exp(Z - zmax)
        s = E.sum(axis=-1, keepdims=True)
        return E / s, (np.log(s) + zmax)[..., 0]

    @staticmethod
    def sum_rows(x):
        """Σ over the sample axis, keeping it: (B, N, K) -> (B, 1, K)."""
        return x.sum(axis=-2, keepdims=True)

    @staticmethod
    def to_torch(x):
        return torch.from_numpy(x)



class TorchOps:
    """The same operations for torch tensors (CPU or CUDA)."""

    name = "torch"

    @staticmethod
    def relu(x):
        return torch.clamp_min(x, 0.0)

    matmul, greater, multiply, subtract = torch.matmul, torch.gt, torch.mul, torch.sub

    @staticmethod
    def empty(shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device)

    @staticmethod
    def sumsq(x):
        return x.square().sum(dim=(-2, -1))

    @staticmethod
    def softmax_and_logsumexp(Z):
        lse = torch.logsumexp(Z, dim=-1)
        return torch.exp(Z - lse[..., None]), lse

    @staticmethod
    def sum_rows(x):
        return x.sum(dim=-2, keepdim=True)

    @staticmethod
    def to_torch(x):
        return x



# ----------------------------------------------------------------------------- the program
class Program:
    """Objective and gradients of one UFM for B problems on one backend.

    Args:
        model: the UFM. lams: (B, L+1) array of λ per problem (H1 first).
        ops: :class:`NumpyOps` or :class:`TorchOps`; dtype/device: the arrays' dtype
        (numpy dtype or torch dtype) and torch device.
    """

    def __init__(self, model: UFM, lams, ops, dtype, device=None, lam_b=None):
        self.model, self.ops, self.dtype, self.device = model, ops, dtype, device
        lams = np.array(lams, dtype=np.float64).reshape(-1, model.L + 1)
        self.lams = lams  # (B, L+1), float64 numpy: what the program was built from
        self.B = lams.shape[0]
        self.names = list(model.factor_shapes())
        self.lam = {name: self._array(lams[:, i].reshape(-1, 1, 1)) for i, name in enumerate(self.names)}
        self.lam_b_values = np.broadcast_to(np.asarray(model.lam_b if lam_b is None else lam_b, dtype=np.float64),
                                            (self.B,)).copy()
        self.lam_b = self._array(self.lam_b_values.reshape(-1, 1, 1))
        Y = np.zeros((1, model.N, model.K))
        Y[0, np.arange(model.N), model.labels()] = 1.0
        self.Y = self._array(Y)
        self.inv_N = 1.0 / model.N

    def _array(self, a: np.ndarray):
        if self.ops is NumpyOps:
            return np.asarray(a, dtype=self.dtype)
        return torch.as_tensor(a, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ forward
    def forward(self, P):
        """Feature levels [H_1..H_L] (B, N, d_l), pre-activations [A_1..A_{L-1}], output Z (B, N, K)."""
        L, relu = self.model.L, self.model.activation == "relu"
        levels, pre = [P["H1"]], []
        for l in range(1, L):
            A = levels[-1] @ P[f"W{l}"].mT
            pre.append(A)
            levels.append(self.ops.relu(A) if relu else A)
        Z = levels[-1] @ P[f"W{L}"].mT
        if self.model.has_bias:
            Z = Z + P["b"]
        return levels, pre, Z

    def fit_and_residual(self, Z):
        """fit (B,) and R = ∂fit/∂Z (B, N, K)."""
        if self.model.loss == "mse":
            D = Z - self.Y
            return 0.5 * self.inv_N * self.ops.sumsq(D), D * self.inv_N
        S, lse = self.ops.softmax_and_logsumexp(Z)
        correct = (Z * self.Y).sum(-1)
        return (lse - correct).sum(-1) * self.inv_N, (S - self.Y) * self.inv_N

    def regulariser(self, P):
        """Σ_i λ_i/2 ‖A_i‖² (+ λ_b/2 ‖b‖²), shape (B,)."""
        reg = sum(0.5 * self.lam[k][:, 0, 0] * self.ops.sumsq(P[k]) for k in self.names)
        if self.model.bias == "reg":
            reg = reg + 0.5 * self.lam_b[:, 0, 0] * self.ops.sumsq(P["b"])
        return reg

    def objective(self, P):
        """(fit, reg), each (B,)."""
        fit, _ = self.fit_and_residual(self.forward(P)[2])
        return fit, self.regulariser(P)

    # ------------------------------------------------------------------ backward
    def gradients(self, P) -> dict:
        """∇ of the full objective for every parameter (see the module docstring)."""
        L, relu = self.model.L, self.model.activation == "relu"
        levels, pre, Z = self.forward(P)
        _, R = self.fit_and_residual(Z)
        grads = {}
        if self.model.has_bias:
            grads["b"] = self.ops.sum_rows(R)
            if self.model.bias == "reg":
                grads["b"] = grads["b"] + self.lam_b * P["b"]
        G = R
        for l in range(L, 0, -1):
            W = P[f"W{l}"]
            if l < L and relu:
                G = G * (pre[l - 1] > 0)
            grads[f"W{l}"] = G.mT @ levels[l - 1] + self.lam[f"W{l}"] * W
            G = G @ W
        grads["H1"] = G + self.lam["H1"] * P["H1"]
        return grads

    # ------------------------------------------------------------------ one GD step
    def step(self, P, lr: float) -> None:
        """One plain GD step in place, X ← X - η ∇X, for every factor at once.

        The same arithmetic as :meth:`gradients`, with the step size folded into the
        residual (R' = ηR) and the weight decay into the update (X ← (1 - ηλ)X - ηG).
        The step is a fixed list of array calls on preallocated buffers, built once per
        (parameters, η) by :meth:`_plan`: small problems are bound by the number of calls
        and the Python work between them, not by arithmetic.
        """
        for call in self._plan(P, lr):
            call()

    def _plan(self, P, lr: float) -> list:
        """The calls of one step (zero-argument callables), cached for these arrays and η."""
        key = (lr, tuple(id(v) for v in P.values()))
        if getattr(self, "_plan_key", None) != key:
            self._plan_calls, self._plan_key = self._build_plan(P, lr), key
        return self._plan_calls

    def _build_plan(self, P, lr: float) -> list:
        ops, m, L, B = self.ops, self.model, self.model.L, self.B
        relu = m.activation == "relu"
        widths = m.dims + (m.K,)
        calls = []

        def call(fn, *args, **kwargs):
            calls.append(functools.partial(fn, *args, **kwargs))

        def buffer(*shape):
            return ops.empty((B,) + shape, self.dtype, self.device)

        levels, masks = [P["H1"]], {}
        for l in range(1, L):  # forward: A_l = H_l W_lᵀ, H_{l+1} = σ(A_l)
            A = buffer(m.N, widths[l])
            call(ops.matmul, levels[-1], P[f"W{l}"].mT, out=A)
            if relu:  # σ'(A) as 0/1 in the float dtype (a bool mask costs a cast per use)
                masks[l], H = buffer(m.N, widths[l]), buffer(m.N, widths[l])
                call(ops.greater, A, 0.0, out=masks[l])
                call(ops.multiply, A, masks[l], out=H)
                A = H
            levels.append(A)
        G = buffer(m.N, m.K)
        call(ops.matmul, levels[-1], P[f"W{L}"].mT, out=G)
        call(self._scaled_residual, G, P, lr)  # G = ηR, in place
        for l in range(L, 1, -1):  # backward through W_l, then W_l ← (1 - ηλ)W_l - Gᵀ H_l
            W, G_next = P[f"W{l}"], buffer(m.N, widths[l - 1])
            call(ops.matmul, G, W, out=G_next)
            self._plan_update(call, buffer, W, self._decay(f"W{l}", lr), G.mT, levels[l - 1])
            if relu:
                call(ops.multiply, G_next, masks[l - 1], out=G_next)
            G = G_next
        gW1 = buffer(widths[1], widths[0])  # W1's step needs the old H1 and H1's the old W1
        call(ops.matmul, G.mT, P["H1"], out=gW1)
        self._plan_update(call, buffer, P["H1"], self._decay("H1", lr), G, P["W1"])
        call(ops.multiply, P["W1"], self._decay("W1", lr), out=P["W1"])
        call(ops.subtract, P["W1"], gW1, out=P["W1"])
        return calls

    def _decay(self, name: str, lr: float):
        """1 - ηλ for factor ``name``: a float when every problem has the same λ, else (B, 1, 1)."""
        lam = self.lams[:, self.names.index(name)]
        if (lam == lam[0]).all():
            return float(1 - lr * lam[0])
        return 1 - lr * self.lam[name]

    def _plan_update(self, call, buffer, X, decay, A, Bm) -> None:
        """Adds X ← decay·X - A Bm to the plan: one fused BLAS call where the backend has
        one (torch baddbmm; for one numpy problem, BLAS gemm through scipy), else three."""
        if isinstance(decay, float) and self.ops is TorchOps:
            call(X.baddbmm_, A, Bm, beta=decay, alpha=-1.0)
        elif isinstance(decay, float) and self.B == 1 and _blas_update_in_place(X[0], A[0], Bm[0]):
            call(_blas_update, X[0], A[0], Bm[0], decay)
        else:
            product = buffer(*X.shape[1:])
            call(self.ops.matmul, A, Bm, out=product)
            call(self.ops.multiply, X, decay, out=X)
            call(self.ops.subtract, X, product, out=X)

    def _scaled_residual(self, Z, P, lr) -> None:
        """Z ← η ∂fit/∂Z in place (Z the output, bias not yet added); updates the bias too."""
        model = self.model
        if model.has_bias:
            Z += P["b"]
        if model.loss == "mse":
            Z -= self.Y
            Z *= lr * self.inv_N
        else:
            S, _ = self.ops.softmax_and_logsumexp(Z)
            self.ops.multiply(S - self.Y, lr * self.inv_N, out=Z)
        if model.has_bias:
            gb = self.ops.sum_rows(Z)
            if model.bias == "reg":
                P["b"] *= 1 - lr * self.lam_b
            P["b"] -= gb

    # ------------------------------------------------------------------ helpers
    def maps_to_output(self, P) -> list:
        """For each level l: W_L ⋯ W_l (B, K, d_l), the linear map NC3 compares with (σ ignored)."""
        maps = [P[f"W{self.model.L}"]]
        for l in range(self.model.L - 1, 0, -1):
            maps.insert(0, maps[0] @ P[f"W{l}"])
        return maps


def _fortran(x: np.ndarray):
    """(a, trans) with ``a`` Fortran-ordered and op(a) = x, so BLAS needs no copy."""
    return (x, 0) if x.flags.f_contiguous else (x.T, 1)


def _blas_update(X: np.ndarray, A: np.ndarray, Bm: np.ndarray, decay: float) -> np.ndarray:
    """X ← decay·X - A Bm in place for a C-ordered 2-D X, as one BLAS gemm call.

    BLAS is column-major: the C-ordered X is the Fortran-ordered Xᵀ, and
    Xᵀ ← decay·Xᵀ - Bmᵀ Aᵀ is exactly gemm(α = -1, Bmᵀ, Aᵀ, β = decay, C = Xᵀ).
    """
    a, trans_a = _fortran(Bm.T)
    b, trans_b = _fortran(A.T)
    gemm = blas.get_blas_funcs("gemm", (X,))
    return gemm(-1.0, a, b, decay, X.T, trans_a=trans_a, trans_b=trans_b, overwrite_c=1)


def _blas_update_in_place(X, A, Bm) -> bool:
    """True when :func:`_blas_update` writes into X itself (float32/64, C-ordered: no copy)."""
    if X.dtype not in (np.float32, np.float64) or not X.flags.c_contiguous:
        return False
    trial = X.copy()
    return np.shares_memory(_blas_update(trial, A, Bm, 1.0), trial)


# ----------------------------------------------------------------------------- initialisation
def initial_parameters(model: UFM, seeds, init_std) -> dict[str, np.ndarray]:
    """i.i.d. N(0, std²) factors in float64, problem i drawn from torch.Generator(seed_i).

    Drawn in the order H1, W1, ..., WL; the bias starts at 0. Each problem depends only on
    its own seed and std, so a batch equals the same problems run one by one.
    Returns a dict of float64 numpy arrays with a leading axis B = len(seeds).
    """
    seeds = [int(s) for s in seeds]
    stds = np.broadcast_to(np.asarray(init_std, dtype=np.float64), (len(seeds),))
    out = {k: np.empty((len(seeds),) + shape) for k, shape in model.factor_shapes().items()}
    for i, (seed, std) in enumerate(zip(seeds, stds)):
        gen = torch.Generator().manual_seed(seed)
        for k, shape in model.factor_shapes().items():
            out[k][i] = std * torch.randn(shape, generator=gen, dtype=torch.float64).numpy()
    if model.has_bias:
        out["b"] = np.zeros((len(seeds), 1, model.K))
    return out


def smoothness_estimate(program: Program, P, iters: int = 15, eps: float = 1e-6) -> np.ndarray:
    """Largest Hessian eigenvalue magnitude per problem, by power iteration (B,).

    Hessian-vector products are central differences of the analytic gradient, in float64.
    GD with step η is stable near a point only if η < 2/L; 1/L is a safe choice.
    """
    f64 = Program(program.model, program.lams, NumpyOps, np.float64, lam_b=program.lam_b_values)
    X = {k: np.asarray(program.ops.to_torch(v).detach().cpu(), dtype=np.float64) for k, v in P.items()}

    def norm(D):  # per-problem Euclidean norm over all parameters, shape (B, 1, 1)
        return np.sqrt(sum(np.square(v).reshape(len(v), -1).sum(1) for v in D.values())).reshape(-1, 1, 1)

    rng = np.random.default_rng(0)
    V = {k: rng.standard_normal(v.shape) for k, v in X.items()}
    step = eps * (1 + norm(X))
    est = np.zeros(f64.B)
    for _ in range(iters):
        nv = norm(V)
        V = {k: v / nv for k, v in V.items()}
        gp = f64.gradients({k: X[k] + step * V[k] for k in X})
        gm = f64.gradients({k: X[k] - step * V[k] for k in X})
        V = {k: (gp[k] - gm[k]) / (2 * step) for k in X}
        est = norm(V)[:, 0, 0]
    return est


def _program_for(model: UFM, params: dict, lams=None):
    """A Program matching the parameters' backend, dtype and device; params made batched."""
    batched = params["H1"].ndim == 3
    P = params if batched else {k: v[None] for k, v in params.items()}
    is_torch = isinstance(P["H1"], torch.Tensor)
    B = P["H1"].shape[0]
    lam_arr = np.broadcast_to(np.asarray(model.lams if lams is None else lams, dtype=np.float64),
                              (B, model.L + 1))
    prog = Program(model, lam_arr, TorchOps if is_torch else NumpyOps, P["H1"].dtype,
                   P["H1"].device if is_torch else None)
    return prog, P, batched


def gradients(model: UFM, params: dict, lams=None) -> dict:
    """Analytic gradients for torch or numpy parameters (leading batch axis, or none).

    A convenience for tests and users; the GD loop uses :class:`Program` directly.
    """
    prog, P, batched = _program_for(model, params, lams)
    g = prog.gradients(P)
    return g if batched else {k: v[0] for k, v in g.items()}


def objective(model: UFM, params: dict, lams=None):
    """Objective value (float, or (B,) for batched parameters)."""
    prog, P, batched = _program_for(model, params, lams)
    fit, reg = prog.objective(P)
    return fit + reg if batched else float((fit + reg)[0])


def as_float(x) -> np.ndarray:
    """A float64 numpy copy/view of a numpy array or torch tensor (any device)."""
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)


__all__ = ["NumpyOps", "TorchOps", "Program", "initial_parameters", "smoothness_estimate",
           "gradients", "objective"]
