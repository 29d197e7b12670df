"""Numba kernels of the lanes' integer neural step (``models/integer.py``, ``IntegerLaneStep``).

A block of the baseline family, one position of each of B lanes, is four integer matmuls (torch's
``_int_mm``) and the float work between them, which these kernels do in one call each instead of some
seventy small torch operations (their per-call overhead, not their arithmetic, was most of the step):

    mix_norm_quantize     x = mix0 * x + mix1 * x0; the int8 grid of rms_norm(x)            -> q/k/v matmul
    attention_quantize    q, k per-head rms_norm, RoPE, q gain; k, v into the lane cache;
                          one query per head over the held keys; the int8 grid of the output -> proj matmul
    residual_norm_quantize  x += attn_scale * out; the int8 grid of rms_norm(x)              -> fc matmul
    relu2_quantize        the int8 grid of relu(h)**2                                       -> proj matmul
    residual_add          x += mlp_scale * out

Every loop runs in a fixed order in float32 (sums of squares in 8 fixed partial sums, so they vectorize
without reassociation; no fastmath), so a kernel gives the same floats on every call with the same inputs,
and each lane's row depends on that lane's inputs only. A matmul's int32 sums come back as
``sums * row_scale * weight_scale``.

The codec's second thread runs these while the coding thread runs its own kernels, so the long ones
(attention, softcap) release the GIL. The short ones (a few microseconds at 30 lanes) keep it: a release
lets the other thread's Python run until its next release, often for longer than the kernel, before this
thread can go on (docs/benchmarks.md, "Fewer GIL hand-offs in the model step").
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .approx import EXP_MIN, EXP_MIN_32, exp_rows, exp_rows32
from .attention import exp_scores
from .fused import fma32
from .prefetch import prefetch_bytes
from .sums import absmax8, dot8, max8, sum8

LEVELS = np.float32(127.0)
TINY = np.float32(np.finfo(np.float32).tiny)
EPS = np.float32(np.finfo(np.float32).eps)  # F.rms_norm's default for float32
LINE_BYTES = 64  # a cache line


@njit(cache=True, nogil=True, inline="always")
def _prefetch_part(block, used_bytes, part, parts):
    """Prefetch part ``part`` of ``parts`` of the cache lines of ``block``'s first ``used_bytes`` bytes."""
    lines = (used_bytes + LINE_BYTES - 1) // LINE_BYTES
    for line in range(lines * part // parts, lines * (part + 1) // parts):
        prefetch_bytes(block, line * LINE_BYTES)


@njit(cache=True, nogil=True, inline="always")
def _rms_scale(row):
    """1 / sqrt(mean(row**2) + eps) in float32: the sum in 8 fixed partial sums (a vector's lanes: ``dot8``),
    so it vectorizes without being reordered."""
    n = row.shape[0]
    total = dot8(row, row, np.float32(0.0))
    return np.float32(1.0) / np.sqrt(total / np.float32(n) + EPS)


@njit(cache=True, nogil=True)
def _quantize(row, q):
    """q[:] = the int8 grid of row (127 levels of its largest magnitude); returns the grid's scale."""
    scale = max(absmax8(row, np.float32(0.0)), TINY) / LEVELS
    for i in range(row.shape[0]):
        q[i] = np.int8(np.round(row[i] / scale))
    return scale


@njit(cache=True, nogil=True)
def quantize_rows(x, q, scales):
    """q int8[R, K], scales float32[R]: each row's int8 grid (``_quantize``), which weights take too."""
    for r in range(x.shape[0]):
        scales[r] = _quantize(x[r], q[r])


@njit(cache=True, nogil=True)
def _norm_quantize(x, h, q):
    """The int8 grid of rms_norm(x) into q (h: float32 scratch of x's size); returns its scale."""
    inv = _rms_scale(x)
    for i in range(x.shape[0]):
        h[i] = x[i] * inv
    return _quantize(h, q)


@njit(cache=True)
def mix_norm_quantize(x, x0, mix, q, scales):
    """x float32[B, C] = mix[0] * x + mix[1] * x0 in place; q int8[B, C], scales float32[B]: rms_norm(x)'s grid."""
    n_lanes, dim = x.shape
    h = np.empty(dim, np.float32)
    for b in range(n_lanes):
        for i in range(dim):
            x[b, i] = mix[0, i] * x[b, i] + mix[1, i] * x0[b, i]
        scales[b] = _norm_quantize(x[b], h, q[b])


@njit(cache=True)
def residual_add(x, sums, row_scales, w_scales, gain):
    """x += gain * (sums * row_scales * w_scales) in place."""
    n_lanes, dim = x.shape
    for b in range(n_lanes):
        for i in range(dim):
            x[b, i] += gain[i] * (np.float32(sums[b, i]) * row_scales[b] * w_scales[i])


@njit(cache=True)
def residual_norm_quantize(x, sums, row_scales, w_scales, gain, q, scales):
    """``residual_add``, then q, scales: rms_norm(x)'s int8 grid."""
    residual_add(x, sums, row_scales, w_scales, gain)
    h = np.empty(x.shape[1], np.float32)
    for b in range(x.shape[0]):
        scales[b] = _norm_quantize(x[b], h, q[b])


@njit(cache=True)
def relu2_quantize(sums, row_scales, w_scales, q, scales):
    """q, scales: the int8 grid of relu(sums * row_scales * w_scales)**2."""
    n_lanes, dim = sums.shape
    h = np.empty(dim, np.float32)
    for b in range(n_lanes):
        for i in range(dim):
            v = max(np.float32(sums[b, i]) * row_scales[b] * w_scales[i], np.float32(0.0))
            h[i] = v * v
        scales[b] = _quantize(h, q[b])


@njit(cache=True)
def dequantize(sums, row_scales, w_scales, out):
    """out float32[B, N] += sums * row_scales * w_scales (one term of a product; out starts at zero)."""
    n_lanes, n = sums.shape
    for b in range(n_lanes):
        for i in range(n):
            out[b, i] += np.float32(sums[b, i]) * row_scales[b] * w_scales[i]


@njit(cache=True, nogil=True, inline="always")
def _add_scaled(x, a, y, n, fused):
    """y[i] += a * x[i] for i < n (float32; one vectorized pass); ``fused`` (lane version 7): each term fused,
    y[i] = fma(a, x[i], y[i]), one rounding where the plain form rounds the product and the sum."""
    if fused:
        for i in range(n):
            y[i] = fma32(a, np.float32(x[i]), y[i])
    else:
        for i in range(n):
            y[i] += a * x[i]


@njit(cache=True, nogil=True, inline="always")
def _add_scaled_twice(x, a0, y0, a1, y1, n, fused):
    """y0[i] += a0 * x[i] and y1[i] += a1 * x[i] for i < n: ``_add_scaled`` twice, with one load of x[i]."""
    if fused:
        for i in range(n):
            value = np.float32(x[i])
            y0[i] = fma32(a0, value, y0[i])
            y1[i] = fma32(a1, value, y1[i])
    else:
        for i in range(n):
            value = x[i]
            y0[i] += a0 * value
            y1[i] += a1 * value


@njit(cache=True, nogil=True, inline="always")
def _add_scaled4_twice(x0, x1, x2, x3, a0, a1, a2, a3, y0, b0, b1, b2, b3, y1, n, fused):
    """``_add_scaled_twice`` for four rows x0..x3 in turn (y0[i] += a0 * x0[i], then a1 * x1[i], ...; y1 with
    b0..b3): the same sums in the same order, with one load and store of y0[i] and y1[i] for four terms
    instead of one each; ``fused``: each term fused, in the same order (one instruction a term where the CPU
    has FMA)."""
    if fused:
        for i in range(n):
            v0, v1, v2, v3 = np.float32(x0[i]), np.float32(x1[i]), np.float32(x2[i]), np.float32(x3[i])
            y0[i] = fma32(a3, v3, fma32(a2, v2, fma32(a1, v1, fma32(a0, v0, y0[i]))))
            y1[i] = fma32(b3, v3, fma32(b2, v2, fma32(b1, v1, fma32(b0, v0, y1[i]))))
    else:
        for i in range(n):
            v0, v1, v2, v3 = np.float32(x0[i]), np.float32(x1[i]), np.float32(x2[i]), np.float32(x3[i])
            y0[i] = (((y0[i] + a0 * v0) + a1 * v1) + a2 * v2) + a3 * v3
            y1[i] = (((y1[i] + b0 * v0) + b1 * v1) + b2 * v2) + b3 * v3


@njit(cache=True, nogil=True, inline="always")
def _softmax32(s, ints, floor):
    """s float32[n] (a head's scores) -> its softmax weights in place, in float32 (lane version 7): the
    exponentials by ``exp_rows32`` (floored at exp(-80)), their sum in float64, each weight ``_weight(e /
    total, floor)``."""
    top = max8(s)
    for i in range(s.shape[0]):
        s[i] = max(s[i] - top, EXP_MIN_32)
    exp_rows32(s, ints)
    inv = np.float32(1.0 / sum8(s, 0.0))
    for i in range(s.shape[0]):
        s[i] = _weight(s[i] * inv, floor)


@njit(cache=True, nogil=True, inline="always")
def _weight(w, floor):
    """An attention weight as float32, 0 below ``floor`` (``attention_quantize``); a floor of 0 keeps every
    weight's float32 rounding."""
    return np.float32(w) if w >= floor else np.float32(0.0)


@njit(cache=True, nogil=True, inline="always")
def _softmax_pair(s0, s1, w0, w1, ints, floor):
    """s0, s1 float32[n] (two heads' scores) -> their softmax weights in place: ``exp_scores`` of each, then
    ``_weight(w / total, floor)``, the same floats, with the two heads' maxima and sums in one loop each (two
    dependency chains side by side instead of one after the other; the maxima from ``max8``). w0, w1: float64[n]
    scratch."""
    n = s0.shape[0]
    top0, top1 = max8(s0), max8(s1)
    for i in range(n):
        w0[i] = max(np.float64(s0[i] - top0), EXP_MIN)
        w1[i] = max(np.float64(s1[i] - top1), EXP_MIN)
    exp_rows(w0, ints)
    exp_rows(w1, ints)
    total0 = total1 = 0.0
    for i in range(n):
        total0 += w0[i]
        total1 += w1[i]
    for i in range(n):
        s0[i] = _weight(w0[i] / total0, floor)
        s1[i] = _weight(w1[i] / total1, floor)


@njit(cache=True, nogil=True)
def attention_quantize(qkv, row_scales, w_scales, n_heads, n_kv_heads, q_gain, cos, sin, keys_t, values, slot,
                       n_keys, scale, q, scales, key_scales=None, value_scales=None, floor=0.0, float32=False):
    """One position of each lane through attention, from the q/k/v matmul's sums to the int8 grid of its output.

    qkv int32[B, (H + 2 Hkv) D] (q heads, k heads, v heads); row_scales float32[B]; w_scales float32[...];
    q_gain float32[H]; cos, sin float32[D/2] (this position's angles); keys_t float32[B, Hkv, D, capacity]
    and values float32[B, Hkv, capacity, D] get the position at ``slot``, and attention reads slots
    0..n_keys-1; q int8[B, H D], scales float32[B] take the output's grid.

    With ``key_scales`` and ``value_scales`` float32[B, Hkv, capacity] (lane version 3), the cache holds each
    key and value on its int8 grid instead (keys_t, values int8; each head's row of D values has its scale):
    a quarter of the bytes to read, which is what bounds this kernel at many lanes. A score is then the sum
    over d of q's terms times the int8 key, times the key's scale; a value's weight takes the value's scale.
    A weight below ``floor`` is 0, as the softmax gives it and again once it takes its value's scale (lane
    version 6: ``models/integer.py``'s ATTENTION_FLOOR; 0 before, which keeps every weight).

    ``float32`` (lane version 7): each head's softmax in float32 (``_softmax32``, where the earlier versions
    take float64 exponentials), and every product of a query and a key, or of a weight and a value, fused
    with its sum (``fma32``), in the same order.

    While lane b works, lane b + 1's keys, values and scales are asked for (``prefetch_bytes``), spread over
    the score and value loops: a step's cache is some 16 MiB, read from beyond the core's own cache, and with
    the coding thread's tables streaming beside it, each lane's misses otherwise stall (docs/benchmarks.md)."""
    n_lanes = qkv.shape[0]
    dim = keys_t.shape[2]
    half = dim // 2
    group = n_heads // n_kv_heads
    heads = np.empty((n_heads + n_kv_heads, dim), np.float32)  # normed, rotated q and k heads
    value_row = np.empty(dim, np.float32)
    grid = np.empty(dim, np.int8)
    out = np.empty(n_heads * dim, np.float32)
    scores = np.empty((group, n_keys), np.float32)
    weights = np.empty((group, n_keys))  # float64 for exp_rows, as kernels/attention.py
    ints = np.empty(n_keys, np.int64)
    ints32 = np.empty(n_keys, np.int32)
    for b in range(n_lanes):
        ahead = min(b + 1, n_lanes - 1)  # the lane whose keys and values are asked for while this one works
        if key_scales is not None:
            _prefetch_part(key_scales[ahead], key_scales[ahead].nbytes, 0, 1)
            _prefetch_part(value_scales[ahead], value_scales[ahead].nbytes, 0, 1)
        rs = row_scales[b]
        for head in range(n_heads + n_kv_heads):
            row = heads[head]
            base = head * dim
            for d in range(dim):
                row[d] = np.float32(qkv[b, base + d]) * rs * w_scales[base + d]
            inv = _rms_scale(row)
            gain = q_gain[head] if head < n_heads else np.float32(1.0)
            for d in range(half):
                x1 = row[d] * inv
                x2 = row[d + half] * inv
                row[d] = (x1 * cos[d] + x2 * sin[d]) * gain
                row[d + half] = (x1 * (-sin[d]) + x2 * cos[d]) * gain
        v_base = (n_heads + n_kv_heads) * dim
        for h in range(n_kv_heads):
            for d in range(dim):
                value_row[d] = np.float32(qkv[b, v_base + h * dim + d]) * rs * w_scales[v_base + h * dim + d]
            if key_scales is None:
                for d in range(dim):
                    keys_t[b, h, d, slot] = heads[n_heads + h, d]
                    values[b, h, slot, d] = value_row[d]
            else:
                key_scales[b, h, slot] = _quantize(heads[n_heads + h], grid)
                for d in range(dim):
                    keys_t[b, h, d, slot] = grid[d]
                value_scales[b, h, slot] = _quantize(value_row, grid)
                for d in range(dim):
                    values[b, h, slot, d] = grid[d]
        for h in range(n_kv_heads):
            # the query heads that share this key/value head, two at a time: one load of each key or value
            # feeds both, and four keys' (or four d's) terms go into a sum per load and store of it; each sum
            # still runs over d, or over the keys, in order
            kt = keys_t[b, h]
            vs = values[b, h]
            kt_ahead, vs_ahead = keys_t[ahead, h], values[ahead, h]
            k_bytes, v_bytes = kt_ahead.nbytes, n_keys * dim * vs_ahead.itemsize
            first = h * group
            out[first * dim:(first + group) * dim] = 0.0
            for g in range(0, group, 2):
                pair = g + 1 < group
                s0 = scores[g]
                s1 = scores[g + 1] if pair else scores[g]
                h0 = heads[first + g]
                h1 = heads[first + g + 1] if pair else h0
                s0[:] = 0.0
                s1[:] = 0.0
                d = 0
                if pair:
                    for d in range(0, dim - 3, 4):
                        _prefetch_part(kt_ahead, k_bytes, d // 4, dim // 4)
                        # the two heads' scaled query terms of d..d+3
                        q00, q01, q02, q03 = h0[d] * scale, h0[d + 1] * scale, h0[d + 2] * scale, h0[d + 3] * scale
                        q10, q11, q12, q13 = h1[d] * scale, h1[d + 1] * scale, h1[d + 2] * scale, h1[d + 3] * scale
                        _add_scaled4_twice(kt[d], kt[d + 1], kt[d + 2], kt[d + 3], q00, q01, q02, q03, s0, q10, q11,
                                           q12, q13, s1, n_keys, float32)
                    d = dim - dim % 4
                for d in range(d, dim):
                    if pair:
                        _add_scaled_twice(kt[d], h0[d] * scale, s0, h1[d] * scale, s1, n_keys, float32)
                    else:
                        _add_scaled(kt[d], h0[d] * scale, s0, n_keys, float32)
                if key_scales is not None:
                    for i in range(n_keys):
                        s0[i] *= key_scales[b, h, i]
                        if pair:
                            s1[i] *= key_scales[b, h, i]
                if float32:
                    _softmax32(s0, ints32, floor)
                    if pair:
                        _softmax32(s1, ints32, floor)
                elif pair:
                    _softmax_pair(s0, s1, weights[g], weights[g + 1], ints, floor)
                else:
                    total = exp_scores(s0, weights[g], ints)
                    for i in range(n_keys):
                        s0[i] = _weight(weights[g, i] / total, floor)
                if value_scales is not None:  # a value's weight takes its scale
                    for i in range(n_keys):
                        s0[i] = _weight(s0[i] * value_scales[b, h, i], floor)
                        if pair:
                            s1[i] = _weight(s1[i] * value_scales[b, h, i], floor)
                a0 = out[(first + g) * dim:(first + g + 1) * dim]
                a1 = out[(first + g + 1) * dim:(first + g + 2) * dim] if pair else a0
                i = 0
                if pair:
                    for i in range(0, n_keys - 3, 4):
                        _prefetch_part(vs_ahead, v_bytes, i // 4, n_keys // 4)
                        _add_scaled4_twice(vs[i], vs[i + 1], vs[i + 2], vs[i + 3], s0[i], s0[i + 1], s0[i + 2],
                                           s0[i + 3], a0, s1[i], s1[i + 1], s1[i + 2], s1[i + 3], a1, dim, float32)
                    i = n_keys - n_keys % 4
                for i in range(i, n_keys):
                    if pair:
                        _add_scaled_twice(vs[i], s0[i], a0, s1[i], a1, dim, float32)
                    else:
                        _add_scaled(vs[i], s0[i], a0, dim, float32)
        scales[b] = _quantize(out, q[b])


@njit(cache=True, nogil=True)
def softcap(logits, cap, out):
    """out float64[B, V] = cap * tanh(logits / cap) for logits float32[B, V], tanh from ``exp_rows``
    (tanh(y) = sign(y) (1 - e) / (1 + e), e = exp(-2 |y|)): libm's tanhf per value cost 8 ns."""
    n_lanes, n = logits.shape
    ints = np.empty(n, np.int64)
    for b in range(n_lanes):
        row = out[b]
        for i in range(n):
            row[i] = max(-2.0 * abs(np.float64(logits[b, i]) / cap), EXP_MIN)
        exp_rows(row, ints)
        for i in range(n):
            t = cap * (1.0 - row[i]) / (1.0 + row[i])
            row[i] = t if logits[b, i] >= 0 else -t


@njit(cache=True, nogil=True)
def softcap32(logits, cap, out):
    """out float32[B, V] = cap * tanh(logits / cap) for logits float32[B, V], all in float32, tanh from
    ``exp_rows32`` (lane version 7: half the vector work of ``softcap``'s float64)."""
    n_lanes, n = logits.shape
    ints = np.empty(n, np.int32)
    cap32, one = np.float32(cap), np.float32(1.0)
    for b in range(n_lanes):
        row = out[b]
        for i in range(n):
            row[i] = max(np.float32(-2.0) * abs(logits[b, i] / cap32), EXP_MIN_32)
        exp_rows32(row, ints)
        for i in range(n):
            t = cap32 * (one - row[i]) / (one + row[i])
            row[i] = t if logits[b, i] >= 0 else -t


@njit(cache=True, nogil=True)
def softmax_rows32(logits, p, entropy):
    """``softmax_rows`` of float32 logits (lane version 7's head, ``softcap32``): the exponentials in float32
    (``exp_rows32``, floored at exp(-80), which soft-capped logits never reach), their sum and each p in
    float64, so each row sums to 1 in float64; entropy[B] in nats, its sum in 8 partial sums."""
    n_lanes, n = logits.shape
    ints = np.empty(n, np.int32)
    e = np.empty(n, np.float32)
    shifted = np.empty(n)
    for b in range(n_lanes):
        z = logits[b]
        row = p[b]
        top = max8(z)
        for i in range(n):
            e[i] = max(z[i] - top, EXP_MIN_32)
            shifted[i] = e[i]
        exp_rows32(e, ints)
        total = sum8(e, 0.0)
        inv = 1.0 / total
        for i in range(n):
            row[i] = e[i] * inv
        entropy[b] = np.log(total) - dot8(row, shifted, 0.0)  # log(total) - sum p (z - top)


@njit(cache=True, nogil=True)
def softmax_rows(logits, p, entropy):
    """p float64[B, V] = softmax of each row of logits float64[B, V]; entropy[B] in nats. Rows go four at a
    time through the running sum and entropy sum (``_softmax_four``): four dependency chains side by side
    where one row's waited on each addition, each row's operations in the same order as alone (a row's
    maximum from ``max8``)."""
    n_lanes, n = logits.shape
    ints = np.empty(n, np.int64)
    four = n_lanes - n_lanes % 4
    for b in range(0, four, 4):
        _softmax_four(logits[b:b + 4], p[b:b + 4], entropy[b:b + 4], ints)
    for b in range(four, n_lanes):
        z = logits[b]
        row = p[b]
        top = max8(z)
        for i in range(n):
            row[i] = max(z[i] - top, EXP_MIN)
        exp_rows(row, ints)
        total = 0.0
        for i in range(n):
            total += row[i]
        mean_shifted = 0.0  # sum p * (z - top)
        for i in range(n):
            row[i] /= total
            mean_shifted += row[i] * (z[i] - top)
        entropy[b] = np.log(total) - mean_shifted


@njit(cache=True, nogil=True, inline="always")
def _softmax_four(z, p, entropy, ints):
    """``softmax_rows``' loop for rows z[0..3] at once: the same floats, row by row."""
    n = z.shape[1]
    z0, z1, z2, z3 = z[0], z[1], z[2], z[3]
    r0, r1, r2, r3 = p[0], p[1], p[2], p[3]
    t0, t1, t2, t3 = max8(z0), max8(z1), max8(z2), max8(z3)
    for i in range(n):
        r0[i], r1[i] = max(z0[i] - t0, EXP_MIN), max(z1[i] - t1, EXP_MIN)
        r2[i], r3[i] = max(z2[i] - t2, EXP_MIN), max(z3[i] - t3, EXP_MIN)
    for row in (r0, r1, r2, r3):
        exp_rows(row, ints)
    s0 = s1 = s2 = s3 = 0.0
    for i in range(n):
        s0, s1, s2, s3 = s0 + r0[i], s1 + r1[i], s2 + r2[i], s3 + r3[i]
    m0 = m1 = m2 = m3 = 0.0  # sum p * (z - top)
    for i in range(n):
        r0[i] /= s0
        r1[i] /= s1
        r2[i] /= s2
        r3[i] /= s3
        m0, m1 = m0 + r0[i] * (z0[i] - t0), m1 + r1[i] * (z1[i] - t1)
        m2, m3 = m2 + r2[i] * (z2[i] - t2), m3 + r3[i] * (z3[i] - t3)
    entropy[0], entropy[1] = np.log(s0) - m0, np.log(s1) - m1
    entropy[2], entropy[3] = np.log(s2) - m2, np.log(s3) - m3


@njit(cache=True)
def norm_quantize_parts(x, n_parts, q, scales):
    """The int8 grids of rms_norm(x) in ``n_parts`` terms, each of what the ones before left over:
    q int8[n_parts, B, C], scales float32[n_parts, B]."""
    n_lanes, dim = x.shape
    h = np.empty(dim, np.float32)
    for b in range(n_lanes):
        inv = _rms_scale(x[b])
        for i in range(dim):
            h[i] = x[b, i] * inv
        for part in range(n_parts):
            s = _quantize(h, q[part, b])
            scales[part, b] = s
            for i in range(dim):
                h[i] -= np.float32(q[part, b, i]) * s
