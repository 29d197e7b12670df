"""Geometric (logistic, PAQ-style) mixing: p(v) proportional to prod_k p_k(v)^{w_k}, normalized over V.

With weights summing to 1 this is a weighted geometric mean of the experts; weights summing to more than
1 sharpen the result where the experts agree, which a linear mix cannot do. The weights are trained
online by gradient descent on log loss: after token y,

    w_k <- w_k - lr * (E_{p_mix}[log p_k] - log p_k(y))

(the exact gradient of -log p_mix(y)), then clamped to [GEO_WEIGHT_MIN, GEO_WEIGHT_MAX]. The normalizer
needs every token's probability from every expert, so this mixer runs on the full path only.

``select=order`` keeps one weight set per matched n-gram order (the ``order`` feature of the n-gram
expert at t, causal), as PAQ selects weight sets by a small context; ``select=none`` keeps one set.
All sets start at w_k = 1/K (the plain geometric mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import CtxmixError
from ..experts.base import FEATURE_ORDER
from ..kernels.mixers import geometric_mix, geometric_weights_update
from .adaptive import NGRAM_PREFIX, feature_column, resolve_expert
from .base import History, Mixer, check_p

GEO_ORDER_SETS = 16  # weight sets for select=order: orders 0..14, and 15 for anything longer

# Default learning rate, measured with unigram + ngram experts: lr 0.0005..0.002 within 0.001 bpb of each other
# and best (alice29.txt 2.067, lcet10.txt 1.828 bpb; the n-gram alone 2.092, 1.846); 0.01 and up were worse.
DEFAULT_LR = 0.001


@dataclass(frozen=True)
class GeometricOptions:
    # gradient step on log loss per token
    lr: float = field(default=DEFAULT_LR, metadata={"help": "learning rate of the weights (per token, on log loss)", "min": 0.0})
    # what selects the weight set: none (one set) or the n-gram expert's matched order
    select: str = field(default="none", metadata={"help": "weight set selected by: none, or order (n-gram matched order)", "choices": ("none", "order")})
    # which expert's order feature selects the set (select=order)
    ngram: str = field(default="", metadata={"help": "expert whose order selects the set: index or spec prefix (default: first ngram)"})

    def __post_init__(self) -> None:
        if not math.isfinite(self.lr) or self.lr < 0.0:
            raise CtxmixError(f"lr must be a finite number >= 0, got {self.lr}")
        if self.select not in ("none", "order"):
            raise CtxmixError(f"select must be none or order, got {self.select!r}")


class GeometricMixer(Mixer):
    """p proportional to prod_k p_k^{w_k}; weights learned by online gradient descent on log loss."""

    Options = GeometricOptions
    linear = False

    def __init__(self, options: GeometricOptions | None, *, experts):
        super().__init__(options or GeometricOptions(), experts=experts)
        if not self.expert_specs:
            raise CtxmixError(f"mixer {self.spec}: needs at least one expert")
        self._ngram: int | None = None
        if self.options.select == "order":
            self._ngram = resolve_expert(self.options.ngram or NGRAM_PREFIX, self.expert_specs, what="ngram", mixer_spec=self.spec)
        elif self.options.ngram:
            raise CtxmixError(f"mixer {self.spec}: ngram= is only used with select=order")
        self._history = History()
        self.begin()

    def wanted_features(self):
        return {self._ngram: (FEATURE_ORDER,)} if self._ngram is not None else {}

    def begin(self) -> None:
        n_experts = len(self.expert_specs)
        n_sets = GEO_ORDER_SETS if self._ngram is not None else 1
        self._w = np.full((n_sets, n_experts), 1.0 / n_experts)  # float64[S, K]
        self._history.clear()
        self._pending: tuple[np.ndarray, int] | None = None

    def _sets(self, features, n_rows: int) -> np.ndarray:
        """int64[T] weight set of each row."""
        if self._ngram is None:
            return np.zeros(n_rows, dtype=np.int64)
        order = feature_column(features, self._ngram, FEATURE_ORDER, self.spec)
        if len(order) != n_rows:
            raise CtxmixError(f"mixer {self.spec}: {len(order)} feature rows for {n_rows} positions")
        return np.clip(order, 0, GEO_ORDER_SETS - 1).astype(np.int64)

    def mix_full(self, p, targets, features):
        p = check_p(self, p, 3)
        n_rows, n_experts, vocab = p.shape
        targets = np.ascontiguousarray(targets, dtype=np.int64)
        sets = self._sets(features, n_rows)
        out_p = np.empty((n_rows, vocab))
        out_w = np.empty((n_rows, n_experts))
        geometric_weights_update(p, targets, sets, self._w, self.options.lr, out_p, out_w)
        self._history.add(weights=out_w)
        return out_p

    def next_distribution(self, p: np.ndarray, features: list[dict[str, float]]) -> np.ndarray:
        """float64[K, V] -> float64[V], no state change (same kernel arithmetic as ``mix_full``)."""
        p = check_p(self, p, 2)
        weight_set = int(self._sets(features, 1)[0])
        self._pending = (p, weight_set)
        return geometric_mix(p, self._w[weight_set])

    def observe(self, token: int) -> None:
        if self._pending is None:
            raise CtxmixError(f"mixer {self.spec}: observe() called without a preceding next_distribution()")
        p, weight_set = self._pending
        self._pending = None
        self.mix_full(p[None], np.array([token], dtype=np.int64), self._one_row_features(weight_set))

    def _one_row_features(self, weight_set: int) -> list[dict[str, np.ndarray]]:
        """Features that make ``_sets`` pick ``weight_set`` again for a one-row chunk."""
        features: list[dict[str, np.ndarray]] = [{} for _ in self.expert_specs]
        if self._ngram is not None:
            features[self._ngram] = {FEATURE_ORDER: np.array([float(weight_set)])}
        return features

    def history(self):
        return self._history.arrays()
