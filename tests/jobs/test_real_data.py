"""The real-data configs end to end (../shared/data), checked against independent references."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as ds
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from tests.conftest import ROOT, shared_data
from vecgraph.jobs import api


def _table(out, folder):
    return ds.dataset(str(out / folder), format="parquet").to_table().sort_by("id")


def _reference_diffusion(I, D, metric, seeds, seed_labels, n_iter):
    """Dense-label scipy diffusion F <- D^-1 W F, seeds clamped, on the graph of DESIGN §4."""
    n = len(I)
    d = np.sqrt(np.maximum(D, 0)) if metric == "l2" else np.maximum(D, 0)
    ok = I >= 0
    sigma = d[ok].mean()
    rows = np.repeat(np.arange(n), I.shape[1])[ok.ravel()]
    W = sp.csr_matrix((np.exp(-d[ok] / sigma), (rows, I[ok])), shape=(n, n))
    W = W.maximum(W.T)
    P = sp.diags(1 / np.asarray(W.sum(1)).ravel()) @ W
    classes = np.unique(seed_labels)
    Y = np.zeros((n, len(classes)))
    Y[seeds, np.searchsorted(classes, seed_labels)] = 1
    F = Y.copy()
    for _ in range(n_iter):
        F = P @ F
        F[seeds] = Y[seeds]
    return classes[F.argmax(1)]


def _check_run(out, labels_true, metric, x):
    report = json.loads((out / "report.json").read_text())["stages"]
    # k-NN rows of 200 random nodes against numpy brute force.
    g = _table(out, "graph")
    I = np.stack(g.column("neighbors").to_numpy(zero_copy_only=False))
    D = np.stack(g.column("distances").to_numpy(zero_copy_only=False))
    rng = np.random.default_rng(0)
    q = rng.choice(len(x), 200, replace=False)
    if metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        Dq = 1 - xn[q].astype(np.float64) @ xn.T.astype(np.float64)
    else:
        x64 = x.astype(np.float64)
        Dq = (x64[q] ** 2).sum(1)[:, None] + (x64 ** 2).sum(1)[None, :] - 2 * x64[q] @ x64.T
    Dq[np.arange(len(q)), q] = np.inf
    k = I.shape[1]
    kth = np.sort(Dq, axis=1)[:, k - 1]
    true_of_graph = np.take_along_axis(Dq, I[q], 1)
    assert (true_of_graph <= kth[:, None] * (1 + 1e-5) + 1e-5).mean() == 1.0
    np.testing.assert_allclose(D[q], true_of_graph, rtol=1e-4, atol=1e-4)
    assert report["knn"]["recall_at_k"] == 1.0
    for stage, folder in (("kmeans", "kmeans"), ("mcl", "mcl")):
        pred = _table(out, folder).column("cluster").to_numpy()
        want = normalized_mutual_info_score(labels_true, pred)
        assert report[stage]["nmi"] == pytest.approx(want, abs=1e-9)
        assert report[stage]["ari"] == pytest.approx(adjusted_rand_score(labels_true, pred), abs=1e-9)
    # Propagation against an independent dense diffusion on the same seeds.
    seeds = ds.dataset(str(out / "labels" / "_seeds.parquet")).to_table().sort_by("id")
    seed_ids = seeds.column("id").to_numpy()
    lab = _table(out, "labels")
    pred = lab.column("label").to_numpy(zero_copy_only=False)
    iters = json.loads((out / "labels" / "_manifest.json").read_text())["stats"]["iterations"]
    ref = _reference_diffusion(I, D, metric, seed_ids, labels_true[seed_ids], iters)
    non_seed = ~np.isin(np.arange(len(x)), seed_ids)
    acc = (pred[non_seed] == labels_true[non_seed]).mean()
    ref_acc = (ref[non_seed] == labels_true[non_seed]).mean()
    assert report["propagate"]["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert (pred[non_seed] == ref[non_seed]).mean() > 0.98
    assert acc >= ref_acc - 0.01


def test_agnews_config_end_to_end(ray_local, tmp_path, monkeypatch):
    data = shared_data("agnews-minilm")
    monkeypatch.chdir(ROOT)
    out = tmp_path / "agnews"
    api.run("conf/agnews.yaml", f"out={out}", f"input={data / 'agnews_test_minilm.parquet'}")
    t = ds.dataset(str(data / "agnews_test_minilm.parquet")).to_table()
    x = np.stack(t.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    vec = _table(out, "vectors")
    assert vec.column("source_id").to_numpy().tolist() == t.column("id").to_numpy().tolist()
    _check_run(out, t.column("label").to_numpy(), "cosine", x)


@pytest.mark.slow
def test_mnist_config_end_to_end(ray_local, tmp_path, monkeypatch):
    import gzip
    data = shared_data("mnist")
    monkeypatch.chdir(ROOT)
    out = tmp_path / "mnist"
    api.run("conf/mnist.yaml", f"out={out}", f"input={data}")
    with gzip.open(data / "t10k-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784).astype(np.float32)
    with gzip.open(data / "t10k-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    assert np.array_equal(_table(out, "vectors").column("label").to_numpy(), y)
    _check_run(out, y, "l2", x)
