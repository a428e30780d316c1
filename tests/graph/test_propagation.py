"""graph/propagation.py against dense harmonic label propagation written in the test.

Reference: F <- D^-1 W F with the seeds clamped to their one-hot label (dense numpy), and its
fixed point solved directly with scipy (F_U = (I - P_UU)^-1 P_UL Y_L on seeded components).
Kernel scores are float32, so per-step agreement is to rtol 1e-5 / atol 1e-6 and the fixed
point to atol 1e-5.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.stats import kstest

from vecgraph.graph import matrix, propagation

N_CLASSES = 4


def seeded_graph(seed: int = 11):
    """Symmetric weighted graph: 3 components (2 seeded, 1 not) and 3 isolated nodes, one of
    them a seed; node ids shuffled so components straddle parts. Returns W, seed ids, codes."""
    rng = np.random.default_rng(seed)
    n = 26
    W0 = np.zeros((n, n))
    for comp in (range(10), range(10, 18), range(18, 23)):
        c = list(comp)
        for a, b in itertools.pairwise(c):  # a chain keeps it connected
            W0[a, b] = rng.uniform(0.2, 1.0)
        for _ in range(len(c)):          # and some chords
            a, b = rng.choice(c, 2, replace=False)
            W0[a, b] = rng.uniform(0.05, 1.0)
    W0 = np.maximum(W0, W0.T)
    perm = rng.permutation(n)
    W = np.zeros_like(W0)
    W[np.ix_(perm, perm)] = W0
    old_seeds = np.array([0, 5, 7, 12, 15, 23])  # 23 is isolated, 24 and 25 are not seeds
    codes = np.array([0, 1, 2, 2, 0, 3], np.int32)  # component A sees 3 labels
    ids = perm[old_seeds]
    order = np.argsort(ids)
    return W, ids[order].astype(np.int64), codes[order], perm


def dense_F(states, n: int, n_classes: int) -> np.ndarray:
    F = np.zeros((n, n_classes))
    labels = np.concatenate([s[0] for s in states])
    scores = np.concatenate([s[1] for s in states])
    r, c = np.nonzero(labels >= 0)
    F[r, labels[r, c]] = scores[r, c]
    return F


def run_kernels(W, seed_ids, seed_codes, n_classes, m, starts, n_iter):
    """The propagate stage's plan on arrays: blocks by id range, gathered state rows."""
    n = len(W)
    bounds = list(zip(starts, list(starts[1:]) + [n]))
    blocks = [matrix.normalize_rows_sum(sp.csr_matrix(W[a:b])) for a, b in bounds]
    states = []
    for a, b in bounds:
        labels, scores = propagation.empty_state(b - a, m)
        sel = (seed_ids >= a) & (seed_ids < b)
        propagation.clamp(labels, scores, seed_ids[sel] - a, seed_codes[sel])
        states.append((labels, scores))
    reqs = [matrix.row_requests(blk, np.asarray(starts)) for blk in blocks]
    history = []
    for _ in range(n_iter):
        new = []
        for p, (a, b) in enumerate(bounds):
            ids = np.concatenate(reqs[p])
            labels = np.concatenate([states[q][0][r - starts[q]] for q, r in enumerate(reqs[p])])
            scores = np.concatenate([states[q][1][r - starts[q]] for q, r in enumerate(reqs[p])])
            lab, sco = propagation.diffuse(blocks[p], ids, labels, scores, n_classes, m)
            sel = (seed_ids >= a) & (seed_ids < b)
            propagation.clamp(lab, sco, seed_ids[sel] - a, seed_codes[sel])
            new.append((lab, sco))
        states = new
        history.append(dense_F(states, n, n_classes))
    return states, history


def dense_reference(W, seed_ids, seed_codes, n_classes, n_iter):
    s = W.sum(1, keepdims=True)
    P = np.where(s > 0, W / np.where(s > 0, s, 1), 0)
    Y = np.zeros((len(W), n_classes))
    Y[seed_ids, seed_codes] = 1
    F, history = Y.copy(), []
    for _ in range(n_iter):
        F = P @ F
        F[seed_ids] = Y[seed_ids]
        history.append(F.copy())
    return history


