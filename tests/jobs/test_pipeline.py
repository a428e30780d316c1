"""End-to-end pipeline runs on the shared embedded Ray (`ray_local`), checked independently.

Every expected value is computed here, from the inputs (numpy brute force, scikit-learn) or
from the Parquet outputs read back with pyarrow/pandas/DuckDB, never copied from a run.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import struct
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import normalized_mutual_info_score

from tests.conftest import nasty_vectors, write_fvecs
from vecgraph.jobs import api, cli
from vecgraph.sharding import schema, storage

pytestmark = pytest.mark.usefixtures("ray_local")

PER_NODE = ("shard", "knn", "kmeans", "mcl", "propagate")


# ---------------------------------------------------------------- helpers

def run(out: Path, *overrides: str) -> dict:
    return api.run(None, f"out={out}", *overrides)


def manifest(out: Path, stage: str) -> schema.Manifest:
    m = storage.read_manifest(str(out / schema.STAGE_DIRS[stage]))
    assert m is not None, f"{stage} is not committed under {out}"
    return m


def stage_table(out: Path, stage: str) -> pa.Table:
    """All parts of a committed stage, in manifest order, read with plain pyarrow."""
    folder = out / schema.STAGE_DIRS[stage]
    return pa.concat_tables([pq.read_table(folder / p.path) for p in manifest(out, stage).parts])


def graph_arrays(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = stage_table(out, "knn")
    return (t.column("id").to_numpy(), np.stack(t.column("neighbors").to_numpy(zero_copy_only=False)),
            np.stack(t.column("distances").to_numpy(zero_copy_only=False)))


def file_bytes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


def brute_force(x: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gold k-NN in float64: (D_all (n, n), I (n, k), D (n, k)); self excluded by id, ties by
    smaller id, -1/+inf padding when fewer than k other nodes exist."""
    x = x.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        D_all = 1 - x @ x.T
    elif metric == "ip":
        D_all = -(x @ x.T)
    else:
        D_all = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    n = len(x)
    I = np.full((n, k), -1, np.int64)
    D = np.full((n, k), np.inf)
    ids = np.arange(n)
    for i in range(n):
        others = ids[ids != i]
        order = others[np.lexsort((others, D_all[i, others]))][:k]
        I[i, :len(order)] = order
        D[i, :len(order)] = D_all[i, order]
    return D_all, I, D


def assert_graph_matches(ids, I, D, D_all, I_ref, D_ref) -> None:
    """Graph == brute force: ids exactly, distances to float32 accuracy; a neighbour may differ
    only where two *different* true distances agree to float32 rounding (exact ties, such as
    duplicate rows, must be ordered by id)."""
    n = len(ids)
    np.testing.assert_array_equal(ids, np.arange(n))
    finite = np.isfinite(D_ref)
    np.testing.assert_array_equal(np.isfinite(D), finite)
    np.testing.assert_array_equal(I < 0, ~finite)
    scale = np.abs(D_ref[finite]).max() if finite.any() else 1.0
    tol = 1e-5 * scale + 1e-5
    np.testing.assert_allclose(D[finite], D_ref[finite], rtol=0, atol=tol)
    rows, cols = np.nonzero(I != I_ref)
    assert len(rows) <= max(2, I.size // 500), f"{len(rows)} neighbours differ from brute force"
    got, want = D_all[rows, I[rows, cols]], D_all[rows, I_ref[rows, cols]]
    assert np.all(np.abs(got - want) <= tol), "a differing neighbour is not a near-tie"
    assert np.all(got != want), "exact ties not broken by the smaller id"
    for i in range(n):  # every row: distinct real neighbours, never the node itself
        real = I[i][I[i] >= 0]
        assert i not in real and len(set(real.tolist())) == len(real)


def write_yaml(path: Path, **cfg) -> str:
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path)


# ---------------------------------------------------------------- k-NN against brute force

