"""Numba kernels of the context-mixing network (``ctxmix/mixers/cm.py``): two layers of online mixers and
an SSE stage over full distributions, or linear layers over p(target) only.

One position, as ``cm_row`` computes it from the experts' rows ``p`` (float64[K, V]) and the position's
small contexts (the n-gram expert's matched order, a bucket of the base expert's entropy, and whether the
base and n-gram experts agree on their most probable token):

    layer 1, linear j      c_j = sum_k w_jk p_k,         w_j = softmax(gates[j, set_j])
    layer 1, geometric j   c_j(v) proportional to exp(sum_k ((u_jk + e_jk(v)) log p_k(v) + s_jk log(1 - p_k(v)))
                                                  + bias_j(v) + bias_j(x, v)),
                           u_j = geo[j, set_j], s_j = stretch[j, set_j], e_j = token_exp[j], x = the previous token
    layer 2                m = sum_j g_j c_j,            g = softmax(final)
    SSE                    m'(h) = (a(m(h)) + m(h)) / 2 on the top token h of m, the other tokens scaled
                           by (1 - m'(h)) / (1 - m(h)); a = an interpolated table over stretch(m(h)),
                           one table per matched order

Every stage maps normalized distributions with every p > 0 to a normalized distribution with every p > 0:
a convex combination of such rows, an explicitly normalized exponential whose exponent is floored, and a
rescaling whose two parts sum to 1. ``set_j`` picks the weight set from the contexts (``SEL_*``), as
PAQ-family mixers select a weight set by a small context.

Learning (``cm_learn``) runs after the row was used (score before update, rule 3), each stage by one step
of gradient descent on -log of its own output's p(target):

    linear gates     gates[j, s, k] += lr * w_jk (p_k(y) / c_j(y) - 1)
    geometric        u_jk -= geo_lr * (E_{c_j}[log p_k] - log p_k(y)),  clamped to [0, GEO_WEIGHT_MAX]
                     s_jk -= stretch_lr * (E_{c_j}[log(1 - p_k)] - log(1 - p_k(y))),  clamped to +-STRETCH_WEIGHT_MAX
    token exponents  e_jk(v) -= token_lr * (c_j(v) log p_k(v) - [v = y] log p_k(y)),  clamped to +-TOKEN_EXP_MAX
    its token biases bias_j <- bias_decay_j * bias_j - bias_lr_j * c_j, then bias_j(y) += bias_lr_j; likewise
                     the row bias_j(x, .) of the previous token x (each geometric mixer has its own two rates)
    final gates      final[j] += final_lr * g_j (c_j(y) / m(y) - 1)
    SSE table        the two entries around stretch(m(h)) move toward [y == h] by sse_rate, split linearly

The biases of a geometric mixer are log-domain caches: they rise for tokens that occur (after the previous
token, for the second) and decay for those the mixer expected, so they adapt the mix to the words of the
current text; mixers with different rates keep caches of different lengths (a fast one, a slow one), and
the final layer weighs them. The inputs log(1 - p_k) make the mix a function of stretch(p_k) =
log p_k - log(1 - p_k), as in PAQ's logistic mixing: they move a likely token's probability without moving
the tail's. The token exponents e_jk(v) let the mix trust an expert more or less for particular tokens
(punctuation, word pieces) whatever the context, which no per-context weight can. The previous-token table
has ``bias.shape[1] - 2`` rows (token x uses row 1 + x mod rows, the first position of a stream the last
row; none when the shape is 1).

The fast variant (``cm_linear_weights_update``) runs the linear layers alone on p(target): a linear mix of
linear mixes is one linear mix, so it returns each position's effective expert weights.

Lanes (the codec's lockstep streams) run every lane's row from the state before the step (lane state 4:
before the lanes' group, ``mixers/cm.py``), then learn lane by lane. Lane state 1 (``cm_rows_lanes``,
``cm_learn_lanes``) shares every array but the token-bias rows.
Lane state 2 (``cm_rows_lanes2``, ``cm_learn_lanes2``) adds to each shared weight w (gates, geo, stretch,
token exponents, final, SSE table) a lane's own delta d, so lane j mixes with w + d_j; each gradient step
above, taken from lane j's row, moves w by a * step and d_j by b * step (``lane_rates``), and each geometric
mixer also adds the lane's own previous-token row (its previous token modulo R rows), trained like the
shared one at its bias rate times a factor: the shared part learns from every lane, a lane's own part where
it is in the text.

Lane states 3 and 4 run these kernels with float32 tables (``mixers/cm.py``); lane state 5 runs their
formulas on float32 rows as well, in ``kernels/cm_float32.py``.

Pure functions over NumPy arrays; only ``*_update`` functions and ``cm_learn*`` mutate, and only the arrays
passed to them.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .approx import exp_rows, log_rows
from .mixers import GEO_LOG_RATIO_MIN, GEO_WEIGHT_MAX, GEO_WEIGHT_MIN, softmax_weights
from .sums import dot8, max8, sum8

# Contexts that select a weight set (the stacks in ``mixers/cm.py`` name them by these codes).
SEL_NONE = 0  # one set
SEL_ORDER = 1  # matched n-gram order, 0..ORDER_SETS-1
SEL_ORDER_ENTROPY = 2  # order x base-entropy bucket
SEL_AGREE_ORDER = 3  # do base and n-gram agree on the top token (full path only) x order
ORDER_SETS = 12  # orders 0 (no match) .. 11; longer orders share the last set
ENTROPY_BUCKETS = 12  # base entropy in half-nat steps: [0, 0.5), [0.5, 1), ..., >= 5.5 nats
ENTROPY_STEP = 0.5  # nats per bucket

# SSE: a table of APM_BINS values over stretch(p) in [-APM_RANGE, APM_RANGE], read by linear interpolation.
APM_BINS = 33
APM_RANGE = 8.0
APM_MIN = 1.0 / 4096  # table values stay in [APM_MIN, 1 - APM_MIN], so the refined p(top) stays in (0, 1)

# Geometric inputs beyond log p_k: the weights of log(1 - p_k) and the per-token exponents, each bounded so a
# row's exponent stays finite whatever the experts give; 1 - p is floored so that log(1 - p) is finite at p = 1.
STRETCH_WEIGHT_MAX = 8.0
TOKEN_EXP_MAX = 4.0
COMPLEMENT_MIN = 1e-15

# ``layout`` (int64): this header, then the linear mixers' selector codes, then the geometric mixers'.
LAYOUT_HEAD = 5  # n_lin, n_geo, layers, sse (0/1), stretch inputs (0/1)
# ``rates`` (float64): these, then (bias_lr, bias_decay) of each geometric mixer in turn.
RATE_LR, RATE_GEO, RATE_FINAL, RATE_SSE, RATE_TOKEN, RATE_STRETCH = 0, 1, 2, 3, 4, 5
RATES_HEAD = 6


@njit(cache=True, inline="always")
def n_sets(selector):
    """Weight sets a selector code addresses."""
    if selector == SEL_ORDER:
        return ORDER_SETS
    if selector == SEL_ORDER_ENTROPY:
        return ORDER_SETS * ENTROPY_BUCKETS
    if selector == SEL_AGREE_ORDER:
        return 2 * ORDER_SETS
    return 1


@njit(cache=True, inline="always")
def select(selector, order, entropy_bucket, agree):
    """The weight set of ``selector`` for the position's contexts."""
    if selector == SEL_ORDER:
        return order
    if selector == SEL_ORDER_ENTROPY:
        return order * ENTROPY_BUCKETS + entropy_bucket
    if selector == SEL_AGREE_ORDER:
        return agree * ORDER_SETS + order
    return 0


