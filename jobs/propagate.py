"""Label propagation stage: seeded diffusion over id-range blocks with a static exchange plan.

Seeds come from `propagate.seeds` (Parquet id,label), else each node is a seed with
probability `propagate.seed_fraction`, else `propagate.seeds_per_class` nodes are drawn per
class from the vectors' label column (a seeded hash of the id orders them, so the draw does
not depend on the partitioning). Each iteration block q serves the state rows block p needs
(num_returns=P) and block p diffuses; each node keeps its top-m labels.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from vecgraph.graph import matrix, propagation
from vecgraph.jobs import graph_matrix, runtime
from vecgraph.jobs.config import PipelineConfig, stage_config
from vecgraph.jobs.graph_matrix import Block
from vecgraph.jobs.mcl import as_list, one_or_list
from vecgraph.jobs.stage import StageOutput
from vecgraph.sharding import schema, storage
from vecgraph.sharding.errors import InputError

SEEDS = "_seeds.parquet"  # "_": folder readers (pandas, pyarrow) skip it


@ray.remote(max_retries=3)
def seed_candidates(vectors_uri: str, path: str, seed: int, per_class: int | None,
                    fraction: float | None) -> pa.Table:
    """This part's seed candidates (id, label, key): key < fraction, or the per_class
    smallest keys of each label."""
    t = storage.read_table(storage.join(vectors_uri, path), [schema.ID, schema.LABEL])
    t = t.filter(pc.is_valid(t.column(schema.LABEL)))
    keys = propagation.node_keys(t.column(schema.ID).to_numpy(), seed)
    t = t.append_column("key", pa.array(keys))
    if fraction is not None:
        return t.filter(pa.array(keys < fraction))
    return first_per_class(t, per_class)


def first_per_class(t: pa.Table, per_class: int) -> pa.Table:
    """Rows of t with the per_class smallest keys of each label."""
    t = t.sort_by([(schema.LABEL, "ascending"), ("key", "ascending")])
    lab = t.column(schema.LABEL).to_numpy(zero_copy_only=False)
    if len(lab) == 0:
        return t
    first = np.ones(len(lab), bool)
    first[1:] = lab[1:] != lab[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(lab)), 0))
    return t.filter(pa.array(np.arange(len(lab)) - group_start < per_class))


def choose_seeds(cfg: PipelineConfig, vec: schema.Manifest) -> pa.Table:
    """Seeds (id int64, label) sorted by id, per the precedence in the module docstring."""
    pc_ = cfg.propagate
    if pc_.seeds:
        t = storage.read_table(pc_.seeds)
        missing = {schema.ID, schema.LABEL} - set(t.column_names)
        if missing:
            raise InputError(f"{pc_.seeds}: seeds file lacks column(s) {sorted(missing)}; it "
                             f"needs columns id (int64) and label")
        t = t.select([schema.ID, schema.LABEL]).cast(
            pa.schema([pa.field(schema.ID, pa.int64()), t.schema.field(schema.LABEL)]))
        ids = t.column(schema.ID).to_numpy()
        n_max = vec.parts[-1].id_max
        bad = ids[(ids < 0) | (ids > n_max)]
        if len(bad):
            raise InputError(f"{pc_.seeds}: seed id {bad[0]} is not a node id (0..{n_max})")
        return t.sort_by(schema.ID)
    if not vec.extra.get("has_labels"):
        raise InputError("propagate needs seeds: the vectors have no label column "
                         "(shard.label_column) and propagate.seeds is not set; give a Parquet "
                         "of id,label as propagate.seeds")
    vectors_uri = storage.join(cfg.out, schema.STAGE_DIRS["shard"])
    per_class = None if pc_.seed_fraction is not None else pc_.seeds_per_class
    got = runtime.get([seed_candidates.remote(vectors_uri, p.path, cfg.seed, per_class,
                                              pc_.seed_fraction) for p in vec.parts], "seeds", False)
    t = pa.concat_tables(got)
    if per_class is not None:
        t = first_per_class(t, per_class)
    return t.select([schema.ID, schema.LABEL]).sort_by(schema.ID)


@ray.remote(max_retries=3)
def init_block(block: Block, starts: np.ndarray, seed_ids: np.ndarray, seed_codes: np.ndarray,
               m: int) -> Any:
    """Row-normalised block P = D^-1 W, its initial state (seeds clamped), its requests."""
    P = matrix.normalize_rows_sum(block.rows)
    labels, scores = propagation.empty_state(P.shape[0], m)
    propagation.clamp(labels, scores, seed_ids - block.start, seed_codes)
    return [Block(block.start, block.ids, P), (labels, scores), *matrix.row_requests(P, starts)]


@ray.remote(max_retries=3)
def serve(start: int, state: tuple[np.ndarray, np.ndarray], *requests: np.ndarray) -> Any:
    labels, scores = state
    return one_or_list([(labels[r - start], scores[r - start]) for r in requests])


@ray.remote(max_retries=3)
def step(block: Block, seed_ids: np.ndarray, seed_codes: np.ndarray, n_classes: int, m: int,
         P: int, *args: Any) -> Any:
    """One diffusion step of a block; returns [state, number of labelled nodes]."""
    runtime.limit_threads(1)
    requests, served = args[:P], args[P:]
    ids = np.concatenate(requests)
    labels = np.concatenate([s[0] for s in served])
    scores = np.concatenate([s[1] for s in served])
    new_labels, new_scores = propagation.diffuse(block.rows, ids, labels, scores, n_classes, m)
    propagation.clamp(new_labels, new_scores, seed_ids - block.start, seed_codes)
    return [(new_labels, new_scores), int((new_scores[block.ids - block.start, 0] > 0).sum())]


@ray.remote(max_retries=3)
def write_labels(stage_uri: str, name: str, block: Block, state: Any, classes: pa.Array,
                 id_min: int, id_max: int) -> schema.Part:
    codes, score = propagation.predict(*state)
    codes, score = codes[block.ids - block.start], score[block.ids - block.start]
    labels = classes.take(pa.array(codes, mask=codes < 0))
    return storage.write_part(stage_uri, name, schema.labels_table(block.ids, labels, score),
                              id_min, id_max)


def run(cfg: PipelineConfig, inputs: dict[str, schema.Manifest]) -> schema.Manifest:
    graph, vec = inputs["knn"], inputs["shard"]
    pcfg = cfg.propagate
    out = StageOutput(cfg.out, "propagate", stage_config(cfg, "propagate"),
                      {"knn": graph, "shard": vec})
    if (m := out.committed()) is not None:
        return m
    out.start([{"path": schema.part_name(i), "id_min": p.id_min, "id_max": p.id_max}
               for i, p in enumerate(graph.parts)])
    seeds = choose_seeds(cfg, vec)
    if seeds.num_rows == 0:
        raise InputError("propagate: no seeds were drawn; raise propagate.seed_fraction or "
                         "propagate.seeds_per_class, or give propagate.seeds")
    storage.put_bytes(storage.join(out.uri, SEEDS), storage.parquet_bytes(seeds))
    classes = pc.unique(seeds.column(schema.LABEL)).sort()
    seed_ids = seeds.column(schema.ID).to_numpy()
    seed_codes = pc.index_in(seeds.column(schema.LABEL), value_set=classes).to_numpy().astype(np.int32)
    graph_uri = storage.join(cfg.out, schema.STAGE_DIRS["knn"])
    blocks, starts, stats = graph_matrix.build(graph, graph_uri, graph.metric)
    P, C, m = len(blocks), len(classes), min(pcfg.top_m, len(classes))
    owner = matrix.owner(seed_ids, starts)
    seeds_of = [(ray.put(seed_ids[owner == p]), ray.put(seed_codes[owner == p])) for p in range(P)]
    outs = [as_list(init_block.options(num_returns=2 + P).remote(b, starts, *seeds_of[p], m), 2 + P)
            for p, b in enumerate(blocks)]
    blocks, states, requests = [o[0] for o in outs], [o[1] for o in outs], [o[2:] for o in outs]
    covered: list[int] = []
    for it in runtime.progress(range(pcfg.max_iter), "propagate"):
        served = [as_list(serve.options(num_returns=P).remote(
            int(starts[q]), states[q], *[requests[p][q] for p in range(P)]), P) for q in range(P)]
        outs = [step.options(num_returns=2).remote(blocks[p], *seeds_of[p], C, m, P, *requests[p],
                                                   *[served[q][p] for q in range(P)])
                for p in range(P)]
        states = [o[0] for o in outs]
        covered.append(sum(runtime.get([o[1] for o in outs], "propagate", False)))
        # Fixed iterations, then on while the labelled set still grows (far nodes of seeded
        # components get a label; nodes without a seed in their component never do).
        if it + 1 >= pcfg.niter and len(covered) > 1 and covered[-1] == covered[-2]:
            break
    parts = runtime.get([write_labels.remote(out.uri, schema.part_name(i), blocks[i], states[i],
                                             classes, p.id_min, p.id_max)
                         for i, p in enumerate(graph.parts)], "propagate write")
    stats.update({"iterations": len(covered), "seeds": seeds.num_rows, "classes": C,
                  "labelled_nodes": covered[-1] if covered else 0})
    return out.commit(parts, stats, extra={"seeds": SEEDS})
