"""The library entry points: ``score`` (text files), ``evaluate`` (shards), ``mix`` (a saved trace).

The CLI calls these and nothing else for a run; they return a ``Report`` and never print.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from . import experts as expert_registry_module
from . import mixers as mixer_registry_module
from .errors import CtxmixError
from .experts.base import Expert
from .metric import bits_per_byte
from .mixers import NONE
from .mixers.base import Mixer
from .run import ProgressFn, RunResult, run_stream
from .stream import Stream

DEFAULT_EXPERTS = ("neural", "ngram")  # neural = the small model shipped in the package
DEFAULT_MIXER = "cm"  # the context-mixing network: the mix of score, eval and compress (docs/mixing.md)
DEFAULT_MIXERS = (NONE, DEFAULT_MIXER)  # each expert alone, then the mix


@dataclass
class Report:
    """Rows as the JSON report prints them, plus the per-stream results behind them."""

    runs: list[dict]  # {"label", "file", "tokens", "bytes", "bits", "bpb"}
    experts: list[str]
    mixers: list[str]
    results: list[RunResult] = field(default_factory=list)
    streams: list[Stream] = field(default_factory=list)  # the scored streams, in row order

    def to_dict(self) -> dict:
        from . import __version__

        return {"version": __version__, "experts": self.experts, "mixers": self.mixers, "runs": self.runs}


def build_experts(
    specs: Sequence[str],
    vocab_size: int,
    model: str | os.PathLike | None = None,
    neural: dict | None = None,
) -> list[Expert]:
    """Experts from spec strings; ``model`` puts ``neural:model=PATH`` first (unless a neural spec is given);
    ``neural``: options (``stride``, ``batch_size``, ``device``, ``window``; ``None`` = default) added to
    every neural spec that does not set them."""
    from .experts.neural import with_neural_options

    specs = with_neural_options(specs, model, neural)
    return [expert_registry_module.registry.build(spec, vocab_size=vocab_size) for spec in specs]


def check_specs(expert_specs: Sequence[str] | None, mixer_specs: Sequence[str] | None) -> None:
    """Parse every spec before any input is read, so a typo fails at once (one line, close matches)."""
    for spec in expert_specs or DEFAULT_EXPERTS:
        expert_registry_module.registry.parse(spec)
    for spec in mixer_specs or DEFAULT_MIXERS:
        if spec.strip() != NONE:
            mixer_registry_module.registry.parse(spec)


def build_mixers(specs: Sequence[str], experts: Sequence[Expert]) -> tuple[bool, list[Mixer]]:
    """``(expert_rows, mixers)``: ``none`` asks for one row per expert; the rest are built."""
    expert_specs = [e.spec for e in experts]
    expert_rows = NONE in specs
    mixers = [mixer_registry_module.registry.build(s, experts=expert_specs) for s in specs if s.strip() != NONE]
    return expert_rows, mixers


def rows_for(result: RunResult) -> list[dict]:
    return [
        {
            "label": label,
            "file": result.name,
            "tokens": result.tokens,
            "bytes": result.nbytes,
            "bits": bits,
            "bpb": bits_per_byte(bits, result.nbytes),
        }
        for label, bits in result.bits.items()
    ]


def total_rows(results: Sequence[RunResult]) -> list[dict]:
    """One ``file: "total"`` row per label: bits and bytes summed over the streams."""
    rows = []
    for label in results[0].bits:
        tokens = sum(r.tokens for r in results)
        nbytes = sum(r.nbytes for r in results)
        bits = sum(r.bits[label] for r in results)
        rows.append({"label": label, "file": "total", "tokens": tokens, "bytes": nbytes, "bits": bits,
                     "bpb": bits_per_byte(bits, nbytes)})
    return rows


def run_streams(
    streams: Iterable[Stream],
    experts: Sequence[str] | None = None,
    mixers: Sequence[str] | None = None,
    *,
    model: str | os.PathLike | None = None,
    keep_bits: bool = False,
    keep_trace: bool = False,
    chunk_size: int | None = None,
    progress: ProgressFn | None = None,
) -> Report:
    """Score each stream with fresh experts and mixers (streams are independent, as files would be coded)."""
    expert_specs = list(experts) if experts else list(DEFAULT_EXPERTS)
    mixer_specs = list(mixers) if mixers else list(DEFAULT_MIXERS)
    results: list[RunResult] = []
    scored: list[Stream] = []
    labels_experts: list[str] = []
    labels_mixers: list[str] = []
    for stream in streams:
        built = build_experts(expert_specs, stream.vocab_size, model)
        expert_rows, built_mixers = build_mixers(mixer_specs, built)
        labels_experts = [e.spec for e in built]
        labels_mixers = [m.spec for m in built_mixers]
        if keep_trace or keep_bits:  # traces and plots need the stream; otherwise let it go once scored
            scored.append(stream)
        results.append(
            run_stream(stream, built, built_mixers, expert_rows=expert_rows, chunk_size=chunk_size,
                       keep_bits=keep_bits, keep_trace=keep_trace, progress=progress)
        )
    if not results:
        raise CtxmixError("nothing to score: no input given")
    runs = [row for r in results for row in rows_for(r)]
    if len(results) > 1:
        runs += total_rows(results)
    return Report(runs, labels_experts, labels_mixers, results, scored)


def score(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    experts: Sequence[str] | None = None,
    mixers: Sequence[str] | None = None,
    *,
    model: str | os.PathLike | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    window: int | None = None,
    keep_bits: bool = False,
    keep_trace: bool = False,
    chunk_size: int | None = None,
    progress: ProgressFn | None = None,
) -> Report | None:
    """Score text files (UTF-8, tokenized losslessly; bytes are the files' real bytes).

    ``model``: a ``.ptz`` artifact, scored first as ``neural:model=PATH``; ``stride``, ``batch_size``,
    ``device``, ``window``: neural options (None = the expert's default). Under ``torchrun``, ranks other
    than 0 compute their share of the neural windows and return None."""
    from .data import load_text
    from .experts.neural import helper_rank_begin, leave_process_group, with_neural_options

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]

    neural = dict(stride=stride, batch_size=batch_size, device=device, window=window)
    specs = with_neural_options(list(experts) if experts else list(DEFAULT_EXPERTS), model, neural)
    check_specs(experts, mixers)
    streams = [load_text(path) for path in paths]
    if helper_rank_begin(specs, streams):  # torchrun rank > 0: its share of the neural windows, no report
        return None
    try:
        return run_streams(streams, specs, mixers, keep_bits=keep_bits, keep_trace=keep_trace,
                           chunk_size=chunk_size, progress=progress)
    finally:
        leave_process_group()


def evaluate(
    shards: str | Sequence[str] | None = None,
    model: str | os.PathLike | None = None,
    experts: Sequence[str] | None = None,
    mixers: Sequence[str] | None = None,
    *,
    max_tokens: int | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    window: int | None = None,
    keep_bits: bool = False,
    keep_trace: bool = False,
    chunk_size: int | None = None,
    progress: ProgressFn | None = None,
) -> Report | None:
    """Score Parameter Golf shards (concatenated in name order, bytes counted as the challenge counts
    them). With no shards, scores the sample text shipped inside the package.

    ``model``: a ``.ptz`` artifact, scored first as ``neural:model=PATH``; ``stride``, ``batch_size``,
    ``device``, ``window``: neural options (None = the expert's default). Under ``torchrun`` every rank
    computes a share of the neural windows; rank 0 gathers them, runs everything else over the whole stream
    in order and returns the report; the other ranks return None (they have nothing to report)."""
    from .data import load_shards, load_text, sample_text_path
    from .experts.neural import helper_rank_begin, leave_process_group, with_neural_options

    check_specs(experts, mixers)
    if shards is None:
        stream = load_text(sample_text_path())
        if max_tokens is not None:
            stream = stream.prefix(max_tokens + 1)
    else:
        stream = load_shards(shards, max_tokens=max_tokens)

    neural = dict(stride=stride, batch_size=batch_size, device=device, window=window)
    specs = with_neural_options(list(experts) if experts else list(DEFAULT_EXPERTS), model, neural)
    if helper_rank_begin(specs, [stream]):  # torchrun rank > 0: its share of the neural windows, no report
        return None
    try:
        return run_streams([stream], specs, mixers, keep_bits=keep_bits, keep_trace=keep_trace,
                           chunk_size=chunk_size, progress=progress)
    finally:
        leave_process_group()


def mix(trace_path: str | os.PathLike, mixers: Sequence[str] | None = None, **kwargs) -> Report:
    """Re-score linear mixers from a trace saved with ``--save-trace``, without recomputing experts."""
    from .trace import load_trace, mix_trace

    return mix_trace(load_trace(trace_path), mixers, **kwargs)
