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

from ..errors import CtxmixError
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
        # kept per options object: the lane engine's hot path passes it to every feature check
        held = self.__dict__.get("_spec_of")
        if held is None or held[0] is not self.options:
            held = self._spec_of = (self.options, canonical_spec(self.registry_name, self.options))
        return held[1]

    def wanted_features(self) -> dict[int, tuple[str, ...]]:
        """Features this mixer needs, by expert index (e.g. ``{0: ("entropy",), 1: ("order",)}``)."""
        return {}

    def optional_features(self) -> dict[int, tuple[str, ...]]:
        """Features this mixer reads when the expert provides them (it is given them, or not, the same way
        on every path)."""
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

    def next_distribution(self, p: np.ndarray, features: list[dict[str, float]]) -> np.ndarray:
        """Stepwise: float64[K, V] experts' distributions for the next position -> float64[V]; no state change."""
        raise NotImplementedError(f"{self.spec} has no stepwise protocol")

    def observe(self, token: int) -> None:
        """Stepwise: advance past ``token`` using the p of the last next_distribution call."""
        raise NotImplementedError(f"{self.spec} has no stepwise protocol")


class LinearMixer(Mixer):
    """``p_t = sum_k w_t[k] p_k,t``; subclasses implement ``weights`` and ``next_weights``.

    Stepwise use (``next_distribution`` / ``observe``) advances the state by calling ``weights`` on a
    one-row chunk, so it runs the same kernel as chunked use.
    """

    linear = True

    @abstractmethod
    def weights(self, logp: np.ndarray, features: list[dict[str, np.ndarray]]) -> np.ndarray:
        """float64[T, K] log p_k(target) -> float64[T, K] weights (each row >= 0, sums to 1).

        Row t depends only on rows < t of ``logp`` and features <= t; the state is advanced past the
        chunk.
        """

    _pending: tuple[np.ndarray, list[dict[str, float]]] | None = None

    @abstractmethod
    def next_weights(self, features: list[dict[str, float]]) -> np.ndarray:
        """float64[K]: the weights ``weights`` would give the next row, computed without changing state."""

    def next_distribution(self, p: np.ndarray, features: list[dict[str, float]]) -> np.ndarray:
        """float64[K, V] experts' distributions for the next position -> float64[V] mixed; no state change."""
        p = np.ascontiguousarray(p, dtype=np.float64)
        if p.ndim != 2 or p.shape[0] != len(self.expert_specs):
            raise CtxmixError(
                f"mixer {self.spec}: next_distribution got p of shape {p.shape}, expected ({len(self.expert_specs)}, V)"
            )
        w = self.next_weights(features)
        self._pending = (p, features)
        return np.einsum("k,kv->v", w, p)

    def observe(self, token: int) -> None:
        """Advance by one position whose token is ``token``, using the p of the last next_distribution."""
        if self._pending is None:
            raise CtxmixError(f"mixer {self.spec}: observe() called without a preceding next_distribution()")
        p, features = self._pending
        self._pending = None
        logp = np.log(p[:, int(token)])[None, :]  # float64[1, K]
        chunk_features = [{name: np.array([value], dtype=np.float64) for name, value in f.items()} for f in features]
        self.weights(logp, chunk_features)

    def mix_logp(self, logp, features):
        w = self.weights(logp, features)
        return log_weighted_sum(w, logp)

    def mix_full(self, p, targets, features):
        logp = np.log(p[np.arange(len(targets)), :, targets])  # float64[T, K]
        w = self.weights(logp, features)
        return np.einsum("tk,tkv->tv", w, p)


def log_weighted_sum(w: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """log(sum_k w[t,k] exp(logp[t,k])) computed as the full path does: a plain weighted sum.

    The full path sums ``w * p`` in float64; doing the same here (rather than a shifted logsumexp)
    keeps the two paths within rounding of each other, and p(target) > 0 always, so no underflow to 0
    occurs for any distribution that obeys rule 2.
    """
    return np.log(np.einsum("tk,tk->t", w, np.exp(logp)))


# history() keeps at most this many rows: positions that are multiples of a step that doubles whenever
# the count would pass it, so a run of millions of positions keeps a plot-sized, evenly spaced record.
HISTORY_MAX_ROWS = 8192


class History:
    """Per-position arrays for plots, thinned to at most ``HISTORY_MAX_ROWS`` evenly spaced rows.

    ``add(name=float64[T, ...], ...)`` appends the next T positions (all arrays with T rows); ``arrays()``
    returns the kept rows plus ``"positions"`` (int64[R]: index among the mixed positions, 0 = the first
    scored position of the stream).
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._next = 0  # index of the next position to be added
        self._step = 1  # keep positions that are multiples of this
        self._positions: list[np.ndarray] = []
        self._rows: dict[str, list[np.ndarray]] = {}
        self._count = 0

    def add(self, **rows: np.ndarray) -> None:
        n_rows = len(next(iter(rows.values())))
        keep = np.arange((-self._next) % self._step, n_rows, self._step)  # rows at multiples of the step
        self._positions.append(self._next + keep)
        self._next += n_rows
        for name, values in rows.items():
            self._rows.setdefault(name, []).append(np.array(values[keep], dtype=np.float64))
        self._count += len(keep)
        if self._count > HISTORY_MAX_ROWS:
            self._thin()

    def _thin(self) -> None:
        positions = np.concatenate(self._positions)
        rows = {name: np.concatenate(parts) for name, parts in self._rows.items()}
        while len(positions) > HISTORY_MAX_ROWS:
            self._step *= 2
            keep = positions % self._step == 0
            positions = positions[keep]
            rows = {name: values[keep] for name, values in rows.items()}
        self._positions = [positions]
        self._rows = {name: [values] for name, values in rows.items()}
        self._count = len(positions)

    def arrays(self) -> dict[str, np.ndarray]:
        if not self._positions:
            return {}
        out = {name: np.concatenate(parts) for name, parts in self._rows.items()}
        out["positions"] = np.concatenate(self._positions)
        return out


def check_p(mixer, p: np.ndarray, ndim: int) -> np.ndarray:
    """float64 C-contiguous ``p`` of the experts' rows, [T, K, V] (``ndim`` 3) or [K, V] (2), or a
    CtxmixError naming the mismatch."""
    p = np.ascontiguousarray(p, dtype=np.float64)
    if p.ndim != ndim or p.shape[-2] != len(mixer.expert_specs):
        expected = ("T, " if ndim == 3 else "") + f"{len(mixer.expert_specs)}, V"
        raise CtxmixError(f"mixer {mixer.spec}: got p of shape {p.shape}, expected ({expected})")
    return p


def check_logp(mixer, logp: np.ndarray) -> np.ndarray:
    """float64[T, K] C-contiguous copy-if-needed of ``logp``, or a CtxmixError naming the mismatch."""
    logp = np.ascontiguousarray(logp, dtype=np.float64)
    if logp.ndim != 2 or logp.shape[1] != len(mixer.expert_specs):
        raise CtxmixError(f"mixer {mixer.spec}: got log p of shape {logp.shape}, expected (T, {len(mixer.expert_specs)})")
    return logp
