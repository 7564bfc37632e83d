"""Benchmark: nclab's UFM gradient descent against the way existing code does it.

The reference keeps every factor as a torch parameter with requires_grad, builds the
objective, calls loss.backward() and torch.optim.SGD.step(), and every 100 iterations
computes NC1 of each feature level with a per-class Python loop and numpy's pinv. Ours:
nclab.ufm.solve with its defaults (analytic gradients as a cached plan of BLAS calls; a
batch of small problems in shards on every core; all of nclab.metrics for every level
every 100 iterations, where the reference computes NC1 only). Both run in this process;
the table gives iterations per second (per problem) and the ratio.

Cases (targets from the issue):
  fig4-single   extended ReLU UFM, K=4, d=20, n=50, float64, 1 problem        >= 12x
  fig4-batch64  the same, 64 problems batched, float32, per problem           >= 40x
  large-plain   plain UFM K=100, n=500, d=512, float32, 1 problem              >= 2x
  gpu-batch     (CUDA only) >= 8192 small problems, problem-iterations/s      >= 5e6 on an H100

    python benchmarks/ufm_gd.py [--quick] [--device cuda]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from nclab import ufm


def reference_nc1(H: np.ndarray, y: np.ndarray, K: int) -> float:
    """NC1 the usual way: per-class loops, d x d covariances, pinv."""
    means = np.stack([H[y == k].mean(0) for k in range(K)])
    Sw = sum((H[y == k] - means[k]).T @ (H[y == k] - means[k]) for k in range(K)) / len(y)
    Mc = means - means.mean(0)
    return float(np.trace(Sw @ np.linalg.pinv(Mc.T @ Mc / K)) / K)


def reference_run(model: ufm.UFM, steps: int, lr: float, dtype, seed: int = 0, log_every: int = 100):
    """Autograd + torch.optim.SGD, NC1 per level by loops + pinv every log_every iterations."""
    init = ufm.initial_parameters(model, [seed], 0.1)
    params = {k: torch.tensor(v[0], dtype=dtype, requires_grad=True) for k, v in init.items()}
    opt = torch.optim.SGD(params.values(), lr=lr)
    Y = torch.nn.functional.one_hot(torch.as_tensor(model.labels()), model.K).to(dtype)
    y = model.labels()
    names = list(model.factor_shapes())
    for it in range(1, steps + 1):
        opt.zero_grad()
        H, levels = params["H1"], [params["H1"]]
        for l in range(1, model.L):
            H = H @ params[f"W{l}"].T
            if model.activation == "relu":
                H = torch.relu(H)
            levels.append(H)
        Z = H @ params[f"W{model.L}"].T
        loss = 0.5 / model.N * ((Z - Y) ** 2).sum()
        loss = loss + sum(lam / 2 * (params[k] ** 2).sum() for lam, k in zip(model.lams, names))
        loss.backward()
        opt.step()
        if it % log_every == 0:
            for Hl in levels:
                reference_nc1(Hl.detach().double().numpy(), y, model.K)
    return float(loss.detach())


def rate(fn, steps, repeats=2):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return steps / best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations (noisier)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    q = 4 if args.quick else 1
    fig4 = ufm.extended(4, 50, 20, 20, 0.005, 0.005, 0.005, relu=True)
    large = ufm.plain(100, 500, 512, 0.001, 0.001)
    rows = []

    steps = 4000 // q
    ref = rate(lambda: reference_run(fig4, steps, 0.1, torch.float64), steps)
    ours = rate(lambda: ufm.solve(fig4, ufm.GD(steps=steps, lr=0.1, log_every=100)), steps)
    rows.append(("fig4-single  (float64, 1 problem)", ref, ours, 12))

    steps, B = 1000 // q, 64
    ref32 = rate(lambda: reference_run(fig4, steps, 0.1, torch.float32), steps)
    ours = rate(lambda: ufm.solve(fig4, ufm.GD(steps=steps, lr=0.1, dtype="float32", log_every=100), seeds=range(B)), steps) * B
    rows.append((f"fig4-batch{B} (float32, per problem)", ref32, ours, 40))

    steps = 60 // q
    ref = rate(lambda: reference_run(large, steps, 0.5, torch.float32, log_every=10**9), steps, 1)
    ours = rate(lambda: ufm.solve(large, ufm.GD(steps=steps, lr=0.5, dtype="float32", log_every=10**9, metrics=False)), steps, 1)
    rows.append(("large-plain  (K=100,n=500,d=512,f32)", ref, ours, 2))

    print(f"UFM gradient descent: iterations/s, reference (autograd + SGD) vs nclab, device {args.device}")
    print(f"{'case':40s} {'reference':>12s} {'nclab':>12s} {'ratio':>8s} {'target':>8s}")
    for name, r, o, target in rows:
        print(f"{name:40s} {r:12.0f} {o:12.0f} {o / r:7.1f}x {target:7d}x")

    if args.device.startswith("cuda"):
        B = 16384
        steps = 2000
        for dt in ("float32",):
            solve = lambda: ufm.solve(fig4, ufm.GD(steps=steps, lr=0.1, dtype=dt, device=args.device, log_every=10**9, metrics=False), seeds=range(B))
            solve()
            torch.cuda.synchronize()
            t = time.perf_counter()
            solve()
            torch.cuda.synchronize()
            pis = B * steps / (time.perf_counter() - t)
            print(f"gpu-batch {B} fig4 problems ({dt}): {pis:.3g} problem-iterations/s (target >= 5e6)")


if __name__ == "__main__":
    main()
