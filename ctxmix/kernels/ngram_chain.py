"""The n-gram estimator: interpolation from the lowest order up, with learned escapes.

The table kernels (``ngram_exact``, ``ngram_hashed``) reduce each position to numbers per order: for the
context of order n (the n-1 tokens before t), N = sum of its stored continuation counts, D = how many of
those counts are > 0, and c(v) = the count of v after it (of the target only on the fast path, of every
v on the full path). The kernels here turn those into probabilities, identically for both table kinds.

One step, for an order whose context has N > 0 (otherwise p_n = p_{n-1}):

    p_n(v) = (s * (c(v) - d [c(v) > 0]) + e * p_{n-1}(v)) / (e + s * (N - d D)),   e = beta + d D

with discount 0 <= d < 1, strength beta (beta + d > 0), and s = exp(-w) > 0. With s = 1 this is
interpolated absolute discounting (hierarchical Pitman-Yor / Kneser-Ney). Summed over v the numerator is
s (N - d D) + e, the denominator: every step is normalized exactly when p_{n-1} is, and p_n > 0 wherever
p_{n-1} > 0 (e > 0, and N - d D >= (1 - d) D > 0).

The learned escape ("SEE", secondary escape estimation, as in PPMd): s is looked up in a small table by
(order, N bucket, D bucket) and, after each position is scored, moved by one gradient step of
log p(target) in w = -log s (learning rate ``rate``; 0 keeps plain Kneser-Ney). In terms of the escape
weight E = e / (e + s (N - d D)), p_n = (1 - E) q + E p_{n-1} with q(v) = (c(v) - d [c > 0]) / (N - d D),
so logit(E) = log(e / (N - d D)) + w and

    g_n = d log p_top / d w_n = (prod of E_j over active orders j > n) * E_n (1 - E_n) (p_{n-1} - q)(target) / p_top.

|g_n| <= 1 (p_top >= reach * E_n * p_{n-1} and >= reach * (1 - E_n) * q), so with rate <= 1 the step
w += rate * g is taken as s *= 1 - rate * g (its first-order form, > 0, no exp per position), and s is
kept within [exp(-8), exp(8)].

The table only changes after the target was scored (rule 3), and every path (target only, full rows,
stepwise) runs the same arithmetic on the same numbers, so they agree float for float (rule 4).
"""

from __future__ import annotations

import numpy as np
from numba import njit

N_BUCKETS = 9  # N = 1, 2-3, 4-7, ..., 128-255, 256+ (floor of log2)
D_BUCKETS = 6  # D = N (all continuations seen once); else D = 1, 2-3, 4-7, 8-15, 16+
SCALE_MIN, SCALE_MAX = float(np.exp(-8.0)), float(np.exp(8.0))  # s in [3e-4, 3e3]: 0 < E < 1 with room to spare
MAX_RATE = 1.0  # rate * |g| <= 1 keeps 1 - rate * g >= 0; the expert's option is bounded by this
# The kernels use numpy's error model: a division is not checked for a zero divisor (Python's model tests
# each one and would raise). Every divisor here is > 0 by construction (e > 0, p > 0); 5% faster on the
# target path (measured).


@njit(cache=True, nogil=True, inline="always")
def _log2_bucket(x, n_buckets):
    """min(floor(log2 x), n_buckets - 1) for x >= 1 (a short compare ladder: this runs per order per
    position)."""
    bucket = 0
    limit = 2
    while bucket < n_buckets - 1 and x >= limit:
        bucket += 1
        limit <<= 1
    return bucket


@njit(cache=True, nogil=True, inline="always")
def interpolate(count, p_lower, discount, scale, escape, inv_denom):
    """One token's p_n from its count c (>= 0) and p_{n-1}; see the module docstring. ``inv_denom`` is
    1 / denominator, computed once per order and position (a multiply per token instead of a divide).
    The target path's loop (``chain_target``) writes the same expression out for its one token."""
    kept = count - discount if count > 0 else 0.0
    return (scale * kept + escape * p_lower) * inv_denom


@njit(cache=True, nogil=True, inline="always")
def _learn_update(scales, slots, n_active, lower, q, escape_weight, p_top, rate):
    """One gradient step of log p_top on the escape scale of each active order (``chain_target``'s
    records 0..n_active-1; the top order first, so ``reach`` = d p_top / d p_n is the product of the
    escape weights E above n). ``scales``: the escape scales flattened, ``slots`` the records' indexes."""
    reach = 1.0
    for k in range(n_active - 1, -1, -1):
        e = escape_weight[k]
        grad = reach * e * (1.0 - e) * (lower[k] - q[k]) / p_top
        scale = scales[slots[k]] * (1.0 - rate * grad)
        scales[slots[k]] = min(max(scale, SCALE_MIN), SCALE_MAX)
        reach *= e


