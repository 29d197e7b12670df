"""Entropy-adaptive interpolation of a base expert and the n-gram expert, in Parameter Golf PR #909's form.

    alpha_t = a + b * sigmoid(s * (H_t - (c - d * (order_t - min_order))))    (0 where order_t < min_order)
    p_t     = (1 - alpha_t) * p_base,t + alpha_t * p_ngram,t

H_t is the base expert's entropy (nats) at t and order_t the n-gram expert's longest matched order at t,
both computed from tokens < t, so alpha_t is causal. The more uncertain the base expert, and the longer
the n-gram match, the more weight the n-gram expert gets. The mixer has no state.

Defaults are PR #909's published constants (openai/parameter-golf pull request #909, "Record: 11-gram Eval
Cache + Hedge Mixer (val_bpb: 0.8609)", by sunnypatneedi; its train_gpt.py, ``eval_val_sliding``):
NGRAM_ENT_BASE = 0.05 (a), NGRAM_ENT_RANGE = 0.55 (b), the order-adaptive branch's sigmoid scale 2.0 (s),
``ent_center = 3.0`` (c), ``slope = 0.25`` (d) and NGRAM_MIN_ORDER = 2; there an order counts as matched
when its context was seen at least twice (NGRAM_MIN_COUNT = 2), and unmatched positions use the model
alone, which the ``order < min_order`` case reproduces. ctxmix's ``order`` feature is the n-gram expert's
own notion of the longest matched order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import CtxmixError
from ..experts.base import FEATURE_ENTROPY, FEATURE_ORDER
from ..kernels.mixers import adaptive_alpha
from .base import History, LinearMixer, check_logp

NGRAM_PREFIX = "ngram"  # default n-gram expert: the first whose spec starts with this


def resolve_expert(choice: str, specs: Sequence[str], *, what: str, mixer_spec: str, exclude: int | None = None) -> int:
    """Index of the expert chosen by ``choice``: an index ("1") or a spec prefix ("neural"), never ``exclude``."""
    if choice.isdigit():
        index = int(choice)
        if index >= len(specs):
            raise CtxmixError(f"mixer {mixer_spec}: {what}={choice} but only {len(specs)} experts are given")
        if index == exclude:
            raise CtxmixError(f"mixer {mixer_spec}: {what}={choice} is the same expert as the other input")
        return index
    for index, spec in enumerate(specs):
        if index != exclude and spec.startswith(choice):
            return index
    raise CtxmixError(
        f"mixer {mixer_spec}: no {'other ' if exclude is not None else ''}expert matches {what}={choice!r} "
        f"(experts: {', '.join(specs)}; give an index or a spec prefix)"
    )


def resolve_base_and_ngram(options, specs: Sequence[str], mixer_spec: str) -> tuple[int, int]:
    """(base index, n-gram index) from the ``base``/``ngram`` options, defaulting as documented."""
    ngram = resolve_expert(options.ngram or NGRAM_PREFIX, specs, what="ngram", mixer_spec=mixer_spec)
    if options.base:
        base = resolve_expert(options.base, specs, what="base", mixer_spec=mixer_spec, exclude=ngram)
    else:
        others = [k for k in range(len(specs)) if k != ngram]
        if not others:
            raise CtxmixError(f"mixer {mixer_spec}: needs a base expert besides the n-gram expert {specs[ngram]}")
        base = others[0]
    return base, ngram


def feature_column(features: Sequence[dict], index: int, name: str, mixer_spec: str) -> np.ndarray:
    """float64[T] feature ``name`` of expert ``index`` (scalars become one-row arrays)."""
    try:
        values = features[index][name]
    except (IndexError, KeyError):
        raise CtxmixError(f"mixer {mixer_spec}: feature {name!r} of expert #{index} was not given") from None
    return np.ascontiguousarray(np.atleast_1d(values), dtype=np.float64)


def expert_choice_field(what: str):
    return field(default="", metadata={"help": f"{what} expert: index or spec prefix (default: {'first spec starting with ngram' if what == 'ngram' else 'first other expert'})"})


@dataclass(frozen=True)
class AdaptiveOptions:
    # alpha = a + b * sigmoid(s * (H - (c - d * (order - min_order)))); defaults: PR #909
    a: float = field(default=0.05, metadata={"help": "alpha floor (PR #909 NGRAM_ENT_BASE)"})
    b: float = field(default=0.55, metadata={"help": "alpha range (PR #909 NGRAM_ENT_RANGE)"})
    s: float = field(default=2.0, metadata={"help": "sigmoid slope per nat of entropy"})
    c: float = field(default=3.0, metadata={"help": "entropy centre (nats) at order min_order"})
    d: float = field(default=0.25, metadata={"help": "centre shift (nats) per order above min_order"})
    min_order: int = field(default=2, metadata={"help": "lowest order that counts as a match (below: alpha 0)", "min": 0})
    base: str = expert_choice_field("base")
    ngram: str = expert_choice_field("ngram")

    def __post_init__(self) -> None:
        for name in ("a", "b", "s", "c", "d"):
            if not math.isfinite(getattr(self, name)):
                raise CtxmixError(f"{name} must be finite, got {getattr(self, name)}")
        lo, hi = min(self.a, self.a + self.b), max(self.a, self.a + self.b)
        if lo < 0.0 or hi > 1.0:
            raise CtxmixError(f"alpha ranges over [{lo:g}, {hi:g}] (a={self.a:g}, b={self.b:g}); it must stay within [0, 1]")


class AdaptiveAlpha:
    """The alpha of ``AdaptiveOptions`` for given features; shared by ``adaptive`` and ``pr909``."""

    def __init__(self, options: AdaptiveOptions, specs: Sequence[str], mixer_spec: str):
        self.options = options
        self.mixer_spec = mixer_spec
        self.base, self.ngram = resolve_base_and_ngram(options, specs, mixer_spec)

    def wanted_features(self) -> dict[int, tuple[str, ...]]:
        return {self.base: (FEATURE_ENTROPY,), self.ngram: (FEATURE_ORDER,)}

    def __call__(self, features: Sequence[dict]) -> np.ndarray:
        """float64[T] alpha from per-expert features (arrays of T, or scalars for one position)."""
        o = self.options
        entropy = feature_column(features, self.base, FEATURE_ENTROPY, self.mixer_spec)
        order = feature_column(features, self.ngram, FEATURE_ORDER, self.mixer_spec)
        return adaptive_alpha(entropy, order, o.a, o.b, o.s, o.c, o.d, float(o.min_order))


class AdaptiveMixer(LinearMixer):
    """p = (1 - alpha) p_base + alpha p_ngram with alpha from the base entropy and the matched order."""

    Options = AdaptiveOptions

    def __init__(self, options: AdaptiveOptions | None, *, experts):
        super().__init__(options or AdaptiveOptions(), experts=experts)
        self._alpha = AdaptiveAlpha(self.options, self.expert_specs, self.spec)
        self._history = History()
        self.begin()

    def wanted_features(self):
        return self._alpha.wanted_features()

    def begin(self) -> None:
        self._history.clear()
        self._pending = None

    def _compose(self, alpha: np.ndarray) -> np.ndarray:
        w = np.zeros((len(alpha), len(self.expert_specs)))
        w[:, self._alpha.base] = 1.0 - alpha
        w[:, self._alpha.ngram] = alpha
        return w

    def weights(self, logp, features):
        logp = check_logp(self, logp)
        alpha = self._alpha(features)
        if len(alpha) != logp.shape[0]:
            raise CtxmixError(f"mixer {self.spec}: {len(alpha)} feature rows for {logp.shape[0]} positions")
        w = self._compose(alpha)
        self._history.add(weights=w, alpha=alpha)
        return w

    def next_weights(self, features):
        return self._compose(self._alpha(features))[0]

    def history(self):
        return self._history.arrays()
