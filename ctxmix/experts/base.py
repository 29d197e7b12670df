"""The expert protocol: an online predictor over the whole vocabulary.

An expert scores one stream at a time. ``begin(tokens)`` resets it for a new stream. Its contract is the
stepwise pair: ``next_distribution`` gives the distribution over all V tokens for the next position,
computed from the tokens before it only (rule 1), without changing state; ``observe(token)`` then lets
that token change the state (rule 3). The engine calls ``score_chunk`` on consecutive slices of the
stream, in order; its default runs the stepwise pair, and an expert may replace it with a faster chunked
path that gives the same numbers on any split of the stream (``ctxmix check`` verifies both). A new
expert is one class: ``Options``, ``begin``, ``next_distribution``, ``observe``.
"""

from __future__ import annotations

from abc import ABC
import math
from dataclasses import dataclass, field

import numpy as np

from ..spec import canonical_spec

# Positions per fast-path chunk (``Expert.fast_chunk``): short for an expert that takes seconds a chunk (the
# progress bar moves per chunk), long for one that takes milliseconds (per-chunk set-up is then what counts).
SHORT_CHUNK = 1 << 16
LONG_CHUNK = 1 << 20  # float64 arrays of 8 MiB per expert and mixer row

# Feature names shared by experts and mixers.
FEATURE_ENTROPY = "entropy"  # float64: entropy (nats) of the expert's distribution at t
FEATURE_ORDER = "order"  # float64: longest n-gram order whose context was seen before t (0: none)
FEATURE_CTX_TOTAL = "ctx_total"  # float64: N, continuations seen after that context
FEATURE_CTX_DISTINCT = "ctx_distinct"  # float64: D, distinct continuations seen after that context


@dataclass
class ExpertOutput:
    """What an expert says about a chunk of T positions."""

    logp: np.ndarray  # float64[T]: natural log of p_t(token_t)
    p: np.ndarray | None = None  # float64[T, V]: full distributions, only when asked for (full path)
    features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float64[T]


class Expert(ABC):
    """Base class. Subclasses set ``Options`` (a frozen dataclass, or None) and ``provides`` (features)."""

    Options: type | None = None
    registry_name: str = "?"
    provides: tuple[str, ...] = ()
    fast_chunk: int = SHORT_CHUNK  # positions per fast-path chunk that suit it (a run takes its experts' smallest)
    pretrained: bool = False  # a model trained on a tokenizer's ids: text mode then makes no ids of its own (space runs)

    def __init__(self, options, *, vocab_size: int):
        self.options = options
        self.vocab_size = int(vocab_size)

    @property
    def spec(self) -> str:
        """Canonical spec string: rebuilds this expert and labels its rows."""
        return canonical_spec(self.registry_name, self.options)

    @classmethod
    def stream_tokenizer(cls, options):
        """The tokenizer this expert's streams must be made with (an object of ``ctxmix.data``, such as a
        Hugging Face model's own), or None: any tokenizer of its vocabulary will do. Called before any
        input is read (``components.run_tokenizer``)."""
        return None

    def begin(self, tokens: np.ndarray) -> None:
        """Reset all state for a new stream ``tokens`` (int64[N]).

        The whole stream is passed so that experts can size tables or batch work up front (the neural
        expert batches its windows here); what they compute must still obey rule 1, which
        ``ctxmix check`` verifies by perturbing future tokens.
        """

    def next_distribution(self, want: tuple[str, ...] = ()) -> tuple[np.ndarray, dict[str, float]]:
        """The contract: float64[V], the distribution for the next position, and its features (``want``,
        each in ``provides``), without changing state. The codec decodes with it token by token."""
        raise NotImplementedError(f"expert {self.spec} has no stepwise protocol (next_distribution / observe)")

    def observe(self, token: int) -> None:
        """The contract: advance the state past ``token``."""
        raise NotImplementedError(f"expert {self.spec} has no stepwise protocol (next_distribution / observe)")

    def score_chunk(self, tokens: np.ndarray, *, full: bool = False, want: tuple[str, ...] = ()) -> ExpertOutput:
        """Score the next ``len(tokens)`` positions of the stream (int64[T]) and advance past them.

        ``full``: also return ``p`` (float64[T, V]). ``want``: feature names to return (each in
        ``provides``). ``logp`` must equal ``log(p[t, tokens[t]])`` (rule 4).

        This default is the stepwise pair, position by position, so an expert that implements only
        ``next_distribution`` and ``observe`` is complete and correct. An expert may override it with a
        faster chunked path; ``ctxmix check`` then verifies that path against the stepwise one (its
        ``score_before_update`` rule) and against itself on other chunkings.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        logp = np.empty(n)
        p = np.empty((n, self.vocab_size)) if full else None
        features = {name: np.empty(n) for name in want}
        for t in range(n):
            row, found = self.next_distribution(want)
            logp[t] = math.log(row[tokens[t]])
            if full:
                p[t] = row
            for name in want:
                features[name][t] = found[name]
            self.observe(int(tokens[t]))
        return ExpertOutput(logp, p, features)

    def coding_refusal(self) -> str | None:
        """Why this expert cannot code a file (a decoder could not repeat its numbers bit for bit), or None."""
        return None

    def memory_bytes(self) -> int:
        """Bytes of state currently allocated (tables, counts); 0 if negligible."""
        return 0
