"""Shard stage on Spark: a Spark table or Parquet files -> `OUT/vectors/`, the Ray engine's contract.

Spark reads the rows, numbers them (`id` = row position in the input: files in sorted order,
within a file its row order, from Spark's `_metadata.file_path` / `_metadata.row_index`) and
shuffles them by part number, sorted by id. Each executor streams its parts chunk by chunk
(`shard.chunk_rows`) through vecgraph's own validation and `PartWriter`, exactly as the Ray
engine does, so the parts have the contract's Arrow schema (Spark's writer cannot write
fixed_size_list) and the same bytes. pyspark is imported lazily: the package works without the
`[spark]` extra.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import shutil
import sys
from typing import Any, Iterator
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vecgraph.jobs.config import PipelineConfig, stage_config
from vecgraph.jobs.stage import StageOutput
from vecgraph.sharding import readers, schema, storage
from vecgraph.sharding.errors import SKIP_HINT, InputError
from vecgraph.sharding.parts import PartWriter

log = logging.getLogger("vecgraph")

TABLE_PREFIX = "spark:"   # input `spark:NAME`: a table or view of the Spark session / metastore
# Settings of a session this module starts on a local master: loopback only, no UI, small memory.
LOCAL_CONF = {
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.driver.memory": "1g",
    "spark.sql.shuffle.partitions": "4",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "4096",
}
# Internal columns of the Spark plan (never written).
_PART, _KEY, _POS, _OFFSET, _FIRST = "_vg_part", "_vg_key", "_vg_pos", "_vg_offset", "_vg_first"
_SCHEME = r"^[A-Za-z][A-Za-z0-9+.-]*:/*"   # `file:`, `file:///`, `s3a://` ... -> "/"
# One row per part handled by an executor: the written part, or the input error that stopped it.
_RESULT_ARROW = pa.schema([("part", pa.int32()), ("path", pa.string()), ("n_rows", pa.int64()),
                           ("bytes", pa.int64()), ("sha256", pa.string()), ("error", pa.string())])
_RESULT = "part int, path string, n_rows long, bytes long, sha256 string, error string"


def _pyspark() -> Any:
    try:
        import pyspark
        import pyspark.sql  # noqa: F401
    except ImportError as e:
        raise InputError("shard.engine=spark needs PySpark, which is not installed: "
                         "pip install 'vecgraph[spark]' (and Java 17+), or set shard.engine=ray") from e
    return pyspark


def session(master: str = "local[2]", app: str = "vecgraph-shard",
            conf: dict[str, str] | None = None) -> Any:
    """The active SparkSession, else a new one. Under spark-submit its --master and --conf rule;
    otherwise `master`, on a local master with LOCAL_CONF (127.0.0.1 only, no UI, 1 GiB), plus
    `conf` (more Spark settings of a new session)."""
    SparkSession = _pyspark().sql.SparkSession
    if _running():
        return SparkSession.builder.getOrCreate()
    builder = SparkSession.builder.appName(app)
    local = master.startswith("local") and "PYSPARK_GATEWAY_PORT" not in os.environ
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # not launched by spark-submit
        if local and not (shutil.which("java") or os.environ.get("JAVA_HOME")):
            raise InputError("shard.engine=spark needs Java 17+ (no `java` on PATH and no "
                             "JAVA_HOME); install a JRE, or set shard.engine=ray")
        builder = builder.master(master)
        if local:
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers import vecgraph
            for k, v in LOCAL_CONF.items():
                builder = builder.config(k, v)
        for k, v in (conf or {}).items():
            builder = builder.config(k, v)
    spark = builder.getOrCreate()
    if local:
        spark.sparkContext.setLogLevel("ERROR")
    return spark


def _running() -> bool:
    """Whether this process already has a SparkContext (its session is then used as it is)."""
    from pyspark import SparkContext
    return SparkContext._active_spark_context is not None


@dataclasses.dataclass(frozen=True)
class _Job:
    """What the executors need to validate and write parts (pickled into the Spark tasks)."""
    stage_uri: str
    dim: int
    ranges: tuple[tuple[int, int], ...]
    on_invalid: str
    chunk_rows: int
    files: tuple[str, ...]          # names for messages, in id order ("spark:NAME" when none)
    offsets: tuple[int, ...]        # id of each file's first row
    label_column: str | None        # input names, for messages
    id_column: str | None
    label_type: pa.DataType | None  # the parts' column types (the Ray engine's for files)
    source_id_type: pa.DataType | None

    def locate(self, rid: int) -> tuple[str, int]:
        """(file, record in it) of global row `rid`."""
        j = int(np.searchsorted(self.offsets, rid, side="right")) - 1
        return self.files[j], rid - self.offsets[j]


def rejects_sidecar(i: int) -> str:
    """Rejects of part i, merged into `_rejects.parquet` at commit (same name as the Ray engine)."""
    return f"_rejects.{schema.part_name(i)}"


def part_of(ids: np.ndarray, n_rows: int, n_parts: int) -> np.ndarray:
    """Part number of row ids under `shard.plan(n_rows, n_parts)`: ((id + 1) * P - 1) // n
    (`_write` computes the same in Spark SQL)."""
    return ((ids + 1) * n_parts - 1) // n_rows


# ---------------------------------------------------------------- driver


def run(cfg: PipelineConfig, inputs: dict[str, schema.Manifest]) -> schema.Manifest:
    from vecgraph.jobs.shard import plan

    out = StageOutput(cfg.out, "shard", stage_config(cfg, "shard"), {})
    if (m := out.committed()) is not None:
        return m
    _pyspark()
    started = not _running()  # a session this stage starts, it stops
    spark = session(cfg.shard.spark_master)
    try:
        read = _table_rows if cfg.input.startswith(TABLE_PREFIX) else _file_rows
        rows, n_rows, dim, fields = read(spark, cfg)
        ranges = plan(n_rows, min(cfg.shard.parts, n_rows))
        for i, (a, b) in enumerate(ranges):
            if part_of(np.array([a, b - 1]), n_rows, len(ranges)).tolist() != [i, i]:
                raise RuntimeError(f"shard.plan changed shape: part_of() disagrees at part {i}")
        planned = [{"path": schema.part_name(i), "id_min": a, "id_max": b - 1}
                   for i, (a, b) in enumerate(ranges)]
        done = out.start(planned)
        job = _Job(out.uri, dim, tuple(ranges), cfg.on_invalid, cfg.shard.chunk_rows, **fields)
        if job.source_id_type is not None:
            rows = _duplicates(rows, job)
        parts = list(done.values()) + _write(rows, job, n_rows, done)
    finally:
        if started:
            spark.stop()
    n_rejects = _merge_rejects(out.uri, len(ranges))
    first = storage.read_schema(storage.join(out.uri, schema.part_name(0)))
    return out.commit(parts, {"rejected_rows": n_rejects, "input_rows": n_rows, "engine": "spark"},
                      dim=dim, dtype="float32",
                      extra={"source": cfg.input, "has_labels": schema.LABEL in first.names,
                             "label_type": str(first.field(schema.LABEL).type)
                             if schema.LABEL in first.names else None})


def _col(name: str) -> Any:
    from pyspark.sql import functions as F
    return F.col("`" + name.replace("`", "``") + "`")


def _payload(df: Any, cfg: PipelineConfig, where: str, label: bool) -> tuple[list, list[str]]:
    """The vector, source-id and label columns of `df` under the contract's names (and the names);
    source ids as long or string, as the Ray engine types them."""
    from pyspark.sql.types import ArrayType, IntegralType, NumericType, StringType
    sc = cfg.shard
    have = df.columns
    for c, key in [(sc.vector_column, "vector_column"), (sc.id_column, "id_column")]:
        if c and c not in have:
            raise InputError(f"{where}: no column {c!r} (columns: {have}); set shard.{key}")
    vtype = df.schema[sc.vector_column].dataType
    if not (isinstance(vtype, ArrayType) and isinstance(vtype.elementType, NumericType)):
        raise InputError(f"{where}: column {sc.vector_column!r} has type {vtype.simpleString()}, "
                         f"expected a list of numbers")
    cols = [_col(sc.vector_column).alias(schema.VECTOR)]
    if sc.id_column:
        itype = df.schema[sc.id_column].dataType
        if not isinstance(itype, (IntegralType, StringType)):
            raise InputError(f"{where}: id column {sc.id_column!r} has type {itype.simpleString()}; "
                             f"ids must be integers or strings")
        cols.append(_col(sc.id_column).cast("long" if isinstance(itype, IntegralType) else "string")
                    .alias(schema.SOURCE_ID))
    if label:
        cols.append(_col(sc.label_column).alias(schema.LABEL))
    return cols, [schema.VECTOR] + [n for n, on in ((schema.SOURCE_ID, sc.id_column),
                                                    (schema.LABEL, label)) if on]


def _file_rows(spark: Any, cfg: PipelineConfig) -> tuple[Any, int, int, dict]:
    """Parquet files, planned from their metadata by the Ray engine's `open_source`:
    (frame of payload + id, n_rows, dim, _Job fields)."""
    from pyspark.sql import functions as F
    sc = cfg.shard
    src = readers.open_source(cfg.input, sc.format, sc.vector_column, sc.label_column, sc.id_column)
    odd = [f for f in src.files if f.fmt != "parquet"]
    if odd:
        raise InputError(f"{odd[0].path}: shard.engine=spark reads Parquet files and Spark tables "
                         f"({TABLE_PREFIX}NAME); {odd[0].fmt} input is read by the Ray engine: "
                         f"set shard.engine=ray")
    for f in src.files:  # Spark would read a missing column as nulls
        names = storage.read_schema(f.path).names
        for c in (sc.vector_column, src.label_column, sc.id_column):
            if c and c not in names:
                raise InputError(f"{f.path}: no column {c!r} (columns: {names})")
    raw = spark.read.parquet(*[re.sub(r"^s3://", "s3a://", f.path) for f in src.files])
    cols, names = _payload(raw, cfg, src.uri, src.label_column is not None)
    by_path = {re.sub(_SCHEME, "/", f.path): f.offset for f in src.files}
    keys = []
    for uri in raw.inputFiles():
        key = re.sub(_SCHEME, "/", uri)
        if unquote(key) not in by_path:
            raise RuntimeError(f"Spark reads {uri}, which is not one of the planned input files")
        keys.append((key, by_path[unquote(key)]))
    offsets = spark.createDataFrame(keys, f"{_KEY} string, {_OFFSET} long")
    rows = (raw.select(*cols, F.regexp_replace(F.col("_metadata.file_path"), _SCHEME, "/").alias(_KEY),
                       F.col("_metadata.row_index").alias(_POS))
            .join(F.broadcast(offsets), _KEY)
            .select(*names, (F.col(_OFFSET) + F.col(_POS)).alias(schema.ID)))
    job = dict(files=tuple(f.path for f in src.files), offsets=tuple(f.offset for f in src.files),
               label_column=src.label_column, id_column=sc.id_column,
               label_type=src.label_type if src.label_column else None,
               source_id_type=src.source_id_type)
    return rows, src.n_rows, src.dim, job


def _table_rows(spark: Any, cfg: PipelineConfig) -> tuple[Any, int, int, dict]:
    """A Spark table: ids follow its data files in sorted order and each file's row order
    (Parquet file tables), else Spark's scan order (partition by partition)."""
    from pyspark.errors import AnalysisException
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import to_arrow_type
    name = cfg.input[len(TABLE_PREFIX):]
    try:
        df = spark.table(name)
    except AnalysisException as e:
        raise InputError(f"{cfg.input}: no table or view {name!r} in the Spark session or metastore "
                         f"({str(e).splitlines()[0]}); register it first, or run under spark-submit "
                         f"with the metastore configured") from None
    label = bool(cfg.shard.label_column) and cfg.shard.label_column in df.columns
    cols, names = _payload(df, cfg, cfg.input, label)
    keyed = None
    if df.inputFiles():  # a file table; Parquet has _metadata.row_index (Spark >= 3.5)
        try:
            keyed = df.select(*cols, F.col("_metadata.file_path").alias(_KEY),
                              F.col("_metadata.row_index").alias(_POS))
        except AnalysisException:
            keyed = None
    file_table = keyed is not None
    if keyed is None:
        log.warning("%s is not a Parquet file table: ids follow Spark's scan order", cfg.input)
        pid = F.spark_partition_id()
        keyed = df.select(*cols, pid.cast("string").alias(_KEY), (F.monotonically_increasing_id()
                          - F.shiftleft(pid.cast("long"), 33)).alias(_POS))
    offsets, n_rows, dim = _segments(keyed, file_table)
    if n_rows == 0:
        raise InputError(f"{cfg.input}: the input holds no rows")
    if dim is None:
        raise InputError(f"{cfg.input}: every row of column {cfg.shard.vector_column!r} is null")
    off = spark.createDataFrame(offsets, f"{_KEY} string, {_OFFSET} long")
    rows = keyed.join(F.broadcast(off), _KEY).select(*names, (F.col(_OFFSET) + F.col(_POS)).alias(schema.ID))
    types = {f.name: f.dataType for f in keyed.schema.fields}
    job = dict(files=tuple(_display(k) for k, _ in offsets) if file_table else (cfg.input,),
               offsets=tuple(o for _, o in offsets) if file_table else (0,),
               label_column=cfg.shard.label_column if label else None, id_column=cfg.shard.id_column,
               label_type=to_arrow_type(types[schema.LABEL]) if label else None,
               source_id_type=to_arrow_type(types[schema.SOURCE_ID]) if cfg.shard.id_column else None)
    return rows, n_rows, dim, job


