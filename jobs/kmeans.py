"""k-means stage: Lloyd iterations over vector parts pinned in actors, sums reduced on the driver."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from vecgraph.clustering import kmeans as km
from vecgraph.jobs import runtime, workers
from vecgraph.jobs.config import PipelineConfig, stage_config
from vecgraph.jobs.stage import StageOutput
from vecgraph.sharding import schema, storage
from vecgraph.sharding.errors import InputError

CENTROIDS = "_centroids.parquet"  # "_": folder readers (pandas, pyarrow) skip it


def lloyd(actors: list, centroids: np.ndarray, niter: int,
          rng: np.random.Generator) -> tuple[np.ndarray, list[float], int]:
    """Lloyd iterations over the parts held by `actors`: centroids broadcast through the object
    store, partial sums and counts reduced here. Returns (centroids, inertia per iteration,
    empty clusters re-seeded); the last inertia is that of the returned centroids."""
    inertia, n_split = [], 0
    for it in runtime.progress(range(niter + 1), "kmeans"):
        ref = ray.put(centroids)
        partial = runtime.get([a.kmeans_stats.remote(ref) for a in actors], "kmeans", False)
        inertia.append(float(sum(p[2] for p in partial)))
        if it == niter:
            break
        sums = np.sum([p[0] for p in partial], axis=0)
        counts = np.sum([p[1] for p in partial], axis=0)
        centroids, empty = km.update_centroids(sums, counts, centroids, rng)
        n_split += empty
    return centroids, inertia, n_split


def run(cfg: PipelineConfig, inputs: dict[str, schema.Manifest]) -> schema.Manifest:
    vec = inputs["shard"]
    kc = cfg.kmeans
    if kc.k > vec.n_rows:
        raise InputError(f"kmeans.k={kc.k} should be <= the number of vectors "
                         f"({vec.n_rows} in {cfg.out}/vectors); lower kmeans.k")
    out = StageOutput(cfg.out, "kmeans", stage_config(cfg, "kmeans"), {"shard": vec})
    if (m := out.committed()) is not None:
        return m
    vectors_uri = storage.join(cfg.out, schema.STAGE_DIRS["shard"])
    planned = [{"path": schema.part_name(i), "id_min": p.id_min, "id_max": p.id_max}
               for i, p in enumerate(vec.parts)]
    out.start(planned)
    actors = workers.start_workers(vec, vectors_uri, "l2", cfg.ray.actor_cpus)
    sizes = runtime.get([a.size.remote() for a in actors], "load parts", False)
    rng = np.random.default_rng(cfg.seed)
    _, sample = workers.sample_rows(actors, sizes, kc.sample_size, rng)
    best: tuple | None = None
    for _ in range(kc.n_init):  # keep the run of lowest final inertia, as Faiss's nredo
        run_ = lloyd(actors, km.init_centroids(sample, kc.k, kc.init, rng), kc.niter, rng)
        if best is None or run_[1][-1] < best[1][-1]:
            best = run_
    centroids, inertia, n_split = best
    ref = ray.put(centroids)
    parts = runtime.get([a.kmeans_write.remote(out.uri, schema.part_name(i), ref, p.id_min,
                                               p.id_max)
                         for i, (a, p) in enumerate(zip(actors, vec.parts))], "kmeans assign")
    for a in actors:
        ray.kill(a)
    table = pa.table({schema.CLUSTER: pa.array(np.arange(kc.k), pa.int64()),
                      schema.CENTROID: schema.fixed_list(centroids, pa.float32())})
    storage.put_bytes(storage.join(out.uri, CENTROIDS), storage.parquet_bytes(table))
    return out.commit(parts, {"inertia": inertia, "empty_clusters_split": n_split,
                              "n_clusters": kc.k}, dim=vec.dim, dtype="float32",
                      extra={"centroids": CENTROIDS})