@njit(cache=True, nogil=True)
def bucket_tables():
    """Escape buckets as lookup tables (a compare ladder per order and position costs): N bucket of min(N, 2^(N_BUCKETS-1)), and 1 + the D
    bucket of min(D, 2^(D_BUCKETS-2)) (a D = N context is bucket 0 whatever D is)."""
    n_table = np.empty((1 << (N_BUCKETS - 1)) + 1, np.int64)
    for x in range(1, n_table.shape[0]):
        n_table[x] = _log2_bucket(x, N_BUCKETS)
    n_table[0] = 0
    d_table = np.empty((1 << (D_BUCKETS - 2)) + 1, np.int64)
    for x in range(1, d_table.shape[0]):
        d_table[x] = 1 + _log2_bucket(x, D_BUCKETS - 1)
    d_table[0] = 1
    return n_table, d_table


@njit(cache=True, nogil=True, inline="always")
def chain_scratch(n_orders):
    """The arrays ``chain_target`` fills at each position, one record per active order, lowest first:
    (active: its order row, slots: its escape scale's index in the flattened scales, lower, q,
    escape_weight). Inlined: as a call, the fast path ran 17% slower (measured)."""
    return (np.zeros(n_orders, np.int64), np.zeros(n_orders, np.int64), np.zeros(n_orders), np.zeros(n_orders),
            np.zeros(n_orders))


@njit(cache=True, nogil=True, inline="always")
def chain_target(stats, t, p_t, params, scales, n_table, d_table, active, slots, lower, q, escape_weight):
    """p_top(target) at position t from p_base(target) = ``p_t`` (``scales`` flattened), recording
    what learning needs (``chain_scratch``: the order row, escape scale, p_{n-1}(target), q(target)
    and E of each active order, packed); returns (p_top, the number of active orders). Every path runs
    it; the full-row and stepwise paths then interpolate every token with ``_interpolate_row``. One
    token's step is ``interpolate`` written out, and nothing here is a call: helpers taking arrays,
    called per order and position, made this loop about 5x slower (measured, numba 0.68), and this loop
    is the fast path. (Packed records and one flat index per scale, rather than a flag per order and
    two bucket indexes: 11% faster on enwik8.first1MB, measured.)"""
    n_active = 0
    for i in range(stats.shape[1]):
        total = stats[t, i, 1]
        if total <= 0:
            continue
        distinct = stats[t, i, 2]
        count = stats[t, i, 0]
        discount = params[i, 0]
        n_bucket = n_table[min(total, n_table.shape[0] - 1)]
        d_bucket = 0 if distinct == total else d_table[min(distinct, d_table.shape[0] - 1)]
        slot = (i * N_BUCKETS + n_bucket) * D_BUCKETS + d_bucket
        scale = scales[slot]
        escape = params[i, 1] + discount * distinct
        kept_total = total - discount * distinct
        inv_denom = 1.0 / (escape + scale * kept_total)
        kept = count - discount if count > 0 else 0.0
        active[n_active] = i
        slots[n_active] = slot
        lower[n_active] = p_t
        q[n_active] = kept / kept_total
        escape_weight[n_active] = escape * inv_denom
        n_active += 1
        p_t = (scale * kept + escape * p_t) * inv_denom
    return p_t, n_active


@njit(cache=True, nogil=True, inline="always")
def _interpolate_row(row, counts, stats, t, i, params, scale):
    """Order row i's step over every token of ``row`` (p_{n-1} on entry, p_n on return), with the
    escape scale ``chain_target`` used at position t: the same terms, from the same expressions."""
    discount = params[i, 0]
    distinct = stats[t, i, 2]
    escape = params[i, 1] + discount * distinct
    inv_denom = 1.0 / (escape + scale * (stats[t, i, 1] - discount * distinct))
    for v in range(row.shape[0]):
        row[v] = interpolate(counts[v], row[v], discount, scale, escape, inv_denom)


@njit(cache=True, nogil=True, inline="always")
def interpolate_listed(row, tokens, counts, n_listed, stats, t, i, params, scale, values):
    """``_interpolate_row`` where c(v) is 0 but for the ``n_listed`` tokens ``tokens`` (counts ``counts``):
    the same floats, without a dense row of counts. A token of count 0 gets (s * 0 + e p) / denominator,
    and s * 0 + x is x, so every token takes (e p) / denominator in one pass that vectorizes; the listed
    tokens take theirs from p before that pass (``values``: float64 scratch of >= ``n_listed``)."""
    discount = params[i, 0]
    distinct = stats[t, i, 2]
    escape = params[i, 1] + discount * distinct
    inv_denom = 1.0 / (escape + scale * (stats[t, i, 1] - discount * distinct))
    for c in range(n_listed):
        values[c] = interpolate(counts[c], row[tokens[c]], discount, scale, escape, inv_denom)
    for v in range(row.shape[0]):
        row[v] = (escape * row[v]) * inv_denom
    for c in range(n_listed):
        row[tokens[c]] = values[c]


