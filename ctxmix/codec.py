"""Entropy coding of a run: ``compress`` a text file into a ``.cmx`` file and ``decompress`` it back.

A bpb figure claims that a code of that length exists; this module builds the code. The tokens of the
file (tokenized losslessly by ``ctxmix.data.encode_text``) are range-coded with the distributions of one
mixer over some experts (or of one expert alone), and the file comes out within a stated overhead of the
bits those distributions give (``CompressResult.bits``).

Engines. When every expert and the mixer can run lanes (``lanes.py``: the neural expert's static model,
the n-gram expert's exact tables, the ``cm`` mixer), the stream is cut into L lanes coded in lockstep by
``lanes.LaneEngine``: one batched model call per step, all lanes' tokens of a step coded in lane order in
one coder stream. Otherwise, and whenever there is one lane (``--lanes 1``, or a stream too short for
two), ``run.Predictor`` codes one position at a time, with ``ctxmix.score``'s bits (within the KV cache's
float rounding): the proof that a score is real. The neural expert's lanes keep a rolling context
(``LANE_CONTEXT``) rather than score's sliding windows, run their linear layers as exact integer matmuls
(``models/integer.py``) on the CPU or the model's float step on a CUDA device, and start each segment
without the text before it, so the bits of L > 1 are the codec's own (docs/benchmarks.md measures both).

A CUDA device repeats its floats only on the same GPU kind with the same software: the file records them
(``device_record``), the coding loop runs torch's deterministic mode, and a decoder elsewhere is refused in
one line (``check_device``).

Encoder and decoder compute every distribution through the same engine, with the stepwise protocol
(distributions without a state change, then the tokens), the same batch shapes and the same torch thread
count (recorded), so they see bit-identical floats (the lanes' integer matmuls repeat on any thread count;
the float operations around them are recorded all the same). Each distribution is checked (rule 2: finite, every
p > 0, sum within 1e-9 of 1) and then quantized by one function, ``quantize`` (``quantize_rows`` for a
step's lanes: the same integers), into integer frequencies that the coder uses as they are (see
``quantize`` for why constriction does not rescale them).

Container (``.cmx``, format 3; integers little-endian; 60-odd bytes before the payload for the defaults)::

    magic        8 bytes  b"\x89CMX\r\n\x1a\n" (a high byte and CR/LF/^Z catch text-mode mangling)
    hlen         uint16   length of the header
    header       hlen     uint8 format (3), uint8 coder id (1), uint8 flags (1: the experts and mixer are
                          ``ctxmix compress``'s defaults, so no spec is stored; 2: coded by lanes; 4, with 2:
                          the lanes' neural matmuls are integer, which compress writes on the CPU; lane
                          files without it ran the float step: the first lane version's, or on CUDA;
                          8, with 2: a lane version is stored; 16: a device record is stored;
                          both below), 2 bytes
                          text layout (``TextLayout.to_bytes``), 8 bytes of the input's sha256, uint32
                          payload crc32, 8 bytes of the tokenizer's sha256; then LEB128 varints: vocab size,
                          first token (position 0), tokens (N), input bytes, payload words, lanes (L), torch
                          threads; uint8 device (0 CPU, 1 CUDA); with flag 16, uint16 length + UTF-8
                          device record (``device_record``: the GPU, torch and CUDA that a decoder must
                          match); with flag 8, varint lane version (``lanes.LANE_VERSION``: the lanes'
                          arithmetic; 1 without the flag); uint8 tokenizer kind (0: the shipped sp1024,
                          1: a SentencePiece file, 2: a Hugging Face tokenizer directory) and, unless 0,
                          uint16 length + UTF-8 path where it was; unless flag 1: uint8 expert count, per
                          expert uint16 length + UTF-8 spec, then uint16 length + UTF-8 mixer spec ("" =
                          none); per expert: uint8 has-artifact (+ 8 bytes of the sha256 of its ``model=``
                          file or ``path=`` directory)
    hcrc         uint32   crc32 of the header bytes
    payload      4*words  the range coder's uint32 words

Eight bytes of a sha256 tell the right input, model and tokenizer from a wrong one (a 2**-64 chance of a
false match); they are not a signature, and neither were 32. Formats 1 and 2 (one lane, ``run.Predictor``,
one thread, 32-byte digests, 145-205 bytes of header) are still read: format 2's header is uint8 format,
uint8 coder id, uint32 vocab size, 2 bytes layout, uint32 first token, uint64 tokens, uint64 input bytes,
32 bytes input sha256, 32 bytes tokenizer sha256, uint32 payload words, uint32 payload crc32, the expert
specs and artifact digests, the mixer spec, the tokenizer kind and path; format 1 has uint16 vocab size and
first token and no tokenizer fields (its tokenizer is the shipped sp1024). Their neural expert decodes
through the windowed KV-cache path of ``NeuralExpert.next_distribution``, as when they were written.

``decompress`` checks everything it can before decoding (magic, header crc, format version, payload length
and crc, tokenizer and artifact hashes), decodes, checks the original's length and sha256, and only then
writes the output (atomically). Nothing wrong is ever written.

A file is bounded by its own size: a token costs the coder at least ``MIN_TOKEN_BITS`` (the largest
frequency ``quantize`` can give is ``2**24 - V + 1``), so a payload of W words holds at most
``(32 W + SLACK_BITS) / MIN_TOKEN_BITS`` tokens and a header claiming more is refused before anything is
allocated. While decoding, the bits of the tokens decoded so far are counted against the same
``32 W + SLACK_BITS``: a range coder never writes fewer bits than its symbols' code length (less the
state it holds back), so a decoder past that budget is reading beyond the payload, and stops there.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import constriction  # native module; its submodules are attributes (``constriction.stream.queue``), not imports
import numpy as np

from .atomic import atomic_output, output_target
from .errors import CtxmixError
from .kernels.quantize import quantize_checked_rows
from .lanes import LANE_VERSION, MAX_LANES, LaneEngine, LanePlan, default_lanes, lanes_supported
from .spec import check_number

if TYPE_CHECKING:  # the engine imports every expert (numba); the codec needs it only once it codes
    from .run import Predictor, ProgressFn

MAGIC = b"\x89CMX\r\n\x1a\n"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
SUFFIX = ".cmx"

# constriction's default range coder (``stream.queue.RangeEncoder``) works with 32-bit words and 24-bit
# fixed-point probabilities: each symbol's frequency is an integer >= 1 and all V of them sum to 2**24.
PRECISION_BITS = 24
TOTAL_FREQ = 1 << PRECISION_BITS
# The header stores which coder and quantizer made the payload; changing either is a new id.
CODER_ID = 1
CODER_NAME = "constriction range coder (u32 words, 24-bit frequencies), floor-leaky-argmax quantizer"

MAX_VOCAB_SIZE = 1 << 20  # 24-bit frequencies: every one of V ids keeps at least 1 of 2**24

# Rule 2, as ``ctxmix check`` states it: |sum_v p(v) - 1| <= 1e-9 and p(v) > 0 for every v.
NORMALIZATION_TOL = 1e-9

PROGRESS_EVERY = 4096  # positions between progress callbacks
# Torch intra-op threads while coding. A matmul split over another number of threads may sum in another
# order, and encoder and decoder must see the same floats wherever each runs; one thread is also the
# fastest for one-token steps, which are too small to share out.
CODING_TORCH_THREADS = 1
MAX_CODING_THREADS = 64  # what a header may ask a decoder to run
# The header's engine: run.Predictor (one lane), or lanes.LaneEngine with float32 (the first lane files) or
# integer neural matmuls (what compress writes).
ENGINE_STEPWISE, ENGINE_LANES, ENGINE_LANES_INTEGER = 0, 1, 2
LANE_ENGINES = (ENGINE_LANES, ENGINE_LANES_INTEGER)
DEVICE_CPU, DEVICE_CUDA = 0, 1  # where the model computed (a CUDA-coded file needs a CUDA decoder)
# cuBLAS repeats its sums bit for bit on one stream with a fixed workspace (its documentation: "Results
# reproducibility"); torch refuses deterministic mode without this setting.
CUBLAS_WORKSPACE = ":4096:8"
_LN2 = math.log(2.0)
_U32 = struct.Struct("<I")
WORD_BITS = 32
# The coder's 64-bit state: at most two words of code length that it could hold back from the payload
# (measured: 32 W - bits >= 0.85 over 144 runs, four test files cut to 1..30,000 bytes, four experts/mixers).
SLACK_BITS = 64


def min_token_bits(vocab_size: int) -> float:
    """The fewest bits any coded token costs: -log2 of the largest frequency, (2**24 - V + 1) / 2**24."""
    return -math.log2((TOTAL_FREQ - vocab_size + 1) / TOTAL_FREQ)


def payload_bit_budget(payload_words: int) -> float:
    """The most code length (bits) a payload of ``payload_words`` words can hold."""
    return WORD_BITS * payload_words + SLACK_BITS


# ----------------------------------------------------------------------------------------------------
# Quantization: one function, shared by encoder and decoder
# ----------------------------------------------------------------------------------------------------


def check_distribution(p: np.ndarray, vocab_size: int, where: str, position: int | None = None) -> None:
    """Raise CtxmixError unless ``p`` is float64[vocab_size], finite, > 0 everywhere and sums to 1 (1e-9).

    The coder would silently rescale anything it is given; a distribution that is not normalized has no
    honest code length, so it is refused here, naming ``where`` and ``position`` ("mixer hedge at
    position 17"). This runs once per coded token, so the good case is one sum and one min.
    """
    if (isinstance(p, np.ndarray) and p.dtype == np.float64 and p.shape == (vocab_size,)
            # NaN fails both comparisons and +-inf the first, so no separate isfinite pass is needed.
            and abs(float(p.sum()) - 1.0) <= NORMALIZATION_TOL and float(p.min()) > 0.0):
        return
    if position is not None:
        where = f"{where} at position {position}"
    if not isinstance(p, np.ndarray) or p.dtype != np.float64 or p.shape != (vocab_size,):
        shape = getattr(p, "shape", None)
        dtype = getattr(p, "dtype", type(p).__name__)
        raise CtxmixError(f"{where}: distribution has shape {shape} and dtype {dtype}, expected float64[{vocab_size}]")
    total = float(p.sum())
    if not abs(total - 1.0) <= NORMALIZATION_TOL:
        raise CtxmixError(f"{where}: probabilities sum to {total!r}, expected 1 within {NORMALIZATION_TOL:g}")
    token = int(np.argmin(p))
    raise CtxmixError(f"{where}: p(token {token}) = {float(p[token])!r}, expected every probability > 0")


def quantize(p: np.ndarray) -> np.ndarray:
    """float64[V] checked distribution -> float64[V] integer-valued weights w, w >= 0, sum = 2**24 - V.

    The coder gives symbol v the frequency ``w[v] + 1`` out of 2**24 (every token stays codable), and
    does so exactly: constriction's fast categorical model (``perfect=False``) maps float weights to
    ``cdf[v] = floor(cumsum(w)[v] * scale) + v`` with ``scale = (2**24 - V) / sum(w)``; our sums are
    exact integers (< 2**24, exact in float32 and float64) and ``scale`` is exactly 1.0, so no rounding
    or rescaling happens inside the coder. Every value here is an exact integer in float64 as well, so
    encoder and decoder agree bit for bit on any machine that produced the same ``p``.

    w = floor(p * (2**24 - V)); the few units that flooring leaves over go to the most probable token
    (the first one on ties). Since ``w[v] + 1 > p(v) * (2**24 - V)``, every token's coded probability is
    at least ``p(v) * (1 - V / 2**24)``: the quantization costs at most -log2(1 - V/2**24) bits per token
    (8.8e-5 bits for V = 1024), plus nothing measurable from the left-over units.
    """
    vocab_size = p.shape[0]
    free = float(TOTAL_FREQ - vocab_size)
    w = p * free
    np.floor(w, out=w)
    w[int(np.argmax(p))] += free - float(w.sum())
    return w


def quantize_rows(p: np.ndarray, vocab_size: int, where: str, positions: np.ndarray) -> np.ndarray:
    """``quantize`` for each row of ``p`` float64[La, V] after ``check_distribution`` (stream positions
    ``positions``): the same integers (floors, then the left-over units to each row's first most probable
    token; the sums are integers below 2**24, exact in any order) from one kernel
    (``kernels/quantize.py``), or the first bad row's message."""
    if isinstance(p, np.ndarray) and p.dtype == np.float64 and p.ndim == 2 and p.shape[1] == vocab_size:
        w = np.empty_like(p)
        bad = quantize_checked_rows(np.ascontiguousarray(p), float(TOTAL_FREQ - vocab_size), NORMALIZATION_TOL, w)
        if bad < 0:
            return w
        check_distribution(p[bad], vocab_size, where, int(positions[bad]))
        # (only at the tolerance's edge can numpy's pairwise sum pass a row the kernel's running sum refused)
        raise CtxmixError(f"{where} at position {int(positions[bad])}: probabilities sum to 1 only within "
                          f"rounding of {NORMALIZATION_TOL:g}")
    shape = getattr(p, "shape", None)
    raise CtxmixError(f"{where}: lane distributions have shape {shape}, expected float64[lanes, {vocab_size}]")


# The coder's categorical family: each row of weights from ``quantize_rows`` is one symbol's model, mapped
# to frequencies exactly as ``_coder_model`` maps one row (tested: the same payload words).
_FAMILY = constriction.stream.model.Categorical(perfect=False)


def coded_probability(w: np.ndarray, token: int) -> float:
    """The probability the coder actually uses for ``token`` under weights ``w`` from ``quantize``."""
    return (float(w[token]) + 1.0) / TOTAL_FREQ


def _coder_model(w: np.ndarray):
    """The constriction model for one position (lazy: only the coded symbol's cdf entries are computed)."""
    return constriction.stream.model.Categorical(w, perfect=False, lazy=True)


@dataclass
class CodingStats:
    """What ``encode_tokens`` measured while coding."""

    tokens: int  # coded positions (1..N-1)
    bits: float  # sum of -log2 p(token) under the model's float64 distributions: the run's reported bits
    quantized_bits: float  # sum of -log2 q(token) under the quantized frequencies the coder used
    payload_words: int  # uint32 words the coder wrote


@contextmanager
def _coding_threads(threads: int = CODING_TORCH_THREADS):
    """Run the coding loop with ``threads`` torch threads (if an expert imported torch)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encode_tokens(tokens: np.ndarray, predictor: Predictor, progress: ProgressFn | None = None,
                  name: str = "", total_bytes: int = 0) -> tuple[np.ndarray, CodingStats]:
    """Range-code ``tokens[1:]`` (int64[N]); ``tokens[0]`` is context. Returns (uint32[words], stats).
    ``progress`` gets input bytes (of ``total_bytes``, estimated from the tokens coded)."""
    n_tokens = len(tokens)
    predictor.begin(n_tokens, int(tokens[0]))
    encoder = constriction.stream.queue.RangeEncoder()
    vocab_size = predictor.vocab_size
    bits = 0.0
    quantized_bits = 0.0
    for t in range(1, n_tokens):
        token = int(tokens[t])
        p = predictor.next_distribution()
        check_distribution(p, vocab_size, predictor.where, t)
        w = quantize(p)
        bits -= math.log(p[token])
        quantized_bits -= math.log(coded_probability(w, token))
        encoder.encode(token, _coder_model(w))
        predictor.observe(token)
        _progress_step(progress, f"compress {name}", t - 1, t, n_tokens - 1, total_bytes)
    words = np.asarray(encoder.get_compressed(), dtype=np.uint32)
    return words, CodingStats(n_tokens - 1, bits / _LN2, quantized_bits / _LN2, len(words))


def decode_tokens(words: np.ndarray, n_tokens: int, first_token: int, predictor: Predictor,
                  progress: ProgressFn | None = None, name: str = "", total_bytes: int = 0) -> np.ndarray:
    """Decode ``n_tokens - 1`` tokens from uint32 ``words``; returns int64[n_tokens] with position 0 set.

    Stops with a CtxmixError once the decoded tokens cost more bits than ``words`` can hold
    (``payload_bit_budget``): the decoder would be inventing tokens past the end of the payload.
    """
    tokens = np.empty(n_tokens, dtype=np.int64)
    tokens[0] = first_token
    predictor.begin(n_tokens, first_token)
    try:
        decoder = constriction.stream.queue.RangeDecoder(np.ascontiguousarray(words, dtype=np.uint32))
    except Exception as exc:  # noqa: BLE001 - constriction's failures become one line here
        raise CtxmixError(f"{name}: cannot start decoding the payload ({type(exc).__name__}: {exc})") from None
    vocab_size = predictor.vocab_size
    budget = payload_bit_budget(len(words))
    spent = 0.0  # bits of the tokens decoded so far, under the frequencies the coder used
    for t in range(1, n_tokens):
        p = predictor.next_distribution()
        check_distribution(p, vocab_size, predictor.where, t)
        w = quantize(p)
        try:
            token = int(decoder.decode(_coder_model(w)))
        except Exception as exc:  # noqa: BLE001
            raise CtxmixError(f"{name}: payload cannot be decoded at token {t} ({type(exc).__name__}: {exc})") from None
        spent -= math.log2(coded_probability(w, token))
        if spent > budget:
            raise CtxmixError(f"{name}: corrupt file: the payload ({len(words)} words) is used up at token {t} of "
                              f"{n_tokens - 1} that the header announces")
        tokens[t] = token
        predictor.observe(token)
        _progress_step(progress, f"decompress {name}", t - 1, t, n_tokens - 1, total_bytes)
    return tokens


def _progress_step(progress, task: str, done_before: int, done: int, total: int, total_bytes: int) -> None:
    """Report input bytes (estimated from the tokens coded) each time ``PROGRESS_EVERY`` more tokens are done."""
    if progress is not None and done // PROGRESS_EVERY != done_before // PROGRESS_EVERY:
        progress(task, total_bytes * done // max(total, 1), total_bytes)


def _run_lane_steps(engine: LaneEngine, plan: LanePlan, code, progress, task: str, total_bytes: int) -> None:
    """Every step of ``plan`` through ``engine.step``, for the encoder and the decoder alike: ``code(step,
    positions, lo, rows)`` codes lanes lo.. of ``step`` (``positions``: the stream positions of the step's
    lanes) and returns their tokens. Reports progress; the engine is ``finish``ed however the run ends."""
    starts = plan.starts()
    done = 0
    try:
        for step in range(plan.steps):
            n_active = plan.active(step)
            engine.step(n_active, partial(code, step, starts[:n_active] + step))
            _progress_step(progress, task, done, done + n_active, plan.coded, total_bytes)
            done += n_active
    finally:
        engine.finish()


def encode_lanes(tokens: np.ndarray, engine: LaneEngine, plan: LanePlan, progress: ProgressFn | None = None,
                 name: str = "", total_bytes: int = 0) -> tuple[np.ndarray, CodingStats]:
    """Range-code ``tokens[1:]`` lane by lane in lockstep (``lanes.LanePlan``): one coder stream, step by
    step, lanes 0..La-1 within a step. Returns (uint32[words], stats). ``progress`` gets input bytes."""
    n_tokens = len(tokens)
    engine.begin(plan, int(tokens[0]))
    encoder = constriction.stream.queue.RangeEncoder()
    vocab_size = engine.vocab_size
    bits = 0.0
    quantized_bits = 0.0

    def code(step: int, positions: np.ndarray, lo: int, p: np.ndarray) -> np.ndarray:
        """Code lanes lo..lo+len(p)-1 of ``step`` (``LaneEngine.step``)."""
        nonlocal bits, quantized_bits
        symbols = tokens[positions[lo: lo + len(p)]]
        w = quantize_rows(p, vocab_size, engine.where, positions[lo:])
        rows = np.arange(len(p))
        bits -= float(np.log(p[rows, symbols]).sum())
        quantized_bits -= float(np.log((w[rows, symbols] + 1.0) / TOTAL_FREQ).sum())
        encoder.encode(symbols.astype(np.int32), _FAMILY, w)
        return symbols

    _run_lane_steps(engine, plan, code, progress, f"compress {name}", total_bytes)
    words = np.asarray(encoder.get_compressed(), dtype=np.uint32)
    return words, CodingStats(n_tokens - 1, bits / _LN2, quantized_bits / _LN2, len(words))


def decode_lanes(words: np.ndarray, plan: LanePlan, first_token: int, engine: LaneEngine,
                 progress: ProgressFn | None = None, name: str = "", total_bytes: int = 0) -> np.ndarray:
    """Decode what ``encode_lanes`` coded; returns int64[N] with position 0 set. Stops, as
    ``decode_tokens`` does, once the decoded tokens cost more bits than ``words`` can hold."""
    n_tokens = plan.n_tokens
    tokens = np.empty(n_tokens, dtype=np.int64)
    tokens[0] = first_token
    engine.begin(plan, first_token)
    try:
        decoder = constriction.stream.queue.RangeDecoder(np.ascontiguousarray(words, dtype=np.uint32))
    except Exception as exc:  # noqa: BLE001 - constriction's failures become one line here
        raise CtxmixError(f"{name}: cannot start decoding the payload ({type(exc).__name__}: {exc})") from None
    vocab_size = engine.vocab_size
    budget = payload_bit_budget(len(words))
    spent = 0.0

    def code(step: int, positions: np.ndarray, lo: int, p: np.ndarray) -> np.ndarray:
        """Decode lanes lo..lo+len(p)-1 of ``step`` (``LaneEngine.step``) into ``tokens``."""
        nonlocal spent
        w = quantize_rows(p, vocab_size, engine.where, positions[lo:])
        try:
            symbols = np.asarray(decoder.decode(_FAMILY, w), dtype=np.int64)
        except Exception as exc:  # noqa: BLE001
            raise CtxmixError(f"{name}: payload cannot be decoded at step {step} ({type(exc).__name__}: {exc})") from None
        spent -= float(np.log2((w[np.arange(len(p)), symbols] + 1.0) / TOTAL_FREQ).sum())
        if spent > budget:
            raise CtxmixError(f"{name}: corrupt file: the payload ({len(words)} words) is used up at step {step} of "
                              f"{plan.steps} that the header announces")
        tokens[positions[lo: lo + len(p)]] = symbols
        return symbols

    _run_lane_steps(engine, plan, code, progress, f"decompress {name}", total_bytes)
    return tokens


# ----------------------------------------------------------------------------------------------------
# Identities: tokenizer and model artifacts
# ----------------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes; of a directory (a Hugging Face model), of its files' relative names
    and bytes in sorted order."""
    digest = hashlib.sha256()
    root = Path(path)
    try:
        if root.is_dir():
            for item in sorted(p for p in root.rglob("*") if p.is_file()):
                digest.update(f"{item.relative_to(root).as_posix()}\0{item.stat().st_size}\0".encode())
                _hash_into(digest, item)
            return digest.hexdigest()
        _hash_into(digest, root)
    except OSError as exc:
        raise CtxmixError(f"cannot read {path}: {exc.strerror}") from None
    return digest.hexdigest()


def _hash_into(digest, path: Path) -> None:
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


ARTIFACT_KEYS = ("model", "path")  # spec options that name a model file (neural) or directory (hf)


def artifact_paths(expert_specs: Sequence[str]) -> dict[str, str]:
    """``{spec: PATH}`` for each expert spec with a ``model=PATH`` (the neural expert's artifact) or
    ``path=DIR`` option (the hf expert's model directory)."""
    return {spec: path for spec, (_key, path) in _artifact_options(expert_specs).items()}


def _artifact_options(expert_specs: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``{spec: (key, PATH)}``: as ``artifact_paths``, with the option's name."""
    from .spec import split_spec

    found = {}
    for spec in expert_specs:
        _name, items = split_spec(spec)
        for item in items:
            key, sep, value = item.partition("=")
            if sep and key.strip() in ARTIFACT_KEYS:
                from .experts.neural import resolve_model_path

                value = value.strip()
                found[spec] = (key.strip(), resolve_model_path(value) if key.strip() == "model" else value)
    return found


def expert_artifact(expert) -> str | None:
    """The model file an expert computes with: its ``artifact_path`` attribute (set by experts that load
    one, including a default model that their spec does not name), else its spec's ``model=PATH``."""
    path = getattr(expert, "artifact_path", None)
    if path is not None:
        return os.fspath(path)
    return artifact_paths([expert.spec]).get(expert.spec)


TOKENIZER_SHIPPED, TOKENIZER_SENTENCEPIECE, TOKENIZER_HF = 0, 1, 2  # the header's tokenizer kinds


def _tokenizer_record(tok) -> tuple[int, str]:
    """(kind, path) a header records for the tokenizer ``tok``."""
    if getattr(tok, "shipped", False):
        return TOKENIZER_SHIPPED, ""
    return (TOKENIZER_HF if tok.kind == "hf" else TOKENIZER_SENTENCEPIECE), os.fspath(tok.path)


# ----------------------------------------------------------------------------------------------------
# Container
# ----------------------------------------------------------------------------------------------------

# Fixed part of the header: format, coder, vocab_size, layout, first_token, tokens, input_bytes,
# input_sha256, tokenizer_sha256, payload_words, payload_crc32.
_FIXED = struct.Struct("<BBI2sIQQ32s32sII")  # format 2
_FIXED_V1 = struct.Struct("<BBH2sHQQ32s32sII")  # format 1: uint16 vocab size and first token
# Format 3: format, coder, flags, layout, input sha256 prefix, payload crc32, tokenizer sha256 prefix; then
# the _VARINT_FIELDS as LEB128 varints.
_HEAD_V3 = struct.Struct("<BBB2s8sI8s")
_VARINT_FIELDS = ("vocab_size", "first_token", "tokens", "input_bytes", "payload_words", "lanes", "threads")
VARINT_MAX_BYTES = 10  # a uint64
FLAG_DEFAULT_SPECS = 1  # the experts and mixer are ``ctxmix compress``'s defaults: no spec strings stored
FLAG_LANES = 2  # coded by lanes.LaneEngine (else run.Predictor, one lane)
FLAG_INTEGER = 4  # with FLAG_LANES: the neural step's matmuls were integer (ENGINE_LANES_INTEGER)
FLAG_LANE_VERSION = 8  # with FLAG_LANES: a varint lane version follows the device byte (and its record)
FLAG_DEVICE_RECORD = 16  # the CUDA device and software the floats came from follow the device byte
DIGEST_BYTES = 8  # sha256 prefixes stored by format 3
_U8, _U16 = struct.Struct("<B"), struct.Struct("<H")
SPEC_MAX_BYTES = 0xFFFF  # specs are stored with a uint16 length


def _pack_header(header: dict) -> bytes:
    """The header dict (as ``read_container`` returns it) -> bytes of the current format; see the module docstring."""
    default_specs = _default_specs()
    is_default = (list(header["experts"]), header["mixer"]) == default_specs
    flags = ((FLAG_DEFAULT_SPECS if is_default else 0) | (FLAG_LANES if header["engine"] in LANE_ENGINES else 0)
             | (FLAG_INTEGER if header["engine"] == ENGINE_LANES_INTEGER else 0)
             | (FLAG_DEVICE_RECORD if header.get("device_record") else 0)
             | (FLAG_LANE_VERSION if header.get("lane_version", 1) > 1 else 0))
    parts = [_HEAD_V3.pack(header["format"], header["coder"], flags, header["layout"],
                           _digest_prefix(header["input_sha256"]), header["payload_crc32"],
                           _digest_prefix(header["tokenizer_sha256"]))]
    parts += [_varint(header[key]) for key in _VARINT_FIELDS]
    parts.append(_U8.pack(header["device"]))
    if header.get("device_record"):
        parts.append(_pack_str(header["device_record"]))
    if header.get("lane_version", 1) > 1:
        parts.append(_varint(header["lane_version"]))
    parts.append(_U8.pack(header["tokenizer_kind"]))
    if header["tokenizer_kind"] != TOKENIZER_SHIPPED:
        parts.append(_pack_str(header["tokenizer_path"]))
    if len(header["experts"]) > 0xFF:
        raise CtxmixError(f"{len(header['experts'])} experts: a .cmx file holds at most 255")
    if not is_default:
        parts.append(_U8.pack(len(header["experts"])))
        parts += [_pack_str(spec) for spec in header["experts"]]
        parts.append(_pack_str(header["mixer"] or ""))
    for spec in header["experts"]:
        digest = header["artifacts"].get(spec)
        parts.append(_U8.pack(digest is not None) + (_digest_prefix(digest) if digest is not None else b""))
    return b"".join(parts)


def _pack_header_v2(header: dict) -> bytes:
    """Format 2's layout (read by ``_unpack_header``; written only by tests that build old files)."""
    parts = [_FIXED.pack(
        header["format"], header["coder"], header["vocab_size"], header["layout"], header["first_token"],
        header["tokens"], header["input_bytes"], bytes.fromhex(header["input_sha256"]),
        bytes.fromhex(header["tokenizer_sha256"]), header["payload_words"], header["payload_crc32"],
    )]
    parts.append(_U8.pack(len(header["experts"])))
    for spec in header["experts"]:
        parts.append(_pack_str(spec))
        digest = header["artifacts"].get(spec)
        parts.append(_U8.pack(digest is not None) + (bytes.fromhex(digest) if digest is not None else b""))
    parts.append(_pack_str(header["mixer"] or ""))
    parts.append(_U8.pack(header["tokenizer_kind"]) + _pack_str(header["tokenizer_path"]))
    return b"".join(parts)


def _default_specs() -> tuple[list[str], str]:
    """The canonical specs of ``ctxmix compress``'s default experts and mixer (one header flag stands for them)."""
    from .components import DEFAULT_EXPERTS, DEFAULT_MIXER, experts, mixers
    from .spec import canonical_spec

    expert_specs = []
    for spec in DEFAULT_EXPERTS:
        cls, options = experts.parse(spec)
        expert_specs.append(canonical_spec(cls.registry_name, options))
    cls, options = mixers.parse(DEFAULT_MIXER)
    return expert_specs, canonical_spec(cls.registry_name, options)


def _digest_prefix(hex_digest: str) -> bytes:
    """The first DIGEST_BYTES of a sha256 (hex, whole or already cut): what format 3 stores. 64 bits tell a
    wrong file, model or tokenizer from the right one; they are no defence against a crafted collision, and
    the file is not a signature."""
    raw = bytes.fromhex(hex_digest)[:DIGEST_BYTES]
    if len(raw) != DIGEST_BYTES:
        raise CtxmixError(f"sha256 {hex_digest!r}: expected at least {DIGEST_BYTES} bytes")
    return raw


def same_digest(full_hex: str, recorded_hex: str) -> bool:
    """Does a computed sha256 (hex) match what a header recorded (a whole digest, or format 3's prefix)?"""
    return len(recorded_hex) >= 2 * DIGEST_BYTES and full_hex.startswith(recorded_hex)


def _varint(value: int) -> bytes:
    """LEB128: 7 bits a byte, low first, the high bit set on every byte but the last."""
    if value < 0:
        raise CtxmixError(f"header value {value} is negative")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _pack_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > SPEC_MAX_BYTES:
        raise CtxmixError(f"spec {text[:40]!r}...: longer than {SPEC_MAX_BYTES} bytes")
    return _U16.pack(len(raw)) + raw


class _Reader:
    """Reads header fields in order; running past the end is a corrupt header, said in one line."""

    def __init__(self, path, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise CtxmixError(f"{self.path}: corrupt header (ends inside a field)")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def unpack(self, fmt: struct.Struct) -> tuple:
        return fmt.unpack(self.take(fmt.size))

    def varint(self) -> int:
        value = 0
        for i in range(VARINT_MAX_BYTES):
            (byte,) = self.take(1)
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                return value
        raise CtxmixError(f"{self.path}: corrupt header (a number longer than {VARINT_MAX_BYTES} bytes)")

    def text(self) -> str:
        (n,) = self.unpack(_U16)
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise CtxmixError(f"{self.path}: corrupt header (a spec is not UTF-8)") from None


def _unpack_header(path, data: bytes) -> dict:
    if data[:1] == bytes([FORMAT_VERSION]):
        return _unpack_header_v3(path, data)
    reader = _Reader(path, data)
    (fmt, coder, vocab_size, layout, first_token, tokens, input_bytes, input_sha, tokenizer_sha, payload_words,
     payload_crc) = reader.unpack(_FIXED if data[:1] != b"\x01" else _FIXED_V1)
    header = {
        "format": fmt, "coder": coder, "vocab_size": vocab_size, "layout": layout, "first_token": first_token,
        "tokens": tokens, "input_bytes": input_bytes, "input_sha256": input_sha.hex(),
        "tokenizer_sha256": tokenizer_sha.hex(), "payload_words": payload_words, "payload_crc32": payload_crc,
        "experts": [], "artifacts": {},
        # formats 1 and 2 coded one lane with run.Predictor, one torch thread, on the CPU
        "lanes": 1, "engine": ENGINE_STEPWISE, "threads": CODING_TORCH_THREADS, "device": DEVICE_CPU, "device_record": "",
        "lane_version": 1,
    }
    (n_experts,) = reader.unpack(_U8)
    for _ in range(n_experts):
        spec = reader.text()
        (has_artifact,) = reader.unpack(_U8)
        header["experts"].append(spec)
        if has_artifact:
            header["artifacts"][spec] = reader.take(32).hex()
    header["mixer"] = reader.text() or None
    header["tokenizer_kind"], header["tokenizer_path"] = TOKENIZER_SHIPPED, ""
    if fmt >= 2:
        (header["tokenizer_kind"],) = reader.unpack(_U8)
        header["tokenizer_path"] = reader.text()
        if header["tokenizer_kind"] not in (TOKENIZER_SHIPPED, TOKENIZER_SENTENCEPIECE, TOKENIZER_HF):
            raise CtxmixError(f"{path}: corrupt header (tokenizer kind {header['tokenizer_kind']})")
    if reader.pos != len(data):
        raise CtxmixError(f"{path}: corrupt header ({len(data) - reader.pos} unread bytes)")
    return header


def _unpack_header_v3(path, data: bytes) -> dict:
    reader = _Reader(path, data)
    fmt, coder, flags, layout, input_sha, payload_crc, tokenizer_sha = reader.unpack(_HEAD_V3)
    if (flags & ~(FLAG_DEFAULT_SPECS | FLAG_LANES | FLAG_INTEGER | FLAG_DEVICE_RECORD | FLAG_LANE_VERSION)
            or (flags & (FLAG_INTEGER | FLAG_LANE_VERSION) and not flags & FLAG_LANES)):
        raise CtxmixError(f"{path}: corrupt header (unknown flags {flags:#x})")
    engine = ENGINE_STEPWISE
    if flags & FLAG_LANES:
        engine = ENGINE_LANES_INTEGER if flags & FLAG_INTEGER else ENGINE_LANES
    header = {"format": fmt, "coder": coder, "layout": layout, "input_sha256": input_sha.hex(),
              "payload_crc32": payload_crc, "tokenizer_sha256": tokenizer_sha.hex(), "engine": engine}
    for key in _VARINT_FIELDS:
        header[key] = reader.varint()
    (header["device"],) = reader.unpack(_U8)
    header["device_record"] = reader.text() if flags & FLAG_DEVICE_RECORD else ""
    header["lane_version"] = reader.varint() if flags & FLAG_LANE_VERSION else 1
    (header["tokenizer_kind"],) = reader.unpack(_U8)
    if header["tokenizer_kind"] not in (TOKENIZER_SHIPPED, TOKENIZER_SENTENCEPIECE, TOKENIZER_HF):
        raise CtxmixError(f"{path}: corrupt header (tokenizer kind {header['tokenizer_kind']})")
    header["tokenizer_path"] = reader.text() if header["tokenizer_kind"] != TOKENIZER_SHIPPED else ""
    if flags & FLAG_DEFAULT_SPECS:
        header["experts"], header["mixer"] = _default_specs()
    else:
        (n_experts,) = reader.unpack(_U8)
        header["experts"] = [reader.text() for _ in range(n_experts)]
        header["mixer"] = reader.text() or None
    header["artifacts"] = {}
    for spec in header["experts"]:
        (has_artifact,) = reader.unpack(_U8)
        if has_artifact:
            header["artifacts"][spec] = reader.take(DIGEST_BYTES).hex()
    if reader.pos != len(data):
        raise CtxmixError(f"{path}: corrupt header ({len(data) - reader.pos} unread bytes)")
    return header


def _container_parts(header: dict, words: np.ndarray) -> Iterator[bytes]:
    """The file's bytes in order: magic and header length, header, header crc, payload."""
    header_bytes = _pack_header(header)
    yield MAGIC + _U16.pack(len(header_bytes))
    yield header_bytes
    yield _U32.pack(zlib.crc32(header_bytes))
    yield words.astype("<u4").tobytes()


def _header_size(header: dict) -> int:
    return len(MAGIC) + _U16.size + len(_pack_header(header)) + _U32.size


def read_container(path: str | os.PathLike) -> tuple[dict, np.ndarray]:
    """Parse and check a ``.cmx`` file: ``(header dict, uint32[words])``, or one CtxmixError line."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CtxmixError(f"cannot read {path}: {exc.strerror}") from None
    start = len(MAGIC) + _U16.size
    if len(data) < start or data[: len(MAGIC)] != MAGIC:
        raise CtxmixError(f"{path}: not a ctxmix compressed file (bad magic bytes)")
    (header_len,) = _U16.unpack_from(data, len(MAGIC))
    if start + header_len + _U32.size > len(data):
        raise CtxmixError(f"{path}: file truncated inside the header ({len(data)} bytes)")
    header_bytes = data[start : start + header_len]
    (header_crc,) = _U32.unpack_from(data, start + header_len)
    if zlib.crc32(header_bytes) != header_crc:
        raise CtxmixError(f"{path}: corrupt header (crc32 mismatch)")
    if header_bytes[:1] not in [bytes([v]) for v in READABLE_VERSIONS]:
        raise CtxmixError(f"{path}: format version {header_bytes[0]}, this ctxmix reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}")
    header = _unpack_header(path, header_bytes)
    _check_header(path, header)
    payload = data[start + header_len + _U32.size :]
    expected = 4 * header["payload_words"]
    if len(payload) != expected:
        what = "truncated" if len(payload) < expected else "followed by extra bytes"
        raise CtxmixError(f"{path}: file {what}: payload is {len(payload)} bytes, the header says {expected}")
    if zlib.crc32(payload) != header["payload_crc32"]:
        raise CtxmixError(f"{path}: corrupt payload (crc32 mismatch)")
    return header, np.frombuffer(payload, dtype="<u4").astype(np.uint32)


def _check_header(path, header: dict) -> None:
    """The header's own consistency and its sizes against the payload, before anything is allocated."""
    if header["coder"] != CODER_ID:
        raise CtxmixError(f"{path}: coder id {header['coder']}, this ctxmix codes with {CODER_ID} ({CODER_NAME})")
    if not header["experts"]:
        raise CtxmixError(f"{path}: corrupt header (no expert)")
    where = f"{path}: corrupt header"
    check_number("vocab_size", header["vocab_size"], where, 2, MAX_VOCAB_SIZE)
    check_number("first_token", header["first_token"], where, 0, header["vocab_size"] - 1)
    # Text mode gives at most two tokens per byte (a byte, and a zero-byte space inserted after a line
    # break) plus the BOS, and the coded tokens must fit the payload (module docstring).
    most = int(payload_bit_budget(header["payload_words"]) / min_token_bits(header["vocab_size"])) + 1
    # An empty input (one token, the BOS) is refused by compress now, but earlier versions wrote such files.
    check_number("input_bytes", header["input_bytes"], where, 0, 1 << 62)  # any length an int64 holds
    check_number("tokens", header["tokens"], where, 1, min(2 * header["input_bytes"] + 1, most))
    check_number("lanes", header["lanes"], where, 1, min(MAX_LANES, max(1, header["tokens"] - 1)))
    check_number("threads", header["threads"], where, 1, MAX_CODING_THREADS)
    check_number("device", header["device"], where, DEVICE_CPU, DEVICE_CUDA)
    if header["device"] == DEVICE_CPU and header.get("device_record"):
        raise CtxmixError(f"{where} (a CUDA device recorded for a file coded on the CPU)")
    if header["device"] == DEVICE_CUDA and header["engine"] == ENGINE_LANES_INTEGER:
        raise CtxmixError(f"{where} (integer lanes, which run on the CPU only, on a CUDA device)")
    if not 1 <= header["lane_version"] <= LANE_VERSION:
        raise CtxmixError(f"{path}: coded by lanes of version {header['lane_version']}; this ctxmix codes lanes of "
                          f"versions 1..{LANE_VERSION} (a newer ctxmix made it, or the header is corrupt)")
    if header["lanes"] > 1 and header["engine"] not in LANE_ENGINES:
        raise CtxmixError(f"{where} ({header['lanes']} lanes, but coded on one lane)")


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


@dataclass
class CompressResult:
    """One compressed file. ``bits`` is what ``ctxmix.score`` reports for the same experts and mixer."""

    file: str  # the input
    out: str  # the .cmx written
    experts: list[str]
    mixer: str | None
    input_bytes: int  # the original's length
    tokens: int  # coded positions
    bits: float  # model code length: sum of -log2 p(token), float64 distributions
    quantized_bits: float  # code length under the quantized frequencies (what an ideal coder would write)
    payload_bytes: int  # the range coder's output
    header_bytes: int  # magic, header and its crc
    file_bytes: int  # header + payload: the .cmx size
    bpb: float  # 8 * file_bytes / input_bytes: the real, achieved bits per byte
    model_bpb: float  # bits / input_bytes: the figure ``score`` prints (one lane; lanes split the context)
    seconds: float
    lanes: int = 1  # segments coded in lockstep (lanes.LanePlan)
    threads: int = CODING_TORCH_THREADS  # torch threads of the coding loop

    @property
    def overhead(self) -> float:
        """Payload bits beyond the model's bits, as a fraction of them (coder + quantization)."""
        return (8 * self.payload_bytes - self.bits) / self.bits if self.bits > 0 else 0.0

    def to_dict(self) -> dict:
        """JSON-ready: the fields plus ``overhead`` and ``quantization_overhead``; a non-finite float -> None."""
        out = asdict(self)
        out["overhead"] = self.overhead
        out["quantization_overhead"] = (self.quantized_bits - self.bits) / self.bits if self.bits > 0 else 0.0
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}


@dataclass
class DecompressResult:
    file: str  # the .cmx read
    out: str  # the original, written
    experts: list[str]
    mixer: str | None
    file_bytes: int
    output_bytes: int
    tokens: int
    seconds: float
    lanes: int = 1
    threads: int = CODING_TORCH_THREADS

    def to_dict(self) -> dict:
        return asdict(self)


def _resolve_specs(experts: Sequence[str] | None, mixers: Sequence[str] | str | None) -> tuple[list[str], str | None]:
    """(expert specs, the one mixer spec or None for ``none``); ``Predictor`` checks the expert count."""
    from .components import DEFAULT_EXPERTS, DEFAULT_MIXER, NONE

    expert_specs = list(experts) if experts else list(DEFAULT_EXPERTS)
    if isinstance(mixers, str):
        mixers = [mixers]
    mixer_specs = [m.strip() for m in (mixers or []) if m.strip()] or [DEFAULT_MIXER]
    if len(mixer_specs) > 1:
        raise CtxmixError(f"compress codes with one mixer, {len(mixer_specs)} were given ({', '.join(mixer_specs)})")
    return expert_specs, (None if mixer_specs[0] == NONE else mixer_specs[0])


def _build(expert_specs: Sequence[str], mixer_spec: str | None, vocab_size: int, model=None) -> Predictor:
    from .components import build_experts
    from .components import mixers as mixer_registry
    from .run import Predictor

    experts = build_experts(expert_specs, vocab_size, model)
    for expert in experts:
        reason = expert.coding_refusal()
        if reason is not None:
            raise CtxmixError(f"expert {expert.spec} cannot be used for coding: {reason}")
    mixer = mixer_registry.build(mixer_spec, experts=[e.spec for e in experts]) if mixer_spec is not None else None
    return Predictor(experts, mixer, vocab_size)


def _lane_engine(predictor: Predictor, engine: int, threads: int, version: int = LANE_VERSION) -> LaneEngine:
    return LaneEngine(predictor.experts, predictor.mixer, predictor.vocab_size, integer=engine == ENGINE_LANES_INTEGER,
                      threads=threads, version=version)


def _torch_threads(engine: int, threads: int) -> int:
    """Torch's threads while coding: the integer lane engine spends ``threads`` on groups of lanes and keeps
    torch on one (two OpenMP threads beside the groups made lcet10.txt 1.4x slower); the others give torch all."""
    return 1 if engine == ENGINE_LANES_INTEGER else threads


def default_output(path: str | os.PathLike, *, compressing: bool) -> Path:
    """``FILE`` -> ``FILE.cmx``; ``FILE.cmx`` -> ``FILE`` (other names get ``.out``)."""
    path = Path(path)
    if compressing:
        return path.with_name(path.name + SUFFIX)
    if path.name.endswith(SUFFIX) and len(path.name) > len(SUFFIX):
        return path.with_name(path.name[: -len(SUFFIX)])
    return path.with_name(path.name + ".out")


def _output_path(path, out, *, compressing: bool) -> Path:
    if out is not None:
        return Path(out)
    target = default_output(path, compressing=compressing)
    if target.exists():
        # Only an explicit -o replaces an existing file.
        raise CtxmixError(f"{target} already exists; pass -o OUT to choose the output (or -o {target} to replace it)")
    return target


def _layout_from_header(path, raw: bytes):
    from .data import TextLayout

    try:
        return TextLayout.from_bytes(raw)
    except CtxmixError as exc:
        raise CtxmixError(f"{path}: corrupt header ({exc})") from None


def compress(
    path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    experts: Sequence[str] | None = None,
    mixers: Sequence[str] | str | None = None,
    model: str | os.PathLike | None = None,
    tokenizer=None,
    progress: ProgressFn | None = None,
    lanes: int | None = None,
    threads: int | None = None,
) -> CompressResult:
    """Compress the text file ``path`` into ``out`` (default ``path.cmx``; an existing default is refused).

    ``experts``: expert specs (default ``components.DEFAULT_EXPERTS``); ``mixers``: one mixer spec (default
    ``components.DEFAULT_MIXER``), or ``none`` with exactly one expert; ``model``: a ``.ptz`` artifact, which adds
    the neural expert first (as ``score`` does); ``tokenizer``: as ``score``'s (its sha256 and path are
    recorded, so ``decompress`` finds it again); ``lanes``: segments coded in lockstep (default
    ``lanes.default_lanes`` of the length; 1 whenever an expert or the mixer cannot run lanes);
    ``threads``: threads of the coding loop (default ``CODING_TORCH_THREADS``; the integer lane engine's
    groups of lanes, otherwise torch's), which the decoder must use too. Both are recorded in the file.
    """
    from .components import run_text_options, run_tokenizer

    started = time.perf_counter()
    if lanes is not None:
        check_number("lanes", lanes, "compress", 1, MAX_LANES)
    threads = CODING_TORCH_THREADS if threads is None else threads
    check_number("threads", threads, "compress", 1, MAX_CODING_THREADS)
    expert_specs, mixer_spec = _resolve_specs(experts, mixers)
    target = _output_path(path, out, compressing=True)
    tok = run_tokenizer(expert_specs, tokenizer)
    inputs = [path, *[p for p in (model, tok.path) if p is not None], *artifact_paths(expert_specs).values()]
    output_target(target, inputs)  # a device or the input itself is refused before any coding
    try:
        original = Path(path).read_bytes()
    except OSError as exc:
        raise CtxmixError(f"cannot read {path}: {exc.strerror}") from None
    if not original:
        raise CtxmixError(f"{path}: file is empty, nothing to compress")
    text_options = run_text_options(expert_specs + (["neural"] if model is not None else []))
    encoded = tok.encode_text(original, where=str(path), **text_options)  # refuses a file it cannot give back
    tokens = np.ascontiguousarray(encoded.tokens, dtype=np.int64)
    vocab_size = tok.vocab_size
    tokenizer_kind, tokenizer_path = _tokenizer_record(tok)
    predictor = _build(expert_specs, mixer_spec, vocab_size, model)
    expert_specs = [e.spec for e in predictor.experts]
    mixer_spec = predictor.mixer.spec if predictor.mixer is not None else None
    artifacts = {e.spec: sha256_file(a) for e in predictor.experts if (a := expert_artifact(e)) is not None}
    inputs += [a for e in predictor.experts if (a := expert_artifact(e)) is not None]

    # One lane is coded by run.Predictor, whose bits are score's (the proof that a score is real); the lane
    # engine's rolling neural context only pays where it batches.
    # On a CUDA device the lanes run the float step there (the integer step's kernels are the CPU's).
    plan = LanePlan.make(len(tokens), lanes or default_lanes(len(tokens)))
    device = _device_kind(predictor.experts)
    lanes_ok = plan.lanes > 1 and lanes_supported(predictor.experts, predictor.mixer)
    engine = ENGINE_STEPWISE if not lanes_ok else ENGINE_LANES_INTEGER if device == DEVICE_CPU else ENGINE_LANES
    if engine == ENGINE_STEPWISE:
        plan = LanePlan.make(len(tokens), 1)
    with _coding_threads(_torch_threads(engine, threads)), _deterministic_cuda(device):
        if engine in LANE_ENGINES:
            words, stats = encode_lanes(tokens, _lane_engine(predictor, engine, threads), plan, progress, name=str(path),
                                        total_bytes=len(original))
        else:
            words, stats = encode_tokens(tokens, predictor, progress, name=str(path), total_bytes=len(original))
    header = {
        "format": FORMAT_VERSION,
        "coder": CODER_ID,
        "experts": expert_specs,
        "mixer": mixer_spec,
        "artifacts": artifacts,
        "tokenizer_sha256": tok.sha256,
        "tokenizer_kind": tokenizer_kind,
        "tokenizer_path": tokenizer_path,
        "vocab_size": vocab_size,
        "layout": encoded.layout.to_bytes(),
        "input_bytes": len(original),
        "input_sha256": hashlib.sha256(original).hexdigest(),
        "tokens": len(tokens),
        "first_token": int(tokens[0]),
        "payload_words": stats.payload_words,
        "payload_crc32": zlib.crc32(words.astype("<u4").tobytes()),
        "lanes": plan.lanes,
        "engine": engine,
        "threads": threads,
        "device": device,
        "device_record": device_record(predictor.experts),
        "lane_version": LANE_VERSION if engine in LANE_ENGINES else 1,
    }
    with atomic_output(target, inputs) as handle:
        for part in _container_parts(header, words):
            handle.write(part)
    header_bytes = _header_size(header)
    payload_bytes = 4 * stats.payload_words
    file_bytes = header_bytes + payload_bytes
    n = len(original)
    return CompressResult(
        file=str(path), out=str(target), experts=expert_specs, mixer=mixer_spec, input_bytes=n,
        tokens=stats.tokens, bits=stats.bits, quantized_bits=stats.quantized_bits, payload_bytes=payload_bytes,
        header_bytes=header_bytes, file_bytes=file_bytes, bpb=8.0 * file_bytes / n, model_bpb=stats.bits / n,
        seconds=time.perf_counter() - started, lanes=plan.lanes, threads=threads,
    )


def decompress(
    path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    model: str | os.PathLike | None = None,
    tokenizer=None,
    progress: ProgressFn | None = None,
    threads: int | None = None,
) -> DecompressResult:
    """Decompress the ``.cmx`` file ``path`` into ``out`` (default: ``path`` without ``.cmx``).

    Refuses (one CtxmixError line, nothing written) a damaged file, a tokenizer other than the one the
    file was made with, and a missing or different model artifact. ``model`` points to the artifact (or hf
    model directory) when it no longer sits at the path recorded in the file, ``tokenizer`` to the
    tokenizer likewise; their sha256 must still match. The coding loop runs the torch threads the file
    records; ``threads``, when given, must equal them (another count could change the floats).
    """
    started = time.perf_counter()
    header, words = read_container(path)
    if threads is not None and threads != header["threads"]:
        raise CtxmixError(f"{path}: coded with {header['threads']} torch thread(s); decoding with {threads} could "
                          "change the floats, so it is refused (leave the thread count to the file)")
    target = _output_path(path, out, compressing=False)
    inputs = [path, *[p for p in (model, tokenizer) if p is not None], *artifact_paths(header["experts"]).values()]
    output_target(target, inputs)  # a device or the input itself is refused before any decoding
    expert_specs, artifact_sha256 = _relocate_artifacts(path, header, model)
    tok = _find_tokenizer(path, header, expert_specs, tokenizer)
    vocab_size = tok.vocab_size
    if tok.path is not None:
        inputs.append(tok.path)
    layout = _layout_from_header(path, header["layout"])
    predictor = _build(expert_specs, header["mixer"], vocab_size)
    for expert, expected in zip(predictor.experts, artifact_sha256):
        if expected is not None:  # also covers a default model that the spec does not name
            _check_artifact(path, expert_artifact(expert), expected)
            inputs.append(expert_artifact(expert))

    device = _device_kind(predictor.experts)
    check_device(path, header, device, device_record(predictor.experts))
    with _coding_threads(_torch_threads(header["engine"], header["threads"])), _deterministic_cuda(device):
        if header["engine"] in LANE_ENGINES:
            if not lanes_supported(predictor.experts, predictor.mixer):
                raise CtxmixError(f"{path}: corrupt header (coded with lanes, which its experts cannot run)")
            plan = LanePlan.make(header["tokens"], header["lanes"])
            tokens = decode_lanes(words, plan, header["first_token"],
                                  _lane_engine(predictor, header["engine"], header["threads"], header["lane_version"]),
                                  progress, name=str(path), total_bytes=header["input_bytes"])
        else:
            tokens = decode_tokens(words, header["tokens"], header["first_token"], predictor, progress, name=str(path),
                                   total_bytes=header["input_bytes"])
    try:
        restored = tok.decode_text(tokens, layout)
    except CtxmixError as exc:
        raise CtxmixError(f"{path}: decoded tokens do not form valid text ({exc})") from None
    if len(restored) != header["input_bytes"] or not same_digest(hashlib.sha256(restored).hexdigest(), header["input_sha256"]):
        raise CtxmixError(f"{path}: decoded output fails its checksum ({len(restored)} bytes, expected "
                          f"{header['input_bytes']}): the experts' probabilities differ from the encoder's")
    with atomic_output(target, inputs) as handle:
        handle.write(restored)
    return DecompressResult(
        file=str(path), out=str(target), experts=list(header["experts"]), mixer=header["mixer"],
        file_bytes=Path(path).stat().st_size, output_bytes=len(restored), tokens=header["tokens"] - 1,
        seconds=time.perf_counter() - started, lanes=header["lanes"], threads=header["threads"],
    )


def _cuda_device(experts):
    """The torch device of the first expert that computes on CUDA (the neural expert's ``device``), or None."""
    for expert in experts:
        device = getattr(expert, "device", None)
        if getattr(device, "type", None) == "cuda":
            return device
    return None


def _device_kind(experts) -> int:
    return DEVICE_CPU if _cuda_device(experts) is None else DEVICE_CUDA


def device_record(experts) -> str:
    """What a decoder must match to repeat a CUDA model's floats: the GPU (name, compute capability,
    multiprocessors: cuBLAS picks its kernels by these) and the software (torch, which ships its cuBLAS, and
    CUDA's version). "" when every expert computes on the CPU, whose lanes' matmuls are integer."""
    device = _cuda_device(experts)
    if device is None:
        return ""
    import torch

    props = torch.cuda.get_device_properties(device)
    return (f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs; "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}")


def check_device(path, header: dict, device: int, record: str) -> None:
    """Refuse, in one line, to decode where the floats would not repeat: on another kind of device than the
    encoder's, or on a CUDA device or software other than the one recorded."""
    names = {DEVICE_CPU: "the CPU", DEVICE_CUDA: "a CUDA device"}
    if device != header["device"]:
        raise CtxmixError(f"{path}: the model computed on {names[header['device']]} when coding and would compute "
                          f"on {names[device]} here, which does not repeat its floats"
                          + (" (hide the GPU with CUDA_VISIBLE_DEVICES= to decode on the CPU)" if device == DEVICE_CUDA else ""))
    recorded = header.get("device_record", "")
    if recorded and recorded != record:
        raise CtxmixError(f"{path}: coded on {recorded}; this machine is {record}, which need not repeat "
                          "its floats (decode it on the device and software it was coded with)")


@contextmanager
def _deterministic_cuda(device: int):
    """While coding on a CUDA device: torch's deterministic mode (an operation that could differ from run to
    run raises instead) and cuBLAS's fixed workspace, which that mode needs."""
    if device != DEVICE_CUDA:
        yield
        return
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _find_tokenizer(path, header: dict, expert_specs: list[str], tokenizer):
    """The tokenizer the file was made with: ``tokenizer`` when given (it moved), else the one an expert
    brings (an hf model's, found through its relocated directory), else the one recorded in the header;
    refused in one line when it is missing or its sha256 or vocabulary differ from the header's."""
    from .components import run_tokenizer
    from .data.tokenizer import resolve_tokenizer

    recorded = header["tokenizer_path"]
    if tokenizer is None and header["tokenizer_kind"] != TOKENIZER_SHIPPED:
        own = run_tokenizer(expert_specs)
        if same_digest(own.sha256, header["tokenizer_sha256"]) or not recorded:
            tokenizer = own
        elif not Path(recorded).exists():
            raise CtxmixError(f"{path}: needs tokenizer {recorded} (sha256 {header['tokenizer_sha256'][:12]}...), "
                              "which is missing; pass --tokenizer PATH")
        else:
            tokenizer = recorded
    tok = run_tokenizer(expert_specs, resolve_tokenizer(tokenizer))
    if not same_digest(tok.sha256, header["tokenizer_sha256"]) or tok.vocab_size != header["vocab_size"]:
        raise CtxmixError(f"{path}: made with tokenizer sha256 {header['tokenizer_sha256'][:12]}... "
                          f"(vocab {header['vocab_size']}), {tok.name} has {tok.sha256[:12]}... (vocab {tok.vocab_size})")
    return tok


def _relocate_artifacts(path, header: dict, model) -> tuple[list[str], list[str | None]]:
    """(expert specs to build, the sha256 each one's artifact must have or None).

    Artifacts named in a spec (``model=PATH``) are checked here, before anything is built, so a missing or
    different file is reported without loading it; ``model`` replaces that PATH when the file moved.
    """
    specs = list(header["experts"])
    recorded = header["artifacts"]
    options = _artifact_options(specs)
    named = {spec: value for spec, (_key, value) in options.items()}
    if set(named) - set(recorded):
        raise CtxmixError(f"{path}: corrupt header (an expert names a model artifact but no sha256 is recorded)")
    if model is not None and len(named) != 1:
        raise CtxmixError(f"{path}: --model given, but the file names {len(named)} model artifacts")
    out = []
    for spec in specs:
        if spec not in named:
            out.append(spec)
            continue
        artifact = os.fspath(model) if model is not None else named[spec]
        _check_artifact(path, artifact, recorded[spec])
        key = options[spec][0]
        out.append(spec if model is None else spec.replace(f"{key}={named[spec]}", f"{key}={artifact}"))
    return out, [recorded.get(spec) for spec in specs]


def _check_artifact(path, artifact: str | None, expected_sha256: str) -> None:
    if artifact is None or not Path(artifact).exists():
        raise CtxmixError(f"{path}: needs model artifact {artifact or '(none found)'} (sha256 "
                          f"{expected_sha256[:12]}...), which is missing; pass --model PATH")
    digest = sha256_file(artifact)
    if not same_digest(digest, expected_sha256):
        raise CtxmixError(f"{path}: model artifact {artifact} has sha256 {digest[:12]}..., "
                          f"the file was made with {expected_sha256[:12]}...")
