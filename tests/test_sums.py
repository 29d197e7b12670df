"""The fixed-order reductions (``kernels/sums.py``): the vector forms give the scalar forms' floats, bit for
bit, for every length around the vector's eight lanes, float32 and float64, sums widened or not; rows that
are not C-contiguous take the scalar forms; and the scalar forms are the stated arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from ctxmix.kernels.sums import _absmax8_scalar, _dot8_scalar, _max8_scalar, _sum8_scalar, absmax8, dot8, max8, sum8

LENGTHS = [0, 1, 7, 8, 9, 15, 16, 17, 64, 100, 1023, 1024, 1031]

scalar_dot8, scalar_sum8 = njit(_dot8_scalar), njit(_sum8_scalar)
scalar_max8, scalar_absmax8 = njit(_max8_scalar), njit(_absmax8_scalar)


@njit
def _reductions(x, y, zero):
    return dot8(x, y, zero), sum8(x, zero)


@njit
def _maxima(row, zero):
    return max8(row), absmax8(row, zero)


def _row(gen, n, dtype):
    """Values over 14 decades, both signs: any change of order would change the sums' roundings."""
    return (gen.standard_normal(n) * 10.0 ** gen.integers(-7, 7, n)).astype(dtype)


@pytest.mark.parametrize("dtype, zero", [(np.float32, np.float32(0)), (np.float32, 0.0), (np.float64, 0.0)])
def test_vector_sums_are_the_scalar_partial_sums_bit_for_bit(dtype, zero):
    gen = np.random.default_rng(0)
    for n in LENGTHS:
        x, y = _row(gen, n, dtype), _row(gen, n, dtype)
        got_dot, got_sum = _reductions(x, y, zero)
        want_dot, want_sum = scalar_dot8(x, y, zero), scalar_sum8(x, zero)
        assert type(got_dot) is type(want_dot) and type(got_sum) is type(want_sum)
        assert got_dot == want_dot and got_sum == want_sum, n
    # the scalar form is the stated order: eight partials over columns mod 8, the tail into the first, pairwise
    x = _row(gen, 1031, dtype)
    widen = np.float32 if isinstance(zero, np.float32) else np.float64  # (the sums' type)
    parts = [widen(0)] * 8
    for i in range(1024):
        parts[i % 8] += widen(x[i])
    for i in range(1024, 1031):
        parts[0] += widen(x[i])
    assert _reductions(x, x, zero)[1] == (
        ((parts[0] + parts[1]) + (parts[2] + parts[3])) + ((parts[4] + parts[5]) + (parts[6] + parts[7])))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vector_maxima_are_the_running_maxima(dtype):
    gen = np.random.default_rng(1)
    for n in LENGTHS[1:]:
        row = _row(gen, n, dtype)
        for place in {0, n // 2, n - 1}:  # the largest magnitude first, in the middle, last; negative or not
            for sign in (1, -1):
                probe = row.copy()
                probe[place] = sign * (np.abs(row).max() * 2)
                top, magnitude = _maxima(probe, dtype(0))
                assert top == probe.max() and magnitude == np.abs(probe).max()
                if n >= 8:
                    assert top == scalar_max8(probe) and magnitude == scalar_absmax8(probe, dtype(0))


def test_rows_that_are_not_contiguous_take_the_scalar_forms():
    gen = np.random.default_rng(2)
    wide = _row(gen, 2 * 1031, np.float32)
    x, y = wide[::2], wide[1::2]  # strided views: no vector loads
    assert _reductions(x, y, 0.0) == (scalar_dot8(x, y, 0.0), scalar_sum8(x, 0.0))
    assert _maxima(x, np.float32(0)) == (x.max(), np.abs(x).max())
    with pytest.raises(TypeError, match="inside numba kernels"):
        dot8(x, y, 0.0)
