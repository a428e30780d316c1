"""k-means kernels: assignment, partial sums, centroid update with empty-cluster splitting."""
from __future__ import annotations

from typing import Any

import numpy as np

from vecgraph.graph.knn import array_module, pairwise_distances


def assign(x: Any, centroids: Any, block: int = 65536) -> tuple[Any, Any]:
    """Nearest centroid of each row: x (n, d) float32, centroids (k, d) float32 ->
    (n,) int64 cluster, (n,) float32 squared L2 distance (ties: smaller cluster number)."""
    xp = array_module(x)
    labels, dists = [], []
    for a in range(0, len(x), block):
        D = pairwise_distances(x[a:a + block], centroids, "l2")
        c = xp.argmin(D, axis=1)
        labels.append(c)
        dists.append(xp.take_along_axis(D, c[:, None], 1)[:, 0])
    if not labels:
        return xp.zeros(0, xp.int64), xp.zeros(0, xp.float32)
    return xp.concatenate(labels).astype(xp.int64), xp.concatenate(dists).astype(xp.float32)


def partial_sums(x: Any, labels: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (k, d) float64 and counts (k,) int64 of one part's rows."""
    xp = array_module(x)
    sums = xp.zeros((k, x.shape[1]), xp.float64)
    xp.add.at(sums, labels, x.astype(xp.float64))
    counts = xp.bincount(labels, minlength=k).astype(xp.int64)
    return sums, counts


def update_centroids(sums: np.ndarray, counts: np.ndarray, centroids: np.ndarray,
                     rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """New centroids (k, d) float32 from reduced sums/counts; an empty cluster takes half of
    the largest one (its centroid split by a small symmetric perturbation, as Faiss does).
    Returns (centroids, number of empty clusters re-seeded)."""
    counts = counts.astype(np.float64).copy()
    new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)
    empty = np.flatnonzero(counts == 0)
    for c in empty:
        big = int(np.argmax(counts))
        eps = 1e-4 * (np.abs(new[big]) + 1e-6) * rng.choice([-1.0, 1.0], size=new.shape[1])
        new[c] = new[big] + eps
        new[big] = new[big] - eps
        counts[c] = counts[big] / 2
        counts[big] -= counts[c]
    return new.astype(np.float32), len(empty)


def init_centroids(sample: np.ndarray, k: int, method: str,
                   rng: np.random.Generator) -> np.ndarray:
    """k initial centroids (k, d) float32 from a sample (n, d): k-means++ or random rows."""
    if method == "random":
        return sample[rng.choice(len(sample), k, replace=False)].astype(np.float32)
    from sklearn.cluster import kmeans_plusplus
    seed = int(rng.integers(2**31 - 1))
    centers, _ = kmeans_plusplus(sample.astype(np.float32), k, random_state=seed)
    return centers.astype(np.float32)