@njit(cache=True)
def contexts(order, entropy):
    """float64[T] matched order and base entropy (nats) -> int64[T, 2] (order set, entropy bucket)."""
    n_rows = order.shape[0]
    out = np.empty((n_rows, 2), np.int64)
    for t in range(n_rows):
        out[t, 0] = min(max(int(order[t]), 0), ORDER_SETS - 1)
        out[t, 1] = min(max(int(entropy[t] / ENTROPY_STEP), 0), ENTROPY_BUCKETS - 1)
    return out


@njit(cache=True, inline="always")
def _argmax(row):
    """The first index of the row's largest value (as np.argmax): its value from ``max8``, which
    vectorizes, then the first place it occurs (a loop that compared each value with the best so far, a
    load that waits on the last comparison, took about 1.5 us a row of 1,024)."""
    top = max8(row)
    for v in range(row.shape[0]):
        if row[v] == top:
            return v
    best = 0  # (no value equals the maximum: a NaN in the row; the first largest of the others)
    for v in range(1, row.shape[0]):
        if row[v] > row[best]:
            best = v
    return best


@njit(cache=True, inline="always")
def _stretch_bin(p):
    """(lower bin, fraction) of stretch(p) = log(p / (1 - p)) on the SSE table's grid."""
    x = math.log(p / (1.0 - p))
    x = min(max(x, -APM_RANGE), APM_RANGE)
    pos = (x + APM_RANGE) * (APM_BINS - 1) / (2.0 * APM_RANGE)
    lo = min(int(pos), APM_BINS - 2)
    return lo, pos - lo


@njit(cache=True, inline="always")
def _pair_row(bias, previous):
    """The row of ``bias[i]`` that the previous token selects; 0 when the table has no such rows."""
    rows = bias.shape[1] - 2
    if rows <= 0:
        return 0
    return 1 + previous % rows if previous >= 0 else 1 + rows


@njit(cache=True, inline="always")
def _bias_update(table, row, target, rate, decay):
    """One log-loss step on a bias row: ``table`` -= rate * (``row`` - onehot(target)), after decaying it."""
    for v in range(table.shape[0]):
        table[v] = decay * table[v] - rate * row[v]
    table[target] += rate


@njit(cache=True, inline="always")
def _bias_update_two(table, other, row, target, rate, decay):
    """``_bias_update`` of two rows with the same gradient, in one pass."""
    for v in range(table.shape[0]):
        step = rate * row[v]
        table[v] = decay * table[v] - step
        other[v] = decay * other[v] - step
    table[target] += rate
    other[target] += rate


@njit(cache=True, inline="always")
def _complement(p, out):
    """out[:] = max(1 - p, COMPLEMENT_MIN) (float64: the input of log(1 - p), finite at p = 1)."""
    for v in range(p.shape[0]):
        out[v] = max(1.0 - p[v], COMPLEMENT_MIN)


@njit(cache=True, inline="always")
def _log_complement(p, tmp, out):
    """out[:] = log(max(1 - p, COMPLEMENT_MIN)); ``tmp`` float64[V] is overwritten (log_rows cannot work in
    place)."""
    _complement(p, tmp)
    log_rows(tmp, out)


@njit(cache=True, inline="always")
def _expectations_update(table, rate, row, lk, l1, target, bound):
    """(E_row[lk], E_row[l1]) (sum_v row(v) lk(v), and the same for l1), returned; with ``rate`` > 0, also one
    log-loss step on token exponents in the same pass: ``table`` -= rate * (row * lk - onehot(target) *
    lk(target)), then each entry is kept in [-bound, bound] (the target's after both terms, as an unfused
    step then clamp would). One pass over the row instead of three."""
    expected, expected_1m = 0.0, 0.0
    if rate > 0.0:
        before = table[target]
        for v in range(table.shape[0]):
            term = row[v] * lk[v]
            expected += term
            expected_1m += row[v] * l1[v]
            table[v] = min(max(table[v] - rate * term, -bound), bound)
        value = before - rate * row[target] * lk[target] + rate * lk[target]
        table[target] = min(max(value, -bound), bound)
    else:
        for v in range(table.shape[0]):
            expected += row[v] * lk[v]
            expected_1m += row[v] * l1[v]
    return expected, expected_1m


@njit(cache=True)
def apm_init(n_contexts):
    """float64[n_contexts, APM_BINS]: the identity map p -> p at every bin centre."""
    table = np.empty((n_contexts, APM_BINS))
    for i in range(APM_BINS):
        x = -APM_RANGE + 2.0 * APM_RANGE * i / (APM_BINS - 1)
        value = min(max(1.0 / (1.0 + math.exp(-x)), APM_MIN), 1.0 - APM_MIN)
        for c in range(n_contexts):
            table[c, i] = value
    return table


