"""GPU readiness: vecgraph's exact k-NN kernels on cupy, checked and timed against torch.

For a machine with a CUDA GPU, Python, numpy, cupy and torch, and nothing else of vecgraph's
dependencies (no Faiss, no Ray): it imports only the pure kernel modules (loaded straight from
their files, so the package's other modules and their imports are never touched).

1. Checks the cupy path of every kernel against the numpy path on fresh random data.
2. Times exact k-NN (k = 10) of Q queries against a 1M x 128 base: vecgraph's `search_exact` on
   cupy vs `torch.mm` + `torch.topk` in the same run, and prints a table.

    python bench/gpu_knn.py [--n 1000000] [--d 128] [--queries 100000]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_kernel(name: str, path: Path):
    """Import one kernel module from its file under the name the package gives it."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--queries", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    import cupy as cp
    import torch

    knn = load_kernel("vecgraph.graph.knn", ROOT / "graph" / "knn.py")
    print(f"GPU: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, cupy {cp.__version__}, "
          f"torch {torch.__version__}")

    # 1. cupy == numpy on fresh random data (with duplicates, all metrics).
    rng = np.random.default_rng(int(time.time()))
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x[100:140] = x[7]
    ids = np.arange(len(x), dtype=np.int64)
    for metric in ("l2", "cosine", "ip"):
        xm = knn.normalize_rows(x) if metric == "cosine" else x
        D0, I0 = knn.search_exact(xm, xm, ids, args.k, metric)
        D1, I1 = knn.search_exact(cp.asarray(xm), cp.asarray(xm), cp.asarray(ids), args.k, metric)
        same = (cp.asnumpy(I1) == I0).mean()
        err = np.abs(cp.asnumpy(D1) - D0).max()
        print(f"check search_exact {metric:<6}: ids equal {same:.4%}, max |dD| {err:.2e}")
        assert same > 0.999 and err < 1e-3, f"cupy and numpy kernels disagree ({metric})"
        Dm, Im = knn.merge_topk(cp.asarray(D0), cp.asarray(I0), args.k - 1, cp.asarray(ids))
        Dn, In = knn.merge_topk(D0, I0, args.k - 1, ids)
        assert (cp.asnumpy(Im) == In).all(), "merge_topk differs on cupy"
    print("check merge_topk: equal")

    # 2. Timing: exact k-NN of Q queries against an n x d base.
    xb = cp.random.standard_normal((args.n, args.d), dtype=cp.float32)
    xq = xb[: args.queries]
    idb = cp.arange(args.n, dtype=cp.int64)
    flops = 2.0 * args.queries * args.n * args.d

    def best(fn, reps: int = 3) -> float:
        fn()
        cp.cuda.Device().synchronize()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            cp.cuda.Device().synchronize()
            times.append(time.perf_counter() - t0)
        return min(times)

    tb, tq = torch.as_tensor(xb, device="cuda"), torch.as_tensor(xq, device="cuda")
    nb2 = (tb * tb).sum(1)

    def torch_knn() -> None:
        for a in range(0, args.queries, 8192):
            q = tq[a:a + 8192]
            D = (q * q).sum(1)[:, None] + nb2[None, :] - 2 * (q @ tb.T)
            torch.topk(D, args.k, dim=1, largest=False)

    def mm_only() -> None:
        for a in range(0, args.queries, 8192):
            tq[a:a + 8192] @ tb.T

    t_mm = best(mm_only)
    t_torch = best(torch_knn)
    t_vg = best(lambda: knn.search_exact(xq, xb, idb, args.k, "l2"))
    print(f"\nexact k-NN, {args.queries:,} queries x {args.n:,} base, d={args.d}, k={args.k}")
    print(f"{'method':<34}{'seconds':>9}{'TFLOP/s-eq':>12}")
    for name, t in (("torch.mm alone (GEMM bound)", t_mm), ("torch.mm + topk", t_torch),
                    ("vecgraph search_exact (cupy)", t_vg)):
        print(f"{name:<34}{t:>9.2f}{flops / t / 1e12:>12.1f}")
    print(f"vecgraph / torch.mm+topk time: {t_vg / t_torch:.2f}x")


if __name__ == "__main__":
    main()
