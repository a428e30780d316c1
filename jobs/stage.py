"""Commit protocol of a stage output: `_plan.json` first, parts, `_manifest.json` last (DESIGN §3).

A re-run with the same config hash skips a committed stage, and resumes an interrupted one
from the parts already written; a changed hash clears the folder and recomputes.
"""
from __future__ import annotations

import io
import json
import time
from typing import Any

import pyarrow.parquet as pq

from vecgraph.sharding import schema, storage


def code_version() -> str:
    try:
        from importlib.metadata import version
        return version("vecgraph")
    except Exception:  # running from a source tree without metadata
        return "unknown"


class StageOutput:
    """One stage's output folder under OUT."""

    def __init__(self, out: str, stage: str, config: dict, inputs: dict[str, schema.Manifest]):
        self.stage = stage
        self.uri = storage.join(out, schema.STAGE_DIRS[stage])
        self.inputs = {name: m.config_hash for name, m in inputs.items()}
        self.config_hash = schema.stable_hash({"stage": stage, "config": config,
                                               "inputs": self.inputs})
        self.t0 = time.perf_counter()
        self.done: dict[str, schema.Part] = {}

    def committed(self) -> schema.Manifest | None:
        """The manifest when this exact stage (same config and inputs) is already committed."""
        m = storage.read_manifest(self.uri)
        return m if m is not None and m.config_hash == self.config_hash else None

    def start(self, planned: list[dict[str, Any]]) -> dict[str, schema.Part]:
        """Write the plan (parts: {path, id_min, id_max, n_rows?}) and return the parts already
        committed by an interrupted run of the same plan (to be skipped)."""
        plan_uri = storage.join(self.uri, schema.PLAN)
        plan = {"config_hash": self.config_hash, "parts": planned}
        old = json.loads(storage.read_bytes(plan_uri)) if storage.exists(plan_uri) else None
        if old != plan or storage.exists(storage.join(self.uri, schema.MANIFEST)):
            storage.remove_tree(self.uri)
            storage.write_json(plan_uri, json.dumps(plan, indent=2))
            return {}
        storage.remove_temporaries(self.uri)
        for p in planned:
            uri = storage.join(self.uri, p["path"])
            if storage.exists(uri):
                self.done[p["path"]] = self._describe(uri, p)
        return dict(self.done)

    def _describe(self, uri: str, planned: dict[str, Any]) -> schema.Part:
        data = storage.read_bytes(uri)
        if uri.endswith(".parquet"):
            n_rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
        else:
            n_rows = planned.get("n_rows", 0)
        return schema.Part(path=planned["path"], n_rows=n_rows, id_min=planned["id_min"],
                           id_max=planned["id_max"], bytes=len(data),
                           sha256=schema.sha256_bytes(data))

    def commit(self, parts: list[schema.Part], stats: dict[str, Any], **fields: Any) -> schema.Manifest:
        stats = {"seconds": round(time.perf_counter() - self.t0, 3), **stats}
        m = schema.Manifest(kind=schema.STAGE_DIRS[self.stage], stage=self.stage,
                            n_rows=sum(p.n_rows for p in parts if p.path.endswith(".parquet"))
                            if fields.get("n_rows") is None else fields.pop("n_rows"),
                            parts=sorted(parts, key=lambda p: p.path),
                            config_hash=self.config_hash, inputs=self.inputs, stats=stats,
                            code_version=code_version(), **fields)
        storage.write_manifest(self.uri, m)
        return m
