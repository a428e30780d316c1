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
        self.gpu_part = None  # (ids, x) as cupy arrays when Ray gave this actor a GPU
        if ray.get_gpu_ids():
            import cupy
            self.gpu_part = cupy.asarray(self.ids), cupy.asarray(self.x)
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

    def coarse(self, query: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
        """The IVF lists to probe for the queries: (Dq, Iq) (nq, nprobe) from the trained coarse
        quantizer that every shard shares, computed once per query block instead of once per
        shard; None when this shard is not a plain IndexIVF (Flat, HNSW, OPQ-transformed)."""
        import faiss
        if self.index is None or not isinstance(self.index, faiss.IndexIVF) or len(query[1]) == 0:
            return None
        return self.index.quantizer.search(query[1], min(self.index.nprobe, self.index.nlist))

    def search(self, query: tuple[np.ndarray, np.ndarray], k: int, exact: bool = False,
               coarse: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of the queries in this shard: ((nq, k') float32 D, (nq, k') int64 global ids);
        `coarse` = coarse() of the block, when an IVF shard should skip its own quantizer."""
        _, xq = query
        if self.index is None or exact:
            if self.gpu_part is None:
                return knn.search_exact(xq, self.x, self.ids, k, self.metric)
            import cupy
            D, I = knn.search_exact(cupy.asarray(xq), self.gpu_part[1], self.gpu_part[0], k,
                                    self.metric)
            return cupy.asnumpy(D), cupy.asnumpy(I)
        kk = min(k, len(self.ids))
        if kk == 0 or len(xq) == 0:
            return np.zeros((len(xq), kk), np.float32), np.zeros((len(xq), kk), np.int64)
        if coarse is not None:
            D, I = self.index.search_preassigned(xq, kk, coarse[1], coarse[0])
        else:
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


def gpus_per_worker(gpu: str, n_workers: int) -> float:
    """GPUs each shard actor declares: the cluster's GPUs shared by the actors (at most one
    each) under knn.gpu=auto|require, none under never or on a cluster without GPUs
    (require: an error then)."""
    total = ray.cluster_resources().get("GPU", 0)
    if gpu == "require" and total == 0:
        raise InputError("knn.gpu=require but the Ray cluster has no GPUs; use knn.gpu=auto "
                         "(GPUs when present) or never, or add GPU workers (and the [gpu] extra, cupy)")
    if gpu == "never" or total == 0:
        return 0.0
    return min(1.0, total / max(n_workers, 1))


def start_workers(vectors_m: schema.Manifest, vectors_uri: str, metric: str, cpus: float,
                  index_uri: str | None = None, nprobe: int = 1,
                  on_invalid: str = "error", gpus: float = 0.0) -> list[Any]:
    """One PartWorker per vector part. Together they declare at most half the cluster's CPUs,
    so the tasks they wait on can always be scheduled (no deadlock on 2 cores); with gpus > 0
    each declares that share of a GPU and searches its part exactly with cupy there."""
    total = ray.cluster_resources().get("CPU", 1)
    per = max(0.01, min(cpus, 0.5 * total / max(len(vectors_m.parts), 1)))
    return [PartWorker.options(num_cpus=per, num_gpus=gpus).remote(
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
