"""k-means kernels: assignment, partial sums, centroid update with empty-cluster splitting, and
the Lloyd loop over any `stats(centroids)` function (one array, parts, or a fleet of actors)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from vecgraph.graph.knn import array_module


def assign(x: Any, centroids: Any, block: int = 65536) -> tuple[Any, Any]:
    """Nearest centroid of each row: x (n, d) float32, centroids (k, d) float32 ->
    (n,) int64 cluster, (n,) float32 squared L2 distance (ties: smaller cluster number)."""
    xp = array_module(x)
    k = len(centroids)
    block = max(1, min(block, (4 << 20) // max(k, 1)))  # (block, k) scores stay cache-sized
    c_norms = (centroids * centroids).sum(1)[None, :]
    labels, dists = [], []
    for a in range(0, len(x), block):
        q = x[a:a + block]
        # argmin over ||c||^2 - 2<x, c> (the row's ||x||^2 is the same for every centroid),
        # computed in place on the GEMM output: no (block, k) temporaries.
        S = q @ centroids.T
        S *= -2
        S += c_norms
        c = xp.argmin(S, axis=1)
        labels.append(c)
        best = xp.take_along_axis(S, c[:, None], 1)[:, 0] + (q * q).sum(1)
        dists.append(xp.maximum(best, 0))
    if not labels:
        return xp.zeros(0, xp.int64), xp.zeros(0, xp.float32)
    return xp.concatenate(labels).astype(xp.int64), xp.concatenate(dists).astype(xp.float32)


def partial_sums(x: Any, labels: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (k, d) float64 and counts (k,) int64 of one part's rows."""
    xp = array_module(x)
    sums = xp.zeros((k, x.shape[1]), xp.float64)
    counts = xp.bincount(labels, minlength=k).astype(xp.int64)
    if xp is not np:
        xp.add.at(sums, labels, x.astype(xp.float64))
        return sums, counts
    # Rows grouped by cluster, then one reduceat: np.add.at is ~50x slower.
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    nonempty = counts > 0
    if nonempty.any():
        sums[nonempty] = np.add.reduceat(x[order].astype(np.float64), starts[nonempty], axis=0)
    return sums, counts


def stats(x: Any, centroids: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """Partial sums (k, d) float64, counts (k,) int64 and inertia (float64 sum of squared L2
    distances to the nearest centroid) of the rows x (n, d) float32."""
    labels, dist = assign(x, centroids)
    sums, counts = partial_sums(x, labels, len(centroids))
    return sums, counts, float(dist.astype(np.float64).sum())


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


INIT_METHODS = ("kmeans++", "random")


def init_centroids(sample: np.ndarray, k: int, method: str,
                   rng: np.random.Generator) -> np.ndarray:
    """k initial centroids (k, d) float32 from a sample (n, d): k-means++ or random rows."""
    if method not in INIT_METHODS:
        raise ValueError(f"method={method!r} should be one of {INIT_METHODS}")
    if method == "random":
        return sample[rng.choice(len(sample), k, replace=False)].astype(np.float32)
    from sklearn.cluster import kmeans_plusplus
    seed = int(rng.integers(2**31 - 1))
    centers, _ = kmeans_plusplus(sample.astype(np.float32), k, random_state=seed)
    return centers.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LloydState:
    """A Lloyd run between two iterations: `centroids` (k, d) float32 after `iteration` updates;
    `inertia[i]` is the inertia of the centroids before update i (Faiss's `obj[i]`), `n_split` the
    empty clusters re-seeded so far. Everything a resumed run needs (randomness is per update)."""
    centroids: np.ndarray
    iteration: int = 0
    inertia: tuple[float, ...] = ()
    n_split: int = 0


Stats = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, float]]


def lloyd(stats: Stats, state: LloydState, niter: int,
          rngs: Callable[[int], np.random.Generator],
          on_step: Callable[[LloydState], None] | None = None) -> tuple[LloydState, float]:
    """Lloyd iterations from `state` until `niter` updates are done, as Faiss's Clustering does:
    each iteration assigns every row to the current centroids, then moves each centroid to the
    mean of its rows (an empty cluster splits the largest, see update_centroids).

    stats(centroids (k, d) float32) -> (sums (k, d) float64, counts (k,), inertia) over all rows,
    however they are held (`stats` of one array, a sum over parts, actors). rngs(i): the generator
    of update i, so a run resumed from a saved state draws what an uninterrupted one drew.
    on_step(state) is called after every update (to checkpoint it).
    Returns (final state, inertia of its centroids): state.inertia has `niter` entries.
    """
    while True:
        sums, counts, obj = stats(state.centroids)
        if state.iteration >= niter:
            return state, float(obj)
        new, n_empty = update_centroids(sums, counts, state.centroids, rngs(state.iteration))
        state = LloydState(new, state.iteration + 1, (*state.inertia, float(obj)),
                           state.n_split + n_empty)
        if on_step is not None:
            on_step(state)
