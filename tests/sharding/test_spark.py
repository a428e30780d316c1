"""The Spark shard engine writes the Ray engine's contract, and Spark reads every output.

One local[2] Spark session for the module (127.0.0.1, no UI). Expected values come from the
inputs written here and from the Parquet outputs read back with pyarrow, never from a run of
the code under test.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.conftest import nasty_vectors
from vecgraph.jobs import api, cli
from vecgraph.jobs.config import ConfigError
from vecgraph.sharding import schema, storage
from vecgraph.sharding.errors import InputError

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("pyspark") is None,
                       reason="pyspark is not installed (pip install 'vecgraph[spark]')"),
    pytest.mark.skipif(shutil.which("java") is None and not os.environ.get("JAVA_HOME"),
                       reason="Spark needs Java 17+ (no java on PATH, no JAVA_HOME)"),
    pytest.mark.usefixtures("ray_local"),
]

D = 12
SIZES = (110, 95, 75)          # rows of a.parquet, b.parquet, c.parquet
N = sum(SIZES)
SHARD = ["stages=[shard]", "shard.parts=3", "shard.chunk_rows=50", "shard.id_column=doc_id"]


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    from vecgraph.jobs import shard_spark
    wh = tmp_path_factory.mktemp("warehouse")
    s = shard_spark.session("local[2]", "vecgraph-tests", {"spark.sql.warehouse.dir": str(wh)})
    yield s
    s.stop()


def labelled_input(folder: Path, x: np.ndarray, bad: dict[int, object] | None = None) -> Path:
    """x split over a.parquet (list<float>), b.parquet (fixed_size_list), c.parquet (list), each of
    several row groups, with a string label (some null) and an int64 doc_id column. `bad` puts
    another vector (None, ragged list, NaN...) or ('id', value) at global rows."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = [None if i % 37 == 5 else f"class-{i % 7}" for i in range(len(x))]
    ids = 1000 + 7 * np.arange(len(x))
    bad = bad or {}
    lo = 0
    for name, n, rg in zip("abc", SIZES, (40, 30, 64)):
        rows = range(lo, lo + n)
        vec = [x[i].tolist() for i in rows]
        doc = ids[lo:lo + n].copy()
        for i, v in bad.items():
            if lo <= i < lo + n:
                if isinstance(v, tuple):
                    doc[i - lo] = v[1]
                else:
                    vec[i - lo] = v
        fixed = name == "b" and all(v is None or len(v) == D for v in vec)
        typ = pa.list_(pa.float32(), D) if fixed else pa.list_(pa.float32())
        t = pa.table({"vector": pa.array(vec, typ), "label": labels[lo:lo + n], "doc_id": doc})
        pq.write_table(t, folder / f"{name}.parquet", row_group_size=rg)
        lo += n
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    x = nasty_vectors(np.random.default_rng(11), N, D)
    return x, labelled_input(tmp_path_factory.mktemp("in") / "vectors", x)


@pytest.fixture(scope="module")
def ray_out(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray")
    api.run(None, f"input={data[1]}", f"out={out}", *SHARD)
    return out


def parts(out: Path) -> list[Path]:
    m = storage.read_manifest(str(out / "vectors"))
    assert m is not None, f"{out}/vectors is not committed"
    return [out / "vectors" / p.path for p in m.parts]


def vectors(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in parts(out)])


def assert_same_output(a: Path, b: Path, same_input: bool = True) -> None:
    """Equal vectors tables, plan and manifests (but statistics, and the input's name and hash
    unless `same_input`), byte-identical parts."""
    ta, tb = vectors(a), vectors(b)
    assert ta.schema.equals(tb.schema, check_metadata=True)
    assert ta.equals(tb)
    for ra, rb in zip(ta.to_pylist(), tb.to_pylist()):
        assert ra == rb
    ma, mb = (storage.read_manifest(str(o / "vectors")) for o in (a, b))
    assert (ma.n_rows, ma.dim, ma.dtype, ma.kind) == (mb.n_rows, mb.dim, mb.dtype, mb.kind)
    assert {**ma.extra, "source": None} == {**mb.extra, "source": None}
    assert [p.__dict__ for p in ma.parts] == [p.__dict__ for p in mb.parts]  # sha256: same bytes
    for pa_, pb in zip(parts(a), parts(b)):
        assert pa_.read_bytes() == pb.read_bytes()
    plans = [json.loads((o / "vectors" / "_plan.json").read_text()) for o in (a, b)]
    assert plans[0]["parts"] == plans[1]["parts"]
    if same_input:
        assert ma.config_hash == mb.config_hash and ma.extra == mb.extra and plans[0] == plans[1]


