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
one probe per table. ``hashed`` (kernels/ngram_hashed.py) is the PR #909 bucket cache, normalized over
the whole vocabulary, O(orders * V) per position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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
    ngram_exact_context,
    ngram_exact_count_rows_update,
    ngram_exact_count_update,
    ngram_exact_insert,
    ngram_exact_rehash,
)
from ..kernels.ngram_hashed import ngram_hashed_context, ngram_hashed_count_update
from ..kernels.unigram import unigram_distribution, unigram_full_update, unigram_score_update
from ..spec import IntRange
from . import registry
from .base import FEATURE_CTX_DISTINCT, FEATURE_CTX_TOTAL, FEATURE_ENTROPY, FEATURE_ORDER, Expert, ExpertOutput
from .unigram import check_tokens

BASE_ALPHA = 0.5  # add-1/2 unigram at the bottom of the chain: every token keeps p > 0
DEFAULT_BUCKETS = 4_194_304  # hashed: buckets per order and per kind (context, pair): 2 x 16 MiB per order
ROW_BLOCK = 256  # positions per kernel call when full rows are built: T x V float64 stays ~2 MiB
MAX_LOAD_PERCENT = 70  # exact index: grow before more than 70% of the slots are used (linear probing)
GROWTH_PERCENT = 150  # exact index: a grown index has at least 1.5x the slots (amortized rehashing)
MIN_SLOTS = 8  # exact index: smallest index, also under a tiny memory cap
MAX_SLOTS = (1 << 31) - 1  # exact index: home_slot maps 32 hash bits onto < 2^31 slots; entry ids are int32
SLOT_BYTES = 12  # int64 key + int32 entry id
MIB = 1 << 20
DEFAULT_MAX_MB = 1024.0  # exact: per table; a full table stops inserting (and the run goes on)
FEATURES = (FEATURE_ORDER, FEATURE_CTX_TOTAL, FEATURE_CTX_DISTINCT)  # rows of the features array


def _per_order(values: tuple[float, ...], n_orders: int) -> list[float]:
    """Values for orders lo, lo+1, ...: as given, the last one repeated."""
    return [values[min(i, len(values) - 1)] for i in range(n_orders)]


