"""The k-means stage (jobs/kmeans.py): equal to faiss.Kmeans from the same initial centroids,
train-on-a-sample mode, per-iteration checkpoints (a crash after every iteration of `fit`, and a
real SIGKILL of a `vecgraph run` process group), and input errors (exit 2).

Expected values come from Faiss and numpy on the input array, never from a stage run, except
in the resume tests, whose reference is an uninterrupted run (byte equality is the claim).
Tolerances are those of tests/clustering/test_kmeans.py (Faiss sums clusters in float32).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.clustering.test_kmeans import blobs
from vecgraph.clustering import kmeans as km
from vecgraph.jobs import api, cli, kmeans
from vecgraph.jobs.config import KmeansConfig
from vecgraph.sharding import schema, storage

faiss = pytest.importorskip("faiss")

N, DIM, K = 2000, 16, 8


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def vectors(ray_local, tmp_path_factory) -> tuple[np.ndarray, Path]:
    """blobs() sharded once into 4 parts: (x, the committed vectors folder)."""
    base = tmp_path_factory.mktemp("kmeans_vectors")
    x = blobs(n=N, d=DIM, k=K)
    np.save(base / "x.npy", x)
    api.run(None, f"input={base / 'x.npy'}", f"out={base / 'out'}", "stages=[shard]",
            "shard.parts=4")
    return x, base / "out" / "vectors"


def out_dir(path: Path, vectors: tuple[np.ndarray, Path]) -> Path:
    """A fresh OUT holding a copy of the committed vectors (the kmeans stage's only input)."""
    shutil.copytree(vectors[1], path / "vectors")
    return path


def run_kmeans(out: Path, *overrides: str) -> schema.Manifest:
    return api.run(None, f"out={out}", "stages=[kmeans]", *overrides)["kmeans"]


def outputs(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, cluster, distance, centroids (k, d)) read back with plain pyarrow."""
    m = storage.read_manifest(str(out / "kmeans"))
    assert m is not None and len(m.parts) == 4
    t = pa.concat_tables([pq.read_table(out / "kmeans" / p.path) for p in m.parts])
    c = pq.read_table(out / "kmeans" / m.extra["centroids"])
    assert c.column("cluster").to_pylist() == list(range(len(c)))
    return (t.column("id").to_numpy(), t.column("cluster").to_numpy(),
            t.column("distance").to_numpy(), np.stack(c.column("centroid").to_numpy(
                zero_copy_only=False)))


def init_file(path: Path, x: np.ndarray, seed: int = 5) -> tuple[np.ndarray, Path]:
    """K distinct rows of x (none of the duplicate rows), saved as a .npy of initial centroids."""
    c0 = x[np.random.default_rng(seed).choice(np.arange(30, len(x)), K, replace=False)].copy()
    np.save(path, c0)
    return c0, path


def faiss_kmeans(x: np.ndarray, c0: np.ndarray, niter: int) -> Any:
    ref = faiss.Kmeans(x.shape[1], len(c0), niter=niter, max_points_per_centroid=len(x), seed=3)
    ref.train(x, init_centroids=c0)  # max_points_per_centroid >= n: Faiss does not subsample
    assert all(s["nsplit"] == 0 for s in ref.iteration_stats)
    return ref


NITER = 50  # Faiss stops at its fixed point after ~13; ours runs all 50 (the kill test's window)


@pytest.fixture(scope="module")
def init_run(vectors, tmp_path_factory) -> dict[str, Any]:
    """One uninterrupted `vecgraph run CONFIG` of the stage from an init file, in this process:
    {config, out, c0, manifest}. The Faiss test checks it; the kill test compares against it."""
    base = tmp_path_factory.mktemp("kmeans_init_run")
    c0, c0_path = init_file(base / "c0.npy", vectors[0])
    config = base / "kmeans.yaml"
    config.write_text(json.dumps({"stages": ["kmeans"], "seed": 3,
                                  "kmeans": {"k": K, "niter": NITER, "init": str(c0_path)}}))
    out = out_dir(base / "out", vectors)
    assert cli.main(["run", str(config), f"out={out}"]) == 0
    return {"config": config, "out": out, "c0": c0,
            "manifest": storage.read_manifest(str(out / "kmeans"))}


# ---------------------------------------------------------------- equal to Faiss

def test_stage_over_4_parts_equals_faiss_kmeans_from_an_init_file(vectors, init_run):
    """Faiss's obj[i] is the inertia before update i; it stops once obj repeats exactly (a
    Lloyd fixed point), after `ran` < NITER updates; our stage runs all NITER updates, which
    from there change nothing, so the centroids and assignments must still agree."""
    x, _ = vectors
    m = init_run["manifest"]
    ref = faiss_kmeans(x, init_run["c0"], NITER)
    Dref, Iref = ref.index.search(x, 1)
    ids, cluster, dist, cent = outputs(init_run["out"])
    scale = float(np.abs(x).max())
    np.testing.assert_array_equal(ids, np.arange(N))
    np.testing.assert_array_equal(cluster, Iref[:, 0])
    np.testing.assert_allclose(dist, Dref[:, 0], rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(cent, ref.centroids, rtol=0, atol=1e-5 * scale)
    inertia, ran = m.stats["inertia"], len(ref.obj)
    assert len(inertia) == NITER + 1 and 5 < ran < NITER    # NITER updates, then the final pass
    np.testing.assert_allclose(inertia[:ran], ref.obj, rtol=1e-5)
    assert len(set(inertia[ran - 1:])) == 1                 # the fixed point, repeated
    np.testing.assert_allclose(inertia[-1], Dref.astype(np.float64).sum(), rtol=1e-5)
    assert m.stats["empty_clusters_split"] == 0 and m.stats["train_rows"] == N
    assert "resumed_at" not in m.stats
    assert not (init_run["out"] / "kmeans" / kmeans.CHECKPOINT).exists()   # removed on commit


def test_train_on_a_sample_then_assign_every_part(tmp_path, vectors):
    """kmeans.train_size=700: Lloyd on 700 rows drawn with the stage's TRAIN stream (uniform
    without replacement over row positions, which are the ids here), then one assignment pass."""
    x, _ = vectors
    c0, c0_path = init_file(tmp_path / "c0.npy", x)
    out = out_dir(tmp_path / "out", vectors)
    args = (f"kmeans.init={c0_path}", f"kmeans.k={K}", "kmeans.niter=10", "kmeans.train_size=700",
            "seed=5")
    m = run_kmeans(out, *args)
    rows = np.sort(np.random.default_rng(np.random.SeedSequence(5, spawn_key=(1,)))
                   .choice(N, 700, replace=False))
    ref = faiss_kmeans(x[rows], c0, 10)
    ids, cluster, dist, cent = outputs(out)
    scale = float(np.abs(x).max())
    np.testing.assert_allclose(cent, ref.centroids, rtol=0, atol=1e-5 * scale)
    assert m.stats["train_rows"] == 700 and len(m.stats["inertia"]) == 11
    np.testing.assert_allclose(m.stats["inertia"][:len(ref.obj)], ref.obj, rtol=1e-5)
    # all N rows assigned to their nearest centroid (float64 brute force; a float32 near-tie
    # may go either way, within the distance tolerance)
    np.testing.assert_array_equal(ids, np.arange(N))
    D = ((x.astype(np.float64)[:, None] - cent.astype(np.float64)[None]) ** 2).sum(-1)
    got = D[np.arange(N), cluster]
    assert np.all(got <= D.min(1) + 1e-5 * scale ** 2)
    assert (cluster == D.argmin(1)).mean() > 0.999
    np.testing.assert_allclose(dist, got, rtol=1e-5, atol=1e-5 * scale)

    # The init file's content, not only its path, is in the config hash: the same path with
    # the centroids reversed recomputes, and Lloyd is equivariant under relabelling (no ties).
    np.save(c0_path, c0[::-1])
    m2 = run_kmeans(out, *args)
    assert m2.config_hash != m.config_hash
    _, cluster2, dist2, cent2 = outputs(out)
    np.testing.assert_array_equal(cluster2, K - 1 - cluster)
    np.testing.assert_array_equal(cent2, cent[::-1])
    np.testing.assert_array_equal(dist2, dist)


# ---------------------------------------------------------------- checkpoints, pure

class Crash(Exception):
    pass


def fit_setup(tmp_path: Path) -> tuple[KmeansConfig, km.Stats, Callable, list[int]]:
    """fit() without Ray: 3 restarts from random rows of a sample; `calls` logs init(r)."""
    x = blobs(seed=3, n=600, d=8, k=6)
    kc = KmeansConfig(k=6, niter=4, n_init=3, init="random")
    calls: list[int] = []

    def init(r: int) -> np.ndarray:
        calls.append(r)
        return km.init_centroids(x[:300], kc.k, "random", kmeans.stream(7, kmeans.INIT, r))
    return kc, (lambda c: km.stats(x, c)), init, calls


def test_fit_resumes_identically_from_a_crash_after_every_iteration(tmp_path, monkeypatch):
    kc, stats, init, calls = fit_setup(tmp_path)
    ck = str(tmp_path / kmeans.CHECKPOINT)
    want = kmeans.fit(kc, 7, stats, init, ck, "h")
    assert want[3] is None
    finals = []
    for r in range(kc.n_init):   # the best restart is not the last: `best` must be carried
        s, f = km.lloyd(stats, km.LloydState(init(r)), kc.niter,
                        lambda i, r=r: kmeans.stream(7, kmeans.SPLIT, r, i))
        finals.append(f)
    assert want[1][-1] == min(finals) and int(np.argmin(finals)) < kc.n_init - 1
    save = kmeans.save_checkpoint
    for r in range(kc.n_init):
        for it in range(1, kc.niter + 1):
            storage.remove_tree(ck)

            def crash_after(uri: str, c: kmeans.Checkpoint, at=(r, it)) -> None:
                save(uri, c)
                if (c.restart, c.state.iteration) == at:
                    raise Crash
            with monkeypatch.context() as mp:
                mp.setattr(kmeans, "save_checkpoint", crash_after)
                with pytest.raises(Crash):
                    kmeans.fit(kc, 7, stats, init, ck, "h")
            calls.clear()
            got = kmeans.fit(kc, 7, stats, init, ck, "h")
            np.testing.assert_array_equal(got[0], want[0])
            assert got[1:3] == want[1:3]
            assert (got[3].restart, got[3].state.iteration) == (r, it)
            assert calls == list(range(r + 1, kc.n_init))   # the resumed restart: not re-drawn


def test_fit_ignores_a_checkpoint_of_another_config_or_an_unreadable_one(tmp_path, caplog):
    kc, stats, init, _ = fit_setup(tmp_path)
    ck = str(tmp_path / kmeans.CHECKPOINT)
    want = kmeans.fit(kc, 7, stats, init, ck, "h")
    junk = km.LloydState(np.full((6, 8), 9.0, np.float32), 3, (1.0, 2.0, 3.0), 5)
    kmeans.save_checkpoint(ck, kmeans.Checkpoint("another-hash", 1, junk))
    got = kmeans.fit(kc, 7, stats, init, ck, "h")
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1:] == (*want[1:3], None)
    storage.put_bytes(ck, b"PK\x03\x04 not a zip")
    got = kmeans.fit(kc, 7, stats, init, ck, "h")
    np.testing.assert_array_equal(got[0], want[0])
    assert got[3] is None and "unreadable checkpoint" in caplog.text


def test_checkpoint_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    c, b = rng.normal(size=(2, 5, 3)).astype(np.float32)
    uri = str(tmp_path / "k" / kmeans.CHECKPOINT)
    for best in (None, (b, [4.0, 3.5, 3.25], 2)):
        ck = kmeans.Checkpoint("abc", 2, km.LloydState(c, 3, (3.0, 2.0, 1.5), 1), best)
        kmeans.save_checkpoint(uri, ck)
        got = kmeans.load_checkpoint(uri, "abc")
        assert (got.config_hash, got.restart, got.state.iteration, got.state.inertia,
                got.state.n_split) == ("abc", 2, 3, (3.0, 2.0, 1.5), 1)
        np.testing.assert_array_equal(got.state.centroids, c)
        if best is None:
            assert got.best is None
        else:
            np.testing.assert_array_equal(got.best[0], b)
            assert got.best[1:] == ([4.0, 3.5, 3.25], 2)
        assert kmeans.load_checkpoint(uri, "abd") is None
    assert [p.name for p in (tmp_path / "k").iterdir()] == [kmeans.CHECKPOINT]  # no *.tmp left


# ---------------------------------------------------------------- a real kill

def kill_group_when(proc: subprocess.Popen, ready: Callable[[], bool]) -> dict[str, Any]:
    """In a thread: poll ready() every 10 ms; once true, note every descendant of proc and
    SIGKILL proc's process group (proc was started with start_new_session=True). Returns the
    dict the thread fills ('descendants', 'thread')."""
    got: dict[str, Any] = {"descendants": []}

    def watch() -> None:
        while proc.poll() is None:
            if ready():
                got["descendants"] = psutil.Process(proc.pid).children(recursive=True)
                os.killpg(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.01)
    got["thread"] = threading.Thread(target=watch, daemon=True)
    got["thread"].start()
    return got


def checkpoint_iteration(path: Path) -> tuple[int, int] | None:
    try:
        with np.load(path) as z:
            return int(z["restart"]), int(z["iteration"])
    except (OSError, ValueError, KeyError):   # not written yet
        return None


def kmeans_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "kmeans").iterdir())
            if p.name.startswith("part-") or p.name == kmeans.CENTROIDS}


def test_sigkilled_vecgraph_run_resumes_to_identical_bytes(tmp_path, vectors, init_run):
    """`vecgraph run CONFIG` in its own process group (its own embedded Ray), SIGKILLed once the
    checkpoint shows iteration >= 2; the same command re-run (in this process, on the shared
    Ray) finishes from the checkpoint; parts and centroids equal the uninterrupted run's bytes."""
    killed = out_dir(tmp_path / "killed", vectors)
    argv = ["run", str(init_run["config"]), f"out={killed}", "ray.num_cpus=2",
            "ray.object_store_mb=128"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    ckpt = killed / "kmeans" / kmeans.CHECKPOINT
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "vecgraph.jobs.cli", *argv], cwd=tmp_path,
                                env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        watch = kill_group_when(proc, lambda: (checkpoint_iteration(ckpt) or (0, 0))[1] >= 2)
        watch["thread"].join(timeout=240)
        assert proc.wait(timeout=60) == -signal.SIGKILL, (tmp_path / "stderr").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _, alive = psutil.wait_procs(watch["descendants"], timeout=30)
    for p in alive:   # Ray processes of the killed run: none may linger
        p.kill()
    assert not alive, f"processes of the killed run still alive: {alive}"
    assert len(watch["descendants"]) >= 4   # raylet, gcs, the part actors were there to kill

    restart, it = checkpoint_iteration(ckpt)
    assert restart == 0 and 2 <= it < NITER
    assert not (killed / "kmeans" / schema.MANIFEST).exists()
    assert cli.main(argv) == 0
    got, want = storage.read_manifest(str(killed / "kmeans")), init_run["manifest"]
    assert got.stats["resumed_at"] == {"restart": 0, "iteration": it}
    assert kmeans_bytes(killed) == kmeans_bytes(init_run["out"])
    assert len(kmeans_bytes(killed)) == 5
    assert [p.sha256 for p in got.parts] == [p.sha256 for p in want.parts]
    assert got.config_hash == want.config_hash
    for key in ("inertia", "empty_clusters_split", "n_clusters", "train_rows"):
        assert got.stats[key] == want.stats[key], key
    assert not ckpt.exists()


