"""Runs the stages a config lists, in order, each reading only its inputs' manifests."""
from __future__ import annotations

import logging
import time
from typing import Any

from vecgraph.jobs import index, kmeans, knn, mcl, propagate, report, runtime, shard
from vecgraph.jobs.config import PipelineConfig
from vecgraph.sharding import schema, storage
from vecgraph.sharding.errors import InputError

log = logging.getLogger("vecgraph")

STAGE_RUNNERS: dict[str, Any] = {"shard": shard.run, "index": index.run, "knn": knn.run,
                                 "kmeans": kmeans.run, "mcl": mcl.run, "propagate": propagate.run}
INPUTS = {"shard": [], "index": ["shard"], "knn": ["shard", "index"], "kmeans": ["shard"],
          "mcl": ["knn"], "propagate": ["knn", "shard"]}


def input_manifest(out: str, stage: str, needed_by: str) -> schema.Manifest:
    uri = storage.join(out, schema.STAGE_DIRS[stage])
    m = storage.read_manifest(uri)
    if m is None:
        raise InputError(f"stage {needed_by} needs the {stage} output at {uri}, which is not "
                         f"committed; add '{stage}' to stages (before '{needed_by}')")
    return m


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run cfg.stages under cfg.out; returns {stage: Manifest} plus "report" when listed."""
    if not (cfg.shard.engine == "spark" and list(cfg.stages) == ["shard"]):  # Spark alone: no Ray
        runtime.init(cfg.ray)
    done: dict[str, Any] = {}
    for stage in cfg.stages:
        t0 = time.perf_counter()
        if stage == "report":
            done["report"] = report.run(cfg.out)
        else:
            inputs = {s: done.get(s) or input_manifest(cfg.out, s, stage) for s in INPUTS[stage]}
            done[stage] = STAGE_RUNNERS[stage](cfg, inputs)
        log.info("%s done in %.1f s", stage, time.perf_counter() - t0)
    return done


def summary(cfg: PipelineConfig, done: dict[str, Any]) -> str:
    """One screen: a line per stage with its figures, and where the outputs are."""
    rep = done.get("report") or {}
    lines = [f"vecgraph: {len(done)} stage(s) under {cfg.out}", ""]
    lines.append(f"{'stage':<10}{'seconds':>9}{'rows':>10}{'parts':>7}  figures")
    for stage, m in done.items():
        if stage == "report":
            continue
        figs = {k: v for k, v in rep.get("stages", {}).get(stage, {}).items()
                if k in ("recall_at_k", "nmi", "ari", "n_clusters", "accuracy", "coverage",
                         "rejected_rows", "seeds")}
        fig = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in figs.items())
        lines.append(f"{stage:<10}{m.stats.get('seconds', 0):>9.1f}{m.n_rows:>10}"
                     f"{len(m.parts):>7}  {fig}")
    lines.append("")
    for stage in done:
        if stage != "report":
            lines.append(f"  {stage:<10}-> {storage.join(cfg.out, schema.STAGE_DIRS[stage])}/")
    if "report" in done:
        lines.append(f"  {'report':<10}-> {storage.join(cfg.out, report.REPORT)}, "
                     f"{storage.join(cfg.out, report.REPORT_HTML)}")
    return "\n".join(lines)
