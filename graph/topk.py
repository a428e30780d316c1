"""Compiled exact top-k for numpy on CPU: BLAS tiles + a threshold-filtered top-m (numba).

The same bytes as knn's array-module path, faster: the candidates of each query are the m = 2k+8
smallest GEMM distances, ties at the m-th by smaller id, then their distances are recomputed pair
by pair (numpy's float32 summation order, checked once per d) and sorted by (distance, id). Here
the GEMM runs tile by tile (queries x base block, cache-sized) and each tile is folded at once
into a running top-m per query: a vectorised pass compares the tile with each query's current
m-th distance and only the entries below it are inspected one by one. Each thread owns whole
query tiles and calls BLAS single-threaded and the compiled kernels without the GIL. Importing
this module imports numba (knn imports it lazily: a bare numpy/cupy box never needs it).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numba
import numpy as np

from vecgraph.graph import knn

METRIC_CODE = {"l2": 0, "cosine": 1, "ip": 2}
_U = float(np.finfo(np.float32).eps) / 2  # float32 unit roundoff


@numba.njit(nogil=True, cache=True, inline="always")
def _value(c: float, qn: float, bn: float, metric: int) -> float:
    """The numpy path's GEMM distance of one entry, in the same float32 operations."""
    if metric == 0:
        v = (qn + bn) - np.float32(2.0) * c
        return v if v > np.float32(0.0) else np.float32(0.0)
    if metric == 1:
        return np.float32(1.0) - c
    return -c


@numba.njit(nogil=True, cache=True, inline="always")
def _bound(thr: float, qn: float, bmax: float, metric: int) -> float:
    """A float32 lower bound on c - bn/2 (l2) or c (cosine, ip) of every entry whose distance
    (by _value) is <= thr, with slack for every rounding involved (see _select)."""
    t = np.float64(thr)
    if metric == 0:
        b = (np.float64(qn) - t) / 2 - 8 * _U * (np.float64(qn) + np.float64(bmax) + abs(t))
    elif metric == 1:
        b = (1 - t) - 8 * _U * (1 + 2 * abs(t))
    else:
        return -thr  # -c <= thr  <=>  c >= -thr, exactly
    return np.float32(b) - np.float32(8 * _U) * abs(np.float32(b))


@numba.njit(nogil=True, cache=True, inline="always")
def _insert(HD: Any, HI: Any, HP: Any, i: int, v: float, id_: int, pos: int) -> None:
    """Insert (v, id_, pos) into row i, sorted by (distance, id), dropping its last entry.
    (A sorted row of m = 2k+8 beats a heap here: a few moves, one unpredictable branch.)"""
    p = np.uint64(HD.shape[1] - 1)  # unsigned: no negative-index fix-up in the loop
    one = np.uint64(1)
    while p > 0 and (HD[i, p - one] > v or (HD[i, p - one] == v and HI[i, p - one] > id_)):
        HD[i, p], HI[i, p], HP[i, p] = HD[i, p - one], HI[i, p - one], HP[i, p - one]
        p -= one
    HD[i, p], HI[i, p], HP[i, p] = v, id_, pos