@njit(cache=True, inline="always")
def _sum(row, eight):
    """row.sum() (one running sum, in order: the one-lane path and lane states 1-2), or with ``eight`` the sum
    in 8 running partial sums, then added pairwise (lane state 3): a fixed order that vectorizes."""
    if not eight:
        return row.sum()
    return sum8(row, 0.0)  # (float64 sums: a float32 row's terms are widened first)


@njit(cache=True, inline="always")
def _expectations_eight(row, lk, l1):
    """(sum_v row(v) lk(v), sum_v row(v) l1(v)), each in 8 running partial sums added pairwise (``dot8``; lane
    state 4's learning: a fixed order that vectorizes, where one running sum waits on each add)."""
    return dot8(row, lk, 0.0), dot8(row, l1, 0.0)


@njit(cache=True, inline="always")
def _normalize_log_row(row, ints, eight):
    """A geometric mixer's log-domain row -> its distribution (floored ratio to the top, exp, sum to 1;
    ``eight``: the sum's order, ``_sum``)."""
    top = max8(row)
    for v in range(row.shape[0]):
        row[v] = max(row[v] - top, GEO_LOG_RATIO_MIN)
    exp_rows(row, ints)
    total = _sum(row, eight)
    for v in range(row.shape[0]):
        row[v] /= total


@njit(cache=True, inline="always")
def _agree(p, base, ngram):
    """1 when the base and n-gram experts (indexes; -1: none) put their largest p on the same token, else 0:
    the agreement context."""
    return 1 if base >= 0 and ngram >= 0 and _argmax(p[base]) == _argmax(p[ngram]) else 0


@njit(cache=True, inline="always")
def _row_inputs(p, base, ngram, n_geo, use_stretch, logp, log1m, tmp):
    """What a row's mixers read besides p: log p and log(1 - p) of each expert (for the geometric mixers;
    ``tmp`` float64[V] scratch) and, returned, 1 when the base and n-gram experts' top tokens agree."""
    agree = _agree(p, base, ngram)
    if n_geo > 0:
        for k in range(p.shape[0]):
            log_rows(p[k], logp[k])
            if use_stretch:
                _log_complement(p[k], tmp, log1m[k])
    return agree


@njit(cache=True, inline="always")
def _weighted_sum(rows, n, weights, kept, out):
    """out = sum_j weights[j] rows[j] over j < n (a linear mixer over the experts, the final layer over the
    mixers), the weights kept in ``kept``. Two rows (two experts) and five (the final layer of the default
    stack) go in one pass: the same sums, term by term in the same order."""
    for j in range(n):
        kept[j] = weights[j]
    if n == 2:
        w0, w1 = weights[0], weights[1]
        r0, r1 = rows[0], rows[1]
        for v in range(out.shape[0]):
            out[v] = (0.0 + w0 * r0[v]) + w1 * r1[v]
        return
    if n == 5:
        w0, w1, w2, w3, w4 = weights[0], weights[1], weights[2], weights[3], weights[4]
        r0, r1, r2, r3, r4 = rows[0], rows[1], rows[2], rows[3], rows[4]
        for v in range(out.shape[0]):
            out[v] = ((((0.0 + w0 * r0[v]) + w1 * r1[v]) + w2 * r2[v]) + w3 * r3[v]) + w4 * r4[v]
        return
    out[:] = 0.0
    for j in range(n):
        weight = weights[j]
        rj = rows[j]
        for v in range(out.shape[0]):
            out[v] += weight * rj[v]


@njit(cache=True, inline="always")
def _sse_top(out, eight):
    """(top token, its p, the others' sum, SSE table bin, fraction): what SSE reads of the mix; zeroes
    out[top] (``_sse_apply`` writes it back refined). ``eight``: the sum's order (``_sum``)."""
    top = _argmax(out)
    p_top = out[top]
    out[top] = 0.0
    rest = _sum(out, eight)  # 1 - p_top, summed: no cancellation when p_top is near 1
    lo, frac = _stretch_bin(min(max(p_top, APM_MIN), 1.0 - APM_MIN))
    return top, p_top, rest, lo, frac


@njit(cache=True, inline="always")
def _sse_apply(out, top, p_top, rest, lo, frac, at_lo, at_hi, sse):
    """The top token's p refined by the table values at bins lo and lo + 1, the rest rescaled to sum to 1;
    sse keeps what learning needs."""
    refined = 0.5 * (at_lo * (1.0 - frac) + at_hi * frac + p_top)
    refined = min(max(refined, APM_MIN), 1.0 - APM_MIN)
    scale = (1.0 - refined) / rest
    for v in range(out.shape[0]):
        out[v] *= scale
    out[top] = refined
    sse[0] = top
    sse[1] = p_top
    sse[2] = lo + frac  # the table position, for learning
    sse[3] = 1.0


