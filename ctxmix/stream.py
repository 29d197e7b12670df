"""A token stream with the byte count each token stands for: the unit every run scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stream:
    """Tokens to score and the bytes each one stands for.

    Position 0 is context only and is never scored: in text mode it is a BOS token that covers no byte
    (so every byte of the file is coded by positions 1..N-1); in shard mode it is the shard's first token,
    which the challenge does not score either (its targets are ``tokens[1:]``).
    """

    name: str  # file path, or the shard pattern for a concatenation of shards
    tokens: np.ndarray  # int64[N], each < vocab_size
    nbytes: np.ndarray  # int64[N], bytes covered by each token (nbytes[0] is not counted)
    vocab_size: int
    mode: str  # "text" or "shard"

    def __post_init__(self) -> None:
        assert self.tokens.dtype == np.int64 and self.tokens.ndim == 1
        assert self.nbytes.dtype == np.int64 and self.nbytes.shape == self.tokens.shape
        assert self.mode in ("text", "shard")

    @property
    def n_scored(self) -> int:
        """Number of scored positions (1..N-1)."""
        return max(len(self.tokens) - 1, 0)

    @property
    def scored_bytes(self) -> int:
        """Bytes covered by the scored positions: the bpb denominator."""
        return int(self.nbytes[1:].sum())

    def prefix(self, n_tokens: int) -> "Stream":
        """The first ``n_tokens`` tokens (context token included)."""
        return Stream(self.name, self.tokens[:n_tokens], self.nbytes[:n_tokens], self.vocab_size, self.mode)
