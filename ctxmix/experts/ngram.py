"""The n-gram expert: orders lo..hi interpolated from the lowest order up, on exact or hashed tables.

Estimator (normalized by construction; see ``kernels/ngram_common.py``). The chain starts at the
adaptive unigram p_1(v) = (c(v) + 1/2) / (n + V/2), so every p > 0, then for n = lo..hi:

    p_n(v) = (c_n(v) - d_n [c_n(v) > 0] + (beta_n + d_n D_n) p_{n-1}(v)) / (N_n + beta_n)

where, for the context of order n (the n-1 tokens before t), c_n(v) is the count of v after it, N_n the
sum of those counts and D_n how many are > 0; an order whose context has N_n = 0 passes p_{n-1} through.
The discounts d_n grow with the order, as in the hierarchical Pitman-Yor language model and the
sequence memoizer (deep contexts are nearly deterministic or nearly novel; little in between).
Update exclusion (``exclusion=true``, the default) counts a token at order n only when the (n+1)-gram
ending there is new, so lower orders hold continuation counts (interpolated Kneser-Ney); without it every
order counts every token.

Tables: ``exact`` (kernels/ngram_exact.py) stores every n-gram with its full key; the target path costs
one probe per table. ``hashed`` (kernels/ngram_hashed.py) is the PR #909 bucket cache, normalized over
the whole vocabulary, O(orders * V) per position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import CtxmixError
from ..kernels.ngram_common import entropy_rows
from ..kernels.ngram_exact import (
    COUNT,
    DISTINCT,
    EMPTY_KEY,
    TOTAL,
    ngram_exact_distribution,
    ngram_exact_full_update,
    ngram_exact_insert,
    ngram_exact_rehash,
    ngram_exact_score_update,
)
from ..kernels.ngram_hashed import ngram_hashed_distribution, ngram_hashed_full_update, ngram_hashed_score_update
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
SLOT_BYTES = 12  # int64 key + int32 entry id
MIB = 1 << 20
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
        max_mb: float = field(default=1024.0, metadata={
            "help": "exact only: memory cap per n-gram length's table (MiB); a full table stops inserting",
            "min": 0.0})
        discount: tuple[float, ...] = field(default=(0.6, 0.7, 0.8, 0.85, 0.9), metadata={
            "help": "absolute discount d per order lo, lo+1, ... (last repeats), each in [0, 1)",
            "min": 0.0, "max": 1.0})
        strength: tuple[float, ...] = field(default=(0.0,), metadata={
            "help": "Pitman-Yor strength beta per order lo, lo+1, ... (last repeats), beta + d > 0",
            "min": 0.0})
        exclusion: bool = field(default=True, metadata={
            "help": "update exclusion: lower orders count only novel continuations (Kneser-Ney)"})

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
            if self.table == "hashed" and self.max_mb != 1024.0:
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
        base = self._unigram_counts.nbytes
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
        features = np.zeros((len(FEATURES), len(tokens)))
        if with_rows:
            rows = unigram_full_update(self._unigram_counts, self._unigram_total, tokens, BASE_ALPHA)
            if self.options.table == "exact":
                self._exact_chunk(tokens, rows, None, features)
            else:
                window = np.concatenate((self._history, tokens))
                ngram_hashed_full_update(self._ctx_counts, self._pair_counts, window, self._params,
                                         self.options.exclusion, rows, features)
                self._history = np.ascontiguousarray(window[len(window) - len(self._history):])
            logp = np.log(rows[np.arange(len(tokens)), tokens])
        else:
            rows = None
            p_base, _ = unigram_score_update(self._unigram_counts, self._unigram_total, tokens, BASE_ALPHA, False)
            if self.options.table == "exact":
                p = self._exact_chunk(tokens, None, p_base, features)
            else:
                window = np.concatenate((self._history, tokens))
                p = ngram_hashed_score_update(self._ctx_counts, self._pair_counts, window, self._params,
                                              self.options.exclusion, self.vocab_size, p_base, features)
                self._history = np.ascontiguousarray(window[len(window) - len(self._history):])
            logp = np.log(p)
        out = {name: features[i] for i, name in enumerate(FEATURES) if name in want}
        if want_entropy:
            out[FEATURE_ENTROPY] = entropy_rows(rows)
        return ExpertOutput(logp, rows if full else None, out)

    def _exact_chunk(self, tokens, rows, p_base, features):
        """Exact tables, one chunk: insert n-grams table by table, then score and count order by order.
        With ``rows`` (float64[T, V], base on entry) builds full rows in place; else returns p(target)."""
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
        p = p_base
        for i, order in enumerate(range(self.lo, self.hi + 1)):
            table, ctx_table = self._tables[order], self._tables[order - 1]
            increments = novel[order + 1] if self.options.exclusion else novel[self.hi + 1]  # the last row is all True
            steps = np.stack((ids[order], _shifted(ids[order - 1], self._last_ids[order - 1]), increments.astype(np.int64)))
            if rows is None:
                p = ngram_exact_score_update(table.entries, ctx_table.entries, steps, self._params[i], order, p, features)
            else:
                ngram_exact_full_update(table.keys, table.slot_ids, table.entries, ctx_table.entries, steps,
                                        self._params[i], order, self._token_bits, rows, features)
        if n:
            self._last_ids[:] = ids[:, -1]
        return p

    def _reserve(self, n_new: int) -> None:
        """Before a chunk: room in every table for ``n_new`` more entries at <= 70% load (or the cap)."""
        for length in range(1, self.hi + 1):
            self._tables[length].reserve(n_new, self.vocab_size**length)

    # ---- stepwise ------------------------------------------------------------------------------------

    def next_distribution(self, want=()):
        p = unigram_distribution(self._unigram_counts, self._unigram_total, BASE_ALPHA)
        found = np.zeros(len(FEATURES))
        if self.options.table == "exact":
            for i, order in enumerate(range(self.lo, self.hi + 1)):
                table, ctx_table = self._tables[order], self._tables[order - 1]
                p, total, distinct = ngram_exact_distribution(table.keys, table.slot_ids, table.entries, ctx_table.entries,
                                                              self._last_ids[order - 1], self._params[i], self._token_bits, p)
                if total > 0:
                    found[:] = (order, total, distinct)
        else:
            p, found = ngram_hashed_distribution(self._ctx_counts, self._pair_counts, self._history, self._params, p)
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

    def _bytes_for(self, n_slots: int) -> int:
        return n_slots * SLOT_BYTES + (n_slots * MAX_LOAD_PERCENT // 100) * self.columns * 4

    def _max_slots(self, max_mb: float) -> int:
        """Largest index whose table fits in ``max_mb`` MiB (at least MIN_SLOTS)."""
        budget = int(max_mb * MIB)
        n_slots = int(budget / (SLOT_BYTES + self.columns * 4 * MAX_LOAD_PERCENT / 100)) + 1
        while n_slots > MIN_SLOTS and self._bytes_for(n_slots) > budget:
            n_slots -= 1
        return max(n_slots, MIN_SLOTS)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.slot_ids.nbytes + self.entries.nbytes

    def reserve(self, n_new: int, most_possible: int) -> None:
        """Grow (rehash) so that ``n_new`` more entries fit at <= 70% load. Under the memory cap the
        table grows to the largest size allowed and then stops inserting; that final capacity depends on
        the cap only, so results do not depend on how the stream was chunked."""
        needed = min(int(self.n_entries[0]) + n_new, most_possible)
        if needed <= self.capacity:
            return
        n_slots = max(-(-needed * 100 // MAX_LOAD_PERCENT), len(self.keys) * GROWTH_PERCENT // 100)
        n_slots = min(n_slots, self.max_slots)
        if n_slots <= len(self.keys):
            return  # full: stops inserting, keeps what it has
        self.keys, self.slot_ids = ngram_exact_rehash(self.keys, self.slot_ids, n_slots)
        self.capacity = n_slots * MAX_LOAD_PERCENT // 100
        entries = np.zeros((self.capacity, self.columns), np.int32)
        stored = int(self.n_entries[0])
        entries[:stored] = self.entries[:stored]
        self.entries = entries


__all__ = ["NgramExpert", "COUNT", "TOTAL", "DISTINCT"]
