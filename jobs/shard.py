"""Shard stage: input files -> `OUT/vectors/` Parquet parts, one Ray task per row range."""
from __future__ import annotations

import pyarrow as pa
import ray

from vecgraph.jobs import runtime
from vecgraph.jobs.config import PipelineConfig, stage_config
from vecgraph.jobs.stage import StageOutput
from vecgraph.sharding import readers, schema, storage
from vecgraph.sharding.errors import InputError
from vecgraph.sharding.parts import PartWriter


def plan(n_rows: int, parts: int) -> list[tuple[int, int]]:
    """Split rows [0, n) into `parts` contiguous ranges of near-equal size (no empty range
    unless n < parts)."""
    return [(n_rows * i // parts, n_rows * (i + 1) // parts) for i in range(parts)]


def _rejects_sidecar(i: int) -> str:
    return f"_rejects.{schema.part_name(i)}"


@ray.remote(max_retries=3)
def shard_part(src: readers.Source, stage_uri: str, i: int, start: int, stop: int,
               on_invalid: str, chunk_rows: int) -> schema.Part:
    """Read input rows [start, stop) chunk by chunk, validate, stream them into vector part i
    (and its rejects into a sidecar). Memory: one chunk."""
    runtime.limit_threads(1)
    part_schema = schema.vectors_schema(src.dim, src.label_type, src.source_id_type)
    rejects: list[tuple] = []
    with PartWriter(stage_uri, schema.part_name(i), part_schema) as w:
        for a in range(start, stop, chunk_rows):
            rows = readers.read_rows(src, a, min(a + chunk_rows, stop))
            if rows.rejects and on_invalid == "error":
                rid, path, rec, why = rows.rejects[0]
                more = f" ({len(rows.rejects) - 1} more bad rows nearby)" if len(rows.rejects) > 1 else ""
                raise InputError(f"{path}: record {rec} (row id {rid}): {why}{more}. Fix the input, "
                                 f"or set on_invalid=skip to drop bad rows (listed in "
                                 f"vectors/{schema.REJECTS})")
            rejects += rows.rejects
            w.write(schema.vectors_table(rows.ids, rows.x, rows.labels, rows.source_ids))
        if rejects:
            t = pa.Table.from_pylist([dict(zip(("id", "file", "record", "reason"), r)) for r in rejects],
                                     schema=schema.rejects_schema())
            storage.put_bytes(storage.join(stage_uri, _rejects_sidecar(i)), storage.parquet_bytes(t))
        return w.commit(start, stop - 1)


def run(cfg: PipelineConfig, inputs: dict[str, schema.Manifest]) -> schema.Manifest:
    out = StageOutput(cfg.out, "shard", stage_config(cfg, "shard"), {})
    if (m := out.committed()) is not None:
        return m
    sc = cfg.shard
    src = readers.open_source(cfg.input, sc.format, sc.vector_column, sc.label_column,
                              sc.id_column)
    ranges = plan(src.n_rows, min(sc.parts, src.n_rows))
    planned = [{"path": schema.part_name(i), "id_min": a, "id_max": b - 1}
               for i, (a, b) in enumerate(ranges)]
    done = out.start(planned)
    refs = [shard_part.remote(src, out.uri, i, a, b, cfg.on_invalid, sc.chunk_rows)
            for i, (a, b) in enumerate(ranges) if schema.part_name(i) not in done]
    parts = list(done.values()) + runtime.get(refs, "shard")
    n_rejects = _collect_rejects(out.uri, len(ranges))
    first = storage.read_schema(storage.join(out.uri, parts[0].path))
    return out.commit(parts, {"rejected_rows": n_rejects, "input_rows": src.n_rows},
                      dim=src.dim, dtype="float32",
                      extra={"source": cfg.input, "has_labels": schema.LABEL in first.names,
                             "label_type": str(first.field(schema.LABEL).type)
                             if schema.LABEL in first.names else None})


def _collect_rejects(stage_uri: str, n_parts: int) -> int:
    """Merge per-part reject sidecars into `_rejects.parquet`; returns the number of rejects."""
    tables = []
    for i in range(n_parts):
        uri = storage.join(stage_uri, _rejects_sidecar(i))
        if storage.exists(uri):
            tables.append(storage.read_table(uri))
    if not tables:
        return 0
    t = pa.concat_tables(tables)
    storage.put_bytes(storage.join(stage_uri, schema.REJECTS), storage.parquet_bytes(t))
    for i in range(n_parts):
        uri = storage.join(stage_uri, _rejects_sidecar(i))
        if storage.exists(uri):
            fs, p = storage.filesystem(uri)
            fs.rm(p)
    return t.num_rows
