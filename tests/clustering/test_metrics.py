"""clustering/metrics.py: tables counted per part and added must give scikit-learn's NMI/ARI
on the whole arrays (to 1e-12) and the numpy purity, for integer, string and mixed labels."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from vecgraph.clustering import metrics

TOL = 1e-12


def ref_purity(true, pred) -> float:
    true, pred = list(true), list(pred)
    total = 0
    for c in set(pred):
        members = [t for t, p in zip(true, pred) if p == c]
        total += Counter(members).most_common(1)[0][1]
    return total / len(true)


def split(a, cuts):
    return [a[x:y] for x, y in itertools.pairwise(cuts)]


def labelled(kind: str, n: int, seed: int):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 5, n)
    pred = np.where(rng.random(n) < 0.7, true, rng.integers(0, 7, n))  # correlated
    names = np.array(["cat", "dog", "emu", "yak", "gnu", "ox", "bee"])
    if kind == "int":
        return true, pred
    if kind == "str":
        return names[true], np.char.add("c", pred.astype(str))
    if kind == "object":  # as pyarrow gives string columns: an object array of str
        return (pa.array(names[true].tolist()).to_numpy(zero_copy_only=False),
                pa.array(pred).to_numpy())
    return names[true], pred.astype(np.int32)  # mixed: string truth, int32 clusters


@pytest.mark.parametrize("kind", ["int", "str", "object", "mixed"])
@pytest.mark.parametrize("seed", [0, 1])
def test_parts_added_equal_sklearn_on_whole_arrays(kind, seed):
    true, pred = labelled(kind, 500, seed)
    cuts = [0, 0, 1, 130, 131, 377, 500]  # an empty part, single-row parts
    tables = [metrics.contingency(t, p) for t, p in zip(split(true, cuts), split(pred, cuts))]
    table = metrics.add_counts(tables)
    assert table == metrics.contingency(true, pred)
    assert table == dict(Counter(zip(true.tolist(), pred.tolist())))
    assert sum(table.values()) == len(true)
    assert metrics.nmi(table) == pytest.approx(normalized_mutual_info_score(true, pred), abs=TOL)
    assert metrics.ari(table) == pytest.approx(adjusted_rand_score(true, pred), abs=TOL)
    assert metrics.purity(table) == pytest.approx(ref_purity(true, pred), abs=TOL)


def test_contingency_keys_are_plain_python_values():
    table = metrics.contingency(np.array(["b", "a", "b"]), np.array([1, 2, 1], np.int32))
    assert table == {("a", 2): 1, ("b", 1): 2}
    for a, b in table:
        assert type(a) is str and type(b) is int
    assert metrics.contingency(np.array([]), np.array([])) == {}


@pytest.mark.parametrize("true,pred", [
    ([0, 0, 1, 1, 2, 2], [5, 5, 3, 3, 9, 9]),        # same partition, renamed
    ([0, 0, 0, 0], [1, 1, 1, 1]),                    # one cluster both sides
    ([0, 0, 0, 0], [1, 2, 3, 4]),                    # one true class, all singletons
    ([0, 1, 2, 3], [7, 7, 7, 7]),                    # all singletons, one cluster
    (["x", "y", "x", "y"], ["a", "a", "b", "b"]),    # independent: MI = 0
    ([1], [2]),                                      # a single node
])
def test_edge_cases_equal_sklearn(true, pred):
    table = metrics.contingency(np.array(true), np.array(pred))
    assert metrics.nmi(table) == pytest.approx(normalized_mutual_info_score(true, pred), abs=TOL)
    assert metrics.ari(table) == pytest.approx(adjusted_rand_score(true, pred), abs=TOL)
    assert metrics.purity(table) == pytest.approx(ref_purity(true, pred), abs=TOL)


def test_purity_hand_worked():
    # clusters: A = {x, x, y}, B = {y, z}, C = {z}: majority counts 2 + 1 + 1 of 6
    true = ["x", "x", "y", "y", "z", "z"]
    pred = ["A", "A", "A", "B", "B", "C"]
    assert metrics.purity(metrics.contingency(np.array(true), np.array(pred))) == pytest.approx(
        4 / 6, abs=TOL)
    assert metrics.purity({}) == 0.0
