"""clustering/kmeans.py against numpy brute force and scikit-learn's Lloyd.

Tolerances: assignment distances come from the float32 GEMM identity, so they match the
float64 definition to 1e-5 x (|x|^2 + |c|^2); on small-integer data they are exact, ties
included. Partial sums are float64 (rtol 1e-12 across partitionings).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.cluster import KMeans

from tests.conftest import nasty_vectors
from vecgraph.clustering import kmeans as km


def ref_assign(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    D = ((x.astype(np.float64)[:, None] - c.astype(np.float64)[None]) ** 2).sum(-1)
    lab = D.argmin(1)  # first minimum = smaller cluster number
    return lab, D[np.arange(len(x)), lab]


def parts_of(n: int, n_parts: int) -> list[slice]:
    """1 part, or 4 uneven parts (one of a single row)."""
    cuts = [0, n] if n_parts == 1 else [0, 17, n // 2, n // 2 + 1, n]
    return [slice(a, b) for a, b in itertools.pairwise(cuts)]


# ---------------------------------------------------------------- assignment


def test_assign_matches_brute_force_on_nasty_vectors():
    x = nasty_vectors(np.random.default_rng(21))
    c = x[[0, 3, 60, 150, 250, 299]].copy()
    c[5] = c[1]  # a duplicate centroid: cluster 5 must never win over cluster 1
    lab, dist = km.assign(x, c)
    rlab, rdist = ref_assign(x, c)
    assert lab.dtype == np.int64 and dist.dtype == np.float32
    np.testing.assert_array_equal(lab, rlab)
    assert not (lab == 5).any()
    scale = float((x.astype(np.float64) ** 2).sum(1).max() + (c.astype(np.float64) ** 2).sum(1).max())
    np.testing.assert_allclose(dist, rdist, rtol=1e-5, atol=1e-5 * scale)
    assert (dist >= 0).all()
    lab7, dist7 = km.assign(x, c, block=7)
    np.testing.assert_array_equal(lab7, lab)
    np.testing.assert_allclose(dist7, dist, rtol=1e-6, atol=1e-5 * scale)


def test_assign_ties_go_to_smaller_cluster_on_integer_data():
    rng = np.random.default_rng(8)
    x = rng.integers(0, 4, size=(400, 3)).astype(np.float32)
    c = np.array([[0, 0, 0], [2, 2, 2], [0, 0, 0], [1, 1, 1], [3, 0, 3], [2, 2, 2]], np.float32)
    lab, dist = km.assign(x, c, block=64)
    rlab, rdist = ref_assign(x, c)
    np.testing.assert_array_equal(lab, rlab)
    np.testing.assert_array_equal(dist, rdist.astype(np.float32))
    D = ((x[:, None] - c[None]) ** 2).sum(-1)
    assert ((D == D.min(1, keepdims=True)).sum(1) > 1).sum() > 50, "too few ties to test"


def test_assign_empty_input():
    lab, dist = km.assign(np.zeros((0, 4), np.float32), np.ones((3, 4), np.float32))
    assert lab.shape == dist.shape == (0,) and lab.dtype == np.int64


# ---------------------------------------------------------------- partial sums


@pytest.mark.parametrize("n_parts", [1, 4])
def test_partial_sums_add_up_to_brute_force(n_parts):
    x = nasty_vectors(np.random.default_rng(2))
    k = 9  # clusters 7 and 8 stay empty
    lab = np.random.default_rng(3).integers(0, 7, len(x))
    S = np.zeros((k, x.shape[1]))
    C = np.zeros(k, np.int64)
    for part in parts_of(len(x), n_parts):
        s, c = km.partial_sums(x[part], lab[part], k)
        assert s.dtype == np.float64 and c.dtype == np.int64 and s.shape == (k, x.shape[1])
        S += s
        C += c
    ref_S = np.stack([x[lab == j].astype(np.float64).sum(0) for j in range(k)])
    ref_C = np.array([(lab == j).sum() for j in range(k)])
    np.testing.assert_allclose(S, ref_S, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(C, ref_C)
    assert C[7] == C[8] == 0


# ---------------------------------------------------------------- update with empty clusters


def test_update_centroids_means_when_nothing_is_empty():
    rng = np.random.default_rng(0)
    sums = rng.normal(size=(4, 5)) * 10
    counts = np.array([3, 1, 7, 2])
    new, n_empty = km.update_centroids(sums, counts, np.zeros((4, 5), np.float32), rng)
    assert n_empty == 0 and new.dtype == np.float32
    np.testing.assert_allclose(new, sums / counts[:, None], rtol=1e-6)


def test_update_centroids_splits_the_largest_hand_worked():
    # counts [10, 0, 7, 0]: empty 1 splits cluster 0 (10 -> 5 + 5); empty 3 then splits the
    # now largest, cluster 2 (7 > 5).
    d = 6
    means = np.array([[1.0] * d, [9.0] * d, [-2.0] * d, [9.0] * d])
    counts = np.array([10, 0, 7, 0])
    sums = means * counts[:, None]
    old = np.full((4, d), 42.0, np.float32)
    new, n_empty = km.update_centroids(sums, counts, old, np.random.default_rng(1))
    assert n_empty == 2
    for big, empty in ((0, 1), (2, 3)):
        c = means[big]
        step = 1e-4 * (np.abs(c) + 1e-6)
        np.testing.assert_allclose(np.abs(new[empty] - c), step, rtol=2e-3)  # perturbed... (float32 spacing)
        np.testing.assert_allclose(np.abs(new[big] - c), step, rtol=2e-3)
        np.testing.assert_allclose(new[empty] + new[big], 2 * c, rtol=1e-6)  # ...symmetrically
        assert (new[empty] != new[big]).all()
    again, _ = km.update_centroids(sums, counts, old, np.random.default_rng(1))
    np.testing.assert_array_equal(again, new)  # randomness only from the rng argument


def test_lloyd_step_reseeds_an_empty_cluster_that_then_gets_points():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(size=(120, 4)), rng.normal(size=(60, 4)) + 20]).astype(np.float32)
    c = np.array([x[0], x[150], np.full(4, 1e3)], np.float32)  # cluster 2 is far away: empty
    lab, _ = km.assign(x, c)
    sums, counts = km.partial_sums(x, lab, 3)
    assert counts[2] == 0
    largest = int(np.bincount(lab, minlength=3).argmax())
    new, n_empty = km.update_centroids(sums, counts, c, np.random.default_rng(0))
    assert n_empty == 1
    mean_big = x[lab == largest].astype(np.float64).mean(0)
    np.testing.assert_allclose((new[2] + new[largest]) / 2, mean_big, rtol=1e-5, atol=1e-6)
    lab2, _ = km.assign(x, new)
    assert (np.bincount(lab2, minlength=3) > 0).all()


# ---------------------------------------------------------------- full Lloyd vs scikit-learn


@pytest.mark.parametrize("n_parts", [1, 4])
def test_lloyd_over_parts_equals_sklearn(n_parts):
    # Unclustered data (Lloyd takes many steps) with the nasty duplicate rows.
    rng = np.random.default_rng(9)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    x[10:25] = x[3]
    x[100] = x[200]
    init = x[[30, 45, 60, 170, 230, 290]].copy()  # no duplicate rows: no empty cluster
    C, prev = init.copy(), None
    for it in range(100):  # noqa: B007 - read after the loop
        lab, _ = km.assign(x, C)
        if prev is not None and (lab == prev).all():
            break
        S, N = 0, 0
        for part in parts_of(len(x), n_parts):
            s, c = km.partial_sums(x[part], lab[part], len(C))
            S, N = S + s, N + c
        C, n_empty = km.update_centroids(S, N, C, np.random.default_rng(0))
        assert n_empty == 0
        prev = lab
    sk = KMeans(n_clusters=6, init=init.astype(np.float64), n_init=1, algorithm="lloyd",
                tol=0.0, max_iter=100).fit(x.astype(np.float64))
    assert it > 2, "converged at once: the comparison would be vacuous"
    np.testing.assert_array_equal(lab, sk.labels_)
    np.testing.assert_allclose(C, sk.cluster_centers_, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- initialisation


@pytest.mark.parametrize("method", ["random", "kmeans++"])
def test_init_centroids_are_sample_rows_and_deterministic(method):
    x = nasty_vectors(np.random.default_rng(4))
    c = km.init_centroids(x, 8, method, np.random.default_rng(7))
    assert c.shape == (8, x.shape[1]) and c.dtype == np.float32
    is_row = (c[:, None, :] == x[None, :, :]).all(-1).any(1)
    assert is_row.all()
    np.testing.assert_array_equal(km.init_centroids(x, 8, method, np.random.default_rng(7)), c)
    assert not np.array_equal(km.init_centroids(x, 8, method, np.random.default_rng(8)), c)
    if method == "kmeans++":  # D^2 sampling never picks a copy of a chosen point
        assert len(np.unique(c, axis=0)) == 8


# ---------------------------------------------------------------- the Lloyd loop vs Faiss


def blobs(seed: int = 11, n: int = 2000, d: int = 16, k: int = 8) -> np.ndarray:
    """k overlapping Gaussian blobs (Lloyd takes ~12 steps from random rows), with faiss-style
    nasty rows: a block of exact duplicates and a duplicate pair across parts."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 2.5
    x = (centers[rng.integers(0, k, n)] + rng.normal(size=(n, d))).astype(np.float32)
    x[10:25] = x[3]
    x[100] = x[3 * n // 4]
    return x


def parts_stats(x: np.ndarray, n_parts: int):
    """stats(centroids) summed over parts of x, as the stage sums its actors' partial stats."""
    parts = [x[s] for s in parts_of(len(x), n_parts)]

    def stats(c):
        got = [km.stats(p, c) for p in parts]
        return sum(g[0] for g in got), sum(g[1] for g in got), sum(g[2] for g in got)
    return stats


def split_rngs(i: int) -> np.random.Generator:
    return np.random.default_rng([77, i])


@pytest.mark.parametrize("niter", [1, 2, 10, 40])
def test_lloyd_over_4_parts_equals_faiss_kmeans_from_the_same_init(niter):
    """faiss.Kmeans(niter=N).train(x, init_centroids=C0) does N (assign, update) iterations;
    obj[i] is the inertia *before* update i. lloyd(niter=N) does the same N updates and returns
    the N inertias plus that of the final centroids. Faiss >= 1.13 stops early once obj repeats
    exactly (early_stop_threshold=0): a Lloyd fixed point, where our further updates change
    nothing, so the centroids still agree (niter=40 checks this).
    Tolerances: Faiss sums each cluster in float32 (we sum in float64), so centroids differ by
    ~sqrt(m) float32 ulps of |x| (seen: 3e-7 |x|max); asserted at 1e-5 |x|max. Objectives are
    float32 sums in Faiss: rtol 1e-5. Assignments: identical (no near-ties in this data)."""
    faiss = pytest.importorskip("faiss")
    x = blobs()
    n, d = x.shape
    C0 = x[np.random.default_rng(5).choice(np.arange(30, n), 8, replace=False)].copy()
    state, final = km.lloyd(parts_stats(x, 4), km.LloydState(C0), niter, split_rngs)
    assert state.iteration == niter and len(state.inertia) == niter and state.n_split == 0

    ref = faiss.Kmeans(d, 8, niter=niter, max_points_per_centroid=n, seed=3)
    ref.train(x, init_centroids=C0)   # max_points_per_centroid >= n: no subsampling
    assert all(s["nsplit"] == 0 for s in ref.iteration_stats)
    D, I = ref.index.search(x, 1)
    scale = float(np.abs(x).max())
    np.testing.assert_allclose(state.centroids, ref.centroids, rtol=0, atol=1e-5 * scale)
    lab, dist = km.assign(x, state.centroids)
    np.testing.assert_array_equal(lab, I[:, 0])
    np.testing.assert_allclose(dist, D[:, 0], rtol=1e-5, atol=1e-5 * scale)
    ran = len(ref.obj)
    assert ran == niter or (niter == 40 and 5 < ran < 40)
    np.testing.assert_allclose(state.inertia[:ran], ref.obj, rtol=1e-5)
    np.testing.assert_allclose(final, D.astype(np.float64).sum(), rtol=1e-5)
    if ran < niter:  # Faiss stopped at a fixed point: our later passes repeat it exactly
        assert len(set(state.inertia[ran - 1:])) == 1 and final == state.inertia[-1]
    ref1, _ = km.lloyd(parts_stats(x, 1), km.LloydState(C0), niter, split_rngs)
    np.testing.assert_allclose(ref1.centroids, state.centroids, rtol=0, atol=1e-6 * scale)


def test_lloyd_resumed_from_any_saved_state_is_bit_identical():
    """Checkpoint/resume at the kernel level: the state handed to on_step after update j,
    fed back to lloyd, gives bit-identical centroids and history, split randomness included
    (C0 holds a duplicate centroid, so update 0 must split a cluster)."""
    x = blobs(seed=3, n=600)
    C0 = x[[40, 90, 140, 300, 400, 450, 520, 580]].copy()
    C0[7] = C0[2]  # cluster 7 never wins a tie against cluster 2: empty at the first update
    saved: list[km.LloydState] = []
    full, final = km.lloyd(parts_stats(x, 4), km.LloydState(C0), 6, split_rngs, saved.append)
    assert [s.iteration for s in saved] == [1, 2, 3, 4, 5, 6] and full.n_split >= 1
    for s in saved:
        again, final2 = km.lloyd(parts_stats(x, 4), s, 6, split_rngs)
        np.testing.assert_array_equal(again.centroids, full.centroids)
        assert again.inertia == full.inertia and final2 == final
        assert again.n_split == full.n_split
    other: list[km.LloydState] = []
    km.lloyd(parts_stats(x, 4), km.LloydState(C0), 1, lambda i: np.random.default_rng([78, i]),
             other.append)
    assert not np.array_equal(other[0].centroids, saved[0].centroids), "split ignored its rng"
