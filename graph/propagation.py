"""Label propagation kernels: seeded diffusion over row blocks, top-m label scores per node.

F <- P F with P = D^-1 W (row-stochastic, W the symmetric graph matrix), seeds clamped to
their one-hot label (Zhu & Ghahramani 2002; Douze et al. 2017 at scale). Each node keeps only
its m best (label, score) pairs, so a block's state is (n_block, m) whatever the class count.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def node_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) key per id from a seeded hash (splitmix64): the same for an id whatever
    the partitioning. ids: (n,) int64 -> (n,) float64."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def empty_state(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """State of n unlabelled nodes: labels (n, m) int32 = -1, scores (n, m) float32 = 0."""
    return np.full((n, m), -1, np.int32), np.zeros((n, m), np.float32)


def clamp(labels: np.ndarray, scores: np.ndarray, seed_rows: np.ndarray,
          seed_codes: np.ndarray) -> None:
    """Set the seed rows (in place) to their one-hot label with score 1."""
    labels[seed_rows] = -1
    scores[seed_rows] = 0
    labels[seed_rows, 0] = seed_codes
    scores[seed_rows, 0] = 1


def top_m(rows: np.ndarray, codes: np.ndarray, vals: np.ndarray, n: int,
          m: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, label, score) triples, one per pair -> each row's m best, descending (ties: smaller
    label). Returns labels (n, m) int32 (-1 padding), scores (n, m) float32."""
    labels, scores = empty_state(n, m)
    order = np.lexsort((codes, -vals, rows))
    rows, codes, vals = rows[order], codes[order], vals[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left")
    keep = (rank < m) & (vals > 0)
    labels[rows[keep], rank[keep]] = codes[keep]
    scores[rows[keep], rank[keep]] = vals[keep]
    return labels, scores


def diffuse(P: sp.csr_matrix, ids: np.ndarray, labels: np.ndarray, scores: np.ndarray,
            n_classes: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """One step F_block <- P_block F for a row block.

    P: (n_block, N) CSR row-stochastic with global columns; ids: (g,) sorted ids of the rows
    gathered for it; labels/scores: (g, m') their state. Returns the block's new state (n, m).
    """
    P = P.tocoo()
    t = np.searchsorted(ids, P.col)
    mm = labels.shape[1]
    lab = labels[t].reshape(-1)
    val = (P.data[:, None] * scores[t]).reshape(-1)
    row = np.repeat(P.row, mm)
    ok = lab >= 0
    agg = sp.csr_matrix((val[ok], (row[ok], lab[ok])), shape=(P.shape[0], n_classes))
    agg.sum_duplicates()
    agg = agg.tocoo()
    return top_m(agg.row.astype(np.int64), agg.col.astype(np.int64), agg.data, P.shape[0], m)


def predict(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best label code per node (-1 when none reached it) and its share of the node's kept
    score mass: (n,) int32, (n,) float32."""
    total = scores.sum(1)
    share = np.where(total > 0, scores[:, 0] / np.where(total > 0, total, 1), 0)
    return np.where(total > 0, labels[:, 0], -1).astype(np.int32), share.astype(np.float32)
