"""Lanes: the codec's token stream cut into L contiguous segments that are coded in lockstep.

A decoder can only batch what it can predict at the same time. With one stream, position t needs token
t - 1, so the neural model runs one row per call (about 1.5 ms a token on one CPU core, mostly per-call
overhead). With L lanes, step s predicts position s of every lane at once: one batched model call per
step, the same shape on both sides of the codec, so the floats repeat bit for bit.

Plan (``LanePlan``): the N - 1 coded positions 1..N-1 are split into L contiguous lanes, the first
``(N - 1) mod L`` one token longer than the others; position 0 (the first token, context only) is the
context every lane starts from. Step s codes position s of each lane that is that long, lanes in order
0..L-1: all L lanes at every step but possibly the last. The payload is one range-coder stream in that
order (step-major, lane-minor).

What a lane sees (``LaneEngine``): the neural expert's context stays inside its lane (each lane is a
sequence of its own that starts with the first token); the n-gram tables and the mixer's weights are
shared by all lanes, and lane j's distribution at step s reads what every lane observed at steps < s.
That is causal in decode order: the decoder has exactly those tokens when it computes step s. After
step s, the lanes' tokens are observed lane 0 first, so lane j's update sees those of lanes < j. From lane
version 5 on, the mixer learns from each group of lanes (below) as soon as its tokens are coded, so the
rows of the step's later groups also read the step's earlier groups: causal in decode order as well (the
decoder decodes a group before it mixes the next).

An expert or mixer takes part by implementing ``supports_lanes()`` (True), ``lanes_begin``,
``lanes_distributions`` and ``lanes_observe`` (see ``NeuralExpert``, ``NgramExpert``, ``CMMixer``; a
mixer's ``lanes_begin`` takes ``lane_state``, the file's lane version, ``LANE_VERSION``);
anything else codes on one lane with ``run.Predictor``, which the codec records in its header.

Working ahead: an expert with ``lanes_prepare(group)`` (the neural expert) runs its model step on a second
thread while this thread does the rest. With the integer step (whose rows do not depend on the batch) the
lanes are cut into ``AHEAD_GROUPS`` contiguous groups, each stepped on its own cache: as soon as a group's
tokens are coded, its next step starts on the second thread, while this one mixes and codes the next group
and then runs the other experts' updates and rows and the mixer's learning (their kernels release the GIL).
So the model's step for one group overlaps the mixer's rows of another, which a step of all lanes at once
could not: every lane's next step waits for its token. And when the coding thread would wait for a group,
it steps the later groups that the second thread has not started yet (``_wait``), so the two threads share
the model's work at their own pace. Each component's arithmetic is its own and is the same on either thread and
in any grouping (version 5 groups every run alike, working ahead or not), so the floats do not change: only
the wall time does (tested). It pays at many lanes only
(lcet10.txt's first 256 kB: at 48 lanes +21%, at 32 even, at 24 -13%: docs/benchmarks.md), so it runs
from ``AHEAD_MIN_LANES`` lanes. The codec drives a step through ``step(n, code)``: ``code(lo, rows)``
codes lanes lo.. of the step, group by group.

Arithmetic (``integer``): the neural step's linear layers run as exact integer matmuls (int8 x int8, int32
sums: ``models/integer.py``), which repeat on any kernel and thread count; its ``threads`` are groups of
lanes run side by side (torch itself on one thread). ``integer=False`` is the float32 step of the codec's
first lane files, which it still decodes (its threads are torch's).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import CtxmixError

# Default lane count: lanes of at least MIN_LANE_TOKENS tokens, at most DEFAULT_MAX_LANES. Lanes cost size (each
# starts without the text before it) and buy speed. Against one lane, with cm's lane state 2 (docs/benchmarks.md):
# lcet10.txt +0.62% at 64 lanes, +0.84% at 96, +1.19% at 128 (1,457 tokens a lane); plrabn12.txt +0.63%, +0.83%
# at 109, +0.90% at 128; enwik8.first1MB +0.08%, +0.38% at 109, +0.72% at 128; and 96-128 lanes ran 15-65%
# faster than 64. Lanes of at least 2,048 tokens keep each of those texts under 1%.
MIN_LANE_TOKENS = 2048
DEFAULT_MAX_LANES = 128
# What a header may ask for: the engine holds a KV cache per lane (float32: the shipped model 512 KiB, so
# 256 lanes take 128 MiB; an 11-layer 512-wide model 2.8 MiB, 720 MiB) and L rows of V floats per expert
# and mixer.
MAX_LANES = 256
AHEAD_MIN_LANES = 40  # lanes from which the engine works ahead on a second thread (module docstring)
AHEAD_GROUPS = 3  # groups of lanes the integer step prepares in turns while working ahead (module docstring)
# (from version 5 on, every run mixes and learns in these groups: their bounds are part of the arithmetic)
# The lanes' arithmetic, recorded in a file's header (``version`` of ``LaneEngine``): a decoder runs the version
# the file was coded with. 1: cm's lanes share every weight but their recency caches (the first lane files);
# 2: cm's lanes add their own deltas of the shared weights (``CMMixer.lanes_begin``, lane state 2); 3: besides,
# the integer neural step keeps its keys and values on int8 grids (``LaneCache``, int8); 4: besides, cm keeps
# its large lane tables in float32 and sums its rows in 8 partial sums (lane state 3); 5: besides, the step's
# lanes are mixed, coded and learned from in AHEAD_GROUPS groups, whatever the threads, and the mixer learns
# from each group as soon as it is coded (lane state 4); 6: besides, the integer step's attention drops the
# weights below ``models/integer.py``'s ATTENTION_FLOOR (no float32 subnormals in its value loop); 7: besides,
# cm computes its lanes' rows in float32 (lane state 5), and the integer neural step takes its softmaxes in
# float32, the attention's and the logits' (with their soft cap), and fuses its attention's multiply-adds
# (``IntegerLaneStep.float32_softmax``). A change to any component's lane arithmetic
# is a new version here.
LANE_VERSION = 7
MIXER_LANE_STATE = {1: 1, 2: 2, 3: 2, 4: 3, 5: 4, 6: 4, 7: 5}  # the mixer's lane state (``lanes_begin``) in each version
INT8_KV_FROM = 3  # the first version whose integer neural step keeps int8 keys and values
ATTENTION_FLOOR_FROM = 6  # the first version whose integer neural step drops the smallest attention weights
FLOAT32_SOFTMAX_FROM = 7  # the first version whose integer neural step takes its softmaxes in float32
LEARN_BY_GROUP_FROM = 5  # the first version whose mixer learns from each group of lanes once it is coded


def default_lanes(n_tokens: int) -> int:
    """Lanes for a stream of ``n_tokens`` tokens (N - 1 coded) when none are asked for."""
    return max(1, min(DEFAULT_MAX_LANES, (n_tokens - 1) // MIN_LANE_TOKENS))


@dataclass(frozen=True)
class LanePlan:
    """Which positions each lane codes (pure arithmetic on N and L)."""

    n_tokens: int  # N: positions 0..N-1; 1..N-1 are coded
    lanes: int  # L, 1 <= L <= max(1, N - 1)

    @classmethod
    def make(cls, n_tokens: int, lanes: int) -> LanePlan:
        """The plan for ``lanes`` asked for: no lane is empty, so at most N - 1 lanes (and at least 1)."""
        if lanes < 1:
            raise CtxmixError(f"lanes={lanes}: at least 1 lane is needed")
        return cls(n_tokens, max(1, min(int(lanes), n_tokens - 1)))

    @property
    def coded(self) -> int:
        return max(self.n_tokens - 1, 0)

    @property
    def steps(self) -> int:
        return -(-self.coded // self.lanes)

    def lengths(self) -> np.ndarray:
        """int64[L]: positions each lane codes."""
        short, longer = divmod(self.coded, self.lanes)
        return np.array([short + 1] * longer + [short] * (self.lanes - longer), dtype=np.int64)

    def starts(self) -> np.ndarray:
        """int64[L]: the stream position of each lane's first coded token."""
        lengths = self.lengths()
        return 1 + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)

    def active(self, step: int) -> int:
        """Lanes coding at ``step``: lanes 0..active-1 (the longer lanes come first)."""
        short, longer = divmod(self.coded, self.lanes)
        return self.lanes if step < short else longer


