"""`OUT/report.html`: the report's figures as tables and plots, one self-contained page.

The plot data are small summaries made per part (a strided sample of k-th neighbour
distances, cluster sizes, score histograms), so no process reads a whole stage output.
Plots are drawn with matplotlib's Agg backend and embedded as PNG data URIs.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

SAMPLE_PER_PART = 2000  # k-th neighbour distances sampled per graph part
SCORE_BINS = np.linspace(0.0, 1.0, 21)


# ---------------------------------------------------------------- per-part summaries (pure)

def kth_distance_sample(distances: np.ndarray, per_part: int = SAMPLE_PER_PART) -> np.ndarray:
    """Distance to the k-th neighbour of every ceil(n / per_part)-th node, padding left out.
    distances: (n, k) float32 ascending; returns (<= per_part,) float32."""
    if distances.size == 0:
        return np.zeros(0, np.float32)
    step = max(1, -(-len(distances) // per_part))
    kth = distances[::step, -1]
    return kth[np.isfinite(kth)]


def cluster_sizes(clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster ids (c,) int64, members in this part (c,) int64)."""
    return np.unique(clusters.astype(np.int64), return_counts=True)


def add_cluster_sizes(parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Sizes (c,) int64 of every cluster, from the per-part (ids, counts) of cluster_sizes."""
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    counts = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    _, inverse = np.unique(ids, return_inverse=True)
    return np.bincount(inverse, weights=counts).astype(np.int64)


def score_histogram(scores: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    """Counts (len(SCORE_BINS),) int64: nodes per score bin of the labelled nodes, and last
    the number of unlabelled nodes. scores (n,) float32 in [0, 1], labelled (n,) bool."""
    h, _ = np.histogram(np.clip(scores[labelled], 0, 1), SCORE_BINS)
    return np.append(h, int((~labelled).sum())).astype(np.int64)


# ---------------------------------------------------------------- the page

def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plots(figures: dict[str, Any]) -> list[tuple[str, str]]:
    """(caption, PNG data URI) of each plot the figures allow."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    out = []
    if (kth := figures.get("knn_kth_distance")) is not None and len(kth):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.hist(kth, bins=50)
        ax.set_xlabel(f"distance to the k-th neighbour ({figures.get('knn_distance', '')})")
        ax.set_ylabel("nodes")
        out.append((f"k-NN graph: distance to the k-th neighbour, {len(kth):,} sampled nodes", _png(fig)))
        plt.close(fig)
    for stage in ("kmeans", "mcl"):
        sizes = figures.get(f"{stage}_sizes")
        if sizes is None or not len(sizes):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        # log-spaced integer bins from the smallest to past the largest size
        edges = np.unique(np.logspace(np.log10(sizes.min()), np.log10(sizes.max() + 1), 30)
                          .astype(np.int64))
        edges = np.append(edges, edges[-1] + 1) if edges[-1] <= sizes.max() else edges
        counts, _, _ = ax.hist(sizes, bins=edges)
        ax.set_xscale("log")
        if counts.max() > 20:  # many singletons next to a few large clusters
            ax.set_yscale("log")
        else:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("cluster size (nodes)")
        ax.set_ylabel("clusters")
        out.append((f"{stage}: {len(sizes):,} clusters by size (largest {sizes.max():,}, "
                    f"singletons {(sizes == 1).sum():,})", _png(fig)))
        plt.close(fig)
    if (h := figures.get("propagate_scores")) is not None:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.bar(SCORE_BINS[:-1], h[:-1], width=np.diff(SCORE_BINS), align="edge")
        ax.set_xlabel("score of the predicted label")
        ax.set_ylabel("nodes")
        out.append((f"propagate: score of the predicted label ({h[-1]:,} nodes unlabelled: "
                    f"no seed in their component)", _png(fig)))
        plt.close(fig)
    return out


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return html.escape(str(v))


def render(report: dict, figures: dict[str, Any]) -> str:
    """The HTML page of `report` (as report.json) with the plots `figures` allow."""
    rows = []
    for stage, entry in report["stages"].items():
        figs = "<br>".join(f"{html.escape(k)} = {_cell(v)}" for k, v in entry.items()
                           if k not in ("seconds", "rows", "parts", "path") and v is not None)
        rows.append(f"<tr><td>{html.escape(stage)}</td><td>{entry.get('seconds') or 0.0:.1f}</td>"
                    f"<td>{_cell(entry.get('rows'))}</td><td>{_cell(entry.get('parts'))}</td>"
                    f"<td>{figs}</td><td><code>{html.escape(str(entry.get('path', '')))}</code></td></tr>")
    plots = "".join(f'<figure><img src="{uri}" alt="{html.escape(cap)}"><figcaption>'
                    f"{html.escape(cap)}</figcaption></figure>" for cap, uri in _plots(figures))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vecgraph report: {html.escape(report['out'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}}
figure{{display:inline-block;margin:1em}}figcaption{{font-size:90%;max-width:36em}}</style></head>
<body><h1>vecgraph report</h1><p>Outputs under <code>{html.escape(report['out'])}</code>;
the same figures are in <code>report.json</code>.</p>
<table><tr><th>stage</th><th>seconds</th><th>rows</th><th>parts</th><th>figures</th><th>output</th></tr>
{''.join(rows)}</table>
{plots}
</body></html>
"""
