"""graph/matrix.py against a dense numpy graph matrix built edge by edge in the test.

All weights are float64; the block path and the dense reference evaluate the same exp() of the
same float64 distances, so they agree to rtol 1e-12 (a reordering of max/sum at most).
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from tests.conftest import nasty_vectors
from vecgraph.graph import matrix


def knn_graph(n: int = 60, k: int = 5, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A brute-force squared-L2 k-NN graph (ids, I, D) of nasty vectors, with -1/+inf holes."""
    x = nasty_vectors(np.random.default_rng(seed), n=300, d=8)[:n].astype(np.float64)
    x[50] = x[40]  # a duplicate pair across parts (rows 10..24 already copy row 3)
    D = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(D, np.inf)
    I = np.argsort(D, axis=1, kind="stable")[:, :k]
    Dk = np.take_along_axis(D, I, 1).astype(np.float32)
    I[7, 3:] = -1          # holes, as when fewer than k nodes exist
    Dk[7, 3:] = np.inf
    I[30, 4] = -1
    Dk[30, 4] = 0.0        # a hole with a garbage finite distance must still be dropped
    return np.arange(n, dtype=np.int64), I.astype(np.int64), Dk


def dense_reference(I: np.ndarray, D: np.ndarray, metric: str, sigma: float,
                    shift: float = 0.0) -> np.ndarray:
    """W[i, j] = max over both directions of exp(-d/sigma), no holes, no self edges."""
    n = len(I)
    W = np.zeros((n, n))
    for i in range(n):
        for j, d in zip(I[i], D[i].astype(np.float64)):
            if j < 0 or not np.isfinite(d) or j == i:
                continue
            dist = {"l2": np.sqrt(max(d, 0.0)), "cosine": max(d, 0.0), "ip": d - shift}[metric]
            W[i, j] = max(W[i, j], np.exp(-dist / sigma))
    return np.maximum(W, W.T)


def build_blocks(ids, I, D, metric, sigma, starts, shift=0.0):
    """The graph_matrix stage's 3 passes, on arrays: own edges, reversed edges by owner, blocks."""
    n = len(ids)
    bounds = list(zip(starts, list(starts[1:]) + [n]))
    own, sent = [], []
    for a, b in bounds:
        rows, cols, w = matrix.edges_of_rows(ids[a:b], I[a:b],
                                             matrix.edge_weights(D[a:b], metric, sigma, shift))
        own.append((rows, cols, w))
        sent.append(matrix.split_by_owner(rows, cols, w, np.asarray(starts)))
    return [matrix.symmetric_block(a, b, n, [own[p]] + [sent[q][p] for q in range(len(bounds))])
            for p, (a, b) in enumerate(bounds)]


# ---------------------------------------------------------------- weights


def test_metric_distance_and_edge_weights_hand_worked():
    D = np.array([[4.0, -1e-7, np.inf]], np.float32)
    np.testing.assert_allclose(matrix.metric_distance(D, "l2"), [[2.0, 0.0, np.inf]])
    np.testing.assert_allclose(matrix.metric_distance(D, "cosine"), [[4.0, 0.0, np.inf]])
    Dip = np.array([[-3.0, -1.0]], np.float32)
    np.testing.assert_allclose(matrix.metric_distance(Dip, "ip", shift=-3.0), [[0.0, 2.0]])
    w = matrix.edge_weights(D, "l2", sigma=2.0)
    np.testing.assert_allclose(w, [[np.exp(-1.0), 1.0, 0.0]], rtol=1e-15)
    w = matrix.edge_weights(D, "l2", sigma=0.0)  # degenerate sigma: unit weights, holes still 0
    np.testing.assert_array_equal(w, [[1.0, 1.0, 0.0]])
    assert matrix.edge_weights(D, "cosine", 1.0).dtype == np.float64


def test_owner_hand_worked():
    starts = np.array([0, 10, 25], np.int64)
    ids = np.array([0, 9, 10, 24, 25, 100], np.int64)
    np.testing.assert_array_equal(matrix.owner(ids, starts), [0, 0, 1, 1, 2, 2])


def test_edges_of_rows_drops_holes_and_zero_weights():
    ids = np.array([4, 5], np.int64)
    I = np.array([[5, -1, 7], [4, 6, 9]], np.int64)
    W = np.array([[0.5, 0.9, 0.0], [0.5, 0.25, 0.125]])
    rows, cols, w = matrix.edges_of_rows(ids, I, W)
    np.testing.assert_array_equal(rows, [4, 5, 5, 5])
    np.testing.assert_array_equal(cols, [5, 4, 6, 9])
    np.testing.assert_array_equal(w, [0.5, 0.5, 0.25, 0.125])


