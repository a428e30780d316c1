"""Shard stage: input files -> `OUT/vectors/` Parquet parts, one Ray task per row range."""
from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import ray

from vecgraph.graph import propagation
from vecgraph.jobs import runtime
from vecgraph.jobs.config import PipelineConfig, stage_config
from vecgraph.jobs.stage import StageOutput
from vecgraph.sharding import readers, schema, storage
from vecgraph.sharding.errors import SKIP_HINT, InputError
from vecgraph.sharding.parts import PartWriter


def plan(n_rows: int, parts: int) -> list[tuple[int, int]]:
    """Split rows [0, n) into `parts` contiguous ranges of near-equal size (no empty range
    unless n < parts)."""
    return [(n_rows * i // parts, n_rows * (i + 1) // parts) for i in range(parts)]


def bucket_of(ids: pa.Array, n_buckets: int) -> np.ndarray:
    """A bucket number per id, the same in every process: (n,) int64."""
    if pa.types.is_integer(ids.type):
        keys = propagation.node_keys(np.asarray(ids.fill_null(0).to_numpy(zero_copy_only=False)), 0)
        return (keys * n_buckets).astype(np.int64)
    return np.array([zlib.crc32(str(v).encode()) % n_buckets for v in ids.to_pylist()], np.int64)


@ray.remote(max_retries=3)
def duplicate_ids(src: readers.Source, bucket: int, n_buckets: int,
                  chunk_rows: int) -> list[tuple[int, object, int]]:
    """(row, id, first row with that id) of the repeated input ids that fall in this bucket.

    Reads only the id column, chunk by chunk; holds the ids of one bucket (n / n_buckets)."""
    rows, values = [], []
    for a in range(0, src.n_rows, chunk_rows):
        ids = readers.read_source_ids(src, a, min(a + chunk_rows, src.n_rows))
        valid = np.asarray(ids.is_valid().to_numpy(zero_copy_only=False))  # null ids never repeat
        mine = np.flatnonzero((bucket_of(ids, n_buckets) == bucket) & valid)
        rows.append(a + mine)
        values.append(np.asarray(ids.take(pa.array(mine)).to_numpy(zero_copy_only=False)))
    rows_, values_ = np.concatenate(rows), np.concatenate(values)
    if len(values_) == 0:
        return []
    _, first, inverse = np.unique(values_, return_index=True, return_inverse=True)
    first_row = rows_[first][inverse.reshape(-1)]
    dup = np.flatnonzero(first_row != rows_)
    return [(int(rows_[i]), values_[i].item() if hasattr(values_[i], "item") else values_[i],
             int(first_row[i])) for i in dup]


def check_duplicates(src: readers.Source, n_buckets: int, chunk_rows: int,
                     on_invalid: str) -> dict[int, str]:
    """Rows to reject for repeating an earlier row's input id: {row: reason}. With
    on_invalid=error the first one is an InputError instead."""
    found = sorted(r for got in runtime.get([duplicate_ids.remote(src, b, n_buckets, chunk_rows)
                                             for b in range(n_buckets)], "check ids", False)
                   for r in got)
    if found and on_invalid == "error":
        row, value, first = found[0]
        path, rec = readers.locate(src, row)
        fpath, frec = readers.locate(src, first)
        raise InputError(f"{path}: record {rec}: id {value!r} in column {src.id_column!r} repeats "
                         f"{fpath} record {frec} ({len(found)} repeated ids in all); make ids unique, "
                         f"or {SKIP_HINT} to keep the first of each")
    return {row: f"duplicate id {value!r} (first at row {first})" for row, value, first in found}


def _rejects_sidecar(i: int) -> str:
    return f"_rejects.{schema.part_name(i)}"


@ray.remote(max_retries=3)
def shard_part(src: readers.Source, stage_uri: str, i: int, start: int, stop: int,
               on_invalid: str, chunk_rows: int, drop: dict[int, str]) -> schema.Part:
    """Read input rows [start, stop) chunk by chunk, validate, stream them into vector part i
    (and its rejects into a sidecar). Memory: one chunk."""
    runtime.limit_threads(1)
    part_schema = schema.vectors_schema(src.dim, src.label_type, src.source_id_type)
    rejects: list[tuple] = []
    with PartWriter(stage_uri, schema.part_name(i), part_schema) as w:
        for a in range(start, stop, chunk_rows):
            rows = readers.read_rows(src, a, min(a + chunk_rows, stop))
            if drop:
                rows = _drop_rows(src, rows, drop)
            if rows.rejects and on_invalid == "error":
                rid, path, rec, why = rows.rejects[0]
                more = f" ({len(rows.rejects) - 1} more bad rows nearby)" if len(rows.rejects) > 1 else ""
                raise InputError(f"{path}: record {rec} (row id {rid}): {why}{more}. Fix the input, "
                                 f"or {SKIP_HINT} to drop bad rows (listed in "
                                 f"vectors/{schema.REJECTS})")
            rejects += rows.rejects
            w.write(schema.vectors_table(rows.ids, rows.x, rows.labels, rows.source_ids))
        if rejects:
            t = pa.Table.from_pylist([dict(zip(("id", "file", "record", "reason"), r)) for r in rejects],
                                     schema=schema.rejects_schema())
            storage.put_bytes(storage.join(stage_uri, _rejects_sidecar(i)), storage.parquet_bytes(t))
        return w.commit(start, stop - 1)


def _drop_rows(src: readers.Source, rows: readers.Rows, drop: dict[int, str]) -> readers.Rows:
    """Move the rows listed in `drop` (global position -> reason) from `rows` to its rejects."""
    out = np.isin(rows.ids, np.fromiter(drop, np.int64))
    if not out.any():
        return rows
    keep = pa.array(~out)
    extra = [(int(r), *readers.locate(src, int(r)), drop[int(r)]) for r in rows.ids[out]]
    return readers.Rows(rows.ids[~out], rows.x[~out],
                        None if rows.labels is None else rows.labels.filter(keep),
                        None if rows.source_ids is None else rows.source_ids.filter(keep),
                        sorted(rows.rejects + extra))


def run(cfg: PipelineConfig, inputs: dict[str, schema.Manifest]) -> schema.Manifest:
    if cfg.shard.engine == "spark":  # PySpark reads and writes the same contract (shard_spark.py)
        from vecgraph.jobs import shard_spark
        return shard_spark.run(cfg, inputs)
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
    drop = check_duplicates(src, len(ranges), sc.chunk_rows, cfg.on_invalid) if src.id_column else {}
    drop_ref = ray.put(drop)
    refs = [shard_part.remote(src, out.uri, i, a, b, cfg.on_invalid, sc.chunk_rows, drop_ref)
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
