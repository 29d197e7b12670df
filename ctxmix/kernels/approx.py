"""exp and log of whole rows, accurate to about 3e-13 relative and several times faster than ``math``'s.

numba compiles ``math.exp``/``math.log`` to one libm call per value; these loops are plain arithmetic on
floats and integer views of them, which LLVM vectorizes (measured on this project's machine, per 1,024
values: exp 1.0 against 5.2 microseconds, log 1.9 against 4.6). They are used where a mixer defines its
own arithmetic (``kernels/cm.py``); they are IEEE operations only, so every machine computes the same
floats, and both paths of a mixer (chunked and stepwise) call them alike.

    exp(x) = 2**k exp(r),  k = round(x / ln 2),  |r| <= ln(2) / 2,  exp(r) by its Taylor series to r**10
    log(p) = e ln 2 + log(m),  p = m 2**e with m in [sqrt(1/2), sqrt(2)),
             log(m) = 2 atanh(s) = 2 (s + s**3/3 + ... + s**13/13),  s = (m - 1) / (m + 1)
"""

from __future__ import annotations

import numpy as np
from numba import njit

LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634
LN2_HI = 0.6931471803691238  # LN2 split in two so that k * LN2_HI is exact for |k| < 2**20
LN2_LO = 1.9082149292705877e-10
EXP_MIN = -708.0  # exp_rows' domain: [EXP_MIN, 0]; 2**k stays a normal float64
MANTISSA = 0xFFFFFFFFFFFFF  # the 52 mantissa bits of a float64
HALF_BITS = 0x3FE0000000000000  # the exponent bits of 0.5
SQRT_HALF = 0.7071067811865476


@njit(cache=True, error_model="numpy")
def exp_rows(z, scratch):
    """z[:] = exp(z) in place for every z in [EXP_MIN, 0] (the caller floors its exponents there).
    ``scratch``: int64[>= len(z)], overwritten."""
    n = z.shape[0]
    for v in range(n):
        x = z[v]
        k = np.floor(x * LOG2E + 0.5)
        r = x - k * LN2_HI - k * LN2_LO
        z[v] = 1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (
            1.0 / 720 + r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880 + r * (1.0 / 3628800))))))))))
        scratch[v] = np.int64(k)
    bits = z.view(np.int64)  # exp(r) is within [0.7, 1.42]: adding k to its exponent field multiplies by 2**k
    for v in range(n):
        bits[v] += scratch[v] << 52


@njit(cache=True, error_model="numpy")
def log_rows(p, out):
    """out[:] = log(p) for every p in (0, 1] (finite for any p > 0; below 2**-1022 only approximate)."""
    n = p.shape[0]
    bits = p.view(np.int64)
    mantissa = out.view(np.int64)
    for v in range(n):  # m = p's mantissa scaled into [0.5, 1)
        mantissa[v] = (bits[v] & MANTISSA) | HALF_BITS
    for v in range(n):
        exponent = ((bits[v] >> 52) & 0x7FF) - 1022
        m = out[v]
        low = m < SQRT_HALF
        m = 2.0 * m if low else m
        e = exponent - 1.0 if low else exponent * 1.0
        s = (m - 1.0) / (m + 1.0)
        s2 = s * s
        out[v] = e * LN2 + 2.0 * s * (1.0 + s2 * (1.0 / 3 + s2 * (1.0 / 5 + s2 * (1.0 / 7 + s2 * (
            1.0 / 9 + s2 * (1.0 / 11 + s2 * (1.0 / 13)))))))


# float32 forms (cm's lanes from lane state 5, ``kernels/cm_float32.py``): half the bytes a value, twice the
# values a vector instruction, and shorter series for float32's 24 bits. IEEE float32 operations only, so
# every machine computes the same floats, as above.
LOG2E_32 = np.float32(LOG2E)
LN2_32 = np.float32(LN2)
LN2_HI_32 = np.float32(0.693359375)  # 9 significant bits: k * LN2_HI_32 is exact for |k| < 2**15
LN2_LO_32 = np.float32(LN2 - 0.693359375)
EXP_MIN_32 = np.float32(-80.0)  # exp_rows32's domain: [EXP_MIN_32, 0]; exp(-80) ~ 1.8e-35 is a normal float32
HALF_32 = np.float32(0.5)
ONE_32 = np.float32(1.0)
TWO_32 = np.float32(2.0)
SQRT_HALF_32 = np.float32(SQRT_HALF)
MANTISSA_32 = 0x7FFFFF  # the 23 mantissa bits of a float32
P_MIN_32 = 2.0 ** -120  # log_rows32's floor: a normal float32, whose log is finite
HALF_BITS_32 = 0x3F000000  # the exponent bits of float32 0.5
C2, C3, C4, C5, C6 = (np.float32(1.0 / f) for f in (2, 6, 24, 120, 720))
S3, S5, S7 = (np.float32(1.0 / f) for f in (3, 5, 7))


@njit(cache=True, error_model="numpy")
def exp_rows32(z, scratch):
    """z[:] = exp(z) in place, float32, for every z in [EXP_MIN_32, 0] (the caller floors its exponents there),
    to about 2e-7 relative: exp(r) by its Taylor series to r**6 (|r| <= ln(2) / 2). ``scratch``: int32[>= len(z)],
    overwritten."""
    n = z.shape[0]
    for v in range(n):
        x = z[v]
        k = np.floor(x * LOG2E_32 + HALF_32)
        r = (x - k * LN2_HI_32) - k * LN2_LO_32
        z[v] = ONE_32 + r * (ONE_32 + r * (C2 + r * (C3 + r * (C4 + r * (C5 + r * C6)))))
        scratch[v] = np.int32(k)
    bits = z.view(np.int32)  # exp(r) is within [0.7, 1.42]: adding k to its exponent field multiplies by 2**k
    for v in range(n):
        bits[v] += scratch[v] << 23


@njit(cache=True, error_model="numpy")
def log_rows32(p, out, scratch):
    """out[:] = log(p) in float32 for every float64 p in (0, 1], to about 2e-7 relative; p is first rounded to
    float32 and floored at P_MIN_32 (so p's below 2**-120 all give log(2**-120), about -83.2). Then the series
    of ``log_rows`` to s**7. ``scratch``: int32[>= len(p)], overwritten."""
    n = p.shape[0]
    for v in range(n):
        out[v] = np.float32(max(p[v], P_MIN_32))
    bits = out.view(np.int32)
    for v in range(n):  # exponent aside, m = the mantissa scaled into [0.5, 1)
        b = bits[v]
        scratch[v] = ((b >> 23) & 0xFF) - 126
        bits[v] = (b & MANTISSA_32) | HALF_BITS_32
    for v in range(n):
        m = out[v]
        low = m < SQRT_HALF_32
        m = TWO_32 * m if low else m
        e = np.float32(scratch[v])
        e = e - ONE_32 if low else e
        s = (m - ONE_32) / (m + ONE_32)
        s2 = s * s
        out[v] = e * LN2_32 + TWO_32 * s * (ONE_32 + s2 * (S3 + s2 * (S5 + s2 * S7)))
