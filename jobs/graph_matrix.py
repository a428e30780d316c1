"""Builds the symmetric weighted graph matrix in row blocks held in Ray's object store.

Pass 1 (task per graph part): distance sums -> sigma. Pass 2: each part emits its own edges
and its reversed edges grouped by the part that owns their target (num_returns=P+1).
Pass 3: each part max-symmetrises what it received into a CSR row block. No process ever
holds more than one part's edges plus what is sent to it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import ray
import scipy.sparse as sp

from vecgraph.graph import matrix
from vecgraph.jobs import runtime
from vecgraph.sharding import schema, storage


@dataclasses.dataclass
class Block:
    """Rows of ids [start, stop) of a matrix: `ids` the nodes present, `rows` (stop-start, N) CSR."""
    start: int
    ids: np.ndarray
    rows: sp.csr_matrix


def _read_graph(graph_uri: str, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = storage.read_table(storage.join(graph_uri, path))
    return (t.column(schema.ID).to_numpy(), schema.list_column(t, schema.NEIGHBORS, np.int64),
            schema.list_column(t, schema.DISTANCES, np.float32))


@ray.remote(max_retries=3)
def distance_stats(graph_uri: str, path: str, metric: str) -> tuple[float, int, float]:
    """(sum of metric distances, count, min stored distance) over a part's finite edges."""
    _, I, D = _read_graph(graph_uri, path)
    ok = (I >= 0) & np.isfinite(D)
    if not ok.any():
        return 0.0, 0, np.inf
    return float(matrix.metric_distance(D[ok], metric).sum()), int(ok.sum()), float(D[ok].min())


@ray.remote(max_retries=3)
def part_edges(graph_uri: str, path: str, metric: str, sigma: float, shift: float,
               starts: np.ndarray) -> list[Any]:
    """[own (ids, edges)] + P reversed edge lists, one per owning part."""
    ids, I, D = _read_graph(graph_uri, path)
    rows, cols, w = matrix.edges_of_rows(ids, I, matrix.edge_weights(D, metric, sigma, shift))
    return [(ids, (rows, cols, w))] + matrix.split_by_owner(rows, cols, w, starts)


@ray.remote(max_retries=3)
def symmetric_block(start: int, stop: int, n_cols: int, own: Any, *received: Any) -> Block:
    ids, edges = own
    return Block(start, ids, matrix.symmetric_block(start, stop, n_cols, [edges, *received]))


def build(graph_m: schema.Manifest, graph_uri: str, metric: str) -> tuple[list[Any], np.ndarray, dict]:
    """Object refs of the P row blocks, the part starts (P,) and stats (sigma, edges)."""
    parts = graph_m.parts
    P = len(parts)
    starts = np.array([p.id_min for p in parts], np.int64)
    n_cols = int(parts[-1].id_max) + 1
    sums = runtime.get([distance_stats.remote(graph_uri, p.path, metric) for p in parts],
                       "graph sigma", False)
    count = sum(s[1] for s in sums)
    shift = min(s[2] for s in sums) if metric == "ip" and count else 0.0
    sigma = (sum(s[0] for s in sums) / count - shift) if count else 1.0
    sigma = sigma if sigma > 0 else 1.0
    outs = [part_edges.options(num_returns=P + 1).remote(graph_uri, p.path, metric, sigma,
                                                         shift, starts) for p in parts]
    blocks = [symmetric_block.remote(int(p.id_min), int(p.id_max) + 1, n_cols, outs[i][0],
                                     *[outs[j][1 + i] for j in range(P)])
              for i, p in enumerate(parts)]
    return blocks, starts, {"sigma": sigma, "shift": shift, "edges": count}
