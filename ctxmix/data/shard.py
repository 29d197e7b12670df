"""Parameter Golf token shards: read, write, and load a set of them as one stream.

Format (openai/parameter-golf ``load_data_shard``): a header of 256 little-endian int32 (magic
20240520, version 1, token count, the rest 0), then the tokens as little-endian uint16.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_output
from ..errors import CtxmixError
from ..stream import Stream
from .nbytes import shard_byte_counts
from .tokenizer import resolve_tokenizer

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_NBYTES = HEADER_INTS * 4
TOKEN_NBYTES = 2  # uint16
MAX_TOKEN_ID = 65535
DEFAULT_VOCAB_SIZE = 1024
SIDECAR_MARK = "_bytes_"  # CaseOps: fineweb_val_bytes_000000.bin holds the byte count of each token


def _read_header(path: Path) -> tuple[int, int]:
    """``(token count, file size in bytes)`` after checking the header against the file."""
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise CtxmixError(f"shard {path}: is a directory, expected a token shard file")
        with open(path, "rb") as handle:
            raw = handle.read(HEADER_NBYTES)
    except FileNotFoundError:
        raise CtxmixError(f"shard {path}: no such file") from None
    except OSError as exc:
        raise CtxmixError(f"shard {path}: cannot read it ({exc.strerror})") from None
    if len(raw) < HEADER_NBYTES:
        raise CtxmixError(f"shard {path}: file is {size} bytes, shorter than the {HEADER_NBYTES}-byte shard header")
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) != SHARD_MAGIC:
        raise CtxmixError(
            f"shard {path}: magic number {int(header[0])}, expected {SHARD_MAGIC} (not a Parameter Golf token shard)"
        )
    if int(header[1]) != SHARD_VERSION:
        raise CtxmixError(f"shard {path}: format version {int(header[1])}, expected {SHARD_VERSION}")
    count = int(header[2])
    payload = size - HEADER_NBYTES
    if count < 0 or payload != count * TOKEN_NBYTES:
        stray = f" and {payload % TOKEN_NBYTES} stray byte" if payload % TOKEN_NBYTES else ""
        raise CtxmixError(
            f"shard {path}: header says {count} tokens, file holds {payload // TOKEN_NBYTES}{stray}"
        )
    return count, size


def read_shard(path: str | os.PathLike, max_tokens: int | None = None) -> np.ndarray:
    """int64[count]: the tokens of one shard (only the first ``max_tokens`` when given).

    Raises ``CtxmixError`` naming the file for a missing file, a file shorter than the header, a wrong
    magic number or version, or a token count that disagrees with the file size.
    """
    path = Path(path)
    count, _ = _read_header(path)
    if max_tokens is not None:
        count = min(count, max(int(max_tokens), 0))
    try:
        tokens = np.fromfile(path, dtype="<u2", count=count, offset=HEADER_NBYTES)
    except OSError as exc:
        raise CtxmixError(f"shard {path}: cannot read it ({exc.strerror})") from None
    if len(tokens) != count:  # the file changed under us since the header check
        raise CtxmixError(f"shard {path}: expected {count} tokens, read {len(tokens)}")
    return tokens.astype(np.int64)


def write_shard(path: str | os.PathLike, tokens: Sequence[int] | np.ndarray) -> None:
    """Write ``tokens`` as a shard at ``path`` (atomically: a crash never leaves a half-written shard)."""
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise CtxmixError(f"shard {path}: tokens must be a 1-D sequence, got shape {array.shape}")
    if len(array) and not np.issubdtype(array.dtype, np.integer):
        raise CtxmixError(f"shard {path}: tokens must be integers, got {array.dtype}")
    if len(array):
        bad = np.flatnonzero((array < 0) | (array > MAX_TOKEN_ID))
        if len(bad):
            raise CtxmixError(
                f"shard {path}: token {int(array[bad[0]])} at position {int(bad[0])} does not fit the shard's "
                f"uint16 (0..{MAX_TOKEN_ID})"
            )
    if len(array) > np.iinfo(np.int32).max:
        raise CtxmixError(f"shard {path}: {len(array)} tokens do not fit the header's int32 count")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, len(array)
    with atomic_output(path) as handle:
        handle.write(header.tobytes())
        handle.write(array.astype("<u2").tobytes())


def resolve_shard_paths(pattern_or_list: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The shard files, in the order they are concatenated.

    A list is taken as given (its order kept). A single string naming an existing file is that file
    (so names containing glob characters such as "[" work); any other string is a glob pattern whose
    matches are sorted by name, as the challenge's ``sorted(glob.glob(pattern))`` does. Byte sidecars
    (``*_bytes_*``, which ``fineweb_val_*.bin`` also matches in a CaseOps dataset) are left out of a
    pattern's matches unless the pattern names them, as the CaseOps records' loaders leave them out.
    """
    if isinstance(pattern_or_list, (str, os.PathLike)):
        pattern = os.fspath(pattern_or_list)
        if os.path.isfile(pattern):
            return [Path(pattern)]
        matches = sorted(glob.glob(pattern))
        if SIDECAR_MARK not in os.path.basename(pattern):
            matches = [m for m in matches if SIDECAR_MARK not in os.path.basename(m)]
        if not matches:
            raise CtxmixError(
                f"no shard matches {pattern!r}: expected a shard file or a glob pattern such as 'val_*.bin'"
            )
        return [Path(m) for m in matches]
    paths = [Path(p) for p in pattern_or_list]
    if not paths:
        raise CtxmixError("no shards given: expected at least one shard file")
    return paths