@njit(cache=True)
def cm_row(p, order_set, entropy_bucket, base, ngram, layout, state, scratch, out):
    """Mix one position: ``p`` float64[K, V] experts' rows -> ``out`` float64[V] (written). No state change.

    ``layout`` int64[LAYOUT_HEAD + n_lin + n_geo]: (n_lin, n_geo, layers, sse, stretch), then the linear
    mixers' selector codes, then the geometric mixers'. ``state``: (gates [n_lin, S, K], geo [n_geo, S, K],
    bias [n_geo, 1 or 2 + R, V] (row 0: the token bias, then the previous token's rows), final [M],
    apm [ORDER_SETS, APM_BINS], last int64[1]: the previous token, -1 at the start, stretch [n_geo, S, K],
    token_exp [n_geo, K, V]). ``scratch`` (what ``cm_learn`` needs, all overwritten): (logp [K, V],
    log1m [K, V] (log(1 - p), read only with stretch inputs), comp [M, V], w [M, K], g [M], sets int64[M],
    sse float64[4], int64[V]) where
    sse = (top token, its p before SSE, its SSE table position, 1: SSE applied). ``base``/``ngram``: expert
    indexes (-1: none), for the agreement context. Loops run over tokens innermost, so they vectorize.
    """
    gates, geo, bias, final, apm, last, stretch, token_exp = state
    logp, log1m, comp, w, g, sets, sse, ints = scratch
    n_experts, vocab = p.shape
    n_lin, n_geo, layers, use_sse, use_stretch = layout[0], layout[1], layout[2], layout[3], layout[4]
    pair = _pair_row(bias, last[0])
    agree = _row_inputs(p, base, ngram, n_geo, use_stretch, logp, log1m, out)
    for j in range(n_lin):
        s = select(layout[LAYOUT_HEAD + j], order_set, entropy_bucket, agree)
        sets[j] = s
        _weighted_sum(p, n_experts, softmax_weights(gates[j, s]), w[j], comp[j])
    for i in range(n_geo):
        j = n_lin + i
        s = select(layout[LAYOUT_HEAD + j], order_set, entropy_bucket, agree)
        sets[j] = s
        row = comp[j]
        row[:] = bias[i, 0]
        if pair > 0:
            row += bias[i, pair]
        for k in range(n_experts):
            w[j, k] = geo[i, s, k]
            weight = geo[i, s, k]
            lk = logp[k]
            ek = token_exp[i, k]
            if use_stretch:  # one pass over the row for both inputs of expert k
                weight_1m = stretch[i, s, k]
                l1 = log1m[k]
                for v in range(vocab):
                    row[v] += (weight + ek[v]) * lk[v] + weight_1m * l1[v]
            else:
                for v in range(vocab):
                    row[v] += (weight + ek[v]) * lk[v]
        _normalize_log_row(row, ints, False)
    n_comp = n_lin + n_geo
    if layers == 1:  # the one mixer alone (an ablation): no final layer
        g[0] = 1.0
        out[:] = comp[0]
    else:
        _weighted_sum(comp, n_comp, softmax_weights(final), g, out)
    sse[3] = 0.0
    if use_sse:
        top, p_top, rest, lo, frac = _sse_top(out, False)
        _sse_apply(out, top, p_top, rest, lo, frac, apm[order_set, lo], apm[order_set, lo + 1], sse)


@njit(cache=True)
def cm_learn(p, target, order_set, layout, state, scratch, rates):
    """The updates of ``cm_row``'s position once its token ``target`` is known (after its row was used).

    ``rates`` float64[RATES_HEAD + 2 n_geo]: (lr, geo_lr, final_lr, sse_rate, token_lr, stretch_lr), then
    (bias_lr, bias_decay) of each geometric mixer. Mutates ``state``.
    """
    gates, geo, bias, final, apm, last, stretch, token_exp = state
    logp, log1m, comp, w, g, sets, sse, _ints = scratch
    pair = _pair_row(bias, last[0])
    n_experts, vocab = p.shape
    n_lin, n_geo, layers, use_stretch = layout[0], layout[1], layout[2], layout[4]
    lr, geo_lr, final_lr, sse_rate = rates[RATE_LR], rates[RATE_GEO], rates[RATE_FINAL], rates[RATE_SSE]
    token_lr, stretch_lr = rates[RATE_TOKEN], rates[RATE_STRETCH]
    n_comp = n_lin + n_geo
    if layers != 1:
        mixed = 0.0  # the final layer's p(target), before SSE
        for j in range(n_comp):
            mixed += g[j] * comp[j, target]
        for j in range(n_comp):
            final[j] += final_lr * g[j] * (comp[j, target] / mixed - 1.0)
    for j in range(n_lin):
        s = sets[j]
        c = comp[j, target]
        for k in range(n_experts):
            gates[j, s, k] += lr * w[j, k] * (p[k, target] / c - 1.0)
    for i in range(n_geo):
        j = n_lin + i
        s = sets[j]
        row = comp[j]
        for k in range(n_experts):
            lk = logp[k]
            l1 = log1m[k]  # (its expectation is unused without stretch inputs)
            expected, expected_1m = _expectations_update(token_exp[i, k], token_lr, row, lk, l1, target, TOKEN_EXP_MAX)
            weight = geo[i, s, k] - geo_lr * (expected - logp[k, target])
            geo[i, s, k] = min(max(weight, GEO_WEIGHT_MIN), GEO_WEIGHT_MAX)
            if use_stretch:
                weight = stretch[i, s, k] - stretch_lr * (expected_1m - l1[target])
                stretch[i, s, k] = min(max(weight, -STRETCH_WEIGHT_MAX), STRETCH_WEIGHT_MAX)
        bias_lr, bias_decay = rates[RATES_HEAD + 2 * i], rates[RATES_HEAD + 2 * i + 1]
        if pair > 0:
            _bias_update_two(bias[i, 0], bias[i, pair], row, target, bias_lr, bias_decay)
        else:
            _bias_update(bias[i, 0], row, target, bias_lr, bias_decay)
    if sse[3] > 0.0:
        hit = 1.0 if target == int(sse[0]) else 0.0
        lo = int(sse[2])
        frac = sse[2] - lo
        for b, share in ((lo, 1.0 - frac), (lo + 1, frac)):
            value = apm[order_set, b] + sse_rate * share * (hit - apm[order_set, b])
            apm[order_set, b] = min(max(value, APM_MIN), 1.0 - APM_MIN)
    last[0] = target


@njit(cache=True)
def cm_mix_update(p, targets, ctx, base, ngram, layout, state, scratch, rates, out, out_g):
    """``cm_row`` then ``cm_learn`` for each position of a chunk, in order.

    ``p`` float64[T, K, V], ``targets`` int64[T], ``ctx`` int64[T, 2] (``contexts``). ``out`` float64[T, V]
    and ``out_g`` float64[T, M] (the final layer's weights, for plots) are written; ``state`` is mutated.
    """
    for t in range(p.shape[0]):
        cm_row(p[t], ctx[t, 0], ctx[t, 1], base, ngram, layout, state, scratch, out[t])
        cm_learn(p[t], targets[t], ctx[t, 0], layout, state, scratch, rates)
        for j in range(out_g.shape[1]):
            out_g[t, j] = scratch[4][j]


