"""Clustering and labelling metrics from contingency counts, so parts can be counted apart.

`contingency(a, b)` counts (true, predicted) pairs of one part; counts of many parts add up,
and NMI/ARI are computed from the summed table (equal to scikit-learn's on the whole arrays).
"""
from __future__ import annotations

import numpy as np
from scipy.special import comb


def contingency(true: np.ndarray, pred: np.ndarray) -> dict[tuple, int]:
    """{(true value, predicted value): count} of paired labels (n,) each."""
    if len(true) == 0:
        return {}
    pairs = np.rec.fromarrays([np.asarray(true), np.asarray(pred)])
    values, counts = np.unique(pairs, return_counts=True)
    return {(_plain(v[0]), _plain(v[1])): int(c) for v, c in zip(values, counts)}


def _plain(v: object) -> object:
    """numpy scalar -> Python value; object-array fields (Arrow strings) already are one."""
    return v.item() if isinstance(v, np.generic) else v


def add_counts(tables: list[dict[tuple, int]]) -> dict[tuple, int]:
    total: dict[tuple, int] = {}
    for t in tables:
        for key, c in t.items():
            total[key] = total.get(key, 0) + c
    return total


def _matrix(table: dict[tuple, int]) -> np.ndarray:
    rows = {a: i for i, a in enumerate(sorted({a for a, _ in table}, key=repr))}
    cols = {b: j for j, b in enumerate(sorted({b for _, b in table}, key=repr))}
    m = np.zeros((len(rows), len(cols)), np.float64)
    for (a, b), c in table.items():
        m[rows[a], cols[b]] = c
    return m


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(table: dict[tuple, int]) -> float:
    """Normalised mutual information, arithmetic mean normalisation (scikit-learn's default)."""
    m = _matrix(table)
    n = m.sum()
    if n == 0:
        return 0.0
    a, b = m.sum(1), m.sum(0)
    ha, hb = _entropy(a), _entropy(b)
    if ha == 0 and hb == 0:
        return 1.0
    nz = m > 0
    mi = float((m[nz] / n * (np.log(m[nz] * n) - np.log(np.outer(a, b)[nz]))).sum())
    return float(max(mi, 0.0) / max((ha + hb) / 2, np.finfo(float).eps))


def ari(table: dict[tuple, int]) -> float:
    """Adjusted Rand index (Hubert & Arabie), as scikit-learn's adjusted_rand_score."""
    m = _matrix(table)
    n = m.sum()
    if n < 2:
        return 1.0
    sum_ij = comb(m, 2).sum()
    sum_a, sum_b = comb(m.sum(1), 2).sum(), comb(m.sum(0), 2).sum()
    expected = sum_a * sum_b / comb(n, 2)
    top = (sum_a + sum_b) / 2
    if top == expected:
        return 1.0
    return float((sum_ij - expected) / (top - expected))


def purity(table: dict[tuple, int]) -> float:
    """Fraction of nodes whose cluster's majority true label is their own."""
    m = _matrix(table)
    return float(m.max(0).sum() / m.sum()) if m.sum() else 0.0