def lanes_supported(experts: Sequence, mixer) -> bool:
    """True when every expert and the mixer (if any) can run lanes."""
    return all(getattr(obj, "supports_lanes", lambda: False)() for obj in [*experts, *([mixer] if mixer else [])])


def lane_groups(n_lanes: int, n_groups: int) -> list[tuple[int, int]]:
    """(lo, hi) of each of ``n_groups`` contiguous groups of lanes 0..n_lanes-1, as even as can be (at most
    one group a lane): the groups a step mixes, codes and learns from in turn."""
    bounds = np.linspace(0, n_lanes, min(n_groups, n_lanes) + 1).astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


class LaneEngine:
    """Experts plus at most one mixer, stepping all lanes in lockstep: the codec's engine when every component
    supports lanes (otherwise ``run.Predictor`` codes one lane). Encoder and decoder both drive it, so they
    see bit-identical floats: ``begin(plan, first_token)``, then ``step(n_active, code)`` per step, then
    ``finish()``."""

    def __init__(self, experts: Sequence, mixer, vocab_size: int, integer: bool = True, threads: int = 1,
                 ahead: bool | None = None, version: int = LANE_VERSION):
        from .run import wanted_features

        if not lanes_supported(experts, mixer):
            raise CtxmixError("lanes need experts and a mixer that support them")
        if mixer is None and len(experts) != 1:
            raise CtxmixError(f"{len(experts)} experts and no mixer: coding needs one mixer, or one expert alone")
        self.experts = list(experts)
        self.mixer = mixer
        self.vocab_size = vocab_size
        self.integer = integer
        self.threads = threads
        self.version = version
        self._learns_by_group = mixer is not None and version >= LEARN_BY_GROUP_FROM
        self.want = wanted_features(self.experts, [mixer] if mixer is not None else [], everything=False)
        self.where = f"mixer {mixer.spec}" if mixer is not None else f"expert {experts[0].spec}"
        # ahead (None: from AHEAD_MIN_LANES lanes): experts that prepare their rows on the second thread
        self.ahead = ahead
        self._can_prepare = [hasattr(e, "lanes_prepare") and ahead is not False and len(self.experts) > 1
                             for e in self.experts]
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="ctxmix-ahead") if any(self._can_prepare) else None
        self._ahead: list[int] = []  # the experts working ahead in this run (set by begin from the plan's lanes)
        self._groups: list[tuple[int, int]] = []  # the step's groups of lanes (begin)
        self._pending: dict[tuple[int, int], Future] = {}  # (expert, group) -> its preparation
        self._steps_left = 0  # steps of the plan still to come (none is prepared after the last)

    def _prepare(self, k: int, group: int) -> None:
        self._pending[k, group] = self._worker.submit(self.experts[k].lanes_prepare, group)

    def _wait(self, k: int, group: int) -> None:
        """Expert k's preparation of a group done (its errors raised here). Rather than wait idle, this thread
        takes the expert's later groups of the step that the second thread has not started yet, the last
        first, until the one it needs is done: the two threads share the model's work by how fast each gets
        through its own (an expert's groups are independent, so either thread may step any of them)."""
        pending = self._pending.pop((k, group), None)
        if pending is None:
            return
        try:
            for later in range(len(self._groups) - 1, group, -1):
                if pending.done():
                    break
                queued = self._pending.get((k, later))
                if queued is not None and queued.cancel():
                    del self._pending[k, later]
                    self.experts[k].lanes_prepare(later)
        except BaseException:
            self._pending[k, group] = pending  # still ``finish``'s to wait for
            raise
        pending.result()

    def finish(self) -> None:
        """Drop the work left on the second thread (steps a run ended before needing: the groups that sit out
        the last step, or everything after an error): queued steps are cancelled, running ones waited for,
        and their errors, which no coded token depended on, dropped. The codec calls it when a run ends."""
        pending, self._pending = self._pending, {}
        for job in pending.values():
            if not job.cancel():
                job.exception()

    def begin(self, plan: LanePlan, first_token: int) -> None:
        self.finish()
        self._steps_left = plan.steps
        working_ahead = self.ahead or (self.ahead is None and plan.lanes >= AHEAD_MIN_LANES)
        # groups: the integer step's rows do not depend on the batch, so the lanes can be prepared in turns; from
        # version 5 on the mixer learns group by group, so every run has the same groups (the float step then
        # runs all lanes at once, not ahead)
        working_ahead = working_ahead and (self.integer or not self._learns_by_group)
        self._ahead = [k for k, can in enumerate(self._can_prepare) if can and working_ahead]
        n_groups = AHEAD_GROUPS if self._learns_by_group or (self._ahead and self.integer) else 1
        self._groups = lane_groups(plan.lanes, n_groups)
        for k, expert in enumerate(self.experts):
            expert.lanes_begin(plan.lanes, plan.n_tokens, first_token, integer=self.integer, threads=self.threads,
                               version=self.version, **({"groups": self._groups} if k in self._ahead else {}))
            if k in self._ahead:
                for group in range(len(self._groups)):
                    self._prepare(k, group)
        if self.mixer is not None:
            self.mixer.lanes_begin(plan.lanes, lane_state=MIXER_LANE_STATE[self.version])

    def step(self, n_active: int, code: Callable[[int, np.ndarray], np.ndarray]) -> np.ndarray:
        """One step of lanes 0..n_active-1: ``code(lo, rows)`` gets the next position's distributions
        float64[n, V] of lanes lo..lo+n-1 and returns their tokens (the encoder its tokens, after coding them;
        the decoder what it decoded). Groups of lanes come in order (lo = 0 first), so the coder sees the
        step's lanes 0..n_active-1 in turn; then every component observes. Returns int64[n_active]: the
        tokens."""
        self._steps_left -= 1
        tokens = np.empty(n_active, np.int64)
        p = np.empty((n_active, len(self.experts), self.vocab_size))  # float64[La, K, V]
        features: list[dict] = [{} for _ in self.experts]
        for k, expert in enumerate(self.experts):  # the rows of the experts not working ahead: all lanes now
            if k not in self._ahead:
                p[:, k], features[k] = expert.lanes_distributions(n_active, self.want[k])
        for group, (lo, hi) in enumerate(self._groups):
            hi = min(hi, n_active)
            if lo >= hi:
                break
            for k in self._ahead:
                self._wait(k, group)
                p[lo:hi, k], part = self.experts[k].lanes_distributions(n_active, self.want[k], group=group)
                for name, values in part.items():
                    features[k].setdefault(name, np.empty(n_active))[lo:hi] = values
            rows = p[lo:hi, 0] if self.mixer is None else self.mixer.lanes_distributions(p, features, lanes=(lo, hi))
            tokens[lo:hi] = code(lo, rows)
            for k in self._ahead:  # the group's next rows on the second thread, while this one codes the rest
                self.experts[k].lanes_observe(tokens[lo:hi], group=group)
                if self._steps_left > 0:
                    self._prepare(k, group)
            if self._learns_by_group:  # (the step's later groups mix with what it learns here)
                self.mixer.lanes_observe(tokens[lo:hi], lanes=(lo, hi))
        for k, expert in enumerate(self.experts):
            if k not in self._ahead:
                expert.lanes_observe(tokens)
        if self.mixer is not None and not self._learns_by_group:
            self.mixer.lanes_observe(tokens)
        return tokens
