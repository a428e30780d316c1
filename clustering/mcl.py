"""Markov clustering kernels on row blocks of the transposed Markov matrix.

A block holds, for the nodes j of one id range, column j of the column-stochastic matrix M as
CSR row j (so A = M^T and (M M)^T = A A): expanding a block gathers the rows that its entries
name, wherever they are held. Every function is pure: arrays in, arrays out.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from vecgraph.graph.matrix import normalize_rows_sum


def expand(block: sp.csr_matrix, ids: np.ndarray, rows: sp.csr_matrix) -> sp.csr_matrix:
    """One expansion step for a block: A_block @ A, given the rows of A its entries name.

    block: (m, N) CSR; ids: (g,) sorted global ids; rows: (g, N) CSR, row t = row ids[t] of A.
    """
    local_cols = np.searchsorted(ids, block.indices)
    local = sp.csr_matrix((block.data, local_cols, block.indptr), shape=(block.shape[0], len(ids)))
    return (local @ rows).tocsr()


def expand_inflate(block: sp.csr_matrix, ids: np.ndarray, rows: sp.csr_matrix, inflation: float,
                   threshold: float, max_entries: int,
                   max_product: int = 1 << 22) -> sp.csr_matrix:
    """inflate(expand(block, ids, rows), ...) by chunks of block rows whose product holds at
    most about `max_product` entries (at least one row a chunk): the unpruned product of a
    whole block has up to s^2 entries per row (10 GB for 250k rows at s = 50), a chunk's is
    pruned before the next is formed. Rows are independent, so the result is the same bytes.
    """
    local_cols = np.searchsorted(ids, block.indices)
    local = sp.csr_matrix((block.data, local_cols, block.indptr), shape=(block.shape[0], len(ids)))
    # entries of product row i <= sum of the sizes of the rows it names
    work = np.concatenate([[0], np.cumsum(np.diff(rows.indptr)[local.indices])])[local.indptr]
    m, chunks, a = block.shape[0], [], 0
    while a < m or not chunks:
        b = min(m, max(a + 1, int(np.searchsorted(work, work[a] + max_product, "right")) - 1))
        chunks.append(inflate((local[a:b] @ rows).tocsr(), inflation, threshold, max_entries))
        a = b
    return sp.vstack(chunks, format="csr") if len(chunks) > 1 else chunks[0]


def prune_rows(block: sp.csr_matrix, threshold: float, max_entries: int) -> sp.csr_matrix:
    """Drop entries below `threshold`, then keep at most `max_entries` per row (largest values,
    ties by smaller column); each row's maximum is always kept."""
    block = block.tocsr()
    block.sum_duplicates()
    m = block.shape[0]
    rows = np.repeat(np.arange(m), np.diff(block.indptr))
    vals, cols = block.data, block.indices
    rmax = np.zeros(m)
    np.maximum.at(rmax, rows, vals)
    keep = (vals >= threshold) | (vals >= rmax[rows])
    order = np.lexsort((cols, -vals, rows))
    rank = np.empty(len(vals), np.int64)
    starts = np.searchsorted(rows[order], np.arange(m))
    rank[order] = np.arange(len(vals)) - starts[rows[order]]
    keep &= rank < max_entries
    return sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=block.shape)


def inflate(block: sp.csr_matrix, inflation: float, threshold: float,
            max_entries: int) -> sp.csr_matrix:
    """Raise entries to the power r, prune, renormalise each row (= column of M) to sum 1."""
    out = block.copy()
    out.data = np.power(out.data, inflation)
    out = normalize_rows_sum(out)
    return normalize_rows_sum(prune_rows(out, threshold, max_entries))


def chaos(block: sp.csr_matrix) -> float:
    """max over rows of (max entry - sum of squares): 0 when every row is idempotent."""
    if block.nnz == 0:
        return 0.0
    sq = block.multiply(block).sum(axis=1).A.ravel()
    mx = block.max(axis=1).toarray().ravel()
    return float(np.max(mx - sq))


def attractor_of(block: sp.csr_matrix, start: int) -> np.ndarray:
    """For each node of the block, the node it flows to most (ties: smaller id) -> (m,) int64.

    A node with an empty row flows to itself (a singleton)."""
    m = block.shape[0]
    parent = np.arange(start, start + m, dtype=np.int64)
    b = block.tocsr()
    rows = np.repeat(np.arange(m), np.diff(b.indptr))
    if len(rows):
        order = np.lexsort((b.indices, -b.data, rows))
        first = np.ones(len(order), bool)
        first[1:] = rows[order][1:] != rows[order][:-1]
        sel = order[first]
        parent[rows[sel]] = b.indices[sel]
    return parent


def clusters_from_attractors(ids: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """Clusters = connected components of the node -> attractor links.

    ids: (n,) int64 sorted node ids, parent: (n,) int64 ids. Returns (n,) int64 cluster
    numbers 0..C-1, numbered by the smallest id of each cluster (deterministic).
    """
    from scipy.sparse.csgraph import connected_components

    pos_parent = np.searchsorted(ids, parent)
    n = len(ids)
    g = sp.csr_matrix((np.ones(n), (np.arange(n), pos_parent)), shape=(n, n))
    _, comp = connected_components(g, directed=True, connection="weak")
    # Renumber by smallest member: components are found in order of their smallest position.
    _, first = np.unique(comp, return_index=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[comp]
