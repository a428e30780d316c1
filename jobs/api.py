"""Python API: run a pipeline config, open a stage's committed output as a pyarrow dataset."""
from __future__ import annotations

from typing import Any

import pyarrow.dataset as ds

from vecgraph.jobs import config as config_mod
from vecgraph.jobs import pipeline
from vecgraph.sharding import schema, storage
from vecgraph.sharding.errors import InputError


def run(config: str | config_mod.PipelineConfig | None = None, *overrides: str) -> dict[str, Any]:
    """Run a pipeline from a YAML path (or a PipelineConfig) with `key=value` overrides.

    Returns {stage: Manifest, "report": dict when the report stage ran}."""
    cfg = config if isinstance(config, config_mod.PipelineConfig) else \
        config_mod.load(config, list(overrides))
    return pipeline.run(cfg)


def open_output(out: str, stage: str) -> ds.Dataset:
    """The committed Parquet parts of a stage ('shard', 'knn', 'kmeans', 'mcl', 'propagate')."""
    if stage not in schema.STAGE_DIRS or stage == "index":
        raise InputError(f"stage {stage!r} has no Parquet output; choose from "
                         f"{[s for s in schema.STAGE_DIRS if s != 'index']}")
    uri = storage.join(out, schema.STAGE_DIRS[stage])
    m = storage.read_manifest(uri)
    if m is None:
        raise InputError(f"{uri}: no {schema.MANIFEST}; the {stage} stage is not committed there")
    fs, path = storage.filesystem(uri)
    return ds.dataset([storage.join(path, p.path) for p in m.parts], format="parquet",
                      filesystem=fs)
