"""Hashed n-gram counts (the Parameter Golf PR #909 cache shape), made honest by full normalization.

Per order n (K orders lo..hi, row i = n - lo) there are B buckets of context counts and B buckets of
(context, token) counts:

    h          = hash of the last n-1 tokens (a chained 64-bit mix, one step per context token)
    ctx bucket = h mod B
    pair(v)    = (h ^ (v * PAIR_PRIME)) mod B

Buckets are shared by colliding contexts, so ``pair_counts[pair(v)] / ctx_counts[h mod B]`` is not a
distribution: summed over v it can be far above 1 (the bug ctxmix exists to catch). Here the count of v
is c(v) = pair_counts[pair(v)], and the context's N and D are computed from the same numbers, over ALL V
tokens: N = sum_v c(v), D = #{v: c(v) > 0}. With those, the interpolation in ``ngram_common`` is
normalized exactly, whatever collides with what.

The price of honesty: N and D need V bucket reads per order per position, so the target path costs
O(orders * V) (about as much as the full path), against O(orders) for the exact tables.

An order is skipped (p_n = p_{n-1}) when fewer than n-1 tokens precede t, when its context bucket count is
0 (the context was never seen: exact, as there are no false zeros), or when N = 0. Skipping is a function
of the past only, so the model stays causal and normalized.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .ngram_common import escape_terms, interpolate

PAIR_PRIME = 2654435761  # the "token * large prime" of the PR #909 pair key (Knuth's multiplicative prime)
_CONTEXT_MULT = 0x5BD1E995  # odd: spreads token ids before each mixing step
_MIX_1 = -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64 (splitmix64 finalizer)
_MIX_2 = -7723592293110705685  # 0x94D049BB133111EB as int64
_LOW_63 = 0x7FFFFFFFFFFFFFFF


@njit(cache=True)
def _mix(h):
    """splitmix64's finalizer on int64 (logical shifts by masking), result in [0, 2^63)."""
    h = h ^ ((h >> 30) & 0x3FFFFFFFF)
    h = h * _MIX_1
    h = h ^ ((h >> 27) & 0x1FFFFFFFFF)
    h = h * _MIX_2
    h = h ^ ((h >> 31) & 0x1FFFFFFFF)
    return h & _LOW_63


@njit(cache=True)
def _context_hashes(window, end, hashes):
    """hashes[j] = hash of the j+1 tokens window[end-j-1 .. end-1], or -1 where one is missing (< 0)."""
    h = 0
    missing = False
    for j in range(hashes.shape[0]):
        token = window[end - 1 - j] if end - 1 - j >= 0 else -1
        if token < 0:
            missing = True
        if missing:
            hashes[j] = -1
        else:
            h = _mix(h + (token + 1) * _CONTEXT_MULT)
            hashes[j] = h


@njit(cache=True)
def _pair_bucket(h, token, n_buckets):
    return (h ^ (token * PAIR_PRIME)) % n_buckets


@njit(cache=True)
def _context_counts(pair_row, h, counts):
    """counts[v] = c(v) for every v; returns (N, D) = (sum of c, number of c > 0)."""
    n_buckets = pair_row.shape[0]
    total = 0
    distinct = 0
    for v in range(counts.shape[0]):
        c = pair_row[_pair_bucket(h, v, n_buckets)]
        counts[v] = c
        total += c
        if c > 0:
            distinct += 1
    return total, distinct


@njit(cache=True)
def _order_stats(ctx_counts, pair_counts, i, h, params, counts):
    """Order row i with context hash h (-1: no context): ``(active, N, D, escape, denom)``; fills
    ``counts`` int64[V] with c(v) when the context was seen."""
    if h < 0 or ctx_counts[i, h % ctx_counts.shape[1]] == 0:
        return False, 0, 0, 0.0, 1.0
    total, distinct = _context_counts(pair_counts[i], h, counts)
    if total == 0:
        return False, 0, 0, 0.0, 1.0
    escape, denom = escape_terms(total, distinct, params[i, 0], params[i, 1])
    return True, total, distinct, escape, denom


