"""The four rules of DESIGN.md section 2, checked by running each expert and mixer on a real stream.

``check_all`` is what ``ctxmix check`` and the test-suite call. Nothing a subject says about itself is
trusted; every rule is a measurement:

``normalized``           the full path at every checked position is float64, finite, every p > 0 and
                         ``|sum_v p(v) - 1| <= 1e-9``.
``causal``               the tokens >= t are replaced (by random tokens, then by one fixed token) and the
                         subject is run again: its distributions at positions <= t must not move.
``score_before_update``  the stepwise protocol (``observe`` the tokens < t, then ``next_distribution``)
                         must give the chunked run's distribution at t. An expert whose state already
                         holds token t when it scores t cannot reproduce that without seeing t, so it fails.
``chunk_invariant``      per-position bits from the engine (``run_stream``) with chunk sizes 7, 64 and 1000
                         equal those of one chunk over the whole stream, on the fast and the full path.
``fast_equals_full``     log p(target) from the fast path equals the log of the full distribution's target
                         entry (relative difference <= 1e-12; the very same float for the neural expert).

Mixers are checked in isolation: they are fed the experts' recorded reference outputs, so a broken expert
shows up as itself and not as a broken mixer (except in ``chunk_invariant``, which runs the whole
configuration through the engine, as a user's run would).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import numpy as np

from .errors import CtxmixError
from .experts.base import Expert
from .components import DEFAULT_EXPERTS, DEFAULT_MIXERS, NONE
from .mixers.base import Mixer
from .run import FAST_CHUNK, FULL_CHUNK, ProgressFn, run_stream, unique_labels, wanted_features
from .stream import Stream

RULES = ("normalized", "causal", "score_before_update", "chunk_invariant", "fast_equals_full")

DEFAULT_POSITIONS = 2000  # scored positions checked: every rule runs on all of them (causal: a prefix)
NORM_ATOL = 1e-9  # rule 2: |sum_v p(v) - 1|
LOGP_RTOL = 1e-12  # rule 4, and the tolerance wherever two paths must give "the same numbers"
CHUNK_SIZES = (7, 64, 1000)  # each compared with one chunk over the whole stream
N_CUTS = 3  # causal: cut points, one in each third of the stream

# The neural expert's logits come from float32 (or narrower) matrix products whose kernels may block a
# batch differently when it holds other tokens; a difference at that rounding level carries no
# information about the future. Its causal check allows this relative difference in p (and reports the
# largest one found); everything else must stay bit-identical.
FLOAT32_EXPERTS = frozenset({"neural", "hf"})
FLOAT32_CAUSAL_RTOL = 1e-6
# Its stepwise path (KV cache, one token per forward) is a different float32 computation from the batched
# windows: it agrees to about 4e-5 relative on the shipped artifacts. An expert that updated before scoring
# would be off by far more than this (the token's own probability moves by orders of magnitude).
FLOAT32_STEPWISE_RTOL = 1e-3
# DESIGN.md rule 4: the neural expert's two paths must give the very same float for log p(target).
EXACT_FAST_PATH = frozenset({"neural", "hf"})

ExpertSource = Union[str, Callable[[], Expert]]
MixerSource = Union[str, Callable[[list], Mixer]]


@dataclass(frozen=True)
class RuleResult:
    """One rule applied to one subject (``"expert ngram:orders=2-6"``, ``"mixer hedge"``)."""

    rule: str
    subject: str
    passed: bool
    detail: str  # what was measured (pass) or what went wrong, where, and what was expected (fail)

    @property
    def message(self) -> str:
        """One line: ``"expert target_hashed_cache: distribution at position 17 sums to ..."``."""
        return f"{self.subject}: {self.detail}"


@dataclass
class CheckReport:
    """Every (rule, subject) result, in rule order then subject order."""

    stream: str
    positions: int  # scored positions checked
    experts: list[str]  # expert specs, as the run labels them
    mixers: list[str]
    results: list[RuleResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failures(self) -> list[RuleResult]:
        return [r for r in self.results if not r.passed]

    def get(self, rule: str, subject: str) -> RuleResult:
        """The result of ``rule`` on ``subject`` (``"expert uniform"``); KeyError if it was not checked."""
        for r in self.results:
            if r.rule == rule and r.subject == subject:
                return r
        raise KeyError((rule, subject))


def check_all(
    stream: Stream,
    experts: Sequence[ExpertSource] | None = None,
    mixers: Sequence[MixerSource] | None = None,
    *,
    positions: int = DEFAULT_POSITIONS,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> CheckReport:
    """Check the four rules on the first ``positions`` scored positions of ``stream``.

    ``experts``: spec strings, or zero-argument factories returning fresh ``Expert`` instances (for
    experts that are not registered, such as test fixtures); None: the defaults of a run
    (``components.DEFAULT_EXPERTS``). ``mixers``: spec strings, or factories taking the list of expert spec
    strings; ``none`` is skipped; None: the default run's mixers. Every subject is rebuilt fresh for each
    pass. ``seed`` picks the causal cut points and random tokens. Never raises for a subject that breaks
    a rule or fails to run (that is a failed result); raises CtxmixError for unusable input.
    """
    if positions < 1:
        raise CtxmixError(f"check: positions must be >= 1, got {positions}")
    if len(stream.tokens) < 2:
        raise CtxmixError(f"check: stream {stream.name} has {len(stream.tokens)} tokens; at least 2 are needed")
    stream = stream.prefix(positions + 1)
    setup = _Setup(
        stream.vocab_size,
        list(DEFAULT_EXPERTS) if experts is None else list(experts),
        [m for m in DEFAULT_MIXERS if m != NONE] if mixers is None else list(mixers),
    )
    checker = _Checker(stream, setup, np.random.default_rng(seed), progress)
    return checker.run()


# ---------------------------------------------------------------------------------------------------------
# Building subjects


@dataclass
class _Subject:
    kind: str  # "expert" or "mixer"
    index: int  # among the experts, or among the mixers
    label: str  # as a run labels its row
    name: str  # registry name
    linear: bool = True  # mixers only
    error: str | None = None  # set when the subject could not be run at all

    @property
    def title(self) -> str:
        return f"{self.kind} {self.label}"


class _Setup:
    """Fresh experts and mixers on demand, from spec strings or factories."""

    def __init__(self, vocab_size: int, experts: list, mixers: list):
        from .components import experts as expert_registry
        from .components import mixers as mixer_registry

        if not experts:
            raise CtxmixError("check needs at least one expert")
        self.vocab_size = vocab_size
        self._expert_makers = [_maker(e, "expert", lambda s: expert_registry.build(s, vocab_size=vocab_size))
                               for e in experts]
        first_experts = [self.expert(k) for k in range(len(experts))]
        self.expert_specs = [e.spec for e in first_experts]
        self.provides = [tuple(e.provides) for e in first_experts]
        mixers = [m for m in mixers if not (isinstance(m, str) and m.strip() == NONE)]
        self._mixer_makers = [_maker(m, "mixer", lambda s, specs: mixer_registry.build(s, experts=specs))
                              for m in mixers]
        first_mixers = [self.mixer(j) for j in range(len(mixers))]
        labels = unique_labels(self.expert_specs + [m.spec for m in first_mixers])
        self.experts = [_Subject("expert", k, labels[k], e.registry_name) for k, e in enumerate(first_experts)]
        self.mixers = [
            _Subject("mixer", j, labels[len(first_experts) + j], m.registry_name, linear=bool(m.linear))
            for j, m in enumerate(first_mixers)
        ]
        for expert in first_experts:
            if expert.vocab_size != vocab_size:
                raise CtxmixError(f"check: expert {expert.spec} has vocabulary {expert.vocab_size}, stream has {vocab_size}")
        # A mixer reading a feature its expert does not provide is a configuration error, not a broken rule.
        wanted_features(first_experts, first_mixers, everything=True)

    def expert(self, k: int) -> Expert:
        expert = self._expert_makers[k]()
        if not isinstance(expert, Expert):
            raise CtxmixError(f"check: expert factory #{k} returned {type(expert).__name__}, expected an Expert")
        return expert

    def mixer(self, j: int) -> Mixer:
        mixer = self._mixer_makers[j](list(self.expert_specs))
        if not isinstance(mixer, Mixer):
            raise CtxmixError(f"check: mixer factory #{j} returned {type(mixer).__name__}, expected a Mixer")
        return mixer


def _maker(source: Any, kind: str, build: Callable) -> Callable:
    if isinstance(source, str):
        return lambda *args: build(source, *args)
    if callable(source):
        return source
    raise CtxmixError(f"check: {kind} {source!r} is neither a spec string nor a factory")


# ---------------------------------------------------------------------------------------------------------
# Running subjects


class _Broken(Exception):
    """A subject failed to run or returned malformed output; the message says which call and how."""


def _call(what: str, fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except _Broken:
        raise
    except Exception as exc:  # a subject's own failure is a check result, not a crash of the checker
        raise _Broken(f"{what} raised {type(exc).__name__}: {' '.join(str(exc).split())}") from None


@dataclass
class _Scores:
    """An expert's outputs at positions 0..N-1 (rows past ``end`` are unfilled)."""

    logp: np.ndarray  # float64[N]
    p: np.ndarray | None  # float64[N, V] (full path only)
    features: dict[str, np.ndarray]  # name -> float64[N]
    end: int  # positions filled: 0..end-1


