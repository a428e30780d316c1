"""clustering/mcl.py against a dense numpy MCL written here and van Dongen's `mcl` binary.

Kernel pipeline (as jobs/mcl.py): symmetric W -> add_self_loops_column_max ->
normalize_rows_sum -> repeat(expand with gathered rows, inflate) -> attractor_of ->
clusters_from_attractors. The blocks hold M^T, so after t iterations they must equal the dense
reference's M^T to rtol 1e-9 (float64 both, different summation order).
"""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from sklearn.metrics import adjusted_rand_score

from vecgraph.clustering import mcl
from vecgraph.graph import matrix


def canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber a partition 0..C-1 in order of each cluster's smallest node."""
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inv]


def clustered_graph(seed: int = 5):
    """Groups of sizes 6, 5, 7, 4 (dense, strong weights) joined by a few weak edges, a pair
    component, and two isolated nodes; node ids shuffled. Returns W (n, n), true groups."""
    rng = np.random.default_rng(seed)
    sizes = [6, 5, 7, 4, 2, 1, 1]
    group = np.repeat(np.arange(len(sizes)), sizes)
    n = len(group)
    W0 = np.zeros((n, n))
    for g in range(5):
        idx = np.flatnonzero(group == g)
        for a in idx:
            for b in idx:
                if a < b and (rng.random() < 0.85 or b == a + 1):
                    W0[a, b] = rng.uniform(0.5, 1.0)
    for _ in range(4):  # weak bridges between the four big groups
        g1, g2 = rng.choice(4, 2, replace=False)
        a, b = rng.choice(np.flatnonzero(group == g1)), rng.choice(np.flatnonzero(group == g2))
        W0[min(a, b), max(a, b)] = rng.uniform(0.01, 0.05)
    W0 = np.maximum(W0, W0.T)
    perm = rng.permutation(n)
    W = np.zeros_like(W0)
    W[np.ix_(perm, perm)] = W0
    truth = np.empty(n, np.int64)
    truth[perm] = group
    return W, truth


def dense_mcl(W: np.ndarray, inflation: float = 2.0, max_iter: int = 200,
              n_iter: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Textbook MCL on a dense column-stochastic matrix: loops = column max (1 if isolated),
    expand = M @ M, inflate = entrywise power then column normalisation, until M stops
    changing; clusters = connected components of {j -> i : M[i, j] > 0}."""
    M = W.astype(np.float64).copy()
    loop = M.max(axis=0)
    loop[loop <= 0] = 1.0
    M += np.diag(loop)
    M /= M.sum(axis=0, keepdims=True)
    for _it in range(n_iter if n_iter is not None else max_iter):
        M2 = np.linalg.matrix_power(M, 2) ** inflation
        M2 /= M2.sum(axis=0, keepdims=True)
        done = np.abs(M2 - M).max() < 1e-13
        M = M2
        if n_iter is None and done:
            break
    flow = np.where(M < 1e-9, 0, M)  # entries that only tend to zero
    _, comp = connected_components(sp.csr_matrix(flow), directed=False)
    return canonical(comp), M


def kernel_mcl(W: np.ndarray, starts: list[int], inflation: float = 2.0,
               threshold: float = 0.0, max_entries: int | None = None,
               max_iter: int = 200, tol: float = 1e-12, n_iter: int | None = None):
    """jobs/mcl.py's plan on arrays: P id-range blocks, rows gathered across blocks."""
    n = len(W)
    max_entries = max_entries or n
    S = np.asarray(starts, np.int64)
    bounds = list(zip(starts, list(starts[1:]) + [n]))
    blocks = [matrix.normalize_rows_sum(
        matrix.add_self_loops_column_max(sp.csr_matrix(W[a:b]), a)) for a, b in bounds]
    for _ in range(n_iter if n_iter is not None else max_iter):
        reqs = [matrix.row_requests(b, S) for b in blocks]
        new = []
        for p, blk in enumerate(blocks):
            ids = np.concatenate(reqs[p])
            rows = sp.vstack([matrix.take_rows(blocks[q], starts[q], reqs[p][q])
                              for q in range(len(blocks))], format="csr")
            new.append(mcl.inflate(mcl.expand(blk, ids, rows), inflation, threshold,
                                   max_entries))
        blocks = new
        if n_iter is None and max(mcl.chaos(b) for b in blocks) < tol:
            break
    parent = np.concatenate([mcl.attractor_of(b, a) for b, (a, _) in zip(blocks, bounds)])
    return mcl.clusters_from_attractors(np.arange(n, dtype=np.int64), parent), blocks


# ---------------------------------------------------------------- small kernels


def test_expand_equals_dense_product():
    A = sp.random(12, 12, density=0.3, random_state=1, format="csr")
    blk = A[4:9]
    ids = np.unique(blk.indices).astype(np.int64)
    got = mcl.expand(blk, ids, A[ids]).toarray()
    np.testing.assert_allclose(got, (A.toarray() @ A.toarray())[4:9], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("max_product", [1, 7, 40, 1 << 22])
def test_expand_inflate_by_chunks_is_the_same_bytes(max_product):
    # Chunks of one row, of a few rows and the whole block at once must give identical bytes.
    A = sp.random(60, 60, density=0.15, random_state=2, format="lil")
    A[9] = 0  # an empty row
    A = A.tocsr()
    A.eliminate_zeros()
    blk = A[10:45]
    ids = np.unique(blk.indices).astype(np.int64)
    ref = mcl.inflate(mcl.expand(blk, ids, A[ids]), 2.0, 1e-3, 4)
    got = mcl.expand_inflate(blk, ids, A[ids], 2.0, 1e-3, 4, max_product=max_product)
    ref.sort_indices()
    got.sort_indices()
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got.indptr, ref.indptr)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.data, ref.data)


