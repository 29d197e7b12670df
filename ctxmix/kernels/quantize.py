"""Numba kernel of the codec's lanes: check a step's rows and quantize them for the coder.

The check (``codec.check_distribution``'s, row by row) and ``codec.quantize`` in numpy took 43 us a group of
30 lanes (nine array passes and their temporaries, holding the GIL); this kernel gives the same check and
the same integers in three passes over each row, without the GIL, in 27 us.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def _sum_min_max(row):
    """(sum, min, max) of a row, each in 4 running parts (four dependency chains side by side; the sum's order
    is not the format's: it only checks normalization, and a NaN anywhere makes it NaN)."""
    n = row.shape[0]
    s0 = s1 = s2 = s3 = 0.0
    a0 = a1 = a2 = a3 = np.inf
    b0 = b1 = b2 = b3 = -np.inf
    full = n - n % 4
    for i in range(0, full, 4):
        x0, x1, x2, x3 = row[i], row[i + 1], row[i + 2], row[i + 3]
        s0, s1, s2, s3 = s0 + x0, s1 + x1, s2 + x2, s3 + x3
        a0, a1, a2, a3 = min(a0, x0), min(a1, x1), min(a2, x2), min(a3, x3)
        b0, b1, b2, b3 = max(b0, x0), max(b1, x1), max(b2, x2), max(b3, x3)
    total, low, top = (s0 + s1) + (s2 + s3), min(min(a0, a1), min(a2, a3)), max(max(b0, b1), max(b2, b3))
    for i in range(full, n):
        total += row[i]
        low, top = min(low, row[i]), max(top, row[i])
    return total, low, top


@njit(cache=True, nogil=True)
def quantize_checked_rows(p, free, tol, w):
    """w float64[R, V] = ``codec.quantize`` of each row of p float64[R, V] (floor(p * free), the left-over
    units to the row's first most probable token: exact integers, so the same floats as numpy's in any
    order), for rows that are distributions (every p > 0, sum within ``tol`` of 1; NaN fails the sum).
    Returns the first row that is not, or -1 when all are (w is then complete)."""
    n_rows, vocab = p.shape
    for r in range(n_rows):
        row = p[r]
        total, low, top = _sum_min_max(row)
        if not (low > 0.0 and abs(total - 1.0) <= tol):
            return r
        first = 0
        while row[first] != top:
            first += 1
        out = w[r]
        u0 = u1 = u2 = u3 = 0.0  # exact integer sums: any order gives the same
        full = vocab - vocab % 4
        for i in range(0, full, 4):
            f0, f1 = np.floor(row[i] * free), np.floor(row[i + 1] * free)
            f2, f3 = np.floor(row[i + 2] * free), np.floor(row[i + 3] * free)
            out[i], out[i + 1], out[i + 2], out[i + 3] = f0, f1, f2, f3
            u0, u1, u2, u3 = u0 + f0, u1 + f1, u2 + f2, u3 + f3
        units = (u0 + u1) + (u2 + u3)
        for i in range(full, vocab):
            out[i] = np.floor(row[i] * free)
            units += out[i]
        out[first] += free - units
    return -1