@njit(cache=True)
def _linear_row(pt, ctx_t, layout, gates, final, w, g, sets, comp):
    """The fast variant's weights at one position: linear mixer j's expert weights ``w[j]`` (and its set),
    the final weights ``g``, and, when ``pt`` (float64[K] p(target)) is given, each mixer's p(target)."""
    n_lin, layers = layout[0], layout[2]
    n_experts = w.shape[1]
    for j in range(n_lin):
        s = select(layout[LAYOUT_HEAD + j], ctx_t[0], ctx_t[1], 0)
        sets[j] = s
        wj = softmax_weights(gates[j, s])
        c = 0.0
        for k in range(n_experts):
            w[j, k] = wj[k]
            c += wj[k] * pt[k]
        comp[j] = c
    if layers == 1:
        for j in range(n_lin):
            g[j] = 1.0 if j == 0 else 0.0
    else:
        gw = softmax_weights(final)
        for j in range(n_lin):
            g[j] = gw[j]


@njit(cache=True)
def cm_linear_next_weights(ctx_t, layout, gates, final):
    """float64[K]: the fast variant's effective expert weights at the next position; no state change."""
    n_lin, n_experts = layout[0], gates.shape[2]
    w = np.empty((n_lin, n_experts))
    g = np.empty(n_lin)
    _linear_row(np.zeros(n_experts), ctx_t, layout, gates, final, w, g, np.empty(n_lin, np.int64), np.empty(n_lin))
    out = np.zeros(n_experts)
    for j in range(n_lin):
        for k in range(n_experts):
            out[k] += g[j] * w[j, k]
    return out


@njit(cache=True)
def cm_linear_weights_update(logp, ctx, layout, gates, final, rates, out_w, out_g):
    """The fast variant over a chunk: the linear layers on p(target) only.

    ``logp`` float64[T, K] experts' log p(target). ``out_w`` float64[T, K] is written with each position's
    effective expert weights (the final mix of the linear mixers' weights: their mix of the experts is that
    weighted sum), ``out_g`` float64[T, n_lin] with the final layer's weights. Then the updates ``cm_learn``
    makes to the linear gates and the final gates (the agreement context needs rows: it reads 0 here).
    """
    n_rows, n_experts = logp.shape
    n_lin, layers = layout[0], layout[2]
    lr, final_lr = rates[RATE_LR], rates[RATE_FINAL]
    w = np.empty((n_lin, n_experts))
    g = np.empty(n_lin)
    sets = np.empty(n_lin, np.int64)
    comp = np.empty(n_lin)
    pt = np.empty(n_experts)
    for t in range(n_rows):
        for k in range(n_experts):
            pt[k] = math.exp(logp[t, k])
        _linear_row(pt, ctx[t], layout, gates, final, w, g, sets, comp)
        mixed = 0.0
        for j in range(n_lin):
            out_g[t, j] = g[j]
            mixed += g[j] * comp[j]
        for k in range(n_experts):
            acc = 0.0
            for j in range(n_lin):
                acc += g[j] * w[j, k]
            out_w[t, k] = acc
        if layers != 1:
            for j in range(n_lin):
                final[j] += final_lr * g[j] * (comp[j] / mixed - 1.0)
        for j in range(n_lin):
            for k in range(n_experts):
                gates[j, sets[j], k] += lr * w[j, k] * (pt[k] / comp[j] - 1.0)


@njit(cache=True, inline="always")
def _lane_scratch(scratch, j):
    """Lane j's part of the lanes' scratch (``row_scratch`` with a lane axis; the work array, last, is
    shared): the scratch a lane's row and learning take."""
    logp, log1m, comp, w, g, sets, sse, ints = scratch
    return logp[j], log1m[j], comp[j], w[j], g[j], sets[j], sse[j], ints


@njit(cache=True, inline="always")
def _lane_own(lanes, j):
    """Lane j's slices of the lanes' arrays (``cm_rows_lanes2``'s ``lanes``): what a lane's row and learning
    take as ``own`` in lane states 2-5."""
    last, bias, d_gates, d_geo, d_stretch, d_token, d_final, d_apm, own_pair = lanes
    return last[j], bias[j], d_gates[j], d_geo[j], d_stretch[j], d_token[j], d_final[j], d_apm[j], own_pair[j]


@njit(cache=True, nogil=True)  # the lane engine's second thread works meanwhile (lanes.py)
def cm_rows_lanes(p, ctx, base, ngram, layout, state, lane_last, lane_bias, scratch, out):
    """Lanes: ``cm_row`` for each lane j of ``p`` float64[La, K, V] with its contexts ``ctx[j]``, its own
    previous token ``lane_last[j]`` and its own token-bias rows ``lane_bias[j]`` (float64[n_geo, V], the
    geometric mixers' recency cache: lanes are far apart in the text, and one cache fed by all of them
    would hold the recent tokens of none), into ``out`` float64[La, V]. ``scratch``: ``cm_row``'s scratch
    arrays with a leading lane axis (the last, int64[V], shared), kept for ``cm_learn_lanes``. No state
    change (the state's ``last`` and token-bias rows are set to each lane's in turn)."""
    bias, last = state[2], state[5]
    for j in range(p.shape[0]):
        last[0] = lane_last[j]
        for i in range(lane_bias.shape[1]):
            bias[i, 0] = lane_bias[j, i]
        cm_row(p[j], ctx[j, 0], ctx[j, 1], base, ngram, layout, state,
               _lane_scratch(scratch, j), out[j])


@njit(cache=True, nogil=True)  # the lane engine's second thread works meanwhile (lanes.py)
def cm_learn_lanes(p, targets, ctx, layout, state, lane_last, lane_bias, scratch, rates):
    """Lanes: ``cm_learn`` for lane 0, 1, ... in turn, from the rows ``cm_rows_lanes`` computed for this step
    (all from the state before it), each lane's token ``targets[j]``; lane j's update of the shared weights,
    pair biases and SSE applies on top of those of lanes < j, its token-bias update to its own rows.
    Mutates ``state``, ``lane_last`` and ``lane_bias``."""
    bias, last = state[2], state[5]
    for j in range(targets.shape[0]):
        last[0] = lane_last[j]
        for i in range(lane_bias.shape[1]):
            bias[i, 0] = lane_bias[j, i]
        cm_learn(p[j], targets[j], ctx[j, 0], layout, state,
                 _lane_scratch(scratch, j), rates)
        for i in range(lane_bias.shape[1]):
            lane_bias[j, i] = bias[i, 0]
        lane_last[j] = targets[j]


# ---- lane state 2: shared weights plus each lane's own fast deltas ----------------------------------------

