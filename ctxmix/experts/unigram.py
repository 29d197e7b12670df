"""The unigram expert: adaptive add-alpha token frequencies, p(v) = (c(v) + alpha) / (n + alpha * V)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import CtxmixError
from ..kernels.ngram_common import entropy_nats, entropy_rows
from ..kernels.unigram import unigram_distribution, unigram_full_update, unigram_score_update
from .base import FEATURE_ENTROPY, LONG_CHUNK, Expert, ExpertOutput


def check_tokens(tokens: np.ndarray, expert: Expert) -> np.ndarray:
    """``tokens`` as a contiguous int64[T] with every id in [0, expert.vocab_size), or a CtxmixError
    naming the expert (its spec is built only for the message: that costs more than checking one token)."""
    tokens = np.ascontiguousarray(tokens)
    vocab_size = expert.vocab_size
    if tokens.ndim != 1 or tokens.dtype != np.int64:
        raise CtxmixError(f"expert {expert.spec}: tokens must be int64[T], got {tokens.dtype}{list(tokens.shape)}")
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
        raise CtxmixError(f"expert {expert.spec}: token id {bad} outside the vocabulary [0, {vocab_size})")
    return tokens


MIN_ALPHA = 1e-6  # smallest pseudo-count (see Options.__post_init__)


class UnigramExpert(Expert):
    """p(v) = (c(v) + alpha) / (n + alpha * V) over the n tokens seen so far in the stream."""

    @dataclass(frozen=True)
    class Options:
        alpha: float = field(default=0.5, metadata={"help": "pseudo-count added to every token (> 0)", "min": 0.0})

        def __post_init__(self):
            # p(unseen) = alpha / (n + alpha V) must stay a positive float64 for any n < 2**31: alpha = 5e-324
            # is > 0, yet its p is 0.
            if not self.alpha >= MIN_ALPHA:
                raise CtxmixError(f"alpha={self.alpha} must be > 0, at least {MIN_ALPHA:g} (every token needs p > 0)")

    provides = (FEATURE_ENTROPY,)
    fast_chunk = LONG_CHUNK

    def __init__(self, options=None, *, vocab_size: int):
        super().__init__(options or self.Options(), vocab_size=vocab_size)
        self.begin(np.zeros(0, np.int64))

    def begin(self, tokens):
        self._counts = np.zeros(self.vocab_size, np.int64)  # c(v)
        self._total = np.zeros(1, np.int64)  # n

    def score_chunk(self, tokens, *, full=False, want=()):
        tokens = check_tokens(tokens, self)
        want_entropy = FEATURE_ENTROPY in want
        if full:
            rows = unigram_full_update(self._counts, self._total, tokens, np.ones_like(tokens), self.options.alpha)
            logp = np.log(rows[np.arange(len(tokens)), tokens])
            features = {FEATURE_ENTROPY: entropy_rows(rows)} if want_entropy else {}
            return ExpertOutput(logp, rows, features)
        p, entropy = unigram_score_update(self._counts, self._total, tokens, np.ones_like(tokens), self.options.alpha,
                                          want_entropy)
        return ExpertOutput(np.log(p), None, {FEATURE_ENTROPY: entropy} if want_entropy else {})

    def next_distribution(self, want=()):
        p = unigram_distribution(self._counts, self._total, self.options.alpha)
        return p, ({FEATURE_ENTROPY: float(entropy_nats(p))} if FEATURE_ENTROPY in want else {})

    def observe(self, token):
        self.score_chunk(np.array([token], np.int64))

    def memory_bytes(self):
        return self._counts.nbytes + self._total.nbytes