@njit(cache=True)
def _count_position(ctx_counts, pair_counts, hashes, lo, token, exclusion):
    """Count ``token`` after its contexts, every order. Under update exclusion order n's pair count only
    grows when order n+1's pair bucket was empty (a novel continuation there), as in Kneser-Ney."""
    n_buckets = ctx_counts.shape[1]
    novel_above = True  # the top order always counts
    for i in range(ctx_counts.shape[0] - 1, -1, -1):
        h = hashes[lo + i - 2]
        if h < 0:
            novel_above = True
            continue
        bucket = _pair_bucket(h, token, n_buckets)
        was_empty = pair_counts[i, bucket] == 0
        ctx_counts[i, h % n_buckets] += 1
        if novel_above or not exclusion:
            pair_counts[i, bucket] += 1
        novel_above = was_empty


@njit(cache=True)
def ngram_hashed_score_update(ctx_counts, pair_counts, window, params, exclusion, vocab_size, p_lower, features):
    """Target path over a chunk of T positions, each scored before it is counted.

    ``ctx_counts``, ``pair_counts`` int32[K, B] (row i: order lo + i). ``window`` int64[H + T]: the
    H = hi - 1 tokens before the chunk (-1 where the stream had none), then the chunk. ``params``
    float64[K, 2] = (discount, strength) per order. ``p_lower`` float64[T]: the base p(target).
    ``features`` float64[3, T]: (order, N, D) of the longest active order, written where one is active.
    Returns p float64[T]. Mutates the two count tables and ``features``. O(K * V) per position.
    """
    n_orders = params.shape[0]
    n = p_lower.shape[0]
    history = window.shape[0] - n
    lo = history + 2 - n_orders
    hashes = np.empty(history, np.int64)
    counts = np.empty(vocab_size, np.int64)
    p = np.empty(n)
    for t in range(n):
        end = history + t
        _context_hashes(window, end, hashes)
        token = window[end]
        p_t = p_lower[t]
        for i in range(n_orders):
            active, total, distinct, escape, denom = _order_stats(ctx_counts, pair_counts, i, hashes[lo + i - 2], params, counts)
            if active:
                p_t = interpolate(counts[token], p_t, params[i, 0], escape, denom)
                features[0, t] = lo + i
                features[1, t] = total
                features[2, t] = distinct
        p[t] = p_t
        _count_position(ctx_counts, pair_counts, hashes, lo, token, exclusion)
    return p


@njit(cache=True)
def ngram_hashed_full_update(ctx_counts, pair_counts, window, params, exclusion, rows, features):
    """Full path: as ``ngram_hashed_score_update``, with ``rows`` float64[T, V] holding the base
    distributions on entry and the order-hi distributions on return."""
    n_orders = params.shape[0]
    n = rows.shape[0]
    history = window.shape[0] - n
    lo = history + 2 - n_orders
    hashes = np.empty(history, np.int64)
    counts = np.empty(rows.shape[1], np.int64)
    for t in range(n):
        end = history + t
        _context_hashes(window, end, hashes)
        for i in range(n_orders):
            active, total, distinct, escape, denom = _order_stats(ctx_counts, pair_counts, i, hashes[lo + i - 2], params, counts)
            if active:
                for v in range(rows.shape[1]):
                    rows[t, v] = interpolate(counts[v], rows[t, v], params[i, 0], escape, denom)
                features[0, t] = lo + i
                features[1, t] = total
                features[2, t] = distinct
        _count_position(ctx_counts, pair_counts, hashes, lo, window[end], exclusion)


@njit(cache=True)
def ngram_hashed_distribution(ctx_counts, pair_counts, history, params, p_lower):
    """Stepwise: the distribution for the position after ``history`` int64[H] (the last hi - 1 tokens,
    -1 where none), from the base ``p_lower`` float64[V]. Returns ``(p float64[V], features float64[3])``
    = (order, N, D). Reads state only."""
    n_orders = params.shape[0]
    lo = history.shape[0] + 2 - n_orders
    hashes = np.empty(history.shape[0], np.int64)
    counts = np.empty(p_lower.shape[0], np.int64)
    row = p_lower.copy()
    features = np.zeros(3)
    _context_hashes(history, history.shape[0], hashes)
    for i in range(n_orders):
        active, total, distinct, escape, denom = _order_stats(ctx_counts, pair_counts, i, hashes[lo + i - 2], params, counts)
        if active:
            for v in range(row.shape[0]):
                row[v] = interpolate(counts[v], row[v], params[i, 0], escape, denom)
            features[0] = lo + i
            features[1] = total
            features[2] = distinct
    return row, features