@pytest.mark.parametrize("metric,fmt,distance", [
    ("l2", "npy", "squared_l2"),
    ("cosine", "fvecs", "one_minus_cosine"),
    ("ip", "npy", "negative_inner_product"),
])
def test_knn_graph_equals_brute_force(tmp_path, metric, fmt, distance):
    x = nasty_vectors(np.random.default_rng(7))   # duplicates 3 == 10..24, 100 == 200
    path = tmp_path / f"x.{fmt}"
    np.save(path, x) if fmt == "npy" else write_fvecs(path, x)
    k = 20
    run(tmp_path / "out", f"input={path}", "stages=[shard,index,knn]", "shard.parts=2",
        f"knn.k={k}", f"knn.metric={metric}")
    m = manifest(tmp_path / "out", "knn")
    assert (m.metric, m.distance, m.extra["k"], m.n_rows) == (metric, distance, k, len(x))
    assert m.stats["recall_at_k"] == 1.0 and m.stats["holes"] == 0
    ids, I, D = graph_arrays(tmp_path / "out")
    D_all, I_ref, D_ref = brute_force(x, k, metric)
    assert_graph_matches(ids, I, D, D_all, I_ref, D_ref)
    if metric != "ip":   # exact duplicates are neighbours at distance 0, ordered by id
        np.testing.assert_array_equal(I[3, :15], np.arange(10, 25))
        np.testing.assert_array_equal(I[10, :15], [3, *range(11, 25)])
        assert I[100, 0] == 200 and I[200, 0] == 100
        np.testing.assert_allclose(D[3, :15], 0, atol=1e-6)
        np.testing.assert_allclose(D[[100, 200], 0], 0, atol=1e-6)
    if metric == "l2":
        assert np.all(D[3, :15] == 0) and D[100, 0] == 0


def test_knn_pads_with_minus_one_and_inf_when_k_exceeds_the_other_nodes(tmp_path):
    x = nasty_vectors(np.random.default_rng(3))[:6]   # rows 3 and 5 are distinct, no dups
    x[4] = x[1]
    write_fvecs(tmp_path / "x.fvecs", x)
    k = 8
    run(tmp_path / "out", f"input={tmp_path / 'x.fvecs'}", "stages=[shard,index,knn]",
        "shard.parts=2", f"knn.k={k}")
    ids, I, D = graph_arrays(tmp_path / "out")
    D_all, I_ref, D_ref = brute_force(x, k, "l2")
    assert_graph_matches(ids, I, D, D_all, I_ref, D_ref)
    assert np.all(I[:, 5:] == -1) and np.all(np.isposinf(D[:, 5:]))
    assert np.all(I[:, :5] >= 0)
    assert I[1, 0] == 4 and I[4, 0] == 1 and D[1, 0] == 0
    m = manifest(tmp_path / "out", "knn")
    assert m.stats["holes"] == m.stats["expected_holes"] == 6 * 3
    assert m.stats["recall_at_k"] == 1.0


# ---------------------------------------------------------------- 1 part == 4 parts

def labelled_parquet(path: Path) -> tuple[np.ndarray, list]:
    """nasty vectors with string labels (a few null) in a Parquet file, list<float> column."""
    x = nasty_vectors(np.random.default_rng(11))
    labels = [None if i % 23 == 5 else f"c{int(np.argmax(row[:3]))}" for i, row in enumerate(x)]
    pq.write_table(pa.table({"vector": pa.array(list(x), pa.list_(pa.float32())),
                             "label": pa.array(labels, pa.string())}), path, row_group_size=64)
    return x, labels