def _expert_pass(expert: Expert, tokens: np.ndarray, vocab_size: int, *, full: bool, chunk_size: int,
                 want: tuple[str, ...], stop: int | None = None) -> _Scores:
    """Score ``tokens`` chunk by chunk as the engine does; stop after the chunk holding position stop-1."""
    n = len(tokens)
    stop = n if stop is None else min(stop, n)
    logp = np.zeros(n)
    p = np.zeros((n, vocab_size)) if full else None
    features = {name: np.zeros(n) for name in want}
    _call("begin", expert.begin, tokens)
    start = 0
    while start < stop:
        chunk = tokens[start : start + chunk_size]
        out = _call(f"score_chunk(full={full})", expert.score_chunk, chunk, full=full, want=want)
        _validate_output(out, len(chunk), vocab_size, full, want)
        end = start + len(chunk)
        logp[start:end] = out.logp
        if full:
            p[start:end] = out.p
        for name in want:
            features[name][start:end] = out.features[name]
        start = end
    return _Scores(logp, p, features, start)


def _validate_output(out: Any, n: int, vocab_size: int, full: bool, want: tuple[str, ...]) -> None:
    call = f"score_chunk(full={full}) on {n} positions"
    for name, value, shape in [("logp", getattr(out, "logp", None), (n,))] + (
        [("p", getattr(out, "p", None), (n, vocab_size))] if full else []
    ):
        if not isinstance(value, np.ndarray) or value.dtype != np.float64 or value.shape != shape:
            raise _Broken(f"{call} returned {name} as {_describe(value)}; expected float64{list(shape)}")
    for name in want:
        value = getattr(out, "features", {}).get(name)
        if not isinstance(value, np.ndarray) or value.shape != (n,):
            raise _Broken(f"{call} returned feature {name!r} as {_describe(value)}; expected float64[{n}]")


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype}{list(value.shape)}"
    return type(value).__name__