# ``lane_rates`` of lane state 2 (float64[LANE_RATES_HEAD + n_geo]): for each part (gates, geo, stretch, token
# exponents, final, SSE) the factor of a lane's step applied to the shared weights, then the factor applied to
# the lane's own delta, then the delta's decay at each step; then, per geometric mixer, the factor of its bias
# rate for the lane's own previous-token rows (0: none).
PART_GATES, PART_GEO, PART_STRETCH, PART_TOKEN, PART_FINAL, PART_APM = 0, 1, 2, 3, 4, 5
LANE_PARTS = 6
LANE_SHARED, LANE_OWN, LANE_DECAY, LANE_PAIR = 0, LANE_PARTS, 2 * LANE_PARTS, 3 * LANE_PARTS
LANE_RATES_HEAD = 3 * LANE_PARTS


@njit(cache=True, inline="always")
def _lane_pair_row(own_pair, previous):
    """The row of a lane's own previous-token table (float64[R, V]) that ``previous`` selects; -1 at the
    lane's first position (previous -1)."""
    return previous % own_pair.shape[0] if previous >= 0 else -1


@njit(cache=True, inline="always")
def _geo_row_two(row, token_row, shared_row, own_pair_row, i, s, geo, d_geo, stretch, d_stretch, token_exp, d_token,
                 logp, log1m, kept):
    """Geometric mixer i's exponent row for two experts with stretch inputs and both previous-token rows (the
    codec's lanes): the sums of ``cm_row_lane2``'s passes (the biases, then expert 0's terms, then expert 1's),
    term by term in the same order, in one pass; the weights used kept in ``kept``."""
    w0, w1 = geo[i, s, 0] + d_geo[i, s, 0], geo[i, s, 1] + d_geo[i, s, 1]
    u0, u1 = stretch[i, s, 0] + d_stretch[i, s, 0], stretch[i, s, 1] + d_stretch[i, s, 1]
    kept[0], kept[1] = w0, w1
    e0, e1, d0, d1 = token_exp[i, 0], token_exp[i, 1], d_token[i, 0], d_token[i, 1]
    l0, l1, c0, c1 = logp[0], logp[1], log1m[0], log1m[1]
    for v in range(row.shape[0]):
        biases = np.float64(token_row[v]) + shared_row[v] + own_pair_row[v]
        row[v] = ((biases + ((w0 + (e0[v] + d0[v])) * l0[v] + u0 * c0[v]))
                  + ((w1 + (e1[v] + d1[v])) * l1[v] + u1 * c1[v]))


@njit(cache=True)
def cm_row_lane2(p, order_set, entropy_bucket, base, ngram, layout, state, own, lane_rates, scratch, out,
                 eight_sums=False):
    """``cm_row`` for one lane of lane state 2: each small weight is the shared one plus the lane's delta.

    ``own`` (the lane's slices of ``cm_rows_lanes2``'s ``lanes``): (previous token int64, token-bias rows
    [n_geo, V], then the deltas of gates [n_lin, S, K], geo [n_geo, S, K], stretch [n_geo, S, K], token_exp
    [n_geo, K, V], final [M], apm [ORDER_SETS, APM_BINS], then its own previous-token rows [n_geo, R, V]).
    Geometric mixer i's exponent adds the shared pair-bias row of the previous token x and, when
    ``lane_rates[LANE_PAIR + i]`` > 0, the lane's own row x mod R. The SSE value (shared + delta) is kept
    in [APM_MIN, 1 - APM_MIN]. ``eight_sums`` (lane state 3): the geometric rows' and SSE's sums in 8 partial
    sums (``_sum``). Otherwise the arithmetic of ``cm_row``; no state change."""
    gates, geo, bias, final, apm, _last, stretch, token_exp = state
    previous, lane_bias, d_gates, d_geo, d_stretch, d_token, d_final, d_apm, own_pair = own
    logp, log1m, comp, w, g, sets, sse, ints = scratch
    n_experts, vocab = p.shape
    n_lin, n_geo, use_stretch = layout[0], layout[1], layout[4]
    pair = _pair_row(bias, previous)
    own_row = _lane_pair_row(own_pair[0], previous) if n_geo > 0 else -1
    agree = _row_inputs(p, base, ngram, n_geo, use_stretch, logp, log1m, out)
    logits = np.empty(max(n_experts, n_lin + n_geo))
    _linear_rows_lane(p, order_set, entropy_bucket, agree, layout, gates, d_gates, logits, w, comp, sets)
    for i in range(n_geo):
        j = n_lin + i
        s = select(layout[LAYOUT_HEAD + j], order_set, entropy_bucket, agree)
        sets[j] = s
        row = comp[j]
        token_row = lane_bias[i]  # (float32 rows in lane state 3: their sums are float64's, as in state 2)
        both_pairs = pair > 0 and own_row >= 0 and lane_rates[LANE_PAIR + i] > 0.0
        if both_pairs and n_experts == 2 and use_stretch:
            _geo_row_two(row, token_row, bias[i, pair], own_pair[i, own_row], i, s, geo, d_geo, stretch, d_stretch,
                         token_exp, d_token, logp, log1m, w[j])
            _normalize_log_row(row, ints, eight_sums)
            continue
        if both_pairs:
            shared_row, own_pair_row = bias[i, pair], own_pair[i, own_row]
            for v in range(vocab):
                row[v] = np.float64(token_row[v]) + shared_row[v] + own_pair_row[v]
        elif pair > 0:
            shared_row = bias[i, pair]
            for v in range(vocab):
                row[v] = np.float64(token_row[v]) + shared_row[v]
        else:
            row[:] = token_row
        for k in range(n_experts):
            weight = geo[i, s, k] + d_geo[i, s, k]
            w[j, k] = weight
            lk = logp[k]
            ek = token_exp[i, k]
            dk = d_token[i, k]
            if use_stretch:  # one pass over the row for both inputs of expert k
                weight_1m = stretch[i, s, k] + d_stretch[i, s, k]
                l1 = log1m[k]
                for v in range(vocab):
                    row[v] += (weight + (ek[v] + dk[v])) * lk[v] + weight_1m * l1[v]
            else:
                for v in range(vocab):
                    row[v] += (weight + (ek[v] + dk[v])) * lk[v]
        _normalize_log_row(row, ints, eight_sums)
    _final_and_sse_lane(comp, order_set, layout, final, d_final, apm, d_apm, logits, g, sse, out, eight_sums)


