"""Exact n-gram tables: KenLM-style linear probing with full keys, one table per n-gram length L.

Table L holds the L-grams seen so far, except the continuations of leaves (below). Each stored L-gram gets
an entry id (0, 1, 2, ... in insertion order; an id never changes) and is keyed exactly, in 64 bits, by its
prefix and last token:

    key(w_1..w_L) = id_{L-1}(w_1..w_{L-1}) << token_bits | w_L     (L = 1: prefix id 0)

so two different L-grams never share a key. An L-gram whose prefix is not stored is not stored.
A slot holds the key and the entry id together, ``key << id_bits | id``: a probe reads one cache line per
table, not two. Entry ids (and so prefix ids) stay below 2^id_bits, which the expert chooses so that
2 * id_bits + token_bits <= 63 (26 bits, 67M entries per table, for 1024 tokens) and enforces through
the table's capacity.

Per table, the arrays (the Python expert owns them and decides their sizes; ``ngram_exact_rehash`` builds a
bigger index when told to):
  keys      int64[S]  slot -> key << id_bits | entry id, EMPTY_KEY (-1) where free; S is any size (not a
            power of two)
  entries   int32[R + 1, C]  entry id -> [COUNT, TOTAL, DISTINCT] (C = 3) for the lengths that are
            contexts of some order and have longer n-grams after them, [COUNT] (C = 1) for the longest
            length, whose entries are never contexts, and no column for lengths below lo - 1 (only links
            in the prefix chain of longer n-grams). A row is written when its entry is created; row R
            belongs to no entry (``ngram_exact_counts_all``'s sink)
  nexts     int32[R + 1]  entry id -> NEXT (below) for the C = 3 lengths, empty for the others. Apart
            from ``entries`` because the two threads of the fast path read and write them (below): in one
            array, a row's NEXT and its counts shared a cache line, which moved between the two cores at
            every such access (the inserts of lengths 1..8 of enwik8.first1MB took 51 ms alone and 69-73 ms
            beside the counting; 48-57 ms apart, measured)
  n_entries int64[1]  entries stored so far
COUNT is c(w_L | w_1..w_{L-1}); TOTAL (N) and DISTINCT (D) describe the entry as a context: the sum of its
continuations' counts, and how many of those counts are > 0 (so the interpolation in ``ngram_chain`` is
normalized exactly).

Leaves (as PPMd keeps a pointer into the text for a context seen once): most long n-grams occur once, and
so does the n-gram that continues them. An entry seen once so far is a leaf: NEXT holds the stream position
of the token that followed it (its one continuation, with count 1), and that continuation gets no entry
of its own. At the leaf's second occurrence the continuation is stored from the token history (count 1,
itself a leaf pointing one position further) and NEXT becomes NO_NEXT. A chunk's ids say, for the n-gram
ending at t:
  >= 0        its entry
  DEFERRED    it occurred first here and its prefix was seen at most once before t: it is (or lies under)
              a leaf's continuation, counted through its prefix's TOTAL and DISTINCT only
  LEAF_MATCH  the prefix is a leaf whose continuation is this token, but the table is full so it stays a
              leaf: count 1 without an entry (a full table keeps what it has)
  NOT_STORED  neither stored nor implied (its prefix is not stored, or the table is full)
This gives the numbers of a table that stores every n-gram, with about half the probes and entries on text.

A chunk of T positions is processed table by table, not position by position:
  1. ``ngram_exact_insert_all`` for L = 1..max order finds, inserts or defers the L-gram ending at each t.
     Its prefix is the (L-1)-gram ending at t-1, found in the previous table's pass, so each position
     costs at most one probe per table (none when it is deferred), and the T probes of one table are
     independent (the CPU overlaps their cache misses, and the lines of position t + PREFETCH_AHEAD are
     requested early). Inserting keys does not change any probability: a key inserted at t has count 0
     until step 2 reaches t, and a stored leaf continuation, count 1, is the count it had all along.
  2. ``ngram_exact_counts_all`` (target only) or ``ngram_exact_count_rows_update`` (every token) for
     each order n = lo..hi, position by position: record c(target), N and D as they were before t, then
     count t. The order-n step reads table n's COUNT and table n-1's TOTAL/DISTINCT and is the only
     writer of both, so doing orders one after another gives the same numbers as doing positions one
     after another. It is also faster: one table's rows stay in the cache through its pass (position by
     position, stopping at the first order whose context is not stored, enwik8.first1MB took 41 instead
     of 25 ms, measured).
  3. ``ngram_chain`` turns those numbers into probabilities (position by position, all orders).
Step 1 touches ``keys``, ``n_entries``, the rows of entries it creates, ``nexts`` and the continuation lists;
steps 2 and 3 only COUNT, TOTAL and DISTINCT of rows that step 1 of the same block or an earlier one
created (and of each table's sink row), the base and the escape scales. So the expert runs step 1 of one
block of positions on a second thread while steps 2-3 of the block before it run (``experts/ngram.py``),
with the same numbers.

Continuation lists (kept only once the stepwise path is used, built then from the index by
``ngram_exact_children_build``): per table, ``first_child[e]`` = the first stored continuation (entry
id in the next table) of entry e as a context, ``sibling[e]`` = the next continuation of e's prefix,
``child_token[e]`` = e's last token; -1 ends a list. The stepwise distribution then reads the D
continuations of each context (a leaf's one from the token history) instead of probing all V tokens.

Helpers called per position and table are written out in the loops (``probe``, ``_count_update``):
numba does not remove the reference counting of array arguments of a call, which cost several times
the arithmetic here.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .ngram_chain import bucket_tables, chain_scratch, chain_target, interpolate_listed, ngram_chain_update_with
from .prefetch import prefetch
from .unigram import unigram_distribution, unigram_score_update

EMPTY_KEY = -1  # slot sentinel: keys are >= 0
COUNT, TOTAL, DISTINCT = 0, 1, 2  # columns of ``entries``
NO_NEXT = -1  # NEXT of an entry whose continuations are stored
NOT_STORED, DEFERRED, LEAF_MATCH = -1, -2, -3  # what a chunk's ids hold where no entry does (see above)
WALK_LANES = 16  # lanes whose continuation lists ``ngram_exact_distribution_lanes`` walks side by side
PREFETCH_AHEAD = 32  # positions ahead whose table lines are requested early (cache misses overlap; 16 was slower)
_FIBONACCI = -7046029254386353131  # 0x9E3779B97F4A7C15 (2^64 / golden ratio) as int64: multiplicative hashing


@njit(cache=True, nogil=True, inline="always")
def home_slot(key, n_slots):
    """First slot to probe for ``key`` in a table of ``n_slots`` (< 2^31) slots."""
    mixed = key * _FIBONACCI  # wraps mod 2^64; the top bits depend on every bit of the key
    top = (mixed >> 32) & 0xFFFFFFFF
    return (top * n_slots) >> 32  # maps [0, 2^32) onto [0, n_slots) without a modulo


@njit(cache=True, nogil=True, inline="always")
def probe(keys, key, id_bits):
    """Slot holding ``key``, or the free slot where it would go. The caller keeps the load < 1."""
    n_slots = keys.shape[0]
    slot = home_slot(key, n_slots)
    while True:
        stored = keys[slot]
        if stored == EMPTY_KEY or (stored >> id_bits) == key:
            return slot
        slot += 1
        if slot == n_slots:
            slot = 0


@njit(cache=True, nogil=True)
def ngram_exact_rehash(keys, n_slots, id_bits):
    """A new index with ``n_slots`` slots holding the same keys and entry ids (ids never change)."""
    new_keys = np.full(n_slots, EMPTY_KEY, np.int64)
    for old_slot in range(keys.shape[0]):
        ahead = old_slot + PREFETCH_AHEAD
        if ahead < keys.shape[0] and keys[ahead] != EMPTY_KEY:
            prefetch(new_keys, home_slot(keys[ahead] >> id_bits, n_slots))
        stored = keys[old_slot]
        if stored != EMPTY_KEY:
            new_keys[probe(new_keys, stored >> id_bits, id_bits)] = stored
    return new_keys


@njit(cache=True, nogil=True, inline="always")
def _insert_pass(keys, n_entries, capacity, limit, entries, nexts, prefix_nexts, first_prefix, prefix_ids,
                 prefix_novel, tokens, history, base, token_bits, id_bits, ids, novel, first_child, sibling,
                 child_token, start):
    """Find, insert or defer the n-gram ending at each t of a chunk (global position ``base + t``); its
    prefix id is ``first_prefix`` at t = 0 and ``prefix_ids[t - 1]`` after (the previous table's ids of
    this chunk, ``prefix_novel`` their novelty). Writes ``ids`` (an entry id, DEFERRED, LEAF_MATCH or
    NOT_STORED) and ``novel``. Leaves (module docstring) apply where the prefix table keeps NEXT
    (``prefix_nexts`` not empty); new entries become leaves where this table keeps it (``nexts``). When
    ``sibling`` is not empty, each new entry is linked into its prefix's list of continuations (see
    ``ngram_exact_children_build``).

    Starts at position ``start`` and returns where it stopped: ``n`` when done, or the first t that
    needs more entries than ``capacity`` leaves (2 for a leaf's second occurrence, which stores its
    continuation and maybe the new n-gram; 1 for a new n-gram) while the table could still grow
    (``capacity < limit``): nothing of position t is written yet, and the caller grows the table and
    resumes at t, so a table grows when it fills rather than making room for a chunk's worst case in
    advance. At ``capacity == limit`` it is full and stops inserting."""
    n = tokens.shape[0]
    n_slots = keys.shape[0]
    id_mask = (1 << id_bits) - 1
    leaves = prefix_nexts.shape[0] > 0  # a prefix may be a leaf (its one continuation not stored)
    grows = nexts.shape[0] > 0  # this table's new entries are leaves
    lists = sibling.shape[0] > 0
    growable = capacity < limit
    for t in range(max(start, 0), n):  # (>= 0 provably: no negative-index wraparound on each access)
        ahead = t + PREFETCH_AHEAD
        if ahead < n and prefix_ids[ahead - 1] >= 0 and not prefix_novel[ahead - 1]:  # novel prefixes defer
            upcoming = prefix_ids[ahead - 1]
            prefetch(keys, home_slot((upcoming << token_bits) | tokens[ahead], n_slots))
            if leaves:
                prefetch(prefix_nexts, upcoming)
        prefix = first_prefix if t == 0 else prefix_ids[t - 1]
        if prefix < 0:  # the prefix is not stored: neither is this n-gram (a deferred prefix defers it)
            ids[t] = DEFERRED if prefix == DEFERRED else NOT_STORED
            novel[t] = True
            continue
        token = tokens[t]
        following = prefix_nexts[prefix] if leaves else NO_NEXT
        if following == base + t:  # the prefix occurred first at t - 1: this n-gram is its one continuation
            ids[t] = DEFERRED
            novel[t] = True
            continue
        if following >= 0:
            # The leaf's second occurrence: store its one continuation first (count 1, a leaf itself).
            child = history[following]
            if growable and n_entries[0] + 2 > capacity:  # (this position stores up to 2 entries)
                return t
            if n_entries[0] >= capacity:  # full: the prefix stays a leaf, its continuation counts 1 unstored
                ids[t] = LEAF_MATCH if child == token else NOT_STORED
                novel[t] = child != token
                continue
            child_key = (prefix << token_bits) | child
            slot = home_slot(child_key, n_slots)  # probe(), written out: a leaf's continuation is never stored
            while keys[slot] != EMPTY_KEY:
                slot += 1
                if slot == n_slots:
                    slot = 0
            new = n_entries[0]
            keys[slot] = (child_key << id_bits) | new
            n_entries[0] += 1
            for column in range(entries.shape[1]):  # (rows are not zeroed in advance)
                entries[new, column] = 0
            entries[new, COUNT] = 1
            if grows:  # it occurred once, and so did its one continuation (at following + 1 <= base + t)
                entries[new, TOTAL] = 1
                entries[new, DISTINCT] = 1
                nexts[new] = following + 1
            prefix_nexts[prefix] = NO_NEXT
            if lists:
                sibling[new] = first_child[prefix]
                first_child[prefix] = new
                child_token[new] = child
            if child == token:
                ids[t] = new
                novel[t] = False
                continue
        key = (prefix << token_bits) | token
        slot = home_slot(key, n_slots)  # probe(), written out
        stored = keys[slot]
        while stored != EMPTY_KEY and (stored >> id_bits) != key:
            slot += 1
            if slot == n_slots:
                slot = 0
            stored = keys[slot]
        if stored != EMPTY_KEY:
            ids[t] = stored & id_mask
            novel[t] = False
        elif growable and n_entries[0] >= capacity:  # (a leaf's continuation stored here left room for this)
            return t
        elif n_entries[0] < capacity:
            new = n_entries[0]
            keys[slot] = (key << id_bits) | new
            for column in range(entries.shape[1]):  # count 0 until the counts reach t
                entries[new, column] = 0
            ids[t] = new
            n_entries[0] += 1
            novel[t] = True
            if grows:
                nexts[new] = base + t + 1
            if lists:
                sibling[new] = first_child[prefix]
                first_child[prefix] = new
                child_token[new] = token
        else:
            ids[t] = NOT_STORED
            novel[t] = True
    return n


@njit(cache=True, nogil=True)
def ngram_exact_insert_all(keys, n_entries, entries, nexts, capacities, last_ids, tokens, history, base, token_bits,
                           id_bits, ids, novel, first_child, sibling, child_token):
    """``_insert_pass`` for every table L = 1..len(keys)-1, in one call (tuples of per-table arrays;
    index 0, the empty context, is unused; ``first_child``, ``sibling``, ``child_token``: the
    continuation lists, empty arrays where not kept), into tables with room for the whole chunk (none
    stops to grow). ``last_ids`` int64[hi+1]: the L-gram ids ending just before the chunk. ``history``
    int32: the stream's tokens up to the chunk's end at least; ``base``: the chunk's first position in
    it. Writes ``ids`` int64[hi+1, T] (row 0 = 0, the empty context) and ``novel`` bool[hi+2, T] (rows
    1..hi; rows 0 and hi+1 stay all True). Mutates the tables' ``keys``, ``n_entries``, new entry rows
    and NEXT.
    """
    ids[0, :] = 0
    novel[0, :] = True
    novel[novel.shape[0] - 1, :] = True
    ngram_exact_insert_lengths(keys, n_entries, entries, nexts, capacities, capacities, last_ids, tokens, history,
                               base, token_bits, id_bits, ids, novel, first_child, sibling, child_token, 1,
                               len(keys) - 1, 0)


@njit(cache=True, nogil=True)
def ngram_exact_insert_lengths(keys, n_entries, entries, nexts, capacities, limits, last_ids, tokens, history, base,
                               token_bits, id_bits, ids, novel, first_child, sibling, child_token, first, last, start):
    """``ngram_exact_insert_all`` for tables ``first``..``last`` only, from position ``start`` of table
    ``first`` (rows first-1 of ``ids`` and ``novel`` must be filled up to there): two threads can insert
    different lengths at once, since table L's pass writes only table L's keys, count of entries and new
    rows, table L-1's NEXT and ``first_child``, and table L's ``sibling``, ``child_token``. Returns
    ``(L, t)`` where table L's pass stopped to grow (``_insert_pass``, ``limits``: each table's largest
    capacity), or ``(0, 0)`` when every pass is done."""
    n = tokens.shape[0]
    for length in range(first, last + 1):
        stop = _insert_pass(keys[length], n_entries[length], capacities[length], limits[length], entries[length],
                            nexts[length], nexts[length - 1], last_ids[length - 1], ids[length - 1, : max(n - 1, 0)],
                            novel[length - 1, : max(n - 1, 0)], tokens, history, base, token_bits, id_bits,
                            ids[length], novel[length], first_child[length - 1], sibling[length], child_token[length],
                            start if length == first else 0)
        if stop < n:
            return length, stop
    return 0, 0


@njit(cache=True, nogil=True)
def ngram_exact_counts_all(entries, ids, novel, last_ids, lo, exclusion, stats):
    """Every order n = lo..hi over a chunk: record (c(target), N, D) before each t, then count t.

    ``entries``: tuple of per-table int32[cap, C] (index 0 unused); ``ids``, ``novel`` as
    ``ngram_exact_insert_all`` wrote them; ``last_ids``: the ids ending just before the chunk. Under
    ``exclusion`` order n counts t only when the (n+1)-gram ending at t is novel (Kneser-Ney), else
    always. ``stats`` int32[T, K, 3] is written: (c, N, D) of order lo + i, all 0 where the context is not
    stored. Mutates the tables' COUNT, TOTAL, DISTINCT (a DEFERRED n-gram is counted in its context's
    TOTAL and DISTINCT only: its count lives in the leaf).

    The order-n pass reads table n's COUNT and table n-1's TOTAL/DISTINCT and is the only writer of both,
    so orders one after another give the numbers positions one after another would.
    """
    n = ids.shape[1]
    hi = ids.shape[0] - 1
    for order in range(lo, hi + 1):
        i = order - lo
        table = entries[order]
        ctx_stats = entries[order - 1]
        increments = novel[order + 1] if exclusion else novel[hi + 1]  # the last row is all True
        entry_ids = ids[order]
        ctx_ids = ids[order - 1]
        ctx = last_ids[order - 1]
        sink = table.shape[0] - 1
        ctx_sink = ctx_stats.shape[0] - 1
        for t in range(n):
            ahead = t + PREFETCH_AHEAD
            if ahead < n:
                prefetch(table, max(entry_ids[ahead], 0))
                prefetch(ctx_stats, max(ctx_ids[ahead - 1], 0))
            # Without branches on what the ids hold (stored, deferred, not stored vary from position to
            # position, and mispredicted branches cost more than the arithmetic): an absent entry or
            # context reads its table's sink row and adds 0 to it (measured 10% faster than the
            # branches). The sink is the table's last row, which no entry owns: row 0 would not do, since
            # while a table has no entry the insert thread may be creating entry 0 beside this loop.
            entry = entry_ids[t]
            stored = entry >= 0
            has_ctx = ctx >= 0
            row = entry if stored else sink
            ctx_row = ctx if has_ctx else ctx_sink
            raw = table[row, COUNT]
            total = ctx_stats[ctx_row, TOTAL]
            distinct = ctx_stats[ctx_row, DISTINCT]
            stats[t, i, 0] = raw if stored else (1 if entry == LEAF_MATCH else 0)
            stats[t, i, 1] = total if has_ctx else 0
            stats[t, i, 2] = distinct if has_ctx else 0
            counted = increments[t]
            bump = counted and stored  # c += 1 (its context is then stored too)
            continuation = counted and has_ctx and entry == DEFERRED  # a leaf's continuation: c 0 -> 1, unstored
            table[row, COUNT] = raw + (1 if bump else 0)
            ctx_stats[ctx_row, TOTAL] = total + (1 if bump or continuation else 0)
            ctx_stats[ctx_row, DISTINCT] = distinct + (1 if (bump and raw == 0) or continuation else 0)
            ctx = ctx_ids[t]


@njit(cache=True, nogil=True, inline="always")
def _count_update(entries, ctx_stats, entry, ctx):
    """Count one occurrence of entry ``entry`` after context entry ``ctx``: c, N and (on 0 -> 1) D."""
    if entries[entry, COUNT] == 0:
        ctx_stats[ctx, DISTINCT] += 1
    entries[entry, COUNT] += 1
    ctx_stats[ctx, TOTAL] += 1


@njit(cache=True)
def ngram_exact_count_rows_update(entries, ctx_stats, ctx_nexts, steps, history, lists, stats, count_rows):
    """One order over a chunk, full path: ``steps`` int64[3, T] = (id of the n-gram ending at t, id of its
    context, 1 where t is counted); writes ``stats`` [3, T] = (c(target), N, D) before t, counts t as
    ``ngram_exact_counts_all`` does, and fills ``count_rows`` int32[T, V] (zeros on entry) with c(v) of
    every v before t where the context has N > 0: by walking the context's continuation list, ``lists`` =
    (first_child of the context table, sibling and child_token of this table), or from the one
    continuation of a leaf (a full table's; ``history``: the stream's tokens). The lists hold every stored
    n-gram, including those the chunk's insert pass added for later positions, whose COUNT is still 0
    here, as a probe of every candidate key would read it (the lists replaced V probes per order and
    position: the n-gram full path over the shipped sample took 0.70 s, now 0.08 s, the same counts).
    """
    first_child, sibling, child_token = lists
    leaves = ctx_nexts.shape[0] > 0
    for t in range(steps.shape[1]):
        entry = steps[0, t]
        ctx = steps[1, t]
        stats[0, t] = entries[entry, COUNT] if entry >= 0 else (1 if entry == LEAF_MATCH else 0)
        stats[1, t] = ctx_stats[ctx, TOTAL] if ctx >= 0 else 0
        stats[2, t] = ctx_stats[ctx, DISTINCT] if ctx >= 0 else 0
        if stats[1, t] > 0:
            if leaves and ctx_nexts[ctx] >= 0:
                count_rows[t, history[ctx_nexts[ctx]]] = 1
            else:
                child = first_child[ctx]
                while child >= 0:
                    count_rows[t, child_token[child]] = entries[child, COUNT]
                    child = sibling[child]
        if steps[2, t] > 0:
            if entry >= 0:
                _count_update(entries, ctx_stats, entry, ctx)
            elif entry == DEFERRED and ctx >= 0:
                ctx_stats[ctx, DISTINCT] += 1
                ctx_stats[ctx, TOTAL] += 1


@njit(cache=True)
def ngram_exact_children_build(keys, token_bits, id_bits, first_child, sibling, child_token):
    """Continuation lists of one table from its index: for each stored n-gram (prefix id p, token v) with
    entry id e, ``child_token[e] = v`` and e is pushed on p's list (``first_child[p]`` in the previous
    table's array, then ``sibling[e]``; -1 ends a list). The caller passes ``first_child`` filled with -1.
    Mutates the three arrays (they only index the table; no probability reads them in another order
    than by token)."""
    mask = (1 << token_bits) - 1
    for slot in range(keys.shape[0]):
        stored = keys[slot]
        if stored == EMPTY_KEY:
            continue
        entry = stored & ((1 << id_bits) - 1)
        key = stored >> id_bits
        prefix = key >> token_bits
        sibling[entry] = first_child[prefix]
        first_child[prefix] = entry
        child_token[entry] = key & mask


@njit(cache=True, nogil=True, inline="always")
def _observe_scratch(hi, lo):
    """What ``_observe_position`` overwrites: ids, novelty, the orders' (c, N, D), the unigram's increment,
    the chain's features, ``bucket_tables()`` and ``chain_scratch``."""
    return (np.empty((hi + 1, 1), np.int64), np.empty((hi + 2, 1), np.bool_), np.empty((1, hi - lo + 1, 3), np.int32),
            np.ones(1, np.int64), np.zeros((3, 1)), bucket_tables(), chain_scratch(hi - lo + 1))


