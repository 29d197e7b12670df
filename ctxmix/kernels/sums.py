"""A dot product in a fixed order that vectorizes.

One running sum in order waits on each add; a sum reordered by the compiler (fastmath) would give floats
that differ by machine. ``dot8`` keeps eight running partial sums, one per column modulo 8 (the tail added
to the first), then adds them pairwise: a fixed order, so every machine computes the same floats, that
LLVM keeps in a vector's lanes.
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
