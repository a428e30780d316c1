"""graph/knn.py against a float64 numpy brute force (full distance matrix + lexsort by (d, id)).

Tolerances: float32 kernels vs the float64 reference agree to rtol 1e-5 plus an absolute
1e-5 x (largest squared norm) for GEMM-free paths; on small-integer data every float32 sum is
exact, so there D and I must be *equal*, ties included.
"""
from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest

import vecgraph.graph
from tests.conftest import nasty_vectors
from vecgraph.graph import knn

METRICS = ["l2", "cosine", "ip"]


# ---------------------------------------------------------------- reference


def ref_distances(xq: np.ndarray, xb: np.ndarray, metric: str) -> np.ndarray:
    """(nq, nb) float64 distances by definition (no GEMM identity)."""
    q, b = xq.astype(np.float64), xb.astype(np.float64)
    if metric == "l2":
        return ((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    if metric == "cosine":
        nq = np.linalg.norm(q, axis=1)[:, None]
        nb = np.linalg.norm(b, axis=1)[None, :]
        D = 1 - (q @ b.T) / np.where(nq * nb > 0, nq * nb, 1)
        same = (xq[:, None, :] == xb[None, :, :]).all(-1)
        return np.where(same, 0.0, D)  # cos(x, x) = 1 exactly
    return -(q @ b.T)


def ref_topk(xq, qids, xb, ids_b, k, metric, exclude_self):
    """Brute-force top-k by (distance, id), own id excluded when asked, -1/+inf padding."""
    D = ref_distances(xq, xb, metric)
    idb = np.broadcast_to(ids_b, D.shape)
    if exclude_self:
        D = np.where(idb == np.asarray(qids)[:, None], np.inf, D)
    order = np.lexsort((idb, D), axis=-1)[:, :k]
    Dk = np.take_along_axis(D, order, 1)
    Ik = np.where(np.isinf(Dk), -1, np.take_along_axis(idb, order, 1))
    if Dk.shape[1] < k:
        pad = k - Dk.shape[1]
        Dk = np.concatenate([Dk, np.full((len(Dk), pad), np.inf)], 1)
        Ik = np.concatenate([Ik, np.full((len(Ik), pad), -1)], 1)
    return Dk, Ik


def data(metric: str, seed: int = 7) -> np.ndarray:
    x = nasty_vectors(np.random.default_rng(seed), n=300, d=16)
    x[40:52] = 0.5  # a constant block as well (constant across columns and rows)
    return knn.normalize_rows(x) if metric == "cosine" else x


def atol_for(x: np.ndarray) -> float:
    return 1e-5 * float((x.astype(np.float64) ** 2).sum(1).max())


def integer_data(seed: int, n: int = 240, d: int = 5) -> np.ndarray:
    """Small integers: GEMM and pairwise sums are exact in float32, so ties are exact."""
    return np.random.default_rng(seed).integers(0, 3, size=(n, d)).astype(np.float32)


def shard_bounds(n: int, n_shards: int) -> list[tuple[int, int]]:
    cuts = np.linspace(0, n, n_shards + 1).round().astype(int)
    if n_shards > 1:
        cuts[1] = max(cuts[1] - 7, 1)  # uneven shards
    return list(itertools.pairwise(cuts))


# ---------------------------------------------------------------- small kernels


def test_normalize_rows_unit_norm_and_zero_rows_stay_zero(rng):
    x = rng.normal(size=(20, 8)).astype(np.float32)
    x[4] = 0
    y = knn.normalize_rows(x)
    norms = np.linalg.norm(y.astype(np.float64), axis=1)
    np.testing.assert_allclose(np.delete(norms, 4), 1.0, rtol=1e-6)
    assert (y[4] == 0).all()
    # direction kept: y is a positive multiple of x
    np.testing.assert_allclose(y[0] * np.linalg.norm(x[0]), x[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_pairwise_and_exact_distances_match_definition(metric):
    x = data(metric)
    xq, xb = x[:37], x[37:]
    ref = ref_distances(xq, xb, metric)
    Dg = knn.pairwise_distances(xq, xb, metric)
    assert Dg.shape == (37, len(xb)) and Dg.dtype == np.float32
    # GEMM identity: cancellation error scales with the squared norms
    np.testing.assert_allclose(Dg, ref, rtol=1e-5, atol=10 * atol_for(x))
    if metric == "l2":
        assert (Dg >= 0).all()
    # paired rows, computed directly
    j = np.random.default_rng(0).integers(0, len(xb), len(xq))
    De = knn.exact_distances(xq, xb[j], metric)
    np.testing.assert_allclose(De, ref[np.arange(len(xq)), j], rtol=1e-5, atol=atol_for(x))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_exact_distances_of_duplicates_are_exactly_zero(metric):
    x = data(metric)
    d = knn.exact_distances(x, x.copy(), metric)
    assert (d == 0.0).all(), f"{metric}: self distances {np.unique(d)}"


def test_sort_topk_hand_worked():
    D = np.array([[0.3, 0.1, 0.1, 0.0, 0.2]], np.float32)
    I = np.array([[5, 9, 4, -1, 2]], np.int64)  # the hole's distance (0.0) must count as inf
    Dk, Ik = knn.sort_topk(D, I, 3)
    np.testing.assert_array_equal(Ik, [[4, 9, 2]])
    np.testing.assert_array_equal(Dk, np.float32([[0.1, 0.1, 0.2]]))
    Dk, Ik = knn.sort_topk(D, I, 7)  # m=5 < k=7: hole and padding at the end
    np.testing.assert_array_equal(Ik, [[4, 9, 2, 5, -1, -1, -1]])
    assert np.isinf(Dk[0, 4:]).all() and Dk.dtype == np.float32 and Ik.dtype == np.int64


def test_merge_topk_hand_worked_excludes_own_id_only():
    # Row 0 is node 9: its own id goes, its duplicate 4 (distance 0) stays first.
    D = np.array([[0.0, 0.0, 0.5, 0.2, 0.7],
                  [0.4, 0.4, 0.1, np.inf, 0.4]], np.float32)
    I = np.array([[9, 4, 7, 9, -1],
                  [3, 1, 2, -1, 8]], np.int64)
    Dk, Ik = knn.merge_topk(D, I, 4, exclude=np.array([9, 2]))
    np.testing.assert_array_equal(Ik, [[4, 7, -1, -1], [1, 3, 8, -1]])
    np.testing.assert_array_equal(Dk[0, :2], np.float32([0.0, 0.5]))
    np.testing.assert_array_equal(Dk[1, :3], np.float32([0.4, 0.4, 0.4]))
    assert np.isinf(Dk[0, 2:]).all() and np.isinf(Dk[1, 3])


def test_recall_at_k_hand_worked():
    D_exact = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, np.inf], [np.inf] * 3])
    D_graph = np.array([[1.0, 3.0, 5.0],        # 2 hits (3.0 ties the exact 3rd)
                        [0.0, 1e-7, np.inf],    # 2 hits (1e-7 within the 1e-6 absolute slack)
                        [np.inf] * 3])          # nothing expected
    valid = np.array([[True, True, True], [True, True, False], [False] * 3])
    assert knn.recall_at_k(D_graph, valid, D_exact) == pytest.approx(4 / 5, abs=1e-12)
    assert knn.recall_at_k(D_graph[2:], valid[2:], D_exact[2:]) == 1.0
    # an invalid entry never counts, whatever its distance
    assert knn.recall_at_k(D_graph[:1], np.zeros((1, 3), bool), D_exact[:1]) == 0.0


# ---------------------------------------------------------------- search_exact


@pytest.mark.parametrize("metric", METRICS)
def test_search_exact_matches_brute_force(metric):
    x = data(metric)
    ids = np.arange(len(x), dtype=np.int64)
    q = np.r_[0:30, 100, 200, 3, 10, 24, 40:44]  # duplicates, the constant block
    k = 20  # more than the 16 copies of row 3
    D, I = knn.search_exact(x[q], x, ids, k, metric, block=8)
    Dr, Ir = ref_topk(x[q], q, x, ids, k, metric, exclude_self=False)
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == (len(q), k)
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_allclose(D, Dr, rtol=1e-5, atol=atol_for(x))
    if metric != "ip":
        same = Dr == 0.0  # exact duplicates by the reference
        assert same.sum() > 16 * 5
        assert (D[same] == 0.0).all(), "exact duplicates must be at distance exactly 0.0"
    # the 16 copies of row 3 come first, ordered by id, query 3 among them
    if metric != "ip":
        row = list(q).index(3)
        np.testing.assert_array_equal(I[row, :16], np.r_[3, 10:25])


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k", [1, 3, 6, 11])
def test_search_exact_ties_broken_by_smaller_id(metric, k):
    # Many exact ties; ids are a permutation so the order by id differs from row order.
    x = integer_data(seed=k)
    rng = np.random.default_rng(100 + k)
    ids = 1000 + 3 * rng.permutation(len(x)).astype(np.int64)
    D, I = knn.search_exact(x, x, ids, k, metric, block=13)
    Dr, Ir = ref_topk(x, ids, x, ids, k, metric, exclude_self=False)
    np.testing.assert_array_equal(D, Dr.astype(np.float32))
    np.testing.assert_array_equal(I, Ir)


def test_search_exact_blocking_does_not_change_bytes():
    x = data("l2")
    ids = np.arange(len(x), dtype=np.int64)
    ref = knn.search_exact(x, x, ids, 9, "l2")
    for block in (1, 7, 64):
        D, I = knn.search_exact(x, x, ids, 9, "l2", block=block)
        np.testing.assert_array_equal(D, ref[0])
        np.testing.assert_array_equal(I, ref[1])


def test_search_exact_k_larger_than_base_and_empty():
    x = data("l2")[:5]
    ids = np.array([50, 10, 40, 20, 30], np.int64)
    D, I = knn.search_exact(x, x, ids, 8, "l2")
    assert D.shape == I.shape == (5, 5)  # k' = min(k, nb): no padding here
    Dr, Ir = ref_topk(x, ids, x, ids, 5, "l2", exclude_self=False)
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_allclose(D, Dr, rtol=1e-5, atol=atol_for(x))
    D, I = knn.search_exact(x[:0], x, ids, 3, "l2")
    assert D.shape == I.shape == (0, 3)
    D, I = knn.search_exact(x, x[:0], ids[:0], 3, "l2")
    assert D.shape == I.shape == (5, 0)


# ---------------------------------------------------------------- merge_topk over shards


def sharded_graph(x, ids, k, metric, n_shards, block=16384):
    """The knn stage's pattern: per-shard top-(k+1), concatenated, merged without own id."""
    parts = [knn.search_exact(x, x[a:b], ids[a:b], k + 1, metric, block=block)
             for a, b in shard_bounds(len(x), n_shards)]
    D = np.concatenate([p[0] for p in parts], 1)
    I = np.concatenate([p[1] for p in parts], 1)
    return knn.merge_topk(D, I, k, exclude=ids)


@pytest.mark.parametrize("metric", METRICS)
def test_merge_topk_one_shard_equals_four_shards_equals_brute_force(metric):
    x = data(metric)
    ids = np.arange(len(x), dtype=np.int64)
    k = 10
    D1, I1 = sharded_graph(x, ids, k, metric, 1)
    D4, I4 = sharded_graph(x, ids, k, metric, 4, block=32)
    np.testing.assert_array_equal(I1, I4)
    np.testing.assert_array_equal(D1, D4)
    Dr, Ir = ref_topk(x, ids, x, ids, k, metric, exclude_self=True)
    np.testing.assert_array_equal(I1, Ir)
    np.testing.assert_allclose(D1, Dr, rtol=1e-5, atol=atol_for(x))
    assert not (I1 == ids[:, None]).any(), "a node is its own neighbour"
    if metric != "ip":
        # node 3 and its 15 copies: the other copies stay neighbours, at exactly 0.0
        np.testing.assert_array_equal(I1[3], np.r_[10:20])
        np.testing.assert_array_equal(I1[12], np.r_[3, 10, 11, 13:20])
        assert (D1[3] == 0.0).all() and (D1[12] == 0.0).all()
        assert I1[100, 0] == 200 and D1[100, 0] == 0.0 and I1[200, 0] == 100


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_merge_topk_shards_ties_by_id_on_integer_data(metric):
    x = integer_data(seed=3, n=200, d=4)
    ids = np.arange(len(x), dtype=np.int64) * 2 + 5
    k = 7
    D1, I1 = sharded_graph(x, ids, k, metric, 1)
    D4, I4 = sharded_graph(x, ids, k, metric, 4, block=9)
    Dr, Ir = ref_topk(x, ids, x, ids, k, metric, exclude_self=True)
    for D, I in ((D1, I1), (D4, I4)):
        np.testing.assert_array_equal(I, Ir)
        np.testing.assert_array_equal(D, Dr.astype(np.float32))


@pytest.mark.parametrize("n_shards", [1, 2, 4])
@pytest.mark.parametrize("k", [5, 6, 9])
def test_merge_topk_pads_only_when_fewer_than_k_other_nodes(n_shards, k):
    x = data("l2")[:6]
    x[4] = x[1]  # a duplicate pair
    ids = np.array([3, 8, 11, 12, 20, 21], np.int64)
    D, I = sharded_graph(x, ids, k, "l2", n_shards)
    Dr, Ir = ref_topk(x, ids, x, ids, k, "l2", exclude_self=True)
    assert D.shape == I.shape == (6, k)
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_allclose(D, Dr, rtol=1e-5, atol=atol_for(x))
    n_pad = max(k - 5, 0)
    assert (I[:, 5:] == -1).all() and np.isposinf(D[:, 5:]).all() and I.shape[1] - 5 == n_pad
    assert (I[:, :5] >= 0).all() and np.isfinite(D[:, :5]).all()
    assert I[1, 0] == 20 and D[1, 0] == 0.0 and I[4, 0] == 8 and D[4, 0] == 0.0


# ---------------------------------------------------------------- compiled path (graph/topk.py)


def topk_module():
    pytest.importorskip("numba")
    from vecgraph.graph import topk
    return topk


def nasty_big(metric: str, seed: int = 11, n: int = 700, d: int = 24) -> np.ndarray:
    """Clustered rows, 15 copies of row 3, a duplicate pair and a 60-row constant block: more
    copies than the 2k+8 margin for small k, so ties by id past the margin are exercised."""
    x = nasty_vectors(np.random.default_rng(seed), n=n, d=d)
    x[300:360] = 0.25
    return knn.normalize_rows(x) if metric == "cosine" else x


def assert_same(a: tuple, b: tuple) -> None:
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].dtype == np.float32 and a[1].dtype == np.int64


