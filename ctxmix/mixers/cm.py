"""``cm``: a context-mixing network over the experts, the default mixer.

It mixes as the PAQ family of compressors does (paq8px's ``Mixer`` with its selected weight sets and
second layer, then its ``SSE`` stage; cmix's layered mixers), written for a token alphabet, where a mixer
must output a distribution over all V tokens rather than one bit's probability:

- **Layer 1**, several mixers, each keeping one weight set per value of a small causal context (the
  n-gram expert's matched order, a bucket of the base expert's entropy, whether the base and n-gram
  experts agree on their most probable token):
  - *linear* mixers, ``sum_k w_k p_k`` with softmax-gated weights;
  - *geometric* mixers, ``p proportional to exp(sum_k (u_k + e_k(v)) log p_k + s_k log(1 - p_k) + bias)``
    (the token-alphabet form of PAQ's logistic mixing in the stretch domain), whose weights can sharpen
    where experts agree, with per-token exponents ``e_k(v)`` (how far to trust expert k on token v), plus
    per-token biases that work as log-domain caches of the text's recent tokens, one cache length per mixer
    (a fast, a medium and a slow one).
- **Layer 2**: a softmax-gated linear mix of the layer-1 outputs.
- **SSE**: the probability of the mix's top token is refined by a table indexed by the matched order and
  the stretched probability (PAQ's APM), the other tokens rescaled so the row still sums to 1.

All weights learn online by one gradient step on log loss after each token (``kernels/cm.py`` has the
formulas). One set of defaults serves every file; they were chosen on the measurements in
``docs/mixing.md`` (FineWeb and the shipped sample, then checked on every text of the benchmark).

The geometric mixers and SSE need every expert's full distribution (full path). ``geometric=false`` keeps
only the linear layers, which need p(target) alone: the fast path, and a trace can replay it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import CtxmixError
from ..spec import check_fields
from ..experts.base import FEATURE_ENTROPY, FEATURE_ORDER
from ..kernels.cm import (
    ORDER_SETS,
    RATES_HEAD,
    SEL_AGREE_ORDER,
    SEL_NONE,
    SEL_ORDER,
    SEL_ORDER_ENTROPY,
    apm_init,
    cm_learn,
    cm_learn_lanes,
    cm_linear_next_weights,
    cm_linear_weights_update,
    cm_mix_update,
    cm_row,
    cm_rows_lanes,
    cm_rows_lanes2,
    cm_learn_lanes2,
    LANE_PARTS,
    LANE_RATES_HEAD,
    contexts,
    n_sets,
)
from ..kernels.cm_float32 import cm_learn_lanes5, cm_rows_lanes5
from .adaptive import NGRAM_PREFIX, expert_choice_field, feature_column, resolve_expert
from .base import History, Mixer, log_weighted_sum, check_logp, check_p

# The layer-1 stacks: which contexts select the weight sets of each mixer (measured in docs/mixing.md).
FULL_LINEAR = (SEL_ORDER_ENTROPY, SEL_AGREE_ORDER)
FULL_GEOMETRIC = (SEL_AGREE_ORDER, SEL_ORDER_ENTROPY, SEL_NONE)
# each geometric mixer's cache: (bias_lr, bias_decay) in FULL_GEOMETRIC's order (docs/mixing.md measures them)
BIAS_LR = (0.3, 0.3, 0.05)
BIAS_DECAY = (0.999, 0.98, 1.0)
FAST_LINEAR = (SEL_ORDER_ENTROPY, SEL_ORDER, SEL_NONE)
PAIR_BIAS_MAX_BYTES = 64 << 20  # per geometric mixer: V=1024 takes 8 MiB, V=8192 the whole 64 MiB
# Lane-state versions (``CMMixer.lanes_begin``; a file's header says which its lanes were coded with):
# 1, every weight shared by the lanes but their token-bias rows (the first lane files); 2, shared weights
# plus each lane's own deltas of them and its own previous-token rows; 3, 2's arithmetic with its large
# tables held in float32 (the memory the lanes' steps stream through halves) and its rows' sums in 8 partial
# sums (they vectorize); 4, 3's arithmetic learning from each group of a step's lanes as soon as its tokens are
# known (the step's later groups mix with what it learned: the caller passes the groups), and summing the
# expectations of its learning in 8 partial sums; 5, 4's formulas with every row and table of V values in
# float32, computed in float32 (``kernels/cm_float32.py``).
CM_LANE_STATE_SHARED = 1
CM_LANE_STATE_DELTAS = 2
CM_LANE_STATE_COMPACT = 3
CM_LANE_STATE_GROUPS = 4
CM_LANE_STATE_FLOAT32 = 5
CM_LANE_STATE = CM_LANE_STATE_FLOAT32
CM_LANE_STATES = (CM_LANE_STATE_SHARED, CM_LANE_STATE_DELTAS, CM_LANE_STATE_COMPACT, CM_LANE_STATE_GROUPS,
                  CM_LANE_STATE_FLOAT32)
# lane states 2 and 3 (``kernels/cm.py``, ``lane_rates``), measured in docs/mixing.md ("Lanes"): the factors of a
# lane's step on the shared weights and on its own delta, and the delta's decay, for gates, geo, stretch,
# token exponents, final, SSE; then the factor of each geometric mixer's bias rate for the lane's own
# previous-token rows (LANE_PAIR_ROWS rows a lane, tokens sharing rows modulo it; at most LANE_PAIR_MAX_BYTES
# for all lanes, counted in float64 bytes).
LANE_SHARED_FACTOR = (0.5,) * 6
LANE_OWN_FACTOR = (1.0,) * 6
LANE_OWN_DECAY = (1.0,) * 6  # (0.9999 measured the same; 0.99 worse)
LANE_PAIR_FACTOR = (4.0,)  # one value for every geometric mixer, or one per mixer
LANE_PAIR_ROWS = 32
LANE_PAIR_MAX_BYTES = 64 << 20
# (files of lane states 2 and 3 decode only with these values: other values need another lane-state version)
SELECTOR_NAMES = {SEL_NONE: "one set", SEL_ORDER: "order", SEL_ORDER_ENTROPY: "order x entropy",
                  SEL_AGREE_ORDER: "agree x order"}


@dataclass(frozen=True)
class CMOptions:
    # full distributions: geometric mixers and SSE; false: linear layers on p(target) only (fast path)
    geometric: bool = field(default=True, metadata={"help": "geometric mixers and SSE on full distributions (false: linear layers only, fast path)"})
    # 2: layer-1 mixers and a final mix; 1: the first layer-1 mixer alone (an ablation)
    layers: int = field(default=2, metadata={"help": "2: layer-1 mixers then a final mix; 1: one mixer alone", "min": 1, "max": 2})
    # refine the top token's probability (full path only)
    sse: bool = field(default=True, metadata={"help": "SSE stage on the mix's top token (geometric=true only)"})
    # weight sets selected by the contexts; false: one set per mixer (an ablation)
    contexts: bool = field(default=True, metadata={"help": "weight sets selected by order, entropy and agreement (false: one set each)"})
    lr: float = field(default=0.1, metadata={"help": "learning rate of the linear mixers' gates", "min": 0.0, "max": 10.0})
    geo_lr: float = field(default=0.005, metadata={"help": "learning rate of the geometric weights", "min": 0.0, "max": 1.0})
    # one value for every geometric mixer, or one per mixer (a;b;c, in the order of ``components``)
    bias_lr: tuple[float, ...] = field(default=BIAS_LR, metadata={"help": "learning rate of each geometric mixer's per-token bias (a;b;c, or one for all)", "min": 0.0, "max": 10.0})
    bias_decay: tuple[float, ...] = field(default=BIAS_DECAY, metadata={"help": "share of a bias row kept at each update, per geometric mixer (a;b;c, or one for all)", "min": 0.0, "max": 1.0})
    token_lr: float = field(default=0.002, metadata={"help": "learning rate of the geometric mixers' per-token exponents (0: none)", "min": 0.0, "max": 1.0})
    stretch_lr: float = field(default=0.02, metadata={"help": "learning rate of the weights of log(1 - p) inputs (0: no such inputs)", "min": 0.0, "max": 1.0})
    # the previous token's bias rows: at most this many (tokens share rows modulo it), 0: none
    pair_rows: int = field(default=1024, metadata={"help": "rows of the previous-token bias (0: none; memory 8 x rows x V bytes per geometric mixer, capped at 64 MiB)", "min": 0, "max": 1 << 20})
    final_lr: float = field(default=0.05, metadata={"help": "learning rate of the final layer's gates", "min": 0.0, "max": 10.0})
    sse_rate: float = field(default=0.02, metadata={"help": "SSE table's update rate", "min": 0.0, "max": 1.0})
    base: str = expert_choice_field("base")
    ngram: str = expert_choice_field("ngram")

    def __post_init__(self) -> None:
        check_fields(self, "mixer cm")  # (specs are checked as they are parsed; this covers Python callers)
        for name in ("bias_lr", "bias_decay"):
            if len(getattr(self, name)) not in (1, len(FULL_GEOMETRIC)):
                raise CtxmixError(f"mixer cm: {name} takes one value or {len(FULL_GEOMETRIC)} (one per geometric "
                                  f"mixer), not {len(getattr(self, name))}")


def row_scratch(n_experts: int, vocab: int, n_comp: int, lanes: int | None = None, float32: bool = False) -> tuple:
    """The scratch arrays a row of ``cm_row`` writes and its ``cm_learn`` reads (``kernels/cm.py`` lists
    them), each with a leading axis of ``lanes`` when given (the lane kernels' scratch; the int64[V] work
    array is shared). ``float32``: lane state 5's, whose rows of V values are float32 and its work array
    int32[V]."""
    lead = () if lanes is None else (lanes,)
    n_comp = max(n_comp, 1)
    rows = np.float32 if float32 else np.float64
    return (np.zeros((*lead, n_experts, vocab), rows), np.zeros((*lead, n_experts, vocab), rows),
            np.zeros((*lead, n_comp, vocab), rows), np.zeros((*lead, n_comp, n_experts)), np.zeros((*lead, n_comp)),
            np.zeros((*lead, n_comp), np.int64), np.zeros((*lead, 4)), np.zeros(vocab, np.int32 if float32 else np.int64))


def _nth(values: tuple[float, ...], i: int) -> float:
    """The i-th of a per-mixer option, or its one value for every mixer."""
    return values[i] if len(values) > 1 else values[0]


def _optional_expert(choice: str, default_prefix: str | None, specs, what: str, mixer_spec: str,
                     exclude: int | None = None) -> int:
    """Index of the chosen expert, or -1 when none is named and no spec matches the default."""
    if choice:
        return resolve_expert(choice, specs, what=what, mixer_spec=mixer_spec, exclude=exclude)
    for index, spec in enumerate(specs):
        if index != exclude and (default_prefix is None or spec.startswith(default_prefix)):
            return index
    return -1


class CMMixer(Mixer):
    """Two layers of context-selected online mixers and an SSE stage (see the module docstring)."""

    Options = CMOptions

    def __init__(self, options: CMOptions | None, *, experts):
        super().__init__(options or CMOptions(), experts=experts)
        if not self.expert_specs:
            raise CtxmixError(f"mixer {self.spec}: needs at least one expert")
        o = self.options
        self.linear = not o.geometric
        self._ngram = _optional_expert(o.ngram, NGRAM_PREFIX, self.expert_specs, "ngram", self.spec)
        self._base = _optional_expert(o.base, None, self.expert_specs, "base", self.spec,
                                      exclude=self._ngram if self._ngram >= 0 else None)
        if o.geometric:
            linear, geometric = (((), FULL_GEOMETRIC[:1]) if o.layers == 1 else (FULL_LINEAR, FULL_GEOMETRIC))
        else:
            linear, geometric = (FAST_LINEAR[:1] if o.layers == 1 else FAST_LINEAR), ()
        if not o.contexts:
            linear, geometric = (SEL_NONE,) * len(linear), (SEL_NONE,) * len(geometric)
        self._layout = np.array([len(linear), len(geometric), o.layers, int(o.geometric and o.sse),
                                 int(o.stretch_lr > 0), *linear, *geometric], np.int64)
        caches = [(_nth(o.bias_lr, i), _nth(o.bias_decay, i)) for i in range(len(geometric))]
        self._rates = np.array([o.lr, o.geo_lr, o.final_lr, o.sse_rate, o.token_lr, o.stretch_lr,
                                *(rate for cache in caches for rate in cache)])
        assert len(self._rates) == RATES_HEAD + 2 * len(geometric)
        self._selectors = (linear, geometric)
        self._history = History()
        self._state = None
        self._scratch = None
        self.begin()

    @property
    def components(self) -> list[str]:
        """Names of the layer-1 mixers, in the order of the final layer's weights (``history()``)."""
        linear, geometric = self._selectors
        return ([f"linear ({SELECTOR_NAMES[s]})" for s in linear] +
                [f"geometric ({SELECTOR_NAMES[s]})" for s in geometric])

    # ---- features and contexts ------------------------------------------------------------------------

    def optional_features(self):
        """The matched order of the n-gram expert and the entropy of the base expert, where they are
        provided (a context reads 0 where not: cm mixes any experts)."""
        wanted: dict[int, tuple[str, ...]] = {}
        if not self.options.contexts:
            return wanted
        if self._ngram >= 0:
            wanted[self._ngram] = (FEATURE_ORDER,)
        if self._base >= 0:
            wanted[self._base] = (*wanted.get(self._base, ()), FEATURE_ENTROPY)
        return wanted

    def _contexts(self, features, n_rows: int) -> np.ndarray:
        """int64[T, 2]: (order set, entropy bucket) of each row; 0 where the feature is not given (and
        everywhere with ``contexts=false``, which also gives the SSE stage one table)."""
        if not self.options.contexts:
            return np.zeros((n_rows, 2), np.int64)
        columns = []
        for index, name in ((self._ngram, FEATURE_ORDER), (self._base, FEATURE_ENTROPY)):
            given = index >= 0 and name in features[index]
            column = feature_column(features, index, name, self.spec) if given else np.zeros(n_rows)
            if len(column) != n_rows:
                raise CtxmixError(f"mixer {self.spec}: {len(column)} rows of feature {name!r} for {n_rows} positions")
            columns.append(column)
        return contexts(*columns)

    # ---- state ------------------------------------------------------------------------------------------

    def begin(self) -> None:
        n_experts = len(self.expert_specs)
        linear, geometric = self._selectors
        n_comp = len(linear) + len(geometric)
        max_sets = max([n_sets(s) for s in (*linear, *geometric)] + [1])
        gates = np.zeros((len(linear), max_sets, n_experts))  # softmax logits: uniform weights
        geo = np.full((len(geometric), max_sets, n_experts), 1.0 / n_experts)  # the plain geometric mean
        self._gates, self._geo = gates, geo
        self._stretch = np.zeros_like(geo)  # weights of log(1 - p_k): none at first
        self._final = np.zeros(n_comp)
        self._vocab = 0  # bias and scratch are sized by the first rows seen
        self._state = None
        self._apm = apm_init(ORDER_SETS)
        self._last = np.full(1, -1, np.int64)  # the previous token (-1: the stream's first mixed position)
        self._compact_lanes = False  # lane states 3-4 on several lanes: float32 tables, 8 partial sums (lanes_begin)
        self._eight_learning = False  # lane state 4 on several lanes: learning's expectations in 8 partial sums
        self._float32_lanes = False  # lane state 5 on several lanes: float32 rows and arithmetic (lanes_begin)
        self._history.clear()
        self._pending = None

    def _table_dtype(self):
        """The dtype of the tables of V columns: float32 in lane states 3-4 on several lanes, else float64."""
        return np.float32 if self._compact_lanes else np.float64

    def _ready(self, vocab: int) -> tuple:
        """(state, scratch) for rows of ``vocab`` tokens (allocated on first use: V is not known before)."""
        if self._state is None or self._vocab != vocab:
            if self._vocab:
                raise CtxmixError(f"mixer {self.spec}: rows of {vocab} tokens after rows of {self._vocab}")
            self._vocab = vocab
            n_experts = len(self.expert_specs)
            n_comp = len(self._final)
            pair_rows = min(self.options.pair_rows, vocab, PAIR_BIAS_MAX_BYTES // (8 * vocab))
            bias = np.zeros((self._geo.shape[0], 2 + pair_rows if pair_rows else 1, vocab), self._table_dtype())
            token_exp = np.zeros((self._geo.shape[0], n_experts, vocab),  # per-token exponents: none at first
                                 np.float32 if self._float32_lanes else np.float64)
            self._state = (self._gates, self._geo, bias, self._final, self._apm, self._last, self._stretch, token_exp)
            self._scratch = row_scratch(n_experts, vocab, n_comp)
        return self._state, self._scratch

    # ---- full path ----------------------------------------------------------------------------------------

    def mix_full(self, p, targets, features):
        p = check_p(self, p, 3)
        n_rows, _n_experts, vocab = p.shape
        targets = np.ascontiguousarray(targets, dtype=np.int64)
        ctx = self._contexts(features, n_rows)
        if self.linear:  # the fast variant on full rows: the same weights as mix_logp, applied to every token
            w = self._linear_weights(np.log(p[np.arange(n_rows), :, targets]), ctx)
            return np.einsum("tk,tkv->tv", w, p)
        state, scratch = self._ready(vocab)
        out = np.empty((n_rows, vocab))
        out_g = np.empty((n_rows, len(self._final) or 1))
        cm_mix_update(p, targets, ctx, self._base, self._ngram, self._layout, state, scratch, self._rates, out, out_g)
        self._history.add(weights=out_g)
        return out

    # ---- fast path (geometric=false) ------------------------------------------------------------------------

    def _linear_weights(self, logp: np.ndarray, ctx: np.ndarray) -> np.ndarray:
        n_rows = logp.shape[0]
        out_w = np.empty((n_rows, len(self.expert_specs)))
        out_g = np.empty((n_rows, len(self._final)))
        cm_linear_weights_update(np.ascontiguousarray(logp), ctx, self._layout, self._gates, self._final, self._rates,
                                 out_w, out_g)
        self._history.add(weights=out_w)
        return out_w

    def mix_logp(self, logp, features):
        if not self.linear:
            raise CtxmixError(f"mixer {self.spec} needs full distributions (geometric=false runs on p(target) only)")
        logp = check_logp(self, logp)
        w = self._linear_weights(logp, self._contexts(features, logp.shape[0]))
        return log_weighted_sum(w, logp)

    # ---- stepwise (the codec) --------------------------------------------------------------------------------

    def next_distribution(self, p: np.ndarray, features: list[dict[str, float]]) -> np.ndarray:
        """float64[K, V] -> float64[V] with no state change: the row ``mix_full`` gives this position."""
        p = check_p(self, p, 2)
        ctx = self._contexts(features, 1)
        self._pending = (p, ctx)
        if self.linear:
            return cm_linear_next_weights(ctx[0], self._layout, self._gates, self._final) @ p
        state, scratch = self._ready(p.shape[1])
        out = np.empty(p.shape[1])
        cm_row(p, ctx[0, 0], ctx[0, 1], self._base, self._ngram, self._layout, state, scratch, out)
        return out

    def observe(self, token: int) -> None:
        if self._pending is None:
            raise CtxmixError(f"mixer {self.spec}: observe() called without a preceding next_distribution()")
        p, ctx = self._pending
        self._pending = None
        if self.linear:
            self._linear_weights(np.log(p[:, int(token)])[None, :], ctx)
            return
        state, scratch = self._ready(p.shape[1])
        cm_learn(p, int(token), ctx[0, 0], self._layout, state, scratch, self._rates)

    # ---- lanes (the codec's lockstep streams, ``ctxmix/lanes.py``) ------------------------------------------

    def supports_lanes(self) -> bool:
        """The full-path network can mix lanes; the linear variant codes on one lane."""
        return not self.linear

    def lanes_begin(self, n_lanes: int, lane_state: int = CM_LANE_STATE) -> None:
        """Reset for ``n_lanes`` lanes. Every lane keeps its previous token, its token-bias rows (a cache of its
        recent tokens) and the scratch its row leaves for learning; what else is shared is the lane state:

        - ``CM_LANE_STATE_SHARED`` (1): one set of weights, pair-bias rows and SSE tables learns from every
          lane (lane j's row at step s uses what all lanes taught it at steps < s: causal in decode order).
        - ``CM_LANE_STATE_DELTAS`` (2): the same shared arrays, each of whose steps is ``LANE_SHARED_FACTOR``
          of a lane's gradient step, plus each lane's own delta of every weight, SSE table and per-token
          exponent (``LANE_OWN_FACTOR`` of its own steps) and its own previous-token rows
          (``LANE_PAIR_ROWS``, at ``LANE_PAIR_FACTOR`` times the bias rate) beside the shared ones: the
          shared part learns what holds everywhere, a lane's own what holds where it is in the text
          (``kernels/cm.py``: ``cm_row_lane2``; docs/mixing.md, "Lanes", measures it).
        - ``CM_LANE_STATE_COMPACT`` (3): 2's arithmetic, with the tables of V columns (the shared previous-token
          rows, each lane's token-bias rows, own previous-token rows and deltas of the per-token exponents)
          stored in float32: the same kernels compute in float64 and round what they store. A step reads
          and writes some 170 KiB of them a lane, mostly rows picked by the previous token, far beyond the
          caches; half the bytes is about 5% of the codec's time. And the geometric rows and SSE sum in 8
          partial sums (``kernels/cm.py``: ``_sum``), which vectorize: 15% less time for cm's rows. The
          bits stay the same to about 1e-9 (docs/benchmarks.md, "The GIL, one copy of the weights, and
          lane version 4").
        - ``CM_LANE_STATE_GROUPS`` (4): 3's arithmetic, learning from each group of the step's lanes as soon
          as its tokens are known: the caller mixes lanes lo..hi-1 (``lanes_distributions(lanes=)``), codes
          them and passes their tokens (``lanes_observe(lanes=)``) before it mixes the next group, whose rows
          then use what the earlier groups taught (causal in decode order: a decoder has those tokens). A
          group's rows, scratch and lane rows are still in the CPU's caches when it learns from them. And the
          expectations of the geometric mixers' learning sum in 8 partial sums, which vectorize
          (``_expectations_eight``), where each add of one running sum waited on the last (docs/benchmarks.md,
          "The n-gram expert's lists, and lane version 5").
        - ``CM_LANE_STATE_FLOAT32`` (5): 4's formulas on float32 rows and tables, computed in float32: the experts'
          log p and log(1 - p), each mixer's row, the shared per-token exponents and every table of V values
          (``kernels/cm_float32.py``). The small weights and the output row stay float64. Its bits are lane
          state 4's to about 1e-7, in about two thirds of the time (docs/benchmarks.md, "Lane version 7").

        On one lane there is nothing to share: the lane takes whole steps on the shared float64 weights and
        keeps no delta in any lane state, which gives the numbers of the one-lane path (``next_distribution``
        / ``observe``) float for float.
        """
        if lane_state not in CM_LANE_STATES:
            raise CtxmixError(f"mixer {self.spec}: lane state {lane_state} is not one of "
                              f"{', '.join(map(str, CM_LANE_STATES))}")
        self.begin()
        self._compact_lanes = lane_state >= CM_LANE_STATE_COMPACT and n_lanes > 1
        self._eight_learning = lane_state == CM_LANE_STATE_GROUPS and n_lanes > 1
        self._float32_lanes = lane_state == CM_LANE_STATE_FLOAT32 and n_lanes > 1
        self._lane_last = np.full(n_lanes, -1, np.int64)
        self._lane_bias = None  # [L, n_geo, V] (float32 in lane state 3): each lane's token-bias rows (cm_rows_lanes)
        self._lane_scratch = None
        self._lane_pending = None
        self._lane_state = lane_state
        self._lanes = None  # lane state 2: (last, token-bias rows, deltas, own pair rows), sized by the first rows
        n_geo = len(self._selectors[1])
        if n_lanes > 1:
            self._lane_rates = np.array([*LANE_SHARED_FACTOR, *LANE_OWN_FACTOR, *LANE_OWN_DECAY,
                                         *(_nth(LANE_PAIR_FACTOR, i) for i in range(n_geo))])
        else:  # one lane has nothing to share: whole steps on the shared weights, no delta (the one-lane path)
            self._lane_rates = np.array([1.0] * LANE_PARTS + [0.0] * LANE_PARTS + [1.0] * LANE_PARTS + [0.0] * n_geo)
        assert len(self._lane_rates) == LANE_RATES_HEAD + n_geo

    def lanes_distributions(self, p: np.ndarray, features, lanes: tuple[int, int] | None = None) -> np.ndarray:
        """float64[La, K, V] experts' rows of lanes 0..La-1 (features: {name: float64[La]} per expert) ->
        float64[La, V], each lane's row as ``next_distribution`` computes it; no state change.

        ``lanes`` = (lo, hi): the rows of lanes lo..hi-1 only (float64[hi - lo, V]), where only those lanes' rows
        of ``p`` and ``features`` need to be there yet: the lane engine mixes a step's groups of lanes in turn,
        from lo = 0, as their experts' rows arrive, and fills the rest of the same ``p`` meanwhile. A lane's
        row depends on its own inputs and the shared state only, so it is the same either way."""
        p = check_p(self, p, 3)
        n_active, n_experts, vocab = p.shape
        lo, hi = lanes or (0, n_active)
        if lo == 0:
            self._lane_pending = (p, np.zeros((n_active, 2), np.int64), 0, 0)
        if self._lane_pending is None or self._lane_pending[0] is not p or self._lane_pending[2] != lo:
            raise CtxmixError(f"mixer {self.spec}: lanes {lo}..{hi - 1} asked before lanes 0..{lo - 1} of the step")
        _, ctx, _, learned = self._lane_pending
        self._lane_pending = (p, ctx, hi, learned)  # lanes 0..hi-1 mixed, 0..learned-1 learned from
        if lanes is None:
            ctx[:] = self._contexts(features, n_active)
        else:
            ctx[lo:hi] = self._contexts([{name: values[lo:hi] for name, values in f.items()} for f in features], hi - lo)
        state, _ = self._ready(vocab)
        n_lanes = len(self._lane_last)
        if self._lane_scratch is None:
            self._lane_scratch = row_scratch(n_experts, vocab, len(self._final), n_lanes, self._float32_lanes)
        if self._lane_bias is None:
            self._lane_bias = np.zeros((n_lanes, state[2].shape[0], vocab), self._table_dtype())
        out = np.empty((hi - lo, vocab))
        scratch = self._lane_scratch_of(lo, hi)
        if self._lane_state == CM_LANE_STATE_SHARED:
            cm_rows_lanes(p[lo:hi], ctx[lo:hi], self._base, self._ngram, self._layout, state, self._lane_last[lo:hi],
                          self._lane_bias[lo:hi], scratch, out)
        else:
            if self._lanes is None:
                gates, geo, bias, final, apm, _last, stretch, token_exp = state
                n_geo = bias.shape[0]
                # (rows counted in float64 bytes in every lane state: the count is part of the arithmetic)
                rows = min(LANE_PAIR_ROWS, LANE_PAIR_MAX_BYTES // (8 * n_lanes * max(n_geo, 1) * vocab))
                if rows < 1 or bias.shape[1] == 1 or not self._lane_rates[LANE_RATES_HEAD:].any():
                    rows = 1  # none of a lane's own previous-token rows: one placeholder row, never read
                    self._lane_rates[LANE_RATES_HEAD:] = 0.0
                self._lanes = (self._lane_last, self._lane_bias,
                               *(np.zeros((n_lanes, *a.shape), self._table_dtype() if a is token_exp else np.float64)
                                 for a in (gates, geo, stretch, token_exp, final, apm)),
                               np.zeros((n_lanes, n_geo, rows, vocab), self._table_dtype()))
            own = tuple(a[lo:hi] for a in self._lanes)
            if self._float32_lanes:
                cm_rows_lanes5(p[lo:hi], ctx[lo:hi], self._base, self._ngram, self._layout, state, own,
                               self._lane_rates, scratch, out)
            else:
                cm_rows_lanes2(p[lo:hi], ctx[lo:hi], self._base, self._ngram, self._layout, state, own,
                               self._lane_rates, scratch, out, self._compact_lanes)
        return out

    def lanes_observe(self, tokens, lanes: tuple[int, int] | None = None) -> None:
        """Learn from each lane's token, in lane order, on the rows of the last ``lanes_distributions``: all the
        step's lanes (``tokens`` of lanes 0..La-1, once every lane was mixed), or with ``lanes`` = (lo, hi) the
        tokens of lanes lo..hi-1, mixed already, lo where the last call stopped (lane state 4 learns group by
        group, ``lanes_begin``)."""
        if self._lane_pending is None:
            raise CtxmixError(f"mixer {self.spec}: lanes_observe() called without a preceding lanes_distributions()")
        p, ctx, mixed, learned = self._lane_pending
        lo, hi = lanes or (0, len(p))
        if lanes is None and mixed != len(p):
            raise CtxmixError(f"mixer {self.spec}: lanes_observe() after mixing lanes 0..{mixed - 1} of {len(p)}")
        if lo != learned or not lo < hi <= mixed:
            raise CtxmixError(f"mixer {self.spec}: lanes_observe() of lanes {lo}..{hi - 1}, where lane {learned} is "
                              f"the next to learn from and lanes 0..{mixed - 1} are mixed")
        tokens = np.ascontiguousarray(tokens, np.int64)
        if len(tokens) != hi - lo:
            raise CtxmixError(f"mixer {self.spec}: {len(tokens)} tokens for lanes {lo}..{hi - 1}")
        self._lane_pending = None if hi == len(p) else (p, ctx, mixed, hi)
        state, _ = self._ready(p.shape[2])
        scratch = self._lane_scratch_of(lo, hi)
        if self._lane_state == CM_LANE_STATE_SHARED:
            cm_learn_lanes(p[lo:hi], tokens, ctx[lo:hi], self._layout, state, self._lane_last[lo:hi],
                           self._lane_bias[lo:hi], scratch, self._rates)
        elif self._float32_lanes:
            cm_learn_lanes5(p[lo:hi], tokens, ctx[lo:hi], self._layout, state, tuple(a[lo:hi] for a in self._lanes),
                            self._lane_rates, scratch, self._rates)
        else:
            cm_learn_lanes2(p[lo:hi], tokens, ctx[lo:hi], self._layout, state, tuple(a[lo:hi] for a in self._lanes),
                            self._lane_rates, scratch, self._rates, self._eight_learning)

    def _lane_scratch_of(self, lo: int, hi: int) -> tuple:
        """Lanes lo..hi-1's part of the lanes' scratch (its int64[V] work array is shared)."""
        return (*(a[lo:hi] for a in self._lane_scratch[:-1]), self._lane_scratch[-1])

    def history(self):
        return self._history.arrays()
