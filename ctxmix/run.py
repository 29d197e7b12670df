"""The engine: one pass of a stream through experts and any number of mixers (``run_stream``), or one
position at a time through experts and one mixer (``Predictor``, the codec's).

Each expert is computed once per pass; every mixer (and every expert alone, for ``--mixer none``) is
scored from the same expert outputs, so an ablation table costs one pass. The pass is chunked: experts
score a chunk (score before update, rule 3), mixers consume it, bits are summed. When every mixer is
linear only p(target) flows (fast path); otherwise experts return full distributions (full path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .errors import CtxmixError
from .experts.base import SHORT_CHUNK, Expert
from .metric import bits_from_logp
from .mixers.base import Mixer
from .stream import Stream

FAST_CHUNK = SHORT_CHUNK  # positions per fast-path chunk unless every expert suits longer ones (each a multiple
# of it); totals are added per FAST_CHUNK-aligned piece (``AlignedTotal``), so they do not depend on the chunks
FULL_CHUNK = 256  # positions per chunk with full distributions: K x 256 x V float64 stays small

# progress(task description, completed, total): called by long steps; the CLI draws it, the library never prints.
ProgressFn = Callable[[str, int, int], None]


@dataclass
class RunResult:
    """Totals for one stream, and optionally the per-position record behind them."""

    name: str
    mode: str
    tokens: int  # scored positions
    nbytes: int  # bytes they cover
    bits: dict[str, float]  # label -> total bits, labels in table order
    position_bits: dict[str, np.ndarray] = field(default_factory=dict)  # label -> float64[tokens]
    mixer_history: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # label -> name -> array
    expert_logp: np.ndarray | None = None  # float64[tokens, K] when a trace was asked for
    expert_features: list[dict[str, np.ndarray]] = field(default_factory=list)


def unique_labels(labels: Sequence[str]) -> list[str]:
    """Make repeated labels distinct (``hedge``, ``hedge#2``) so that rows never merge."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def wanted_features(experts: Sequence[Expert], mixers: Sequence[Mixer], everything: bool) -> list[tuple[str, ...]]:
    """Per expert, the features some mixer reads (or all it provides, for a trace): each mixer's
    ``wanted_features`` (an expert that does not provide one is a configuration error), and those of its
    ``optional_features`` that the expert provides."""
    wanted: list[set[str]] = [set(e.provides) if everything else set() for e in experts]
    for mixer in mixers:
        for index, names in mixer.optional_features().items():
            if 0 <= index < len(experts):
                wanted[index] |= set(names) & set(experts[index].provides)
        for index, names in mixer.wanted_features().items():
            if not 0 <= index < len(experts):
                raise CtxmixError(f"mixer {mixer.spec} reads expert #{index}, but only {len(experts)} experts are given")
            missing = set(names) - set(experts[index].provides)
            if missing:
                raise CtxmixError(
                    f"mixer {mixer.spec} needs feature {sorted(missing)[0]!r} of expert {experts[index].spec}, which does not provide it"
                )
            wanted[index] |= set(names)
    return [tuple(sorted(w)) for w in wanted]


def chunk_length(experts: Sequence[Expert], full: bool, chunk_size: int | None = None) -> int:
    """Positions per chunk of a pass: ``chunk_size`` when given; FULL_CHUNK on the full path (T x V rows);
    else the shortest that the experts suit (``Expert.fast_chunk``): fast experts run long chunks (the
    n-gram expert's two threads pipeline within one), a slow one keeps the progress bar moving. No
    per-position number depends on it (rule: chunked = one-shot), nor any total (``AlignedTotal``)."""
    if chunk_size:
        return chunk_size
    return FULL_CHUNK if full else min(expert.fast_chunk for expert in experts)


class AlignedTotal:
    """A run's total of bits, added one FAST_CHUNK-aligned piece of positions at a time, each piece summed
    whole: the part of a piece that one chunk leaves unfinished waits for the next chunk's bits. So the total
    is the same float for any chunk sizes (float addition is not associative, and numpy sums an array
    pairwise): a full-path run's 256-position chunks and a trace replay's long ones agree."""

    def __init__(self):
        self.total = 0.0
        self._pending: list[np.ndarray] = []  # the unfinished piece's bits so far

    def add(self, bits: np.ndarray, first_position: int) -> None:
        """Add ``bits`` of positions ``first_position``, ... (each chunk's right after the last's)."""
        position, done = first_position, 0
        while done < len(bits):
            part = bits[done: done + FAST_CHUNK - position % FAST_CHUNK]  # to the end of the current piece
            self._pending.append(part)
            done, position = done + len(part), position + len(part)
            if position % FAST_CHUNK == 0:  # the piece is whole
                self._sum_pending()

    def _sum_pending(self) -> None:
        piece = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        self.total += float(piece.sum())
        self._pending = []

    def value(self) -> float:
        """The total, the last unfinished piece included."""
        if self._pending:
            self._sum_pending()
        return self.total


def run_stream(
    stream: Stream,
    experts: Sequence[Expert],
    mixers: Sequence[Mixer] = (),
    *,
    expert_rows: bool = True,
    full: bool = False,
    chunk_size: int | None = None,
    keep_bits: bool = False,
    keep_trace: bool = False,
    progress: ProgressFn | None = None,
) -> RunResult:
    """Score ``stream`` (positions 1..N-1) with every expert and mixer in one pass.

    ``expert_rows``: also report each expert alone. ``full``: force the full path even when all mixers
    are linear (the checks compare both paths). ``keep_bits``: keep per-position bits per label.
    ``keep_trace``: keep per-position expert log p(target) and all their features (for ``--save-trace``).
    """
    if not experts:
        raise CtxmixError("no expert given: a run needs at least one --expert")
    for expert in experts:
        if expert.vocab_size != stream.vocab_size:
            raise CtxmixError(
                f"expert {expert.spec} has vocabulary {expert.vocab_size}, stream {stream.name} has {stream.vocab_size}"
            )
    full = full or any(not m.linear for m in mixers)
    want = wanted_features(experts, mixers, everything=keep_trace)

    labels = unique_labels(([e.spec for e in experts] if expert_rows else []) + [m.spec for m in mixers])
    n_expert_rows = len(experts) if expert_rows else 0
    totals = {label: AlignedTotal() for label in labels}
    per_position: dict[str, list[np.ndarray]] = {label: [] for label in labels} if keep_bits else {}
    trace_logp: list[np.ndarray] = []
    trace_features: list[dict[str, list[np.ndarray]]] = [{} for _ in experts]

    for expert in experts:
        expert.begin(stream.tokens)
    for mixer in mixers:
        mixer.begin()

    n = len(stream.tokens)
    chunk_size = chunk_length(experts, full, chunk_size)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        tokens = stream.tokens[start:stop]
        outputs = [e.score_chunk(tokens, full=full, want=want[i]) for i, e in enumerate(experts)]
        skip = 1 if start == 0 else 0  # position 0 is context only: never scored, never mixed
        targets = tokens[skip:]
        if len(targets) == 0:
            continue
        expert_logp = [o.logp[skip:] for o in outputs]
        # float64[T, K], for the mixers and the trace only (a copy: with one expert and no mixer, the
        # common ablation, it cost 2 ms of page faults per million positions)
        logp = np.stack(expert_logp, axis=1) if mixers or keep_trace else None
        features = [{name: values[skip:] for name, values in o.features.items()} for o in outputs]
        rows: list[np.ndarray] = expert_logp[:n_expert_rows]
        if full:
            p = np.stack([o.p[skip:] for o in outputs], axis=1)  # float64[T, K, V]
            rows += [np.log(m.mix_full(p, targets, features)[np.arange(len(targets)), targets]) for m in mixers]
        else:
            rows += [m.mix_logp(logp, features) for m in mixers]
        for label, row_logp in zip(labels, rows):
            bits = bits_from_logp(row_logp)
            totals[label].add(bits, start + skip)
            if keep_bits:
                per_position[label].append(bits)
        if keep_trace:
            trace_logp.append(logp)
            for k, feats in enumerate(features):
                for name, values in feats.items():
                    trace_features[k].setdefault(name, []).append(values)
        if progress is not None:
            progress(stream.name, stop, n)

    result = RunResult(stream.name, stream.mode, stream.n_scored, stream.scored_bytes,
                       {label: total.value() for label, total in totals.items()})
    if keep_bits:
        result.position_bits = {label: _concat(parts) for label, parts in per_position.items()}
    result.mixer_history = {label: m.history() for label, m in zip(labels[n_expert_rows:], mixers) if m.history()}
    if keep_trace:
        result.expert_logp = np.concatenate(trace_logp) if trace_logp else np.zeros((0, len(experts)))
        result.expert_features = [{name: _concat(parts) for name, parts in feats.items()} for feats in trace_features]
    return result


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)


