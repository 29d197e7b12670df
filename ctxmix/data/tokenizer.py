"""The shipped sp1024 tokenizer, loaded two ways.

* ``default_tokenizer()`` is the official Parameter Golf SentencePiece model exactly as the challenge
  uses it (``nmt_nfkc`` normalization, whitespace folding). Shard tokens were made with it, and shard byte
  accounting (``nbytes.py``) reads its pieces.
* ``identity_tokenizer()`` is the same vocabulary and merges with the normalizer replaced by the identity
  (no NFKC, no whitespace folding, no dummy prefix; spaces still become "▁"). Text mode (``text.py``)
  tokenizes with it, because the official normalizer is not lossless.

Both are built from the model's bytes (never from a path handed to SentencePiece), so an install
directory with unusual characters in its name loads the same. SentencePiece's Python package ships no
protobuf runtime we can rely on, so the one field we change is rewritten at the protobuf wire level.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np

from ..errors import CtxmixError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TOKENIZER_FILE = ASSETS_DIR / "sp1024.model"

SPACE_PIECE = "\u2581"  # "▁": SentencePiece's visible stand-in for a space

# Piece kinds, as SentencePiece's ModelProto.SentencePiece.Type numbers them (sentencepiece_model.proto).
KIND_NORMAL, KIND_UNKNOWN, KIND_CONTROL, KIND_USER_DEFINED, KIND_UNUSED, KIND_BYTE = 1, 2, 3, 4, 5, 6

# Protobuf field numbers (sentencepiece_model.proto): ModelProto.normalizer_spec = 3; in NormalizerSpec:
# name = 1, add_dummy_prefix = 3, remove_extra_whitespaces = 4, escape_whitespaces = 5.
_MODEL_NORMALIZER_FIELD = 3
_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LEN, _WIRE_FIXED32 = 0, 1, 2, 5


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos
        if shift > 63:
            raise ValueError("varint longer than 64 bits")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _top_level_fields(buf: bytes) -> list[tuple[int, bytes]]:
    """``[(field number, raw bytes of the whole field including its key)]`` for one protobuf message."""
    fields = []
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            _, pos = _read_varint(buf, pos)
        elif wire == _WIRE_LEN:
            length, pos = _read_varint(buf, pos)
            pos += length
        elif wire == _WIRE_FIXED64:
            pos += 8
        elif wire == _WIRE_FIXED32:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        fields.append((number, buf[start:pos]))
    return fields


def identity_model_proto(model_proto: bytes) -> bytes:
    """The same serialized model with its normalizer replaced by the identity.

    The new NormalizerSpec is ``name="identity"`` with no precompiled charsmap (so characters pass
    through unchanged), ``add_dummy_prefix=false``, ``remove_extra_whitespaces=false`` and
    ``escape_whitespaces=true`` (each space still becomes "▁", so word pieces such as "▁the" still match).
    Every other field (pieces, trainer spec) is copied byte for byte.
    """
    spec = (
        _varint(1 << 3 | _WIRE_LEN) + _varint(len(b"identity")) + b"identity"
        + _varint(3 << 3 | _WIRE_VARINT) + _varint(0)
        + _varint(4 << 3 | _WIRE_VARINT) + _varint(0)
        + _varint(5 << 3 | _WIRE_VARINT) + _varint(1)
    )
    new_field = _varint(_MODEL_NORMALIZER_FIELD << 3 | _WIRE_LEN) + _varint(len(spec)) + spec
    out = bytearray()
    replaced = False
    for number, raw in _top_level_fields(model_proto):
        if number == _MODEL_NORMALIZER_FIELD:
            if not replaced:
                out += new_field
                replaced = True
            continue
        out += raw
    if not replaced:
        out += new_field
    return bytes(out)


def _load_processor(model_proto: bytes, what: str):
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_proto)
    except (RuntimeError, OSError, ValueError) as exc:
        raise CtxmixError(f"cannot load {what}: {exc}") from None
    return processor


@functools.lru_cache(maxsize=1)
def tokenizer_model_bytes() -> bytes:
    """The serialized official sp1024 model shipped in ``ctxmix/data/assets/sp1024.model``."""
    try:
        return TOKENIZER_FILE.read_bytes()
    except OSError as exc:
        raise CtxmixError(f"cannot read the shipped tokenizer {TOKENIZER_FILE}: {exc.strerror}") from None


@functools.lru_cache(maxsize=1)
def tokenizer_sha256() -> str:
    """sha256 (hex) of the shipped model: what a compressed file records to refuse a different tokenizer."""
    return hashlib.sha256(tokenizer_model_bytes()).hexdigest()


def tokenizer_vocab_size() -> int:
    """Vocabulary size of the shipped tokenizer (1024)."""
    return int(default_tokenizer().vocab_size())


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    """The official sp1024 ``SentencePieceProcessor`` (challenge normalization), loaded once."""
    return _load_processor(tokenizer_model_bytes(), f"the shipped tokenizer {TOKENIZER_FILE}")


@functools.lru_cache(maxsize=1)
def identity_tokenizer():
    """sp1024 with an identity normalizer: what text mode encodes with (see ``text.py``)."""
    try:
        proto = identity_model_proto(tokenizer_model_bytes())
    except ValueError as exc:
        raise CtxmixError(f"the shipped tokenizer {TOKENIZER_FILE} is not a valid SentencePiece model: {exc}") from None
    return _load_processor(proto, f"the shipped tokenizer {TOKENIZER_FILE} (identity normalization)")


def piece_kinds(processor) -> np.ndarray:
    """int64[V]: the ``KIND_*`` of every token id."""
    kinds = np.full(processor.vocab_size(), KIND_NORMAL, dtype=np.int64)
    for token_id in range(processor.vocab_size()):
        if processor.is_control(token_id):
            kinds[token_id] = KIND_CONTROL
        elif processor.is_unknown(token_id):
            kinds[token_id] = KIND_UNKNOWN
        elif processor.is_unused(token_id):
            kinds[token_id] = KIND_UNUSED
        elif processor.is_byte(token_id):
            kinds[token_id] = KIND_BYTE
    return kinds


def byte_token_ids(processor) -> np.ndarray:
    """int64[256]: the id of the byte-fallback token ``<0xXX>`` for every byte value."""
    ids = np.empty(256, dtype=np.int64)
    for value in range(256):
        token_id = processor.piece_to_id(f"<0x{value:02X}>")
        if not processor.is_byte(token_id):
            raise CtxmixError(f"the tokenizer has no byte-fallback token for byte 0x{value:02X}")
        ids[value] = token_id
    return ids


def piece_text_bytes(processor) -> list[bytes]:
    """The raw bytes each token id stands for in text: "▁" is a space, ``<0xXX>`` is that byte,
    control / unknown / unused pieces are empty."""
    out = []
    kinds = piece_kinds(processor)
    for token_id in range(processor.vocab_size()):
        kind = kinds[token_id]
        piece = processor.id_to_piece(token_id)
        if kind == KIND_BYTE:
            out.append(bytes([int(piece[3:5], 16)]))
        elif kind in (KIND_CONTROL, KIND_UNKNOWN, KIND_UNUSED):
            out.append(b"")
        else:
            out.append(piece.replace(SPACE_PIECE, " ").encode("utf-8"))
    return out