def _display(spark_path: str) -> str:
    """A Spark file URI as a path for messages and ordering (`file:/a%20b` -> `/a b`)."""
    return unquote(re.sub(r"^file:/*", "/", spark_path))


def _segments(keyed: Any, file_table: bool) -> tuple[list[tuple[str, int]], int, int | None]:
    """Rows per segment (file, or scan partition) in id order -> ([(key, first id)], n_rows, dim);
    dim is the length of the first non-null vector, as the Ray engine plans it."""
    from pyspark.sql import functions as F
    vec = F.col(schema.VECTOR)
    segs = keyed.groupBy(_KEY).agg(F.count(F.lit(1)).alias("n"), F.min(F.when(
        vec.isNotNull(), F.struct(F.col(_POS), F.size(vec).alias("d")))).alias("first")).collect()
    segs.sort(key=lambda r: _display(r[_KEY]) if file_table else int(r[_KEY]))
    offsets, n_rows, dim = [], 0, None
    for r in segs:
        offsets.append((r[_KEY], n_rows))
        n_rows += r["n"]
        if dim is None and r["first"] is not None:
            dim = int(r["first"]["d"])
    return offsets, n_rows, dim


def _duplicates(rows: Any, job: _Job) -> Any:
    """Rows repeating an earlier row's input id: an InputError (on_invalid=error), else `rows`
    with _FIRST = the first row of that id on each repeat (rejected by the executors)."""
    from pyspark.sql import functions as F
    firsts = (rows.where(F.col(schema.SOURCE_ID).isNotNull()).groupBy(schema.SOURCE_ID)
              .agg(F.min(schema.ID).alias(_FIRST), F.count(F.lit(1)).alias("n"))
              .where(F.col("n") > 1).select(schema.SOURCE_ID, _FIRST))
    dups = (rows.select(schema.ID, schema.SOURCE_ID).join(firsts, schema.SOURCE_ID)
            .where(F.col(schema.ID) != F.col(_FIRST)))
    found = dups.agg(F.count(F.lit(1)).alias("n"), F.min(F.struct(
        schema.ID, schema.SOURCE_ID, _FIRST)).alias("first")).collect()[0]
    if not found["n"]:
        return rows
    if job.on_invalid == "error":
        row, value, first = found["first"]
        (path, rec), (fpath, frec) = job.locate(row), job.locate(first)
        raise InputError(f"{path}: record {rec}: id {value!r} in column {job.id_column!r} repeats "
                         f"{fpath} record {frec} ({found['n']} repeated ids in all); make ids "
                         f"unique, or {SKIP_HINT} to keep the first of each")
    return rows.join(dups.select(schema.ID, _FIRST), schema.ID, "left")