# tiles that cut the data at odd places, one bigger than the data, and the defaults
TILES = [(7, 13), (64, 100), (1000, 1000), (1024, 512)]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 5, 10, 40])
def test_compiled_equals_numpy_path_and_brute_force(metric, k):
    topk = topk_module()
    x = nasty_big(metric)
    ids = 5000 + 7 * np.random.default_rng(k).permutation(len(x)).astype(np.int64)
    q = np.r_[0:40, 100, 200, 3, 10, 24, 300:306, 650:700]
    ref = knn.search_exact_xp(x[q], x, ids, k, metric)
    Dr, Ir = ref_topk(x[q], ids[q], x, ids, k, metric, exclude_self=False)
    np.testing.assert_array_equal(ref[1], Ir)
    np.testing.assert_allclose(ref[0], Dr, rtol=1e-5, atol=atol_for(x))
    for qb, bb in TILES:
        got = topk.search(x[q], x, ids, k, metric, threads=2, qb=qb, bb=bb)
        assert_same(got, ref)
    assert_same(knn.search_exact(x[q], x, ids, k, metric), ref)
    if metric != "ip":
        got = knn.search_exact(x[q], x, ids, k, metric)
        assert (got[0][Dr == 0.0] == 0.0).all(), "exact duplicates must be at distance exactly 0.0"


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k", [1, 3, 10, 30])
def test_compiled_ties_by_id_on_integer_data(metric, k):
    # Small integers: every float32 sum is exact, so there are many exact ties (and the
    # 3^3 = 27 distinct rows of 500 mean every tie group is bigger than the 2k+8 margin).
    topk = topk_module()
    x = integer_data(seed=k, n=500, d=3)
    ids = 10 * np.random.default_rng(k).permutation(len(x)).astype(np.int64)
    Dr, Ir = ref_topk(x, ids, x, ids, k, metric, exclude_self=False)
    ref = knn.search_exact_xp(x, x, ids, k, metric)
    np.testing.assert_array_equal(ref[1], Ir)
    np.testing.assert_array_equal(ref[0], Dr.astype(np.float32))
    for qb, bb in TILES:
        assert_same(topk.search(x, x, ids, k, metric, threads=1, qb=qb, bb=bb), ref)