@njit(cache=True, inline="always")
def _linear_rows_lane(p, order_set, entropy_bucket, agree, layout, gates, d_gates, logits, w, comp, sets):
    """A lane's linear mixers (lane states 2-5): mixer j mixes the experts' rows with softmax(gates + the lane's
    deltas) of its weight set, into comp[j]; the weights kept in w[j], the set in sets[j]; ``logits``
    float64[>= K] scratch."""
    n_experts = p.shape[0]
    for j in range(layout[0]):
        s = select(layout[LAYOUT_HEAD + j], order_set, entropy_bucket, agree)
        sets[j] = s
        for k in range(n_experts):
            logits[k] = gates[j, s, k] + d_gates[j, s, k]
        _weighted_sum(p, n_experts, softmax_weights(logits[:n_experts]), w[j], comp[j])


@njit(cache=True, inline="always")
def _final_and_sse_lane(comp, order_set, layout, final, d_final, apm, d_apm, logits, g, sse, out, eight_sums):
    """A lane's final layer over its layer-1 rows ``comp`` into ``out`` float64[V] (the first mixer alone with
    one layer), then SSE with the shared table plus the lane's deltas (lane states 2-5); ``eight_sums``: SSE's
    sum in 8 partial sums. Without SSE, ``out`` keeps the final layer's sum: 1 to float64's rounding when the
    rows are float64 (the caller rescales float32 ones)."""
    n_comp, layers, use_sse = layout[0] + layout[1], layout[2], layout[3]
    if layers == 1:  # the one mixer alone (an ablation): no final layer
        g[0] = 1.0
        out[:] = comp[0]
    else:
        for j in range(n_comp):
            logits[j] = final[j] + d_final[j]
        _weighted_sum(comp, n_comp, softmax_weights(logits[:n_comp]), g, out)
    sse[3] = 0.0
    if use_sse:
        top, p_top, rest, lo, frac = _sse_top(out, eight_sums)
        at_lo = min(max(apm[order_set, lo] + d_apm[order_set, lo], APM_MIN), 1.0 - APM_MIN)
        at_hi = min(max(apm[order_set, lo + 1] + d_apm[order_set, lo + 1], APM_MIN), 1.0 - APM_MIN)
        _sse_apply(out, top, p_top, rest, lo, frac, at_lo, at_hi, sse)


@njit(cache=True, inline="always")
def _two_level(shared, own, step, lane_rates, part, bound_lo, bound_hi):
    """(shared + a step, decay own + b step) for ``part``'s factors a, b and decay; the shared value kept in
    [bound_lo, bound_hi], the delta in +-(bound_hi - bound_lo)."""
    a, b, decay = lane_rates[LANE_SHARED + part], lane_rates[LANE_OWN + part], lane_rates[LANE_DECAY + part]
    width = bound_hi - bound_lo
    return min(max(shared + a * step, bound_lo), bound_hi), min(max(decay * own + b * step, -width), width)


@njit(cache=True, inline="always")
def _bias_update_lane(token_row, shared_row, own_row, row, target, rate, own_rate, decay):
    """``_bias_update`` of a lane's token-bias row and the shared pair-bias row at ``rate``, and of the lane's
    own previous-token row at ``own_rate`` (skipped when ``own_rate`` is 0), in one pass."""
    if own_rate > 0.0:
        for v in range(token_row.shape[0]):
            step = rate * row[v]
            token_row[v] = decay * token_row[v] - step
            shared_row[v] = decay * shared_row[v] - step
            own_row[v] = decay * own_row[v] - own_rate * row[v]
        own_row[target] += own_rate
    else:
        for v in range(token_row.shape[0]):
            step = rate * row[v]
            token_row[v] = decay * token_row[v] - step
            shared_row[v] = decay * shared_row[v] - step
    token_row[target] += rate
    shared_row[target] += rate


@njit(cache=True)
def cm_learn_lane2(p, target, order_set, layout, state, own, lane_rates, scratch, rates, eight_sums=False):
    """``cm_learn`` for one lane of lane state 2. Each gradient step ``cm_learn`` would take from the lane's
    row moves the shared weight by the part's shared factor times the step and the lane's delta (decayed
    first) by its own factor times the step; the lane's token-bias rows and the shared pair-bias row take the
    step ``cm_learn`` takes, the lane's own previous-token row (where used) the same step at its bias rate
    times ``lane_rates[LANE_PAIR + i]``. ``eight_sums`` (lane state 4): the expectations in 8 partial sums
    (``_expectations_eight``). Mutates ``state`` and ``own``'s arrays (the caller sets the lane's previous
    token)."""
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
    shared_tok = lane_rates[LANE_SHARED + PART_TOKEN] * token_lr
    own_tok = lane_rates[LANE_OWN + PART_TOKEN] * token_lr
    decay_tok = lane_rates[LANE_DECAY + PART_TOKEN]
    for i in range(n_geo):
        j = n_lin + i
        s = sets[j]
        row = comp[j]
        for k in range(n_experts):
            lk = logp[k]
            l1 = log1m[k]  # (its expectation is unused without stretch inputs)
            table = token_exp[i, k]
            delta = d_token[i, k]
            if eight_sums:
                expected, expected_1m = _expectations_eight(row, lk, l1)
            else:  # (lane states 2-3: one running sum each, in order)
                expected, expected_1m = 0.0, 0.0
                for v in range(vocab):
                    expected += row[v] * lk[v]
                    expected_1m += row[v] * l1[v]
            if token_lr > 0.0:  # e(v) -= token_lr * (c(v) log p_k(v) - [v = y] log p_k(y)), split in two levels
                before, before_own = table[target], delta[target]
                for v in range(vocab):
                    term = row[v] * lk[v]
                    table[v] = min(max(table[v] - shared_tok * term, -TOKEN_EXP_MAX), TOKEN_EXP_MAX)
                    delta[v] = min(max(decay_tok * delta[v] - own_tok * term, -2.0 * TOKEN_EXP_MAX), 2.0 * TOKEN_EXP_MAX)
                # (the target's entry after both terms, in ``_expectations_update``'s order of operations)
                value = before - shared_tok * row[target] * lk[target] + shared_tok * lk[target]
                table[target] = min(max(value, -TOKEN_EXP_MAX), TOKEN_EXP_MAX)
                value = decay_tok * before_own - own_tok * row[target] * lk[target] + own_tok * lk[target]
                delta[target] = min(max(value, -2.0 * TOKEN_EXP_MAX), 2.0 * TOKEN_EXP_MAX)
            step = -geo_lr * (expected - logp[k, target])
            geo[i, s, k], d_geo[i, s, k] = _two_level(geo[i, s, k], d_geo[i, s, k], step, lane_rates, PART_GEO,
                                                      GEO_WEIGHT_MIN, GEO_WEIGHT_MAX)
            if use_stretch:
                step = -stretch_lr * (expected_1m - l1[target])
                stretch[i, s, k], d_stretch[i, s, k] = _two_level(stretch[i, s, k], d_stretch[i, s, k], step,
                                                                  lane_rates, PART_STRETCH, -STRETCH_WEIGHT_MAX,
                                                                  STRETCH_WEIGHT_MAX)
        bias_lr, bias_decay = rates[RATES_HEAD + 2 * i], rates[RATES_HEAD + 2 * i + 1]
        if pair > 0:
            own_rate = bias_lr * lane_rates[LANE_PAIR + i] if own_row >= 0 else 0.0
            _bias_update_lane(lane_bias[i], bias[i, pair], own_pair[i, max(own_row, 0)], row, target, bias_lr,
                              own_rate, bias_decay)
        else:
            _bias_update(lane_bias[i], row, target, bias_lr, bias_decay)
    _learn_sse_lane(target, order_set, apm, d_apm, sse, lane_rates, sse_rate)