def prune_reference(B: np.ndarray, threshold: float, max_entries: int) -> np.ndarray:
    out = np.zeros_like(B)
    for i, row in enumerate(B):
        nz = [(-v, j) for j, v in enumerate(row) if v != 0]
        rmax = max((-v for v, _ in nz), default=0)
        kept = [(v, j) for v, j in sorted(nz) if -v >= threshold or -v >= rmax][:max_entries]
        for v, j in kept:
            out[i, j] = -v
    return out


@pytest.mark.parametrize("threshold,max_entries", [(0.0, 100), (0.2, 100), (0.0, 2), (0.3, 3),
                                                   (0.99, 1)])
def test_prune_rows_against_python_reference(threshold, max_entries):
    rng = np.random.default_rng(3)
    B = rng.choice([0, 0, 0.1, 0.2, 0.25, 0.4], size=(15, 10))  # many ties
    B[4] = 0            # an empty row
    B[7] = 0
    B[7, 3] = 0.1       # a row whose max is below the threshold: kept anyway
    got = mcl.prune_rows(sp.csr_matrix(B), threshold, max_entries).toarray()
    np.testing.assert_array_equal(got, prune_reference(B, threshold, max_entries))


def test_inflate_against_dense_reference():
    rng = np.random.default_rng(4)
    B = rng.random((9, 9)) * (rng.random((9, 9)) < 0.5)
    B[2] = 0
    r, thr, s = 1.7, 0.05, 3
    got = mcl.inflate(sp.csr_matrix(B), r, thr, s).toarray()

    def rownorm(X):
        t = X.sum(1, keepdims=True)
        return np.where(t > 0, X / np.where(t > 0, t, 1), 0)
    ref = rownorm(prune_reference(rownorm(B ** r), thr, s))
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)
    assert (got[2] == 0).all()


def test_chaos_hand_worked():
    assert mcl.chaos(sp.csr_matrix(np.array([[0.5, 0.5], [1.0, 0.0]]))) == 0.0
    assert mcl.chaos(sp.csr_matrix(np.array([[0.6, 0.4], [1.0, 0.0]]))) == pytest.approx(
        0.6 - (0.36 + 0.16), abs=1e-15)
    assert mcl.chaos(sp.csr_matrix((3, 3))) == 0.0


