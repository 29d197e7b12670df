"""Slow, obviously correct versions of the unigram and n-gram kernels, for the tests to compare against.

Plain Python dicts and NumPy rows, one position at a time, straight from the formulas in
``ctxmix/kernels/ngram_chain.py`` (no tables, no chunking, no shared code with the package). Each
function returns full distributions float64[T, V] (row t before token t is counted) and the features
(order, N, D) float64[3, T].
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

BASE_ALPHA = 0.5
N_BUCKETS, D_BUCKETS = 9, 6
SCALE_MIN, SCALE_MAX = float(np.exp(-8.0)), float(np.exp(8.0))


def unigram_rows(tokens, vocab_size, alpha=BASE_ALPHA, increments=None):
    """p_t(v) = (c(v) + alpha) / (n + alpha V) over the tokens counted before t."""
    counts = np.zeros(vocab_size)
    rows = np.empty((len(tokens), vocab_size))
    for t, token in enumerate(tokens):
        rows[t] = (counts + alpha) / (counts.sum() + alpha * vocab_size)
        counts[token] += 1 if increments is None else increments[t]
    return rows


def escape_bucket(total, distinct):
    n_bucket = min(int(np.floor(np.log2(total))), N_BUCKETS - 1)
    d_bucket = 0 if distinct == total else 1 + min(int(np.floor(np.log2(distinct))), D_BUCKETS - 2)
    return n_bucket, d_bucket


class Chain:
    """The estimator: per position, the (N, D, c row) of each order -> distribution, then learning."""

    def __init__(self, lo, hi, discount, strength, escape_rate):
        self.lo, self.hi = lo, hi
        n_orders = hi - lo + 1
        self.discount = [discount[min(i, len(discount) - 1)] for i in range(n_orders)]
        self.strength = [strength[min(i, len(strength) - 1)] for i in range(n_orders)]
        self.rate = escape_rate
        self.scales = np.ones((n_orders, N_BUCKETS, D_BUCKETS))

    def row(self, base_row, orders, target=None):
        """``orders``: per order lo..hi, None (inactive) or (N, D, counts float[V]). Learns from
        ``target`` when given. Returns (row, (order, N, D))."""
        row = base_row.copy()
        feature = (0.0, 0.0, 0.0)
        steps = []
        for i, info in enumerate(orders):
            if info is None:
                continue
            total, distinct, counts = info
            d, beta = self.discount[i], self.strength[i]
            bucket = escape_bucket(total, distinct)
            scale = self.scales[i][bucket]
            escape = beta + d * distinct
            kept_total = total - d * distinct
            denom = escape + scale * kept_total
            kept = np.where(counts > 0, counts - d, 0.0)
            if target is not None:
                steps.append((i, bucket, row[target], kept[target] / kept_total, escape / denom))
            row = (scale * kept + escape * row) / denom
            feature = (float(self.lo + i), float(total), float(distinct))
        if target is not None and self.rate > 0:
            p_top = row[target]
            reach = 1.0
            for i, bucket, lower, q, e in reversed(steps):
                grad = reach * e * (1 - e) * (lower - q) / p_top
                self.scales[i][bucket] = min(max(self.scales[i][bucket] * (1 - self.rate * grad), SCALE_MIN), SCALE_MAX)
                reach *= e
        return row, feature


def exact_rows(tokens, vocab_size, lo=2, hi=11, discount=(0.5, 0.7, 0.85, 0.95), strength=(0.7, 0.0),
               exclusion=True, escape_rate=0.05):
    """The exact-table n-gram expert, with n-grams as tuples in dicts (no memory cap)."""
    tokens = [int(x) for x in tokens]
    counts = [defaultdict(lambda: defaultdict(int)) for _ in range(hi + 2)]  # order -> context -> token -> c
    seen = [set() for _ in range(hi + 2)]  # length -> n-grams (tuples) that occurred
    chain = Chain(lo, hi, discount, strength, escape_rate)
    unigram = np.zeros(vocab_size)
    rows = np.empty((len(tokens), vocab_size))
    features = np.zeros((3, len(tokens)))
    for t, x in enumerate(tokens):
        base = (unigram + BASE_ALPHA) / (unigram.sum() + BASE_ALPHA * vocab_size)
        orders = []
        for n in range(lo, hi + 1):
            context = tuple(tokens[t - n + 1 : t]) if t >= n - 1 else None
            stored = counts[n].get(context) if context is not None else None
            total = sum(stored.values()) if stored else 0
            if total == 0:
                orders.append(None)
                continue
            row = np.zeros(vocab_size)
            for v, c in stored.items():
                row[v] = c
            orders.append((total, sum(1 for c in stored.values() if c > 0), row))
        rows[t], features[:, t] = chain.row(base, orders, target=x)

        def novel(length, t=t):  # the n-gram of this length ending at t had not occurred before t
            return t < length - 1 or tuple(tokens[t - length + 1 : t + 1]) not in seen[length]

        unigram[x] += 1 if (not exclusion or novel(lo)) else 0
        for n in range(lo, hi + 1):
            if t >= n - 1 and (not exclusion or n == hi or novel(n + 1)):
                counts[n][tuple(tokens[t - n + 1 : t])][x] += 1
        for length in range(1, hi + 2):
            if t >= length - 1:
                seen[length].add(tuple(tokens[t - length + 1 : t + 1]))
    return rows, features


_MASK64 = (1 << 64) - 1
_PAIR_PRIME = 2654435761
_CONTEXT_MULT = 0x5BD1E995


def _mix(h):
    """splitmix64's finalizer on unsigned 64-bit ints, then the top bit dropped."""
    h &= _MASK64
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & _MASK64
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & _MASK64
    h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def context_hash(context):
    """Hash of the tokens before t, most recent first: h = mix(h + (token + 1) * mult), from h = 0."""
    h = 0
    for token in reversed(context):
        h = _mix(h + (token + 1) * _CONTEXT_MULT)
    return h


