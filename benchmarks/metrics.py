"""Benchmark: nclab.measure against a reference written the way existing NC code does it.

N = 50,000 float32 features, d = 512, K = 100 classes (a CIFAR-100-sized penultimate
layer). The reference loops over classes in Python, forms the d x d Σ_W and Σ_B in
float64 and takes numpy's pinv of Σ_B. Both run in this process; the script prints
each one's best time over a few repeats, the speed ratio, and the largest relative
difference between their results.

    python benchmarks/metrics.py [--N 50000 --d 512 --K 100 --repeats 3]
    python benchmarks/metrics.py --large-k      # then the large-K cases of metrics_large_k.py
                                                # (K = 1,000 and 32,768: time and peak memory)
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import metrics_large_k  # noqa: E402
from nclab import measure  # noqa: E402


def reference(H, y, W, b):
    """Per-class loops, d x d covariances, numpy pinv: the common way."""
    H = H.astype(np.float64)
    W = W.astype(np.float64)
    K = int(y.max()) + 1
    N, d = H.shape
    means = np.zeros((K, d))
    Sw = np.zeros((d, d))
    var = np.zeros(K)
    for k in range(K):
        Hk = H[y == k]
        means[k] = Hk.mean(0)
        D = Hk - means[k]
        Sw += D.T @ D
        var[k] = (D ** 2).sum(1).mean()
    Sw /= N
    Mc = means - means.mean(0)
    Sb = Mc.T @ Mc / K
    nc1 = np.trace(Sw @ np.linalg.pinv(Sb, rcond=1e-8)) / K
    cdnv = np.mean([(var[i] + var[j]) / (2 * np.sum((means[i] - means[j]) ** 2))
                    for i in range(K) for j in range(i + 1, K)])

    def fdist(G, F):
        return np.linalg.norm(G / np.linalg.norm(G) - F)

    E = (np.eye(K) - 1 / K) / np.sqrt(K - 1)
    O = np.eye(K) / np.sqrt(K)
    dist2 = (H ** 2).sum(1)[:, None] - 2 * H @ means.T + (means ** 2).sum(1)[None]
    return dict(
        nc1=nc1, nc1_trace=np.trace(Sw) / np.trace(Sb), cdnv=cdnv,
        nc2_etf=fdist(Mc @ Mc.T, E), nc2_of=fdist(means @ means.T, O),
        nc2w_etf=fdist(W @ W.T, E), nc2w_of=fdist(W @ W.T, O),
        nc3_etf=np.linalg.norm(W / np.linalg.norm(W) - Mc / np.linalg.norm(Mc)),
        nc3_of=np.linalg.norm(W / np.linalg.norm(W) - means / np.linalg.norm(means)),
        nc3_duality_etf=fdist(W @ Mc.T, E), nc3_duality_of=fdist(W @ means.T, O),
        nc4=np.mean(dist2.argmin(1) != (H @ W.T + b).argmax(1)),
    )


def best_time(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--K", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where nclab computes (the reference is numpy on the CPU)")
    ap.add_argument("--large-k", action="store_true",
                    help="also run the large-K cases (benchmarks/metrics_large_k.py: streamed float32 features, "
                    "time and peak-memory ratios against float32 accumulators, pinv and all-pairs CDNV)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    y = rng.integers(0, args.K, args.N)
    H = (rng.standard_normal((args.N, args.d)) + 2 * rng.standard_normal((args.K, args.d))[y]).astype(np.float32)
    W = rng.standard_normal((args.K, args.d)).astype(np.float32)
    b = (0.1 * rng.standard_normal(args.K)).astype(np.float32)

    t_ref, ref = best_time(lambda: reference(H, y, W, b), args.repeats)
    if args.device == "cpu":
        t_ours, ours = best_time(lambda: measure(H, y, W, b), args.repeats)
    else:  # features already on the device, as after a forward pass
        Hd, yd, Wd, bd = (torch.as_tensor(a).to(args.device) for a in (H, y, W, b))
        measure(Hd, yd, Wd, bd)  # warm-up (CUDA context, kernels)
        t_ours, ours = best_time(lambda: measure(Hd, yd, Wd, bd), args.repeats)
    worst = max(abs(ours[k] - ref[k]) / max(abs(ref[k]), 1e-300) for k in ref)  # the keys both compute
    print(f"metrics benchmark: N={args.N}, d={args.d}, K={args.K}, float32 features")
    print(f"  reference (per-class loop, dxd pinv): {t_ref:8.3f} s")
    print(f"  nclab.measure ({args.device:4s})                : {t_ours:8.3f} s")
    print(f"  speed-up: {t_ref / t_ours:.2f}x   (target >= 3x)")
    print(f"  largest relative difference over {len(ref)} metrics: {worst:.2e}   (target <= 1e-6)")
    if args.large_k:
        sys.argv = [sys.argv[0]]
        metrics_large_k.main()


if __name__ == "__main__":
    main()