def _write(rows: Any, job: _Job, n_rows: int, done: dict) -> list[schema.Part]:
    """Shuffle rows by part (sorted by id), write the parts not yet committed on the executors."""
    from pyspark.sql import functions as F
    n_parts = len(job.ranges)
    todo = [i for i in range(n_parts) if schema.part_name(i) not in done]
    if not todo:
        return []
    rows = rows.withColumn(_PART, F.expr(f"(({schema.ID} + 1) * {n_parts} - 1) div {n_rows}").cast("int"))
    if len(todo) < n_parts:
        rows = rows.where(F.col(_PART).isin(todo))
    results = (rows.repartition(len(todo), F.col(_PART)).sortWithinPartitions(_PART, schema.ID)
               .mapInArrow(functools.partial(_write_parts, job=job), _RESULT).collect())
    errors = sorted((r["part"], r["error"]) for r in results if r["error"])
    if errors:
        raise InputError(errors[0][1])
    got = sorted(r["part"] for r in results)
    if got != todo:
        raise RuntimeError(f"Spark wrote parts {got}, expected {todo}")
    return [schema.Part(path=r["path"], n_rows=r["n_rows"], id_min=job.ranges[r["part"]][0],
                        id_max=job.ranges[r["part"]][1] - 1, bytes=r["bytes"], sha256=r["sha256"])
            for r in results]


