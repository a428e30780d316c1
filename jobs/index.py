"""Index stage: a Faiss index per vector part from a factory string, trained once on a sample."""
from __future__ import annotations

import numpy as np
import ray

from vecgraph.jobs import runtime, workers
from vecgraph.jobs.config import PipelineConfig, stage_config
from vecgraph.jobs.stage import StageOutput
from vecgraph.sharding import schema, storage
from vecgraph.sharding.errors import InputError

TRAINED = "trained.faissindex"


def make_index(d: int, factory: str, metric: str):
    import faiss
    try:
        return faiss.index_factory(d, factory, workers.faiss_metric(metric))
    except RuntimeError as e:
        raise InputError(f"index.factory={factory!r} is not a valid Faiss factory string for "
                         f"d={d}: {str(e).splitlines()[-1] if str(e) else e}") from None


def default_train_size(index, n: int) -> int:
    """Faiss's advice: 30 to 256 training points per IVF list; at least 10,000 for PQ codebooks."""
    import faiss
    ivf = faiss.try_extract_index_ivf(index)
    want = max(10_000, 64 * ivf.nlist) if ivf is not None else 10_000
    return min(want, n)


@ray.remote(max_retries=3)
def sample_part(vectors_uri: str, path: str, count: int, seed: int, metric: str,
                on_invalid: str) -> np.ndarray:
    runtime.limit_threads(1)
    _, x = workers.load_part(vectors_uri, path, metric, on_invalid)
    rng = np.random.default_rng(seed)
    return x[np.sort(rng.choice(len(x), min(count, len(x)), replace=False))]


@ray.remote(max_retries=3)
def train(d: int, factory: str, metric: str, xt: np.ndarray) -> bytes:
    import faiss
    runtime.limit_threads(1)
    # Built from the factory string here: an untrained OPQ index does not survive
    # serialize/deserialize (its transform then refuses to train: "not trained yet").
    index = make_index(d, factory, metric)
    index.train(xt)
    return faiss.serialize_index(index).tobytes()


@ray.remote(max_retries=3)
def build_shard(vectors_uri: str, part: schema.Part, trained: bytes, metric: str,
                stage_uri: str, name: str, on_invalid: str) -> schema.Part:
    """Add one vector part to a copy of the trained index and write it as shard `name`."""
    import faiss
    runtime.limit_threads(1)
    _, x = workers.load_part(vectors_uri, part.path, metric, on_invalid)
    index = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
    index.add(x)
    data = faiss.serialize_index(index).tobytes()
    storage.put_bytes(storage.join(stage_uri, name), data)
    return schema.Part(name, part.n_rows, part.id_min, part.id_max, len(data),
                       schema.sha256_bytes(data))


def run(cfg: PipelineConfig, inputs: dict[str, schema.Manifest]) -> schema.Manifest:
    import faiss
    vec = inputs["shard"]
    out = StageOutput(cfg.out, "index", stage_config(cfg, "index"), {"shard": vec})
    if (m := out.committed()) is not None:
        return m
    metric, d = cfg.knn.metric, vec.dim
    vectors_uri = storage.join(cfg.out, schema.STAGE_DIRS["shard"])
    index = make_index(d, cfg.index.factory, metric)
    planned = [{"path": schema.shard_index_name(i), "id_min": p.id_min, "id_max": p.id_max,
                "n_rows": p.n_rows} for i, p in enumerate(vec.parts)]
    done = out.start(planned)
    stats: dict = {}
    if index.is_trained:
        trained = faiss.serialize_index(index).tobytes()
    else:
        n_train = min(cfg.index.train_size or default_train_size(index, vec.n_rows), vec.n_rows)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and ivf.nlist > n_train:
            raise InputError(f"index.factory={cfg.index.factory!r}: nlist={ivf.nlist} exceeds the "
                             f"{n_train} training vectors available; use at most "
                             f"IVF{max(1, n_train // 39)} (Faiss wants >= 39 points per list) or "
                             f"raise index.train_size")
        with runtime.timed("train_seconds", stats):
            shares = np.random.default_rng(cfg.seed).multinomial(
                n_train, [p.n_rows / vec.n_rows for p in vec.parts])
            xt = np.concatenate(runtime.get(
                [sample_part.remote(vectors_uri, p.path, int(c), cfg.seed + i, metric, cfg.on_invalid)
                 for i, (p, c) in enumerate(zip(vec.parts, shares)) if c > 0], "train sample"))
            trained = runtime.unwrap(ray.get, train.remote(d, cfg.index.factory, metric, xt))
        stats["train_size"] = len(xt)
    storage.put_bytes(storage.join(out.uri, TRAINED), trained)
    trained_ref = ray.put(trained)
    refs = [build_shard.remote(vectors_uri, p, trained_ref, metric, out.uri,
                               schema.shard_index_name(i), cfg.on_invalid)
            for i, p in enumerate(vec.parts) if schema.shard_index_name(i) not in done]
    parts = list(done.values()) + runtime.get(refs, "index")
    return out.commit(parts, stats, n_rows=vec.n_rows, metric=metric,
                      distance=schema.DISTANCE_NAMES[metric], dim=d, dtype="float32",
                      extra={"factory": cfg.index.factory, "trained": TRAINED})