# ----------------------------------------------------------------------------------------------------
# The stepwise engine: one position at a time, for coding
# ----------------------------------------------------------------------------------------------------


class Predictor:
    """Experts plus at most one mixer, driven position by position with the stepwise protocol: the engine
    of the codec, whose encoder and decoder both call it, so they see bit-identical floats.

    ``begin(n_tokens, first_token)`` resets everything for a stream of ``n_tokens`` tokens whose position
    0 (context only, never coded) is ``first_token``. The experts' ``begin`` receives a stream of the
    right length with only position 0 filled in (zeros after it): the decoder knows nothing more, and the
    encoder passes the same array so that both sides begin identically. A causal expert (rule 1) cannot
    tell the difference, and ``ctxmix check`` tests exactly that by perturbing future tokens.
    """

    def __init__(self, experts: Sequence, mixer, vocab_size: int):
        if not experts:
            raise CtxmixError("no expert given: coding needs at least one expert")
        if mixer is None and len(experts) != 1:
            raise CtxmixError(f"{len(experts)} experts and no mixer: coding needs one mixer, or one expert alone")
        for obj in [*experts, mixer]:
            if obj is not None and not _has_stepwise(obj):
                kind = "mixer" if obj is mixer else "expert"
                raise CtxmixError(f"{kind} {obj.spec} cannot be used for coding: it has no stepwise protocol "
                                  "(next_distribution/observe)")
        for expert in experts:
            if expert.vocab_size != vocab_size:
                raise CtxmixError(f"expert {expert.spec} has vocabulary {expert.vocab_size}, the tokenizer has {vocab_size}")
        self.experts = list(experts)
        self.mixer = mixer
        self.vocab_size = vocab_size
        self.want = wanted_features(self.experts, [mixer] if mixer is not None else [], everything=False)
        self.where = f"mixer {mixer.spec}" if mixer is not None else f"expert {experts[0].spec}"

    def begin(self, n_tokens: int, first_token: int) -> None:
        context = np.zeros(n_tokens, dtype=np.int64)
        context[0] = first_token
        for expert in self.experts:
            expert.begin(context)
        if self.mixer is not None:
            self.mixer.begin()
        for expert in self.experts:  # position 0 is context only: experts advance past it, mixers never see it
            expert.observe(first_token)

    def next_distribution(self) -> np.ndarray:
        """float64[V]: the distribution for the next position (no state change)."""
        if self.mixer is None:
            return self.experts[0].next_distribution(self.want[0])[0]
        # A fresh array each position: the mixer keeps it until observe(), nothing overwrites it before.
        p = np.empty((len(self.experts), self.vocab_size))  # float64[K, V]
        features = []
        for k, expert in enumerate(self.experts):
            p[k], feats = expert.next_distribution(self.want[k])
            features.append(feats)
        return self.mixer.next_distribution(p, features)

    def observe(self, token: int) -> None:
        for expert in self.experts:
            expert.observe(token)
        if self.mixer is not None:
            self.mixer.observe(token)


def _has_stepwise(obj) -> bool:
    """True when ``obj``'s class (not just the protocol base, whose methods raise) implements both steps."""
    bases = [base for base in (Expert, Mixer) if isinstance(obj, base)]
    for name in ("next_distribution", "observe"):
        method = getattr(type(obj), name, None)
        if method is None or any(method is getattr(base, name, None) for base in bases):
            return False
    return True
