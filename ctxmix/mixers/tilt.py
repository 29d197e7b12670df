"""``tilt``: the n-gram tilt of the final Parameter Golf records, normalized in closed form.

When the n-gram expert's most probable token h has probability at least ``threshold``, the base expert's
logit of h is raised by ``boost`` and the distribution renormalized:

    p'(v) = p(v) e^{boost [v = h]} / (1 + p(h) (e^boost - 1))

(the denominator is the sum over V of the numerator, so p' sums to 1 and every p' > 0 where p > 0);
elsewhere p' = p. Only the base expert's distribution and the n-gram expert's top token and its
probability are read, all computed from tokens before t.

Sources: the token-only n-gram tilt of openai/parameter-golf PR #1514 (merged), carried into the final
records of PR #2018 and PR #2135 ("token-only n-gram tilt", a boost applied to a hinted token taken from
a causal token n-gram, with a closed-form normalization); PR #2050 ("Adaptive-Beta Hedge") runs Hedge
over several boosts instead of fixing one, which ``boosts=a;b;...`` reproduces here: each boost gives a
tilted distribution, and Hedge (learning rate ``eta``) mixes them linearly, so the mix stays normalized.
The hint there comes from the challenge code's own n-gram counter; here it is the n-gram expert's top
token, and the threshold applies to its probability.

Needs the base expert's full distribution and the n-gram expert's (full path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import CtxmixError
from ..spec import check_fields
from ..kernels.mixers import share_weights_update, softmax_weights
from .adaptive import expert_choice_field, resolve_base_and_ngram
from .base import History, Mixer, check_p
from .hedge import check_eta

DEFAULT_THRESHOLD = 0.5
DEFAULT_BOOST = 2.0  # the boost (beta) of the records' tilt (e.g. PR #1557: beta=2.0)
MAX_BOOST = 50.0  # e^50 ~ 5e21: far past any useful boost, and e^boost stays finite


@dataclass(frozen=True)
class TiltOptions:
    # tilt only where the n-gram expert's top token has at least this probability
    threshold: float = field(default=DEFAULT_THRESHOLD, metadata={"help": "n-gram top-token probability needed to tilt", "min": 0.0, "max": 1.0})
    # added to the base expert's logit of that token
    boost: float = field(default=DEFAULT_BOOST, metadata={"help": "logit boost of the n-gram's top token", "min": 0.0, "max": MAX_BOOST})
    # several boosts mixed by Hedge (PR #2050), written a;b;c; empty: the one boost above
    boosts: tuple[float, ...] = field(default=(), metadata={"help": "boosts mixed by Hedge, a;b;c (replaces boost)", "min": 0.0, "max": MAX_BOOST})
    eta: float = field(default=1.0, metadata={"help": "Hedge learning rate over the boosts", "min": 0.0})
    base: str = expert_choice_field("base")
    ngram: str = expert_choice_field("ngram")

    def __post_init__(self) -> None:
        check_fields(self, "mixer tilt")  # (specs are checked as they are parsed; this covers Python callers)
        check_eta(self.eta)
        if self.boosts and self.boost != DEFAULT_BOOST:
            raise CtxmixError("give boost= or boosts=, not both")


def tilted_rows(p_base: np.ndarray, top: np.ndarray, gate: np.ndarray, boost: float) -> np.ndarray:
    """float64[T, V]: ``p_base`` with the logit of ``top[t]`` raised by ``boost`` where ``gate[t]``,
    renormalized in closed form (see the module docstring)."""
    rows = np.arange(len(top))
    p_top = p_base[rows, top]
    scale = np.where(gate, 1.0 / (1.0 + p_top * math.expm1(boost)), 1.0)  # 1 / (1 + p(h)(e^b - 1))
    out = p_base * scale[:, None]
    out[rows, top] = np.where(gate, p_top * math.exp(boost) * scale, p_top)
    return out


class TiltMixer(Mixer):
    """Raise the base expert's logit of the n-gram expert's confident top token; Hedge over boosts."""

    Options = TiltOptions
    linear = False

    def __init__(self, options: TiltOptions | None, *, experts):
        super().__init__(options or TiltOptions(), experts=experts)
        self._base, self._ngram = resolve_base_and_ngram(self.options, self.expert_specs, self.spec)
        self._boosts = np.array(self.options.boosts or (self.options.boost,), dtype=np.float64)
        self._history = History()
        self.begin()

    def begin(self) -> None:
        self._logw = np.full(len(self._boosts), -math.log(len(self._boosts)))  # Hedge's log weights
        self._history.clear()
        self._pending = None

    def _candidates(self, p: np.ndarray) -> list[np.ndarray]:
        """One tilted float64[T, V] per boost, for rows ``p`` float64[T, K, V]."""
        ngram = p[:, self._ngram]
        top = ngram.argmax(axis=1)
        gate = ngram[np.arange(len(top)), top] >= self.options.threshold
        return [tilted_rows(p[:, self._base], top, gate, float(b)) for b in self._boosts]

    def mix_full(self, p, targets, features):
        p = check_p(self, p, 3)
        rows = np.arange(p.shape[0])
        candidates = self._candidates(p)
        logp = np.log(np.stack([c[rows, targets] for c in candidates], axis=1))  # float64[T, B]
        w = np.empty_like(logp)
        share_weights_update(logp, self._logw, self.options.eta, 0.0, -math.inf, w)
        self._history.add(weights=w)
        return np.einsum("tb,btv->tv", w, np.stack(candidates))

    def next_distribution(self, p: np.ndarray, features: list[dict[str, float]]) -> np.ndarray:
        p = check_p(self, p, 2)
        self._pending = p
        candidates = self._candidates(p[None])
        return np.einsum("b,bv->v", softmax_weights(self._logw), np.concatenate(candidates))

    def observe(self, token: int) -> None:
        if self._pending is None:
            raise CtxmixError(f"mixer {self.spec}: observe() called without a preceding next_distribution()")
        p, self._pending = self._pending, None
        self.mix_full(p[None], np.array([token], dtype=np.int64), [])

    def history(self):
        return self._history.arrays()