@registry.register("ngram", "interpolated n-gram counts, orders 2..11 (exact or hashed tables)")
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
            "help": "hashed only: buckets per order, for contexts and for (context, token) pairs each", "min": 1})
        max_mb: float = field(default=DEFAULT_MAX_MB, metadata={
            "help": "exact only: memory cap per n-gram length's table (MiB); a full table stops inserting",
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
                if not d + beta > 0:
                    raise CtxmixError(f"discount {d} + strength {beta} must be > 0 (unseen tokens need p > 0)")
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
        self.begin(np.zeros(0, np.int64))

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
            self._tables = [_ExactTable(length, self._entry_columns(length), self.options.max_mb)
                            for length in range(self.hi + 1)]  # index 0 unused: the empty context
            self._last_ids = np.full(self.hi + 1, -1, np.int64)  # entry id of the L-gram ending at t-1
            self._last_ids[0] = 0  # the empty context is always "stored", as prefix id 0
        else:
            n_orders = self.hi - self.lo + 1
            self._ctx_counts = np.zeros((n_orders, self.options.buckets), np.int32)
            self._pair_counts = np.zeros((n_orders, self.options.buckets), np.int32)
            self._history = np.full(self.hi - 1, -1, np.int64)  # last hi-1 tokens, -1 before the stream

    def _entry_columns(self, length: int) -> int:
        if length == self.hi:
            return 1  # COUNT only: the longest n-grams are never contexts
        if length >= self.lo - 1:
            return 3  # COUNT, TOTAL, DISTINCT
        return 0  # only a link in the prefix chain of longer n-grams

    def memory_bytes(self) -> int:
        base = self._unigram_counts.nbytes + self._escape_scales.nbytes
        if self.options.table == "exact":
            return base + sum(table.nbytes for table in self._tables[1:])
        return base + self._ctx_counts.nbytes + self._pair_counts.nbytes

    def stored_entries(self) -> int:
        """Exact: n-grams stored over all lengths. Hashed: non-empty pair buckets."""
        if self.options.table == "exact":
            return sum(int(table.n_entries[0]) for table in self._tables[1:])
        return int(np.count_nonzero(self._pair_counts))

    # ---- chunked scoring -----------------------------------------------------------------------------

    def score_chunk(self, tokens, *, full=False, want=()):
        tokens = check_tokens(tokens, self.vocab_size, self.spec)
        want_entropy = FEATURE_ENTROPY in want
        with_rows = full or want_entropy
        if with_rows and len(tokens) > ROW_BLOCK:  # bounded memory; same numbers (chunking is exact)
            parts = [self.score_chunk(tokens[i : i + ROW_BLOCK], full=full, want=want)
                     for i in range(0, len(tokens), ROW_BLOCK)]
            return ExpertOutput(np.concatenate([o.logp for o in parts]),
                                np.concatenate([o.p for o in parts]) if full else None,
                                {name: np.concatenate([o.features[name] for o in parts]) for name in parts[0].features})
        n, n_orders = len(tokens), self.hi - self.lo + 1
        stats = np.zeros((n_orders, 3, n), np.int64)  # per order and position: c(target), N, D before t
        count_rows = np.zeros((n_orders, n if with_rows else 0, self.vocab_size), np.int32)  # c(v), full path
        if self.options.table == "exact":
            novel = self._exact_counts(tokens, stats, count_rows)
        else:
            window = np.concatenate((self._history, tokens))
            novel = ngram_hashed_count_update(self._ctx_counts, self._pair_counts, window, self.options.exclusion,
                                              stats, count_rows)
            self._history = np.ascontiguousarray(window[len(window) - len(self._history):])
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

    def _exact_counts(self, tokens, stats, count_rows):
        """Exact tables, one chunk: insert n-grams table by table, then record (c, N, D) and count order
        by order (``count_rows`` too when it has rows). Returns novel bool[T]: the order-lo n-gram ending
        at t was not stored before t (what the base unigram counts under exclusion)."""
        n = len(tokens)
        self._reserve(n)
        ids = np.empty((self.hi + 1, n), np.int64)  # ids[L, t]: entry id of the L-gram ending at t (-1: none)
        ids[0] = 0
        novel = np.ones((self.hi + 2, n), np.bool_)  # novel[L, t]: that L-gram was not stored before t
        for length in range(1, self.hi + 1):
            table = self._tables[length]
            prefix = _shifted(ids[length - 1], self._last_ids[length - 1])
            ids[length], novel[length] = ngram_exact_insert(
                table.keys, table.slot_ids, table.n_entries, table.capacity, prefix, tokens, self._token_bits)
        for i, order in enumerate(range(self.lo, self.hi + 1)):
            table, ctx_table = self._tables[order], self._tables[order - 1]
            increments = novel[order + 1] if self.options.exclusion else novel[self.hi + 1]  # the last row is all True
            context_ids = _shifted(ids[order - 1], self._last_ids[order - 1])
            steps = np.stack((ids[order], context_ids, increments.astype(np.int64)))  # int64[3, T]
            if count_rows.shape[1]:
                ngram_exact_count_rows_update(table.keys, table.slot_ids, table.entries, ctx_table.entries, steps,
                                              self._token_bits, stats[i], count_rows[i])
            else:
                ngram_exact_count_update(table.entries, ctx_table.entries, steps, stats[i])
        if n:
            self._last_ids[:] = ids[:, -1]
        return novel[self.lo]

    def _reserve(self, n_new: int) -> None:
        """Before a chunk: room in every table for ``n_new`` more entries at <= 70% load (or the cap)."""
        left = max(self._stream_length - self._position, 0)
        for length in range(1, self.hi + 1):
            self._tables[length].reserve(n_new, self.vocab_size**length, self._position, left)
        self._position += n_new

    # ---- stepwise ------------------------------------------------------------------------------------

    def next_distribution(self, want=()):
        p_base = unigram_distribution(self._unigram_counts, self._unigram_total, BASE_ALPHA)
        if self.options.table == "exact":
            per_order = [ngram_exact_context(self._tables[order].keys, self._tables[order].slot_ids,
                                             self._tables[order].entries, self._tables[order - 1].entries,
                                             self._last_ids[order - 1], self._token_bits, self.vocab_size)
                         for order in range(self.lo, self.hi + 1)]
            totals = np.array([(total, distinct) for total, distinct, _ in per_order], np.int64)  # N, D per order
            count_rows = np.stack([row for _, _, row in per_order])  # int32[K, V]
        else:
            totals, count_rows = ngram_hashed_context(self._ctx_counts, self._pair_counts, self._history,
                                                      self.vocab_size)
        p, found = ngram_chain_distribution(totals, count_rows, p_base, self._params, self.lo, self._escape_scales)
        features = {name: float(found[i]) for i, name in enumerate(FEATURES) if name in want}
        if FEATURE_ENTROPY in want:
            features[FEATURE_ENTROPY] = float(entropy_rows(p[None, :])[0])
        return p, features

    def observe(self, token):
        self.score_chunk(np.array([token], np.int64))


def _shifted(row: np.ndarray, first: int) -> np.ndarray:
    """``[first, row[0], ..., row[T-2]]``: the value at t-1 for each t of a chunk."""
    out = np.empty_like(row)
    out[0:1] = first
    out[1:] = row[:-1]
    return out


class _ExactTable:
    """Arrays of one exact table (n-grams of one length); see ``kernels/ngram_exact.py``."""

    def __init__(self, length: int, columns: int, max_mb: float):
        self.length = length
        self.columns = columns
        self.n_entries = np.zeros(1, np.int64)
        self.keys = np.full(MIN_SLOTS, EMPTY_KEY, np.int64)
        self.slot_ids = np.zeros(MIN_SLOTS, np.int32)
        self.capacity = MIN_SLOTS * MAX_LOAD_PERCENT // 100
        self.entries = np.zeros((self.capacity, columns), np.int32)
        self.max_slots = self._max_slots(max_mb)

    def _max_slots(self, max_mb: float) -> int:
        """Largest index whose table (slots, plus 70% of that many entry rows) fits in ``max_mb`` MiB;
        at least MIN_SLOTS."""
        bytes_per_slot = SLOT_BYTES * 100 + self.columns * 4 * MAX_LOAD_PERCENT  # in 1/100 bytes
        return min(max(int(max_mb * MIB) * 100 // bytes_per_slot, MIN_SLOTS), MAX_SLOTS)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.slot_ids.nbytes + self.entries.nbytes

    def reserve(self, n_new: int, most_possible: int, positions_done: int, positions_left: int) -> None:
        """Grow (rehash) so that ``n_new`` more entries fit at <= 70% load.

        A growing table is sized for the rest of the stream at the rate it has filled so far (capped
        at what the stream could hold), so big tables are rehashed once or twice rather than at every
        1.5x step; sizes change memory and speed only, never a result. Under the memory cap the table
        grows to the largest size allowed and then stops inserting; that final capacity depends on the
        cap only, so results do not depend on how the stream was chunked either.
        """
        stored = int(self.n_entries[0])
        needed = min(stored + n_new, most_possible)
        if needed <= self.capacity:
            return
        if positions_done > 0:  # projection: entries per position so far, times the positions left
            projected = stored + n_new + stored * max(positions_left - n_new, 0) // positions_done
            needed = max(needed, min(projected, most_possible))
        n_slots = max(-(-needed * 100 // MAX_LOAD_PERCENT), len(self.keys) * GROWTH_PERCENT // 100)
        n_slots = min(n_slots, self.max_slots)
        if n_slots <= len(self.keys):
            return  # full: stops inserting, keeps what it has
        self.keys, self.slot_ids = ngram_exact_rehash(self.keys, self.slot_ids, n_slots)
        self.capacity = n_slots * MAX_LOAD_PERCENT // 100
        entries = np.empty((self.capacity, self.columns), np.int32)
        entries[:stored] = self.entries[:stored]
        entries[stored:] = 0
        self.entries = entries
