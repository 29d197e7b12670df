"""Numba kernel of the codec lanes' attention step (``models/baseline.py``, ``CausalSelfAttention.step_lanes``).

One query position per lane over the lane's held keys: for lane b, key/value head h and each of the g query
heads that share it, ``out = softmax(scale * q . K) V``. Written as loops because torch ran it as 2 x B x Hkv
tiny matrix products per layer (about 0.3-0.5 ms each call at 64 lanes, most of it per-product set-up). Keys
are stored transposed (``[hd, capacity]`` per lane and head) so that the score loop runs over keys innermost
and the value loop over the head dimension innermost: both vectorize with one accumulator per lane of the
vector, in a fixed order (no fastmath), so the floats are the same on every call with the same inputs. The
softmax's exponentials are ``approx.exp_rows``'s (float64, about 3e-13 relative; libm's expf per key cost
more than the two products). Measured at 64 lanes, 128 keys: 0.48 ms a layer against torch's 0.57-1.7 ms;
the whole step 158-164 against 217-229 us a token.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .approx import EXP_MIN, exp_rows
from .sums import max8


@njit(cache=True, inline="always")
def exp_scores(scores, weights, ints):
    """weights[i] = exp(scores[i] - max(scores)) for i < len(weights) (float64, ``exp_rows``; ints: its
    scratch); returns their sum, the softmax's denominator."""
    n_keys = weights.shape[0]
    top = max8(scores[:n_keys])
    for i in range(n_keys):
        weights[i] = max(np.float64(scores[i] - top), EXP_MIN)
    exp_rows(weights, ints)
    total = 0.0
    for i in range(n_keys):
        total += weights[i]
    return total


@njit(cache=True)
def lane_attention(q, keys_t, values, n_keys, scale, out):
    """q float32[B, Hkv, G, D]; keys_t float32[B, Hkv, D, C] (keys 0..n_keys-1 used); values float32[B, Hkv, C, D];
    writes out float32[B, Hkv, G, D]."""
    n_lanes, n_heads, group, dim = q.shape
    scale32 = np.float32(scale)  # float32 throughout: a float64 factor would widen the score loop
    scores = np.empty(n_keys, np.float32)
    weights = np.empty(n_keys)  # float64: exp_rows' vectorized exp (libm's expf per key cost more than the sums)
    ints = np.empty(n_keys, np.int64)
    acc = np.empty(dim, np.float32)
    for b in range(n_lanes):
        for h in range(n_heads):
            kt = keys_t[b, h]
            vs = values[b, h]
            for g in range(group):
                qv = q[b, h, g]
                scores[:] = 0.0
                for d in range(dim):
                    qd = qv[d] * scale32
                    row = kt[d]
                    for i in range(n_keys):
                        scores[i] += qd * row[i]
                total = exp_scores(scores, weights, ints)
                acc[:] = 0.0
                for i in range(n_keys):
                    weight = np.float32(weights[i] / total)
                    v = vs[i]
                    for d in range(dim):
                        acc[d] += weight * v[d]
                out[b, h, g] = acc
