"""The uniform expert: 1/V for every token, always. Costs exactly log2(V) bits per token."""

from __future__ import annotations

import math

import numpy as np

from .base import FEATURE_ENTROPY, LONG_CHUNK, Expert, ExpertOutput


class UniformExpert(Expert):
    """1/V for every token."""

    provides = (FEATURE_ENTROPY,)
    fast_chunk = LONG_CHUNK

    def score_chunk(self, tokens, *, full=False, want=()):
        n = len(tokens)
        logp = np.full(n, -math.log(self.vocab_size))
        p = np.full((n, self.vocab_size), 1.0 / self.vocab_size) if full else None
        features = {FEATURE_ENTROPY: np.full(n, math.log(self.vocab_size))} if FEATURE_ENTROPY in want else {}
        return ExpertOutput(logp, p, features)

    def next_distribution(self, want=()):
        features = {FEATURE_ENTROPY: math.log(self.vocab_size)} if FEATURE_ENTROPY in want else {}
        return np.full(self.vocab_size, 1.0 / self.vocab_size), features

    def observe(self, token):
        pass  # no state to advance
