"""The library entry points: ``score`` (text files), ``evaluate`` (shards), ``mix`` (a saved trace).

The CLI calls these and nothing else for a run; they return a ``Report`` and never print.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from .components import (
    DEFAULT_EXPERTS,
    DEFAULT_MIXERS,
    build_experts,
    build_mixers,
    check_specs,
    run_text_options,
    run_tokenizer,
)
from .errors import CtxmixError
from .report import Report, rows_for, total_rows
from .run import ProgressFn, RunResult, run_stream
from .stream import Stream

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
    tokenizer=None,
) -> Report | None:
    """Score text files (UTF-8, tokenized losslessly; bytes are the files' real bytes).

    ``model``: a ``.ptz`` artifact, scored first as ``neural:model=PATH``; ``stride``, ``batch_size``,
    ``device``, ``window``: neural options (None = the expert's default). ``tokenizer``: a SentencePiece
    ``.model`` file, a Hugging Face model directory or a tokenizer object (default: the shipped sp1024, or
    the one an expert brings: ``components.run_tokenizer``). Under ``torchrun``, ranks other than 0 compute
    their share of the neural windows and return None."""
    from .data import load_text
    from .experts.neural import helper_rank_begin, leave_process_group, with_neural_options

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]

    neural = dict(stride=stride, batch_size=batch_size, device=device, window=window)
    specs = with_neural_options(list(experts) if experts else list(DEFAULT_EXPERTS), model, neural)
    check_specs(experts, mixers)
    tok = run_tokenizer(specs, tokenizer)
    streams = [load_text(path, tok, **run_text_options(specs)) for path in paths]
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
    tokenizer=None,
    token_bytes: str | Sequence[str] | None = None,
) -> Report | None:
    """Score Parameter Golf shards (concatenated in name order, bytes counted as the challenge counts
    them). With no shards, scores the sample text shipped inside the package.

    ``model``: a ``.ptz`` artifact, scored first as ``neural:model=PATH``; ``stride``, ``batch_size``,
    ``device``, ``window``: neural options (None = the expert's default). ``tokenizer``: the SentencePiece
    model the shards were made with (its vocabulary bounds their tokens, its pieces count their bytes;
    default: the shipped sp1024); ``token_bytes``: shards of per-token byte counts (a CaseOps sidecar)
    used instead of the pieces' counts. Under ``torchrun`` every rank
    computes a share of the neural windows; rank 0 gathers them, runs everything else over the whole stream
    in order and returns the report; the other ranks return None (they have nothing to report)."""
    from .data import load_shards, load_text, sample_text_path
    from .experts.neural import helper_rank_begin, leave_process_group, with_neural_options

    check_specs(experts, mixers)
    neural = dict(stride=stride, batch_size=batch_size, device=device, window=window)
    specs = with_neural_options(list(experts) if experts else list(DEFAULT_EXPERTS), model, neural)
    tok = run_tokenizer(specs, tokenizer)
    if shards is None:
        if token_bytes is not None:
            raise CtxmixError("byte counts (--bytes) go with shards (--shard); the sample text counts its own bytes")
        stream = load_text(sample_text_path(), tok, **run_text_options(specs))
        if max_tokens is not None:
            stream = stream.prefix(max_tokens + 1)
    else:
        stream = load_shards(shards, max_tokens=max_tokens, tokenizer=tok, token_bytes=token_bytes)

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