@njit(cache=True, nogil=True, inline="always")
def _observe_position(keys, n_entries, entries, nexts, capacities, first_child, sibling, child_token, last_ids, tokens,
                      history, base, token_bits, id_bits, lo, exclusion, unigram_counts, unigram_total, alpha, params,
                      scales, rate, scratch):
    """``ngram_exact_observe_update`` with its scratch (``_observe_scratch``) given."""
    ids, novel, stats, increments, features, tables, chain = scratch
    hi = len(keys) - 1
    ngram_exact_insert_all(keys, n_entries, entries, nexts, capacities, last_ids, tokens, history, base, token_bits,
                           id_bits, ids, novel, first_child, sibling, child_token)
    ngram_exact_counts_all(entries, ids, novel, last_ids, lo, exclusion, stats)
    increments[0] = 1
    if exclusion:
        increments[0] = 1 if novel[lo, 0] else 0
    p_base, _ = unigram_score_update(unigram_counts, unigram_total, tokens, increments, alpha, False)
    ngram_chain_update_with(stats, p_base, params, lo, scales, rate, features, tables, chain)
    for length in range(hi + 1):
        last_ids[length] = ids[length, 0]


@njit(cache=True)
def ngram_exact_observe_update(keys, n_entries, entries, nexts, capacities, first_child, sibling, child_token,
                               last_ids, tokens, history, base, token_bits, id_bits, lo, exclusion, unigram_counts,
                               unigram_total, alpha, params, scales, rate):
    """Stepwise: advance by the one token in ``tokens`` int64[1], in one call (the codec calls this per
    token, and each call of a kernel with many arrays costs microseconds): the fast path's kernels in the
    fast path's order (``ngram_exact_insert_all``, ``ngram_exact_counts_all``, the base unigram,
    ``ngram_chain_update`` for the learned escapes), so the state after it is the state ``score_chunk``
    leaves (``history`` holds the token already, at ``base``). Mutates the tables, ``last_ids``, the unigram
    counts and ``scales``."""
    _observe_position(keys, n_entries, entries, nexts, capacities, first_child, sibling, child_token, last_ids, tokens,
                      history, base, token_bits, id_bits, lo, exclusion, unigram_counts, unigram_total, alpha, params,
                      scales, rate, _observe_scratch(len(keys) - 1, lo))