# ---------------------------------------------------------------- (a) both engines agree


def test_spark_engine_equals_ray_engine_on_labelled_parquet(spark, data, ray_out, tmp_path):
    x, folder = data
    out = tmp_path / "spark"
    assert cli.main(["shard", str(folder), str(out), "--engine", "spark", *SHARD[1:]]) == 0
    assert_same_output(ray_out, out)
    # and both hold the input: id = row position over a, b, c; vector, label and doc_id kept
    t = vectors(out)
    assert t.schema.field("vector").type == pa.list_(pa.float32(), D)
    assert t.schema.names == ["id", "vector", "source_id", "label"]
    np.testing.assert_array_equal(t.column("id").to_numpy(), np.arange(N))
    np.testing.assert_array_equal(np.stack(t.column("vector").to_numpy(zero_copy_only=False)), x)
    np.testing.assert_array_equal(t.column("source_id").to_numpy(), 1000 + 7 * np.arange(N))
    want = pa.concat_tables([pq.read_table(folder / f"{n}.parquet", columns=["label"]) for n in "abc"])
    assert t.column("label").to_pylist() == want.column("label").to_pylist()
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in parts(out)] == [2, 2, 2]  # chunks of 50
    assert storage.read_manifest(str(out / "vectors")).stats["engine"] == "spark"


def test_resumed_spark_run_rewrites_only_the_missing_part(spark, data, ray_out, tmp_path):
    """Crash after parts 0 and 2: the re-run writes part 1 alone, and the same bytes as Ray."""
    out, run = tmp_path / "spark", [f"input={data[1]}", f"out={tmp_path / 'spark'}",
                                    "shard.engine=spark", *SHARD]
    api.run(None, *run)
    (out / "vectors" / "_manifest.json").unlink()
    (out / "vectors" / "part-00001.parquet").unlink()
    kept = {n: (out / "vectors" / n).stat().st_mtime_ns for n in ("part-00000.parquet", "part-00002.parquet")}
    api.run(None, *run)
    assert {n: (out / "vectors" / n).stat().st_mtime_ns for n in kept} == kept
    assert_same_output(ray_out, out)


# ---------------------------------------------------------------- (b) Spark tables


def test_parquet_table_shards_like_its_files(spark, data, ray_out, tmp_path):
    """A table over the files: ids follow its files in sorted order, so the parts are the same."""
    spark.sql(f"CREATE TABLE vg_vectors USING parquet LOCATION '{data[1]}'")
    try:
        out = tmp_path / "table"
        api.run(None, "input=spark:vg_vectors", f"out={out}", "shard.engine=spark", *SHARD)
    finally:
        spark.sql("DROP TABLE vg_vectors")
    assert_same_output(ray_out, out, same_input=False)


def test_view_without_files_numbers_rows_in_scan_order(spark, tmp_path):
    x = np.random.default_rng(3).normal(size=(57, 5)).astype(np.float32)
    rows = [(x[i].astype(float).tolist(), int(i % 3), f"doc{i}") for i in range(len(x))]
    df = spark.createDataFrame(rows, "emb array<double>, label int, key string")
    df.createOrReplaceTempView("vg_view")
    out = tmp_path / "view"
    m = api.run(None, "input=spark:vg_view", f"out={out}", "stages=[shard]", "shard.engine=spark",
                "shard.parts=2", "shard.vector_column=emb", "shard.id_column=key")["shard"]
    t = vectors(out)
    assert t.schema.equals(schema.vectors_schema(5, pa.int32(), pa.string()))
    assert [p.n_rows for p in m.parts] == [28, 29] and m.dim == 5
    np.testing.assert_array_equal(t.column("id").to_numpy(), np.arange(57))
    np.testing.assert_array_equal(np.stack(t.column("vector").to_numpy(zero_copy_only=False)), x)
    assert t.column("source_id").to_pylist() == [f"doc{i}" for i in range(57)]
    assert t.column("label").to_pylist() == [i % 3 for i in range(57)]