@njit(cache=True, inline="always")
def _learn_gates_lane(p, target, layout, gates, d_gates, final, d_final, comp, w, g, sets, lane_rates, lr, final_lr):
    """A lane's learning steps of the final layer's gates and of its linear mixers' gates (lane states 2-5),
    each split between the shared weight and the lane's delta (``_two_level``)."""
    n_lin, layers = layout[0], layout[2]
    n_comp = n_lin + layout[1]
    unbounded = math.inf
    if layers != 1:
        mixed = 0.0  # the final layer's p(target), before SSE
        for j in range(n_comp):
            mixed += g[j] * comp[j, target]
        for j in range(n_comp):
            step = final_lr * g[j] * (comp[j, target] / mixed - 1.0)
            final[j], d_final[j] = _two_level(final[j], d_final[j], step, lane_rates, PART_FINAL, -unbounded,
                                              unbounded)
    for j in range(n_lin):
        s = sets[j]
        c = comp[j, target]
        for k in range(p.shape[0]):
            step = lr * w[j, k] * (p[k, target] / c - 1.0)
            gates[j, s, k], d_gates[j, s, k] = _two_level(gates[j, s, k], d_gates[j, s, k], step, lane_rates,
                                                          PART_GATES, -unbounded, unbounded)


@njit(cache=True, inline="always")
def _learn_sse_lane(target, order_set, apm, d_apm, sse, lane_rates, sse_rate):
    """A lane's SSE step (lane states 2-5), when its row applied SSE: the two table entries around its
    position move toward [target == top], split between the shared table and the lane's delta."""
    if sse[3] > 0.0:
        hit = 1.0 if target == int(sse[0]) else 0.0
        lo = int(sse[2])
        frac = sse[2] - lo
        for b, share in ((lo, 1.0 - frac), (lo + 1, frac)):
            value = min(max(apm[order_set, b] + d_apm[order_set, b], APM_MIN), 1.0 - APM_MIN)
            step = sse_rate * share * (hit - value)
            apm[order_set, b], d_apm[order_set, b] = _two_level(apm[order_set, b], d_apm[order_set, b], step,
                                                                lane_rates, PART_APM, APM_MIN, 1.0 - APM_MIN)


@njit(cache=True, nogil=True)  # the lane engine's second thread works meanwhile (lanes.py)
def cm_rows_lanes2(p, ctx, base, ngram, layout, state, lanes, lane_rates, scratch, out, eight_sums=False):
    """Lane states 2-4: ``cm_row_lane2`` for each lane j of ``p`` float64[La, K, V] with its contexts
    ``ctx[j]``, into ``out`` float64[La, V]. ``lanes``: (last int64[L], bias [L, n_geo, V], gates [L, n_lin, S, K],
    geo [L, n_geo, S, K], stretch [L, n_geo, S, K], token_exp [L, n_geo, K, V], final [L, M],
    apm [L, ORDER_SETS, APM_BINS], pair [L, n_geo, R, V]): each lane's previous token, token-bias rows, deltas
    and own previous-token rows. The tables of V columns (those four and the state's shared bias rows) are
    float64 in lane state 2 and float32 in 3 and 4: numba compiles each, the arithmetic is float64 in all, and
    lane states 3 and 4 round what they store and sum in 8 partial sums (``eight_sums``). ``scratch``: as
    ``cm_rows_lanes``', kept for ``cm_learn_lanes2``. No state change."""
    for j in range(p.shape[0]):
        cm_row_lane2(p[j], ctx[j, 0], ctx[j, 1], base, ngram, layout, state, _lane_own(lanes, j), lane_rates,
                     _lane_scratch(scratch, j), out[j], eight_sums)


@njit(cache=True, nogil=True)  # the lane engine's second thread works meanwhile (lanes.py)
def cm_learn_lanes2(p, targets, ctx, layout, state, lanes, lane_rates, scratch, rates, eight_sums=False):
    """Lane states 2-4: ``cm_learn_lane2`` for lane 0, 1, ... in turn, from the rows ``cm_rows_lanes2`` computed
    for them (lane j's steps of the shared weights apply on top of those of lanes < j), then each lane's
    previous token is its token (``eight_sums``: lane state 4's expectations). Mutates ``state`` and
    ``lanes``."""
    last = lanes[0]
    for j in range(targets.shape[0]):
        cm_learn_lane2(p[j], targets[j], ctx[j, 0], layout, state, _lane_own(lanes, j), lane_rates,
                       _lane_scratch(scratch, j), rates, eight_sums)
        last[j] = targets[j]