@njit(cache=True)
def ngram_exact_distribution(entries, nexts, first_child, sibling, child_token, history, last_ids, lo,
                             unigram_counts, unigram_total, alpha, params, scales):
    """Stepwise: ``(p float64[V], features float64[3])`` for the next position in one call (the lanes' kernel
    for one lane). Reads state only."""
    p = np.empty((1, unigram_counts.shape[0]))
    features = np.empty((1, 3))
    ngram_exact_distribution_lanes(entries, nexts, first_child, sibling, child_token, history,
                                   last_ids.reshape(1, -1), lo, unigram_counts, unigram_total, alpha, params, scales,
                                   p, features)
    return p[0], features[0]


@njit(cache=True, nogil=True)  # the lane engine's second thread works meanwhile (lanes.py)
def ngram_exact_distribution_lanes(entries, nexts, first_child, sibling, child_token, history, last_ids, lo,
                                   unigram_counts, unigram_total, alpha, params, scales, out_p, out_found):
    """The next position's distribution for each row of ``last_ids`` int64[La, hi+1] (lane j's context ids;
    lanes: the codec's lockstep streams over one shared table set) into ``out_p`` float64[La, V], and
    (order, N, D) of its longest active order (zeros when none) into ``out_found`` float64[La, 3]. Reads
    state only.

    A row is the base unigram, then the chain of ``ngram_chain_distribution`` over the active orders, lowest
    first, each order's counts taken from its context's continuation list (O(D), not O(V) probes; a leaf's one
    continuation from the token history, count 1) and applied by ``interpolate_listed``: the same floats.
    The lists are linked through entries scattered over the tables, so each continuation is a dependent
    load, mostly a cache miss: WALK_LANES lanes walk their lists of an order side by side, which lets their
    misses overlap (one lane at a time, the walks took 6.5 of 7.8 us a token on enwik8.first1MB at 128
    lanes, measured). The base row, the bucket tables and the scratch are made once a call: every lane
    reads the same state."""
    n_lanes, vocab_size = out_p.shape
    n_orders = len(entries) - lo
    block = min(WALK_LANES, n_lanes)
    base = unigram_distribution(unigram_counts, unigram_total, alpha)
    n_table, d_table = bucket_tables()
    flat_scales = scales.reshape(-1)
    stats = np.zeros((block, n_orders, 3), np.int32)  # the chain's layout (c = 0), one "position" per lane
    active, slots = np.empty((block, n_orders), np.int64), np.empty((block, n_orders), np.int64)
    lower, q, escape_weight = np.empty((block, n_orders)), np.empty((block, n_orders)), np.empty((block, n_orders))
    n_active, done = np.zeros(block, np.int64), np.zeros(block, np.int64)
    listed, cursor = np.zeros(block, np.int64), np.zeros(block, np.int64)
    tokens, counts = np.empty((block, vocab_size), np.int64), np.empty((block, vocab_size), np.int64)
    values = np.empty(vocab_size)
    for first in range(0, n_lanes, block):
        lanes = min(block, n_lanes - first)
        for b in range(lanes):
            ids = last_ids[first + b]
            for i in range(n_orders):
                ctx = ids[lo + i - 1]
                total = entries[lo + i - 1][ctx, TOTAL] if ctx >= 0 else 0
                stats[b, i, 1] = total
                stats[b, i, 2] = entries[lo + i - 1][ctx, DISTINCT] if total > 0 else 0
            _p, n_active[b] = chain_target(stats, b, 1.0, params, flat_scales, n_table, d_table, active[b], slots[b],
                                           lower[b], q[b], escape_weight[b])
            done[b] = 0
            out_p[first + b] = base
        for i in range(n_orders):  # each lane's active orders come lowest first, as the chain applies them
            order = lo + i
            table, child_tokens, links = entries[order], child_token[order], sibling[order]
            ctx_nexts = nexts[order - 1]
            walking = 0
            for b in range(lanes):
                listed[b] = 0
                cursor[b] = -1
                if done[b] < n_active[b] and active[b, done[b]] == i:
                    ctx = last_ids[first + b, order - 1]
                    following = ctx_nexts[ctx] if ctx_nexts.shape[0] > 0 else NO_NEXT  # (no NEXT: no leaves)
                    if following >= 0:  # a leaf: its one continuation, count 1, has no entry yet
                        tokens[b, 0] = history[following]
                        counts[b, 0] = 1
                        listed[b] = 1
                    else:
                        cursor[b] = first_child[order - 1][ctx]
                        walking += 1
            while walking > 0:
                walking = 0
                for b in range(lanes):
                    child = cursor[b]
                    if child >= 0:
                        tokens[b, listed[b]] = child_tokens[child]
                        counts[b, listed[b]] = table[child, COUNT]
                        listed[b] += 1
                        cursor[b] = links[child]
                        walking += 1
            for b in range(lanes):
                if done[b] < n_active[b] and active[b, done[b]] == i:
                    interpolate_listed(out_p[first + b], tokens[b], counts[b], listed[b], stats, b, i, params,
                                       flat_scales[slots[b, done[b]]], values)
                    done[b] += 1
        for b in range(lanes):
            found = out_found[first + b]
            found[:] = 0.0
            if n_active[b]:
                top = active[b, n_active[b] - 1]
                found[0] = lo + top
                found[1] = stats[b, top, 1]
                found[2] = stats[b, top, 2]


