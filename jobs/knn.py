"""k-NN graph stage: broadcast search of query blocks over index shards pinned in actors.

Each query block goes to every shard actor; a task merges the partial top-k (excluding the
query's own id) and the blocks of vector part i are written as graph part i. A random sample of
nodes is searched exactly to measure recall@k, recorded in the manifest.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import ray

from vecgraph.graph import knn
from vecgraph.jobs import runtime, workers
from vecgraph.jobs.config import KnnConfig, PipelineConfig, stage_config
from vecgraph.jobs.runtime import StageFailed
from vecgraph.jobs.stage import StageOutput
from vecgraph.sharding import schema, storage


@ray.remote(max_retries=3)
def merge_block(query: tuple[np.ndarray, np.ndarray], k: int, n_nodes: int, shards: list[Any],
                *partials: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Partial top-(k+1) of every shard -> (ids, D (n, k), I (n, k), holes refilled) without the
    node itself. Rows left with -1 holes although n_nodes - 1 >= k other nodes exist (an IVF
    search that probed too few lists) are searched again exactly on every shard."""
    runtime.limit_threads(1)
    ids, xq = query
    D = np.concatenate([p[0] for p in partials], axis=1)
    I = np.concatenate([p[1] for p in partials], axis=1)
    D, I = knn.merge_topk(D, I, k, exclude=ids)
    holes = np.flatnonzero((I < 0).sum(1) > max(0, k - (n_nodes - 1)))
    if len(holes):
        again = ray.get([s.search.remote((ids[holes], xq[holes]), k + 1, True) for s in shards])
        D[holes], I[holes] = knn.merge_topk(np.concatenate([a[0] for a in again], axis=1),
                                            np.concatenate([a[1] for a in again], axis=1), k,
                                            exclude=ids[holes])
    return ids, D, I, len(holes)


@ray.remote(max_retries=3)
def write_part(stage_uri: str, name: str, id_min: int, id_max: int,
               *blocks: tuple[np.ndarray, ...]) -> tuple[schema.Part, int, int]:
    """Write graph part `name` from its merged blocks; returns the part, its -1 padding entries
    and the number of rows whose IVF holes were refilled."""
    ids = np.concatenate([b[0] for b in blocks])
    D = np.concatenate([b[1] for b in blocks])
    I = np.concatenate([b[2] for b in blocks])
    part = storage.write_part(stage_uri, name, schema.graph_table(ids, I, D), id_min, id_max)
    return part, int((I < 0).sum()), sum(b[3] for b in blocks)


