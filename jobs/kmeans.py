"""k-means stage: Lloyd over vector parts pinned in actors (or over a training sample on the
driver), checkpointed after every iteration, then one assignment pass that writes every part."""
from __future__ import annotations

import dataclasses
import io
import logging
import zipfile
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import ray

from vecgraph.clustering import kmeans as km
from vecgraph.jobs import runtime, workers
from vecgraph.jobs.config import KmeansConfig, PipelineConfig, stage_config
from vecgraph.jobs.stage import StageOutput
from vecgraph.sharding import schema, storage
from vecgraph.sharding.errors import InputError

log = logging.getLogger("vecgraph")

CENTROIDS = "_centroids.parquet"  # "_": folder readers (pandas, pyarrow) skip it
CHECKPOINT = "_checkpoint.npz"    # Lloyd state after the latest iteration; removed on commit

# The stage's random streams. Each is derived from (seed, key) alone, never from draws made
# before it, so a run resumed from a checkpoint draws exactly what an uninterrupted run drew.
SAMPLE, TRAIN, INIT, SPLIT = 0, 1, 2, 3


def stream(seed: int, *key: int) -> np.random.Generator:
    """The generator of one random step: (SAMPLE,) rows for the initialisation, (TRAIN,) rows
    of the training sample, (INIT, restart), (SPLIT, restart, update) empty-cluster splits."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


# ---------------------------------------------------------------- checkpoint

@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Restart `restart` stands at `state`; `best` = (centroids, inertia, n_split) of the best
    restart finished before it (None for the first). Valid only for `config_hash`."""
    config_hash: str
    restart: int
    state: km.LloydState
    best: tuple[np.ndarray, list[float], int] | None = None


def save_checkpoint(uri: str, ck: Checkpoint) -> None:
    """Write the checkpoint in one atomic put (tmp + rename locally, one PUT on S3)."""
    arrays: dict[str, Any] = {
        "config_hash": np.array(ck.config_hash), "restart": np.int64(ck.restart),
        "iteration": np.int64(ck.state.iteration), "centroids": ck.state.centroids,
        "inertia": np.array(ck.state.inertia, np.float64), "n_split": np.int64(ck.state.n_split)}
    if ck.best is not None:
        arrays.update(best_centroids=ck.best[0], best_inertia=np.array(ck.best[1], np.float64),
                      best_n_split=np.int64(ck.best[2]))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.put_bytes(uri, buf.getvalue())


def load_checkpoint(uri: str, config_hash: str) -> Checkpoint | None:
    """The checkpoint at `uri` when it was written for `config_hash`, else None."""
    if not storage.exists(uri):
        return None
    try:
        z = np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
        if str(z["config_hash"]) != config_hash:
            log.info("%s: written for another config; starting k-means afresh", uri)
            return None
        state = km.LloydState(z["centroids"].astype(np.float32), int(z["iteration"]),
                              tuple(float(v) for v in z["inertia"]), int(z["n_split"]))
        best = None
        if "best_centroids" in z.files:
            best = (z["best_centroids"].astype(np.float32),
                    [float(v) for v in z["best_inertia"]], int(z["best_n_split"]))
        return Checkpoint(config_hash, int(z["restart"]), state, best)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        log.warning("%s: unreadable checkpoint (%s); starting k-means afresh", uri, e)
        return None


# ---------------------------------------------------------------- Lloyd with restarts

def fit(kc: KmeansConfig, seed: int, stats: km.Stats, init: Callable[[int], np.ndarray],
        ckpt_uri: str, config_hash: str) -> tuple[np.ndarray, list[float], int, Checkpoint | None]:
    """kc.n_init Lloyd runs (restart r starts from init(r)); the lowest final inertia wins, as
    Faiss's nredo. Resumes from the checkpoint at ckpt_uri when one exists for config_hash, and
    writes one after every update. Returns (centroids, inertia per pass, splits, the checkpoint
    resumed from or None)."""
    resumed = load_checkpoint(ckpt_uri, config_hash)
    if resumed is not None:
        log.info("kmeans: resuming restart %d at iteration %d from %s", resumed.restart,
                 resumed.state.iteration, ckpt_uri)
    start = resumed.restart if resumed else 0
    state, best = (resumed.state, resumed.best) if resumed else (None, None)
    for r in range(start, kc.n_init):
        if state is None:
            state = km.LloydState(init(r))

        def checkpoint(s: km.LloydState, r: int = r, best: Any = best) -> None:
            save_checkpoint(ckpt_uri, Checkpoint(config_hash, r, s, best))
        state, final = run_restart(kc, seed, stats, state, r, checkpoint)
        inertia = [*state.inertia, final]
        if best is None or inertia[-1] < best[1][-1]:
            best = (state.centroids, inertia, state.n_split)
        state = None
    assert best is not None  # n_init >= 1
    return (*best, resumed)


def run_restart(kc: KmeansConfig, seed: int, stats: km.Stats, state: km.LloydState, restart: int,
                checkpoint: Callable[[km.LloydState], None]) -> tuple[km.LloydState, float]:
    """Lloyd from `state` to kc.niter updates, checkpointing each, with a progress bar."""
    bar = runtime.progress(None, f"kmeans {restart + 1}/{kc.n_init}", total=kc.niter,
                           initial=state.iteration)

    def step(s: km.LloydState) -> None:
        checkpoint(s)
        bar.update(1)
    try:
        return km.lloyd(stats, state, kc.niter, lambda i: stream(seed, SPLIT, restart, i), step)
    finally:
        bar.close()