@njit(cache=True, nogil=True, inline="always")
def _prefetch_lane(keys, entries, last_ids, token, token_bits, lo):
    """Request the lines a lane's update past ``token`` reads first: each table's home slot of the n-gram
    ending at the token, and each order's context row (a hint: it changes nothing)."""
    for length in range(1, len(keys)):
        prefix = last_ids[length - 1]
        if prefix >= 0:
            prefetch(keys[length], home_slot((prefix << token_bits) | token, keys[length].shape[0]))
            if length >= lo:  # (order ``length``'s context row: its TOTAL and DISTINCT)
                prefetch(entries[length - 1], prefix)


@njit(cache=True, nogil=True)  # the lane engine's second thread works meanwhile (lanes.py)
def ngram_exact_observe_lanes_update(keys, n_entries, entries, nexts, capacities, first_child, sibling, child_token,
                                     last_ids, tokens, history, base, token_bits, id_bits, lo, exclusion,
                                     unigram_counts, unigram_total, alpha, params, scales, rate):
    """Lanes: ``ngram_exact_observe_update`` for lane 0, 1, ... in turn, lane j advancing its own context ids
    ``last_ids[j]`` (int64[La, hi+1]) past ``tokens[j]`` (int64[La], at ``history[base + j]``). The tables,
    unigram and escape scales are shared: lane j's update sees those of lanes < j of the same step. Tables
    used here keep no leaves (empty ``nexts``): a leaf's continuation is the next position of the history,
    which for a lane is not the next token written. Mutates what the one-lane kernel mutates.

    Each lane's probes and context rows are random reads, but they are known before its update (the L-gram
    ending at the lane's token has the lane's (L-1)-gram id before it as prefix): they are requested for the
    next lane while this one is updated (``_prefetch_lane``)."""
    scratch = _observe_scratch(len(keys) - 1, lo)
    if tokens.shape[0] > 0:
        _prefetch_lane(keys, entries, last_ids[0], tokens[0], token_bits, lo)
    for j in range(tokens.shape[0]):
        if j + 1 < tokens.shape[0]:
            _prefetch_lane(keys, entries, last_ids[j + 1], tokens[j + 1], token_bits, lo)
        _observe_position(keys, n_entries, entries, nexts, capacities, first_child, sibling, child_token, last_ids[j],
                          tokens[j : j + 1], history, base + j, token_bits, id_bits, lo, exclusion, unigram_counts,
                          unigram_total, alpha, params, scales, rate, scratch)
