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

Any other SentencePiece model works the same way through one object, ``Tokenizer``: the model's bytes
and sha256, its vocabulary, both processors, the pieces' kinds, the challenge's byte tables and the text
scheme (``text.py``), each built once per model and cached by sha256. ``shipped_tokenizer()`` is sp1024,
the default of every entry point; ``load_tokenizer(PATH)`` any ``.model`` file; ``resolve_tokenizer``
takes either (or a Hugging Face tokenizer, ``hf_tokenizer.py``, which has the same text-mode methods).
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
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
# ModelProto.trainer_spec = 2; in TrainerSpec: model_type = 3 (UNIGRAM = 1, the default; BPE = 2; WORD = 3; CHAR = 4).
_MODEL_TRAINER_FIELD, _TRAINER_MODEL_TYPE_FIELD = 2, 3
MODEL_UNIGRAM, MODEL_BPE, MODEL_WORD, MODEL_CHAR = 1, 2, 3, 4
MODEL_TYPE_NAMES = {MODEL_UNIGRAM: "unigram", MODEL_BPE: "bpe", MODEL_WORD: "word", MODEL_CHAR: "char"}
MAX_VOCAB_SIZE = 1 << 16  # shards store uint16 tokens
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


def model_type(model_proto: bytes) -> int:
    """``MODEL_*``: the algorithm the model's pieces are segmented with (its trainer spec; unigram when unset)."""
    for number, raw in _top_level_fields(model_proto):
        if number != _MODEL_TRAINER_FIELD:
            continue
        _key, pos = _read_varint(raw, 0)
        _length, pos = _read_varint(raw, pos)
        for inner, field in _top_level_fields(raw[pos:]):
            if inner == _TRAINER_MODEL_TYPE_FIELD and field[0] & 7 == _WIRE_VARINT:
                return _read_varint(field, 1)[0]
    return MODEL_UNIGRAM


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


# ----------------------------------------------------------------------------------------------------
# One object per tokenizer model
# ----------------------------------------------------------------------------------------------------


class Tokenizer:
    """A SentencePiece model and everything ctxmix derives from it, built once (``load_tokenizer`` caches
    one object per sha256, so the tables below are computed once per model and process).

    ``processor``: the model as the challenge runs it (its own normalizer; shards were made with it);
    ``identity``: the same pieces under the identity normalizer (text mode). ``shard_byte_tables``: the
    challenge's per-piece byte accounting (``nbytes.py``). ``encode_text`` / ``decode_text``: lossless
    text mode (``text.py``).
    """

    kind = "sentencepiece"

    def __init__(self, model_bytes: bytes, *, path: str | None, name: str):
        self.model_bytes = bytes(model_bytes)
        self.path = path  # the file it was read from; None for the model shipped in the package
        self.name = name  # how messages name it
        self.sha256 = hashlib.sha256(self.model_bytes).hexdigest()
        try:
            self.model_type = model_type(self.model_bytes)
            self._identity_proto = identity_model_proto(self.model_bytes)
        except ValueError as exc:
            raise CtxmixError(f"tokenizer {name}: not a SentencePiece model ({exc})") from None
        self.processor = _load_processor(self.model_bytes, f"tokenizer {name}")
        self.vocab_size = int(self.processor.vocab_size())
        if not 2 <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise CtxmixError(f"tokenizer {name}: vocabulary of {self.vocab_size} pieces, expected 2..{MAX_VOCAB_SIZE} "
                              "(shard tokens are uint16)")
        self._lock = threading.Lock()
        self._tables: dict = {}

    def __repr__(self) -> str:
        return f"Tokenizer({self.name}, vocab {self.vocab_size}, sha256 {self.sha256[:12]})"

    @property
    def shipped(self) -> bool:
        """True for the sp1024 model shipped in the package (the default everywhere)."""
        return self.sha256 == tokenizer_sha256()

    @functools.cached_property
    def identity(self):
        """The ``SentencePieceProcessor`` with an identity normalizer (text mode encodes with it)."""
        return _load_processor(self._identity_proto, f"tokenizer {self.name} (identity normalization)")

    @functools.cached_property
    def kinds(self) -> np.ndarray:
        """int64[V]: the ``KIND_*`` of every id."""
        return piece_kinds(self.processor)

    @functools.cached_property
    def byte_ids(self) -> np.ndarray | None:
        """int64[256]: the byte-fallback id of every byte value; None when the model has no byte fallback."""
        try:
            return byte_token_ids(self.processor)
        except CtxmixError:
            return None

    @functools.cached_property
    def bos_id(self) -> int:
        """The id of position 0 in text mode (covers no byte): BOS, else EOS, else UNK."""
        for token_id in (self.processor.bos_id(), self.processor.eos_id(), self.processor.unk_id()):
            if 0 <= token_id < self.vocab_size:
                return int(token_id)
        raise CtxmixError(f"tokenizer {self.name}: no BOS, EOS or UNK piece to start a text stream with")

    def shard_byte_tables(self, vocab_size: int | None = None):
        """The challenge's byte tables for this model's pieces (``nbytes.ShardByteTables``), cached."""
        from .nbytes import build_shard_byte_tables

        with self._lock:
            key = ("shard", vocab_size)
            if key not in self._tables:
                self._tables[key] = build_shard_byte_tables(self.processor, vocab_size)
            return self._tables[key]

    def encode_text(self, data: bytes, **options):
        """``text.encode_text`` with this tokenizer."""
        from .text import encode_text

        return encode_text(data, tokenizer=self, **options)

    def decode_text(self, tokens, layout) -> bytes:
        """``text.decode_text`` with this tokenizer."""
        from .text import decode_text

        return decode_text(tokens, layout, tokenizer=self)

    def describe(self) -> dict:
        """JSON-ready identity: kind, name, path, sha256, vocabulary size and model type."""
        return {"kind": self.kind, "name": self.name, "path": self.path, "sha256": self.sha256,
                "vocab_size": self.vocab_size, "model_type": MODEL_TYPE_NAMES.get(self.model_type, "?")}


