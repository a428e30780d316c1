"""Every path may be s3://: inputs read and outputs written on a real S3 endpoint (moto in server
mode on loopback, the `s3_server` fixture), compared with the same work on local paths.

Expected values come from numpy and from the local run read back with pyarrow, never from the S3
run itself. The dummy secret key (`S3_SECRET`) must never appear in an output object, a message,
a log line or Ray's logs.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import S3_SECRET, nasty_vectors, write_fvecs
from vecgraph.jobs import api, cli
from vecgraph.sharding import readers, schema, storage
from vecgraph.sharding.errors import InputError

PER_NODE = ("shard", "knn", "kmeans", "mcl", "propagate")
PIPELINE = ["stages=[shard,index,knn,kmeans,mcl,propagate,report]", "shard.parts=2", "knn.k=8",
            "kmeans.k=6", "kmeans.niter=5", "propagate.seeds_per_class=3", "propagate.niter=8"]


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def s3(s3_server):
    """(independent s3fs client, bucket name): a fresh bucket on the loopback endpoint. The
    client keeps no listing cache and shares nothing with vecgraph's own filesystem."""
    if s3_server is None:
        pytest.skip("moto[server] and s3fs are needed for the S3 tests (pip install -e '.[dev,s3]')")
    import s3fs
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True,
                           use_listings_cache=False)
    bucket = f"vg-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    return fs, bucket


def upload(fs, local: Path, key: str) -> str:
    """Copy a local file (or every file of a directory) to bucket key; returns its s3:// URI."""
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    for p in files:
        rel = p.relative_to(local).as_posix() if local.is_dir() else ""
        fs.pipe_file(f"{key}/{rel}" if rel else key, p.read_bytes())
    return f"s3://{key}"


def s3_objects(fs, key: str) -> dict[str, bytes]:
    """{path relative to key: bytes} of every object under key."""
    return {p[len(key) + 1:]: fs.cat_file(p) for p in sorted(fs.find(key))}


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@contextlib.contextmanager
def everything_written() -> Iterator[list[str]]:
    """Collects all output made inside the block: file descriptors 1 and 2 (Ray's streamed
    worker output, C++ libraries), sys.stdout/stderr and every log record down to DEBUG of
    vecgraph, s3fs and fsspec (the rest from WARNING). The text is appended to the yielded list on exit."""
    sink: list[str] = []
    raw = tempfile.TemporaryFile()
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    handler.setLevel(logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("vecgraph", "s3fs", "fsspec")]
    levels = [lg.level for lg in loggers]
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(raw.fileno(), 1)
    os.dup2(raw.fileno(), 2)
    logging.getLogger().addHandler(handler)
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            yield sink
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        logging.getLogger().removeHandler(handler)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        raw.seek(0)
        sink.append(text.getvalue() + raw.read().decode(errors="replace"))
        raw.close()


def labelled_parquet_dir(folder: Path) -> tuple[np.ndarray, list]:
    """300 nasty 16-d vectors with string labels (every 23rd null) in two Parquet files of a
    directory (list<float32> column, row groups of 64), and a `_SUCCESS`-like file to skip."""
    x = nasty_vectors(np.random.default_rng(11))
    labels = [None if i % 23 == 5 else f"c{int(np.argmax(row[:3]))}" for i, row in enumerate(x)]
    folder.mkdir(parents=True)
    for name, sl in (("a.parquet", slice(0, 180)), ("b.parquet", slice(180, 300))):
        pq.write_table(pa.table({"vector": pa.array(list(x[sl]), pa.list_(pa.float32())),
                                 "label": pa.array(labels[sl], pa.string())}),
                       folder / name, row_group_size=64)
    (folder / "_SUCCESS").write_bytes(b"")
    return x, labels


def stage_parts(m: schema.Manifest) -> list[str]:
    return [p.path for p in m.parts]


# ---------------------------------------------------------------- .npy: ranged reads only

@pytest.fixture
def s3_requests(monkeypatch) -> list[tuple[str, str | None, str | None]]:
    """Every S3 request made in this process: (operation, key, Range header or None)."""
    import s3fs
    seen: list[tuple[str, str | None, str | None]] = []
    original = s3fs.S3FileSystem._call_s3

    async def spy(self, method, *args, **kwargs):
        seen.append((method, kwargs.get("Key"), kwargs.get("Range")))
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", spy)
    return seen