@ray.remote
def graph_rows(stage_uri: str, name: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = storage.read_table(storage.join(stage_uri, name), [schema.ID, schema.NEIGHBORS,
                                                           schema.DISTANCES])
    pos = np.searchsorted(t.column(schema.ID).to_numpy(), ids)
    return (schema.list_column(t, schema.NEIGHBORS, np.int64)[pos],
            schema.list_column(t, schema.DISTANCES, np.float32)[pos])


def measure_recall(actors: list[Any], sizes: list[int], graph_uri: str,
                   parts: list[schema.Part], k: int, count: int, seed: int) -> dict:
    """recall@k of the written graph on `count` random nodes against exact search."""
    ids, xq = workers.sample_rows(actors, sizes, count, np.random.default_rng(seed + 1))
    if len(ids) == 0:
        return {"recall_at_k": 1.0, "recall_sample": 0}
    q = ray.put((ids, xq))
    partials = runtime.get([a.search.remote(q, k + 1, True) for a in actors], "recall", False)
    D_exact, _ = knn.merge_topk(np.concatenate([p[0] for p in partials], 1),
                                np.concatenate([p[1] for p in partials], 1), k, exclude=ids)
    starts = np.array([p.id_min for p in parts])
    owner = np.searchsorted(starts, ids, side="right") - 1
    I = np.full((len(ids), k), -1, np.int64)
    for i, part in enumerate(parts):
        sel = owner == i
        if sel.any():
            I[sel] = runtime.unwrap(ray.get, graph_rows.remote(graph_uri, part.path, ids[sel]))[0]
    true = np.stack(runtime.get([a.pair_distances.remote(xq, I) for a in actors], "recall", False))
    D_graph = np.nanmin(np.where(np.isnan(true), np.inf, true), axis=0)
    return {"recall_at_k": knn.recall_at_k(D_graph, I >= 0, D_exact), "recall_sample": len(ids)}


def check_recall(stats: dict, kc: KnnConfig) -> None:
    """The quality gate: recall under knn.min_recall fails the stage (exit 1)."""
    if kc.min_recall is not None and stats["recall_at_k"] < kc.min_recall:
        raise StageFailed(f"knn: recall@{kc.k} = {stats['recall_at_k']:.4f} on "
                          f"{stats['recall_sample']} sampled nodes is under knn.min_recall="
                          f"{kc.min_recall}; raise knn.nprobe or use a finer index.factory "
                          f"(the graph is not committed, or was committed by a run without "
                          f"this gate)")


def run(cfg: PipelineConfig, inputs: dict[str, schema.Manifest]) -> schema.Manifest:
    vec, idx = inputs["shard"], inputs["index"]
    kc = cfg.knn
    out = StageOutput(cfg.out, "knn", stage_config(cfg, "knn"), {"shard": vec, "index": idx})
    if (m := out.committed()) is not None:
        check_recall(m.stats, kc)
        return m
    vectors_uri = storage.join(cfg.out, schema.STAGE_DIRS["shard"])
    index_uri = storage.join(cfg.out, schema.STAGE_DIRS["index"])
    planned = [{"path": schema.part_name(i), "id_min": p.id_min, "id_max": p.id_max}
               for i, p in enumerate(vec.parts)]
    done = out.start(planned)
    actors = workers.start_workers(vec, vectors_uri, kc.metric, cfg.ray.actor_cpus, index_uri,
                                   kc.nprobe, cfg.on_invalid,
                                   workers.gpus_per_worker(kc.gpu, len(vec.parts)))
    sizes = runtime.get([a.size.remote() for a in actors], "load shards", False)
    n_nodes = sum(sizes)
    # Search k+1 per shard: the node itself is dropped by id afterwards.
    writes: list = []
    results: list[tuple[schema.Part, int, int]] = []
    for i, (actor, part) in enumerate(zip(actors, vec.parts)):
        if schema.part_name(i) in done:
            continue
        if len(writes) >= kc.max_inflight:  # bounded in-flight parts
            ready, writes = ray.wait(writes, num_returns=1)
            results += runtime.get(ready, "knn", False)
        blocks = []
        for a in range(0, max(sizes[i], 1), kc.query_block):
            q = actor.block.remote(a, min(a + kc.query_block, sizes[i]))
            lists = actor.coarse.remote(q)  # the IVF lists to probe, once for all shards
            partials = [s.search.remote(q, kc.k + 1, False, lists) for s in actors]
            blocks.append(merge_block.remote(q, kc.k, n_nodes, actors, *partials))
        writes.append(write_part.remote(out.uri, schema.part_name(i), part.id_min, part.id_max,
                                        *blocks))
    results += runtime.get(writes, "knn")
    parts = list(done.values()) + [r[0] for r in results]
    stats: dict = {"holes": sum(r[1] for r in results),
                   "expected_holes": n_nodes * max(0, kc.k - (n_nodes - 1)),
                   "holes_refilled_rows": sum(r[2] for r in results),
                   "zero_vectors_skipped": vec.n_rows - n_nodes}
    with runtime.timed("recall_seconds", stats):
        stats.update(measure_recall(actors, sizes, out.uri, sorted(parts, key=lambda p: p.path),
                                    kc.k, kc.recall_sample, cfg.seed))
    for a in actors:
        ray.kill(a)
    check_recall(stats, kc)
    return out.commit(parts, stats, metric=kc.metric, distance=schema.DISTANCE_NAMES[kc.metric],
                      extra={"k": kc.k})
