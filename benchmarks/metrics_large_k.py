"""Benchmark: collapse metrics at large K, time and peak memory, nclab against the usual way.

Features are streamed in batches of float32 (B, d) with labels, as a language model's
penultimate layer would give them, and never held whole. Two sides, in this process:

* reference, "the usual way": float32 accumulators (class sums, then a second pass for the
  d x d within-class scatter), Σ_B⁺ by ``torch.linalg.pinv`` (default cut-off), CDNV over
  all K(K-1)/2 pairs by indexing them (a (K(K-1)/2) x d tensor), whole K x K Grams;
* nclab: :class:`nclab.ClassStats` (float64, one pass) and ``ClassStats.metrics(W)``
  (tiles; every metric except NC4).

Peak memory is the largest resident set size seen by a sampling thread (every 2 ms) while a
side runs, minus the size before it started. Where the reference cannot fit this machine
(its all-pairs tensor alone), it is not run and the script says how much it would need.

    python benchmarks/metrics_large_k.py                     # K=1000, d=512, N=50,000; then K=32768
    python benchmarks/metrics_large_k.py --cases 1000:512:50000
Prints one line per case and one JSON line per case at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nclab import ClassStats  # noqa: E402
from nclab._validate import total_memory  # noqa: E402

PAGE = 4096


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakMemory:
    """Context manager: ``.peak`` = max RSS seen while inside, minus RSS on entry (bytes)."""

    def __enter__(self):
        self.base = self.peak_abs = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak_abs = max(self.peak_abs, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_abs = max(self.peak_abs, rss())
        self.peak = self.peak_abs - self.base


def batches(K: int, d: int, N: int, batch: int, seed: int = 0):
    """(H (B, d) float32, y (B,)) batches of N clustered features, the same every call."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(K, d, generator=g)
    for i in range(0, N, batch):
        n = min(batch, N - i)
        y = (torch.arange(i, i + n) * 7919) % K  # every class, spread over the batches
        yield torch.randn(n, d, generator=g) + centres[y], y


def reference(K, d, N, batch, W):
    """The usual way (module docstring); float32 accumulators."""
    sums = torch.zeros(K, d)
    counts = torch.zeros(K)
    for H, y in batches(K, d, N, batch):
        sums.index_add_(0, y, H)
        counts += torch.bincount(y, minlength=K)
    means = sums / counts[:, None]
    Sw = torch.zeros(d, d)
    var = torch.zeros(K)
    for H, y in batches(K, d, N, batch):
        D = H - means[y]
        Sw += D.T @ D
        var.index_add_(0, y, D.square().sum(1))
    Sw /= N
    var /= counts
    Mc = means - means.mean(0)
    Sb = Mc.T @ Mc / K
    nc1 = float(torch.trace(Sw @ torch.linalg.pinv(Sb))) / K
    i, j = torch.triu_indices(K, K, offset=1)
    cdnv = float(((var[i] + var[j]) / (2 * (means[i] - means[j]).square().sum(1))).mean())
    E = (torch.eye(K) - 1 / K) / (K - 1) ** 0.5
    O = torch.eye(K) / K ** 0.5

    def fd(G, F):
        return float(torch.linalg.matrix_norm(G / torch.linalg.matrix_norm(G) - F))

    return {"nc1": nc1, "cdnv": cdnv, "nc2_etf": fd(Mc @ Mc.T, E), "nc2_of": fd(means @ means.T, O),
            "nc2w_etf": fd(W @ W.T, E), "nc3_duality_etf": fd(W @ Mc.T, E)}


def ours(K, d, N, batch, W):
    stats = ClassStats(K, d)
    for H, y in batches(K, d, N, batch):
        stats.update(H, y)
    return stats.metrics(W)


def run_case(K, d, N, batch):
    W = torch.randn(K, d, generator=torch.Generator().manual_seed(1))
    pairs_bytes = 4 * K * (K - 1) // 2 * d
    result = {"K": K, "d": d, "N": N, "batch": batch, "stats_bytes": ClassStats.memory_bytes(K, d)}
    with PeakMemory() as mem:
        t = time.perf_counter()
        got = ours(K, d, N, batch, W)
        result["ours_s"] = time.perf_counter() - t
    result["ours_peak_bytes"] = mem.peak
    result["ours_peak_beyond_stats_bytes"] = mem.peak - 8 * (K * d + 2 * K + d * d)
    if 3 * pairs_bytes < total_memory() // 2:
        with PeakMemory() as mem:
            t = time.perf_counter()
            ref = reference(K, d, N, batch, W.float())
            result["reference_s"] = time.perf_counter() - t
        result["reference_peak_bytes"] = mem.peak
        result["speedup"] = result["reference_s"] / result["ours_s"]
        result["memory_ratio"] = result["reference_peak_bytes"] / max(result["ours_peak_bytes"], 1)
        result["largest_rel_diff_vs_float32_reference"] = max(
            abs(got[k] - ref[k]) / abs(ref[k]) for k in ref)
    else:
        result["reference_needs_bytes_at_least"] = pairs_bytes
    result["metrics"] = len(got)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["1000:512:50000", "32768:1024:1000000"],
                    help="K:d:N triples")
    ap.add_argument("--batch", type=int, default=8192)
    args = ap.parse_args()
    results = []
    for case in args.cases:
        K, d, N = (int(v) for v in case.split(":"))
        r = run_case(K, d, N, args.batch)
        results.append(r)
        gib = 2**30
        line = (f"K={K} d={d} N={N}: nclab {r['ours_s']:.1f} s, peak {r['ours_peak_bytes'] / gib:.2f} GiB "
                f"({r['ours_peak_beyond_stats_bytes'] / gib:.2f} GiB beyond the statistics)")
        if "reference_s" in r:
            line += (f"; reference {r['reference_s']:.1f} s, peak {r['reference_peak_bytes'] / gib:.2f} GiB; "
                     f"speed-up {r['speedup']:.2f}x, memory ratio {r['memory_ratio']:.1f}x, largest relative "
                     f"difference {r['largest_rel_diff_vs_float32_reference']:.1e} (the reference is float32)")
        else:
            line += f"; reference not run: its all-pairs tensor alone needs {r['reference_needs_bytes_at_least'] / gib:.0f} GiB"
        print(line, flush=True)
    for r in results:
        print(json.dumps({"benchmark": "metrics_large_k", **r}))


if __name__ == "__main__":
    main()