def test_one_part_equals_four_parts(tmp_path):
    x, labels = labelled_parquet(tmp_path / "x.parquet")
    common = [f"input={tmp_path / 'x.parquet'}", "stages=[shard,index,knn,kmeans,mcl,propagate]",
              "knn.k=8", "kmeans.k=6", "kmeans.niter=8", "propagate.seeds_per_class=3",
              "propagate.niter=8"]
    run(tmp_path / "p1", *common, "shard.parts=1")
    run(tmp_path / "p4", *common, "shard.parts=4")
    for out in ("p1", "p4"):
        v = stage_table(tmp_path / out, "shard")
        assert v.column("label").to_pylist() == labels
        np.testing.assert_array_equal(np.stack(v.column("vector").to_numpy(zero_copy_only=False)), x)
    assert len(manifest(tmp_path / "p4", "knn").parts) == 4
    for stage in PER_NODE:
        t1, t4 = stage_table(tmp_path / "p1", stage), stage_table(tmp_path / "p4", stage)
        assert t1.schema == t4.schema and t1.num_rows == t4.num_rows == len(x), stage
        for col in t1.column_names:
            a, b = t1.column(col).to_pylist(), t4.column(col).to_pylist()
            if col in ("distance", "score"):
                np.testing.assert_allclose(np.array(a, float), np.array(b, float), rtol=1e-5,
                                           atol=1e-6, err_msg=f"{stage}.{col}")
            else:
                assert a == b, f"{stage}.{col} differs between 1 and 4 parts"
    # the graph bytes are the same once the parts are concatenated
    assert storage.parquet_bytes(stage_table(tmp_path / "p1", "knn")) == \
        storage.parquet_bytes(stage_table(tmp_path / "p4", "knn"))
    # part i of every per-node output covers the id range of vector part i
    vparts = manifest(tmp_path / "p4", "shard").parts
    for stage in PER_NODE[1:]:
        folder = tmp_path / "p4" / schema.STAGE_DIRS[stage]
        for vp, p in zip(vparts, manifest(tmp_path / "p4", stage).parts):
            part_ids = pq.read_table(folder / p.path).column("id").to_numpy()
            assert (p.id_min, p.id_max) == (vp.id_min, vp.id_max)
            np.testing.assert_array_equal(part_ids, np.arange(vp.id_min, vp.id_max + 1))


# ---------------------------------------------------------------- sklearn:digits, all stages

@pytest.fixture(scope="module")
def digits_out(tmp_path_factory, ray_local):
    """The whole pipeline (report included) on sklearn:digits with 4 parts; returns (out, done)."""
    out = tmp_path_factory.mktemp("digits") / "out"
    done = run(out, "input=sklearn:digits", "shard.parts=4", "knn.k=10", "kmeans.k=10")
    return out, done


def test_digits_report(digits_out):
    out, done = digits_out
    ds = load_digits()
    report = json.loads((out / "report.json").read_text())
    assert json.loads(json.dumps(done["report"], default=float)) == report
    st = report["stages"]
    assert set(st) == {"shard", "index", "knn", "kmeans", "mcl", "propagate"}
    for name, entry in st.items():
        assert entry["rows"] == len(ds.data) and entry["parts"] == 4, name
        assert entry["seconds"] >= 0
    assert st["shard"]["dim"] == 64 and st["shard"]["rejected_rows"] == 0
    assert (st["knn"]["k"], st["knn"]["metric"], st["knn"]["holes"]) == (10, "l2", 0)
    assert st["knn"]["recall_at_k"] == 1.0 and st["knn"]["recall_sample"] == 1000
    truth = pd.DataFrame({"id": np.arange(len(ds.target)), "truth": ds.target})
    vec = stage_table(out, "shard").to_pandas()[["id", "label"]]
    assert vec["label"].tolist() == ds.target.tolist()
    for stage in ("kmeans", "mcl"):
        pred = stage_table(out, stage).to_pandas()
        joined = pred.merge(vec, on="id").merge(truth, on="id")
        assert len(joined) == len(ds.target)
        nmi = normalized_mutual_info_score(joined["label"], joined["cluster"])
        assert st[stage]["nmi"] == pytest.approx(nmi, abs=1e-9), stage
        assert st[stage]["n_clusters"] >= joined["cluster"].nunique()
        assert joined["cluster"].min() >= 0
    assert st["kmeans"]["n_clusters"] == 10 == stage_table(out, "kmeans").column("cluster")\
        .to_pandas().nunique()
    assert st["mcl"]["n_clusters"] == stage_table(out, "mcl").column("cluster").to_pandas()\
        .nunique()
    assert st["kmeans"]["nmi"] > 0.5   # digits cluster well; a broken stage would be near 0


