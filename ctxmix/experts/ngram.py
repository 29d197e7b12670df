"""The n-gram expert: orders lo..hi interpolated from the lowest order up, on exact or hashed tables.

Estimator (normalized by construction; ``kernels/ngram_chain.py`` has the algebra). The chain starts at
an adaptive add-1/2 unigram p_1(v) = (c(v) + 1/2) / (n + V/2), so every p > 0, then for n = lo..hi:

    p_n(v) = (s (c_n(v) - d_n [c_n(v) > 0]) + (beta_n + d_n D_n) p_{n-1}(v)) / (beta_n + d_n D_n + s (N_n - d_n D_n))

where, for the context of order n (the n-1 tokens before t), c_n(v) is the count of v after it, N_n the
sum of those counts and D_n how many are > 0; an order whose context has N_n = 0 passes p_{n-1} through.
With s = 1 this is interpolated absolute discounting (hierarchical Pitman-Yor, Kneser-Ney); the
discounts d_n grow with the order, as in the sequence memoizer (deep contexts are nearly deterministic
or nearly novel). s > 0 is a learned escape correction: it sits in a small table indexed by
(order, N bucket, D bucket) and takes one gradient step of log p(target) after each position
(``escape_rate``; 0 turns it off), as PPMd's secondary escape estimation adapts its escapes.

Update exclusion (``exclusion=true``, the default) counts a token at order n only when the (n+1)-gram
ending there is new, so lower orders hold continuation counts (interpolated Kneser-Ney); the base
unigram likewise counts a token only when the order-lo n-gram is new. Without it every order counts
every token.

Tables: ``exact`` (kernels/ngram_exact.py) stores every n-gram with its full key; the target path costs
one probe per table. Its fast path runs in blocks on two threads (``threads``): a worker inserts the
short n-grams of up to two blocks ahead while this thread inserts the long ones of block j, then counts
and chains it (disjoint arrays: the same numbers as one thread). The stepwise protocol (the codec) reads
per-context continuation lists, built from the tables on its first call and kept by the inserts after, so a
distribution costs O(V + sum of D) rather than V probes per order; ``observe`` is one kernel call.
``hashed`` (kernels/ngram_hashed.py) is the PR #909 bucket cache, normalized over the whole vocabulary,
O(orders * V) per position.
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field

import numpy as np
from numba.typed import List as TypedList

from ..errors import CtxmixError
from ..kernels.ngram_chain import (
    D_BUCKETS,
    MAX_RATE,
    N_BUCKETS,
    ngram_chain_distribution,
    ngram_chain_full_update,
    ngram_chain_update,
)
from ..kernels.ngram_common import entropy_rows
from ..kernels.ngram_exact import (
    EMPTY_KEY,
    ngram_exact_children_build,
    ngram_exact_count_rows_update,
    ngram_exact_counts_all,
    ngram_exact_distribution,
    ngram_exact_distribution_lanes,
    ngram_exact_insert_all,
    ngram_exact_insert_lengths,
    ngram_exact_observe_lanes_update,
    ngram_exact_observe_update,
    ngram_exact_rehash,
)
from ..kernels.ngram_hashed import ngram_hashed_context, ngram_hashed_count_update
from ..kernels.unigram import (
    unigram_distribution,
    unigram_full_update,
    unigram_score_update,
)
from ..spec import IntRange
from ..threads import second_thread
from .base import (
    FEATURE_CTX_DISTINCT,
    FEATURE_CTX_TOTAL,
    FEATURE_ENTROPY,
    FEATURE_ORDER,
    LONG_CHUNK,
    SHORT_CHUNK,
    Expert,
    ExpertOutput,
)
from .unigram import check_tokens

BASE_ALPHA = 0.5  # add-1/2 unigram at the bottom of the chain: every token keeps p > 0
# Least discount + strength of an order: each order's escape is at least this times distinct / count, and
# eleven of them over 2**31 tokens still leave an unseen token a p far above float64's smallest (1e-308).
MIN_ESCAPE_WEIGHT = 1e-6
MAX_BUCKETS = 1 << 24  # hashed: 4x the default; 2 int32 tables per order of 64 MiB each (a .cmx header can name it)
DEFAULT_BUCKETS = 4_194_304  # hashed: buckets per order and per kind (context, pair): 2 x 16 MiB per order
ROW_BLOCK = 256  # positions per kernel call when full rows are built: T x V float64 stays ~2 MiB
MAX_LOAD_PERCENT = 70  # exact index: grow before more than 70% of the slots are used (linear probing)
GROWTH_PERCENT = 150  # exact index: a grown index has at least 1.5x the slots (amortized rehashing)
# exact index: a table that fills is grown for 1.25x its projected entries. Tables of long n-grams fill
# faster later in a stream (a leaf gets its entry at its second occurrence), so a bare projection falls
# short and the table fills again near its final size. Measured (fast path, orders 2..11, tables grown
# when full): bytes/s against PPMd o6 were highest at 1.25x (1.0x and 1.75x: enwik8.first1MB 0.90-0.93x
# of PPMd against 1.07-1.09x at 1.25x), for 33-36 bytes per entry.
PROJECTION_PERCENT = 125
MIN_SLOTS = 8  # exact index: smallest index, also under a tiny memory cap
SINK_ROWS = 1  # exact rows: the last row of each table's entries belongs to no entry (the counts' sink)
MAX_SLOTS = (1 << 31) - 1  # exact index: home_slot maps 32 hash bits onto < 2^31 slots
SLOT_BYTES = 8  # int64: key << id_bits | entry id
MIB = 1 << 20
DEFAULT_MAX_MB = 1024.0  # exact: per table; a full table stops inserting (and the run goes on)
FEATURES = (FEATURE_ORDER, FEATURE_CTX_TOTAL, FEATURE_CTX_DISTINCT)  # rows of the features array
MIN_BLOCK, MAX_BLOCK, BLOCKS = 4096, 16384, 16  # exact fast path: positions per block handed between the two threads
MAX_THREADS = 2
MAX_POSITIONS = (1 << 31) - 2  # exact: a leaf's NEXT is an int32 stream position
RESERVE_AHEAD = 256  # exact: positions every table has room for after a look (stepwise: one token a call)


def _per_order(values: tuple[float, ...], n_orders: int) -> list[float]:
    """Values for orders lo, lo+1, ...: as given, the last one repeated."""
    return [values[min(i, len(values) - 1)] for i in range(n_orders)]


class NgramExpert(Expert):
    """Interpolated n-gram model over orders lo..hi on exact (default) or hashed tables."""

    @dataclass(frozen=True)
    class Options:
        orders: IntRange = field(default=(2, 11), metadata={
            "help": "n-gram orders lo-hi (order n: n tokens, n-1 of context)", "label": True, "min": 2, "max": 11})
        table: str = field(default="exact", metadata={
            "help": "exact (full keys, O(orders) per token) or hashed (PR #909 buckets, O(orders*V))",
            "label": True, "choices": ("exact", "hashed")})
        buckets: int = field(default=DEFAULT_BUCKETS, metadata={
            "help": "hashed only: buckets per order, for contexts and for (context, token) pairs each", "min": 1,
            "max": MAX_BUCKETS})
        max_mb: float = field(default=DEFAULT_MAX_MB, metadata={
            "help": "exact only: memory cap per n-gram length's table (MiB; the continuation lists that full "
                    "rows and the codec read, 12 bytes per slot, come on top); a full table stops inserting",
            "min": 0.0})
        discount: tuple[float, ...] = field(default=(0.5, 0.7, 0.85, 0.95), metadata={
            "help": "absolute discount d per order lo, lo+1, ... (last repeats), each in [0, 1)",
            "min": 0.0, "max": 1.0})
        strength: tuple[float, ...] = field(default=(0.7, 0.0), metadata={
            "help": "Pitman-Yor strength beta per order lo, lo+1, ... (last repeats), beta + d > 0",
            "min": 0.0})
        exclusion: bool = field(default=True, metadata={
            "help": "update exclusion: lower orders count only novel continuations (Kneser-Ney)"})
        escape_rate: float = field(default=0.05, metadata={
            "help": "learning rate of the adaptive escape scales (0: plain Kneser-Ney escapes)", "min": 0.0,
            "max": MAX_RATE})
        threads: int = field(default=MAX_THREADS, metadata={
            "help": "exact fast path: 2 runs the table inserts on a second thread, beside the counts and the "
                    "chain (same numbers either way)", "min": 1, "max": MAX_THREADS})

        def __post_init__(self):
            lo, hi = self.orders
            if lo > hi:
                raise CtxmixError(f"orders={lo}-{hi}: the lowest order must not exceed the highest")
            if not self.discount or not self.strength:
                raise CtxmixError("discount and strength need at least one value")
            if any(not 0.0 <= d < 1.0 for d in self.discount):
                raise CtxmixError(f"discount values must lie in [0, 1), got {self.discount}")
            n_orders = hi - lo + 1
            for d, beta in zip(_per_order(self.discount, n_orders), _per_order(self.strength, n_orders)):
                if not d + beta >= MIN_ESCAPE_WEIGHT:
                    raise CtxmixError(f"discount {d} + strength {beta} must be >= {MIN_ESCAPE_WEIGHT:g} "
                                      "(unseen tokens need p > 0)")
            if self.table == "exact" and self.buckets != DEFAULT_BUCKETS:
                raise CtxmixError("buckets is an option of table=hashed only")
            if self.table == "hashed" and self.max_mb != DEFAULT_MAX_MB:
                raise CtxmixError("max_mb is an option of table=exact only")

    provides = (FEATURE_ENTROPY, FEATURE_ORDER, FEATURE_CTX_TOTAL, FEATURE_CTX_DISTINCT)

    def __init__(self, options=None, *, vocab_size: int):
        super().__init__(options or self.Options(), vocab_size=vocab_size)
        self.lo, self.hi = self.options.orders
        n_orders = self.hi - self.lo + 1
        self._params = np.ascontiguousarray(np.stack([
            _per_order(self.options.discount, n_orders), _per_order(self.options.strength, n_orders)], axis=1))
        self._token_bits = max(1, (self.vocab_size - 1).bit_length())  # key = prefix id << bits | token
        # slot = key << id_bits | id in 63 bits, prefix ids and ids both < 2^id_bits (the tables' capacity cap)
        self._id_bits = (63 - self._token_bits) // 2
        self._leaves = True  # exact tables keep leaves (lanes turn them off: ``lanes_begin``)
        self._lane_ids = None  # lanes: int64[L, hi+1], each lane's context ids
        self.begin(np.zeros(0, np.int64))

    @property
    def fast_chunk(self) -> int:
        """Exact tables run long chunks (each chunk starts the two threads' pipeline and grows the tables
        anew); hashed ones cost O(V) per order and position, so their chunks stay short."""
        return LONG_CHUNK if self.options.table == "exact" else SHORT_CHUNK

    @property
    def spec(self) -> str:
        text = super().spec
        if self.options.table == "hashed" and "buckets=" not in text:  # bucket count labels hashed rows
            text = text.replace("table=hashed", f"table=hashed,buckets={self.options.buckets}", 1)
        return text

    # ---- state ---------------------------------------------------------------------------------------

    def begin(self, tokens):
        self._unigram_counts = np.zeros(self.vocab_size, np.int64)
        self._unigram_total = np.zeros(1, np.int64)
        self._escape_scales = np.ones((self.hi - self.lo + 1, N_BUCKETS, D_BUCKETS))  # learned escapes (1: plain KN)
        self._stream_length = len(tokens)  # a sizing hint only (tables never read ahead)
        self._position = 0  # positions scored so far
        if self.options.table == "exact":
            self._history = np.empty(max(len(tokens), 16), np.int32)  # tokens so far: leaves point into it
            self._history_length = 0
            # index 0 unused: the empty context
            self._tables = [_ExactTable(length, self._entry_columns(length), self.options.max_mb, self._id_bits,
                                        self.vocab_size, self._leaves) for length in range(self.hi + 1)]
            self._last_ids = np.full(self.hi + 1, -1, np.int64)  # entry id of the L-gram ending at t-1
            self._last_ids[0] = 0  # the empty context is always "stored", as prefix id 0
            self._children = False  # continuation lists kept (built on the first stepwise call)
            self._room = 0  # entries every table can take before _reserve must look again
            self._args = None  # cached _kernel_args()
            self._step_args = None  # cached _kernel_args(lists=True)
        else:
            n_orders = self.hi - self.lo + 1
            self._ctx_counts = np.zeros((n_orders, self.options.buckets), np.int32)
            self._pair_counts = np.zeros((n_orders, self.options.buckets), np.int32)
            self._window = np.full(self.hi - 1, -1, np.int64)  # last hi-1 tokens, -1 before the stream

    def _entry_columns(self, length: int) -> int:
        if length == self.hi:
            return 1  # COUNT only: the longest n-grams are never contexts
        if length >= self.lo - 1:
            return 3  # COUNT, TOTAL, DISTINCT (and NEXT in the table's ``nexts``)
        return 0  # only a link in the prefix chain of longer n-grams

    def memory_bytes(self) -> int:
        base = self._unigram_counts.nbytes + self._escape_scales.nbytes
        if self.options.table == "exact":
            return base + self._history.nbytes + sum(table.nbytes for table in self._tables[1:])
        return base + self._ctx_counts.nbytes + self._pair_counts.nbytes

    def stored_entries(self) -> int:
        """Exact: n-grams stored over all lengths. Hashed: non-empty pair buckets."""
        if self.options.table == "exact":
            return sum(int(table.n_entries[0]) for table in self._tables[1:])
        return int(np.count_nonzero(self._pair_counts))

    # ---- chunked scoring -----------------------------------------------------------------------------

    def score_chunk(self, tokens, *, full=False, want=()):
        tokens = check_tokens(tokens, self)
        want_entropy = FEATURE_ENTROPY in want
        with_rows = full or want_entropy
        if with_rows and len(tokens) > ROW_BLOCK:  # bounded memory; same numbers (chunking is exact)
            parts = [self.score_chunk(tokens[i : i + ROW_BLOCK], full=full, want=want)
                     for i in range(0, len(tokens), ROW_BLOCK)]
            return ExpertOutput(np.concatenate([o.logp for o in parts]),
                                np.concatenate([o.p for o in parts]) if full else None,
                                {name: np.concatenate([o.features[name] for o in parts]) for name in parts[0].features})
        if not with_rows and self.options.table == "exact":
            return self._score_exact_fast(tokens, want)
        n, n_orders = len(tokens), self.hi - self.lo + 1
        stats = np.zeros((n_orders, 3, n), np.int64)  # per order and position: c(target), N, D before t
        count_rows = np.zeros((n_orders, n if with_rows else 0, self.vocab_size), np.int32)  # c(v), full path
        if self.options.table == "exact":
            novel = self._exact_counts(tokens, stats, count_rows)
        else:
            window = np.concatenate((self._window, tokens))
            novel = ngram_hashed_count_update(self._ctx_counts, self._pair_counts, window, self.options.exclusion,
                                              stats, count_rows)
            self._window = np.ascontiguousarray(window[len(window) - len(self._window):])
        stats = np.ascontiguousarray(stats.transpose(2, 0, 1), dtype=np.int32)  # [T, K, 3] for the chain
        base_increments = novel.astype(np.int64) if self.options.exclusion else np.ones(n, np.int64)
        features = np.zeros((len(FEATURES), n))
        rate = self.options.escape_rate
        if with_rows:
            rows = unigram_full_update(self._unigram_counts, self._unigram_total, tokens, base_increments, BASE_ALPHA)
            ngram_chain_full_update(stats, count_rows, rows, tokens, self._params, self.lo, self._escape_scales,
                                    rate, features)
            logp = np.log(rows[np.arange(n), tokens])
        else:
            p_base, _ = unigram_score_update(self._unigram_counts, self._unigram_total, tokens, base_increments,
                                             BASE_ALPHA, False)
            logp = np.log(ngram_chain_update(stats, p_base, self._params, self.lo, self._escape_scales, rate, features))
        out = {name: features[i] for i, name in enumerate(FEATURES) if name in want}
        if want_entropy:
            out[FEATURE_ENTROPY] = entropy_rows(rows)
        return ExpertOutput(logp, rows if full else None, out)

    def _score_exact_fast(self, tokens, want):
        """Exact tables, target only, in blocks: the table inserts (``ngram_exact_insert_lengths``: keys,
        new entries, NEXT, continuation lists), then the counts, base and chain (``ngram_exact_counts_all``
        ... ``ngram_chain_update``: counts of entries, base, escape scales). Inserting length L writes only
        table L's keys, new rows and lists and table L-1's NEXT and first_child, counting only counts. The
        rows of the whole chunk are reserved before the blocks start, and table L's index grows only in
        the thread that inserts into it, where its pass stops because the table is full (``_insert_pass``).
        So with two threads a worker inserts the short lengths of blocks ahead while this thread inserts
        the long ones of block j, counts and chains it, and the numbers are those of one thread."""
        n, n_orders = len(tokens), self.hi - self.lo + 1
        base = self._remember(tokens)
        self._reserve(n, index=False)  # rows for the whole chunk; each thread grows its tables' index
        args = self._kernel_args()  # rows, entry counts and lists stay these arrays until the chunk ends
        limits = np.array([table.limit for table in self._tables], np.int64)  # (the chunk's rows are reserved)
        entries = args.entries
        block_size = min(max(n // BLOCKS, MIN_BLOCK), MAX_BLOCK)
        starts = list(range(0, n, block_size))
        # (order, N, D) of the longest active order, kept for the chunk only when asked for
        features = np.zeros((len(FEATURES), n)) if want else None
        p = np.empty(n)
        exclusion = self.options.exclusion
        inserted: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # block -> (ids, novel), while in flight
        last_of: dict[int, np.ndarray] = {}  # ids ending each block: rows 0..split first, the rest after
        index_of: dict[tuple[int, int], tuple] = {}  # keys of every table, per thread (its own tables current)

        # The worker inserts the short lengths 1..split; this thread inserts the long ones, then counts
        # and chains (the inserts are most of the work: this balances the two).
        split = max(1, (3 * self.hi) // 4)

        def block_of(j: int) -> np.ndarray:
            return tokens[starts[j] : starts[j] + block_size]

        # Arrays reused from block to block (fresh ones cost page faults: counting enwik8.first1MB took 30
        # instead of 28 ms): ids and novelty of the blocks in flight (at most LEAD + 1), and the counts'
        # (c, N, D).
        ring = [(np.empty((self.hi + 1, block_size), np.int64), np.empty((self.hi + 2, block_size), np.bool_))
                for _ in range(min(_Handoff.LEAD + 1, len(starts)))]
        for ids, novel in ring:
            ids[0] = 0  # the empty context
            novel[0] = novel[self.hi + 1] = True
        block_stats = np.empty((block_size, n_orders, 3), np.int32)
        block_features = np.empty((len(FEATURES), block_size))  # the chain's scratch when none are wanted

        def insert(j: int, first: int, last: int) -> None:
            block = block_of(j)
            if first == 1:
                ids, novel = ring[j % len(ring)]
                inserted[j] = (ids[:, : len(block)], novel[:, : len(block)])
            ids, novel = inserted[j]
            before = self._last_ids if j == 0 else last_of[j - 1]
            position = base + starts[j]
            if position == 0:  # nothing to project from yet: room for the first block's worst case
                for length in range(first, last + 1):
                    self._tables[length].reserve_index(*self._sizing(len(block), 0))
                index_of.pop((first, last), None)
            # Only this thread touches these tables' index: a pass stops where its table is full, and the
            # table grows here (to its projection) before the pass goes on. Growing on demand rather than
            # making room for each block's worst case (2 entries per position) in advance: one growth per
            # table instead of two or three, and small files no longer allocate (and fault in) indexes
            # sized for a projection they never reach (lcet10: 0.87x -> 1.05x of PPMd o6's bytes/s)
            resume = (first, 0)
            while resume[0]:
                keys = index_of.get((first, last))
                if keys is None:
                    keys = index_of[first, last] = tuple(table.keys for table in self._tables)
                capacities = np.array([table.capacity for table in self._tables], np.int64)
                resume = ngram_exact_insert_lengths(keys, args.n_entries, entries, args.nexts, capacities, limits,
                                                    before, block, self._history, position, self._token_bits,
                                                    self._id_bits, ids, novel, *args.children, resume[0], last,
                                                    resume[1])
                if resume[0]:
                    length, t = resume
                    # sized as for 2 more positions: more than position t needs, so the index always grows
                    if not self._tables[length].reserve_index(*self._sizing(2, position + t)):
                        raise RuntimeError(f"n-gram table {length} is full below its limit and did not grow")
                    index_of.pop((first, last))
            if first == 1:
                last_of[j] = ids[:, -1].copy()  # rows split+1.. are filled in after the long lengths
            else:
                last_of[j][first:] = ids[first:, -1]

        def count_and_chain(j: int, before: np.ndarray) -> None:
            start, block = starts[j], block_of(j)
            ids, novel = inserted.pop(j)
            stats = block_stats[: len(block)]
            ngram_exact_counts_all(entries, ids, novel, before, self.lo, exclusion, stats)
            increments = novel[self.lo].astype(np.int64) if exclusion else np.ones(len(block), np.int64)
            p_base, _ = unigram_score_update(self._unigram_counts, self._unigram_total, block, increments,
                                             BASE_ALPHA, False)
            p[start : start + len(block)] = ngram_chain_update(stats, p_base, self._params, self.lo,
                                                               self._escape_scales, self.options.escape_rate,
                                                               block_features[:, : len(block)] if features is None
                                                               else features[:, start : start + len(block)])

        handoff = None
        before = self._last_ids
        try:  # (the worker starts inside it: an interrupt right after its start must still stop it)
            if self.options.threads > 1 and len(starts) > 1:
                handoff = _Handoff(lambda j: insert(j, 1, split), len(starts))
            for j in range(len(starts)):
                if handoff is None:
                    insert(j, 1, split)
                else:
                    handoff.wait_for(j)
                insert(j, split + 1, self.hi)
                count_and_chain(j, before)
                before = last_of[j]
                last_of.pop(j - 1, None)  # block j + 1 needs block j's last ids, no older ones
                if handoff is not None:
                    handoff.consumed(j)
        finally:  # even on an error here, the worker's writes into the tables end before we return
            if handoff is not None:
                handoff.close()
        if n:
            self._last_ids[:] = before
        self._args = self._step_args = None  # indexes may have grown
        logp = np.log(p, out=p)  # (in place: a fresh array of this size costs its page faults)
        return ExpertOutput(logp, None, {name: features[i] for i, name in enumerate(FEATURES) if name in want})

    def _exact_counts(self, tokens, stats, count_rows):
        """Exact tables, one chunk (full rows): insert n-grams table by table, then record (c, N, D),
        ``count_rows`` and count, order by order. Returns novel bool[T]: the order-lo n-gram ending
        at t was not stored before t (what the base unigram counts under exclusion)."""
        n = len(tokens)
        self._keep_children()  # count rows are read from the continuation lists
        self._reserve(n)
        base = self._remember(tokens)
        ids = np.empty((self.hi + 1, n), np.int64)  # ids[L, t]: the L-gram ending at t (kernels/ngram_exact.py)
        novel = np.empty((self.hi + 2, n), np.bool_)  # novel[L, t]: that L-gram had not occurred before t
        args = self._kernel_args()
        ngram_exact_insert_all(args.keys, args.n_entries, args.entries, args.nexts, args.capacities, self._last_ids,
                               tokens, self._history, base, self._token_bits, self._id_bits, ids, novel,
                               *args.children)
        for i, order in enumerate(range(self.lo, self.hi + 1)):
            table, ctx_table = self._tables[order], self._tables[order - 1]
            increments = novel[order + 1] if self.options.exclusion else novel[self.hi + 1]  # the last row is all True
            context_ids = _shifted(ids[order - 1], self._last_ids[order - 1])
            steps = np.stack((ids[order], context_ids, increments.astype(np.int64)))  # int64[3, T]
            lists = (ctx_table.first_child, table.sibling, table.child_token)
            ngram_exact_count_rows_update(table.entries, ctx_table.entries, ctx_table.nexts, steps, self._history,
                                          lists, stats[i], count_rows[i])
        if n:
            self._last_ids[:] = ids[:, -1]
        return novel[self.lo]

    def _reserve(self, n_new: int, index: bool = True) -> None:
        """Before ``n_new`` more positions: room in every table for the entries they can add (at most two
        per position: a new n-gram and a leaf's continuation) at <= 70% load (or the cap); only the rows
        when not ``index``. ``_room`` (entries every table can still take) lets the stepwise path skip
        the per-table check."""
        if 2 * n_new > self._room:
            ahead = max(n_new, RESERVE_AHEAD)  # the stepwise path then looks again only every RESERVE_AHEAD tokens
            for length in range(1, self.hi + 1):
                table, sizing = self._tables[length], self._sizing(ahead, self._position)
                if table.reserve_rows(*sizing) | (index and table.reserve_index(*sizing)):
                    self._args = self._step_args = None
            # (the fast path's inserts do not keep _room: after rows only, the next call looks again; a table
            # with room for every possible n-gram never needs a look)
            self._room = min((table.capacity - int(table.n_entries[0]) if table.capacity < table.most_possible
                              else MAX_POSITIONS) for table in self._tables[1:]) if index else 0
        self._room -= 2 * n_new
        self._position += n_new

    def _sizing(self, n_new: int, position: int) -> tuple[int, int, int]:
        """``_ExactTable._target``'s arguments for ``n_new`` positions from stream position ``position``."""
        return n_new, position, max(self._stream_length - position, 0)

    def _remember(self, tokens: np.ndarray) -> int:
        """Append a chunk to the token history (leaves point into it); returns the chunk's first position."""
        base = self._history_length
        end = base + len(tokens)
        if end > MAX_POSITIONS:
            raise CtxmixError(f"{self.spec}: exact tables address at most {MAX_POSITIONS:,} positions of a stream")
        if end > len(self._history):
            grown = np.empty(max(end, 2 * len(self._history)), np.int32)
            grown[:base] = self._history[:base]
            self._history = grown
        self._history[base:end] = tokens
        self._history_length = end
        return base

    def _kernel_args(self, lists: bool = False) -> _TableArgs:
        """The tables' arrays as the kernels take them (tuples indexed by n-gram length), made again only
        after a table grew or the continuation lists appeared. ``lists``: numba typed lists instead, for
        the stepwise path (a call with a tuple of arrays costs microseconds per tuple; the lists cost
        more to build, so the chunked path keeps tuples)."""
        if lists:
            if self._step_args is None:
                plain = self._kernel_args()
                self._step_args = _TableArgs(*(TypedList(group) for group in (plain.keys, plain.n_entries,
                                                                              plain.entries, plain.nexts)),
                                             plain.capacities, tuple(TypedList(group) for group in plain.children))
            return self._step_args
        if self._args is None:
            self._step_args = None
            tables = self._tables
            if self._children:
                children = (tuple(t.first_child for t in tables), tuple(t.sibling for t in tables),
                            tuple(t.child_token for t in tables))
            else:
                empty = (np.zeros(0, np.int32),) * len(tables)
                children = (empty, empty, empty)
            self._args = _TableArgs(tuple(t.keys for t in tables), tuple(t.n_entries for t in tables),
                                    tuple(t.entries for t in tables), tuple(t.nexts for t in tables),
                                    np.array([t.capacity for t in tables], np.int64), children)
        return self._args

    # ---- stepwise ------------------------------------------------------------------------------------

    def _keep_children(self) -> None:
        """Build the continuation lists of every table (once); inserts keep them up to date after."""
        if self._children:
            return
        for table in self._tables:
            table.allocate_children()
        for length in range(1, self.hi + 1):
            table = self._tables[length]
            ngram_exact_children_build(table.keys, self._token_bits, self._id_bits,
                                       self._tables[length - 1].first_child, table.sibling, table.child_token)
        self._children = True
        self._args = self._step_args = None

    def next_distribution(self, want=()):
        if self.options.table == "exact":
            self._keep_children()
            args = self._kernel_args(lists=True)
            p, found = ngram_exact_distribution(args.entries, args.nexts, *args.children, self._history, self._last_ids,
                                                self.lo, self._unigram_counts, self._unigram_total, BASE_ALPHA,
                                                self._params, self._escape_scales)
        else:
            p_base = unigram_distribution(self._unigram_counts, self._unigram_total, BASE_ALPHA)
            totals, count_rows = ngram_hashed_context(self._ctx_counts, self._pair_counts, self._window,
                                                      self.vocab_size)
            p, found = ngram_chain_distribution(totals, count_rows, p_base, self._params, self.lo,
                                                self._escape_scales)
        features = {name: float(found[i]) for i, name in enumerate(FEATURES) if name in want}
        if FEATURE_ENTROPY in want:
            features[FEATURE_ENTROPY] = float(entropy_rows(p[None, :])[0])
        return p, features

    def observe(self, token):
        if self.options.table != "exact":
            self.score_chunk(np.array([token], np.int64))
            return
        tokens = check_tokens(np.array([token], np.int64), self)
        self._reserve(1)
        base = self._remember(tokens)
        args = self._kernel_args(lists=True)
        ngram_exact_observe_update(args.keys, args.n_entries, args.entries, args.nexts, args.capacities,
                                   *args.children, self._last_ids, tokens, self._history, base, self._token_bits,
                                   self._id_bits, self.lo,
                                   self.options.exclusion, self._unigram_counts, self._unigram_total, BASE_ALPHA,
                                   self._params, self._escape_scales, self.options.escape_rate)


    # ---- lanes (the codec's lockstep streams, ``ctxmix/lanes.py``) -------------------------------------

    def supports_lanes(self) -> bool:
        """Exact tables can be shared by lanes; hashed ones code on one lane."""
        return self.options.table == "exact"

    def lanes_begin(self, n_lanes: int, n_tokens: int, first_token: int, integer: bool = True, threads: int = 1,
                    version: int | None = None) -> None:
        """Reset for ``n_lanes`` lanes over a stream of ``n_tokens`` tokens, each lane starting after
        ``first_token``. One table set, unigram and escape scales serve every lane (lane j's distribution
        at step s reads what every lane observed at steps < s: causal in decode order); each lane keeps its
        own context ids. The tables keep no leaves: a leaf points at the history position after it, and a
        lane's next token is not written there. Without leaves every n-gram has its own entry from its
        first occurrence, and the counts are those the leaves stand for (``kernels/ngram_exact.py``), so one
        lane gives the numbers of ``observe``. ``integer``, ``threads`` (the neural step's) and ``version`` (the
        lane version: the n-gram expert's lane arithmetic is that of every version) have nothing to set here."""
        self._leaves = False
        try:
            self.begin(np.zeros(n_tokens, np.int64))
        finally:
            self._leaves = True
        self._keep_children()
        self._lane_ids = np.full((n_lanes, self.hi + 1), -1, np.int64)
        self._lane_ids[:, 0] = 0  # the empty context, as ``_last_ids``
        self.lanes_observe(np.full(n_lanes, first_token, np.int64))

    def lanes_distributions(self, n_active: int, want=()):
        """(float64[n_active, V], {feature: float64[n_active]}) for lanes 0..n_active-1; no state change."""
        args = self._kernel_args(lists=True)
        p = np.empty((n_active, self.vocab_size))
        found = np.empty((n_active, len(FEATURES)))
        ngram_exact_distribution_lanes(args.entries, args.nexts, *args.children, self._history,
                                       self._lane_ids[:n_active], self.lo, self._unigram_counts, self._unigram_total,
                                       BASE_ALPHA, self._params, self._escape_scales, p, found)
        features = {name: found[:, i].copy() for i, name in enumerate(FEATURES) if name in want}
        if FEATURE_ENTROPY in want:
            features[FEATURE_ENTROPY] = entropy_rows(p)
        return p, features

    def lanes_observe(self, tokens) -> None:
        """Lanes 0..len(tokens)-1 each advance past their token, in lane order."""
        tokens = check_tokens(np.asarray(tokens, np.int64), self)
        self._reserve(len(tokens))
        base = self._remember(tokens)
        args = self._kernel_args(lists=True)
        ngram_exact_observe_lanes_update(args.keys, args.n_entries, args.entries, args.nexts, args.capacities,
                                         *args.children, self._lane_ids, tokens, self._history, base,
                                         self._token_bits, self._id_bits, self.lo, self.options.exclusion,
                                         self._unigram_counts, self._unigram_total, BASE_ALPHA, self._params,
                                         self._escape_scales, self.options.escape_rate)


class _Handoff:
    """The worker's side of the exact fast path: runs ``produce(j)`` for blocks j = 0, 1, ... on the
    insert worker thread, at most LEAD blocks ahead of the blocks this thread has consumed. The lead
    lets either thread go on without waiting for the other at every block (a blocked thread costs a
    wake-up, which on a virtual machine takes a large part of a small block's time)."""

    LEAD = 2

    def __init__(self, produce, n_blocks: int):
        self._produce = produce
        self._n_blocks = n_blocks
        self._ready = 0  # blocks produced
        self._taken = 0  # blocks consumed
        self._stop = False
        self._finished = False
        self._condition = threading.Condition()
        self._future = second_thread().submit(self._run)

    def _run(self) -> None:
        try:
            for j in range(self._n_blocks):
                with self._condition:
                    self._condition.wait_for(lambda: self._stop or j - self._taken <= self.LEAD)
                    if self._stop:
                        return
                self._produce(j)
                with self._condition:
                    self._ready = j + 1
                    self._condition.notify_all()
        finally:
            with self._condition:
                self._finished = True
                self._condition.notify_all()

    def wait_for(self, j: int) -> None:
        """Until block j is produced; raises what the worker raised if it stopped before."""
        with self._condition:
            self._condition.wait_for(lambda: self._ready > j or self._finished)
            if self._ready > j:
                return
        self._future.result()  # the worker failed: its exception
        raise RuntimeError("the n-gram insert worker stopped early")  # (not reached: it only stops on errors)

    def consumed(self, j: int) -> None:
        with self._condition:
            self._taken = j + 1
            self._condition.notify_all()

    def close(self) -> None:
        """Stop the worker after its current block and wait for it (its writes end before we return); a
        worker's error reaches the caller through ``wait_for``, not here, so it never hides the caller's."""
        with self._condition:
            self._stop = True
            self._condition.notify_all()
        futures.wait([self._future])


def _shifted(row: np.ndarray, first: int) -> np.ndarray:
    """``[first, row[0], ..., row[T-2]]``: the value at t-1 for each t of a chunk."""
    out = np.empty_like(row)
    out[0:1] = first
    out[1:] = row[:-1]
    return out


@dataclass
class _TableArgs:
    keys: tuple
    n_entries: tuple
    entries: tuple
    nexts: tuple
    capacities: np.ndarray
    children: tuple  # (first_child, sibling, child_token), each a tuple per table (empty arrays: not kept)


class _ExactTable:
    """Arrays of one exact table (n-grams of one length); see ``kernels/ngram_exact.py``. Its rows
    (``entries`` and the continuation lists) and its index (``keys``) grow separately: the fast path
    reserves the rows of a whole chunk before its threads start, and each thread grows the index of the
    tables it inserts into when a pass finds one full. The rows arrays have one row more than entries
    can take: the counting kernel's sink (``ngram_exact_counts_all``)."""

    def __init__(self, length: int, columns: int, max_mb: float, id_bits: int, vocab_size: int, leaves: bool = True):
        self.length = length
        self.most_possible = vocab_size**length  # every n-gram of this length
        self.columns = columns
        self.id_bits = id_bits
        self.n_entries = np.zeros(1, np.int64)
        self.keys = np.full(MIN_SLOTS, EMPTY_KEY, np.int64)
        self.entries = np.zeros((MIN_SLOTS * MAX_LOAD_PERCENT // 100 + SINK_ROWS, columns), np.int32)
        # NEXT per entry, kept by the tables whose entries are contexts (they have TOTAL and DISTINCT)
        # (none without leaves: every n-gram then has its own entry)
        self.nexts = np.zeros(len(self.entries) if columns > 1 and leaves else 0, np.int32)
        self.max_slots = self._max_slots(max_mb)
        self.first_child = self.sibling = self.child_token = None  # continuation lists, when kept

    @property
    def rows(self) -> int:
        """Rows entries can take (the arrays hold SINK_ROWS more)."""
        return len(self.entries) - SINK_ROWS

    @property
    def capacity(self) -> int:
        """Entries the table can hold now: rows allocated, and <= 70% of the index's slots."""
        return min(self.rows, len(self.keys) * MAX_LOAD_PERCENT // 100)

    @property
    def limit(self) -> int:
        """The most entries this table can come to hold without new rows: its rows, the memory cap's
        index, and every possible n-gram."""
        return min(self.rows, self.max_slots * MAX_LOAD_PERCENT // 100, self.most_possible)

    def allocate_children(self) -> None:
        """Empty continuation lists sized to the rows (``ngram_exact_children_build`` fills them)."""
        rows = len(self.entries)
        self.first_child = np.full(rows, -1, np.int32)  # this table's entries as contexts
        self.sibling = np.full(rows, -1, np.int32)  # next continuation of the same prefix
        self.child_token = np.zeros(rows, np.int32)  # the entry's last token

    def _max_slots(self, max_mb: float) -> int:
        """Largest index whose table (slots, plus 70% of that many entry rows) fits in ``max_mb`` MiB;
        at least MIN_SLOTS."""
        row_bytes = 4 * self.columns + (4 if len(self.nexts) else 0)
        bytes_per_slot = SLOT_BYTES * 100 + row_bytes * MAX_LOAD_PERCENT  # in 1/100 bytes
        most_ids = (1 << self.id_bits) * 100 // MAX_LOAD_PERCENT  # capacity stays <= 2^id_bits entries
        return min(max(int(max_mb * MIB) * 100 // bytes_per_slot, MIN_SLOTS), MAX_SLOTS, most_ids)

    @property
    def nbytes(self) -> int:
        """Memory in use: the index, the rows holding entries and their NEXT (rows past them are reserved
        ahead and not written yet) and the continuation lists."""
        lists = sum(a.nbytes for a in (self.first_child, self.sibling, self.child_token) if a is not None)
        stored = int(self.n_entries[0])
        return self.keys.nbytes + self.entries[:stored].nbytes + self.nexts[:stored].nbytes + lists

    def _target(self, held: int, n_new: int, positions_done: int, positions_left: int) -> int:
        """Entries to make room for when ``held`` (the room now) is too little for the entries of ``n_new``
        more positions after ``positions_done``; 0 when it is enough.

        A growing table is sized for the rest of the stream at the rate it has filled so far, with
        PROJECTION_PERCENT of margin (capped at what the stream could hold), so big tables grow once or
        twice rather than at every 1.5x step; sizes change memory and speed only, never a result. Under
        the memory cap the table grows to the largest size allowed and then stops inserting; that final
        capacity depends on the cap only, so results do not depend on how the stream was chunked either.
        """
        stored = int(self.n_entries[0])
        # at most two entries per position, and each entry is the n-gram that first occurred at one position
        needed = min(stored + 2 * n_new, positions_done + n_new, self.most_possible)
        if needed <= held:
            return 0
        if positions_done > 0:  # projection: entries per position so far, times the positions left
            projected = stored + n_new + stored * max(positions_left - n_new, 0) // positions_done
            projected = projected * PROJECTION_PERCENT // 100
            needed = max(needed, min(projected, self.most_possible))
        return min(max(needed, held * GROWTH_PERCENT // 100), self.max_slots * MAX_LOAD_PERCENT // 100)

    def reserve_rows(self, *sizing) -> bool:
        """Grow the rows (``_target``'s arguments after ``held``); True when the arrays changed."""
        rows = self._target(self.rows, *sizing)
        if rows <= self.rows:
            return False  # room enough, or full: stops inserting, keeps what it has
        stored = int(self.n_entries[0])
        size = rows + SINK_ROWS
        # Rows, NEXT and last tokens are written when their entry is created (``_insert_pass``), so the
        # new rows are left as they come: zeroing rows reserved ahead wrote every byte of them (malloc
        # reuses freed blocks and clears them), 1.8 ms of each scoring of lcet10.txt
        self.entries = _grown(self.entries, size, stored)
        if len(self.nexts):
            self.nexts = _grown(self.nexts, size, stored)
        if self.first_child is not None:
            self.first_child = _grown(self.first_child, size, stored, -1)  # (a new entry has no continuations)
            self.sibling = _grown(self.sibling, size, stored)
            self.child_token = _grown(self.child_token, size, stored)
        return True

    def reserve_index(self, *sizing) -> bool:
        """Grow (rehash) the index (``_target``'s arguments after ``held``); True when it changed."""
        held = len(self.keys) * MAX_LOAD_PERCENT // 100
        n_slots = min(-(-self._target(held, *sizing) * 100 // MAX_LOAD_PERCENT), self.max_slots)
        if n_slots <= len(self.keys):
            return False
        self.keys = ngram_exact_rehash(self.keys, n_slots, self.id_bits)
        return True


def _grown(array: np.ndarray, size: int, kept: int, fill: int | None = None) -> np.ndarray:
    """``array``'s first ``kept`` rows in a new array of ``size`` rows, the rest ``fill`` or, when None,
    not initialized."""
    shape = (size, *array.shape[1:])
    out = np.empty(shape, array.dtype) if fill is None else np.full(shape, fill, array.dtype)
    out[:kept] = array[:kept]
    return out
