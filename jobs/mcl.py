"""Markov clustering stage: expansion by gathering the rows each block names, in id-range blocks.

Every iteration, block q serves the rows that each block p asked for (num_returns=P), then
block p expands (A_p A), inflates, prunes to mcl.max_entries per column and reports its chaos
and its requests for the next iteration. The driver only holds object refs and P floats.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import ray
import scipy.sparse as sp

from vecgraph.clustering import mcl
from vecgraph.graph import matrix
from vecgraph.jobs import graph_matrix, runtime
from vecgraph.jobs.config import PipelineConfig, stage_config
from vecgraph.jobs.graph_matrix import Block
from vecgraph.jobs.stage import StageOutput
from vecgraph.sharding import schema, storage


def one_or_list(values: list) -> Any:
    """Ray returns a bare value for num_returns=1 and splits a list otherwise."""
    return values[0] if len(values) == 1 else values


def as_list(refs: Any, n: int) -> list:
    return [refs] if n == 1 else list(refs)


@ray.remote(max_retries=3)
def init_block(block: Block, starts: np.ndarray) -> Any:
    """Self-loops (column max) and column normalisation; returns [block, *requests]."""
    rows = matrix.normalize_rows_sum(matrix.add_self_loops_column_max(block.rows, block.start))
    return [Block(block.start, block.ids, rows), *matrix.row_requests(rows, starts)]


@ray.remote(max_retries=3)
def serve(block: Block, *requests: np.ndarray) -> Any:
    """The rows each of the P blocks asked this block for."""
    return one_or_list([matrix.take_rows(block.rows, block.start, r) for r in requests])


@ray.remote(max_retries=3)
def step(block: Block, inflation: float, threshold: float, max_entries: int,
         starts: np.ndarray, P: int, *args: Any) -> Any:
    """Expand, inflate, prune one block; returns [block, chaos, *next requests]."""
    runtime.limit_threads(1)
    requests, served = args[:P], args[P:]
    ids = np.concatenate(requests)
    rows = sp.vstack(served, format="csr") if len(ids) else sp.csr_matrix((0, block.rows.shape[1]))
    new = mcl.expand_inflate(block.rows, ids, rows, inflation, threshold, max_entries)
    return [Block(block.start, block.ids, new), mcl.chaos(new), *matrix.row_requests(new, starts)]


@ray.remote
def attractors(block: Block) -> tuple[np.ndarray, np.ndarray]:
    parent = mcl.attractor_of(block.rows, block.start)
    return block.ids, parent[block.ids - block.start]


@ray.remote(max_retries=3)
def write_clusters(stage_uri: str, name: str, ids: np.ndarray, cluster: np.ndarray,
                   id_min: int, id_max: int) -> schema.Part:
    return storage.write_part(stage_uri, name, schema.clusters_table(ids, cluster), id_min, id_max)


def run(cfg: PipelineConfig, inputs: dict[str, schema.Manifest]) -> schema.Manifest:
    graph = inputs["knn"]
    mc = cfg.mcl
    out = StageOutput(cfg.out, "mcl", stage_config(cfg, "mcl"), {"knn": graph})
    if (m := out.committed()) is not None:
        return m
    out.start([{"path": schema.part_name(i), "id_min": p.id_min, "id_max": p.id_max}
               for i, p in enumerate(graph.parts)])
    graph_uri = storage.join(cfg.out, schema.STAGE_DIRS["knn"])
    blocks, starts, stats = graph_matrix.build(graph, graph_uri, graph.metric)
    P = len(blocks)
    outs = [as_list(init_block.options(num_returns=1 + P).remote(b, starts), 1 + P) for b in blocks]
    blocks, requests = [o[0] for o in outs], [o[1:] for o in outs]
    history = []
    for _ in runtime.progress(range(mc.max_iter), "mcl"):
        served = [as_list(serve.options(num_returns=P).remote(blocks[q], *[requests[p][q]
                                                                           for p in range(P)]), P)
                  for q in range(P)]
        outs = [step.options(num_returns=2 + P).remote(
            blocks[p], mc.inflation, mc.prune_threshold, mc.max_entries, starts, P,
            *requests[p], *[served[q][p] for q in range(P)]) for p in range(P)]
        blocks, requests = [o[0] for o in outs], [o[2:] for o in outs]
        history.append(max(runtime.get([o[1] for o in outs], "mcl", False)))
        if history[-1] < mc.tol:
            break
    found = runtime.get([attractors.remote(b) for b in blocks], "mcl clusters", False)
    ids = np.concatenate([f[0] for f in found])
    cluster = mcl.clusters_from_attractors(ids, np.concatenate([f[1] for f in found]))
    bounds = np.cumsum([0] + [len(f[0]) for f in found])
    parts = runtime.get([write_clusters.remote(out.uri, schema.part_name(i), ids[a:b], cluster[a:b],
                                               p.id_min, p.id_max)
                         for i, (p, a, b) in enumerate(zip(graph.parts, bounds[:-1], bounds[1:]))],
                        "mcl write")
    stats.update({"iterations": len(history), "chaos": history[-1] if history else 0.0,
                  "converged": bool(history and history[-1] < mc.tol),
                  "n_clusters": int(cluster.max()) + 1 if len(cluster) else 0})
    return out.commit(parts, stats)
