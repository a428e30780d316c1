"""Typed pipeline config: one frozen dataclass per stage, loaded from YAML with key=value overrides."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Optional, Union

import yaml

from vecgraph.sharding import schema
from vecgraph.sharding.errors import InputError


class ConfigError(InputError):
    """An unknown, ill-typed or out-of-range config key (exit code 2)."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class ShardConfig:
    parts: int = 4
    format: str = "auto"
    vector_column: str = "vector"
    label_column: Optional[str] = "label"
    id_column: Optional[str] = None
    engine: str = "ray"           # ray | spark (PySpark reads the input and writes the parts)
    spark_master: str = "local[2]"
    chunk_rows: int = 65536       # rows read and written at a time by one task (bounds memory)

    def __post_init__(self) -> None:
        _check(self.parts >= 1, f"shard.parts={self.parts} should be >= 1")
        _check(self.engine in ("ray", "spark"), f"shard.engine={self.engine!r} should be 'ray' or 'spark'")
        _check(self.chunk_rows >= 1, f"shard.chunk_rows={self.chunk_rows} should be >= 1")


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    factory: str = "Flat"
    train_size: Optional[int] = None  # default: 64 points per IVF list, at least 10,000

    def __post_init__(self) -> None:
        _check(self.train_size is None or self.train_size >= 1,
               f"index.train_size={self.train_size} should be >= 1")


@dataclasses.dataclass(frozen=True)
class KnnConfig:
    k: int = 10
    metric: str = "l2"
    nprobe: int = 16
    recall_sample: int = 1000
    min_recall: Optional[float] = None
    query_block: int = 4096
    max_inflight: int = 2
    gpu: str = "auto"  # auto: shard actors take GPUs when the cluster has them; require; never

    def __post_init__(self) -> None:
        _check(self.k >= 1, f"knn.k={self.k} should be >= 1")
        _check(self.gpu in ("auto", "require", "never"),
               f"knn.gpu={self.gpu!r} should be auto, require or never")
        _check(self.metric in schema.DISTANCE_NAMES,
               f"knn.metric={self.metric!r} should be one of {sorted(schema.DISTANCE_NAMES)}")
        _check(self.nprobe >= 1, f"knn.nprobe={self.nprobe} should be >= 1")
        _check(self.recall_sample >= 0, f"knn.recall_sample={self.recall_sample} should be >= 0")
        _check(self.query_block >= 1, f"knn.query_block={self.query_block} should be >= 1")
        _check(self.max_inflight >= 1, f"knn.max_inflight={self.max_inflight} should be >= 1")


@dataclasses.dataclass(frozen=True)
class KmeansConfig:
    k: int = 10
    niter: int = 20             # Lloyd updates (Faiss's niter)
    init: str = "kmeans++"      # kmeans++ | random | path/URI of a (k, d) .npy of initial centroids
    n_init: int = 1             # restarts; the lowest final inertia wins
    sample_size: int = 100_000  # points drawn for the initialisation
    train_size: Optional[int] = None  # None: Lloyd over all parts; n: Lloyd on a seeded sample
    #                                   of n rows (on the driver), then one assignment pass

    def __post_init__(self) -> None:
        _check(self.k >= 1, f"kmeans.k={self.k} should be >= 1")
        _check(self.niter >= 0, f"kmeans.niter={self.niter} should be >= 0")
        _check(self.n_init >= 1, f"kmeans.n_init={self.n_init} should be >= 1")
        _check(self.sample_size >= self.k,
               f"kmeans.sample_size={self.sample_size} should be >= kmeans.k={self.k}")
        _check(self.init in ("kmeans++", "random") or self.init.endswith(".npy"),
               f"kmeans.init={self.init!r} should be 'kmeans++', 'random' or a .npy file of "
               f"initial centroids")
        _check(self.n_init == 1 or not self.init_file,
               f"kmeans.n_init={self.n_init} should be 1 when kmeans.init is a file (every "
               f"restart would start from the same centroids)")
        _check(self.train_size is None or self.train_size >= self.k,
               f"kmeans.train_size={self.train_size} should be >= kmeans.k={self.k} (or null "
               f"to run Lloyd over all vectors)")

    @property
    def init_file(self) -> bool:
        """Whether `init` names a file of initial centroids (not a method)."""
        return self.init not in ("kmeans++", "random")


