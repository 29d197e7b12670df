"""Traces: a run's per-position expert outputs on disk, so that new linear mixers need no expert again.

A trace is one ``.npz`` file (``np.savez``; loaded with ``allow_pickle=False``, so a trace file is data
and never code) holding:

  ``meta``      str[1]: JSON {"format": "ctxmix-trace", "version", "name", "mode", "vocab_size",
                "experts": [spec, ...], "features": [[expert index, feature name], ...]}
  ``logp``      float64[T, K]: natural log of each expert's p(target) at the scored positions 1..N-1
  ``features``  float64[T, F]: the experts' causal features, one column per ``meta["features"]`` entry
  ``tokens``    int64[N]: the stream (position 0 is context only)
  ``nbytes``    int64[N]: bytes each token stands for

A trace file is untrusted input, read within its own size: before any array is read, each member's
``.npy`` header must declare exactly the bytes the archive stores for it, of the dtype named above, and
all of them together at most ``MAX_TRACE_BYTES`` (an ``.npz`` member may be deflated, so a small file could
otherwise declare gigabytes). Values are then checked for what they stand for: tokens inside the
vocabulary, byte counts in 0..``MAX_TOKEN_NBYTES`` (their sums cannot wrap), log p(target) between the log
of the smallest positive float64 and 0, finite features.

A trace only holds p(target), so only linear mixers (whose fast path needs nothing else) can be scored
from it. ``mix_trace`` replays the recorded expert outputs through the same engine a live run uses
(``run_stream``, which adds totals in FAST_CHUNK-aligned pieces), so its bits equal the live run's for
every label.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .atomic import atomic_output
from .errors import CtxmixError
from .experts.base import LONG_CHUNK, Expert, ExpertOutput
from .run import ProgressFn, RunResult, run_stream
from .spec import check_number
from .stream import Stream

TRACE_FORMAT = "ctxmix-trace"
TRACE_VERSION = 1
ARRAYS = ("meta", "logp", "features", "tokens", "nbytes")
ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive
NPY_MAGIC = b"\x93NUMPY"  # a lone .npy array
# p(target) <= 1 for any normalized expert; allow for rounding of a p that is 1 up to a few ulps.
MAX_LOGP = 1e-9
# p(target) > 0 in float64 (rule 2): its log is at least that of the smallest positive float64, -744.4.
MIN_LOGP = math.log(np.nextafter(0.0, 1.0))
MAX_TRACE_BYTES = 1 << 30  # all arrays of a trace together, as declared (artifacts have the same cap)
# Bytes one token stands for: a piece of any tokenizer is far shorter; with at most 2**27 tokens (1 GiB of
# int64) the sums of byte counts stay below 2**43.
MAX_TOKEN_NBYTES = 1 << 16
MAX_VOCAB_SIZE = 1 << 20  # a Hugging Face vocabulary (50k-150k ids) fits; as the codec's limit
# What each array must be, checked in its .npy header before it is read ("U" = a unicode string array).
DTYPES = {"meta": "U", "logp": np.dtype(np.float64), "features": np.dtype(np.float64),
          "tokens": np.dtype(np.int64), "nbytes": np.dtype(np.int64)}


@dataclass
class Trace:
    """A loaded trace: a stream and its experts' log p(target) and features at positions 1..N-1."""

    name: str
    mode: str
    vocab_size: int
    expert_specs: list[str]
    tokens: np.ndarray  # int64[N]
    nbytes: np.ndarray  # int64[N]
    logp: np.ndarray  # float64[N-1, K]
    features: list[dict[str, np.ndarray]]  # per expert: name -> float64[N-1]

    @property
    def stream(self) -> Stream:
        return Stream(self.name, self.tokens, self.nbytes, self.vocab_size, self.mode)