def hashed_rows(tokens, vocab_size, lo=2, hi=11, buckets=4096, discount=(0.5, 0.7, 0.85, 0.95),
                strength=(0.7, 0.0), exclusion=True, escape_rate=0.05):
    """The hashed-table n-gram expert: bucket counts, N and D summed over the whole vocabulary."""
    tokens = [int(x) for x in tokens]
    n_orders = hi - lo + 1
    ctx_counts = np.zeros((n_orders, buckets), np.int64)
    pair_counts = np.zeros((n_orders, buckets), np.int64)
    vocab = np.arange(vocab_size)
    chain = Chain(lo, hi, discount, strength, escape_rate)
    unigram = np.zeros(vocab_size)
    rows = np.empty((len(tokens), vocab_size))
    features = np.zeros((3, len(tokens)))
    for t, x in enumerate(tokens):
        base = (unigram + BASE_ALPHA) / (unigram.sum() + BASE_ALPHA * vocab_size)
        hashes = [context_hash(tokens[t - n + 1 : t]) if t >= n - 1 else None for n in range(lo, hi + 1)]
        orders = []
        for i, h in enumerate(hashes):
            if h is None or ctx_counts[i, h % buckets] == 0:
                orders.append(None)
                continue
            row = pair_counts[i, (h ^ (vocab * _PAIR_PRIME)) % buckets].astype(float)
            total = int(row.sum())
            orders.append((total, int((row > 0).sum()), row) if total > 0 else None)
        rows[t], features[:, t] = chain.row(base, orders, target=x)
        was_empty = [h is None or pair_counts[i, (h ^ (x * _PAIR_PRIME)) % buckets] == 0 for i, h in enumerate(hashes)]
        for i, h in enumerate(hashes):
            if h is None:
                continue
            ctx_counts[i, h % buckets] += 1
            if not exclusion or i == n_orders - 1 or was_empty[i + 1]:
                pair_counts[i, (h ^ (x * _PAIR_PRIME)) % buckets] += 1
        unigram[x] += 1 if (not exclusion or was_empty[0]) else 0
    return rows, features
