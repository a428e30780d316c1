"""Report stage: per-stage time, size and quality figures in `OUT/report.json`, and the same
with plots in `OUT/report.html`.

Quality against the vectors' labels is counted per part (contingency tables, hit counts) by
Ray tasks and added up, so no process holds the labels of the whole collection.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from vecgraph.clustering import metrics
from vecgraph.jobs import report_html, runtime
from vecgraph.jobs.propagate import SEEDS
from vecgraph.sharding import schema, storage
from vecgraph.sharding.errors import InputError

REPORT = "report.json"
REPORT_HTML = "report.html"


def _joined(vectors_uri: str, vpath: str, stage_uri: str, spath: str, column: str) -> pa.Table:
    """(id, label, column) of one part's nodes that have a true label."""
    v = storage.read_table(storage.join(vectors_uri, vpath), [schema.ID, schema.LABEL])
    s = storage.read_table(storage.join(stage_uri, spath), [schema.ID, column])
    s = s.rename_columns([schema.ID, "pred"])
    t = v.join(s, schema.ID, join_type="inner")
    return t.filter(pc.is_valid(t.column(schema.LABEL)))


@ray.remote
def cluster_counts(vectors_uri: str, vpath: str, stage_uri: str, spath: str) -> dict:
    t = _joined(vectors_uri, vpath, stage_uri, spath, schema.CLUSTER)
    return metrics.contingency(t.column(schema.LABEL).to_numpy(zero_copy_only=False),
                               t.column("pred").to_numpy())


@ray.remote
def label_counts(vectors_uri: str, vpath: str, stage_uri: str, spath: str,
                 seed_ids: np.ndarray) -> tuple[int, int, int]:
    """(non-seed nodes, correctly labelled, labelled at all) of one part."""
    t = _joined(vectors_uri, vpath, stage_uri, spath, schema.LABEL)
    t = t.filter(pa.array(~np.isin(t.column(schema.ID).to_numpy(), seed_ids)))
    true, pred = t.column(schema.LABEL), t.column("pred").cast(t.column(schema.LABEL).type)
    correct = pc.fill_null(pc.equal(true, pred), False)
    return t.num_rows, int(pc.sum(correct).as_py() or 0), int(pc.sum(pc.is_valid(pred)).as_py() or 0)


@ray.remote
def plot_data(stage: str, uri: str) -> Any:
    """The per-part summary report_html plots: k-th distances, cluster sizes or score counts."""
    if stage == "knn":
        return report_html.kth_distance_sample(
            schema.list_column(storage.read_table(uri, [schema.DISTANCES]), schema.DISTANCES, np.float32))
    if stage == "propagate":
        t = storage.read_table(uri, [schema.LABEL, schema.SCORE])
        return report_html.score_histogram(t.column(schema.SCORE).to_numpy(),
                                           pc.is_valid(t.column(schema.LABEL)).to_numpy(zero_copy_only=False))
    clusters = storage.read_table(uri, [schema.CLUSTER]).column(schema.CLUSTER)
    return report_html.cluster_sizes(clusters.to_numpy())


def _plot_figures(out: str, manifests: dict[str, schema.Manifest | None]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for stage in ("knn", "kmeans", "mcl", "propagate"):
        m = manifests.get(stage)
        if m is None:
            continue
        stage_uri = storage.join(out, schema.STAGE_DIRS[stage])
        parts = runtime.get([plot_data.remote(stage, storage.join(stage_uri, p.path)) for p in m.parts],
                            "report plots", False)
        if stage == "knn":
            figures["knn_kth_distance"] = np.concatenate(parts) if parts else np.zeros(0, np.float32)
            figures["knn_distance"] = m.distance
        elif stage == "propagate":
            figures["propagate_scores"] = np.sum(parts, axis=0)
        else:
            figures[f"{stage}_sizes"] = report_html.add_cluster_sizes(parts)
    return figures


def _clustering_quality(vec: schema.Manifest, vectors_uri: str, m: schema.Manifest,
                        stage_uri: str) -> dict:
    tables = runtime.get([cluster_counts.remote(vectors_uri, v.path, stage_uri, s.path)
                          for v, s in zip(vec.parts, m.parts)], "report", False)
    table = metrics.add_counts(tables)
    return {"nmi": metrics.nmi(table), "ari": metrics.ari(table), "purity": metrics.purity(table)}


def run(out: str) -> dict:
    """Gather every committed stage's figures under OUT; writes report.json and report.html and
    returns the report."""
    manifests = {s: storage.read_manifest(storage.join(out, d)) for s, d in schema.STAGE_DIRS.items()}
    if not any(manifests.values()):
        raise InputError(f"{out}: no committed stage to report on; run a config with out={out} "
                         f"first (`vecgraph status {out}` shows what is there)")
    vec = manifests["shard"]
    vectors_uri = storage.join(out, schema.STAGE_DIRS["shard"])
    labelled = vec is not None and bool(vec.extra.get("has_labels"))
    report: dict[str, Any] = {"out": out, "stages": {}}
    for stage, m in manifests.items():
        if m is None:
            continue
        entry = {"seconds": m.stats.get("seconds"), "rows": m.n_rows, "parts": len(m.parts),
                 "path": storage.join(out, schema.STAGE_DIRS[stage])}
        stage_uri = storage.join(out, schema.STAGE_DIRS[stage])
        if stage == "shard":
            entry.update(dim=m.dim, rejected_rows=m.stats.get("rejected_rows", 0))
        elif stage == "knn":
            entry.update(k=m.extra.get("k"), metric=m.metric, recall_at_k=m.stats.get("recall_at_k"),
                         recall_sample=m.stats.get("recall_sample"), holes=m.stats.get("holes"))
        elif stage in ("kmeans", "mcl"):
            entry["n_clusters"] = m.stats.get("n_clusters")
            if stage == "mcl":
                entry.update(iterations=m.stats.get("iterations"), converged=m.stats.get("converged"))
            if labelled:
                entry.update(_clustering_quality(vec, vectors_uri, m, stage_uri))
        elif stage == "propagate":
            entry.update(seeds=m.stats.get("seeds"), iterations=m.stats.get("iterations"))
            if labelled:
                seed_ids = storage.read_table(storage.join(stage_uri, SEEDS),
                                              [schema.ID]).column(schema.ID).to_numpy()
                ref = ray.put(seed_ids)
                counts = runtime.get([label_counts.remote(vectors_uri, v.path, stage_uri, s.path, ref)
                                      for v, s in zip(vec.parts, m.parts)], "report", False)
                n, correct, covered = (sum(c[i] for c in counts) for i in range(3))
                entry.update(accuracy=correct / n if n else None,
                             coverage=covered / n if n else None, evaluated_nodes=n)
        report["stages"][stage] = entry
    storage.write_json(storage.join(out, REPORT), json.dumps(report, indent=2, default=float))
    storage.put_bytes(storage.join(out, REPORT_HTML),
                      report_html.render(report, _plot_figures(out, manifests)).encode())
    return report
