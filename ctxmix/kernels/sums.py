"""Reductions of a row in a fixed order that vectorizes.

One running sum in order waits on each add; a sum reordered by the compiler (fastmath) would give floats
that differ by machine. ``dot8`` keeps eight running partial sums, one per column modulo 8 (the tail added
to the first), then adds them pairwise: a fixed order, so every machine computes the same floats, that
LLVM keeps in a vector's lanes. A maximum is exact in any order, but LLVM keeps one running maximum in the
order written (each comparison waits on the last: some 4 cycles a value); ``max8`` and ``absmax8`` keep
eight, which vectorize, and return the value one running maximum would.
"""

from __future__ import annotations

from numba import njit


@njit(cache=True, nogil=True, inline="always")
def dot8(x, y, zero):
    """sum_i x[i] y[i] in eight partial sums added pairwise; ``zero`` (0 of the sums' type: float64, or
    float32 to sum in float32) starts them."""
    n = x.shape[0]
    p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = zero
    full = n - n % 8
    for i in range(0, full, 8):
        p0 += x[i] * y[i]
        p1 += x[i + 1] * y[i + 1]
        p2 += x[i + 2] * y[i + 2]
        p3 += x[i + 3] * y[i + 3]
        p4 += x[i + 4] * y[i + 4]
        p5 += x[i + 5] * y[i + 5]
        p6 += x[i + 6] * y[i + 6]
        p7 += x[i + 7] * y[i + 7]
    for i in range(full, n):
        p0 += x[i] * y[i]
    return ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))


@njit(cache=True, nogil=True, inline="always")
def sum8(x, zero):
    """sum_i x[i] in eight partial sums added pairwise (``dot8``'s order); ``zero``: 0 of the sums' type."""
    n = x.shape[0]
    p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = zero
    full = n - n % 8
    for i in range(0, full, 8):
        p0, p1, p2, p3 = p0 + x[i], p1 + x[i + 1], p2 + x[i + 2], p3 + x[i + 3]
        p4, p5, p6, p7 = p4 + x[i + 4], p5 + x[i + 5], p6 + x[i + 6], p7 + x[i + 7]
    for i in range(full, n):
        p0 += x[i]
    return ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))


@njit(cache=True, nogil=True, inline="always")
def max8(row):
    """row.max() in 8 running maxima."""
    n = row.shape[0]
    if n < 8:
        return row.max()
    m0, m1, m2, m3, m4, m5, m6, m7 = row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7]
    full = n - n % 8
    for i in range(8, full, 8):
        m0, m1, m2, m3 = max(m0, row[i]), max(m1, row[i + 1]), max(m2, row[i + 2]), max(m3, row[i + 3])
        m4, m5, m6, m7 = max(m4, row[i + 4]), max(m5, row[i + 5]), max(m6, row[i + 6]), max(m7, row[i + 7])
    top = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for i in range(full, n):
        top = max(top, row[i])
    return top


@njit(cache=True, nogil=True, inline="always")
def absmax8(row, zero):
    """max(zero, max_i |row[i]|) in 8 running maxima; ``zero``: 0 of the row's type."""
    n = row.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = zero
    full = n - n % 8
    for i in range(0, full, 8):
        m0, m1 = max(m0, abs(row[i])), max(m1, abs(row[i + 1]))
        m2, m3 = max(m2, abs(row[i + 2])), max(m3, abs(row[i + 3]))
        m4, m5 = max(m4, abs(row[i + 4])), max(m5, abs(row[i + 5]))
        m6, m7 = max(m6, abs(row[i + 6])), max(m7, abs(row[i + 7]))
    top = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for i in range(full, n):
        top = max(top, abs(row[i]))
    return top
