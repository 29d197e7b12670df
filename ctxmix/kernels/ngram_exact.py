"""Exact n-gram tables: KenLM-style linear probing with full keys, one table per n-gram length L.

Table L holds the L-grams seen so far. Each stored L-gram gets an entry id (0, 1, 2, ... in insertion
order; an id never changes) and is keyed exactly, in 64 bits, by its prefix and last token:

    key(w_1..w_L) = id_{L-1}(w_1..w_{L-1}) << token_bits | w_L     (L = 1: prefix id 0)

so two different L-grams never share a key. An L-gram whose prefix is not stored is not stored.

Per table, the arrays (the Python expert owns and sizes them; kernels never allocate table memory):
  keys      int64[S]  slot -> key, EMPTY_KEY (-1) where free; S is any size (not a power of two)
  slot_ids  int32[S]  slot -> entry id (meaningful where keys != EMPTY_KEY)
  entries   int32[capacity, C]  entry id -> [COUNT, TOTAL, DISTINCT] (C = 3), or [COUNT] (C = 1) for the
            longest length, whose entries never serve as contexts
  n_entries int64[1]  entries stored so far
COUNT is c(w_L | w_1..w_{L-1}); TOTAL (N) and DISTINCT (D) describe the entry as a context: the sum of its
stored continuations' counts, and how many of those counts are > 0 (so the interpolation in
``ngram_common`` is normalized exactly).

A chunk of T positions is processed table by table, not position by position:
  1. ``ngram_exact_insert`` for L = 1..max order finds (or inserts) the L-gram ending at each t. Its
     prefix is the (L-1)-gram ending at t-1, found in the previous call, so each position costs one probe
     per table, and the T probes of one table are independent (the CPU overlaps their cache misses).
     Inserting keys does not change any probability: a key inserted at t has count 0 until step 2
     reaches t.
  2. ``ngram_exact_score_update`` (target only) or ``ngram_exact_full_update`` (full rows) for each
     order n = lo..hi, in order, position by position: score with the counts as they were before t,
     then count t. The order-n step reads table n's COUNT and table n-1's TOTAL/DISTINCT and is the only
     writer of both, so doing orders one after another gives the same numbers as doing positions one
     after another.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .ngram_common import escape_terms, interpolate

EMPTY_KEY = -1  # slot sentinel: keys are >= 0
COUNT, TOTAL, DISTINCT = 0, 1, 2  # columns of ``entries``
_FIBONACCI = -7046029254386353131  # 0x9E3779B97F4A7C15 (2^64 / golden ratio) as int64: multiplicative hashing


@njit(cache=True)
def home_slot(key, n_slots):
    """First slot to probe for ``key`` in a table of ``n_slots`` (< 2^31) slots."""
    mixed = key * _FIBONACCI  # wraps mod 2^64; the top bits depend on every bit of the key
    top = (mixed >> 32) & 0xFFFFFFFF
    return (top * n_slots) >> 32  # maps [0, 2^32) onto [0, n_slots) without a modulo


@njit(cache=True)
def probe(keys, key):
    """Slot holding ``key``, or the free slot where it would go. The caller keeps the load < 1."""
    n_slots = keys.shape[0]
    slot = home_slot(key, n_slots)
    while True:
        stored = keys[slot]
        if stored == key or stored == EMPTY_KEY:
            return slot
        slot += 1
        if slot == n_slots:
            slot = 0


@njit(cache=True)
def ngram_exact_rehash(keys, slot_ids, n_slots):
    """A new index with ``n_slots`` slots holding the same keys and entry ids (ids never change)."""
    new_keys = np.full(n_slots, EMPTY_KEY, np.int64)
    new_ids = np.zeros(n_slots, np.int32)
    for old_slot in range(keys.shape[0]):
        key = keys[old_slot]
        if key != EMPTY_KEY:
            slot = probe(new_keys, key)
            new_keys[slot] = key
            new_ids[slot] = slot_ids[old_slot]
    return new_keys, new_ids


@njit(cache=True)
def ngram_exact_insert(keys, slot_ids, n_entries, capacity, prefix_ids, tokens, token_bits):
    """Find or insert the n-gram (prefix_ids[t], tokens[t]) for each t of a chunk, in order.

    ``prefix_ids`` int64[T]: entry id of each n-gram's prefix in the previous table (-1: not stored, so
    neither is the n-gram). Inserts only while ``n_entries[0] < capacity`` (a full table keeps what it
    has). Mutates ``keys``, ``slot_ids``, ``n_entries``.

    Returns ``(ids, novel)``: ids int64[T] entry id of the n-gram ending at t (-1: not stored);
    novel bool[T] True when it was not stored before t (inserted at t, or not storable).
    """
    n = tokens.shape[0]
    ids = np.empty(n, np.int64)
    novel = np.empty(n, np.bool_)
    for t in range(n):
        prefix = prefix_ids[t]
        if prefix < 0:
            ids[t] = -1
            novel[t] = True
            continue
        key = (prefix << token_bits) | tokens[t]
        slot = probe(keys, key)
        if keys[slot] == key:
            ids[t] = slot_ids[slot]
            novel[t] = False
        elif n_entries[0] < capacity:
            keys[slot] = key
            slot_ids[slot] = n_entries[0]
            ids[t] = n_entries[0]
            n_entries[0] += 1
            novel[t] = True
        else:
            ids[t] = -1
            novel[t] = True
    return ids, novel


@njit(cache=True)
def _count_update(entries, ctx_stats, entry, ctx):
    """Count one occurrence of entry ``entry`` after context entry ``ctx``: c, N and (on 0 -> 1) D."""
    if entries[entry, COUNT] == 0:
        ctx_stats[ctx, DISTINCT] += 1
    entries[entry, COUNT] += 1
    ctx_stats[ctx, TOTAL] += 1


@njit(cache=True)
def ngram_exact_score_update(entries, ctx_stats, steps, params, order, p_lower, features):
    """Order n, target path: p_n(token_t) for each t of a chunk, then count t.

    ``entries`` int32[cap, C]: table n (COUNT read and written). ``ctx_stats`` int32[cap', 3]: table n-1
    (TOTAL, DISTINCT of each context). ``steps`` int64[3, T]: per t, the n-gram's entry id (-1: not
    stored), its context's entry id (-1: not stored), and the count increment (0 or 1; 0 under update
    exclusion). ``params`` float64[2] = (discount, strength). ``p_lower`` float64[T] = p_{n-1}(token_t).
    ``features`` float64[3, T]: (order, N, D) overwritten at every t whose context has N > 0.

    Returns p float64[T] = p_n(token_t). Mutates ``entries``, ``ctx_stats``, ``features``.
    """
    discount = params[0]
    strength = params[1]
    n = steps.shape[1]
    p = np.empty(n)
    for t in range(n):
        entry = steps[0, t]
        ctx = steps[1, t]
        total = ctx_stats[ctx, TOTAL] if ctx >= 0 else 0
        if total == 0:
            p[t] = p_lower[t]  # context never counted: this order adds nothing
        else:
            distinct = ctx_stats[ctx, DISTINCT]
            escape, denom = escape_terms(total, distinct, discount, strength)
            count = entries[entry, COUNT] if entry >= 0 else 0
            p[t] = interpolate(count, p_lower[t], discount, escape, denom)
            features[0, t] = order
            features[1, t] = total
            features[2, t] = distinct
        if entry >= 0 and steps[2, t] > 0:
            _count_update(entries, ctx_stats, entry, ctx)
    return p


@njit(cache=True)
def _interpolate_row(keys, slot_ids, entries, ctx, token_bits, discount, escape, denom, row):
    """row[v] <- p_n(v) from row[v] = p_{n-1}(v) for every v, enumerating the V candidate keys."""
    for v in range(row.shape[0]):
        slot = probe(keys, (ctx << token_bits) | v)
        count = entries[slot_ids[slot], COUNT] if keys[slot] != EMPTY_KEY else 0
        row[v] = interpolate(count, row[v], discount, escape, denom)


@njit(cache=True)
def ngram_exact_full_update(keys, slot_ids, entries, ctx_stats, steps, params, order, token_bits, rows, features):
    """Order n, full path: as ``ngram_exact_score_update``, but on whole rows.

    ``keys``, ``slot_ids``: table n's index (read only). ``rows`` float64[T, V] holds p_{n-1} on entry and
    p_n on return (O(V) probes per position whose context has N > 0). Mutates ``entries``,
    ``ctx_stats``, ``rows``, ``features``.
    """
    discount = params[0]
    strength = params[1]
    for t in range(steps.shape[1]):
        entry = steps[0, t]
        ctx = steps[1, t]
        total = ctx_stats[ctx, TOTAL] if ctx >= 0 else 0
        if total > 0:
            distinct = ctx_stats[ctx, DISTINCT]
            escape, denom = escape_terms(total, distinct, discount, strength)
            _interpolate_row(keys, slot_ids, entries, ctx, token_bits, discount, escape, denom, rows[t])
            features[0, t] = order
            features[1, t] = total
            features[2, t] = distinct
        if entry >= 0 and steps[2, t] > 0:
            _count_update(entries, ctx_stats, entry, ctx)


@njit(cache=True)
def ngram_exact_distribution(keys, slot_ids, entries, ctx_stats, ctx, params, token_bits, p_lower):
    """Order n for the next position (stepwise): ``(p_n float64[V], N, D)`` from p_lower float64[V]
    after context entry ``ctx`` (-1: not stored). Reads state only."""
    row = p_lower.copy()
    total = ctx_stats[ctx, TOTAL] if ctx >= 0 else 0
    distinct = ctx_stats[ctx, DISTINCT] if total > 0 else 0
    if total > 0:
        escape, denom = escape_terms(total, distinct, params[0], params[1])
        _interpolate_row(keys, slot_ids, entries, ctx, token_bits, params[0], escape, denom, row)
    return row, total, distinct