@dataclasses.dataclass(frozen=True)
class McLConfig:
    inflation: float = 2.0
    max_entries: int = 50
    prune_threshold: float = 1e-4
    max_iter: int = 100
    tol: float = 1e-6

    def __post_init__(self) -> None:
        _check(self.inflation > 1.0, f"mcl.inflation={self.inflation} should be > 1")
        _check(self.max_iter >= 1, f"mcl.max_iter={self.max_iter} should be >= 1")
        _check(self.tol >= 0, f"mcl.tol={self.tol} should be >= 0")
        _check(self.max_entries >= 1, f"mcl.max_entries={self.max_entries} should be >= 1")
        _check(0 <= self.prune_threshold < 1,
               f"mcl.prune_threshold={self.prune_threshold} should be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class PropagateConfig:
    seeds_per_class: Optional[int] = 5
    seed_fraction: Optional[float] = None
    seeds: Optional[str] = None
    niter: int = 30
    max_iter: int = 1000
    top_m: int = 8

    def __post_init__(self) -> None:
        _check(self.seed_fraction is None or 0 < self.seed_fraction <= 1,
               f"propagate.seed_fraction={self.seed_fraction} should be in (0, 1]")
        _check(self.seeds_per_class is None or self.seeds_per_class >= 1,
               f"propagate.seeds_per_class={self.seeds_per_class} should be >= 1")
        _check(self.niter >= 1, f"propagate.niter={self.niter} should be >= 1")
        _check(self.max_iter >= self.niter,
               f"propagate.max_iter={self.max_iter} should be >= propagate.niter={self.niter}")
        _check(self.top_m >= 1, f"propagate.top_m={self.top_m} should be >= 1")


@dataclasses.dataclass(frozen=True)
class RayConfig:
    address: Optional[str] = None   # None: embedded local runtime; "auto" or ray://… for a cluster
    num_cpus: Optional[int] = None  # CPUs of the embedded runtime (default: all)
    actor_cpus: float = 0.5         # CPUs declared by each index-holding actor
    object_store_mb: Optional[int] = None

    def __post_init__(self) -> None:
        _check(self.num_cpus is None or self.num_cpus >= 1,
               f"ray.num_cpus={self.num_cpus} should be >= 1 (or null: all CPUs)")
        _check(self.actor_cpus > 0, f"ray.actor_cpus={self.actor_cpus} should be > 0")
        _check(self.object_store_mb is None or self.object_store_mb >= 75,
               f"ray.object_store_mb={self.object_store_mb} should be >= 75 (Ray's minimum) or null")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    input: str = "sklearn:digits"
    out: str = "runs/demo"
    stages: list = dataclasses.field(default_factory=lambda: list(schema.STAGES))
    seed: int = 0
    on_invalid: str = "error"
    shard: ShardConfig = ShardConfig()
    index: IndexConfig = IndexConfig()
    knn: KnnConfig = KnnConfig()
    kmeans: KmeansConfig = KmeansConfig()
    mcl: McLConfig = McLConfig()
    propagate: PropagateConfig = PropagateConfig()
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in schema.STAGES]
        _check(not bad, f"stages: unknown stage(s) {bad}; choose from {list(schema.STAGES)}")
        order = [s for s in schema.STAGES if s in self.stages]
        _check(list(self.stages) == order,
               f"stages={list(self.stages)} should be in pipeline order {order}")
        _check(self.on_invalid in ("error", "skip"),
               f"on_invalid={self.on_invalid!r} should be 'error' or 'skip'")
        _check(not self.input.startswith("spark:") or self.shard.engine == "spark",
               f"input={self.input!r} is a Spark table; set shard.engine=spark (--engine spark)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        names = " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in args)
        raise ConfigError(f"{key}={value!r} has type {type(value).__name__}, expected {names}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} should be a mapping of keys, got {value!r}")
        return _build(tp, value, key + ".")
    if tp in (list, "list") or origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} should be a list")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} should be true or false")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} should be an integer")
    if tp in (int, float, str) and not isinstance(value, tp):
        raise ConfigError(f"{key}={value!r} has type {type(value).__name__}, expected {tp.__name__}")
    return value


def _build(cls: Any, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; known keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix.rstrip('.')}: {e}") from e


def set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ConfigError(f"override {key}: {p!r} is not a section")
        node = node[p]
    node[parts[-1]] = value


def load(path: str | None, overrides: list[str] = ()) -> PipelineConfig:
    """Read a YAML config (or defaults when path is None), apply `key=value` overrides
    (values parsed as YAML, dotted keys for sections) and validate."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config is a mapping of keys, got {type(raw).__name__}")
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} should look like key=value (e.g. knn.k=20)")
        key, text = ov.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: value {text!r} is not valid YAML: {e}") from None
        set_dotted(raw, key.strip(), value)
    return _build(PipelineConfig, raw)


# Keys that change how a stage runs but not what it writes: outside the config hash.
RUNTIME_ONLY = {"recall_sample", "min_recall", "query_block", "max_inflight", "engine", "spark_master"}


def stage_config(cfg: PipelineConfig, stage: str) -> dict:
    """What a stage's output depends on in the config (hashed into its manifest)."""
    common = {"input": cfg.input, "seed": cfg.seed, "on_invalid": cfg.on_invalid}
    sections = {"shard": ["shard"], "index": ["index", "knn.metric"], "knn": ["knn"],
                "kmeans": ["kmeans"], "mcl": ["mcl"], "propagate": ["propagate"]}[stage]
    out = dict(common) if stage == "shard" else {"seed": cfg.seed, "on_invalid": cfg.on_invalid}
    full = cfg.to_dict()
    for s in sections:
        if "." in s:
            a, b = s.split(".")
            out[s] = full[a][b]
        else:
            out[s] = {k: v for k, v in full[s].items() if k not in RUNTIME_ONLY}
    return out
