"""The mixer protocol: an online predictor whose inputs are the experts' predictions.

A mixer sees, for each position t, the experts' predictions at t (and their causal features), outputs a
full normalized distribution over the vocabulary, and only then updates its state with token t.

Linear mixers (``LinearMixer``) output ``sum_k w_t[k] * p_k,t`` with weights fixed before token t is seen.
They need only each expert's p(target) to score, so the fast path and the full path share one function,
``weights``; that makes rule 4 (fast = full) hold by construction for them. Other mixers (geometric)
subclass ``Mixer`` directly, set ``linear = False`` and implement ``mix_full``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from ..spec import canonical_spec


class Mixer(ABC):
    Options: type | None = None
    registry_name: str = "?"
    linear: bool = False

    def __init__(self, options, *, experts: Sequence[str]):
        """``experts``: the spec strings of the experts this mixer combines, in input order."""
        self.options = options
        self.expert_specs = list(experts)

    @property
    def spec(self) -> str:
        return canonical_spec(self.registry_name, self.options)

    def wanted_features(self) -> dict[int, tuple[str, ...]]:
        """Features this mixer reads, by expert index (e.g. ``{0: ("entropy",), 1: ("order",)}``)."""
        return {}

    def begin(self) -> None:
        """Reset state for a new stream."""

    @abstractmethod
    def mix_full(self, p: np.ndarray, targets: np.ndarray, features: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Mix full distributions float64[T, K, V] position by position; return float64[T, V].

        Each row is computed before ``targets[t]`` is used; then the state is updated with it.
        """

    def mix_logp(self, logp: np.ndarray, features: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Fast path, linear mixers only: float64[T, K] experts' log p(target) -> float64[T] mixed."""
        raise NotImplementedError(f"{self.spec} needs full distributions")

    def history(self) -> dict[str, np.ndarray]:
        """Optional per-position internals for plots (e.g. ``{"weights": float64[T, K]}``)."""
        return {}


class LinearMixer(Mixer):
    """``p_t = sum_k w_t[k] p_k,t``; subclasses implement ``weights`` only."""

    linear = True

    @abstractmethod
    def weights(self, logp: np.ndarray, features: list[dict[str, np.ndarray]]) -> np.ndarray:
        """float64[T, K] log p_k(target) -> float64[T, K] weights (each row >= 0, sums to 1).

        Row t depends only on rows < t of ``logp`` and features <= t; the state is advanced past the
        chunk.
        """

    def mix_logp(self, logp, features):
        w = self.weights(logp, features)
        return _log_weighted_sum(w, logp)

    def mix_full(self, p, targets, features):
        logp = np.log(p[np.arange(len(targets)), :, targets])  # float64[T, K]
        w = self.weights(logp, features)
        return np.einsum("tk,tkv->tv", w, p)


def _log_weighted_sum(w: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """log(sum_k w[t,k] exp(logp[t,k])) computed as the full path does: a plain weighted sum.

    The full path sums ``w * p`` in float64; doing the same here (rather than a shifted logsumexp)
    keeps the two paths within rounding of each other, and p(target) > 0 always, so no underflow to 0
    occurs for any distribution that obeys rule 2.
    """
    return np.log(np.einsum("tk,tk->t", w, np.exp(logp)))