@numba.njit(nogil=True, cache=True, inline="always")
def _visit(C: Any, i: int, j0: int, w: int, lo: float, F: Any, F8: Any, hits: Any, q: float,
           bn: Any, bnh: Any, ids: Any, b0: int, bmax: float, metric: int, HD: Any, HI: Any,
           HP: Any) -> None:
    """Inspect the entries C[i, j0:j0 + w] flagged in F[0:w] against the bound lo (F is zero
    from w to a multiple of 64; F8 is F as words: flags are read 64 at a time, eight words
    OR-ed, then 8 at a time) and insert those that belong to row i's top m."""
    last = HD.shape[1] - 1
    for g in range(0, (w + 63) // 64 * 8, 8):
        if (F8[g] | F8[g + 1] | F8[g + 2] | F8[g + 3] | F8[g + 4] | F8[g + 5] | F8[g + 6]
                | F8[g + 7]) == 0:
            continue
        for t in range(g, g + 8):
            if F8[t] == 0:
                continue
            h = 0
            for j in range(8 * t, 8 * t + 8):  # branch-free: the flags are unpredictable
                hits[h] = j0 + j
                h += F[j]
            for e in range(h):
                j = hits[e]
                if C[i, j] - bnh[j] < lo:  # flagged against an older, larger bound
                    continue
                v = _value(C[i, j], q, bn[j], metric)
                if v < HD[i, last] or (v == HD[i, last] and ids[j] < HI[i, last]):
                    _insert(HD, HI, HP, i, v, ids[j], b0 + j)
                    lo = _bound(HD[i, last], q, bmax, metric)


@numba.njit(nogil=True, cache=True, inline="always")
def _count(C: Any, i: int, bnh: Any, T: float) -> int:
    """#{j : C[i, j] - bnh[j] >= T}, one vectorised pass."""
    c = 0
    for j in range(C.shape[1]):
        c += C[i, j] - bnh[j] >= T
    return c


@numba.njit(nogil=True, cache=True, inline="always")
def _seed_bound(C: Any, i: int, bnh: Any, m: int) -> float:
    """A value T with m <= #{j : C[i, j] - bnh[j] >= T} <= 3m/2 when ties allow (else the
    count is larger; fewer than m only when the row has fewer entries), by bisection with
    counting passes, bracketed from the first 64 entries (widened until it holds)."""
    w = C.shape[1]
    lo, hi = np.float32(np.inf), np.float32(-np.inf)
    for j in range(min(w, 64)):
        x = C[i, j] - bnh[j]
        lo = x if x < lo else lo
        hi = x if x > hi else hi
    width = max(hi - lo, np.float32(1e-30) + abs(hi) * np.float32(1e-6))
    while _count(C, i, bnh, lo) < min(m, w):  # the bracket: count(lo) >= m > count(hi)
        lo -= width
        width *= 2
    while _count(C, i, bnh, hi) >= m:
        hi += width
        width *= 2
    for _ in range(64):
        mid = lo + (hi - lo) / np.float32(2.0)
        if not lo < mid < hi:
            break
        c = _count(C, i, bnh, mid)
        if c < m:
            hi = mid
        elif 2 * c > 3 * m:
            lo = mid
        else:
            return mid
    return lo


@numba.njit(nogil=True, cache=True, inline="always")
def _seed(C: Any, i: int, T: float, q: float, bn: Any, bnh: Any, ids: Any, b0: int,
          metric: int, HD: Any, HI: Any, HP: Any, sd: Any, si: Any, sp: Any) -> None:
    """Fill the empty row i with the best m of the entries with C[i, j] - bnh[j] >= T (at
    least m of them unless the row is shorter), sorted by (distance, id) by insertion into the
    scratch sd, si, sp (2m long: past that, as with big tie groups, only the best 2m stay)."""
    c = 0
    for j in range(C.shape[1]):
        if C[i, j] - bnh[j] >= T:
            v, id_ = _value(C[i, j], q, bn[j], metric), ids[j]
            if c == len(sd):  # scratch full: drop its worst, or this entry
                if not (v < sd[c - 1] or (v == sd[c - 1] and id_ < si[c - 1])):
                    continue
                c -= 1
            p = c
            while p > 0 and (sd[p - 1] > v or (sd[p - 1] == v and si[p - 1] > id_)):
                sd[p], si[p], sp[p] = sd[p - 1], si[p - 1], sp[p - 1]
                p -= 1
            sd[p], si[p], sp[p] = v, id_, b0 + j
            c += 1
    for p in range(min(c, HD.shape[1])):
        HD[i, p], HI[i, p], HP[i, p] = sd[p], si[p], sp[p]


@numba.njit(nogil=True, cache=True)
def _select(C: Any, qn: Any, bn: Any, bnh: Any, ids: Any, b0: int, bmax: float, metric: int,
            HD: Any, HI: Any, HP: Any) -> None:
    """Fold one tile into the running top-m of each query (by (distance, id)).

    C: (n, w) float32 inner products of n queries with base rows b0..b0+w; qn: (n,), bn, bnh,
    ids: (w,) float32 squared norms, their halves (zeros for cosine/ip), int64 ids; HD, HI,
    HP: (n, m) float32 distances, int64 ids (int64 max = empty) and base positions, each row
    sorted by (distance, id). An entry can enter a row only when its distance is <= the row's
    last, so a vectorised pass first flags the entries that pass a conservative bound on
    c - bn/2 (l2's qn + bn - 2c rounds within 3u(qn + bn) of the real value, the subtraction
    adds u(qn + bn), the bound keeps 8u), and only flagged entries are checked with the exact
    distance and the (distance, id) order. An empty row (its first tile) is seeded with the
    entries above a bisected value T (m to 3m/2 of them), then the rest is flagged as usual.
    """
    n, w = C.shape
    m = HD.shape[1]
    last = m - 1
    F = np.zeros((w + 63) // 64 * 64, np.uint8)
    F8 = F.view(np.uint64)
    hits = np.empty(8, np.int64)
    sd, si, sp = np.empty(2 * m, np.float32), np.empty(2 * m, np.int64), np.empty(2 * m, np.int64)
    for i in range(n):
        q = qn[i]
        T = np.float32(np.inf)
        if HD[i, last] == np.inf and HI[i, 0] == np.iinfo(np.int64).max:
            T = _seed_bound(C, i, bnh, m)
            _seed(C, i, T, q, bn, bnh, ids, b0, metric, HD, HI, HP, sd, si, sp)
        lo = _bound(HD[i, last], q, bmax, metric)
        if T == np.inf:
            for j in range(w):
                F[j] = C[i, j] - bnh[j] >= lo
        else:  # the seeds are in already
            for j in range(w):
                x = C[i, j] - bnh[j]
                F[j] = (x >= lo) & (x < T)
        _visit(C, i, 0, w, lo, F, F8, hits, q, bn, bnh, ids, b0, bmax, metric, HD, HI, HP)


@numba.njit(nogil=True, cache=True, inline="always")
def _pairwise_leaf(t: Any, a: int, n: int) -> float:
    """numpy's float32 pairwise sum of t[a:a + n] for n <= 128: eight partial sums."""
    if n < 8:
        res = np.float32(0.0)
        for i in range(a, a + n):
            res += t[i]
        return res
    r0, r1, r2, r3, r4, r5, r6, r7 = t[a], t[a + 1], t[a + 2], t[a + 3], t[a + 4], t[a + 5], \
        t[a + 6], t[a + 7]
    i = 8
    while i < n - n % 8:
        r0 += t[a + i]
        r1 += t[a + i + 1]
        r2 += t[a + i + 2]
        r3 += t[a + i + 3]
        r4 += t[a + i + 4]
        r5 += t[a + i + 5]
        r6 += t[a + i + 6]
        r7 += t[a + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += t[a + i]
        i += 1
    return res


@numba.njit(nogil=True, cache=True, inline="always")
def _pairwise_sum(t: Any, stack: Any, vals: Any) -> float:
    """numpy's float32 pairwise summation of t (what `.sum(1)` does to each row: eight partial
    sums up to 128 entries, sum of the two halves, cut at a multiple of 8, above), so the
    sums are the same bytes. Iterative (numba's cache cannot reload recursive functions):
    stack (3, 192) int64 holds tasks (start, length, 0) or (-, -, 1) = add the last two
    results; vals (64,) float32 holds results."""
    n = len(t)
    if n <= 128:
        return _pairwise_leaf(t, 0, n)
    stack[0, 0], stack[1, 0], stack[2, 0] = 0, n, 0
    top, nv = 1, 0
    while top > 0:
        top -= 1
        a, m, kind = stack[0, top], stack[1, top], stack[2, top]
        if kind == 1:
            vals[nv - 2] = vals[nv - 2] + vals[nv - 1]
            nv -= 1
        elif m <= 128:
            vals[nv] = _pairwise_leaf(t, a, m)
            nv += 1
        else:
            m2 = m // 2
            m2 -= m2 % 8
            stack[0, top], stack[1, top], stack[2, top] = 0, 0, 1
            stack[0, top + 1], stack[1, top + 1], stack[2, top + 1] = a + m2, m - m2, 0
            stack[0, top + 2], stack[1, top + 2], stack[2, top + 2] = a, m2, 0
            top += 3
    return vals[0]


@numba.njit(nogil=True, cache=True, inline="always")
def _exact(xq: Any, i: int, xb: Any, r: int, metric: int, t: Any, stack: Any,
           vals: Any) -> float:
    """knn.exact_distances of the pair (xq[i], xb[r]), in the same float32 operations
    (t: (d,) scratch; stack, vals: _pairwise_sum's)."""
    d = xq.shape[1]
    if metric == 0:
        for j in range(d):
            e = xq[i, j] - xb[r, j]
            t[j] = e * e
        return _pairwise_sum(t, stack, vals)
    same = 0
    for j in range(d):
        t[j] = xq[i, j] * xb[r, j]
        same += xq[i, j] != xb[r, j]
    ip = _pairwise_sum(t, stack, vals)
    if metric == 2:
        return -ip
    if same == 0:
        return np.float32(0.0)
    v = np.float32(1.0) - ip
    return v if v > np.float32(0.0) else np.float32(0.0)


@numba.njit(nogil=True, cache=True)
def _finish(q: Any, xb: Any, ids_b: Any, HP: Any, metric: int, D: Any, I: Any) -> float:
    """Exact distances of each row's candidates, sorted by (distance, id) into D, I (n, k)
    as knn.sort_topk does (an infinite distance counts as id -1, after every finite one)."""
    n, m = HP.shape
    k = D.shape[1]
    big = np.iinfo(np.int64).max
    t = np.empty(q.shape[1], np.float32)
    stack, vals = np.empty((3, 192), np.int64), np.empty(64, np.float32)
    de = np.empty(m, np.float32)
    key = np.empty(m, np.int64)
    touch = np.float32(0.0)  # returned, so the touching loads are kept
    for i in range(n):
        if i + 1 < n:  # touch the next row's candidates (a line in 16 floats): their loads overlap
            for c in range(m):
                for j in range(0, xb.shape[1], 16):
                    touch += xb[HP[i + 1, c], j]
        for c in range(m):
            v = _exact(q, i, xb, HP[i, c], metric, t, stack, vals)
            p = c
            kc = big if v == np.inf else ids_b[HP[i, c]]
            while p > 0 and (de[p - 1] > v or (de[p - 1] == v and key[p - 1] > kc)):
                de[p], key[p] = de[p - 1], key[p - 1]
                p -= 1
            de[p], key[p] = v, kc
        for c in range(k):
            D[i, c] = de[c]
            I[i, c] = -1 if key[c] == big else key[c]
    return touch


_EXACT_OK: dict[tuple[int, str], bool] = {}


def _exact_matches_numpy(d: int, metric: str) -> bool:
    """Once per (d, metric): does _exact give knn.exact_distances' bytes here? (It copies
    numpy's summation order; should a numpy release change it, the numpy form is used.)"""
    if (d, metric) not in _EXACT_OK:
        rng = np.random.default_rng(0)
        xq = rng.standard_normal((64, d)).astype(np.float32)
        xb = xq + rng.standard_normal((64, d)).astype(np.float32) * np.float32(1e-3)
        xb[:8] = xq[:8]
        if metric == "cosine":
            xq, xb = knn.normalize_rows(xq), knn.normalize_rows(xb)
        D, I = np.empty((64, 1), np.float32), np.empty((64, 1), np.int64)
        _finish(xq, xb, np.arange(64), np.arange(64).reshape(64, 1), METRIC_CODE[metric], D, I)
        _EXACT_OK[d, metric] = bool((D[:, 0] == knn.exact_distances(xq, xb, metric)).all())
    return _EXACT_OK[d, metric]


def allowed_threads() -> int:
    """Threads the caller allows: numba's setting, capped by the BLAS limit (threadpoolctl, as
    a Ray task's runtime.limit_threads sets it)."""
    n = numba.get_num_threads()
    for lib in _blas_controller().lib_controllers:
        n = min(n, lib.num_threads)
    return max(1, n)


_CONTROLLER: Any = None
_LOCK = threading.Lock()
_ACTIVE: list[Any] = []  # [the limiter, the number of searches running] while any runs


def _blas_controller() -> Any:
    global _CONTROLLER
    with _LOCK:
        if _CONTROLLER is None:
            from threadpoolctl import ThreadpoolController
            _CONTROLLER = ThreadpoolController().select(user_api="blas")
    return _CONTROLLER


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """BLAS at 1 thread while any search runs (its threads call BLAS themselves); the caller's
    setting comes back when the last concurrent search ends."""
    controller = _blas_controller()
    with _LOCK:
        if not _ACTIVE:
            _ACTIVE[:] = [controller.limit(limits=1), 0]
        _ACTIVE[1] += 1
    try:
        yield
    finally:
        with _LOCK:
            _ACTIVE[1] -= 1
            if _ACTIVE[1] == 0:
                _ACTIVE[0].restore_original_limits()
                _ACTIVE.clear()


def search(xq: np.ndarray, xb: np.ndarray, ids_b: np.ndarray, k: int, metric: str,
           threads: int | None = None, qb: int = 1024,
           bb: int = 512) -> tuple[np.ndarray, np.ndarray] | None:
    """knn.search_exact for float32 numpy arrays with 0 < k and 2k+8 < nb (knn checks them).

    xq: (nq, d), xb: (nb, d) float32 C-contiguous; ids_b: (nb,) int64. qb x bb is the GEMM
    tile (queries x base rows); threads: None = allowed_threads().
    Returns D: (nq, k) float32, I: (nq, k) int64, or None when an input holds NaN or inf
    (or squares past float32's range): the caller takes the array-module path then.
    """
    nq, nb = len(xq), len(xb)
    m = 2 * k + 8
    code = METRIC_CODE[metric]
    qn = (xq * xq).sum(1)  # the numpy path's expressions, so the same float32 values
    bn = (xb * xb).sum(1)
    if not (np.isfinite(qn).all() and np.isfinite(bn).all()):
        return None
    bnh = bn / np.float32(2) if code == 0 else np.zeros(nb, np.float32)
    blocks = [(b, xb[b:b + bb].T, bn[b:b + bb], bnh[b:b + bb], ids_b[b:b + bb],
               float(bn[b:b + bb].max())) for b in range(0, nb, bb)]
    D = np.empty((nq, k), np.float32)
    I = np.empty((nq, k), np.int64)
    compiled_finish = _exact_matches_numpy(xq.shape[1], metric)

    def tile(a: int) -> None:
        q = xq[a:a + qb]
        n = len(q)
        HD = np.full((n, m), np.inf, np.float32)
        HI = np.full((n, m), np.iinfo(np.int64).max, np.int64)
        HP = np.full((n, m), -1, np.int64)
        C: dict[int, np.ndarray] = {}  # one buffer per block width, reused
        for b, xbT, bn_, bnh_, ids_, bmax in blocks:
            Cb = C.setdefault(xbT.shape[1], np.empty((n, xbT.shape[1]), np.float32))
            np.matmul(q, xbT, out=Cb)
            _select(Cb, qn[a:a + n], bn_, bnh_, ids_, b, bmax, code, HD, HI, HP)
        if compiled_finish:
            _finish(q, xb, ids_b, HP, code, D[a:a + n], I[a:a + n])
        else:
            De = knn.exact_distances(np.repeat(q, m, axis=0), xb[HP.reshape(-1)], metric)
            D[a:a + n], I[a:a + n] = knn.sort_topk(De.reshape(n, m).astype(np.float32),
                                                   ids_b[HP], k)
        knn.complete_ties(q, xb, ids_b, k, metric, HD[:, m - 1], HP, D[a:a + n], I[a:a + n])

    starts = range(0, nq, qb)
    t = allowed_threads() if threads is None else max(1, threads)
    t = min(t, len(starts))
    with _single_threaded_blas():
        if t == 1:
            for a in starts:
                tile(a)
        else:
            with ThreadPoolExecutor(t) as ex:
                list(ex.map(tile, starts))
    return D, I
