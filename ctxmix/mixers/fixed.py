"""The fixed mixer: ``fixed:W1,W2,...`` mixes the experts with constant weights.

The weights are positional, one per expert in input order. They are normalized to sum to 1
(``fixed:2,1`` is ``fixed:0.6667,0.3333``); negative weights, an all-zero list and a count that differs
from the number of experts are refused. ``fixed`` alone gives every expert the same weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import CtxmixError
from .base import LinearMixer, check_logp

def _is_bad_weight(w: float) -> bool:
    return not math.isfinite(w) or w < 0.0


@dataclass(frozen=True)
class FixedOptions:
    # one weight per expert, in input order; normalized to sum 1. Empty: equal weights
    weights: tuple[float, ...] = field(
        default=(), metadata={"help": "weights, one per expert (normalized to sum 1; empty: equal)", "positional": True, "min": 0.0}
    )

    def __post_init__(self) -> None:
        if any(_is_bad_weight(w) for w in self.weights):
            raise CtxmixError(f"weights must be finite and >= 0, got {','.join(map(str, self.weights))}")
        if self.weights and sum(self.weights) <= 0.0:
            raise CtxmixError("weights are all zero: at least one must be > 0")


class FixedMixer(LinearMixer):
    """Constant weights: p_t = sum_k w_k p_k,t with w normalized to sum 1."""

    Options = FixedOptions

    def __init__(self, options: FixedOptions | None, *, experts):
        super().__init__(options or FixedOptions(), experts=experts)
        n_experts = len(self.expert_specs)
        given = self.options.weights
        if given and len(given) != n_experts:
            raise CtxmixError(
                f"mixer {self.spec}: {len(given)} weights given for {n_experts} experts ({', '.join(self.expert_specs)})"
            )
        raw = np.array(given if given else [1.0] * n_experts, dtype=np.float64)
        self._w = raw / raw.sum()  # float64[K], sums to 1

    def begin(self) -> None:
        self._pending = None

    def weights(self, logp, features):
        logp = check_logp(self, logp)
        return np.repeat(self._w[None, :], logp.shape[0], axis=0)

    def next_weights(self, features):
        return self._w.copy()
