"""cm's lanes in float32: lane state 5 (``mixers/cm.py``), the codec's lanes from lane version 7.

The formulas are lane state 4's (``kernels/cm.py``: ``cm_row_lane2`` and ``cm_learn_lane2``, with 8 partial
sums); what changes is the type of the rows of V values. The experts' log p and log(1 - p), each mixer's row,
the shared per-token exponents and every table of V columns are float32, and so is their arithmetic, with
float32 exp and log (``kernels/approx.py``: ``exp_rows32``, ``log_rows32``). A vector instruction takes
twice the values and a row half the bytes; a mixer's floats need no more than float32's 24 bits, since the
coder takes each p to 16 bits or so. The small weights (gates, geometric and stretch weights, the final
gates, SSE) stay float64, and so does the output row: the final layer mixes the float32 rows into a float64
row, and SSE (or, without it, an explicit division) makes it sum to 1 in float64, whatever the float32 rows'
sums (1 to about 1e-7).

Differences beyond the type:
- the geometric mixers' exponents are floored at ``EXP_MIN_32`` (-80) below their maximum, not at -700,
  so that exp stays a normal float32: a token's share of a mixer's row is at least about 1.8e-35;
- log p is taken of p rounded to float32 and floored at 2**-120 (``log_rows32``).

Every float is an IEEE float32 or float64 operation in a fixed order (no fast-math), so every machine
computes the same floats, as the codec needs.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .approx import EXP_MIN_32, ONE_32, exp_rows32, log_rows32
from .cm import (
    GEO_WEIGHT_MAX,
    GEO_WEIGHT_MIN,
    LANE_DECAY,
    LANE_OWN,
    LANE_PAIR,
    LANE_SHARED,
    LAYOUT_HEAD,
    PART_GEO,
    PART_STRETCH,
    PART_TOKEN,
    RATE_FINAL,
    RATE_GEO,
    RATE_LR,
    RATE_SSE,
    RATE_STRETCH,
    RATE_TOKEN,
    RATES_HEAD,
    STRETCH_WEIGHT_MAX,
    TOKEN_EXP_MAX,
    _agree,
    _bias_update,
    _bias_update_lane,
    _complement,
    _final_and_sse_lane,
    _lane_own,
    _lane_pair_row,
    _lane_scratch,
    _learn_gates_lane,
    _learn_sse_lane,
    _linear_rows_lane,
    _pair_row,
    _two_level,
    select,
)
from .sums import dot8, max8, sum8

ZERO_32 = np.float32(0.0)
TOKEN_EXP_MAX_32 = np.float32(TOKEN_EXP_MAX)
TOKEN_DELTA_MAX_32 = np.float32(2.0 * TOKEN_EXP_MAX)  # a lane's delta of a per-token exponent (lane state 2's bound)


@njit(cache=True, inline="always")
def _row_inputs32(p, base, ngram, n_geo, use_stretch, logp, log1m, complement, ints):
    """``kernels/cm.py``'s ``_row_inputs`` into float32 rows: log p and log(1 - p) of each expert (``complement``
    float64[V] scratch), and, returned, 1 when the base and n-gram experts' top tokens agree."""
    agree = _agree(p, base, ngram)
    if n_geo > 0:
        for k in range(p.shape[0]):
            log_rows32(p[k], logp[k], ints)
            if use_stretch:
                _complement(p[k], complement)
                log_rows32(complement, log1m[k], ints)
    return agree


@njit(cache=True, inline="always")
def _normalize_log_row32(row, ints):
    """A geometric mixer's float32 log-domain row -> its distribution (floored ratio to the top, exp, times
    1 / the sum in 8 partial sums)."""
    top = max8(row)
    for v in range(row.shape[0]):
        row[v] = max(row[v] - top, EXP_MIN_32)
    exp_rows32(row, ints)
    scale = ONE_32 / sum8(row, ZERO_32)
    for v in range(row.shape[0]):
        row[v] *= scale


@njit(cache=True, inline="always")
def _geo_row_two32(row, token_row, shared_row, own_pair_row, w0, w1, u0, u1, e0, e1, d0, d1, l0, l1, c0, c1):
    """Geometric mixer's exponent row for two experts with stretch inputs and both previous-token rows, in one
    pass (``kernels/cm.py``'s ``_geo_row_two`` in float32)."""
    for v in range(row.shape[0]):
        biases = (token_row[v] + shared_row[v]) + own_pair_row[v]
        row[v] = ((biases + ((w0 + (e0[v] + d0[v])) * l0[v] + u0 * c0[v]))
                  + ((w1 + (e1[v] + d1[v])) * l1[v] + u1 * c1[v]))


