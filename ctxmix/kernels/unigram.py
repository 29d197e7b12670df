"""Adaptive add-alpha unigram: p(v) = (c(v) + alpha) / (n + alpha * V), counts of the tokens seen so far.

State: ``counts`` int64[V] and ``total`` int64[1] (n = sum of counts). Every p is > 0 for alpha > 0, and
the row sums to 1 by construction. The n-gram experts use it (alpha = 1/2) as the base of their chain.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .ngram_common import entropy_nats


@njit(cache=True)
def _fill_row(counts, total, alpha, row):
    """Write the current distribution into ``row`` float64[V] (reads state, changes nothing else)."""
    denom = total + alpha * counts.shape[0]
    for v in range(counts.shape[0]):
        row[v] = (counts[v] + alpha) / denom


@njit(cache=True)
def unigram_distribution(counts, total, alpha):
    """The distribution for the next position, float64[V]; state unchanged."""
    row = np.empty(counts.shape[0])
    _fill_row(counts, total[0], alpha, row)
    return row


@njit(cache=True)
def unigram_score_update(counts, total, tokens, increments, alpha, want_entropy):
    """Score ``tokens`` int64[T] in order, each before it is counted (by ``increments[t]``, 0 or 1: the
    n-gram expert's update exclusion counts only novel continuations; the unigram expert counts all).

    Returns ``(p, entropy)``: p float64[T] = p_t(tokens[t]); entropy float64[T] in nats (zeros unless
    ``want_entropy``). Mutates ``counts`` and ``total``.
    """
    n = tokens.shape[0]
    p = np.empty(n)
    entropy = np.zeros(n)
    row = np.empty(counts.shape[0] if want_entropy else 0)
    for t in range(n):
        token = tokens[t]
        # Same expression as _fill_row, so p[t] equals the full row's entry float for float.
        p[t] = (counts[token] + alpha) / (total[0] + alpha * counts.shape[0])
        if want_entropy:
            _fill_row(counts, total[0], alpha, row)
            entropy[t] = entropy_nats(row)
        counts[token] += increments[t]
        total[0] += increments[t]
    return p, entropy


@njit(cache=True)
def unigram_full_update(counts, total, tokens, increments, alpha):
    """Full distributions float64[T, V] for ``tokens`` int64[T], each row before its token is counted
    (by ``increments[t]``). Mutates ``counts`` and ``total``.
    """
    n = tokens.shape[0]
    rows = np.empty((n, counts.shape[0]))
    for t in range(n):
        _fill_row(counts, total[0], alpha, rows[t])
        counts[tokens[t]] += increments[t]
        total[0] += increments[t]
    return rows
