"""Exact k-NN benchmark: vecgraph search_exact vs Faiss IndexFlatL2/IP vs this machine's SGEMM.

One process, the same data (nq = nb, standard normal float32, queries = base as in a k-NN
graph), k = 10. Every search is timed between two numpy SGEMM 4096^3 runs, so the GEMM rate it
is compared with is measured in the same run, under the same load; each time is the best of
--reps. A search's rate is in GFLOP/s-equivalent: 2 nq nb d / wall time of the whole top-k
search (GEMM, selection, exact recomputation), and "% GEMM" divides it by the best SGEMM rate
of the run. OpenBLAS reads OPENBLAS_CORETYPE at start-up (the header prints it); to compare,
run once as is and once with `env -u OPENBLAS_CORETYPE python bench/exact_knn.py`.

    python bench/exact_knn.py                   # d = 64 (n = 50,000), 128 (35,000), 384 (20,000)
    python bench/exact_knn.py --dims 64 --n 20000 --reps 2     # a quicker one
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np

K = 10
DEFAULT_N = {64: 50_000, 128: 35_000, 384: 20_000}  # about the same flops each (~1 min)


def gemm_rate(a: np.ndarray, c: np.ndarray) -> float:
    t0 = time.perf_counter()
    np.matmul(a, a, out=c)
    return 2 * a.shape[0] ** 3 / (time.perf_counter() - t0) / 1e9


def timed(fn: Callable[[], object], gemm: Callable[[], float], gemms: list[float]) -> float:
    """Wall time of fn(), with an SGEMM rate measured right before and right after it."""
    gemms.append(gemm())
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    gemms.append(gemm())
    return t


def agreement(I: np.ndarray, I_ref: np.ndarray) -> float:
    """Share of each row's ids also in the reference row (ties may order differently)."""
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(I, I_ref))
    return hits / I_ref.size


def run_dim(d: int, n: int, reps: int, gemm: Callable[[], float]) -> tuple[list[list[str]], list[float]]:
    import faiss

    from vecgraph.graph import knn

    x = np.random.default_rng(d).standard_normal((n, d), dtype=np.float32)
    ids = np.arange(n, dtype=np.int64)
    flops = 2.0 * n * n * d
    flat = {"l2": faiss.IndexFlatL2(d), "ip": faiss.IndexFlatIP(d)}
    for index in flat.values():
        index.add(x)
    knn.search_exact(x[:64], x, ids, K, "l2")  # compile / load the kernels outside the timing
    methods: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
        "faiss IndexFlatL2": lambda: flat["l2"].search(x, K),
        "faiss IndexFlatIP": lambda: flat["ip"].search(x, K),
        "vecgraph search_exact l2": lambda: knn.search_exact(x, x, ids, K, "l2"),
        "vecgraph search_exact ip": lambda: knn.search_exact(x, x, ids, K, "ip"),
    }
    best = dict.fromkeys(methods, np.inf)
    gemms: list[float] = []
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for _ in range(reps):
        for name, fn in methods.items():
            best[name] = min(best[name], timed(lambda f=fn, nm=name: out.__setitem__(nm, f()),
                                               gemm, gemms))
    agree = {"vecgraph search_exact l2": agreement(out["vecgraph search_exact l2"][1],
                                                   out["faiss IndexFlatL2"][1]),
             "vecgraph search_exact ip": agreement(out["vecgraph search_exact ip"][1],
                                                   out["faiss IndexFlatIP"][1])}
    g = max(gemms)
    rows = [[str(d), f"{n:,}", f"numpy SGEMM 4096^3 ({len(gemms)} runs, min {min(gemms):.0f})",
             "", f"{g:.1f}", "100%", ""]]
    for name in methods:
        rate = flops / best[name] / 1e9
        rows.append([str(d), f"{n:,}", name, f"{best[name]:.2f}", f"{rate:.1f}",
                     f"{100 * rate / g:.0f}%", f"{100 * agree[name]:.2f}%" if name in agree else ""])
    return rows, gemms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128, 384])
    ap.add_argument("--n", type=int, default=None, help="nq = nb (default: per d, ~1 min each)")
    ap.add_argument("--reps", type=int, default=3, help="best of this many runs")
    args = ap.parse_args()

    import faiss
    import numba
    from threadpoolctl import threadpool_info

    from vecgraph.graph import topk

    blas = {("faiss" if "faiss" in i["filepath"] else "numpy"): i
            for i in threadpool_info() if i["user_api"] == "blas"}
    print(f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}; cores: "
          f"{os.cpu_count()}; BLAS: " + "; ".join(
              f"{who}'s {i['internal_api']} {i.get('version')} ({i.get('architecture')})"
              for who, i in sorted(blas.items(), reverse=True)))
    print(f"threads: vecgraph {topk.allowed_threads()} (numba {numba.get_num_threads()}, "
          f"one BLAS call per thread), faiss OpenMP {faiss.omp_get_max_threads()}, "
          f"numpy SGEMM {blas['numpy']['num_threads'] if 'numpy' in blas else '?'}; "
          f"k = {K}; best of {args.reps}")
    a = np.random.default_rng(0).random((4096, 4096), dtype=np.float32)
    c = np.empty_like(a)
    gemm_rate(a, c)  # warm-up

    header = ["d", "nq = nb", "method", "best s", "GFLOP/s", "% GEMM", "ids = Faiss"]
    rows: list[list[str]] = []
    for d in args.dims:
        n = args.n or DEFAULT_N.get(d, 20_000)
        r, _ = run_dim(d, n, args.reps, lambda: gemm_rate(a, c))
        rows += r
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("{:<%d}" % w for w in widths)
    print(line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for r in rows:
        print(line.format(*r))


if __name__ == "__main__":
    main()
