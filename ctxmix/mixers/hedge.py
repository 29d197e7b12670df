"""Hedge: the exponentially weighted average forecaster (multiplicative weights) over the experts.

    w_t[k] proportional to prior_k * prod_{s<t} p_k,s(token_s) ^ eta,   p_t = sum_k w_t[k] p_k,t

with a uniform prior. eta = 1 is the Bayesian mixture: the weights are the posterior over "which expert
generated the text", and the mixed code length is at most min_k (expert k's code length) + log2 K bits.
eta < 1 tempers the posterior, so the weights move more slowly and a lagging expert keeps more weight.
The weights live in the log domain and are renormalized every position (``kernels/mixers.py``), so
millions of positions never underflow them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import CtxmixError
from ..kernels.mixers import share_weights_update, softmax_weights
from .base import History, LinearMixer, check_logp

# Default learning rate: the Bayesian mixture. Measured with unigram + ngram experts (alice29.txt, lcet10.txt,
# enwik8.first1MB, 1M FineWeb val tokens), eta from 0.003 to 2 gave the same bpb to 0.001 (the n-gram expert
# wins from the first few hundred tokens on), so the default is the one with the regret guarantee.
DEFAULT_ETA = 1.0


def check_eta(eta: float) -> None:
    if not math.isfinite(eta) or eta <= 0.0:
        raise CtxmixError(f"eta must be a finite number > 0, got {eta}")


@dataclass(frozen=True)
class HedgeOptions:
    # learning rate: w_k *= p_k(target)^eta after each token; 1 = Bayesian mixture
    eta: float = field(default=DEFAULT_ETA, metadata={"help": "learning rate (> 0); 1 = Bayesian mixture", "min": 0.0})

    def __post_init__(self) -> None:
        check_eta(self.eta)


class ShareMixer(LinearMixer):
    """Hedge with an optional fixed share (``_alpha``) and log-weight floor (``_logw_floor``)."""

    _alpha = 0.0
    _logw_floor = -math.inf

    def __init__(self, options, *, experts):
        super().__init__(options, experts=experts)
        if not self.expert_specs:
            raise CtxmixError(f"mixer {self.spec}: needs at least one expert")
        self._history = History()
        self.begin()

    def begin(self) -> None:
        n_experts = len(self.expert_specs)
        self._logw = np.full(n_experts, -math.log(n_experts))  # float64[K]: log of the uniform prior
        self._history.clear()
        self._pending = None

    def weights(self, logp, features):
        logp = check_logp(self, logp)
        w = np.empty_like(logp)
        share_weights_update(logp, self._logw, self.options.eta, self._alpha, self._logw_floor, w)
        self._history.add(weights=w)
        return w

    def next_weights(self, features):
        return softmax_weights(self._logw)

    def history(self):
        return self._history.arrays()


class HedgeMixer(ShareMixer):
    """Hedge / exponentially weighted average forecaster with learning rate ``eta``."""

    Options = HedgeOptions

    def __init__(self, options: HedgeOptions | None, *, experts):
        super().__init__(options or HedgeOptions(), experts=experts)