def test_local_session_binds_to_loopback_without_ui(spark):
    conf = spark.sparkContext.getConf()
    assert conf.get("spark.master") == "local[2]"
    assert conf.get("spark.driver.host") == conf.get("spark.driver.bindAddress") == "127.0.0.1"
    assert conf.get("spark.ui.enabled") == "false"


def test_missing_table_and_ray_engine_on_a_table_are_input_errors(spark, tmp_path):
    with pytest.raises(InputError, match=r"spark:vg_nope: no table or view 'vg_nope'"):
        api.run(None, "input=spark:vg_nope", f"out={tmp_path}", "stages=[shard]", "shard.engine=spark")
    with pytest.raises(ConfigError, match=r"input='spark:t' is a Spark table; set shard.engine=spark"):
        api.run(None, "input=spark:t", f"out={tmp_path}", "stages=[shard]")


# ---------------------------------------------------------------- (c) Spark reads every output


def test_spark_reads_every_output(spark, tmp_path):
    x = nasty_vectors(np.random.default_rng(5), 240, 8)
    folder = tmp_path / "in"
    folder.mkdir()
    y = [f"c{int(v)}" for v in (x[:, 0] > 0) * 1 + (x[:, 1] > 0) * 2]
    pq.write_table(pa.table({"vector": pa.array(list(x), pa.list_(pa.float32())), "label": y}),
                   folder / "x.parquet")
    out, n, k = tmp_path / "out", len(x), 5
    api.run(None, f"input={folder}", f"out={out}", "stages=[shard,index,knn,kmeans,mcl,propagate]",
            "shard.parts=2", f"knn.k={k}", "kmeans.k=4", "kmeans.niter=5", "propagate.niter=5")

    def both(folder: str) -> tuple[pa.Table, pa.Table]:
        got = spark.read.parquet(str(out / folder)).toArrow()   # `_*` files are skipped by Spark
        want = pq.read_table(out / folder)
        return got.sort_by("id"), want.sort_by("id")

    g = spark.read.parquet(str(out / "graph")).selectExpr(
        "id", "posexplode(arrays_zip(neighbors, distances)) as (pos, nd)").selectExpr(
        "id", "pos", "nd.neighbors as neighbor", "nd.distances as distance").toArrow()
    assert g.num_rows == n * k
    g = g.sort_by([("id", "ascending"), ("pos", "ascending")])
    want = pq.read_table(out / "graph").sort_by("id")
    np.testing.assert_array_equal(g.column("id").to_numpy(), np.repeat(want.column("id").to_numpy(), k))
    np.testing.assert_array_equal(g.column("neighbor").to_numpy(),
                                  pc.list_flatten(want.column("neighbors")).to_numpy())
    np.testing.assert_array_equal(g.column("distance").to_numpy(),
                                  pc.list_flatten(want.column("distances")).to_numpy())
    got, want = both("vectors")
    assert got.num_rows == n
    np.testing.assert_array_equal(np.stack(got.column("vector").to_numpy(zero_copy_only=False)), x)
    assert got.column("label").to_pylist() == y
    for stage in ("kmeans", "mcl", "labels"):
        got, want = both(stage)
        assert got.num_rows == n and got.column_names == want.column_names
        for c in want.column_names:
            assert got.column(c).to_pylist() == want.column(c).to_pylist(), (stage, c)
    # Spark lists no `_*` file, even one named directly: the sidecars (_centroids, _seeds,
    # _rejects) are for pyarrow/pandas/DuckDB readers, and never leak into the folders' rows.
    from pyspark.errors import AnalysisException
    with pytest.raises(AnalysisException, match="UNABLE_TO_INFER_SCHEMA"):
        spark.read.parquet(str(out / "kmeans" / "_centroids.parquet"))


# ---------------------------------------------------------------- (d) bad rows