@njit(cache=True)
def cm_row_lane5(p, order_set, entropy_bucket, base, ngram, layout, state, own, lane_rates, scratch, out):
    """``cm_row_lane2`` (lane state 4) for one lane of lane state 5: its float32 rows (module docstring).
    ``scratch``: as ``cm_row``'s, with logp, log1m and comp float32 and the work array int32[V]; ``out``
    float64[V], written. No state change."""
    gates, geo, bias, final, apm, _last, stretch, token_exp = state
    previous, lane_bias, d_gates, d_geo, d_stretch, d_token, d_final, d_apm, own_pair = own
    logp, log1m, comp, w, g, sets, sse, ints = scratch
    n_experts, vocab = p.shape
    n_lin, n_geo, use_sse, use_stretch = layout[0], layout[1], layout[3], layout[4]
    pair = _pair_row(bias, previous)
    own_row = _lane_pair_row(own_pair[0], previous) if n_geo > 0 else -1
    agree = _row_inputs32(p, base, ngram, n_geo, use_stretch, logp, log1m, out, ints)
    logits = np.empty(max(n_experts, n_lin + n_geo))
    # (the linear mixers' rows: float64 sums, stored in float32)
    _linear_rows_lane(p, order_set, entropy_bucket, agree, layout, gates, d_gates, logits, w, comp, sets)
    for i in range(n_geo):
        j = n_lin + i
        s = select(layout[LAYOUT_HEAD + j], order_set, entropy_bucket, agree)
        sets[j] = s
        row = comp[j]
        token_row = lane_bias[i]
        for k in range(n_experts):
            w[j, k] = geo[i, s, k] + d_geo[i, s, k]
        both_pairs = pair > 0 and own_row >= 0 and lane_rates[LANE_PAIR + i] > 0.0
        if both_pairs and n_experts == 2 and use_stretch:
            _geo_row_two32(row, token_row, bias[i, pair], own_pair[i, own_row], np.float32(w[j, 0]),
                           np.float32(w[j, 1]), np.float32(stretch[i, s, 0] + d_stretch[i, s, 0]),
                           np.float32(stretch[i, s, 1] + d_stretch[i, s, 1]), token_exp[i, 0], token_exp[i, 1],
                           d_token[i, 0], d_token[i, 1], logp[0], logp[1], log1m[0], log1m[1])
            _normalize_log_row32(row, ints)
            continue
        if both_pairs:
            shared_row, own_pair_row = bias[i, pair], own_pair[i, own_row]
            for v in range(vocab):
                row[v] = (token_row[v] + shared_row[v]) + own_pair_row[v]
        elif pair > 0:
            shared_row = bias[i, pair]
            for v in range(vocab):
                row[v] = token_row[v] + shared_row[v]
        else:
            row[:] = token_row
        for k in range(n_experts):
            weight = np.float32(w[j, k])
            lk, ek, dk = logp[k], token_exp[i, k], d_token[i, k]
            if use_stretch:  # one pass over the row for both inputs of expert k
                weight_1m = np.float32(stretch[i, s, k] + d_stretch[i, s, k])
                l1 = log1m[k]
                for v in range(vocab):
                    row[v] += (weight + (ek[v] + dk[v])) * lk[v] + weight_1m * l1[v]
            else:
                for v in range(vocab):
                    row[v] += (weight + (ek[v] + dk[v])) * lk[v]
        _normalize_log_row32(row, ints)
    _final_and_sse_lane(comp, order_set, layout, final, d_final, apm, d_apm, logits, g, sse, out, True)
    if not use_sse:  # (SSE's rescaling makes the row sum to 1 in float64; the float32 rows sum to 1 within 1e-7)
        scale = 1.0 / sum8(out, 0.0)
        for v in range(vocab):
            out[v] *= scale