def test_digits_report_html(digits_out):
    out, done = digits_out
    page = (out / "report.html").read_text()
    for stage, entry in done["report"]["stages"].items():
        assert f"<td>{stage}</td>" in page
        assert f"<td>{entry['rows']:,}</td>" in page
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]*)"', page)
    captions = [alt for _, alt in images]
    assert len(images) == 4, captions
    for data, _ in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert captions[0].startswith("k-NN graph: distance to the k-th neighbour, 1,797 sampled nodes")
    for stage, cap in zip(("kmeans", "mcl"), captions[1:3]):
        sizes = stage_table(out, stage).to_pandas()["cluster"].value_counts()
        assert cap.startswith(f"{stage}: {len(sizes):,} clusters by size (largest {sizes.max():,}, "
                              f"singletons {(sizes == 1).sum():,})"), cap
    labels = stage_table(out, "propagate").to_pandas()
    assert f"({pd.isna(labels['label']).sum():,} nodes unlabelled" in captions[3]


def test_digits_kmeans_distances_are_to_the_centroids(digits_out):
    out, _ = digits_out
    m = manifest(out, "kmeans")
    cent = pq.read_table(out / "kmeans" / m.extra["centroids"])
    C = np.stack(cent.column("centroid").to_numpy(zero_copy_only=False)).astype(np.float64)
    x = load_digits().data
    t = stage_table(out, "kmeans")
    cl = t.column("cluster").to_numpy()
    d2 = ((x[:, None, :] - C[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(cl, d2.argmin(1))   # each node at its nearest centroid
    np.testing.assert_allclose(t.column("distance").to_numpy(), d2[np.arange(len(x)), cl],
                               rtol=1e-4, atol=1e-2)


def test_digits_propagate_accuracy_and_coverage(digits_out):
    out, done = digits_out
    m = manifest(out, "propagate")
    seeds = pq.read_table(out / "labels" / m.extra["seeds"]).to_pandas()
    truth = load_digits().target
    # seeds_per_class=5 (default) seeds per class, labelled with their true class
    assert seeds["id"].is_unique and len(seeds) == 50 == m.stats["seeds"]
    assert (seeds.groupby("label").size() == 5).all() and seeds["label"].nunique() == 10
    assert (seeds["label"].to_numpy() == truth[seeds["id"].to_numpy()]).all()
    pred = stage_table(out, "propagate").to_pandas()
    seed_rows = pred[pred["id"].isin(seeds["id"])]
    assert (seed_rows["label"].to_numpy() == truth[seed_rows["id"].to_numpy()]).all()
    rest = pred[~pred["id"].isin(seeds["id"])]
    correct = (rest["label"].notna() & (rest["label"] == truth[rest["id"].to_numpy()])).sum()
    entry = done["report"]["stages"]["propagate"]
    assert entry["evaluated_nodes"] == len(rest) == len(truth) - 50
    assert entry["accuracy"] == pytest.approx(correct / len(rest), abs=1e-12)
    assert entry["coverage"] == pytest.approx(rest["label"].notna().mean(), abs=1e-12)
    assert entry["accuracy"] > 0.8
    assert ((rest["score"] > 0) == rest["label"].notna()).all()


EXPECTED_DUCK = {
    "shard": {"id": "BIGINT", "vector": "FLOAT[]", "label": "BIGINT"},
    "knn": {"id": "BIGINT", "neighbors": "BIGINT[]", "distances": "FLOAT[]"},
    "kmeans": {"id": "BIGINT", "cluster": "BIGINT", "distance": "FLOAT"},
    "mcl": {"id": "BIGINT", "cluster": "BIGINT"},
    "propagate": {"id": "BIGINT", "label": "BIGINT", "score": "FLOAT"},
}
EXPECTED_ARROW = {
    "shard": [("id", pa.int64()), ("vector", pa.list_(pa.float32(), 64)), ("label", pa.int64())],
    "knn": [("id", pa.int64()), ("neighbors", pa.list_(pa.int64(), 10)),
            ("distances", pa.list_(pa.float32(), 10))],
    "kmeans": [("id", pa.int64()), ("cluster", pa.int64()), ("distance", pa.float32())],
    "mcl": [("id", pa.int64()), ("cluster", pa.int64())],
    "propagate": [("id", pa.int64()), ("label", pa.int64()), ("score", pa.float32())],
}


@pytest.mark.parametrize("stage", PER_NODE)
def test_digits_outputs_read_back_by_pandas_duckdb_and_open_output(digits_out, stage):
    out, _ = digits_out
    n = len(load_digits().data)
    folder = out / schema.STAGE_DIRS[stage]
    ref = stage_table(out, stage)
    assert [(f.name, f.type) for f in ref.schema] == EXPECTED_ARROW[stage]
    ref_df = ref.to_pandas()
    # pandas on the folder: only the parts, in id order
    df = pd.read_parquet(folder).sort_values("id").reset_index(drop=True)
    assert list(df.columns) == [c for c, _ in EXPECTED_ARROW[stage]]
    assert len(df) == n and df["id"].tolist() == list(range(n))
    assert df["id"].dtype == np.int64
    for col in df.columns:
        if isinstance(ref_df[col][0], np.ndarray):
            np.testing.assert_array_equal(np.stack(df[col]), np.stack(ref_df[col]))
            assert df[col][0].dtype == ref_df[col][0].dtype
        else:
            pd.testing.assert_series_equal(df[col], ref_df[col], check_names=False)
    # DuckDB on a glob: DuckDB does not skip `_*` sidecars (_centroids, _seeds), so where a
    # folder holds one the glob names the parts
    glob = "part-*.parquet" if stage in ("kmeans", "propagate") else "*.parquet"
    rel = duckdb.sql(f"SELECT * FROM read_parquet('{folder}/{glob}') ORDER BY id")
    assert dict(zip(rel.columns, map(str, rel.types))) == EXPECTED_DUCK[stage]
    rows = rel.fetchall()
    assert len(rows) == n and [r[0] for r in rows] == list(range(n))
    if stage == "knn":
        np.testing.assert_array_equal(np.array([r[1] for r in rows]),
                                      np.stack(ref_df["neighbors"]))
    # the Python API
    t = api.open_output(str(out), stage).to_table()
    assert t.schema.equals(ref.schema) and t.sort_by("id").equals(ref)


def test_open_output_refuses_uncommitted_and_index(digits_out, tmp_path):
    from vecgraph.sharding.errors import InputError
    with pytest.raises(InputError, match="no Parquet output"):
        api.open_output(str(digits_out[0]), "index")
    with pytest.raises(InputError, match="not committed"):
        api.open_output(str(tmp_path), "knn")


def test_status_lists_committed_stages(digits_out, capsys):
    out, _ = digits_out
    assert cli.main(["status", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_stage = {line.split()[0]: line for line in lines}
    for stage in ("shard", "index", "knn", "kmeans", "mcl", "propagate"):
        assert by_stage[stage].split()[1] == "committed", by_stage[stage]
        assert "4 parts" in by_stage[stage] and "1797 rows" in by_stage[stage]
    assert by_stage["report"].split()[1] == "written"


def test_rerun_skips_committed_stages_and_changed_k_recomputes(digits_out, tmp_path):
    src, _ = digits_out
    out = tmp_path / "out"
    shutil.copytree(src, out)   # a copy, so the module's output stays as it was
    before = file_bytes(out, skip=("report.json", "report.html"))
    again = run(out, "input=sklearn:digits", "shard.parts=4", "knn.k=10", "kmeans.k=10")
    assert file_bytes(out, skip=("report.json", "report.html")) == before   # manifests and parts unchanged
    assert again["knn"] == manifest(src, "knn")
    ids, I10, D10 = graph_arrays(out)

    run(out, "input=sklearn:digits", "shard.parts=4", "knn.k=5", "kmeans.k=10",
        "stages=[shard,index,knn,kmeans,mcl]")
    after = file_bytes(out, skip=("report.json", "report.html"))
    for stage in ("shard", "index", "kmeans"):   # do not depend on knn.k
        folder = schema.STAGE_DIRS[stage]
        assert {p: b for p, b in after.items() if p.startswith(folder + "/")} == \
            {p: b for p, b in before.items() if p.startswith(folder + "/")}, stage
    g = manifest(out, "knn")
    assert g.extra["k"] == 5 and g.config_hash != manifest(src, "knn").config_hash
    ids5, I5, D5 = graph_arrays(out)
    np.testing.assert_array_equal(ids5, ids)
    np.testing.assert_array_equal(I5, I10[:, :5])   # exact top-5 is the head of exact top-10
    np.testing.assert_array_equal(D5, D10[:, :5])
    assert manifest(out, "mcl").inputs["knn"] == g.config_hash   # recomputed on the new graph
    assert manifest(out, "mcl").config_hash != manifest(src, "mcl").config_hash


# ---------------------------------------------------------------- IVF and the recall gate

def test_ivf_recall_and_min_recall_gate(tmp_path, capsys):
    x = nasty_vectors(np.random.default_rng(5))
    np.save(tmp_path / "x.npy", x)
    k = 10
    out = tmp_path / "ivf"
    base = [f"input={tmp_path / 'x.npy'}", "stages=[shard,index,knn]", "shard.parts=2",
            "index.factory=IVF16,Flat", "knn.nprobe=2", f"knn.k={k}"]
    run(out, *base)
    m = manifest(out, "knn")
    assert manifest(out, "index").extra["factory"] == "IVF16,Flat"
    recall = m.stats["recall_at_k"]
    assert 0 < recall <= 1 and m.stats["recall_sample"] == len(x)
    # recall recomputed from the graph against brute force (ties count as hits)
    _, I, _ = graph_arrays(out)
    D_all, _, D_ref = brute_force(x, k, "l2")
    kth = D_ref[:, -1]
    true = np.where(I >= 0, D_all[np.arange(len(x))[:, None], np.maximum(I, 0)], np.inf)
    hits = (true <= kth[:, None] * (1 + 1e-5) + 1e-5).sum()
    assert recall == pytest.approx(hits / I.size, abs=2e-3)

    # the same shards, with a recall bar no index can pass: exit 1, graph not committed
    gated = tmp_path / "gated"
    for folder in ("vectors", "index"):
        shutil.copytree(out / folder, gated / folder)
    cfg = write_yaml(tmp_path / "c.yaml", input=str(tmp_path / "x.npy"),
                     stages=["shard", "index", "knn"], shard={"parts": 2},
                     index={"factory": "IVF16,Flat"}, knn={"nprobe": 2, "k": k})
    capsys.readouterr()
    assert cli.main(["run", cfg, f"out={gated}", "knn.min_recall=1.01"]) == 1
    err = capsys.readouterr().err
    assert "knn.min_recall=1.01" in err and "not committed" in err
    assert not (gated / "graph" / "_manifest.json").exists()
    assert manifest(gated, "index") == manifest(out, "index")   # reused, not rebuilt
    assert cli.main(["status", str(gated)]) == 0
    status = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert status["knn"].split()[1] == "partial" and status["index"].split()[1] == "committed"


# ---------------------------------------------------------------- bad input and config

def bad_inputs(tmp_path: Path) -> dict[str, tuple[str, list[str], list[str]]]:
    """case -> (input, extra overrides, regexes the error message must match)."""
    x = np.random.default_rng(2).normal(size=(20, 8)).astype(np.float32)
    rec = 4 + 8 * 4
    write_fvecs(tmp_path / "cut.fvecs", x)
    (tmp_path / "cut.fvecs").write_bytes((tmp_path / "cut.fvecs").read_bytes()[:-5])
    y = x.copy()
    y[13, 2] = np.nan
    np.save(tmp_path / "nan.npy", y)
    write_fvecs(tmp_path / "dim.fvecs", x)
    raw = bytearray((tmp_path / "dim.fvecs").read_bytes())
    raw[9 * rec:9 * rec + 4] = struct.pack("<i", 7)
    (tmp_path / "dim.fvecs").write_bytes(bytes(raw))
    (tmp_path / "two").mkdir()
    np.save(tmp_path / "two" / "a.npy", x)
    np.save(tmp_path / "two" / "b.npy", x[:, :5])
    return {
        "truncated_fvecs": (str(tmp_path / "cut.fvecs"), [], [r"cut\.fvecs", r"record 19",
                                                              r"truncated"]),
        "nan_npy": (str(tmp_path / "nan.npy"), [], [r"nan\.npy", r"record 13", r"NaN",
                                                    r"on_invalid=skip"]),
        "fvecs_record_dim": (str(tmp_path / "dim.fvecs"), [], [r"dim\.fvecs", r"record 9",
                                                               r"dim 7, expected 8"]),
        "npy_dims_in_dir": (str(tmp_path / "two"), [], [r"b\.npy", r"record 0", r"dim 5",
                                                        r"a\.npy has dim 8"]),
        "unknown_key": (str(tmp_path / "nan.npy"), ["knn.kk=3"], [r"unknown config key 'knn\.kk'"]),
        "ill_typed": (str(tmp_path / "nan.npy"), ["knn.k=abc"], [r"knn\.k='abc'", r"int"]),
        "bad_metric": (str(tmp_path / "nan.npy"), ["knn.metric=l3"], [r"knn\.metric='l3'"]),
        "optional_ill_typed": (str(tmp_path / "nan.npy"), ["knn.min_recall=abc"],
                               [r"knn\.min_recall='abc' has type str, expected float or null$"]),
        "mcl_max_iter": (str(tmp_path / "nan.npy"), ["mcl.max_iter=-1"],
                         [r"mcl\.max_iter=-1 should be >= 1"]),
        "mcl_tol": (str(tmp_path / "nan.npy"), ["mcl.tol=-5"], [r"mcl\.tol=-5.0 should be >= 0"]),
        "propagate_max_iter": (str(tmp_path / "nan.npy"), ["propagate.max_iter=0"],
                               [r"propagate\.max_iter=0 should be >= propagate\.niter=30"]),
        "ray_num_cpus": (str(tmp_path / "nan.npy"), ["ray.num_cpus=0"], [r"ray\.num_cpus=0 should be >= 1"]),
        "ray_actor_cpus": (str(tmp_path / "nan.npy"), ["ray.actor_cpus=-1"],
                           [r"ray\.actor_cpus=-1.0 should be > 0"]),
    }


CASES = ["truncated_fvecs", "nan_npy", "fvecs_record_dim", "npy_dims_in_dir", "unknown_key",
         "ill_typed", "bad_metric", "optional_ill_typed", "mcl_max_iter", "mcl_tol",
         "propagate_max_iter", "ray_num_cpus", "ray_actor_cpus"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, case):
    inp, extra, patterns = bad_inputs(tmp_path)[case]
    cfg = write_yaml(tmp_path / "c.yaml", input=inp, stages=["shard", "index", "knn"],
                     shard={"parts": 2})
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["run", cfg, f"out={out}", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vecgraph: error: ")
    for pat in patterns:
        assert re.search(pat, err), f"{pat!r} not in {err!r}"
    assert not (out / "vectors" / "_manifest.json").exists()
    assert not (out / "graph" / "_manifest.json").exists()


def test_kmeans_k_above_n_exits_2(tmp_path, capsys):
    x = np.random.default_rng(2).normal(size=(20, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cfg = write_yaml(tmp_path / "c.yaml", input=str(tmp_path / "x.npy"),
                     stages=["shard", "kmeans"], shard={"parts": 2})
    capsys.readouterr()
    assert cli.main(["run", cfg, f"out={tmp_path / 'out'}", "kmeans.k=21"]) == 2
    err = capsys.readouterr().err
    assert "kmeans.k=21" in err and "20" in err
    assert not (tmp_path / "out" / "kmeans" / "_manifest.json").exists()


def test_on_invalid_skip_lists_rejects_and_keeps_id_gaps(tmp_path):
    """A mixed directory: a.fvecs (record 5 has another dim), b.npy (NaN and Inf rows)."""
    x = np.random.default_rng(4).normal(size=(40, 8)).astype(np.float32)
    x[30] = x[2]   # a duplicate across files
    (tmp_path / "in").mkdir()
    write_fvecs(tmp_path / "in" / "a.fvecs", x[:20])
    raw = bytearray((tmp_path / "in" / "a.fvecs").read_bytes())
    raw[5 * 36:5 * 36 + 4] = struct.pack("<i", 9)
    (tmp_path / "in" / "a.fvecs").write_bytes(bytes(raw))
    y = x[20:].copy()
    y[7, 0] = np.nan
    y[12, 5] = np.inf
    np.save(tmp_path / "in" / "b.npy", y)
    out = tmp_path / "out"
    done = run(out, f"input={tmp_path / 'in'}", "on_invalid=skip", "shard.parts=3",
               "stages=[shard,index,knn]", "knn.k=4")
    bad = [5, 27, 32]
    rej = pq.read_table(out / "vectors" / schema.REJECTS)
    assert rej.schema.equals(schema.rejects_schema())
    assert rej.column("id").to_pylist() == bad
    assert rej.column("record").to_pylist() == [5, 7, 12]
    assert [Path(f).name for f in rej.column("file").to_pylist()] == ["a.fvecs", "b.npy", "b.npy"]
    assert "dim 9" in rej.column("reason")[0].as_py()
    assert done["shard"].stats["rejected_rows"] == 3 and done["shard"].n_rows == 37
    keep = np.setdiff1d(np.arange(40), bad)
    v = stage_table(out, "shard")
    np.testing.assert_array_equal(v.column("id").to_numpy(), keep)
    np.testing.assert_array_equal(np.stack(v.column("vector").to_numpy(zero_copy_only=False)),
                                  x[keep])
    # the graph has the same ids; no neighbour is a rejected row; brute force over kept rows
    ids, I, D = graph_arrays(out)
    np.testing.assert_array_equal(ids, keep)
    _, I_ref, D_ref = brute_force(x[keep], 4, "l2")
    np.testing.assert_array_equal(I, keep[I_ref])
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-4)
    assert not pc.any(pc.is_in(pc.list_flatten(stage_table(out, "knn").column("neighbors")),
                               pa.array(bad))).as_py()


def test_status_and_report_refuse_a_missing_or_empty_output(ray_local, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert cli.main(["status", str(missing)]) == 2
    assert cli.main(["report", str(missing)]) == 2
    assert f"{missing}: no such output folder" in capsys.readouterr().err
    assert not missing.exists()  # nothing written for a mistyped path
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "no committed stage to report on" in capsys.readouterr().err
    assert list((tmp_path / "empty").iterdir()) == []
