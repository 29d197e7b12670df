"""Small helpers shared by the unigram and n-gram kernels."""

from __future__ import annotations

import numpy as np
from numba import njit


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