def _merge_rejects(stage_uri: str, n_parts: int) -> int:
    """Merge the per-part reject sidecars into `_rejects.parquet`; returns the number of rejects."""
    uris = [storage.join(stage_uri, rejects_sidecar(i)) for i in range(n_parts)]
    uris = [u for u in uris if storage.exists(u)]
    if not uris:
        return 0
    t = pa.concat_tables([storage.read_table(u) for u in uris])
    storage.put_bytes(storage.join(stage_uri, schema.REJECTS), storage.parquet_bytes(t))
    for u in uris:
        fs, p = storage.filesystem(u)
        fs.rm(p)
    return t.num_rows


# ---------------------------------------------------------------- executors


def _write_parts(batches: Iterator[pa.RecordBatch], job: _Job) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: batches sorted by (part, id), parts whole; yields one result per part."""
    sink: _PartSink | None = None
    try:
        for b in batches:
            p = b.column(_PART).to_numpy()
            cuts = [0, *(np.flatnonzero(np.diff(p)) + 1).tolist(), len(p)]
            for s, e in zip(cuts[:-1], cuts[1:]):
                if s == e:
                    continue
                if sink is None or sink.i != int(p[s]):
                    if sink is not None:
                        yield sink.finish()
                    sink = _PartSink(job, int(p[s]))
                sink.feed(b.slice(s, e - s))
        if sink is not None:
            yield sink.finish()
    except BaseException:
        if sink is not None:
            sink.abort()
        raise


class _PartSink:
    """One part's rows, arriving in id order, validated and written chunk by chunk
    ([start + j * chunk_rows, ...), as the Ray engine's tasks read them). Memory: one chunk."""

    def __init__(self, job: _Job, i: int):
        self.job, self.i = job, i
        self.a, self.b = job.ranges[i]
        self.next = self.a                       # next id expected
        self.chunk_end = min(self.a + job.chunk_rows, self.b)
        self.held: list[pa.RecordBatch] = []
        self.rejects: list[tuple[int, str, int, str]] = []
        self.error: str | None = None
        self.writer: PartWriter | None = PartWriter(
            job.stage_uri, schema.part_name(i),
            schema.vectors_schema(job.dim, job.label_type, job.source_id_type))

    def feed(self, batch: pa.RecordBatch) -> None:
        ids = batch.column(schema.ID).to_numpy()
        if not np.array_equal(ids, np.arange(self.next, self.next + len(ids))):
            raise RuntimeError(f"part {self.i}: Spark delivered ids {ids[:3].tolist()}..., expected "
                               f"{self.next}.. (did the input change while sharding?)")
        pos = 0
        while pos < len(ids):
            take = min(len(ids) - pos, self.chunk_end - self.next)
            self.held.append(batch.slice(pos, take))
            pos += take
            self.next += take
            if self.next == self.chunk_end:
                self._flush()
                self.chunk_end = min(self.chunk_end + self.job.chunk_rows, self.b)

    def _flush(self) -> None:
        t, self.held = pa.Table.from_batches(self.held), []
        if self.error is not None:
            return
        table, rejects = _validate(t, self.job)
        if isinstance(table, str):
            self.error = table
        elif rejects and self.job.on_invalid == "error":
            rid, path, rec, why = rejects[0]
            more = f" ({len(rejects) - 1} more bad rows nearby)" if len(rejects) > 1 else ""
            self.error = (f"{path}: record {rec} (row id {rid}): {why}{more}. Fix the input, or "
                          f"{SKIP_HINT} to drop bad rows (listed in vectors/{schema.REJECTS})")
        else:
            self.rejects += rejects
            self.writer.write(table)
        if self.error is not None:
            self.abort()

    def finish(self) -> pa.RecordBatch:
        res: dict[str, Any] = {"part": self.i}
        if self.error is not None:
            return _result(res, error=self.error)
        if self.next != self.b:
            raise RuntimeError(f"part {self.i}: Spark delivered ids up to {self.next - 1}, "
                               f"expected {self.b - 1}")
        if self.rejects:
            rt = pa.Table.from_pylist([dict(zip(("id", "file", "record", "reason"), r))
                                       for r in self.rejects], schema=schema.rejects_schema())
            storage.put_bytes(storage.join(self.job.stage_uri, rejects_sidecar(self.i)),
                              storage.parquet_bytes(rt))
        part = self.writer.commit(self.a, self.b - 1)
        return _result(res, path=part.path, n_rows=part.n_rows, bytes=part.bytes, sha256=part.sha256)

    def abort(self) -> None:
        if self.writer is not None and self.writer.committed is None:
            self.writer.__exit__(None, None, None)  # closes and removes the temporary file
        self.writer = None


def _result(res: dict[str, Any], **more: Any) -> pa.RecordBatch:
    res = {**res, **more}
    return pa.RecordBatch.from_pydict({f.name: [res.get(f.name)] for f in _RESULT_ARROW},
                                      schema=_RESULT_ARROW)


def vectors_of(vec: pa.Array, d: int) -> tuple[np.ndarray, dict[int, str]]:
    """A list column -> (m, d) float32 values and {row: reason} for null, ragged and NaN/Inf
    rows (the Ray engine's reasons)."""
    lens = np.asarray(pc.list_value_length(vec).fill_null(-1).to_numpy(zero_copy_only=False))
    good = lens == d
    x = np.zeros((len(vec), d), dtype=np.float32)
    vals = vec.filter(pa.array(good)).flatten().to_numpy(zero_copy_only=False)
    x[good] = np.asarray(vals, dtype=np.float32).reshape(-1, d)
    why = {int(i): "null vector" if lens[i] < 0 else
           f"vector has {lens[i]} values, expected {d} (ragged)" for i in np.flatnonzero(~good)}
    for i in np.flatnonzero(good & ~np.isfinite(x).all(axis=1)):
        why[int(i)] = "vector holds NaN or Inf"
    return x, why


def _validate(t: pa.Table, job: _Job) -> tuple[pa.Table | str, list[tuple[int, str, int, str]]]:
    """One chunk -> (vectors table of its valid rows, rejects (id, file, record, reason) by id);
    an input error message instead of the table when a column cannot take the parts' type."""
    ids = t.column(schema.ID).to_numpy()
    x, why = vectors_of(t.column(schema.VECTOR).combine_chunks(), job.dim)
    labels = sids = None
    if job.label_type is not None:
        labels = t.column(schema.LABEL).combine_chunks()
        try:
            labels = labels.cast(job.label_type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            return (f"{job.locate(int(ids[0]))[0]}: label column {job.label_column!r} has type "
                    f"{labels.type}, not castable to {job.label_type} of the first file ({e})"), []
    if job.source_id_type is not None:
        sids = t.column(schema.SOURCE_ID).combine_chunks().cast(job.source_id_type)
        if pa.types.is_integer(sids.type):
            neg = np.asarray(pc.fill_null(pc.less(sids, 0), False))
            for i in np.flatnonzero(neg):
                why.setdefault(int(i), f"negative id {sids[int(i)].as_py()} in column {job.id_column!r}")
        if _FIRST in t.column_names:
            first = t.column(_FIRST).combine_chunks()
            for i in np.flatnonzero(first.is_valid().to_numpy(zero_copy_only=False)):
                why.setdefault(int(i), f"duplicate id {sids[int(i)].as_py()!r} "
                                       f"(first at row {first[int(i)].as_py()})")
    rejects = sorted((int(ids[r]), *job.locate(int(ids[r])), reason) for r, reason in why.items())
    ok = np.ones(len(ids), bool)
    ok[list(why)] = False
    keep = pa.array(ok)
    table = schema.vectors_table(ids[ok], x[ok], None if labels is None else labels.filter(keep),
                                 None if sids is None else sids.filter(keep))
    return table, rejects