def test_attractor_of_hand_worked():
    blk = sp.csr_matrix((np.array([0.5, 0.5, 0.1, 0.9]),
                         (np.array([0, 0, 2, 2]), np.array([12, 11, 10, 15]))), shape=(3, 20))
    # node 10: tie 11/12 -> smaller id; node 11: empty row -> itself; node 12 -> 15
    np.testing.assert_array_equal(mcl.attractor_of(blk, 10), [11, 11, 15])


def test_clusters_from_attractors_hand_worked():
    ids = np.array([2, 5, 7, 9, 11], np.int64)
    parent = np.array([5, 5, 11, 7, 11], np.int64)
    np.testing.assert_array_equal(mcl.clusters_from_attractors(ids, parent), [0, 0, 1, 1, 1])
    # numbering follows each cluster's smallest id, not discovery order
    ids = np.arange(1, 5, dtype=np.int64)
    np.testing.assert_array_equal(mcl.clusters_from_attractors(ids, np.array([4, 2, 4, 4])),
                                  [0, 1, 0, 0])


# ---------------------------------------------------------------- whole pipeline


@pytest.mark.parametrize("starts", [[0], [0, 9, 20], [0, 1, 2, 3, 15, 25]])
def test_iterations_match_dense_matrix(starts):
    W, _ = clustered_graph()
    for n_iter in (1, 3, 6):
        _, M = dense_mcl(W, n_iter=n_iter)
        _, blocks = kernel_mcl(W, starts, n_iter=n_iter)
        A = sp.vstack(blocks, format="csr").toarray()
        np.testing.assert_allclose(A, M.T, rtol=1e-9, atol=1e-12,
                                   err_msg=f"after {n_iter} iterations")


@pytest.mark.parametrize("starts", [[0], [0, 9, 20], [0, 1, 2, 3, 15, 25]])
def test_clusters_match_dense_reference_and_truth(starts):
    W, truth = clustered_graph()
    ref, _ = dense_mcl(W)
    got, _ = kernel_mcl(W, starts)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got, canonical(truth))
    assert adjusted_rand_score(truth, got) == 1.0
    # the two isolated nodes are singletons, the pair is one cluster
    assert len(np.unique(got)) == 7


def test_default_pruning_keeps_the_partition():
    W, truth = clustered_graph(seed=8)
    got1, _ = kernel_mcl(W, [0], threshold=1e-4, max_entries=4, tol=1e-6)
    got3, _ = kernel_mcl(W, [0, 7, 19], threshold=1e-4, max_entries=4, tol=1e-6)
    np.testing.assert_array_equal(got1, got3)
    np.testing.assert_array_equal(got1, canonical(truth))


def read_mcl_clusters(path, n: int) -> np.ndarray:
    labels = np.full(n, -1, np.int64)
    with open(path) as f:
        for c, line in enumerate(f):
            for tok in line.split():
                labels[int(tok)] = c
    lonely = np.flatnonzero(labels < 0)  # nodes without edges are not in the abc input
    labels[lonely] = labels.max() + 1 + np.arange(len(lonely))
    return labels


@pytest.mark.skipif(shutil.which("mcl") is None,
                    reason="van Dongen's `mcl` binary is not on PATH (Debian package mcl)")
@pytest.mark.parametrize("seed", [5, 8, 13])
def test_matches_van_dongen_mcl(tmp_path, seed):
    W, truth = clustered_graph(seed)
    n = len(W)
    i, j = np.nonzero(np.triu(W, 1))
    abc = tmp_path / "in.abc"
    abc.write_text("".join(f"{a}\t{b}\t{W[a, b]!r}\n" for a, b in zip(i, j)))
    out = tmp_path / "out.txt"
    subprocess.run(["mcl", str(abc), "--abc", "-I", "2.0", "-o", str(out), "-q", "x",
                    "-V", "all"], check=True, capture_output=True, timeout=30)
    theirs = read_mcl_clusters(out, n)
    ours, _ = kernel_mcl(W, [0, 10, 21], threshold=1e-4, max_entries=50, tol=1e-6)
    assert adjusted_rand_score(theirs, ours) == 1.0
    np.testing.assert_array_equal(ours, canonical(theirs))
    assert adjusted_rand_score(truth, ours) == 1.0