def _mixer_pass(mixer: Mixer, tokens: np.ndarray, inputs: list[_Scores], *, stop: int | None = None) -> np.ndarray:
    """Mix full distributions chunk by chunk as the engine does (position 0 never mixed); float64[N, V]."""
    n = len(tokens)
    stop = n if stop is None else min(stop, n)
    vocab_size = inputs[0].p.shape[1]
    out = np.zeros((n, vocab_size))
    _call("begin", mixer.begin)
    for start in range(0, stop, FULL_CHUNK):
        lo, hi = max(start, 1), min(start + FULL_CHUNK, n)
        if hi <= lo:
            continue
        p = np.stack([s.p[lo:hi] for s in inputs], axis=1)  # float64[T, K, V]
        features = [{name: values[lo:hi] for name, values in s.features.items()} for s in inputs]
        mixed = _call("mix_full", mixer.mix_full, p, tokens[lo:hi], features)
        if not isinstance(mixed, np.ndarray) or mixed.dtype != np.float64 or mixed.shape != (hi - lo, vocab_size):
            raise _Broken(f"mix_full on {hi - lo} positions returned {_describe(mixed)}; expected float64[{hi - lo}, {vocab_size}]")
        out[lo:hi] = mixed
    return out


# ---------------------------------------------------------------------------------------------------------
# Comparisons