# ---------------------------------------------------------------- input errors

def bad_runs(tmp_path: Path, x: np.ndarray) -> dict[str, tuple[list[str], list[str]]]:
    """case -> (overrides, regexes the message must match)."""
    np.save(tmp_path / "short.npy", x[:K - 1])
    nan = x[:K].copy()
    nan[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "good.npy", x[:K])
    (tmp_path / "text.npy").write_text("not numpy")
    return {
        "k_above_n": (["kmeans.k=2001", "kmeans.train_size=2001"],
                      [r"kmeans\.k=2001", rf"\({N} in .*vectors\)"]),
        "train_size_below_k": ([f"kmeans.k={K}", "kmeans.train_size=5"],
                               [r"kmeans\.train_size=5 should be >= kmeans\.k=8"]),
        "init_shape": ([f"kmeans.init={tmp_path / 'short.npy'}"],
                       [r"short\.npy", r"\(7, 16\)", r"expected .*\(8, 16\)"]),
        "init_nan": ([f"kmeans.init={tmp_path / 'nan.npy'}"], [r"nan\.npy", r"centroid 3"]),
        "init_missing": ([f"kmeans.init={tmp_path / 'nope.npy'}"], [r"nope\.npy", "not found"]),
        "init_not_npy": ([f"kmeans.init={tmp_path / 'text.npy'}"], [r"text\.npy", "not a .npy"]),
        "init_method": (["kmeans.init=kmeans--"], [r"kmeans\.init='kmeans--'"]),
        "restarts_of_a_file": ([f"kmeans.init={tmp_path / 'good.npy'}", "kmeans.n_init=2"],
                               [r"kmeans\.n_init=2 should be 1"]),
        "sample_below_k": (["kmeans.sample_size=4"], [r"kmeans\.sample_size=4 should be >= "]),
    }


@pytest.mark.parametrize("case", ["k_above_n", "train_size_below_k", "init_shape", "init_nan",
                                  "init_missing", "init_not_npy", "init_method",
                                  "restarts_of_a_file", "sample_below_k"])
def test_bad_kmeans_input_exits_2_with_a_clear_message(tmp_path, vectors, capsys, case):
    overrides, patterns = bad_runs(tmp_path, vectors[0])[case]
    out = out_dir(tmp_path / "out", vectors)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"stages": ["kmeans"], "kmeans": {"k": K}}))
    capsys.readouterr()
    assert cli.main(["run", str(cfg), f"out={out}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vecgraph: error: ")
    for pat in patterns:
        assert re.search(pat, err), f"{pat!r} not in {err!r}"
    assert not (out / "kmeans" / schema.MANIFEST).exists()