@njit(cache=True, nogil=True, error_model="numpy")
def ngram_chain_update(stats, p_base, params, lo, scales, rate, features):
    """Target path over a chunk: p_top(token_t) for each t, learning after each position.

    ``stats`` int32[T, K, 3]: per position and order row i (order lo + i), (c(target), N, D) before t.
    ``p_base`` float64[T]: the base p(target). ``params`` float64[K, 2]: (discount, strength) per order.
    ``scales`` float64[K, N_BUCKETS, D_BUCKETS]: escape scales s, 1 = plain KN (mutated when ``rate`` > 0).
    ``features`` float64[3, T]: (order, N, D) of the longest active order, written where one is active.
    Returns p float64[T].
    """
    return ngram_chain_update_with(stats, p_base, params, lo, scales, rate, features, bucket_tables(),
                                   chain_scratch(stats.shape[1]))


@njit(cache=True, nogil=True, error_model="numpy")
def ngram_chain_update_with(stats, p_base, params, lo, scales, rate, features, tables, scratch):
    """``ngram_chain_update`` with ``bucket_tables()`` and its ``chain_scratch`` given (the lanes call it
    per lane and position)."""
    n = stats.shape[0]
    p = np.empty(n)
    flat_scales = scales.reshape(-1)
    active, slots, lower, q, escape_weight = scratch
    n_table, d_table = tables
    for t in range(n):
        p_t, n_active = chain_target(stats, t, p_base[t], params, flat_scales, n_table, d_table, active, slots,
                                     lower, q, escape_weight)
        # (written out, as in ngram_chain_full_update: as an inlined helper taking the arrays, this
        # loop took 23.5 instead of 18.7 ms on enwik8.first1MB, measured)
        if n_active:
            top = active[n_active - 1]
            features[0, t] = lo + top
            features[1, t] = stats[t, top, 1]
            features[2, t] = stats[t, top, 2]
        p[t] = p_t
        if rate > 0.0:
            _learn_update(flat_scales, slots, n_active, lower, q, escape_weight, p_t, rate)
    return p


@njit(cache=True, nogil=True, error_model="numpy")
def ngram_chain_full_update(stats, count_rows, rows, tokens, params, lo, scales, rate, features):
    """Full path: as ``ngram_chain_update`` on whole rows.

    ``count_rows`` int32[K, T, V]: c(v) of every v (read where the order is active). ``rows``
    float64[T, V]: the base distributions on entry, p_top on return. ``tokens`` int64[T]: the targets
    (for learning, after each row is complete).
    """
    n_orders = stats.shape[1]
    flat_scales = scales.reshape(-1)
    active, slots, lower, q, escape_weight = chain_scratch(n_orders)
    n_table, d_table = bucket_tables()
    for t in range(rows.shape[0]):
        token = tokens[t]
        row = rows[t]
        _p, n_active = chain_target(stats, t, row[token], params, flat_scales, n_table, d_table, active, slots,
                                    lower, q, escape_weight)
        for k in range(n_active):
            _interpolate_row(row, count_rows[active[k], t], stats, t, active[k], params, flat_scales[slots[k]])
        if n_active:
            top = active[n_active - 1]
            features[0, t] = lo + top
            features[1, t] = stats[t, top, 1]
            features[2, t] = stats[t, top, 2]
        if rate > 0.0:
            _learn_update(flat_scales, slots, n_active, lower, q, escape_weight, row[token], rate)


@njit(cache=True, error_model="numpy")
def ngram_chain_distribution(totals, count_rows, p_base, params, lo, scales):
    """Stepwise: the distribution for the next position; reads state only.

    ``totals`` int64[K, 2]: (N, D) per order; ``count_rows`` int32[K, V]: c(v) per order (read where
    N > 0); ``p_base`` float64[V]. Returns ``(p float64[V], features float64[3])`` = (order, N, D).
    """
    row = p_base.copy()
    features = np.zeros(3)
    stats = np.zeros((1, totals.shape[0], 3), np.int32)  # the chain's layout; no target, so c = 0
    stats[0, :, 1:] = totals
    flat_scales = scales.reshape(-1)
    active, slots, lower, q, escape_weight = chain_scratch(totals.shape[0])
    n_table, d_table = bucket_tables()
    _p, n_active = chain_target(stats, 0, 1.0, params, flat_scales, n_table, d_table, active, slots, lower, q,
                                escape_weight)
    for k in range(n_active):
        _interpolate_row(row, count_rows[active[k]], stats, 0, active[k], params, flat_scales[slots[k]])
    if n_active:
        top = active[n_active - 1]
        features[0] = lo + top
        features[1] = totals[top, 0]
        features[2] = totals[top, 1]
    return row, features
