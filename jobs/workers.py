"""Ray actors that pin one vector part (and its index shard) in memory for a stage."""
from __future__ import annotations

from typing import Any

import numpy as np
import ray

from vecgraph.clustering import kmeans as km
from vecgraph.graph import knn
from vecgraph.jobs import runtime
from vecgraph.sharding import schema, storage
from vecgraph.sharding.errors import InputError


def load_part(vectors_uri: str, path: str, metric: str,
              on_invalid: str = "error") -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,) int64, x (n, d) float32) of one vector part; rows unit-normalised for cosine.

    Zero vectors have no cosine: an InputError naming their ids, or with on_invalid=skip they
    are left out (of the index shard and the graph alike)."""
    t = storage.read_table(storage.join(vectors_uri, path), [schema.ID, schema.VECTOR])
    ids = t.column(schema.ID).to_numpy()
    x = schema.list_column(t, schema.VECTOR, np.float32)
    if metric == "cosine":
        zero = ~(x != 0).any(axis=1)
        if zero.any():
            if on_invalid != "skip":
                raise InputError(f"{storage.join(vectors_uri, path)}: knn.metric=cosine but the "
                                 f"vectors of ids {ids[zero][:10].tolist()}"
                                 f"{' …' if zero.sum() > 10 else ''} ({int(zero.sum())} in this part) "
                                 f"are all zeros, which have no direction; drop them, use another "
                                 f"metric, or set on_invalid=skip to leave them out of the graph")
            ids, x = ids[~zero], x[~zero]
        x = knn.normalize_rows(x)
    return ids, np.ascontiguousarray(x, dtype=np.float32)


def faiss_metric(metric: str) -> int:
    import faiss
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


@ray.remote(max_restarts=2, max_task_retries=2)
class PartWorker:
    """One vector part (ids, x) and optionally its Faiss index shard, for search and k-means."""

    def __init__(self, vectors_uri: str, path: str, metric: str, index_uri: str | None = None,
                 nprobe: int = 1, on_invalid: str = "error") -> None:
        runtime.limit_threads(1)
        self.metric = metric
        self.ids, self.x = load_part(vectors_uri, path, metric, on_invalid)
        self.index = None
        if index_uri is not None:
            import faiss
            index = faiss.deserialize_index(np.frombuffer(storage.read_bytes(index_uri), np.uint8))
            if not isinstance(index, faiss.IndexFlat):  # Flat shards are searched exactly below
                ivf = faiss.try_extract_index_ivf(index)
                if ivf is not None:
                    ivf.nprobe = nprobe
                self.index = index

    def size(self) -> int:
        return len(self.ids)

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, x) of local row positions."""
        return self.ids[positions], self.x[positions]

    def block(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        return self.ids[a:b], self.x[a:b]

    def search(self, query: tuple[np.ndarray, np.ndarray], k: int,
               exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of the queries in this shard: ((nq, k') float32 D, (nq, k') int64 global ids)."""
        _, xq = query
        if self.index is None or exact:
            return knn.search_exact(xq, self.x, self.ids, k, self.metric)
        kk = min(k, len(self.ids))
        if kk == 0 or len(xq) == 0:
            return np.zeros((len(xq), kk), np.float32), np.zeros((len(xq), kk), np.int64)
        D, I = self.index.search(xq, kk)
        if self.metric == "cosine":
            D = 1 - D
        elif self.metric == "ip":
            D = -D
        return D.astype(np.float32), np.where(I >= 0, self.ids[np.maximum(I, 0)], -1)

    def pair_distances(self, xq: np.ndarray, I: np.ndarray) -> np.ndarray:
        """Exact distances from each query to the neighbours in I (n, k) held here; NaN elsewhere."""
        out = np.full(I.shape, np.nan, np.float32)
        pos = np.searchsorted(self.ids, I)
        held = (I >= 0) & (pos < len(self.ids))
        held[held] = self.ids[pos[held]] == I[held]
        r, c = np.nonzero(held)
        out[r, c] = knn.exact_distances(xq[r], self.x[pos[r, c]], self.metric)
        return out

    def kmeans_stats(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Partial sums (k, d) float64, counts (k,) and inertia of this part's assignment."""
        return km.stats(self.x, centroids)

    def kmeans_write(self, stage_uri: str, name: str, centroids: np.ndarray, id_min: int,
                     id_max: int) -> schema.Part:
        labels, dist = km.assign(self.x, centroids)
        return storage.write_part(stage_uri, name, schema.clusters_table(self.ids, labels, dist),
                                  id_min, id_max)


def start_workers(vectors_m: schema.Manifest, vectors_uri: str, metric: str, cpus: float,
                  index_uri: str | None = None, nprobe: int = 1,
                  on_invalid: str = "error") -> list[Any]:
    """One PartWorker per vector part. Together they declare at most half the cluster's CPUs,
    so the tasks they wait on can always be scheduled (no deadlock on 2 cores)."""
    total = ray.cluster_resources().get("CPU", 1)
    per = max(0.01, min(cpus, 0.5 * total / max(len(vectors_m.parts), 1)))
    return [PartWorker.options(num_cpus=per).remote(
        vectors_uri, p.path, metric,
        None if index_uri is None else storage.join(index_uri, schema.shard_index_name(i)), nprobe,
        on_invalid)
        for i, p in enumerate(vectors_m.parts)]


def sample_rows(workers: list[Any], sizes: list[int], count: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` rows drawn uniformly without replacement across the workers' parts (ids, x)."""
    n = sum(sizes)
    count = min(count, n)
    picks = np.sort(rng.choice(n, count, replace=False))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    refs = []
    for w, a, b in zip(workers, offsets[:-1], offsets[1:]):
        local = picks[(picks >= a) & (picks < b)] - a
        if len(local):
            refs.append(w.rows.remote(local))
    got = runtime.get(refs, "sample", show=False)
    if not got:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
