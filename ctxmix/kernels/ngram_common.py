"""Arithmetic shared by the unigram and n-gram kernels: one interpolation step, entropy.

Every path (target only, full rows, stepwise) calls these same functions with the same inputs, so the
paths agree float for float: rule 4 holds by construction, and the tests check it.

The interpolation step (hierarchical Pitman-Yor / interpolated absolute discounting), for one context of
order k with N = sum of its stored continuation counts c(v) and D = how many of them are > 0:

    p_k(v) = (c(v) - d * [c(v) > 0] + (beta + d * D) * p_{k-1}(v)) / (N + beta)

It sums to 1 exactly whenever p_{k-1} does (sum_v c(v) = N, d is taken D times, given back D times),
and it is > 0 wherever p_{k-1} is, provided 0 <= d < 1 and beta + d > 0 (so the escape mass is > 0).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def escape_terms(total, distinct, discount, strength):
    """``(escape, denom)`` for a context with N = ``total``, D = ``distinct`` (N > 0)."""
    return strength + discount * distinct, total + strength


@njit(cache=True)
def interpolate(count, p_lower, discount, escape, denom):
    """One token's p_k from its count c_k (>= 0) and p_{k-1}; see the module docstring."""
    kept = count - discount if count > 0 else 0.0
    return (kept + escape * p_lower) / denom


@njit(cache=True)
def entropy_nats(p):
    """Entropy (nats) of one distribution float64[V] (every entry > 0)."""
    h = 0.0
    for v in range(p.shape[0]):
        h -= p[v] * np.log(p[v])
    return h


@njit(cache=True)
def entropy_rows(p):
    """Entropy (nats) of each row of float64[T, V] -> float64[T]."""
    out = np.empty(p.shape[0])
    for t in range(p.shape[0]):
        out[t] = entropy_nats(p[t])
    return out
