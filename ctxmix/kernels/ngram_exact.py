"""Exact n-gram tables: KenLM-style linear probing with full keys, one table per n-gram length L.

Table L holds the L-grams seen so far. Each stored L-gram gets an entry id (0, 1, 2, ... in insertion
order; an id never changes) and is keyed exactly, in 64 bits, by its prefix and last token:

    key(w_1..w_L) = id_{L-1}(w_1..w_{L-1}) << token_bits | w_L     (L = 1: prefix id 0)

so two different L-grams never share a key. An L-gram whose prefix is not stored is not stored.

Per table, the arrays (the Python expert owns them and decides their sizes; ``ngram_exact_rehash`` builds a
bigger index when told to):
  keys      int64[S]  slot -> key, EMPTY_KEY (-1) where free; S is any size (not a power of two)
  slot_ids  int32[S]  slot -> entry id (meaningful where keys != EMPTY_KEY)
  entries   int32[capacity, C]  entry id -> [COUNT, TOTAL, DISTINCT] (C = 3), or [COUNT] (C = 1) for the
            longest length, whose entries never serve as contexts
  n_entries int64[1]  entries stored so far
COUNT is c(w_L | w_1..w_{L-1}); TOTAL (N) and DISTINCT (D) describe the entry as a context: the sum of its
stored continuations' counts, and how many of those counts are > 0 (so the interpolation in
``ngram_chain`` is normalized exactly).

A chunk of T positions is processed table by table, not position by position:
  1. ``ngram_exact_insert`` for L = 1..max order finds (or inserts) the L-gram ending at each t. Its
     prefix is the (L-1)-gram ending at t-1, found in the previous call, so each position costs one probe
     per table, and the T probes of one table are independent (the CPU overlaps their cache misses).
     Inserting keys does not change any probability: a key inserted at t has count 0 until step 2
     reaches t.
  2. ``ngram_exact_count_update`` (target only) or ``ngram_exact_count_rows_update`` (every token) for
     each order n = lo..hi, position by position: record c(target), N and D as they were before t, then
     count t. The order-n step reads table n's COUNT and table n-1's TOTAL/DISTINCT and is the only
     writer of both, so doing orders one after another gives the same numbers as doing positions one
     after another.
  3. ``ngram_chain`` turns those numbers into probabilities (position by position, all orders).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

EMPTY_KEY = -1  # slot sentinel: keys are >= 0
COUNT, TOTAL, DISTINCT = 0, 1, 2  # columns of ``entries``
PREFETCH_AHEAD = 16  # positions ahead whose table lines are requested early (cache misses overlap)
_FIBONACCI = -7046029254386353131  # 0x9E3779B97F4A7C15 (2^64 / golden ratio) as int64: multiplicative hashing


@intrinsic
def prefetch(typingctx, array, index):
    """Ask the CPU to start loading ``array[index]`` (row ``index`` of a 2-D array) into the cache.

    A hint only (LLVM's ``llvm.prefetch``): it reads nothing, writes nothing, cannot fault, and changes
    no result. The tables are far larger than the caches and each probe is a random access, so issuing
    the loads of position t + PREFETCH_AHEAD while working on t hides most of the memory latency.
    """
    if not isinstance(array, types.Array) or array.ndim not in (1, 2) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array_value = context.make_array(array_type)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        position = context.cast(builder, args[1], signature.args[1], types.intp)
        pointer = cgutils.get_item_pointer2(
            context, builder, data=array_value.data, shape=cgutils.unpack_tuple(builder, array_value.shape),
            strides=cgutils.unpack_tuple(builder, array_value.strides), layout=array_type.layout,
            inds=[position] if array_type.ndim == 1 else [position, zero], wraparound=False, boundscheck=False)
        byte_pointer = ir.IntType(8).as_pointer()
        int32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32]), "llvm.prefetch.p0i8")
        # (address, 0 = read, 3 = keep in all cache levels, 1 = data cache)
        builder.call(function, [builder.bitcast(pointer, byte_pointer), ir.Constant(int32, 0),
                                ir.Constant(int32, 3), ir.Constant(int32, 1)])
        return context.get_dummy_value()

    return types.none(array, index), codegen


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
        ahead = old_slot + PREFETCH_AHEAD
        if ahead < keys.shape[0] and keys[ahead] != EMPTY_KEY:
            prefetch(new_keys, home_slot(keys[ahead], n_slots))
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
        ahead = t + PREFETCH_AHEAD
        if ahead < n and prefix_ids[ahead] >= 0:
            slot = home_slot((prefix_ids[ahead] << token_bits) | tokens[ahead], keys.shape[0])
            prefetch(keys, slot)
            prefetch(slot_ids, slot)
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
def ngram_exact_count_update(entries, ctx_stats, steps, stats):
    """Order n over a chunk: record (c(target), N, D) before each t, then count t.

    ``entries`` int32[cap, C]: table n (COUNT read and written). ``ctx_stats`` int32[cap', 3]: table n-1
    (TOTAL, DISTINCT of each context). ``steps`` int64[3, T]: per t, the n-gram's entry id (-1: not
    stored), its context's entry id (-1: not stored), and the count increment (0 or 1; 0 under update
    exclusion). ``stats`` int64[3, T] is written: (c, N, D), all 0 where the context is not stored.
    Mutates ``entries``, ``ctx_stats``, ``stats``.
    """
    n = steps.shape[1]
    for t in range(n):
        ahead = t + PREFETCH_AHEAD
        if ahead < n and steps[0, ahead] >= 0:
            prefetch(entries, steps[0, ahead])
            prefetch(ctx_stats, steps[1, ahead])
        entry = steps[0, t]
        ctx = steps[1, t]
        stats[0, t] = entries[entry, COUNT] if entry >= 0 else 0
        stats[1, t] = ctx_stats[ctx, TOTAL] if ctx >= 0 else 0
        stats[2, t] = ctx_stats[ctx, DISTINCT] if ctx >= 0 else 0
        if entry >= 0 and steps[2, t] > 0:
            _count_update(entries, ctx_stats, entry, ctx)


@njit(cache=True)
def _fill_count_row(keys, slot_ids, entries, ctx, token_bits, row):
    """row[v] = c(v) after context entry ``ctx`` for every v: the V candidate keys, one probe each."""
    for v in range(row.shape[0]):
        slot = probe(keys, (ctx << token_bits) | v)
        row[v] = entries[slot_ids[slot], COUNT] if keys[slot] != EMPTY_KEY else 0


@njit(cache=True)
def ngram_exact_count_rows_update(keys, slot_ids, entries, ctx_stats, steps, token_bits, stats, count_rows):
    """As ``ngram_exact_count_update``, and also ``count_rows`` int32[T, V]: c(v) of every v before t,
    where the context has N > 0 (other rows are left as they are). ``keys``, ``slot_ids``: table n's
    index (read only). O(V) probes per such position.
    """
    for t in range(steps.shape[1]):
        entry = steps[0, t]
        ctx = steps[1, t]
        stats[0, t] = entries[entry, COUNT] if entry >= 0 else 0
        stats[1, t] = ctx_stats[ctx, TOTAL] if ctx >= 0 else 0
        stats[2, t] = ctx_stats[ctx, DISTINCT] if ctx >= 0 else 0
        if stats[1, t] > 0:
            _fill_count_row(keys, slot_ids, entries, ctx, token_bits, count_rows[t])
        if entry >= 0 and steps[2, t] > 0:
            _count_update(entries, ctx_stats, entry, ctx)


@njit(cache=True)
def ngram_exact_context(keys, slot_ids, entries, ctx_stats, ctx, token_bits, vocab_size):
    """Stepwise: ``(N, D, row)`` of context entry ``ctx`` (-1: not stored), row int32[V] = c(v) of
    every v (zeros when N = 0). ``keys``, ``slot_ids``, ``entries``: table n; ``ctx_stats``: table n-1.
    Reads the tables only."""
    row = np.zeros(vocab_size, np.int32)
    if ctx < 0 or ctx_stats[ctx, TOTAL] == 0:
        return 0, 0, row
    _fill_count_row(keys, slot_ids, entries, ctx, token_bits, row)
    return ctx_stats[ctx, TOTAL], ctx_stats[ctx, DISTINCT], row
