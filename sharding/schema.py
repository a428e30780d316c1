"""The data contract: column names, Arrow schemas, part names and the manifest (DESIGN §2)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 1

# Column names: no other module spells them.
ID = "id"
VECTOR = "vector"
LABEL = "label"
SOURCE_ID = "source_id"
NEIGHBORS = "neighbors"
DISTANCES = "distances"
CLUSTER = "cluster"
DISTANCE = "distance"
SCORE = "score"
CENTROID = "centroid"
REASON = "reason"

MANIFEST = "_manifest.json"
PLAN = "_plan.json"
REJECTS = "_rejects.parquet"

# Output folder of each stage under OUT.
STAGE_DIRS = {
    "shard": "vectors",
    "index": "index",
    "knn": "graph",
    "kmeans": "kmeans",
    "mcl": "mcl",
    "propagate": "labels",
}
STAGES = ("shard", "index", "knn", "kmeans", "mcl", "propagate", "report")

# knn.metric -> the distance the graph stores (ascending, smaller is closer).
DISTANCE_NAMES = {
    "l2": "squared_l2",
    "cosine": "one_minus_cosine",
    "ip": "negative_inner_product",
}


def part_name(i: int) -> str:
    """Deterministic file name of part i: `part-00012.parquet`."""
    return f"part-{i:05d}.parquet"


def shard_index_name(i: int) -> str:
    return f"shard-{i:05d}.faissindex"


def vectors_schema(d: int, label_type: pa.DataType | None,
                   source_id_type: pa.DataType | None) -> pa.Schema:
    fields = [pa.field(ID, pa.int64(), nullable=False),
              pa.field(VECTOR, pa.list_(pa.float32(), d), nullable=False)]
    if source_id_type is not None:
        fields.append(pa.field(SOURCE_ID, source_id_type))
    if label_type is not None:
        fields.append(pa.field(LABEL, label_type))
    return pa.schema(fields)


def graph_schema(k: int) -> pa.Schema:
    return pa.schema([pa.field(ID, pa.int64(), nullable=False),
                      pa.field(NEIGHBORS, pa.list_(pa.int64(), k), nullable=False),
                      pa.field(DISTANCES, pa.list_(pa.float32(), k), nullable=False)])


def clusters_schema(with_distance: bool) -> pa.Schema:
    fields = [pa.field(ID, pa.int64(), nullable=False), pa.field(CLUSTER, pa.int64(), nullable=False)]
    if with_distance:
        fields.append(pa.field(DISTANCE, pa.float32(), nullable=False))
    return pa.schema(fields)


def labels_schema(label_type: pa.DataType) -> pa.Schema:
    return pa.schema([pa.field(ID, pa.int64(), nullable=False), pa.field(LABEL, label_type),
                      pa.field(SCORE, pa.float32(), nullable=False)])


def rejects_schema() -> pa.Schema:
    return pa.schema([pa.field(ID, pa.int64(), nullable=False), pa.field("file", pa.string()),
                      pa.field("record", pa.int64()), pa.field(REASON, pa.string())])


def fixed_list(values: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    """(n, w) array -> Arrow fixed_size_list<value_type, w> column."""
    n, w = values.shape
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, w)


def vectors_table(ids: np.ndarray, x: np.ndarray, labels: pa.Array | None = None,
                  source_ids: pa.Array | None = None) -> pa.Table:
    """ids: (n,) int64, x: (n, d) float32 -> vectors table in the contract's schema."""
    schema = vectors_schema(x.shape[1], None if labels is None else labels.type,
                            None if source_ids is None else source_ids.type)
    cols = [pa.array(ids, pa.int64()), fixed_list(x.astype(np.float32, copy=False), pa.float32())]
    if source_ids is not None:
        cols.append(source_ids)
    if labels is not None:
        cols.append(labels)
    return pa.Table.from_arrays(cols, schema=schema)


def graph_table(ids: np.ndarray, I: np.ndarray, D: np.ndarray) -> pa.Table:
    """ids: (n,) int64, I: (n, k) int64 neighbours, D: (n, k) float32 distances."""
    return pa.Table.from_arrays(
        [pa.array(ids, pa.int64()), fixed_list(I.astype(np.int64, copy=False), pa.int64()),
         fixed_list(D.astype(np.float32, copy=False), pa.float32())],
        schema=graph_schema(I.shape[1]))


def clusters_table(ids: np.ndarray, cluster: np.ndarray,
                   distance: np.ndarray | None = None) -> pa.Table:
    cols = [pa.array(ids, pa.int64()), pa.array(cluster, pa.int64())]
    if distance is not None:
        cols.append(pa.array(distance, pa.float32()))
    return pa.Table.from_arrays(cols, schema=clusters_schema(distance is not None))


def labels_table(ids: np.ndarray, labels: pa.Array, score: np.ndarray) -> pa.Table:
    return pa.Table.from_arrays([pa.array(ids, pa.int64()), labels, pa.array(score, pa.float32())],
                                schema=labels_schema(labels.type))


def list_column(table: pa.Table, name: str, dtype: Any) -> np.ndarray:
    """A fixed_size_list or list column with rows of equal length -> (n, w) numpy array."""
    col = table.column(name).combine_chunks()
    n = len(col)
    if n == 0:
        w = col.type.list_size if pa.types.is_fixed_size_list(col.type) else 0
        return np.zeros((0, w), dtype=dtype)
    if pa.types.is_fixed_size_list(col.type):
        w = col.type.list_size
        flat = col.flatten()
    else:
        flat = col.flatten()
        w = len(flat) // n
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=dtype).reshape(n, w)


@dataclasses.dataclass
class Part:
    path: str          # relative to the stage folder
    n_rows: int
    id_min: int        # first id covered (inclusive)
    id_max: int        # last id covered (inclusive); id_min - 1 when the part is empty
    bytes: int
    sha256: str


@dataclasses.dataclass
class Manifest:
    """`_manifest.json` of one stage output: the only proof that the output is committed."""
    kind: str
    stage: str
    n_rows: int
    parts: list[Part]
    config_hash: str
    metric: str | None = None
    distance: str | None = None
    dim: int | None = None
    dtype: str | None = None
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)  # stage -> config_hash
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    code_version: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        raw = json.loads(text)
        raw["parts"] = [Part(**p) for p in raw["parts"]]
        return cls(**raw)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stable_hash(obj: Any) -> str:
    """Hash of a JSON-able object, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]