def part_stats(actors: list) -> km.Stats:
    """stats(centroids) over the parts pinned in `actors`: centroids broadcast through the
    object store, partial sums and counts reduced here (in part order: deterministic)."""
    def stats(centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        ref = ray.put(centroids)
        partial = runtime.get([a.kmeans_stats.remote(ref) for a in actors], "kmeans", False)
        return (np.sum([p[0] for p in partial], axis=0), np.sum([p[1] for p in partial], axis=0),
                float(sum(p[2] for p in partial)))
    return stats


def load_init(uri: str, k: int, d: int) -> tuple[np.ndarray, str]:
    """(initial centroids (k, d) float32, sha256 of the file) from a .npy file or URI."""
    fix = f"give a .npy array of shape (kmeans.k={k}, dim={d}) or kmeans.init=kmeans++"
    if not storage.exists(uri):
        raise InputError(f"kmeans.init={uri!r}: file not found; {fix}")
    data = storage.read_bytes(uri)
    try:
        c = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputError(f"kmeans.init={uri!r}: not a .npy array ({e}); {fix}") from None
    if c.shape != (k, d) or not (np.issubdtype(c.dtype, np.floating)
                                 or np.issubdtype(c.dtype, np.integer)):
        raise InputError(f"kmeans.init={uri!r}: initial centroids are {c.dtype} {c.shape}, "
                         f"expected a numeric array of shape ({k}, {d}); {fix}")
    if not np.isfinite(c).all():
        bad = int(np.flatnonzero(~np.isfinite(c).all(1))[0])
        raise InputError(f"kmeans.init={uri!r}: centroid {bad} has a NaN or Inf; {fix}")
    return c.astype(np.float32), schema.sha256_bytes(data)


# ---------------------------------------------------------------- the stage

def train(cfg: PipelineConfig, actors: list, c0: np.ndarray | None, ckpt_uri: str,
          config_hash: str) -> tuple[np.ndarray, list[float], int, Checkpoint | None, int]:
    """fit() over the actors' parts, or over kmeans.train_size rows sampled from them (on the
    driver), from c0 or from k-means++/random rows of a sample. Returns fit's results and the
    number of rows trained on."""
    kc = cfg.kmeans
    sizes = runtime.get([a.size.remote() for a in actors], "load parts", False)
    stats, train_rows = part_stats(actors), sum(sizes)
    if kc.train_size is not None:  # bounded by config: gathered and clustered here
        _, x_train = workers.sample_rows(actors, sizes, kc.train_size, stream(cfg.seed, TRAIN))
        stats, train_rows = (lambda c: km.stats(x_train, c)), len(x_train)
    if c0 is not None:
        def init(r: int) -> np.ndarray:
            return c0
    else:
        _, sample = workers.sample_rows(actors, sizes, kc.sample_size, stream(cfg.seed, SAMPLE))

        def init(r: int) -> np.ndarray:
            return km.init_centroids(sample, kc.k, kc.init, stream(cfg.seed, INIT, r))
    return (*fit(kc, cfg.seed, stats, init, ckpt_uri, config_hash), train_rows)


def run(cfg: PipelineConfig, inputs: dict[str, schema.Manifest]) -> schema.Manifest:
    vec = inputs["shard"]
    kc = cfg.kmeans
    if kc.k > vec.n_rows:
        raise InputError(f"kmeans.k={kc.k} should be <= the number of vectors "
                         f"({vec.n_rows} in {cfg.out}/vectors); lower kmeans.k")
    config = stage_config(cfg, "kmeans")
    c0 = None
    if kc.init_file:  # the file's content, not only its name, decides the output
        c0, config["init_sha256"] = load_init(kc.init, kc.k, vec.dim)
    out = StageOutput(cfg.out, "kmeans", config, {"shard": vec})
    if (m := out.committed()) is not None:
        return m
    vectors_uri = storage.join(cfg.out, schema.STAGE_DIRS["shard"])
    planned = [{"path": schema.part_name(i), "id_min": p.id_min, "id_max": p.id_max}
               for i, p in enumerate(vec.parts)]
    done = out.start(planned)  # parts of an interrupted run: same centroids, kept
    ckpt_uri = storage.join(out.uri, CHECKPOINT)
    actors = workers.start_workers(vec, vectors_uri, "l2", cfg.ray.actor_cpus)
    try:
        centroids, inertia, n_split, resumed, train_rows = train(cfg, actors, c0, ckpt_uri,
                                                                 out.config_hash)
        ref = ray.put(centroids)
        todo = [i for i, p in enumerate(planned) if p["path"] not in done]
        written = runtime.get([actors[i].kmeans_write.remote(
            out.uri, schema.part_name(i), ref, vec.parts[i].id_min, vec.parts[i].id_max)
            for i in todo], "kmeans assign")
    finally:
        for a in actors:
            ray.kill(a)
    table = pa.table({schema.CLUSTER: pa.array(np.arange(kc.k), pa.int64()),
                      schema.CENTROID: schema.fixed_list(centroids, pa.float32())})
    storage.put_bytes(storage.join(out.uri, CENTROIDS), storage.parquet_bytes(table))
    stats: dict[str, Any] = {"inertia": inertia, "empty_clusters_split": n_split,
                             "n_clusters": kc.k, "train_rows": train_rows}
    if resumed is not None:
        stats["resumed_at"] = {"restart": resumed.restart, "iteration": resumed.state.iteration}
    m = out.commit([*done.values(), *written], stats, dim=vec.dim, dtype="float32",
                   extra={"centroids": CENTROIDS})
    storage.remove_tree(ckpt_uri)  # committed: the checkpoint has served
    return m
