"""report.html's per-part plot summaries against whole-array references (the page itself is
checked on the digits pipeline in test_pipeline.py)."""
from __future__ import annotations

import numpy as np

from vecgraph.jobs import report_html


def test_cluster_sizes_added_over_parts_equal_the_whole(rng):
    clusters = rng.integers(0, 40, size=1000) * 7  # sparse ids; clusters span parts
    parts = np.array_split(clusters, 5)
    got = report_html.add_cluster_sizes([report_html.cluster_sizes(p) for p in parts])
    _, want = np.unique(clusters, return_counts=True)
    np.testing.assert_array_equal(got, want)
    assert got.sum() == len(clusters)


def test_kth_distance_sample_leaves_padding_out_and_is_bounded():
    D = np.tile(np.arange(5, dtype=np.float32), (10, 1))
    D[:, -1] = np.arange(10)
    D[3, -1] = np.inf  # a padded row (fewer than k other nodes)
    np.testing.assert_array_equal(report_html.kth_distance_sample(D, 100), [0, 1, 2, 4, 5, 6, 7, 8, 9])
    np.testing.assert_array_equal(report_html.kth_distance_sample(D, 4), [0, 6, 9])  # every 3rd row
    assert report_html.kth_distance_sample(np.zeros((0, 5), np.float32)).size == 0


def test_score_histogram_counts_labelled_scores_and_unlabelled(rng):
    s = rng.random(500).astype(np.float32)
    s[:3] = [0.0, 1.0, 0.05]
    lab = rng.random(500) < 0.8
    h = report_html.score_histogram(s, lab)
    want, _ = np.histogram(s[lab], bins=20, range=(0, 1))
    np.testing.assert_array_equal(h[:-1], want)
    assert h[-1] == (~lab).sum()