def save_trace(path: str | os.PathLike, result: RunResult, stream: Stream, expert_specs: Sequence[str]) -> None:
    """Write ``result``'s expert trace (a run made with ``keep_trace=True`` on ``stream``) to ``path``.

    Written atomically: ``path`` is either the complete trace or left as it was.
    """
    expert_specs = [str(s) for s in expert_specs]
    if result.expert_logp is None:
        raise CtxmixError(f"cannot save a trace of {result.name}: the run did not keep one (keep_trace=True is needed)")
    logp = np.ascontiguousarray(result.expert_logp, dtype=np.float64)
    n_scored = stream.n_scored
    if logp.shape != (n_scored, len(expert_specs)):
        raise CtxmixError(
            f"cannot save a trace of {result.name}: expert log p has shape {logp.shape}, expected "
            f"({n_scored}, {len(expert_specs)}) for {n_scored} scored positions and {len(expert_specs)} experts"
        )
    if len(result.expert_features) not in (0, len(expert_specs)):
        raise CtxmixError(f"cannot save a trace of {result.name}: features for {len(result.expert_features)} experts, "
                          f"{len(expert_specs)} expert specs given")
    columns: list[list] = []
    values: list[np.ndarray] = []
    for k, feats in enumerate(result.expert_features):
        for name in sorted(feats):
            column = np.asarray(feats[name], dtype=np.float64)
            if column.shape != (n_scored,):
                raise CtxmixError(f"cannot save a trace of {result.name}: feature {name!r} of expert {expert_specs[k]} "
                                  f"has shape {column.shape}, expected ({n_scored},)")
            columns.append([k, name])
            values.append(column)
    features = np.stack(values, axis=1) if values else np.zeros((n_scored, 0))
    meta = {
        "format": TRACE_FORMAT,
        "version": TRACE_VERSION,
        "name": stream.name,
        "mode": stream.mode,
        "vocab_size": int(stream.vocab_size),
        "experts": expert_specs,
        "features": columns,
    }
    with atomic_output(path) as handle:
        np.savez(handle, meta=np.array([json.dumps(meta)]), logp=logp, features=features,
                 tokens=np.ascontiguousarray(stream.tokens, dtype=np.int64),
                 nbytes=np.ascontiguousarray(stream.nbytes, dtype=np.int64))


def load_trace(path: str | os.PathLike) -> Trace:
    """Read a trace written by ``save_trace``; a missing, corrupt or foreign file is a one-line CtxmixError."""
    where = f"trace {os.fspath(path)}"
    if not os.path.exists(path):
        raise CtxmixError(f"{where}: no such file")
    if not os.path.isfile(path):
        raise CtxmixError(f"{where}: not a file")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(NPY_MAGIC))
    except OSError as exc:
        raise CtxmixError(f"{where}: cannot read ({exc.strerror})") from None
    if magic.startswith(NPY_MAGIC):
        raise CtxmixError(f"{where}: not a ctxmix trace (a single .npy array, expected an .npz archive)")
    if not magic.startswith(ZIP_MAGIC):
        raise CtxmixError(f"{where}: not a ctxmix trace (not an .npz archive)")
    _check_members(where, path)
    try:
        loaded = np.load(path, allow_pickle=False)  # never unpickle: a trace file is data
    except Exception as exc:  # numpy's own error for a file it cannot read, wrapped at the boundary
        raise CtxmixError(f"{where}: corrupt or truncated .npz archive ({type(exc).__name__}: {exc})") from None
    assert isinstance(loaded, np.lib.npyio.NpzFile)  # the magic bytes said zip
    with loaded as archive:
        missing = [name for name in ARRAYS if name not in archive.files]
        if missing:
            raise CtxmixError(f"{where}: not a ctxmix trace (no {missing[0]!r} array; expected {', '.join(ARRAYS)})")
        try:
            arrays = {name: archive[name] for name in ARRAYS}
        except Exception as exc:  # a truncated or corrupt member, or an object array (pickle refused)
            raise CtxmixError(f"{where}: corrupt trace ({type(exc).__name__}: {exc})") from None
    meta = _read_meta(where, arrays["meta"])
    return _build_trace(where, meta, arrays)