def _logp_rel_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| / max(|b|, 1) for log-probabilities (or bits): relative, but absolute below 1 unit, since a
    relative difference of a log p near 0 would magnify rounding in p(target) close to 1."""
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - b) / np.maximum(np.abs(b), 1.0)
    return np.where(a == b, 0.0, np.nan_to_num(diff, nan=np.inf))


def _p_rel_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| / |b| for probabilities (inf where b == 0 != a, 0 where they are equal, NaNs included)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = np.abs(a - b) / np.abs(b)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    return np.where(same, 0.0, np.nan_to_num(diff, nan=np.inf, posinf=np.inf))


def _num(x: float) -> str:
    """Short for far-off values, full precision near 1 (where the digits that matter are far right)."""
    x = float(x)
    if math.isfinite(x) and abs(x - 1.0) < 1e-3:
        return f"{x:.15g}"
    return f"{x:.6g}"


def _pair(a: float, b: float) -> tuple[str, str]:
    """``a`` and ``b`` with enough digits to show that they differ."""
    a, b = float(a), float(b)
    digits = 6
    if math.isfinite(a) and math.isfinite(b) and a != b and b != 0.0:
        digits = min(17, max(6, 2 - math.floor(math.log10(abs(a - b) / abs(b)))))
    return f"{a:.{digits}g}", f"{b:.{digits}g}"


# ---------------------------------------------------------------------------------------------------------
# The checker


class _Checker:
    def __init__(self, stream: Stream, setup: _Setup, rng: np.random.Generator, progress: ProgressFn | None):
        self.stream = stream
        self.tokens = stream.tokens
        self.n = len(stream.tokens)
        self.vocab_size = stream.vocab_size
        self.setup = setup
        self.rng = rng
        self.progress = progress
        self.results: list[RuleResult] = []
        self.ref_experts: list[_Scores | None] = []
        self.ref_mixers: list[np.ndarray | None] = []
        self._done = 0
        n_subjects = len(setup.experts) + len(setup.mixers)
        # reference + stepwise + fast per subject, 2 per causal cut, 2 paths x (chunk sizes + 1) engine runs
        self._total = 3 * n_subjects + 2 * N_CUTS + 2 * (len(CHUNK_SIZES) + 1)

    @property
    def subjects(self) -> list[_Subject]:
        return self.setup.experts + self.setup.mixers

    def _step(self, task: str) -> None:
        self._done += 1
        if self.progress is not None:
            self.progress(f"check: {task}", min(self._done, self._total), self._total)

    def _add(self, rule: str, subject: _Subject, passed: bool, detail: str) -> None:
        self.results.append(RuleResult(rule, subject.title, bool(passed), detail))

    def run(self) -> CheckReport:
        self._reference()
        per_rule = {
            "normalized": self._normalized,
            "causal": self._causal,
            "score_before_update": self._score_before_update,
            "chunk_invariant": self._chunk_invariant,
            "fast_equals_full": self._fast_equals_full,
        }
        for rule in RULES:
            broken = [s for s in self.subjects if s.error is not None]
            for subject in broken:
                self._add(rule, subject, False, subject.error)
            per_rule[rule]()
        order = {s.title: i for i, s in enumerate(self.subjects)}
        self.results.sort(key=lambda r: (RULES.index(r.rule), order[r.subject]))
        return CheckReport(
            self.stream.name, self.n - 1, [s.label for s in self.setup.experts], [s.label for s in self.setup.mixers],
            self.results,
        )

    def _healthy(self, subjects: list[_Subject]) -> list[_Subject]:
        return [s for s in subjects if s.error is None]

    # -- reference: the full path, chunked as the engine chunks it -----------------------------------------

    def _reference(self) -> None:
        for subject in self.setup.experts:
            try:
                scores = _expert_pass(self.setup.expert(subject.index), self.tokens, self.vocab_size, full=True,
                                      chunk_size=FULL_CHUNK, want=self.setup.provides[subject.index])
            except _Broken as exc:
                subject.error = f"could not be run: {exc}"
                scores = None
            self.ref_experts.append(scores)
            self._step(f"reference {subject.title}")
        broken = [s for s in self.setup.experts if s.error is not None]
        for subject in self.setup.mixers:
            mixed = None
            if broken:
                subject.error = f"not checked: expert {broken[0].label} could not be run"
            else:
                try:
                    mixed = _mixer_pass(self.setup.mixer(subject.index), self.tokens, self.ref_experts)
                except _Broken as exc:
                    subject.error = f"could not be run: {exc}"
            self.ref_mixers.append(mixed)
            self._step(f"reference {subject.title}")

    def _ref_p(self, subject: _Subject) -> np.ndarray:
        """float64[N, V]: the subject's reference distributions (row 0 is unused for mixers)."""
        if subject.kind == "expert":
            return self.ref_experts[subject.index].p
        return self.ref_mixers[subject.index]

    # -- rule 2 -----------------------------------------------------------------------------------------------

    def _normalized(self) -> None:
        for subject in self._healthy(self.subjects):
            p = self._ref_p(subject)[1:]  # float64[T, V]: scored positions 1..N-1
            self._add("normalized", subject, *_normalization_verdict(p))

    # -- rule 1 -----------------------------------------------------------------------------------------------

    def _cut_points(self) -> list[int]:
        """One cut in each third of the scored positions (fewer for very short streams)."""
        last = self.n - 1
        edges = np.linspace(1, last + 1, N_CUTS + 1).astype(np.int64)
        cuts = {int(self.rng.integers(lo, hi)) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo}
        return sorted(cuts)

    def _perturb(self, cut: int, kind: str) -> np.ndarray:
        tokens = self.tokens.copy()
        if kind == "random tokens":  # every token >= cut changes
            shift = self.rng.integers(1, self.vocab_size, size=self.n - cut)
            tokens[cut:] = (tokens[cut:] + shift) % self.vocab_size
        else:  # one token, different from the one at the cut
            tokens[cut:] = (tokens[cut] + self.vocab_size // 2) % self.vocab_size
        return tokens

    def _causal(self) -> None:
        experts = self._healthy(self.setup.experts)
        mixers = self._healthy(self.setup.mixers)
        worst: dict[str, float] = {s.title: 0.0 for s in experts + mixers}
        failed: dict[str, str] = {}
        cuts = self._cut_points()
        for cut in cuts:
            for kind in ("random tokens", "a fixed token"):
                tokens = self._perturb(cut, kind)
                perturbed: dict[int, _Scores] = {}
                for subject in experts:
                    try:
                        scores = _expert_pass(self.setup.expert(subject.index), tokens, self.vocab_size, full=True,
                                              chunk_size=FULL_CHUNK, want=self.setup.provides[subject.index],
                                              stop=cut + 1)
                    except _Broken as exc:
                        failed.setdefault(subject.title, f"on the stream with {kind} from position {cut}: {exc}")
                        continue
                    perturbed[subject.index] = scores
                    ref = self.ref_experts[subject.index]
                    pairs = [("distribution", scores.p[1 : cut + 1], ref.p[1 : cut + 1])] + [
                        (f"feature {name!r}", scores.features[name][1 : cut + 1], ref.features[name][1 : cut + 1])
                        for name in self.setup.provides[subject.index]
                    ]
                    rtol = FLOAT32_CAUSAL_RTOL if subject.name in FLOAT32_EXPERTS else 0.0
                    self._causal_compare(subject, pairs, cut, kind, rtol, worst, failed)
                live_mixers = [s for s in mixers if s.title not in failed]
                if live_mixers and len(perturbed) != len(self.setup.experts):
                    for subject in live_mixers:
                        failed[subject.title] = f"not checked: an expert failed on the stream with {kind} from position {cut}"
                    live_mixers = []
                # Mixers see the reference expert outputs at positions <= cut (what causal experts give there)
                # and the perturbed ones after it, plus the perturbed targets: only the mixer's own dependence
                # on the future can then move its output at positions <= cut.
                inputs = [perturbed[k] for k in range(len(self.ref_experts))] if live_mixers else []
                for spliced, ref in zip(inputs, self.ref_experts):
                    spliced.p[: cut + 1] = ref.p[: cut + 1]
                    for name in spliced.features:
                        spliced.features[name][: cut + 1] = ref.features[name][: cut + 1]
                for subject in live_mixers:
                    try:
                        mixed = _mixer_pass(self.setup.mixer(subject.index), tokens, inputs, stop=cut + 1)
                    except _Broken as exc:
                        failed.setdefault(subject.title, f"on the stream with {kind} from position {cut}: {exc}")
                        continue
                    ref_mixed = self.ref_mixers[subject.index]
                    pairs = [("distribution", mixed[1 : cut + 1], ref_mixed[1 : cut + 1])]
                    self._causal_compare(subject, pairs, cut, kind, 0.0, worst, failed)
                self._step(f"causal, cut at {cut}, {kind}")
        where = ", ".join(map(str, cuts))
        for subject in experts + mixers:
            if subject.title in failed:
                self._add("causal", subject, False, failed[subject.title])
                continue
            if worst[subject.title] == 0.0:
                detail = f"bit-identical at every position <= t after replacing the tokens >= t (t = {where}; random tokens, a fixed token)"
            else:
                detail = (f"positions <= t move by at most {worst[subject.title]:.3g} (relative, p) after replacing "
                          f"the tokens >= t (t = {where}); float32 tolerance {FLOAT32_CAUSAL_RTOL:g}")
            self._add("causal", subject, True, detail)

    def _causal_compare(self, subject: _Subject, pairs, cut: int, kind: str, rtol: float,
                        worst: dict[str, float], failed: dict[str, str]) -> None:
        for what, new, old in pairs:
            diff = _p_rel_diff(new, old)
            largest = float(diff.max()) if diff.size else 0.0
            worst[subject.title] = max(worst[subject.title], largest)
            if largest > rtol and subject.title not in failed:
                bad = np.argwhere(diff > rtol)[0]
                position = int(bad[0]) + 1
                if what == "distribution":
                    token = int(bad[1])
                    before, after = _pair(old[bad[0], token], new[bad[0], token])
                    change = f"p(token {token}) {before} -> {after}"
                else:
                    before, after = _pair(old[bad[0]], new[bad[0]])
                    change = f"{before} -> {after}"
                failed[subject.title] = (
                    f"{what} at position {position} changed when the tokens >= {cut} were replaced by {kind}: "
                    f"{change} (rule 1, causal: positions <= {cut} may depend only on tokens < {cut}; an "
                    f"update from tokens not yet scored, rule 3, shows here too)"
                )

    # -- rule 3 -----------------------------------------------------------------------------------------------

    def _score_before_update(self) -> None:
        for subject in self._healthy(self.setup.experts):
            self._add("score_before_update", subject, *self._stepwise_expert(subject))
            self._step(f"stepwise {subject.title}")
        for subject in self._healthy(self.setup.mixers):
            self._add("score_before_update", subject, *self._stepwise_mixer(subject))
            self._step(f"stepwise {subject.title}")

    def _stepwise_expert(self, subject: _Subject) -> tuple[bool, str]:
        expert = self.setup.expert(subject.index)
        if not (callable(getattr(expert, "next_distribution", None)) and callable(getattr(expert, "observe", None))):
            return False, "has no stepwise protocol (next_distribution / observe), which the codec needs"
        ref = self.ref_experts[subject.index]
        want = self.setup.provides[subject.index]
        worst = 0.0
        rtol = FLOAT32_STEPWISE_RTOL if subject.name in FLOAT32_EXPERTS else LOGP_RTOL
        try:
            _call("begin", expert.begin, self.tokens)
            for t in range(self.n):
                if t >= 1:
                    answer = _call("next_distribution", expert.next_distribution, want=want)
                    if not (isinstance(answer, tuple) and len(answer) == 2):
                        raise _Broken(f"next_distribution returned {_describe(answer)}; expected (p, features)")
                    p, features = answer
                    verdict = _stepwise_compare(p, ref.p[t], int(self.tokens[t]), t, self.vocab_size, rtol)
                    if isinstance(verdict, str):
                        return False, verdict
                    worst = max(worst, verdict)
                    for name in want:
                        value = features.get(name) if isinstance(features, dict) else None
                        if value is None:
                            return False, f"next_distribution at position {t} did not return feature {name!r}"
                        diff = float(_p_rel_diff(np.float64(value), np.float64(ref.features[name][t])))
                        if diff > rtol:
                            shown = _pair(value, ref.features[name][t])
                            return False, (f"stepwise feature {name!r} at position {t} is {shown[0]}, the chunked "
                                           f"run gave {shown[1]}")
                _call("observe", expert.observe, int(self.tokens[t]))
        except _Broken as exc:
            return False, str(exc)
        return True, _stepwise_summary(worst, self.n - 1)

    def _stepwise_mixer(self, subject: _Subject) -> tuple[bool, str]:
        mixer = self.setup.mixer(subject.index)
        if not (callable(getattr(mixer, "next_distribution", None)) and callable(getattr(mixer, "observe", None))):
            return False, "has no stepwise protocol (next_distribution / observe), which the codec needs"
        ref = self.ref_mixers[subject.index]
        worst = 0.0
        try:
            _call("begin", mixer.begin)
            for t in range(1, self.n):
                p = np.stack([s.p[t] for s in self.ref_experts])  # float64[K, V]
                features = [{name: float(values[t]) for name, values in s.features.items()} for s in self.ref_experts]
                mixed = _call("next_distribution", mixer.next_distribution, p, features)
                verdict = _stepwise_compare(mixed, ref[t], int(self.tokens[t]), t, self.vocab_size)
                if isinstance(verdict, str):
                    return False, verdict
                worst = max(worst, verdict)
                _call("observe", mixer.observe, int(self.tokens[t]))
        except _Broken as exc:
            return False, str(exc)
        return True, _stepwise_summary(worst, self.n - 1)

    # -- chunking, through the engine --------------------------------------------------------------------------

    def _chunk_invariant(self) -> None:
        experts = self._healthy(self.setup.experts)
        mixers = self._healthy(self.setup.mixers)  # none when an expert could not be run
        worst: dict[str, float] = {s.title: 0.0 for s in experts + mixers}
        failed: dict[str, str] = {}
        sizes = list(CHUNK_SIZES) + [self.n]
        for path, members in (("fast", [m for m in mixers if m.linear]), ("full", mixers)):
            subjects = experts + members
            bits: dict[int, list[np.ndarray]] = {}
            for size in sizes:
                try:
                    result = run_stream(
                        self.stream,
                        [self.setup.expert(s.index) for s in experts],
                        [self.setup.mixer(s.index) for s in members],
                        expert_rows=True, full=path == "full", chunk_size=size, keep_bits=True,
                    )
                    bits[size] = list(result.position_bits.values())
                except Exception as exc:  # the whole configuration's failure; attributed to every member
                    message = f"run_stream ({path} path, chunk size {size}) raised {type(exc).__name__}: {' '.join(str(exc).split())}"
                    for subject in subjects:
                        failed.setdefault(subject.title, message)
                self._step(f"{path} path, chunk size {size}")
            if self.n not in bits:
                continue
            whole = bits[self.n]
            for size in CHUNK_SIZES:
                if size not in bits:
                    continue
                for subject, row, one_chunk in zip(subjects, bits[size], whole):
                    diff = _logp_rel_diff(row, one_chunk)
                    largest = float(diff.max()) if diff.size else 0.0
                    worst[subject.title] = max(worst[subject.title], largest)
                    if largest > LOGP_RTOL and subject.title not in failed:
                        i = int(np.argmax(diff))
                        shown = _pair(row[i], one_chunk[i])
                        failed[subject.title] = (
                            f"{path} path, chunk size {size}: position {i + 1} costs {shown[0]} bits, one chunk "
                            f"over the stream gives {shown[1]} (relative difference {largest:.3g} > {LOGP_RTOL:g})"
                        )
        for subject in experts + mixers:
            if subject.title in failed:
                self._add("chunk_invariant", subject, False, failed[subject.title])
            elif worst[subject.title] == 0.0:
                self._add("chunk_invariant", subject, True,
                          f"per-position bits identical for chunk sizes {', '.join(map(str, CHUNK_SIZES))} and one chunk")
            else:
                self._add("chunk_invariant", subject, True,
                          f"per-position bits within {worst[subject.title]:.3g} (relative) for chunk sizes "
                          f"{', '.join(map(str, CHUNK_SIZES))} and one chunk")

    # -- rule 4 -----------------------------------------------------------------------------------------------

    def _fast_equals_full(self) -> None:
        scored = np.arange(1, self.n)
        targets = self.tokens[1:]
        for subject in self._healthy(self.setup.experts):
            ref = self.ref_experts[subject.index]
            want = self.setup.provides[subject.index]
            try:
                fast = _expert_pass(self.setup.expert(subject.index), self.tokens, self.vocab_size, full=False,
                                    chunk_size=FAST_CHUNK, want=want)
            except _Broken as exc:
                self._add("fast_equals_full", subject, False, str(exc))
                continue
            with np.errstate(divide="ignore"):
                full_logp = np.log(ref.p[scored, targets])
            checks = [
                ("fast-path log p(target)", fast.logp[1:], full_logp),
                ("full-path logp output", ref.logp[1:], full_logp),
            ] + [(f"fast-path feature {name!r}", fast.features[name][1:], ref.features[name][1:]) for name in want]
            exact = subject.name in EXACT_FAST_PATH
            self._add("fast_equals_full", subject, *_fast_full_verdict(checks, exact, fast.logp[1:], ref.logp[1:]))
            self._step(f"fast path {subject.title}")
        mixers = self._healthy(self.setup.mixers)
        if not mixers:
            return
        with np.errstate(divide="ignore"):
            expert_logp = np.stack([np.log(s.p[scored, targets]) for s in self.ref_experts], axis=1)  # float64[T, K]
        for subject in mixers:
            if not subject.linear:
                self._add("fast_equals_full", subject, True, "no fast path: mixes full distributions only")
                continue
            try:
                fast_logp = self._mixer_fast(subject, expert_logp)
            except _Broken as exc:
                self._add("fast_equals_full", subject, False, str(exc))
                continue
            with np.errstate(divide="ignore"):
                full_logp = np.log(self.ref_mixers[subject.index][scored, targets])
            self._add("fast_equals_full", subject,
                      *_fast_full_verdict([("fast-path log p(target)", fast_logp, full_logp)], False, None, None))
            self._step(f"fast path {subject.title}")

    def _mixer_fast(self, subject: _Subject, expert_logp: np.ndarray) -> np.ndarray:
        """The mixer's fast path over the reference experts' log p(target), chunked as the engine chunks it."""
        mixer = self.setup.mixer(subject.index)
        _call("begin", mixer.begin)
        out = np.zeros(self.n - 1)
        for start in range(0, self.n, FAST_CHUNK):
            lo, hi = max(start, 1), min(start + FAST_CHUNK, self.n)
            if hi <= lo:
                continue
            features = [{name: values[lo:hi] for name, values in s.features.items()} for s in self.ref_experts]
            row = _call("mix_logp", mixer.mix_logp, expert_logp[lo - 1 : hi - 1], features)
            if not isinstance(row, np.ndarray) or row.dtype != np.float64 or row.shape != (hi - lo,):
                raise _Broken(f"mix_logp on {hi - lo} positions returned {_describe(row)}; expected float64[{hi - lo}]")
            out[lo - 1 : hi - 1] = row
        return out


# ---------------------------------------------------------------------------------------------------------
# Verdicts


def _normalization_verdict(p: np.ndarray) -> tuple[bool, str]:
    """p: float64[T, V] at positions 1..T. Reports the first bad position and how many are bad."""
    finite = np.isfinite(p).all(axis=1)
    positive = (p > 0).all(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        sums = p.sum(axis=1)
    off = ~(np.abs(sums - 1.0) <= NORM_ATOL)
    bad = ~finite | ~positive | off
    if not bad.any():
        worst = float(np.abs(sums - 1.0).max()) if len(sums) else 0.0
        return True, f"{len(p)} positions: every p > 0 and finite, |sum - 1| <= {worst:.3g} (limit {NORM_ATOL:g})"
    i = int(np.argmax(bad))
    position = i + 1
    if not finite[i]:
        token = int(np.argmax(~np.isfinite(p[i])))
        first = f"distribution at position {position} has p(token {token}) = {p[i, token]} (expected finite)"
    elif not positive[i]:
        token = int(np.argmax(~(p[i] > 0)))
        first = f"distribution at position {position} has p(token {token}) = {_num(p[i, token])} (expected > 0 for every token)"
    else:
        first = f"distribution at position {position} sums to {_num(sums[i])} (expected 1 within {NORM_ATOL:g})"
    n_bad = int(bad.sum())
    summary = f"{n_bad} of {len(p)} positions fail"
    fin = np.isfinite(sums) & off
    if fin.any():
        summary += (f"; sums of the bad ones range {_num(sums[fin].min())} .. {_num(sums[fin].max())}, "
                    f"median {_num(np.median(sums[fin]))}")
    return False, f"{first}; {summary}"


def _stepwise_compare(p: Any, ref: np.ndarray, token: int, t: int, vocab_size: int,
                      rtol: float = LOGP_RTOL) -> float | str:
    """Largest relative difference between the stepwise and the chunked distribution at t, or a failure."""
    if not isinstance(p, np.ndarray) or p.dtype != np.float64 or p.shape != (vocab_size,):
        return f"next_distribution at position {t} returned {_describe(p)}; expected float64[{vocab_size}]"
    diff = _p_rel_diff(p, ref)
    largest = float(diff.max())
    if largest <= rtol:
        return largest
    v = token if diff[token] > rtol else int(np.argmax(diff))
    which = f"p(token {v}), the token at {t}," if v == token else f"p(token {v})"
    got, expected = _pair(p[v], ref[v])
    return (f"stepwise {which} at position {t} is {got} after observing tokens < {t}; the chunked run gave "
            f"{expected} (relative difference {largest:.3g} > {rtol:g}): rule 3, score before update: a chunked "
            f"score at {t} must come from tokens < {t} alone, before any state sees token {t}")


def _stepwise_summary(worst: float, n: int) -> str:
    if worst == 0.0:
        return f"next_distribution after observing tokens < t equals the chunked run bit for bit at {n} positions"
    return f"next_distribution after observing tokens < t is within {worst:.3g} (relative) of the chunked run at {n} positions"


def _fast_full_verdict(checks, exact: bool, fast_logp, full_output_logp) -> tuple[bool, str]:
    worst = 0.0
    for what, got, expected in checks:
        diff = _logp_rel_diff(got, expected)
        largest = float(diff.max()) if diff.size else 0.0
        if largest > LOGP_RTOL:
            i = int(np.argmax(diff))
            shown = _pair(got[i], expected[i])
            return False, (f"{what} at position {i + 1} is {shown[0]}, the full distribution gives "
                           f"{shown[1]} (relative difference {largest:.3g} > {LOGP_RTOL:g})")
        worst = max(worst, largest)
    if exact:
        same = fast_logp == full_output_logp
        if not same.all():
            i = int(np.argmin(same))
            return False, (f"fast-path log p(target) at position {i + 1} is {fast_logp[i]!r}, the full path's is "
                           f"{full_output_logp[i]!r} (this expert's two paths must give the very same float)")
        return True, f"fast and full paths give the very same floats; log of the full entry within {worst:.3g}"
    if worst == 0.0:
        return True, "fast-path log p(target) equals log of the full distribution's entry exactly"
    return True, f"fast-path log p(target) within {worst:.3g} (relative) of log of the full distribution's entry"
