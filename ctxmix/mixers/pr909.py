"""Parameter Golf PR #909's whole mixing configuration as one linear mixer.

PR #909 (openai/parameter-golf, "Record: 11-gram Eval Cache + Hedge Mixer", train_gpt.py
``eval_val_sliding``) runs Hedge over two inputs: the base model alone, and the entropy-adaptive mix of
the base model and the n-gram cache (``adaptive`` here). A mix of linear mixes is linear, so this mixer's
weights over the experts are the composition:

    h_t = Hedge weights over (p_base, p_adaptive)          p_adaptive = (1 - alpha_t) p_base + alpha_t p_ngram
    w_t[base] = h_t[0] + h_t[1] (1 - alpha_t),   w_t[ngram] = h_t[1] alpha_t,   other experts 0.

Mapping PR #909's ``HEDGE_BETA = 2.0`` onto eta: after each scored segment of a sliding window (64 tokens
at stride 64) it adds ``beta * mean(log p)`` of the segment to each log weight, i.e. beta / 64 = 0.03125
per token; ctxmix adds eta * log p after every token, so eta = 2 / 64 gives the same total step per 64
tokens (PR #909's weights stay fixed inside a segment, ctxmix's move every token). PR #909 also shifts the
log weights to max 0 and clips them at -20 after every update (``logw_floor``), and starts from equal
weights. Not reproduced: its clip of p at 1e-12 inside the update (every ctxmix p is > 0 already) and its
per-GPU Hedge state (8 independent copies on 8 ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import CtxmixError
from ..kernels.mixers import share_weights_update, softmax_weights
from .adaptive import AdaptiveAlpha, AdaptiveOptions
from .base import History, LinearMixer, check_logp
from .hedge import check_eta

PR909_HEDGE_BETA = 2.0  # HEDGE_BETA in PR #909
PR909_SEGMENT_TOKENS = 64  # its sliding-window stride: tokens per Hedge update
PR909_LOGW_FLOOR = -20.0  # its clip of the max-shifted log weights


@dataclass(frozen=True)
class PR909Options(AdaptiveOptions):
    # Hedge learning rate per token (PR #909: beta 2 per 64-token segment mean)
    eta: float = field(default=PR909_HEDGE_BETA / PR909_SEGMENT_TOKENS, metadata={"help": "Hedge learning rate per token (PR #909: beta 2 / 64 tokens)", "min": 0.0})
    # floor of the Hedge log weights after shifting the largest to 0
    logw_floor: float = field(default=PR909_LOGW_FLOOR, metadata={"help": "floor of the max-shifted Hedge log weights (PR #909: -20)", "max": 0.0})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_eta(self.eta)
        if math.isnan(self.logw_floor) or self.logw_floor > 0.0:
            raise CtxmixError(f"logw_floor must be <= 0, got {self.logw_floor}")


class PR909Mixer(LinearMixer):
    """Hedge (eta = PR #909's beta per token) over (base alone, adaptive base/n-gram mix)."""

    Options = PR909Options

    def __init__(self, options: PR909Options | None, *, experts):
        super().__init__(options or PR909Options(), experts=experts)
        self._alpha = AdaptiveAlpha(self.options, self.expert_specs, self.spec)
        self._history = History()
        self.begin()

    def wanted_features(self):
        return self._alpha.wanted_features()

    def begin(self) -> None:
        self._logw = np.full(2, -math.log(2.0))  # float64[2]: equal weights on (base, adaptive mix)
        self._history.clear()
        self._pending = None

    def _compose(self, h: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        w = np.zeros((len(alpha), len(self.expert_specs)))
        w[:, self._alpha.base] = h[:, 0] + h[:, 1] * (1.0 - alpha)
        w[:, self._alpha.ngram] = h[:, 1] * alpha
        return w

    def weights(self, logp, features):
        logp = check_logp(self, logp)
        alpha = self._alpha(features)
        if len(alpha) != logp.shape[0]:
            raise CtxmixError(f"mixer {self.spec}: {len(alpha)} feature rows for {logp.shape[0]} positions")
        logp_base = logp[:, self._alpha.base]
        # log p_adaptive(target), a plain weighted sum of probabilities as the linear full path computes it
        logp_mix = np.log((1.0 - alpha) * np.exp(logp_base) + alpha * np.exp(logp[:, self._alpha.ngram]))
        inputs = np.ascontiguousarray(np.stack([logp_base, logp_mix], axis=1))  # float64[T, 2]
        h = np.empty_like(inputs)
        share_weights_update(inputs, self._logw, self.options.eta, 0.0, self.options.logw_floor, h)
        w = self._compose(h, alpha)
        self._history.add(weights=w, hedge=h, alpha=alpha)
        return w

    def next_weights(self, features):
        alpha = self._alpha(features)
        return self._compose(softmax_weights(self._logw)[None, :], alpha)[0]

    def history(self):
        return self._history.arrays()
