"""k-NN kernels: exact blocked search, self-exclusion by id, top-k merging (numpy or cupy).

Distances are "smaller is closer" (DESIGN §2): squared L2 for `l2`, 1 - cos for `cosine`
(inputs already L2-normalised), -<x, y> for `ip`. Ties are broken by the smaller id.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def array_module(x: Any) -> Any:
    """numpy, or cupy when x is a cupy array (cupy is imported only then)."""
    if type(x).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


def normalize_rows(x: Any) -> Any:
    """(n, d) float32 -> rows scaled to unit L2 norm; zero rows stay zero."""
    xp = array_module(x)
    norms = xp.sqrt((x * x).sum(axis=1, keepdims=True))
    return x / xp.where(norms > 0, norms, 1)


def pairwise_distances(xq: Any, xb: Any, metric: str) -> Any:
    """xq: (nq, d) float32, xb: (nb, d) float32 -> (nq, nb) float32 distances by GEMM."""
    xp = array_module(xq)
    ip = xq @ xb.T
    if metric == "l2":
        D = (xq * xq).sum(1)[:, None] + (xb * xb).sum(1)[None, :] - 2 * ip
        return xp.maximum(D, 0, out=D)
    if metric == "cosine":
        return 1 - ip
    return -ip


def exact_distances(xq: Any, xb: Any, metric: str) -> Any:
    """Distances of paired rows, computed directly (no GEMM cancellation): xq, xb: (n, d) -> (n,)."""
    if metric == "l2":
        diff = xq - xb
        return (diff * diff).sum(1)
    ip = (xq * xb).sum(1)
    if metric == "cosine":
        # 1 - <x, x> of a float32-normalised row is +-1e-7, not 0: exact duplicates get 0.
        xp = array_module(xq)
        return xp.where((xq == xb).all(1), 0, xp.maximum(1 - ip, 0)).astype(ip.dtype)
    return -ip


def sort_topk(D: Any, I: Any, k: int) -> tuple[Any, Any]:
    """Sort each row by (distance, id) and keep the first k; -1 ids count as +inf.

    D: (n, m) float32, I: (n, m) int64 -> (n, k) each, padded with +inf / -1 when m < k.
    """
    xp = array_module(D)
    n, m = D.shape
    D = xp.where(I < 0, xp.inf, D).astype(xp.float32)
    I = xp.where(xp.isinf(D), -1, I)
    I_key = xp.where(I < 0, xp.iinfo(xp.int64).max, I)
    order = np.lexsort((I_key, D), axis=-1) if xp is np else _lexsort_rows(xp, D, I_key)
    order = order[:, :k]
    D, I = xp.take_along_axis(D, order, 1), xp.take_along_axis(I, order, 1)
    if m < k:
        D = xp.concatenate([D, xp.full((n, k - m), xp.inf, dtype=xp.float32)], 1)
        I = xp.concatenate([I, xp.full((n, k - m), -1, dtype=I.dtype)], 1)
    return D, I


def _lexsort_rows(xp: Any, D: Any, I_key: Any) -> Any:
    # cupy's lexsort has no axis: sort by id first, then stable-sort by distance.
    o1 = xp.argsort(I_key, axis=1)
    D1 = xp.take_along_axis(D, o1, 1)
    o2 = xp.argsort(D1, axis=1, kind="stable")
    return xp.take_along_axis(o1, o2, 1)


def merge_topk(D: Any, I: Any, k: int, exclude: Any = None) -> tuple[Any, Any]:
    """Merge candidate lists (e.g. the partial top-k of S shards, concatenated) into the top k.

    D: (n, m) float32, I: (n, m) int64 global ids (-1 = hole); exclude: (n,) int64 ids to drop
    from each row (the query's own id), or None. Returns (n, k) float32, (n, k) int64.
    """
    xp = array_module(D)
    if exclude is not None:
        I = xp.where(I == exclude[:, None], -1, I)
    return sort_topk(D, I, k)


def search_exact(xq: Any, xb: Any, ids_b: Any, k: int, metric: str,
                 block: int = 16384, threads: int | None = None) -> tuple[Any, Any]:
    """Exact top-k of each query in a base block, ties by id.

    xq: (nq, d) float32, xb: (nb, d) float32, ids_b: (nb,) int64 global ids of xb's rows.
    Returns D: (nq, k') float32, I: (nq, k') int64 with k' = min(k, nb). Candidates are the
    2k+8 smallest GEMM distances (ties at the last by smaller id), then their distances are
    recomputed pair by pair, so exact duplicates get exactly 0 whatever the blocking.
    numpy float32 inputs take the compiled path (graph/topk.py, same bytes, using `threads`
    threads, None = all the caller allows) when numba is installed; cupy inputs and the rest
    take the array-module path, whose query blocks have `block` rows at most.
    """
    kk = min(k, xb.shape[0])
    if (type(xq) is np.ndarray and type(xb) is np.ndarray and xq.dtype == xb.dtype == np.float32
            and len(xq) > 0 and kk > 0 and 2 * kk + 8 < len(xb)):
        try:
            from vecgraph.graph import topk
        except ImportError:  # no numba: the array-module path below
            topk = None
        if topk is not None:
            out = topk.search(np.ascontiguousarray(xq), np.ascontiguousarray(xb),
                              np.ascontiguousarray(ids_b, np.int64), kk, metric, threads)
            if out is not None:  # None: NaN or inf in the input
                return out
    return search_exact_xp(xq, xb, ids_b, k, metric, block)


def search_exact_xp(xq: Any, xb: Any, ids_b: Any, k: int, metric: str,
                    block: int = 16384) -> tuple[Any, Any]:
    """search_exact by whole-array operations of numpy or cupy (the reference for topk.py)."""
    xp = array_module(xq)
    nq, nb = xq.shape[0], xb.shape[0]
    kk = min(k, nb)
    if kk == 0 or nq == 0:
        return xp.zeros((nq, kk), xp.float32), xp.zeros((nq, kk), xp.int64)
    m = min(2 * kk + 8, nb)
    d = xq.shape[1]
    block = max(1, min(block, (32 << 20) // max(nb, 1), (16 << 20) // (m * d)))  # bound temporaries
    Ds, Is = [], []
    for a in range(0, nq, block):
        q = xq[a:a + block]
        Dg = pairwise_distances(q, xb, metric)
        cand = _candidates(xp, Dg, ids_b, m) if m < nb else \
            xp.broadcast_to(xp.arange(nb), (len(q), nb))
        De = exact_distances(xp.repeat(q, m, axis=0), xb[cand.reshape(-1)], metric)
        D, I = sort_topk(De.reshape(len(q), m).astype(xp.float32), ids_b[cand], kk)
        if m < nb:
            gm = xp.take_along_axis(Dg, cand, 1).max(axis=1)
            complete_ties(q, xb, ids_b, kk, metric, gm, cand, D, I)
        Ds.append(D)
        Is.append(I)
    return xp.concatenate(Ds), xp.concatenate(Is)


def tie_rows(gm: Any, tk: Any, qn: Any, bmax: float, d: int) -> Any:
    """Rows whose GEMM margin may hide a tie or a better neighbour: the m-th candidate's GEMM
    distance gm is within the rounding bound of the k-th exact distance tk (both (n,) float32;
    qn: (n,) squared query norms, bmax: largest squared base norm). A GEMM distance is within
    2(d+2)u(qn + bn) of the real one, a pairwise one within (d+3)u|tk|; the bound doubles both."""
    xp = array_module(gm)
    u = float(np.finfo(np.float32).eps) / 2
    tol = 4 * (d + 4) * u * (qn.astype(xp.float64) + bmax + xp.abs(tk.astype(xp.float64)))
    return xp.flatnonzero(gm.astype(xp.float64) <= tk.astype(xp.float64) + tol), tol


def complete_ties(xq: Any, xb: Any, ids_b: Any, k: int, metric: str, gm: Any, pos: Any,
                  D: Any, I: Any) -> None:
    """Redo, in place, the rows of (D, I) (n, k) whose 2k+8 GEMM candidates may miss an entry
    that ties or beats their k-th exact distance (tie groups larger than the margin, whose GEMM
    values differ in the last bits): such a row is searched again over every base entry whose
    GEMM distance is within the rounding bound, so the result is the brute-force top k by
    (pairwise distance, id) whatever the blocking. xq: (n, d); gm: (n,) the m-th candidate's
    GEMM distance; pos: (n, m) int64 positions in xb of the candidates."""
    xp = array_module(xq)
    if k == 0 or len(xq) == 0:
        return
    rows, tol = tie_rows(gm, D[:, k - 1], (xq * xq).sum(1), float((xb * xb).sum(1).max()),
                         xq.shape[1])
    for r in rows.tolist():
        g = pairwise_distances(xq[r:r + 1], xb, metric)[0]
        near = xp.flatnonzero(g.astype(xp.float64) <= float(D[r, k - 1]) + float(tol[r]))
        cand = xp.union1d(near, pos[r])
        De = xp.concatenate([exact_distances(xp.broadcast_to(xq[r], (len(c), xq.shape[1])),
                                             xb[c], metric)
                             for c in xp.array_split(cand, len(cand) // 65536 + 1)])
        Dr, Ir = sort_topk(De[None].astype(xp.float32), ids_b[cand][None], k)
        D[r], I[r] = Dr[0], Ir[0]


def _candidates(xp: Any, Dg: Any, ids_b: Any, m: int) -> Any:
    """Positions of the m smallest distances of each row, ties at the m-th value taken by
    smaller id (argpartition alone picks arbitrary members of a tie group larger than the
    margin). Dg: (n, nb), ids_b: (nb,) -> (n, m)."""
    cand = xp.argpartition(Dg, m - 1, axis=1)[:, :m]
    t = xp.take_along_axis(Dg, cand, 1).max(axis=1)
    tied = xp.flatnonzero((Dg <= t[:, None]).sum(axis=1) > m)
    if len(tied):
        key = xp.broadcast_to(ids_b, (len(tied), Dg.shape[1]))
        Dt = Dg[tied]
        order = np.lexsort((key, Dt), axis=-1) if xp is np else \
            _lexsort_rows(xp, Dt, key)
        cand[tied] = order[:, :m]
    return cand


def recall_at_k(D_true_graph: np.ndarray, valid: np.ndarray, D_exact: np.ndarray) -> float:
    """Recall of graph rows against exact neighbours, counting ties as hits.

    D_true_graph: (n, k) true distances of the graph's neighbours (inf for -1 holes);
    valid: (n, k) bool, graph entry is a real neighbour; D_exact: (n, k) exact top-k distances
    (inf padding). A neighbour is a hit when its true distance <= the exact k-th distance
    * (1 + 1e-6) (plus 1e-6 absolute, for distances near 0).
    """
    expected = np.isfinite(D_exact).sum(1)
    kth = np.where(expected > 0, D_exact[np.arange(len(D_exact)), np.maximum(expected - 1, 0)], 0)
    tol = np.abs(kth) * 1e-6 + 1e-6
    hits = (valid & (D_true_graph <= (kth + tol)[:, None])).sum(1)
    hits = np.minimum(hits, expected)
    total = expected.sum()
    return float(hits.sum() / total) if total else 1.0
