"""The weighted graph matrix shared by MCL and label propagation (DESIGN §4), in row blocks.

Edge weight w = exp(-d / sigma), d the metric distance (sqrt of squared L2, 1 - cos, or for
`ip` the distance above the graph's smallest one), sigma the mean k-NN distance; the matrix is
symmetrised by max(w_ij, w_ji). Nodes are partitioned by id range: a block holds the rows of
ids [start, stop) as a CSR matrix with global column ids.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def metric_distance(D: np.ndarray, metric: str, shift: float = 0.0) -> np.ndarray:
    """Stored graph distances (n, k) float32 -> the distance used for weights, >= 0."""
    D = D.astype(np.float64)
    if metric == "l2":
        return np.sqrt(np.maximum(D, 0))
    if metric == "cosine":
        return np.maximum(D, 0)
    return D - shift  # ip: -<x,y> shifted so the closest pair in the graph is at 0


def edge_weights(D: np.ndarray, metric: str, sigma: float, shift: float = 0.0) -> np.ndarray:
    """(n, k) stored distances -> (n, k) float64 weights exp(-d / sigma); inf -> 0."""
    d = metric_distance(D, metric, shift)
    w = np.exp(-d / sigma) if sigma > 0 else np.ones_like(d)
    return np.where(np.isfinite(d), w, 0.0)


def owner(ids: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Part of each id, for parts starting at `starts` (P,) int64 sorted -> (n,) int64."""
    return np.searchsorted(starts, ids, side="right") - 1


def edges_of_rows(ids: np.ndarray, I: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, ...]:
    """Graph rows -> edge list (rows, cols, weights) without holes (-1) or zero weights."""
    rows = np.repeat(ids, I.shape[1])
    cols, w = I.reshape(-1), W.reshape(-1)
    keep = (cols >= 0) & (w > 0)
    return rows[keep], cols[keep], w[keep]


def split_by_owner(rows: np.ndarray, cols: np.ndarray, w: np.ndarray,
                   starts: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Reversed edges (col -> row) grouped by the part owning `col`: P triples (rows, cols, w)."""
    part = owner(cols, starts)
    return [(cols[part == p], rows[part == p], w[part == p]) for p in range(len(starts))]


def symmetric_block(start: int, stop: int, n_cols: int,
                    edges: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> sp.csr_matrix:
    """Rows [start, stop) of the max-symmetrised matrix from forward and reversed edge lists.

    edges: triples (rows in [start, stop), global cols, weights). Returns a
    (stop - start, n_cols) float64 CSR matrix; duplicate (row, col) pairs keep the max weight.
    """
    rows = np.concatenate([e[0] for e in edges]) - start
    cols = np.concatenate([e[1] for e in edges])
    w = np.concatenate([e[2] for e in edges])
    keep = rows + start != cols  # drop self edges (duplicates of the node are other ids)
    rows, cols, w = rows[keep], cols[keep], w[keep]
    order = np.lexsort((-w, cols, rows))
    rows, cols, w = rows[order], cols[order], w[order]
    first = np.ones(len(rows), bool)
    first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
    return sp.csr_matrix((w[first], (rows[first], cols[first])), shape=(stop - start, n_cols))


def add_self_loops_column_max(block: sp.csr_matrix, start: int) -> sp.csr_matrix:
    """MCL's default self-loops: node j gets a loop of weight max_i w_ij (1 when isolated).

    Works on a row block of a symmetric matrix, where row j equals column j.
    """
    m = block.shape[0]
    loop = block.max(axis=1).toarray().ravel()
    loop[loop <= 0] = 1.0
    diag = sp.csr_matrix((loop, (np.arange(m), np.arange(start, start + m))), shape=block.shape)
    return (block + diag).tocsr()


def normalize_rows_sum(block: sp.csr_matrix) -> sp.csr_matrix:
    """Scale each row to sum 1 (rows of zeros stay zero)."""
    s = np.asarray(block.sum(axis=1)).ravel()
    inv = np.where(s > 0, 1.0 / np.where(s > 0, s, 1), 0.0)
    return sp.csr_matrix(sp.diags(inv) @ block)


def row_requests(block: sp.csr_matrix, starts: np.ndarray) -> list[np.ndarray]:
    """Ids of the rows a block's entries name (to gather for a product), grouped by the part
    owning them: P sorted (n_q,) int64 arrays."""
    cols = np.unique(block.indices).astype(np.int64)
    part = owner(cols, starts)
    return [cols[part == q] for q in range(len(starts))]


def take_rows(block: sp.csr_matrix, start: int, ids: np.ndarray) -> sp.csr_matrix:
    """Rows `ids` (global ids owned by this block) as a (len(ids), n_cols) CSR matrix."""
    return block[ids - start]