def harmonic_solution(W, seed_ids, seed_codes, n_classes):
    """Fixed point by a direct solve on the seeded components; 0 elsewhere."""
    n = len(W)
    s = W.sum(1, keepdims=True)
    P = np.where(s > 0, W / np.where(s > 0, s, 1), 0)
    _, comp = connected_components(sp.csr_matrix(W), directed=False)
    seeded = np.isin(comp, comp[seed_ids])
    U = np.flatnonzero(seeded & ~np.isin(np.arange(n), seed_ids))
    Y = np.zeros((n, n_classes))
    Y[seed_ids, seed_codes] = 1
    F = Y.copy()
    F[U] = scipy.linalg.solve(np.eye(len(U)) - P[np.ix_(U, U)], P[np.ix_(U, seed_ids)] @ Y[seed_ids])
    return F, seeded


# ---------------------------------------------------------------- small kernels


def test_node_keys_uniform_deterministic_and_partition_free():
    ids = np.arange(20000, dtype=np.int64) * 7 + 3
    k = propagation.node_keys(ids, seed=5)
    assert k.dtype == np.float64 and ((k >= 0) & (k < 1)).all()
    np.testing.assert_array_equal(propagation.node_keys(ids[123:4567], 5), k[123:4567])
    np.testing.assert_array_equal(propagation.node_keys(ids, 5), k)
    assert (propagation.node_keys(ids, 6) != k).mean() > 0.99
    assert kstest(k, "uniform").pvalue > 1e-3
    assert len(np.unique(k)) == len(k)


def test_clamp_resets_seed_rows_to_one_hot():
    labels = np.array([[2, 1], [0, 3], [1, -1]], np.int32)
    scores = np.array([[0.6, 0.4], [0.9, 0.1], [0.3, 0.0]], np.float32)
    propagation.clamp(labels, scores, np.array([0, 2]), np.array([3, 0], np.int32))
    np.testing.assert_array_equal(labels, [[3, -1], [0, 3], [0, -1]])
    np.testing.assert_array_equal(scores, np.float32([[1, 0], [0.9, 0.1], [1, 0]]))


def test_top_m_hand_worked_ties_by_smaller_label():
    rows = np.array([0, 0, 0, 1, 1, 2])
    codes = np.array([3, 1, 2, 0, 5, 4])
    vals = np.array([0.2, 0.5, 0.5, 0.1, 0.0, -1.0])
    labels, scores = propagation.top_m(rows, codes, vals, 4, 2)
    np.testing.assert_array_equal(labels, [[1, 2], [0, -1], [-1, -1], [-1, -1]])
    np.testing.assert_array_equal(scores, np.float32([[0.5, 0.5], [0.1, 0], [0, 0], [0, 0]]))
    assert labels.dtype == np.int32 and scores.dtype == np.float32


def test_top_m_random_against_python_sort():
    rng = np.random.default_rng(2)
    n, C, m = 40, 9, 3
    pairs = {(int(r), int(c)) for r, c in zip(rng.integers(0, n, 200), rng.integers(0, C, 200))}
    rows, codes = (np.array(v) for v in zip(*sorted(pairs)))
    vals = rng.choice([0.25, 0.5, 0.75, 1.0], len(rows))  # many ties
    perm = rng.permutation(len(rows))
    labels, scores = propagation.top_m(rows[perm], codes[perm], vals[perm], n, m)
    for i in range(n):
        got = sorted(((-v, c) for r, c, v in zip(rows, codes, vals) if r == i))[:m]
        exp_l = [c for _, c in got] + [-1] * (m - len(got))
        exp_s = [-v for v, _ in got] + [0.0] * (m - len(got))
        np.testing.assert_array_equal(labels[i], exp_l)
        np.testing.assert_array_equal(scores[i], np.float32(exp_s))


def test_predict_hand_worked():
    labels = np.array([[2, 0], [-1, -1], [1, -1]], np.int32)
    scores = np.array([[0.6, 0.2], [0.0, 0.0], [0.5, 0.0]], np.float32)
    code, share = propagation.predict(labels, scores)
    np.testing.assert_array_equal(code, [2, -1, 1])
    np.testing.assert_allclose(share, [0.75, 0.0, 1.0], rtol=1e-6)
    assert code.dtype == np.int32 and share.dtype == np.float32