def load_shards(
    pattern_or_list: str | os.PathLike | Sequence[str | os.PathLike],
    max_tokens: int | None = None,
    vocab_size: int | None = None,
    *,
    tokenizer=None,
    token_bytes: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> Stream:
    """Shards concatenated in name order as one ``Stream`` (mode ``"shard"``).

    ``max_tokens`` is the number of scored targets: the stream keeps the first ``max_tokens + 1`` tokens
    (position 0 is context only). ``tokenizer``: the SentencePiece model the shards were made with (a
    ``Tokenizer`` or a ``.model`` path; default: the shipped sp1024); ``vocab_size`` defaults to its
    vocabulary. Bytes per token follow the challenge's accounting for that model's pieces (``nbytes.py``),
    computed over the concatenation, so the first token of a later shard sees the last token of the
    shard before it, as in the challenge; or, with ``token_bytes`` (shards of the same format holding one
    byte count per token, as the CaseOps datasets ship ``fineweb_val_bytes_*.bin``), those counts. Every
    header is checked even when ``max_tokens`` stops the reading early; any token ``>= vocab_size`` is
    refused, naming the file, the position in it and the tokenizer.
    """
    tok = resolve_tokenizer(tokenizer)
    if max_tokens is not None and int(max_tokens) < 1:
        raise CtxmixError(f"max_tokens must be at least 1 (the number of scored tokens), got {max_tokens}")
    vocab_size = tok.vocab_size if vocab_size is None else int(vocab_size)
    if vocab_size < 1 or vocab_size > MAX_TOKEN_ID + 1:
        raise CtxmixError(f"vocab_size must be in 1..{MAX_TOKEN_ID + 1}, got {vocab_size}")
    if token_bytes is None and not hasattr(tok, "shard_byte_tables"):
        raise CtxmixError(f"tokenizer {tok.name} has no per-piece byte accounting for shards: pass their byte "
                          "counts (--bytes)")
    tokens, name = _read_concatenated(pattern_or_list, max_tokens, vocab_size, tok.name)
    if len(tokens) < 2:
        raise CtxmixError(f"shards {name}: hold {len(tokens)} token(s), need at least 2 to score one")
    if token_bytes is not None:
        nbytes = _read_token_bytes(token_bytes, len(tokens), name)
    else:
        nbytes = shard_byte_counts(tokens, tok.shard_byte_tables(vocab_size))
    return Stream(name, tokens, nbytes, vocab_size, "shard")


def _read_concatenated(pattern_or_list, max_tokens: int | None, vocab_size: int | None,
                       tokenizer_name: str | None) -> tuple[np.ndarray, str]:
    """(int64 tokens of the shards in order, at most ``max_tokens + 1``; the name of the set)."""
    paths = resolve_shard_paths(pattern_or_list)
    counts = [_read_header(path)[0] for path in paths]
    wanted = None if max_tokens is None else int(max_tokens) + 1
    chunks: list[np.ndarray] = []
    have = 0
    for path, count in zip(paths, counts):
        if wanted is not None and have >= wanted:
            break
        tokens = read_shard(path, None if wanted is None else wanted - have)
        too_big = np.flatnonzero(tokens >= vocab_size) if vocab_size is not None else []
        if len(too_big):
            position = int(too_big[0])
            raise CtxmixError(
                f"shard {path}: token {int(tokens[position])} at position {position} is outside the vocabulary "
                f"0..{vocab_size - 1} of tokenizer {tokenizer_name}; were the shards made with another tokenizer? "
                "(pass its .model with --tokenizer)"
            )
        chunks.append(tokens)
        have += len(tokens)
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    name = os.fspath(pattern_or_list) if isinstance(pattern_or_list, (str, os.PathLike)) else ",".join(map(str, paths))
    return tokens, name


def _read_token_bytes(pattern_or_list, n_tokens: int, name: str) -> np.ndarray:
    """int64[n_tokens]: the first ``n_tokens`` counts of a byte sidecar (entry 0 is never scored)."""
    nbytes, sidecar = _read_concatenated(pattern_or_list, n_tokens - 1, None, None)
    if len(nbytes) < n_tokens:
        raise CtxmixError(f"byte counts {sidecar}: hold {len(nbytes)} entries, the shards {name} need {n_tokens} "
                          "(one per token)")
    return nbytes
