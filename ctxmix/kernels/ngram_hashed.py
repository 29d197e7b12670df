"""Hashed n-gram counts (the Parameter Golf PR #909 cache shape), made honest by full normalization.

Per order n (K orders lo..hi, row i = n - lo) there are B buckets of context counts and B buckets of
(context, token) counts:

    h          = hash of the last n-1 tokens (a chained 64-bit mix, one step per context token)
    ctx bucket = h mod B
    pair(v)    = (h ^ (v * PAIR_PRIME)) mod B

Buckets are shared by colliding contexts, so ``pair_counts[pair(v)] / ctx_counts[h mod B]`` is not a
distribution: summed over v it can be far above 1 (the bug ctxmix exists to catch). Here the count of v
is c(v) = pair_counts[pair(v)], and the context's N and D are computed from the same numbers, over ALL V
tokens: N = sum_v c(v), D = #{v: c(v) > 0}. With those, the interpolation in ``ngram_chain`` is
normalized exactly, whatever collides with what. The kernels here only produce these numbers (and
count); ``ngram_chain`` turns them into probabilities, as for the exact tables.

The price of honesty: N and D need V bucket reads per order per position, so the target path costs
O(orders * V) (about as much as the full path), against O(orders) for the exact tables.

An order is inactive (N = 0 is reported, so p_n = p_{n-1}) when fewer than n-1 tokens precede t, when
its context bucket count is 0 (the context was never seen: a zero has no false negatives; this also
skips the O(V) sum), or when N = 0. That is a function of the past only, so the model stays causal
and normalized.
"""

from __future__ import annotations

import numpy as np
from numba import njit

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
def _fill_context_hashes(window, end, hashes):
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
def _fill_context_counts(pair_row, h, counts):
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
def _fill_order_counts(ctx_counts, pair_counts, i, h, counts):
    """Order row i, context hash h (-1: no context): ``(N, D)``, with c(v) of every v in ``counts``
    int32[V] when the context bucket was ever counted; (0, 0) otherwise."""
    if h < 0 or ctx_counts[i, h % ctx_counts.shape[1]] == 0:
        return 0, 0
    return _fill_context_counts(pair_counts[i], h, counts)


@njit(cache=True)
def _position_update(ctx_counts, pair_counts, hashes, lo, token, exclusion):
    """Count ``token`` after its contexts, every order. Under update exclusion order n's pair count only
    grows when order n+1's pair bucket was empty (a novel continuation there), as in Kneser-Ney.
    Returns True when order lo's pair bucket was empty (or order lo had no context): the novelty the
    base unigram counts by under exclusion."""
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
    return novel_above


@njit(cache=True)
def ngram_hashed_count_update(ctx_counts, pair_counts, window, exclusion, stats, count_rows):
    """Record each position's numbers, then count it, over a chunk of T positions.

    ``ctx_counts``, ``pair_counts`` int32[K, B] (row i: order lo + i, lo = H + 2 - K). ``window``
    int64[H + T]: the H = hi - 1 tokens before the chunk (-1 where the stream had none), then the chunk.
    ``stats`` int64[K, 3, T] is written: (c(target), N, D) per order before t (0 where inactive).
    ``count_rows`` int32[K, T, V] also gets c(v) of every v where N > 0, or has shape [K, 0, V] on the
    target path. Returns novel bool[T]: order lo's pair bucket for the target was empty before t.
    Mutates the two count tables, ``stats`` and ``count_rows``. O(K * V) per position.
    """
    n_orders = ctx_counts.shape[0]
    n = stats.shape[2]
    history = window.shape[0] - n
    lo = history + 2 - n_orders
    hashes = np.empty(history, np.int64)
    counts = np.empty(count_rows.shape[2], np.int32)
    novel = np.empty(n, np.bool_)
    with_rows = count_rows.shape[1] > 0
    for t in range(n):
        end = history + t
        _fill_context_hashes(window, end, hashes)
        token = window[end]
        for i in range(n_orders):
            total, distinct = _fill_order_counts(ctx_counts, pair_counts, i, hashes[lo + i - 2], counts)
            stats[i, 0, t] = counts[token] if total > 0 else 0
            stats[i, 1, t] = total
            stats[i, 2, t] = distinct
            if with_rows and total > 0:
                count_rows[i, t, :] = counts
        novel[t] = _position_update(ctx_counts, pair_counts, hashes, lo, token, exclusion)
    return novel


@njit(cache=True)
def ngram_hashed_context(ctx_counts, pair_counts, history, vocab_size):
    """Stepwise: the numbers for the position after ``history`` int64[H] (the last hi - 1 tokens, -1
    where none). Returns ``(totals, count_rows)``: totals int64[K, 2] = (N, D) per order, count_rows
    int32[K, V] = c(v) where N > 0 (zeros elsewhere). Reads the count tables only."""
    n_orders = ctx_counts.shape[0]
    lo = history.shape[0] + 2 - n_orders
    hashes = np.empty(history.shape[0], np.int64)
    totals = np.zeros((n_orders, 2), np.int64)
    count_rows = np.zeros((n_orders, vocab_size), np.int32)
    _fill_context_hashes(history, history.shape[0], hashes)
    for i in range(n_orders):
        total, distinct = _fill_order_counts(ctx_counts, pair_counts, i, hashes[lo + i - 2], count_rows[i])
        totals[i, 0] = total
        totals[i, 1] = distinct
    return totals, count_rows