def range_bytes(header: str) -> int:
    start, end = header.removeprefix("bytes=").split("-")
    return int(end) - int(start) + 1


@pytest.mark.parametrize("dtype", ["<f4", ">f8", "<f2", "<i2"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_on_s3_reads_only_the_header_and_its_rows(s3, tmp_path, rng, s3_requests, dtype, order):
    fs, bucket = s3
    n, d = 500, 6
    x = np.asarray(rng.normal(size=(n, d)) * 50, dtype=dtype, order=order)
    np.save(tmp_path / "x.npy", x)
    key = f"{bucket}/npy/{order}{dtype.replace('<', 'le').replace('>', 'be')}.npy"
    uri = upload(fs, tmp_path / "x.npy", key)
    src = readers.open_source(uri)
    assert (src.n_rows, src.dim) == (n, d)
    planning = [r for r in s3_requests if r[0] == "get_object"]
    assert len(planning) == 1 and range_bytes(planning[0][2]) <= readers.NPY_PREFIX
    itemsize = np.dtype(dtype).itemsize
    for a, b in [(0, 1), (123, 377), (499, 500), (0, 500)]:
        s3_requests.clear()
        rows = readers.read_rows(src, a, b)
        np.testing.assert_array_equal(rows.x, x[a:b].astype(np.float32))
        np.testing.assert_array_equal(rows.ids, np.arange(a, b))
        gets = [r for r in s3_requests if r[0] == "get_object"]
        assert [r[1] for r in s3_requests] == [key.split("/", 1)[1]] * len(s3_requests)
        assert all(r[2] is not None for r in gets), "a GET without Range reads the whole object"
        assert len(gets) == (1 if order == "C" else d)   # the header was parsed once, when planning
        assert sum(range_bytes(r[2]) for r in gets) == (b - a) * d * itemsize


def test_npy_gz_on_s3_and_local(s3, tmp_path, rng):
    import gzip
    fs, bucket = s3
    x = rng.normal(size=(40, 5)).astype(">f4")
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(x))
    (tmp_path / "x.npy.gz").write_bytes(gzip.compress(buf.getvalue()))
    for uri in (str(tmp_path / "x.npy.gz"), upload(fs, tmp_path / "x.npy.gz", f"{bucket}/gz/x.npy.gz")):
        src = readers.open_source(uri)
        np.testing.assert_array_equal(readers.read_rows(src, 7, 33).x, x[7:33].astype(np.float32))


def test_bad_npy_on_s3_is_an_input_error_naming_the_uri(s3, tmp_path, rng):
    fs, bucket = s3
    np.save(tmp_path / "x.npy", rng.normal(size=(10, 4)).astype(np.float32))
    raw = (tmp_path / "x.npy").read_bytes()
    short = upload_bytes(fs, f"{bucket}/bad/short.npy", raw[:-20])
    with pytest.raises(InputError, match=rf"{short}: truncated \.npy: its header says 10 x 4 <f4"):
        readers.open_source(short)
    notnpy = upload_bytes(fs, f"{bucket}/bad/not.npy", b"PK\x03\x04 a zip file, not an array")
    with pytest.raises(InputError, match=rf"{notnpy}: not a readable \.npy file"):
        readers.open_source(notnpy)
    cube = io.BytesIO()
    np.save(cube, np.zeros((2, 3, 4), np.float32))
    cube_uri = upload_bytes(fs, f"{bucket}/bad/cube.npy", cube.getvalue())
    with pytest.raises(InputError, match=r"cube\.npy: \.npy of shape \(2, 3, 4\), expected \(n, d\)"):
        readers.open_source(cube_uri)


def upload_bytes(fs, key: str, data: bytes) -> str:
    fs.pipe_file(key, data)
    return f"s3://{key}"


# ---------------------------------------------------------------- storage on S3

def test_objects_written_by_another_process_are_seen_after_a_listing(s3):
    """A listing made here must not hide what a Ray worker (another client) writes later."""
    fs, bucket = s3
    folder = f"s3://{bucket}/cache"
    storage.put_bytes(f"{folder}/a", b"a")
    vfs, path = storage.filesystem(folder)
    assert vfs.ls(path, detail=False) == [f"{path}/a"]        # a listing, as remove_temporaries does
    fs.pipe_file(f"{bucket}/cache/b", b"b")                    # the "worker" writes b
    assert storage.exists(f"{folder}/b")
    assert storage.read_bytes(f"{folder}/b") == b"b"
    fs.rm(f"{bucket}/cache/a")
    assert not storage.exists(f"{folder}/a")
    storage.remove_tree(folder)
    assert not fs.exists(f"{bucket}/cache/b")


def test_a_part_is_committed_in_one_put(s3, s3_requests):
    """No temporary object, no copy: one PutObject of the final name, holding the part's bytes."""
    fs, bucket = s3
    t = pa.table({"id": pa.array(np.arange(1000), pa.int64())})
    s3_requests.clear()
    part = storage.write_part(f"s3://{bucket}/commit", "part-00000.parquet", t, 0, 999)
    reads = ("head_object", "get_object", "list_objects_v2")
    assert [r for r in s3_requests if r[0] not in reads] == \
        [("put_object", "commit/part-00000.parquet", None)]
    data = fs.cat_file(f"{bucket}/commit/part-00000.parquet")
    assert data == storage.parquet_bytes(t)
    assert (part.bytes, part.sha256, part.n_rows) == (len(data), schema.sha256_bytes(data), 1000)
    assert pq.read_table(f"{bucket}/commit/part-00000.parquet", filesystem=fs).equals(t)


def test_missing_objects_are_input_errors_naming_the_uri(s3):
    fs, bucket = s3
    for uri in (f"s3://{bucket}/nowhere/x.bin", f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x.bin"):
        with pytest.raises(InputError, match=rf"^{uri}: cannot read: the bucket or key does not exist"):
            storage.read_bytes(uri)
        with pytest.raises(InputError, match=rf"^{uri}: cannot read"):
            storage.read_table(uri)
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run/x.json"
    with pytest.raises(InputError, match=rf"^{uri}: cannot write: the bucket or key does not exist"):
        storage.put_bytes(uri, b"{}")


# ---------------------------------------------------------------- the pipeline: S3 == local

@pytest.fixture(scope="module")
def runs(s3, ray_local, tmp_path_factory):
    """The whole pipeline on a labelled Parquet directory, once local -> local and once
    s3:// -> s3://, the S3 run with all its output collected. Returns a dict of both."""
    fs, bucket = s3
    tmp = tmp_path_factory.mktemp("s3runs")
    x, labels = labelled_parquet_dir(tmp / "in")
    s3_in = upload(fs, tmp / "in", f"{bucket}/in/labelled")
    s3_out = f"s3://{bucket}/run"
    local = api.run(None, f"input={tmp / 'in'}", f"out={tmp / 'out'}", *PIPELINE)
    with everything_written() as written:
        remote = api.run(None, f"input={s3_in}/", f"out={s3_out}", *PIPELINE)
    return {"fs": fs, "bucket": bucket, "x": x, "labels": labels, "local_out": tmp / "out",
            "s3_out": s3_out, "local": local, "remote": remote, "written": written[0]}


def test_s3_run_writes_the_same_files_as_the_local_run(runs):
    """Same object names (no leftover *.tmp), byte-identical parts, indexes and sidecars;
    manifests that list the same parts, sizes and checksums; checksums true to the bytes."""
    fs, bucket = runs["fs"], runs["bucket"]
    remote = s3_objects(fs, f"{bucket}/run")
    local = local_files(runs["local_out"])
    assert sorted(remote) == sorted(local)
    assert not [k for k in remote if k.endswith(".tmp")]
    differ = {k for k in local if remote[k] != local[k]}
    # manifests (timings, config hash: the input path differs), plans (config hash), report
    assert differ <= {f"{d}/{n}" for d in schema.STAGE_DIRS.values()
                      for n in (schema.MANIFEST, schema.PLAN)} | {"report.json", "report.html"}, differ
    for stage, folder in schema.STAGE_DIRS.items():
        ml, mr = runs["local"][stage], runs["remote"][stage]
        assert schema.Manifest.from_json(remote[f"{folder}/{schema.MANIFEST}"].decode()) == mr
        assert [(p.path, p.n_rows, p.id_min, p.id_max, p.bytes, p.sha256) for p in mr.parts] == \
            [(p.path, p.n_rows, p.id_min, p.id_max, p.bytes, p.sha256) for p in ml.parts], stage
        for p in mr.parts:
            assert schema.sha256_bytes(remote[f"{folder}/{p.path}"]) == p.sha256
            assert len(remote[f"{folder}/{p.path}"]) == p.bytes
        assert (mr.n_rows, mr.dim, mr.metric) == (ml.n_rows, ml.dim, ml.metric)
    assert runs["remote"]["shard"].extra["source"] == f"s3://{bucket}/in/labelled/"


@pytest.mark.parametrize("stage", PER_NODE)
def test_s3_outputs_read_back_equal_the_local_outputs(runs, stage):
    fs, bucket = runs["fs"], runs["bucket"]
    folder = schema.STAGE_DIRS[stage]
    names = stage_parts(runs["local"][stage])
    local = pa.concat_tables([pq.read_table(runs["local_out"] / folder / n) for n in names])
    remote = pa.concat_tables([pq.read_table(f"{bucket}/run/{folder}/{n}", filesystem=fs)
                               for n in names])
    assert remote.equals(local) and local.num_rows == len(runs["x"])
    assert local.column("id").to_pylist() == list(range(len(runs["x"])))
    api_table = api.open_output(runs["s3_out"], stage).to_table()
    assert api_table.sort_by("id").equals(local)
    if stage == "shard":   # and the values are the input's, independently of any run
        np.testing.assert_array_equal(np.stack(remote.column("vector").to_numpy(zero_copy_only=False)),
                                      runs["x"])
        assert remote.column("label").to_pylist() == runs["labels"]


def test_s3_report_has_the_local_figures(runs):
    fs, bucket = runs["fs"], runs["bucket"]
    remote = json.loads(fs.cat_file(f"{bucket}/run/report.json"))
    local = json.loads((runs["local_out"] / "report.json").read_text())
    assert remote["out"] == runs["s3_out"]
    assert remote["stages"]["knn"]["path"] == f"{runs['s3_out']}/graph"
    strip = {"seconds", "path"}
    assert {s: {k: v for k, v in e.items() if k not in strip} for s, e in remote["stages"].items()} \
        == {s: {k: v for k, v in e.items() if k not in strip} for s, e in local["stages"].items()}
    assert set(remote["stages"]) == set(schema.STAGE_DIRS)
    assert remote["stages"]["propagate"]["coverage"] > 0   # labels propagated from the seeds


def test_status_of_an_s3_run_lists_committed_stages(runs, capfd):
    assert cli.main(["status", runs["s3_out"]]) == 0
    out, err = capfd.readouterr()
    by_stage = {line.split()[0]: line for line in out.splitlines()}
    for stage, folder in schema.STAGE_DIRS.items():
        assert by_stage[stage].split()[1] == "committed", by_stage[stage]
        assert "2 parts" in by_stage[stage] and f"{len(runs['x'])} rows" in by_stage[stage]
        assert by_stage[stage].endswith(f"{runs['s3_out']}/{folder}")
    assert by_stage["report"].split()[1] == "written"
    assert S3_SECRET not in out + err


def test_no_credential_in_outputs_logs_or_ray_logs(runs):
    fs, bucket = runs["fs"], runs["bucket"]
    secret = S3_SECRET.encode()
    leaks = [k for k, v in s3_objects(fs, f"{bucket}/run").items() if secret in v]
    assert leaks == [], f"the secret key is in {leaks}"
    assert S3_SECRET not in runs["written"]
    assert "shard done" in runs["written"]      # the capture did see the run's own log lines
    logs = ray_logs_dir()
    if logs is not None:
        leaks = [str(p) for p in Path(logs).rglob("*") if p.is_file() and secret in p.read_bytes()]
        assert leaks == [], f"the secret key is in Ray's logs: {leaks}"


def ray_logs_dir() -> str | None:
    try:
        import ray._private.worker as w
        return w._global_node.get_logs_dir_path()
    except Exception:  # private API: no Ray logs to scan
        return None


# ---------------------------------------------------------------- .npy + .fvecs, errors

def test_shard_npy_and_fvecs_from_s3_equals_local(s3, ray_local, tmp_path, rng):
    """A directory with a Fortran-order big-endian .npy and an .fvecs, each with a non-finite
    row, in three parts (the middle one spans both files), on_invalid=skip: the S3 parts and
    `_rejects.parquet` (merged by the driver from sidecars the workers wrote) are byte-identical
    to the local ones; then a single .npy file by its s3:// URI."""
    fs, bucket = s3
    x = (rng.normal(size=(70, 8)) * 3).astype(np.float32)
    x[3, 2], x[50, 7] = np.inf, np.nan
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "a.npy", np.asfortranarray(x[:45].astype(">f8")))
    write_fvecs(tmp_path / "in" / "b.fvecs", x[45:])
    s3_in = upload(fs, tmp_path / "in", f"{bucket}/in/mixed")
    s3_out = f"s3://{bucket}/mixed-run"
    args = ["stages=[shard]", "shard.parts=3", "on_invalid=skip"]
    local = api.run(None, f"input={tmp_path / 'in'}", f"out={tmp_path / 'out'}", *args)["shard"]
    remote = api.run(None, f"input={s3_in}", f"out={s3_out}", *args)["shard"]
    assert [p.sha256 for p in remote.parts] == [p.sha256 for p in local.parts]
    assert remote.stats["rejected_rows"] == 2 == local.stats["rejected_rows"]
    rr = pq.read_table(io.BytesIO(fs.cat_file(f"{bucket}/mixed-run/vectors/{schema.REJECTS}")))
    rl = pq.read_table(tmp_path / "out" / "vectors" / schema.REJECTS)
    assert rr.drop_columns(["file"]).equals(rl.drop_columns(["file"]))
    assert rr.column("id").to_pylist() == [3, 50] and rr.column("record").to_pylist() == [3, 5]
    assert rr.column("file").to_pylist() == [f"{s3_in}/a.npy", f"{s3_in}/b.fvecs"]
    assert not [k for k in fs.find(f"{bucket}/mixed-run") if "/_rejects.part-" in k]
    keep = np.setdiff1d(np.arange(70), [3, 50])
    t = api.open_output(s3_out, "shard").to_table().sort_by("id")
    np.testing.assert_array_equal(t.column("id").to_numpy(), keep)
    np.testing.assert_array_equal(np.stack(t.column("vector").to_numpy(zero_copy_only=False)), x[keep])
    single = api.run(None, f"input={s3_in}/a.npy", f"out={s3_out}-npy", *args)["shard"]
    assert single.n_rows == 44
    t = api.open_output(f"{s3_out}-npy", "shard").to_table().sort_by("id")
    np.testing.assert_array_equal(np.stack(t.column("vector").to_numpy(zero_copy_only=False)),
                                  x[keep[keep < 45]])


def test_missing_bucket_or_key_exits_2_naming_the_uri(s3, ray_local, tmp_path, capfd):
    fs, bucket = s3
    np.save(tmp_path / "x.npy", np.ones((6, 3), np.float32))
    good = upload(fs, tmp_path / "x.npy", f"{bucket}/in/x.npy")
    nobucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    cases = [
        (f"s3://{bucket}/in/absent.npy", f"s3://{bucket}/e1",
         f"s3://{bucket}/in/absent.npy: input not found"),
        (f"s3://{nobucket}/x.npy", f"s3://{bucket}/e2", f"s3://{nobucket}/x.npy: input not found"),
        (good, f"s3://{nobucket}/run", f"s3://{nobucket}/run/vectors/_plan.json: cannot write: "
                                       f"the bucket or key does not exist"),
    ]
    for inp, out, message in cases:
        capfd.readouterr()
        assert cli.main(["shard", inp, out, "--parts", "2"]) == 2, (inp, out)
        stdout, err = capfd.readouterr()
        assert err.startswith("vecgraph: error: ") and message in err, err
        assert S3_SECRET not in stdout + err
    assert not fs.exists(f"{bucket}/e1/vectors/{schema.MANIFEST}")