# ---------------------------------------------------------------- diffusion


@pytest.mark.parametrize("starts", [[0], [0, 9, 17], [0, 1, 13, 25]])
def test_diffusion_steps_match_dense_reference(starts):
    W, seed_ids, seed_codes, _ = seeded_graph()
    n_iter = 12
    _, got = run_kernels(W, seed_ids, seed_codes, N_CLASSES, N_CLASSES, starts, n_iter)
    ref = dense_reference(W, seed_ids, seed_codes, N_CLASSES, n_iter)
    for it in range(n_iter):
        np.testing.assert_allclose(got[it], ref[it], rtol=1e-5, atol=1e-6,
                                   err_msg=f"iteration {it}")


def test_converges_to_harmonic_solution_and_unseeded_nodes_get_no_label():
    W, seed_ids, seed_codes, perm = seeded_graph()
    states, hist = run_kernels(W, seed_ids, seed_codes, N_CLASSES, N_CLASSES, [0, 9, 17], 300)
    F_ref, seeded = harmonic_solution(W, seed_ids, seed_codes, N_CLASSES)
    np.testing.assert_allclose(hist[-1], F_ref, atol=1e-5)
    code, share = propagation.predict(np.concatenate([s[0] for s in states]),
                                      np.concatenate([s[1] for s in states]))
    # unseeded component (old 18..22) and unseeded isolated nodes (old 24, 25): no label
    unseeded = perm[np.r_[18:23, 24, 25]]
    assert not seeded[unseeded].any() and seeded.sum() == len(W) - len(unseeded)
    np.testing.assert_array_equal(code[unseeded], -1)
    np.testing.assert_array_equal(share[unseeded], 0.0)
    # everything else: argmax of the harmonic solution, share = max / sum
    s = F_ref[seeded]
    top2 = np.sort(s, 1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] > 1e-3).all(), "reference has near-ties: pick another seed"
    np.testing.assert_array_equal(code[seeded], s.argmax(1))
    np.testing.assert_allclose(share[seeded], s.max(1) / s.sum(1), atol=1e-5)
    # an isolated seed keeps its label with share 1
    assert code[perm[23]] == 3 and share[perm[23]] == 1.0


def test_one_part_equals_three_parts_with_truncated_state():
    W, seed_ids, seed_codes, _ = seeded_graph()
    s1, h1 = run_kernels(W, seed_ids, seed_codes, N_CLASSES, 2, [0], 25)
    s3, h3 = run_kernels(W, seed_ids, seed_codes, N_CLASSES, 2, [0, 9, 17], 25)
    np.testing.assert_array_equal(np.concatenate([s[0] for s in s1]),
                                  np.concatenate([s[0] for s in s3]))
    np.testing.assert_allclose(h1[-1], h3[-1], rtol=1e-6, atol=0)


def test_diffuse_with_m_below_class_count_keeps_top_m_of_the_product():
    W, seed_ids, seed_codes, _ = seeded_graph(seed=4)
    m = 2
    states, hist = run_kernels(W, seed_ids, seed_codes, N_CLASSES, m, [0], 6)
    F = hist[-1]  # the truncated state, dense
    assert ((F > 0).sum(1) <= m).all()
    P = matrix.normalize_rows_sum(sp.csr_matrix(W))
    lab, sco = propagation.diffuse(P, np.arange(len(W)), states[0][0], states[0][1],
                                   N_CLASSES, m)
    G = P.toarray() @ F
    for i in range(len(W)):
        order = sorted((-G[i, c], c) for c in range(N_CLASSES) if G[i, c] > 0)[:m]
        exp_l = [c for _, c in order] + [-1] * (m - len(order))
        np.testing.assert_array_equal(lab[i], exp_l, err_msg=f"row {i}")
        np.testing.assert_allclose(sco[i], [-v for v, _ in order] + [0] * (m - len(order)),
                                   rtol=1e-6)
    assert ((G > 0).sum(1) > m).any(), "the graph never needs truncation: test is vacuous"