@pytest.mark.parametrize("metric", METRICS)
def test_compiled_constant_block_and_all_equal_base(metric):
    topk = topk_module()
    x = np.full((300, 8), 0.5, np.float32)
    x[::37] = np.arange(8, dtype=np.float32) / 8
    if metric == "cosine":
        x = knn.normalize_rows(x)
    ids = np.arange(300, dtype=np.int64)[::-1].copy()  # ids descending with the row
    for k in (1, 4, 20):
        ref = knn.search_exact_xp(x[:50], x, ids, k, metric)
        Dr, Ir = ref_topk(x[:50], ids[:50], x, ids, k, metric, exclude_self=False)
        np.testing.assert_array_equal(ref[1], Ir)
        for qb, bb in TILES[:2]:
            assert_same(topk.search(x[:50], x, ids, k, metric, threads=2, qb=qb, bb=bb), ref)


def test_compiled_k_at_and_past_the_base_size_takes_the_numpy_path():
    topk_module()
    x = nasty_big("l2")[:30]
    ids = np.arange(30, dtype=np.int64)[::-1].copy()
    for k in (11, 12, 30, 45):  # 2k+8 >= nb: no selection to do
        D, I = knn.search_exact(x, x, ids, k, "l2")
        assert_same((D, I), knn.search_exact_xp(x, x, ids, k, "l2"))
        assert D.shape == (30, min(k, 30))