def _member_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) from the ``.npy`` header of one member, reading nothing else."""
    fmt = np.lib.format
    with archive.open(info) as handle:
        version = fmt.read_magic(handle)
        if version == (1, 0):
            shape, _fortran, dtype = fmt.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _fortran, dtype = fmt.read_array_header_2_0(handle)
        else:
            raise ValueError(f".npy format version {version}")
        return shape, dtype, handle.tell()


def _check_members(where: str, path: str | os.PathLike) -> None:
    """Each array a trace needs declares exactly the bytes its member holds, of its dtype, and all of them
    together at most MAX_TRACE_BYTES: checked in the headers, before numpy allocates anything."""
    declared = 0
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            for name in ARRAYS:
                info = members.get(name + ".npy")
                if info is None:
                    raise CtxmixError(f"{where}: not a ctxmix trace (no {name!r} array; expected {', '.join(ARRAYS)})")
                shape, dtype, header_len = _member_header(archive, info)
                nbytes = math.prod(shape) * dtype.itemsize
                expected = DTYPES[name]
                if (dtype.kind != expected) if isinstance(expected, str) else (dtype != expected):
                    raise CtxmixError(f"{where}: {name!r} is {dtype}, expected {expected if name != 'meta' else 'a string'}")
                if nbytes != info.file_size - header_len:
                    raise CtxmixError(f"{where}: {name!r} declares {nbytes:,} bytes of data, its member holds "
                                      f"{info.file_size - header_len:,} (corrupt trace)")
                declared += nbytes
                if declared > MAX_TRACE_BYTES:
                    raise CtxmixError(f"{where}: the arrays declare more than {MAX_TRACE_BYTES:,} bytes (refused before reading)")
    except CtxmixError:
        raise
    except Exception as exc:  # zipfile's and numpy's errors for a damaged archive or header, wrapped here
        raise CtxmixError(f"{where}: corrupt or truncated .npz archive ({type(exc).__name__}: {exc})") from None


def _read_meta(where: str, raw: np.ndarray) -> dict:
    if raw.dtype.kind != "U" or raw.shape != (1,):
        raise CtxmixError(f"{where}: 'meta' is {raw.dtype}{list(raw.shape)}, expected one JSON string")
    try:
        meta = json.loads(str(raw[0]))
    except json.JSONDecodeError as exc:
        raise CtxmixError(f"{where}: 'meta' is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except (ValueError, RecursionError) as exc:  # an integer of too many digits, nesting too deep
        raise CtxmixError(f"{where}: 'meta' cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != TRACE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CtxmixError(f"{where}: format is {found!r}, expected {TRACE_FORMAT!r}")
    if meta.get("version") != TRACE_VERSION:
        raise CtxmixError(f"{where}: trace version {meta.get('version')!r}, this ctxmix reads version {TRACE_VERSION}")
    kinds = {"name": str, "mode": str, "vocab_size": int, "experts": list, "features": list}
    for key, kind in kinds.items():
        if not isinstance(meta.get(key), kind):
            raise CtxmixError(f"{where}: meta field {key!r} is missing or not {kind.__name__}")
    if meta["mode"] not in ("text", "shard"):
        raise CtxmixError(f"{where}: mode {meta['mode']!r}, expected text or shard")
    check_number("vocab_size", meta["vocab_size"], f"{where}: meta", 1, MAX_VOCAB_SIZE)
    if not all(isinstance(s, str) for s in meta["experts"]) or not meta["experts"]:
        raise CtxmixError(f"{where}: meta 'experts' must be a non-empty list of spec strings")
    return meta


def _build_trace(where: str, meta: dict, arrays: dict[str, np.ndarray]) -> Trace:
    tokens, nbytes, logp, features = arrays["tokens"], arrays["nbytes"], arrays["logp"], arrays["features"]
    n_experts = len(meta["experts"])
    vocab_size = meta["vocab_size"]
    if tokens.dtype != np.int64 or tokens.ndim != 1 or len(tokens) < 2:
        raise CtxmixError(f"{where}: tokens are {tokens.dtype}{list(tokens.shape)}, expected int64[N] with N >= 2")
    n_scored = len(tokens) - 1
    if nbytes.dtype != np.int64 or nbytes.shape != tokens.shape:
        raise CtxmixError(f"{where}: nbytes are {nbytes.dtype}{list(nbytes.shape)}, expected int64[{len(tokens)}]")
    if vocab_size < 1 or tokens.min() < 0 or tokens.max() >= vocab_size:
        raise CtxmixError(f"{where}: tokens outside 0..{vocab_size - 1}")
    if nbytes.min() < 0 or nbytes.max() > MAX_TOKEN_NBYTES:
        raise CtxmixError(f"{where}: byte counts outside 0..{MAX_TOKEN_NBYTES} (corrupt trace)")
    if logp.dtype != np.float64 or logp.shape != (n_scored, n_experts):
        raise CtxmixError(f"{where}: logp is {logp.dtype}{list(logp.shape)}, expected float64[{n_scored}, {n_experts}]")
    if logp.size and not (MIN_LOGP <= logp.min() and logp.max() <= MAX_LOGP):  # NaN fails both comparisons
        raise CtxmixError(f"{where}: logp holds values that are not log-probabilities of a float64 p "
                          f"(expected {MIN_LOGP:.1f} .. 0, finite)")
    columns = meta["features"]
    if features.dtype != np.float64 or features.shape != (n_scored, len(columns)):
        raise CtxmixError(f"{where}: features are {features.dtype}{list(features.shape)}, "
                          f"expected float64[{n_scored}, {len(columns)}]")
    if not np.isfinite(features).all():
        raise CtxmixError(f"{where}: features hold non-finite values (corrupt trace)")
    per_expert: list[dict[str, np.ndarray]] = [{} for _ in range(n_experts)]
    for column, entry in enumerate(columns):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int) and isinstance(entry[1], str)
                and 0 <= entry[0] < n_experts):
            raise CtxmixError(f"{where}: feature column {column} is {entry!r}, expected [expert index, name]")
        per_expert[entry[0]][entry[1]] = np.ascontiguousarray(features[:, column])
    return Trace(meta["name"], meta["mode"], vocab_size, list(meta["experts"]), tokens, nbytes,
                 np.ascontiguousarray(logp), per_expert)


class _ReplayExpert(Expert):
    """Plays back one expert's recorded log p(target) and features, chunk by chunk (fast path only)."""

    fast_chunk = LONG_CHUNK  # reads arrays only

    def __init__(self, trace: Trace, index: int):
        super().__init__(None, vocab_size=trace.vocab_size)
        self._spec = trace.expert_specs[index]
        self._logp = trace.logp[:, index]  # float64[N-1]: positions 1..N-1
        self._features = trace.features[index]
        self.provides = tuple(sorted(self._features))
        self._position = 0

    @property
    def spec(self) -> str:
        return self._spec

    def begin(self, tokens):
        self._position = 0

    def score_chunk(self, tokens, *, full=False, want=()):
        if full:
            raise CtxmixError(f"trace of expert {self._spec}: a trace only holds p(target), not full distributions")
        start, end = self._position, self._position + len(tokens)
        self._position = end
        # Position 0 is never scored; its entry is a placeholder the engine drops.
        lo = max(start, 1)
        logp = np.concatenate([np.zeros(lo - start), self._logp[lo - 1 : end - 1]])
        features = {name: np.concatenate([np.zeros(lo - start), self._features[name][lo - 1 : end - 1]]) for name in want}
        return ExpertOutput(logp, None, features)


