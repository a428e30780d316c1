"""Input readers read every format back exactly; every contract table round-trips through Parquet.

Each test writes its input with numpy / pyarrow / gzip, plans it with `open_source` and reads it
with `read_rows`: values (as float32), ids (row position over the files in sorted order) and
labels must equal what was written.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import write_fvecs
from vecgraph.sharding import readers, schema, storage
from vecgraph.sharding.errors import InputError


def read_all(uri: str | Path, **kw) -> tuple[readers.Source, readers.Rows]:
    src = readers.open_source(str(uri), **kw)
    return src, readers.read_rows(src, 0, src.n_rows)


def assert_rows(rows: readers.Rows, x: np.ndarray, ids: np.ndarray | None = None) -> None:
    """rows hold exactly x (as float32) with ids 0..n-1 (or `ids`) and no rejects."""
    assert rows.rejects == []
    assert rows.x.dtype == np.float32 and rows.x.flags.c_contiguous
    np.testing.assert_array_equal(rows.x, np.asarray(x, dtype=np.float32))
    expect = np.arange(len(x), dtype=np.int64) if ids is None else ids
    assert rows.ids.dtype == np.int64
    np.testing.assert_array_equal(rows.ids, expect)


def write_vecs(path: Path, x: np.ndarray, value_dtype: str) -> None:
    """.ivecs ('<i4') / .bvecs ('u1'): per record a little-endian int32 dim, then the values."""
    with open(path, "wb") as f:
        for row in x:
            f.write(struct.pack("<i", x.shape[1]))
            f.write(np.asarray(row, dtype=value_dtype).tobytes())


def idx_bytes(arr: np.ndarray) -> bytes:
    """MNIST IDX: 0x0000, type 0x08 (uint8), ndim, big-endian uint32 dims, then the bytes."""
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return head + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


# ---------------------------------------------------------------- .npy

@pytest.mark.parametrize("dtype", ["<f4", "<f8", "<f2", ">f4", ">f8"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_dtypes_byte_orders_and_memory_orders(tmp_path, rng, dtype, order):
    x = np.asarray(rng.normal(size=(23, 7)) * 10, dtype=dtype, order=order)
    path = tmp_path / "x.npy"
    np.save(path, x)
    src, rows = read_all(path)
    assert (src.dim, src.n_rows, src.has_labels) == (7, 23, False)
    assert rows.labels is None
    assert_rows(rows, x.astype(np.float32))


def test_npy_range_reads_touch_only_their_rows(tmp_path, rng):
    x = rng.normal(size=(40, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    src = readers.open_source(str(tmp_path / "x.npy"))
    for a, b in [(0, 1), (7, 19), (39, 40), (12, 12)]:
        rows = readers.read_rows(src, a, b)
        assert_rows(rows, x[a:b], np.arange(a, b))


def test_npy_not_2d_is_an_input_error(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 2, 3), np.float32))
    with pytest.raises(InputError, match=r"x\.npy: \.npy of shape \(4, 2, 3\), expected \(n, d\)"):
        readers.open_source(str(tmp_path / "x.npy"))


def test_npy_files_of_different_dims_name_the_odd_file(tmp_path, rng):
    np.save(tmp_path / "a.npy", rng.normal(size=(5, 8)).astype(np.float32))
    np.save(tmp_path / "b.npy", rng.normal(size=(5, 6)).astype(np.float32))
    with pytest.raises(InputError, match=r"b\.npy: record 0 has dim 6, but .*a\.npy has dim 8"):
        readers.open_source(str(tmp_path))


# ---------------------------------------------------------------- .fvecs / .ivecs / .bvecs

def test_fvecs(tmp_path, rng):
    x = rng.normal(size=(31, 12)).astype(np.float32)
    write_fvecs(tmp_path / "x.fvecs", x)
    src, rows = read_all(tmp_path / "x.fvecs")
    assert (src.dim, src.n_rows) == (12, 31)
    assert_rows(rows, x)


def test_ivecs(tmp_path, rng):
    x = rng.integers(-(2**20), 2**20, size=(17, 9))
    write_vecs(tmp_path / "x.ivecs", x, "<i4")
    src, rows = read_all(tmp_path / "x.ivecs")
    assert (src.dim, src.n_rows) == (9, 17)
    assert_rows(rows, x.astype(np.float32))


def test_bvecs(tmp_path, rng):
    x = rng.integers(0, 256, size=(13, 20)).astype(np.uint8)
    x[0] = [0] * 10 + [255] * 10
    write_vecs(tmp_path / "x.bvecs", x, "u1")
    src, rows = read_all(tmp_path / "x.bvecs")
    assert (src.dim, src.n_rows) == (20, 13)
    assert_rows(rows, x.astype(np.float32))


def test_truncated_fvecs_names_the_file_and_record(tmp_path, rng):
    x = rng.normal(size=(10, 4)).astype(np.float32)
    path = tmp_path / "x.fvecs"
    write_fvecs(path, x)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(InputError, match=r"x\.fvecs: record 9 is truncated"):
        readers.open_source(str(path))


def test_fvecs_record_with_other_dim_is_rejected_by_record(tmp_path, rng):
    x = rng.normal(size=(10, 4)).astype(np.float32)
    path = tmp_path / "x.fvecs"
    write_fvecs(path, x)
    raw = bytearray(path.read_bytes())
    raw[6 * 20:6 * 20 + 4] = struct.pack("<i", 3)   # record 6's header says dim 3
    path.write_bytes(bytes(raw))
    _, rows = read_all(path)
    assert [(r[0], r[2]) for r in rows.rejects] == [(6, 6)]
    assert "dim 3, expected 4" in rows.rejects[0][3]
    keep = np.arange(10) != 6
    np.testing.assert_array_equal(rows.ids, np.flatnonzero(keep))
    np.testing.assert_array_equal(rows.x, x[keep])


# ---------------------------------------------------------------- IDX (MNIST style)

@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_with_labels(tmp_path, rng, gz):
    """Two image files + their label files: files in sorted order (t10k before train)."""
    suffix = ".gz" if gz else ""
    opener = gzip.open if gz else open
    data = {}
    for prefix, n in [("train", 11), ("t10k", 6)]:
        img = rng.integers(0, 256, size=(n, 4, 5)).astype(np.uint8)
        lab = rng.integers(0, 10, size=n).astype(np.uint8)
        with opener(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as f:
            f.write(idx_bytes(img))
        with opener(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
            f.write(idx_bytes(lab))
        data[prefix] = (img, lab)
    src, rows = read_all(tmp_path)
    assert (src.dim, src.n_rows, src.has_labels) == (20, 17, True)
    x = np.concatenate([data["t10k"][0], data["train"][0]]).reshape(17, 20)
    y = np.concatenate([data["t10k"][1], data["train"][1]]).astype(np.int64)
    assert_rows(rows, x.astype(np.float32))
    assert rows.labels.to_pylist() == y.tolist()
    # a range inside the second file seeks into it
    part = readers.read_rows(src, 8, 15)
    assert_rows(part, x[8:15], np.arange(8, 15))
    assert part.labels.to_pylist() == y[8:15].tolist()


@pytest.mark.parametrize("gz", [True, False])
def test_idx_images_file_alone(tmp_path, rng, gz):
    img = rng.integers(0, 256, size=(9, 3, 3)).astype(np.uint8)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    (tmp_path / name).write_bytes(gzip.compress(idx_bytes(img)) if gz else idx_bytes(img))
    src, rows = read_all(tmp_path / name)
    assert (src.dim, src.n_rows, src.has_labels) == (9, 9, False)
    assert rows.labels is None
    assert_rows(rows, img.reshape(9, 9).astype(np.float32))


# ---------------------------------------------------------------- Parquet

def list_array(x: np.ndarray, fixed: bool, value_type: pa.DataType) -> pa.Array:
    if fixed:
        return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), value_type), x.shape[1])
    return pa.array(list(x), pa.list_(value_type))


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed_size_list", "list"])
@pytest.mark.parametrize("value_type", [pa.float32(), pa.float64()], ids=["f32", "f64"])
def test_parquet_file_with_labels(tmp_path, rng, fixed, value_type):
    x = rng.normal(size=(25, 6))
    labels = pa.array([None if i % 7 == 3 else f"c{i % 4}" for i in range(25)], pa.string())
    t = pa.table({"vector": list_array(x, fixed, value_type), "label": labels,
                  "extra": pa.array(np.arange(25) * 2)})
    pq.write_table(t, tmp_path / "x.parquet", row_group_size=8)  # several row groups
    src, rows = read_all(tmp_path / "x.parquet")
    assert (src.dim, src.n_rows, src.has_labels, src.label_column) == (6, 25, True, "label")
    assert_rows(rows, x.astype(np.float32))
    assert rows.labels.type == pa.string()
    assert rows.labels.to_pylist() == labels.to_pylist()
    part = readers.read_rows(src, 5, 19)  # crosses row-group boundaries
    assert_rows(part, x[5:19].astype(np.float32), np.arange(5, 19))
    assert part.labels.to_pylist() == labels.to_pylist()[5:19]


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed_size_list", "list"])
def test_parquet_directory_in_sorted_order(tmp_path, rng, fixed):
    """Files are taken in sorted name order (not creation order); `_*` files are ignored."""
    xs = {name: rng.normal(size=(n, 4)).astype(np.float32)
          for name, n in [("b.parquet", 7), ("a.parquet", 5), ("c.parquet", 3)]}
    ys = {}
    for name, x in xs.items():   # written b, a, c
        ys[name] = rng.integers(0, 3, len(x))
        pq.write_table(pa.table({"vector": list_array(x, fixed, pa.float32()),
                                 "label": pa.array(ys[name], pa.int64()),
                                 "key": pa.array([f"{name}:{i}" for i in range(len(x))])}),
                       tmp_path / name)
    pq.write_table(pa.table({"junk": [1]}), tmp_path / "_SUCCESS.parquet")
    src, rows = read_all(tmp_path, id_column="key")
    order = ["a.parquet", "b.parquet", "c.parquet"]
    assert [Path(f.path).name for f in src.files] == order
    assert [f.offset for f in src.files] == [0, 5, 12]
    assert_rows(rows, np.concatenate([xs[n] for n in order]))
    assert rows.labels.to_pylist() == np.concatenate([ys[n] for n in order]).tolist()
    assert rows.source_ids.to_pylist() == [f"{n}:{i}" for n in order for i in range(len(xs[n]))]


def test_parquet_ragged_and_null_vectors_are_rejected_by_record(tmp_path):
    vec = pa.array([[1.0, 2.0], [3.0], None, [4.0, 5.0]], pa.list_(pa.float32()))
    pq.write_table(pa.table({"vector": vec}), tmp_path / "x.parquet")
    _, rows = read_all(tmp_path / "x.parquet")
    assert [(r[0], r[2]) for r in rows.rejects] == [(1, 1), (2, 2)]
    assert "ragged" in rows.rejects[0][3] and "null" in rows.rejects[1][3]
    np.testing.assert_array_equal(rows.ids, [0, 3])
    np.testing.assert_array_equal(rows.x, [[1, 2], [4, 5]])


def test_parquet_missing_vector_column_names_the_column(tmp_path):
    pq.write_table(pa.table({"emb": pa.array([[1.0]])}), tmp_path / "x.parquet")
    with pytest.raises(InputError, match=r"x\.parquet: no column 'vector'.*shard\.vector_column"):
        readers.open_source(str(tmp_path / "x.parquet"))


# ---------------------------------------------------------------- several files, globs, builtins

def test_directory_of_npy_files_ids_follow_sorted_order(tmp_path, rng):
    xs = {"part10.npy": rng.normal(size=(4, 3)), "part2.npy": rng.normal(size=(6, 3)),
          "part1.npy": rng.normal(size=(5, 3))}
    for name, x in xs.items():
        np.save(tmp_path / name, x.astype(np.float32))
    (tmp_path / "README.md").write_text("not data")
    src, rows = read_all(tmp_path)
    order = sorted(xs)   # lexicographic: part1, part10, part2
    assert [Path(f.path).name for f in src.files] == order
    x = np.concatenate([xs[n] for n in order]).astype(np.float32)
    assert_rows(rows, x)
    for a, b in [(3, 8), (4, 11), (9, 15)]:   # ranges across file boundaries
        assert_rows(readers.read_rows(src, a, b), x[a:b], np.arange(a, b))


def test_glob_of_fvecs(tmp_path, rng):
    xs = [rng.normal(size=(n, 5)).astype(np.float32) for n in (3, 8, 4)]
    for i, x in enumerate(xs):
        write_fvecs(tmp_path / f"chunk-{i}.fvecs", x)
    np.save(tmp_path / "other.npy", rng.normal(size=(2, 5)).astype(np.float32))
    src, rows = read_all(tmp_path / "chunk-*.fvecs")
    assert len(src.files) == 3 and src.n_rows == 15
    assert_rows(rows, np.concatenate(xs))


def test_missing_input_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"nothing\.npy: input not found"):
        readers.open_source(str(tmp_path / "nothing.npy"))


def test_sklearn_digits():
    from sklearn.datasets import load_digits
    ds = load_digits()
    src, rows = read_all("sklearn:digits")
    assert (src.dim, src.n_rows, src.has_labels) == (64, 1797, True)
    assert_rows(rows, ds.data.astype(np.float32))
    assert rows.labels.type == pa.int64()
    assert rows.labels.to_pylist() == ds.target.tolist()


# ---------------------------------------------------------------- contract tables round trip

def duck_types(path: Path) -> dict[str, str]:
    rel = duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{path}')")
    return {name: typ for name, typ, *_ in rel.fetchall()}


def roundtrip(tmp_path: Path, table: pa.Table, id_min: int, id_max: int) -> Path:
    """Write with storage.write_part and check the manifest entry against the file."""
    part = storage.write_part(str(tmp_path / "stage"), schema.part_name(3), table, id_min, id_max)
    path = tmp_path / "stage" / "part-00003.parquet"
    assert part.path == "part-00003.parquet" and path.exists()
    data = path.read_bytes()
    assert (part.n_rows, part.id_min, part.id_max) == (table.num_rows, id_min, id_max)
    assert part.bytes == len(data) and part.sha256 == schema.sha256_bytes(data)
    assert not list((tmp_path / "stage").glob("*.tmp"))
    back = pq.read_table(path)
    assert back.schema.equals(table.schema), (back.schema, table.schema)
    assert back.equals(table)
    assert storage.read_schema(str(path)).equals(table.schema)
    return path


def test_vectors_table_roundtrip(tmp_path, rng):
    ids = np.array([10, 11, 13, 14], np.int64)  # a gap, as after on_invalid=skip
    x = rng.normal(size=(4, 6)).astype(np.float32)
    labels = pa.array(["a", None, "b", "a"])
    source_ids = pa.array([100, 101, 103, 104], pa.int64())
    t = schema.vectors_table(ids, x.astype(np.float64), labels, source_ids)
    assert t.schema.field("id").type == pa.int64() and not t.schema.field("id").nullable
    assert t.schema.field("vector").type == pa.list_(pa.float32(), 6)
    path = roundtrip(tmp_path, t, 10, 14)
    df = pd.read_parquet(path)
    assert list(df.columns) == ["id", "vector", "source_id", "label"]
    assert df["id"].dtype == np.int64 and df["source_id"].dtype == np.int64
    np.testing.assert_array_equal(np.stack(df["vector"].to_numpy()), x)
    assert df["vector"][0].dtype == np.float32
    assert df["label"].tolist()[::2] == ["a", "b"] and pd.isna(df["label"][1])
    assert duck_types(path) == {"id": "BIGINT", "vector": "FLOAT[]", "source_id": "BIGINT",
                                "label": "VARCHAR"}
    got = duckdb.sql(f"SELECT id, vector FROM read_parquet('{path}') ORDER BY id").fetchall()
    assert [r[0] for r in got] == ids.tolist()
    np.testing.assert_array_equal(np.array([r[1] for r in got], np.float32), x)
    np.testing.assert_array_equal(schema.list_column(pq.read_table(path), "vector", np.float32), x)


def test_graph_table_roundtrip(tmp_path, rng):
    ids = np.arange(5, 9, dtype=np.int64)
    I = np.array([[6, 7, -1], [5, 7, -1], [5, 6, -1], [5, 6, 7]], np.int64)
    D = np.where(I < 0, np.inf, rng.random(I.shape)).astype(np.float32)
    t = schema.graph_table(ids, I, D)
    assert t.schema == schema.graph_schema(3)
    assert t.schema.field("neighbors").type == pa.list_(pa.int64(), 3)
    assert t.schema.field("distances").type == pa.list_(pa.float32(), 3)
    path = roundtrip(tmp_path, t, 5, 8)
    df = pd.read_parquet(path)
    np.testing.assert_array_equal(np.stack(df["neighbors"].to_numpy()), I)
    np.testing.assert_array_equal(np.stack(df["distances"].to_numpy()), D)
    assert df["neighbors"][0].dtype == np.int64 and df["distances"][0].dtype == np.float32
    assert duck_types(path) == {"id": "BIGINT", "neighbors": "BIGINT[]", "distances": "FLOAT[]"}
    got = duckdb.sql(f"SELECT neighbors, distances FROM read_parquet('{path}') ORDER BY id"
                     ).fetchall()
    np.testing.assert_array_equal(np.array([r[0] for r in got]), I)
    np.testing.assert_array_equal(np.array([r[1] for r in got], np.float32), D)  # inf kept
    back = pq.read_table(path)
    np.testing.assert_array_equal(schema.list_column(back, "neighbors", np.int64), I)
    np.testing.assert_array_equal(schema.list_column(back, "distances", np.float32), D)


@pytest.mark.parametrize("with_distance", [True, False])
def test_clusters_table_roundtrip(tmp_path, rng, with_distance):
    ids = np.arange(7, dtype=np.int64)
    cluster = np.array([0, 2, 1, 1, 0, 2, 2])
    dist = rng.random(7).astype(np.float32) if with_distance else None
    t = schema.clusters_table(ids, cluster, dist)
    assert t.schema == schema.clusters_schema(with_distance)
    path = roundtrip(tmp_path, t, 0, 6)
    df = pd.read_parquet(path)
    assert df["cluster"].dtype == np.int64 and df["cluster"].tolist() == cluster.tolist()
    expect = {"id": "BIGINT", "cluster": "BIGINT"}
    if with_distance:
        assert df["distance"].dtype == np.float32
        np.testing.assert_array_equal(df["distance"].to_numpy(), dist)
        expect["distance"] = "FLOAT"
    assert duck_types(path) == expect


@pytest.mark.parametrize("labels", [pa.array([3, None, 1, 3], pa.int64()),
                                    pa.array(["cat", "dog", None, "cat"], pa.string())],
                         ids=["int64", "string"])
def test_labels_table_roundtrip(tmp_path, labels):
    ids = np.arange(20, 24, dtype=np.int64)
    score = np.array([1.0, 0.0, 0.25, 0.5], np.float32)
    t = schema.labels_table(ids, labels, score)
    assert t.schema == schema.labels_schema(labels.type)
    assert t.schema.field("label").nullable and not t.schema.field("score").nullable
    path = roundtrip(tmp_path, t, 20, 23)
    df = pd.read_parquet(path)
    assert df["score"].dtype == np.float32 and df["id"].dtype == np.int64
    assert [None if pd.isna(v) else v for v in df["label"]] == labels.to_pylist()
    assert duck_types(path) == {"id": "BIGINT",
                                "label": "BIGINT" if labels.type == pa.int64() else "VARCHAR",
                                "score": "FLOAT"}
    got = duckdb.sql(f"SELECT label FROM read_parquet('{path}') ORDER BY id").fetchall()
    assert [r[0] for r in got] == labels.to_pylist()


def test_rejects_table_and_manifest_roundtrip(tmp_path):
    t = pa.Table.from_pylist([{"id": 4, "file": "/x.fvecs", "record": 4, "reason": "NaN"}],
                             schema=schema.rejects_schema())
    path = tmp_path / schema.REJECTS
    path.write_bytes(storage.parquet_bytes(t))
    assert pq.read_table(path).equals(t)
    m = schema.Manifest(kind="graph", stage="knn", n_rows=3,
                        parts=[schema.Part("part-00000.parquet", 3, 0, 2, 100, "ab")],
                        config_hash="h", metric="cosine", distance="one_minus_cosine",
                        stats={"recall_at_k": np.float64(0.5), "holes": np.int64(2)})
    storage.write_manifest(str(tmp_path / "graph"), m)
    back = storage.read_manifest(str(tmp_path / "graph"))
    assert back == schema.Manifest.from_json(m.to_json())
    assert back.parts == m.parts and back.stats == {"recall_at_k": 0.5, "holes": 2}
    assert storage.read_manifest(str(tmp_path / "absent")) is None