# ---------------------------------------------------------------- symmetric matrix


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
@pytest.mark.parametrize("starts", [[0], [0, 17, 40], [0, 1, 2, 30, 59]])
def test_symmetric_blocks_equal_dense_reference(metric, starts):
    ids, I, D = knn_graph()
    if metric == "cosine":
        D = np.where(np.isfinite(D), D / (D[np.isfinite(D)].max() * 1.01), D).astype(np.float32)
    shift = 0.0
    if metric == "ip":  # stored -<x,y> can be negative; shifted so the smallest is at 0
        D = np.where(np.isfinite(D), D - 50.0, D).astype(np.float32)
        shift = float(D[np.isfinite(D)].min())
    sigma = 1.7
    blocks = build_blocks(ids, I, D, metric, sigma, starts, shift)
    W = sp.vstack(blocks, format="csr").toarray()
    ref = dense_reference(I, D, metric, sigma, shift)
    np.testing.assert_allclose(W, ref, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(W, W.T)
    assert (np.diag(W) == 0).all()
    assert all(b.shape == (bb - a, len(ids)) for b, a, bb in
               zip(blocks, starts, list(starts[1:]) + [len(ids)]))


def test_symmetric_block_keeps_max_of_duplicate_pairs_and_drops_self_edges():
    edges = [(np.array([0, 0, 1, 1]), np.array([1, 1, 1, 0]), np.array([0.2, 0.7, 0.9, 0.4]))]
    B = matrix.symmetric_block(0, 2, 2, edges).toarray()
    np.testing.assert_array_equal(B, [[0.0, 0.7], [0.4, 0.0]])  # (1,1) self edge dropped


# ---------------------------------------------------------------- self loops, normalisation


def test_self_loops_column_max_and_row_normalisation_by_block():
    _ids, I, D = knn_graph()
    W = dense_reference(I, D, "l2", 2.0)
    W[:, 45] = W[45, :] = 0  # an isolated node
    starts = [0, 20, 41]
    bounds = list(zip(starts, starts[1:] + [len(W)]))
    blocks = [matrix.add_self_loops_column_max(sp.csr_matrix(W[a:b]), a) for a, b in bounds]
    A = sp.vstack(blocks, format="csr").toarray()
    loop = W.max(axis=0)
    loop[loop == 0] = 1.0
    np.testing.assert_allclose(A, W + np.diag(loop), rtol=1e-15)
    assert A[45, 45] == 1.0 and A[45].sum() == 1.0
    N = sp.vstack([matrix.normalize_rows_sum(b) for b in blocks], format="csr").toarray()
    np.testing.assert_allclose(N, A / A.sum(1, keepdims=True), rtol=1e-14)
    np.testing.assert_allclose(N.sum(1), 1.0, rtol=1e-14)


def test_normalize_rows_sum_zero_row_stays_zero():
    B = sp.csr_matrix(np.array([[0.0, 2.0, 6.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    N = matrix.normalize_rows_sum(B).toarray()
    np.testing.assert_array_equal(N, [[0.0, 0.25, 0.75], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])


# ---------------------------------------------------------------- gathering rows across parts


def test_row_requests_and_take_rows_give_the_dense_product():
    ids, I, D = knn_graph()
    starts = [0, 13, 33, 50]
    A = sp.vstack(build_blocks(ids, I, D, "l2", 1.0, starts), format="csr")
    Ad = A.toarray()
    bounds = list(zip(starts, starts[1:] + [len(ids)]))
    blocks = [A[a:b] for a, b in bounds]
    for p, (a, b) in enumerate(bounds):
        req = matrix.row_requests(blocks[p], np.array(starts))
        assert len(req) == len(starts)
        named = np.flatnonzero(Ad[a:b].any(0))
        np.testing.assert_array_equal(np.concatenate(req), named)
        for q, (qa, qb) in enumerate(bounds):
            assert ((req[q] >= qa) & (req[q] < qb)).all() and req[q].dtype == np.int64
        rows = sp.vstack([matrix.take_rows(blocks[q], starts[q], req[q])
                          for q in range(len(starts))], format="csr")
        np.testing.assert_array_equal(rows.toarray(), Ad[named])
        # the gathered rows are all a block needs for its slice of A @ A
        prod = blocks[p][:, named] @ rows
        np.testing.assert_allclose(prod.toarray(), (Ad @ Ad)[a:b], rtol=1e-12, atol=1e-15)