def mix_trace(
    trace: Trace,
    mixer_specs: Sequence[str] | None = None,
    *,
    keep_bits: bool = False,
    chunk_size: int | None = None,
    progress: ProgressFn | None = None,
):
    """Score ``mixer_specs`` (``none`` for each expert alone; default: a run's defaults) on ``trace``.

    Returns a ``ctxmix.report.Report`` with the rows a live run of the same experts and mixers prints; the
    bits are equal to the live run's (the engine adds totals in FAST_CHUNK-aligned pieces, each summed whole,
    so any chunk sizes give the same floats: ``run.AlignedTotal``).
    Mixers that need full distributions (``geometric``) are refused: a trace only holds p(target).
    """
    from .components import DEFAULT_MIXERS, build_mixers
    from .report import Report, rows_for

    specs = list(mixer_specs) if mixer_specs else list(DEFAULT_MIXERS)
    experts = [_ReplayExpert(trace, k) for k in range(len(trace.expert_specs))]
    expert_rows, mixers = build_mixers(specs, experts)
    for mixer in mixers:
        if not mixer.linear:
            raise CtxmixError(
                f"mixer {mixer.spec} needs full distributions; a trace only holds each expert's p(target) "
                f"(run it with score or eval instead)"
            )
    result = run_stream(trace.stream, experts, mixers, expert_rows=expert_rows, chunk_size=chunk_size,
                        keep_bits=keep_bits, progress=progress)
    return Report(runs=rows_for(result), experts=list(trace.expert_specs), mixers=[m.spec for m in mixers],
                  results=[result], streams=[trace.stream])