def test_compiled_threads_and_tiles_do_not_change_bytes():
    topk = topk_module()
    x = nasty_big("l2", n=1500)
    ids = np.arange(len(x), dtype=np.int64)
    ref = topk.search(x, x, ids, 7, "l2", threads=1)
    for threads, qb, bb in ((2, 100, 333), (4, 256, 1024), (3, 1, 2000)):
        assert_same(topk.search(x, x, ids, 7, "l2", threads=threads, qb=qb, bb=bb), ref)


def test_compiled_restores_blas_threads_and_respects_limits():
    topk = topk_module()
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    x = nasty_big("l2")
    topk.search(x, x, np.arange(len(x), dtype=np.int64), 5, "l2")
    assert blas_threads() == before
    with threadpool_limits(1, user_api="blas"):
        assert topk.allowed_threads() == 1


def test_non_finite_input_and_no_numba_take_the_numpy_path(monkeypatch):
    x = nasty_big("l2")
    ids = np.arange(len(x), dtype=np.int64)
    ref = knn.search_exact_xp(x[:20], x, ids, 4, "l2")
    calls = []
    xp_path = knn.search_exact_xp
    monkeypatch.setattr(knn, "search_exact_xp", lambda *a: calls.append(1) or xp_path(*a))
    # a box without numba: importing topk fails
    monkeypatch.setitem(sys.modules, "vecgraph.graph.topk", None)
    monkeypatch.delattr(vecgraph.graph, "topk", raising=False)
    assert_same(knn.search_exact(x[:20], x, ids, 4, "l2"), ref)
    assert calls == [1]
    monkeypatch.undo()
    topk = topk_module()
    y = x.copy()
    y[5, 2] = np.nan
    assert topk.search(y[:20], y, ids, 4, "l2") is None
    monkeypatch.setattr(knn, "search_exact_xp", lambda *a: calls.append(2) or xp_path(*a))
    knn.search_exact(y[:20], y, ids, 4, "l2")
    assert calls == [1, 2]


@pytest.mark.parametrize("d", [1, 5, 8, 17, 64, 128, 129, 384, 1000])
def test_compiled_pair_distances_are_numpys_bytes(d):
    topk = topk_module()
    for metric in METRICS:
        assert topk._exact_matches_numpy(d, metric)
    t = np.random.default_rng(d).standard_normal(d).astype(np.float32)
    stack, vals = np.empty((3, 192), np.int64), np.empty(64, np.float32)
    assert topk._pairwise_sum(t, stack, vals) == t[None, :].sum(1)[0]


def test_import_knn_does_not_import_numba():
    import subprocess
    code = "import sys, vecgraph.graph.knn; sys.exit('numba' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