_loaded: dict[str, Tokenizer] = {}
_loaded_lock = threading.Lock()


def _cached(model_bytes: bytes, path: str | None, name: str) -> Tokenizer:
    digest = hashlib.sha256(model_bytes).hexdigest()
    with _loaded_lock:
        found = _loaded.get(digest)
    if found is not None:
        return found
    made = Tokenizer(model_bytes, path=path, name=name)
    with _loaded_lock:
        return _loaded.setdefault(digest, made)


def shipped_tokenizer() -> Tokenizer:
    """The official sp1024 model shipped in ``assets/``: the tokenizer of every run that names none."""
    return _cached(tokenizer_model_bytes(), None, "sp1024 (shipped)")


def load_tokenizer(path: str | os.PathLike):
    """The SentencePiece model file ``path`` (one object per distinct model: cached by sha256), or, for a
    directory, the Hugging Face tokenizer saved in it (``hf_tokenizer.HFTokenizer``)."""
    path = Path(path)
    if path.is_dir():
        from .hf_tokenizer import hf_tokenizer

        return hf_tokenizer(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CtxmixError(f"tokenizer {path}: no such file") from None
    except OSError as exc:
        raise CtxmixError(f"tokenizer {path}: cannot read it ({exc.strerror})") from None
    if not data:
        raise CtxmixError(f"tokenizer {path}: file is empty, expected a SentencePiece .model file")
    if hashlib.sha256(data).hexdigest() == tokenizer_sha256():
        return shipped_tokenizer()  # the shipped model, wherever a copy of it lies
    return _cached(data, str(path), str(path))


def resolve_tokenizer(tokenizer=None):
    """A tokenizer object from ``None`` (the shipped sp1024), a path to a ``.model`` file or a Hugging Face
    model directory, or an object that already is one (``Tokenizer`` or ``hf_tokenizer.HFTokenizer``)."""
    if tokenizer is None:
        return shipped_tokenizer()
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    if hasattr(tokenizer, "encode_text") and hasattr(tokenizer, "sha256") and hasattr(tokenizer, "vocab_size"):
        return tokenizer
    raise CtxmixError(f"tokenizer must be a path or a tokenizer object, got {type(tokenizer).__name__}")