@njit(cache=True)
def cm_learn_lane5(p, target, order_set, layout, state, own, lane_rates, scratch, rates):
    """``cm_learn_lane2`` (lane state 4) for one lane of lane state 5: the per-token exponents, their deltas
    and the bias rows step in float32 arithmetic, the expectations sum float32 products in 8 partial sums;
    the small weights step in float64 as before. Mutates ``state`` and ``own``'s arrays (the caller sets the
    lane's previous token)."""
    gates, geo, bias, final, apm, _last, stretch, token_exp = state
    previous, lane_bias, d_gates, d_geo, d_stretch, d_token, d_final, d_apm, own_pair = own
    logp, log1m, comp, w, g, sets, sse, _ints = scratch
    n_experts, vocab = p.shape
    n_lin, n_geo, use_stretch = layout[0], layout[1], layout[4]
    pair = _pair_row(bias, previous)
    own_row = _lane_pair_row(own_pair[0], previous) if n_geo > 0 else -1
    lr, geo_lr, final_lr, sse_rate = rates[RATE_LR], rates[RATE_GEO], rates[RATE_FINAL], rates[RATE_SSE]
    token_lr, stretch_lr = rates[RATE_TOKEN], rates[RATE_STRETCH]
    _learn_gates_lane(p, target, layout, gates, d_gates, final, d_final, comp, w, g, sets, lane_rates, lr, final_lr)
    shared_tok = np.float32(lane_rates[LANE_SHARED + PART_TOKEN] * token_lr)
    own_tok = np.float32(lane_rates[LANE_OWN + PART_TOKEN] * token_lr)
    decay_tok = np.float32(lane_rates[LANE_DECAY + PART_TOKEN])
    for i in range(n_geo):
        j = n_lin + i
        s = sets[j]
        row = comp[j]
        for k in range(n_experts):
            lk, l1 = logp[k], log1m[k]  # (log1m's expectation is unused without stretch inputs)
            table, delta = token_exp[i, k], d_token[i, k]
            expected, expected_1m = dot8(row, lk, ZERO_32), dot8(row, l1, ZERO_32)
            if token_lr > 0.0:  # e(v) -= token_lr * (c(v) log p_k(v) - [v = y] log p_k(y)), split in two levels
                before, before_own = table[target], delta[target]
                for v in range(vocab):
                    term = row[v] * lk[v]
                    table[v] = min(max(table[v] - shared_tok * term, -TOKEN_EXP_MAX_32), TOKEN_EXP_MAX_32)
                    delta[v] = min(max(decay_tok * delta[v] - own_tok * term, -TOKEN_DELTA_MAX_32), TOKEN_DELTA_MAX_32)
                # (the target's entry after both terms, as lane state 4 computes it)
                value = before - shared_tok * row[target] * lk[target] + shared_tok * lk[target]
                table[target] = min(max(value, -TOKEN_EXP_MAX_32), TOKEN_EXP_MAX_32)
                value = decay_tok * before_own - own_tok * row[target] * lk[target] + own_tok * lk[target]
                delta[target] = min(max(value, -TOKEN_DELTA_MAX_32), TOKEN_DELTA_MAX_32)
            step = -geo_lr * (np.float64(expected) - np.float64(lk[target]))
            geo[i, s, k], d_geo[i, s, k] = _two_level(geo[i, s, k], d_geo[i, s, k], step, lane_rates, PART_GEO,
                                                      GEO_WEIGHT_MIN, GEO_WEIGHT_MAX)
            if use_stretch:
                step = -stretch_lr * (np.float64(expected_1m) - np.float64(l1[target]))
                stretch[i, s, k], d_stretch[i, s, k] = _two_level(stretch[i, s, k], d_stretch[i, s, k], step,
                                                                  lane_rates, PART_STRETCH, -STRETCH_WEIGHT_MAX,
                                                                  STRETCH_WEIGHT_MAX)
        bias_lr = np.float32(rates[RATES_HEAD + 2 * i])
        bias_decay = np.float32(rates[RATES_HEAD + 2 * i + 1])
        if pair > 0:
            own_rate = np.float32(rates[RATES_HEAD + 2 * i] * lane_rates[LANE_PAIR + i]) if own_row >= 0 else ZERO_32
            _bias_update_lane(lane_bias[i], bias[i, pair], own_pair[i, max(own_row, 0)], row, target, bias_lr,
                              own_rate, bias_decay)
        else:
            _bias_update(lane_bias[i], row, target, bias_lr, bias_decay)
    _learn_sse_lane(target, order_set, apm, d_apm, sse, lane_rates, sse_rate)


@njit(cache=True, nogil=True)  # the lane engine's second thread works meanwhile (lanes.py)
def cm_rows_lanes5(p, ctx, base, ngram, layout, state, lanes, lane_rates, scratch, out):
    """Lane state 5: ``cm_row_lane5`` for each lane j of ``p`` float64[La, K, V] into ``out`` float64[La, V];
    ``lanes`` and ``scratch`` as ``cm_rows_lanes2``'s, with float32 tables and rows (the module docstring).
    No state change."""
    for j in range(p.shape[0]):
        cm_row_lane5(p[j], ctx[j, 0], ctx[j, 1], base, ngram, layout, state, _lane_own(lanes, j), lane_rates,
                     _lane_scratch(scratch, j), out[j])


@njit(cache=True, nogil=True)  # the lane engine's second thread works meanwhile (lanes.py)
def cm_learn_lanes5(p, targets, ctx, layout, state, lanes, lane_rates, scratch, rates):
    """Lane state 5: ``cm_learn_lane5`` for lane 0, 1, ... in turn from the rows ``cm_rows_lanes5`` computed
    for them, then each lane's previous token is its token. Mutates ``state`` and ``lanes``."""
    last = lanes[0]
    for j in range(targets.shape[0]):
        cm_learn_lane5(p[j], targets[j], ctx[j, 0], layout, state, _lane_own(lanes, j), lane_rates,
                       _lane_scratch(scratch, j), rates)
        last[j] = targets[j]