BAD_ROWS = {
    "nan": (150, r"\S+/b\.parquet: record 40 \(row id 150\): vector holds NaN or Inf\. Fix the "
                 r"input, or set on_invalid=skip"),
    "repeated_id": (("id", 1000 + 7 * 17), r"\S+/c\.parquet: record 25: id 1119 in column 'doc_id' "
                                          r"repeats \S+/a\.parquet record 17 \(1 repeated ids in all\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_exits_2_naming_file_and_record_as_ray_does(spark, tmp_path, capsys, case):
    x = nasty_vectors(np.random.default_rng(2), N, D)
    value, pattern = BAD_ROWS[case]
    if case == "nan":
        bad = x[value].copy()
        bad[3] = np.nan
        folder = labelled_input(tmp_path / "in", x, {value: bad.tolist()})
    else:
        folder = labelled_input(tmp_path / "in", x, {230: value})
    errs = {}
    for engine in ("ray", "spark"):
        capsys.readouterr()
        out = tmp_path / engine
        assert cli.main(["shard", str(folder), str(out), "--engine", engine, *SHARD[1:]]) == 2
        errs[engine] = [ln for ln in capsys.readouterr().err.splitlines() if "vecgraph: error" in ln]
        assert not (out / "vectors" / "_manifest.json").exists()
    assert len(errs["spark"]) == 1 and re.match("vecgraph: error: " + pattern, errs["spark"][0]), errs
    assert errs["spark"] == errs["ray"]


def test_skipped_rows_and_rejects_equal_ray(spark, tmp_path):
    """on_invalid=skip: null, ragged, NaN, Inf, negative and repeated ids, in both engines."""
    x = nasty_vectors(np.random.default_rng(9), N, D)
    inf = x[200].copy()
    inf[0] = np.inf
    nan = x[20].copy()
    nan[1] = np.nan
    bad = {3: None, 20: nan.tolist(), 121: x[121, :5].tolist(), 200: inf.tolist(),
           60: ("id", -4), 230: ("id", 1000 + 7 * 17), 240: ("id", 1000 + 7 * 17)}
    folder = labelled_input(tmp_path / "in", x, bad)
    outs = [tmp_path / e for e in ("ray", "spark")]
    for engine, out in zip(("ray", "spark"), outs):
        m = api.run(None, f"input={folder}", f"out={out}", "on_invalid=skip",
                    f"shard.engine={engine}", *SHARD)["shard"]
        assert m.stats["rejected_rows"] == 7 and m.n_rows == N - 7
    assert_same_output(*outs)
    rej = [pq.read_table(o / "vectors" / schema.REJECTS) for o in outs]
    assert rej[0].equals(rej[1])
    assert rej[1].column("id").to_pylist() == [3, 20, 60, 121, 200, 230, 240]
    assert [Path(f).name for f in rej[1].column("file").to_pylist()] == \
        ["a.parquet"] * 3 + ["b.parquet"] * 2 + ["c.parquet"] * 2
    reasons = rej[1].column("reason").to_pylist()
    assert reasons[0] == "null vector" and "5 values, expected 12" in reasons[3]
    assert "NaN" in reasons[1] and "NaN or Inf" in reasons[4] and "negative id -4" in reasons[2]
    assert reasons[5:] == [f"duplicate id {1119} (first at row 17)"] * 2
    assert (outs[1] / "vectors" / schema.REJECTS).read_bytes() == \
        (outs[0] / "vectors" / schema.REJECTS).read_bytes()


# ---------------------------------------------------------------- refusals


def test_non_parquet_files_are_left_to_ray(spark, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 3), np.float32))
    with pytest.raises(InputError, match=r"x\.npy: shard\.engine=spark reads Parquet files and "
                                         r"Spark tables .* set shard\.engine=ray"):
        api.run(None, f"input={tmp_path / 'x.npy'}", f"out={tmp_path / 'o'}", "stages=[shard]",
                "shard.engine=spark")


def test_missing_pyspark_says_what_to_install(monkeypatch, tmp_path):
    from vecgraph.jobs import shard_spark
    monkeypatch.setitem(sys.modules, "pyspark", None)
    with pytest.raises(InputError, match=r"pip install 'vecgraph\[spark\]'"):
        shard_spark.run(api.config_mod.load(None, [f"out={tmp_path}", "shard.engine=spark"]), {})
