"""Shard-mode byte accounting: the bytes each token stands for, counted exactly as the challenge counts them.

Parameter Golf's ``eval_val`` (openai/parameter-golf ``train_gpt.py``, ``build_sentencepiece_luts``) builds
three tables from the tokenizer's pieces and charges each scored target ``t`` (with previous token ``t-1``)

    bytes(t) = base_nbytes[tok_t] + (has_leading_space[tok_t] and not is_boundary[tok_{t-1}])

* ``base_nbytes``: UTF-8 length of the piece without its leading "▁"; a byte-fallback token ``<0xXX>``
  counts 1; control, unknown and unused pieces count 0.
* ``has_leading_space``: the piece starts with "▁" (the space it stands for is counted only when the
  previous token is not a boundary, so a document's first word does not pay for a space it never had).
* ``is_boundary``: control, unknown and unused pieces (BOS/EOS/pad/unk), and any id beyond the
  tokenizer's vocabulary.

Position 0 of a stream is context only and never scored (the challenge's targets are ``tokens[1:]``), so
its count does not enter any bpb. ``shard_byte_counts`` fills it as if it followed a boundary (a document
start): ``base_nbytes[tok_0]``, without the leading space.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..errors import CtxmixError
from .tokenizer import KIND_BYTE, KIND_CONTROL, KIND_UNKNOWN, KIND_UNUSED, SPACE_PIECE, default_tokenizer, piece_kinds


@dataclass(frozen=True)
class ShardByteTables:
    """Per-token-id tables of the challenge's byte accounting (all of length ``table_size``)."""

    base_nbytes: np.ndarray  # int64[table_size]
    has_leading_space: np.ndarray  # bool[table_size]
    is_boundary: np.ndarray  # bool[table_size]

    @property
    def table_size(self) -> int:
        return len(self.base_nbytes)


def build_shard_byte_tables(processor, vocab_size: int | None = None) -> ShardByteTables:
    """The three tables for ``processor``; ``vocab_size`` larger than the tokenizer's pads them the way the
    challenge does (ids the tokenizer lacks are boundaries of 0 bytes)."""
    sp_size = int(processor.vocab_size())
    table_size = max(sp_size, vocab_size or 0)
    base_nbytes = np.zeros(table_size, dtype=np.int64)
    has_leading_space = np.zeros(table_size, dtype=bool)
    is_boundary = np.ones(table_size, dtype=bool)
    kinds = piece_kinds(processor)
    for token_id in range(sp_size):
        if kinds[token_id] in (KIND_CONTROL, KIND_UNKNOWN, KIND_UNUSED):
            continue
        is_boundary[token_id] = False
        if kinds[token_id] == KIND_BYTE:
            base_nbytes[token_id] = 1
            continue
        piece = processor.id_to_piece(token_id)
        if piece.startswith(SPACE_PIECE):
            has_leading_space[token_id] = True
            piece = piece[1:]
        base_nbytes[token_id] = len(piece.encode("utf-8"))
    return ShardByteTables(base_nbytes, has_leading_space, is_boundary)


@functools.lru_cache(maxsize=4)
def default_shard_byte_tables(vocab_size: int | None = None) -> ShardByteTables:
    """The tables of the shipped sp1024 tokenizer (cached)."""
    return build_shard_byte_tables(default_tokenizer(), vocab_size)


def shard_byte_counts(tokens: np.ndarray, tables: ShardByteTables | None = None) -> np.ndarray:
    """int64[N]: bytes per position of a shard token stream (see the module docstring; entry 0 is never
    scored and is filled as if the stream started after a boundary)."""
    tables = tables or default_shard_byte_tables()
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise CtxmixError(f"shard tokens must be a 1-D integer array, got {tokens.dtype} with shape {tokens.shape}")
    if len(tokens) == 0:
        return np.zeros(0, dtype=np.int64)
    lowest, highest = int(tokens.min()), int(tokens.max())
    if lowest < 0 or highest >= tables.table_size:
        bad = int(np.flatnonzero((tokens < 0) | (tokens >= tables.table_size))[0])
        raise CtxmixError(
            f"token id {int(tokens[bad])} at position {bad} is outside the tokenizer's ids 0..{tables.table_size - 1}"
        )
    nbytes = tables.base_nbytes[tokens]
    nbytes[1:] += tables.has_leading_space[tokens[1:]] & ~tables.is_boundary[tokens[:-1]]
    return nbytes
