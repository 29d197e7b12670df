"""Text mode: lossless tokenization of UTF-8 files with a SentencePiece vocabulary (default: the shipped sp1024).

The official normalizer (NFKC plus whitespace folding) maps "\\r\\n", "\\t", runs of spaces and many
characters to something else, so its tokens cannot give the file back. Text mode keeps every byte:

1. **Identity normalization** (``identity_tokenizer``): same pieces and merges, characters unchanged,
   spaces written as "▁"; anything the vocabulary lacks (newlines, tabs, accents, emoji) becomes
   byte-fallback tokens ``<0xXX>``. A literal "▁" (U+2581) in the text would read back as a space, so
   the text is split there and each U+2581 is coded as its three byte tokens.
2. **CRLF flag** (``TextLayout.crlf``, file-level): when every line ends in CRLF (and there is no other
   CR), the CRs are dropped before tokenizing and each LF token's byte count includes its CR.
3. **Line space** (``TextLayout.line_space``): after "\\n", "\\r" or "\\t", a space is inserted before a
   character that starts some "▁word" piece (or before a space), and counts 0 bytes. A word after a line
   break then gets the "▁word" pieces it gets in the challenge's data, where the newline became "▁".
   Reversible: in the transformed text every space that follows "\\n", "\\r" or "\\t" was inserted (a
   real space there gets one inserted before it), so decoding removes exactly one space after each.
4. **Space runs** (``TextLayout.space_runs``): a run of 2..14 standalone "▁" tokens becomes one run
   token (longer runs use several). Run tokens reuse the ids of the 13 byte-fallback tokens whose bytes
   never occur in UTF-8 (0xC0, 0xC1, 0xF5..0xFF), so they cannot clash with any real byte token. A
   trained model never saw those ids in that role, so a run with one (``components.run_text_options``:
   neural, hf) keeps runs as the "▁" tokens it knows; the experts that learn online keep run tokens.
   Measured with samtruss_7L384d_c839523 (window 512, stride 64) plus ``ngram``, bpb with runs / without:
   neural alone 4.0449 / 4.0203 on alice29.txt and 10.161 / 9.443 on fields.c; the cm mix 1.7934 /
   1.7934 and 1.6322 / 1.6344 (docs/tokenizers.md).

Any SentencePiece model works (``tokenizer=``; default: the shipped sp1024). Steps 1-3 need nothing of
it but a standalone "▁" piece; byte fallback makes every file codable (without it, a character outside
the vocabulary is refused in one line naming the tokenizer) and gives step 4 its ids. A BPE model of up to
``MAX_BPE_TABLE_VOCAB`` pieces is encoded by the numba kernel, any other by SentencePiece itself.

Tokens (BOS excluded) with each step added, against the official (lossy) normalization:

    file               bytes      official NFKC  identity  +CRLF    +space runs  +line space
    alice29.txt          152,089       58,701      70,795    67,187     63,941       63,217
    lcet10.txt           426,754      168,050     194,969   187,450    180,387      178,340
    enwik8.first1MB    1,000,000      511,427     531,223   531,223    520,401      520,244
    fields.c              11,150        6,408       8,011     8,011      7,496        7,507

Line space alone costs a few tokens on some files; what it buys is bits. On the first 40 KB of
alice29.txt (samtruss_7L384d_c839523 artifact, window 512, plus ``ngram``), bpb for identity / CRLF /
CRLF + space runs / CRLF + line space / all steps:

    ngram alone        2.456  2.456  2.459  2.405  2.408
    adaptive mix       2.107  2.092  2.069  2.047  2.021
    fixedshare mix     2.154  2.136  2.135  2.089  2.088
    neural alone       4.914  3.603  3.679  3.663  3.742

The neural expert alone prefers CRLF only: it never saw newline, run or repeated "▁" tokens, so the
other steps pay off through the experts that learn online.

``nbytes`` attributes every file byte to exactly one token: the BOS at position 0 covers 0 bytes, an
inserted space 0, an LF in CRLF mode 2, every other byte of the transformed text 1. So
``nbytes[1:].sum() == len(data)`` and, in a bpb, no byte is counted twice or left out.
"""

from __future__ import annotations

import os
import re
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CtxmixError
from ..kernels.text import (
    NO_PIECE,
    bpe_encode,
    decode_mismatch,
    layout_apply,
    line_end_counts,
    merge_space_runs,
    pieces_decode,
)
from ..stream import Stream
from ..threads import second_thread
from .tokenizer import (
    ASSETS_DIR,
    KIND_BYTE,
    KIND_CONTROL,
    KIND_NORMAL,
    KIND_UNKNOWN,
    KIND_UNUSED,
    MODEL_BPE,
    SPACE_PIECE,
    Tokenizer,
    piece_text_bytes,
    resolve_tokenizer,
)

SAMPLE_TEXT_FILE = ASSETS_DIR / "sample.txt"

LAYOUT_FORMAT = 1  # first byte of TextLayout.to_bytes(); bump when the scheme changes
_FLAG_CRLF, _FLAG_LINE_SPACE, _FLAG_SPACE_RUNS = 1, 2, 4
_KNOWN_FLAGS = _FLAG_CRLF | _FLAG_LINE_SPACE | _FLAG_SPACE_RUNS

# Byte values that never occur in valid UTF-8; their byte-fallback ids carry space runs instead.
RUN_TOKEN_BYTES = (0xC0, 0xC1) + tuple(range(0xF5, 0x100))
MIN_RUN, MAX_RUN = 2, 1 + len(RUN_TOKEN_BYTES)  # a run token stands for 2..14 spaces

_SPACE_PIECE_UTF8 = SPACE_PIECE.encode("utf-8")

# SentencePiece's BPE runs about twice as fast on short strings, so when it encodes (only for a vocabulary
# the numba encoder cannot take, see ``_bpe_tables``) long texts go in chunks of about this many bytes.
# Each cut falls right after a "\n": when no piece contains "\n" (``_Scheme.splits``), no merge can span
# a cut, and the chunked tokens equal those of the whole text (tested).
CHUNK_NBYTES = 4096
# The numba encoder keeps a V x V table of merges (int16 below 2**15 ids): 32 MiB at V = 4096. Larger
# vocabularies are encoded by SentencePiece itself (the same ids, tested on sp8192).
MAX_BPE_TABLE_VOCAB = 4096
SPLIT_NBYTES = 1 << 16  # a file this long or longer is encoded in two halves, on two threads (numba encoder)
MAX_CODEPOINT = 0x10FFFF


@dataclass(frozen=True)
class TextLayout:
    """File-level flags ``decode_text`` needs to give the exact bytes back (stored in a container as 2 bytes)."""

    crlf: bool = False  # every line end was CRLF: CRs were dropped, each LF token's nbytes includes its CR
    line_space: bool = True  # a zero-byte space was inserted after \n, \r, \t before a word start
    space_runs: bool = True  # runs of 2..14 "▁" tokens are single run tokens

    def to_bytes(self) -> bytes:
        flags = (_FLAG_CRLF * self.crlf) | (_FLAG_LINE_SPACE * self.line_space) | (_FLAG_SPACE_RUNS * self.space_runs)
        return bytes([LAYOUT_FORMAT, flags])

    def to_dict(self) -> dict:
        """JSON-friendly form (``from_dict`` reads it back)."""
        return {"format": LAYOUT_FORMAT, "crlf": self.crlf, "line_space": self.line_space,
                "space_runs": self.space_runs}

    @classmethod
    def from_dict(cls, fields: dict) -> TextLayout:
        expected = {"format", "crlf", "line_space", "space_runs"}
        if (
            not isinstance(fields, dict)
            or set(fields) != expected
            or fields["format"] != LAYOUT_FORMAT
            or not all(isinstance(fields[k], bool) for k in expected - {"format"})
        ):
            raise CtxmixError(
                f"text layout {fields!r}: expected format {LAYOUT_FORMAT} and booleans crlf, line_space, space_runs"
            )
        return cls(fields["crlf"], fields["line_space"], fields["space_runs"])

    @classmethod
    def from_bytes(cls, data: bytes) -> TextLayout:
        data = bytes(data)
        if len(data) != 2 or data[0] != LAYOUT_FORMAT or data[1] & ~_KNOWN_FLAGS:
            raise CtxmixError(
                f"text layout {data.hex() or '(empty)'}: expected 2 bytes, format {LAYOUT_FORMAT:02x} and flags "
                f"within {_KNOWN_FLAGS:02x}"
            )
        flags = data[1]
        return cls(bool(flags & _FLAG_CRLF), bool(flags & _FLAG_LINE_SPACE), bool(flags & _FLAG_SPACE_RUNS))


@dataclass(frozen=True)
class EncodedText:
    """Tokens of a text with the bytes each stands for, and the layout that decodes them."""

    tokens: np.ndarray  # int64[N]; tokens[0] is BOS
    nbytes: np.ndarray  # int64[N]; nbytes[0] == 0, nbytes[1:].sum() == len(data)
    layout: TextLayout


@dataclass(frozen=True)
class _Scheme:
    """Everything derived once from the tokenizer."""

    tokenizer: Tokenizer
    processor: object
    vocab_size: int
    bos_id: int
    space_id: int  # the standalone "▁" piece
    run_ids: np.ndarray | None  # int64[MAX_RUN + 1]; run_ids[k] = token for k spaces (k >= MIN_RUN); None: no byte fallback
    byte_ids: np.ndarray  # int64[256]; without byte fallback every entry is the unknown piece (refused after encoding)
    forbidden: np.ndarray  # bool[V]: ids text never contains after position 0 (control, unknown, unused)
    pieces: tuple  # bytes per id, runs as plain byte tokens
    pieces_runs: tuple  # bytes per id with run tokens read as runs
    line_space_insert: re.Pattern  # the line-space step as a regex (``layout_apply``'s reference in tests)
    starts_word: np.ndarray  # bool[MAX_CODEPOINT + 1]: a space is inserted after a line break before these
    bpe: tuple | None  # bpe_encode's (char_ids, pair_ids, ranks); None: SentencePiece encodes
    splits: bool  # a long text may be encoded in halves cut after a "\n": bpe_encode, and no piece joins "\n"
    chunks: bool  # SentencePiece may encode in chunks cut after a "\n": no piece holds a "\n"
    piece_bytes: np.ndarray  # uint8[]: every piece's bytes, runs as plain byte tokens, for pieces_decode
    piece_offsets: np.ndarray  # int64[V + 1]
    piece_offsets_runs: np.ndarray  # int64[V + 1] into piece_bytes_runs
    piece_bytes_runs: np.ndarray


def _flat_pieces(pieces) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(pieces) + 1, np.int64)
    offsets[1:] = np.cumsum([len(p) for p in pieces])
    return np.frombuffer(b"".join(pieces), np.uint8).copy(), offsets


def _bpe_tables(processor, kinds, model_type: int) -> tuple | None:
    """The tables ``bpe_encode`` needs, or None when the model breaks an assumption it relies on (then
    SentencePiece itself encodes): a BPE model of at most MAX_BPE_TABLE_VOCAB pieces, only normal and
    byte pieces besides the control and unknown ones, distinct scores, no "▁" after a piece's first
    character, every character of a piece a piece."""
    vocab_size = int(processor.vocab_size())
    if model_type != MODEL_BPE or vocab_size > MAX_BPE_TABLE_VOCAB:
        return None
    normal = [i for i in range(vocab_size) if kinds[i] == KIND_NORMAL]
    if any(kinds[i] not in (KIND_NORMAL, KIND_BYTE, KIND_CONTROL, KIND_UNKNOWN) for i in range(vocab_size)):
        return None
    text = {i: processor.id_to_piece(i) for i in normal}
    by_text = {piece: i for i, piece in text.items()}
    scores = [processor.get_score(i) for i in normal]
    if len(set(scores)) != len(scores):
        return None
    if any(SPACE_PIECE in piece[1:] or any(c not in by_text for c in piece) for piece in text.values()):
        return None
    char_ids = np.full(MAX_CODEPOINT + 1, NO_PIECE, np.int32)
    pair_ids = np.full((vocab_size, vocab_size), NO_PIECE, np.int16 if vocab_size < 1 << 15 else np.int32)
    for i, piece in text.items():
        if len(piece) == 1:
            char_ids[ord(piece)] = i
        for cut in range(1, len(piece)):  # a pair merges exactly when its concatenation is a piece
            left, right = by_text.get(piece[:cut]), by_text.get(piece[cut:])
            if left is not None and right is not None:
                pair_ids[left, right] = i
    ranks = np.zeros(vocab_size, np.int64)
    for rank, i in enumerate(sorted(normal, key=lambda i: -processor.get_score(i))):
        ranks[i] = rank  # 0 = the best score: merged first
    return char_ids, pair_ids, ranks


_schemes: dict[str, _Scheme] = {}
_schemes_lock = threading.Lock()


def _scheme(tokenizer=None) -> _Scheme:
    """The text scheme of ``tokenizer`` (default: the shipped sp1024), built once per model."""
    tok = resolve_tokenizer(tokenizer)
    with _schemes_lock:
        found = _schemes.get(tok.sha256)
        if found is None:
            found = _schemes[tok.sha256] = _build_scheme(tok)
    return found


def _build_scheme(tok: Tokenizer) -> _Scheme:
    processor = tok.identity
    vocab_size = tok.vocab_size
    pieces = piece_text_bytes(processor)
    kinds = tok.kinds
    byte_ids = tok.byte_ids
    run_ids = None
    pieces_runs = list(pieces)
    if byte_ids is not None:
        run_ids = np.full(MAX_RUN + 1, -1, dtype=np.int64)
        for k, byte_value in zip(range(MIN_RUN, MAX_RUN + 1), RUN_TOKEN_BYTES):
            run_ids[k] = byte_ids[byte_value]
            pieces_runs[byte_ids[byte_value]] = b" " * k
    else:  # a character with no piece becomes the unknown piece, which encode_text refuses in one line
        byte_ids = np.full(256, processor.unk_id(), dtype=np.int64)
    space_id = processor.piece_to_id(SPACE_PIECE)
    if processor.id_to_piece(space_id) != SPACE_PIECE:
        raise CtxmixError(f"tokenizer {tok.name} has no standalone '▁' piece, which text mode needs")
    # A space is inserted after a line break only before characters that start some "▁word" piece (and
    # before a space, which keeps the transform reversible); elsewhere it would just add a "▁" token.
    starters = {
        processor.id_to_piece(i)[1]
        for i in range(vocab_size)
        if kinds[i] not in (KIND_CONTROL, KIND_UNKNOWN, KIND_UNUSED)
        and processor.id_to_piece(i).startswith(SPACE_PIECE)
        and len(processor.id_to_piece(i)) > 1
    }
    starters.discard(SPACE_PIECE)
    alternatives = sorted({re.escape(c.encode("utf-8")) for c in starters | {" "}}, key=len, reverse=True)
    # A zero-byte space goes after "\n", "\r", "\t" (line_space): the official normalizer folds each of them
    # into "▁", so the model saw a "▁word" piece after them (kernels/text.py tests the same three bytes).
    insert = re.compile(rb"([\n\r\t])(?=" + b"|".join(alternatives) + rb")")
    starts_word = np.zeros(MAX_CODEPOINT + 1, np.bool_)
    starts_word[[ord(c) for c in starters | {" "}]] = True
    piece_bytes, piece_offsets = _flat_pieces(pieces)
    piece_bytes_runs, piece_offsets_runs = _flat_pieces(pieces_runs)
    bpe = _bpe_tables(processor, kinds, tok.model_type)
    return _Scheme(
        tokenizer=tok,
        processor=processor,
        vocab_size=vocab_size,
        bos_id=tok.bos_id,
        space_id=int(space_id),
        run_ids=run_ids,
        byte_ids=byte_ids,
        forbidden=np.isin(kinds, (KIND_CONTROL, KIND_UNKNOWN, KIND_UNUSED)),
        pieces=tuple(pieces),
        pieces_runs=tuple(pieces_runs),
        line_space_insert=insert,
        starts_word=starts_word,
        bpe=bpe,
        # (a piece holding "\n" beside other bytes could merge across a cut)
        splits=bpe is not None and not any(b"\n" in piece and piece != b"\n" for piece in pieces),
        chunks=not any(b"\n" in piece for piece, kind in zip(pieces, kinds) if kind != KIND_BYTE),
        piece_bytes=piece_bytes,
        piece_offsets=piece_offsets,
        piece_offsets_runs=piece_offsets_runs,
        piece_bytes_runs=piece_bytes_runs,
    )


def text_vocab_size(tokenizer=None) -> int:
    """Vocabulary size of text-mode streams (default: the shipped tokenizer's, 1024)."""
    return resolve_tokenizer(tokenizer).vocab_size


def space_runs_default(tokenizer=None) -> bool:
    """Whether ``encode_text`` merges space runs unless told: when the tokenizer has byte-fallback pieces."""
    return _scheme(tokenizer).run_ids is not None


def check_utf8(data: bytes, where: str) -> str:
    """``data`` decoded, or ``CtxmixError`` giving the offset of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CtxmixError(
            f"{where}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start} is invalid); "
            f"text mode scores UTF-8 files only"
        ) from None


def is_all_crlf(data: bytes) -> bool:
    """True when ``data`` has line ends, every one is CRLF, and no CR stands anywhere else."""
    pairs, crs, lfs = line_end_counts(np.frombuffer(data, np.uint8))
    return pairs > 0 and crs == pairs and lfs == pairs


def _chunks(segment: bytes) -> list[bytes]:
    """``segment`` cut right after a "\\n" roughly every CHUNK_NBYTES (at least one chunk, maybe empty)."""
    chunks = []
    start = 0
    while True:
        cut = segment.find(b"\n", start + CHUNK_NBYTES)
        if cut < 0:
            chunks.append(segment[start:])
            return chunks
        chunks.append(segment[start : cut + 1])
        start = cut + 1


def _tokenize(text: bytes, scheme: _Scheme) -> np.ndarray:
    """int64 ids of ``text`` (valid UTF-8) under identity normalization, a literal U+2581 as byte tokens."""
    if scheme.bpe is None:
        return _tokenize_sentencepiece(text, scheme)
    char_ids, pair_ids, ranks = scheme.bpe
    return bpe_encode(np.frombuffer(text, np.uint8), char_ids, scheme.space_id, pair_ids, ranks, scheme.byte_ids)


def _tokenize_sentencepiece(text: bytes, scheme: _Scheme) -> np.ndarray:
    """``_tokenize`` by SentencePiece itself (the reference the numba encoder is tested against)."""
    chunks: list[str] = []
    literal_after: list[bool] = []
    segments = text.split(_SPACE_PIECE_UTF8)
    for index, segment in enumerate(segments):
        for chunk in _chunks(segment) if scheme.chunks else [segment]:
            chunks.append(chunk.decode("utf-8"))
            literal_after.append(False)
        literal_after[-1] = index < len(segments) - 1
    literal = [int(scheme.byte_ids[b]) for b in _SPACE_PIECE_UTF8]
    ids: list[int] = []
    for chunk_ids, then_literal in zip(scheme.processor.encode(chunks), literal_after):
        ids.extend(chunk_ids)
        if then_literal:
            ids.extend(literal)
    return np.array(ids, dtype=np.int64)


def encode_text(
    data: bytes,
    *,
    tokenizer=None,
    crlf: bool | None = None,
    line_space: bool = True,
    space_runs: bool | None = None,
    where: str = "text",
) -> EncodedText:
    """Tokenize UTF-8 ``data`` losslessly: ``decode_text(e.tokens, e.layout) == data``, checked here.

    ``tokenizer``: a SentencePiece ``Tokenizer`` or a path to a ``.model`` file (default: the shipped
    sp1024); a Hugging Face tokenizer encodes with its own method (``hf_tokenizer.py``).
    ``crlf=None`` sets the CRLF flag when every line end is CRLF; ``True`` demands it, ``False`` keeps
    CRs as byte tokens. ``line_space`` and ``space_runs`` switch steps 3 and 4 of the module docstring
    (``space_runs=None``: ``space_runs_default``). Returns tokens with a BOS at position 0 (0 bytes) and
    ``nbytes`` summing to ``len(data)`` over positions 1..N-1: the bytes each token gives back when
    decoded. Refuses (``CtxmixError`` naming ``where``) data that is not UTF-8, and tokens that do not
    decode back to ``data`` exactly (naming the tokenizer when it cannot round-trip the file).
    """
    tok = resolve_tokenizer(tokenizer)
    if not isinstance(tok, Tokenizer):
        return tok.encode_text(data, where=where)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CtxmixError(f"encode_text takes bytes, got {type(data).__name__}")
    data = bytes(data)
    check_utf8(data, where)
    scheme = _scheme(tok)
    if space_runs is None:
        space_runs = space_runs_default(tok)
    if space_runs and scheme.run_ids is None:
        raise CtxmixError(f"{where}: space_runs needs byte-fallback pieces, which tokenizer {tok.name} lacks")
    all_crlf = is_all_crlf(data)
    if crlf is None:
        crlf = all_crlf
    elif crlf and not all_crlf:
        raise CtxmixError(f"{where}: crlf=True needs every line end to be CRLF and no other CR")
    layout = TextLayout(crlf=bool(crlf), line_space=bool(line_space), space_runs=bool(space_runs))

    view = np.frombuffer(data, np.uint8)
    cut = data.find(b"\n", len(data) // 2) + 1 if len(data) >= SPLIT_NBYTES and scheme.splits else 0
    if not 0 < cut < len(data):
        parts = [_encode_span(view, 0, len(data), layout, scheme, where)]
    else:
        # Two halves on two threads (the kernels release the GIL), cut right after a "\n": no piece joins
        # "\n" to other bytes, so no merge or space run spans the cut, and the line space the word after
        # the cut gets is written in the second half (``layout_apply``): the tokens equal those of one
        # pass (tested).
        second = second_thread().submit(_encode_span, view, cut, len(data), layout, scheme, where)
        try:
            first = _encode_span(view, 0, cut, layout, scheme, where)
            # Each half is decoded from the state a "\n" leaves; the first half must end in that state.
            seam_holds = _pieces_of(layout, scheme)[int(first[0][-1])].endswith(b"\n")
        finally:  # (on an error here, the other half still ends before we return)
            futures.wait([second])
        if not seam_holds:  # (before the second half's own faults, which lie further on)
            raise CtxmixError(f"{where}: tokens do not decode back to the file (first difference at byte {cut}); "
                              f"refusing to score it")
        parts = [first, second.result()]
    tokens = np.empty(1 + sum(len(ids) for ids, _ in parts), np.int64)
    nbytes = np.empty(len(tokens), np.int64)
    tokens[0], nbytes[0] = scheme.bos_id, 0  # BOS: 0 bytes
    at = 1
    for ids, counts in parts:
        tokens[at : at + len(ids)] = ids
        nbytes[at : at + len(ids)] = counts
        at += len(ids)
    return EncodedText(tokens, nbytes, layout)


def _encode_span(view: np.ndarray, start: int, end: int, layout: TextLayout, scheme: _Scheme,
                 where: str) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of ``view[start:end]`` (a cut right after a "\n", or the whole file) and the bytes each
    decodes to, checked: decoded from the state the bytes before ``start`` leave, they give back
    exactly ``view[start:end]``."""
    text = layout_apply(view, start, end, layout.crlf, layout.line_space, scheme.starts_word)
    ids = _tokenize(text.tobytes(), scheme)
    if len(ids) and scheme.forbidden[ids].any():  # byte fallback makes this impossible; keep it checked
        what = ("it has no byte-fallback pieces for a character outside its vocabulary"
                if scheme.tokenizer.byte_ids is None else "it produced an unknown or control token")
        raise CtxmixError(f"{where}: tokenizer {scheme.tokenizer.name} cannot round-trip this file ({what})")
    if layout.space_runs:
        ids = merge_space_runs(ids, scheme.space_id, scheme.run_ids, MIN_RUN, MAX_RUN)
    counts = np.empty(len(ids), np.int64)
    piece_bytes, piece_offsets = _piece_arrays(layout, scheme)
    mismatch = decode_mismatch(ids, piece_bytes, piece_offsets, layout.line_space, layout.crlf,
                               int(view[start - 1]) if start else -1, view[start:end], counts)
    if mismatch >= 0:
        raise CtxmixError(f"{where}: tokens do not decode back to the file (first difference at byte "
                          f"{start + mismatch}); refusing to score it")
    return ids, counts


def _pieces_of(layout: TextLayout, scheme: _Scheme) -> tuple:
    """Bytes per token id under ``layout``."""
    return scheme.pieces_runs if layout.space_runs else scheme.pieces


def _piece_arrays(layout: TextLayout, scheme: _Scheme) -> tuple[np.ndarray, np.ndarray]:
    """``pieces_decode``'s flat piece bytes and offsets under ``layout``."""
    if layout.space_runs:
        return scheme.piece_bytes_runs, scheme.piece_offsets_runs
    return scheme.piece_bytes, scheme.piece_offsets


def decode_text(tokens: np.ndarray, layout: TextLayout, tokenizer=None) -> bytes:
    """The bytes ``tokens`` (BOS first, as ``encode_text`` returns them) stand for under ``layout``."""
    tok = resolve_tokenizer(tokenizer)
    if not isinstance(tok, Tokenizer):
        return tok.decode_text(tokens, layout)
    scheme = _scheme(tok)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or len(tokens) == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise CtxmixError(f"decode_text needs a non-empty 1-D integer token array, got shape {tokens.shape}")
    if int(tokens[0]) != scheme.bos_id:
        raise CtxmixError(f"decode_text: token 0 is {int(tokens[0])}, expected BOS ({scheme.bos_id})")
    body = tokens[1:]
    if len(body):
        bad = np.flatnonzero((body < 0) | (body >= scheme.vocab_size))
        if len(bad):
            raise CtxmixError(
                f"decode_text: token {int(body[bad[0]])} at position {int(bad[0]) + 1} is outside "
                f"0..{scheme.vocab_size - 1}"
            )
        bad = np.flatnonzero(scheme.forbidden[body])
        if len(bad):
            raise CtxmixError(
                f"decode_text: control or unknown token {int(body[bad[0]])} at position {int(bad[0]) + 1}; "
                f"text tokens have BOS only at position 0"
            )
    return _decode_array(body.astype(np.int64), layout, scheme).tobytes()


def _decode_array(body: np.ndarray, layout: TextLayout, scheme: _Scheme) -> np.ndarray:
    """uint8 bytes of checked tokens ``body`` (no BOS); ``decode_text`` without the checks or the copy."""
    piece_bytes, piece_offsets = _piece_arrays(layout, scheme)
    return pieces_decode(body, piece_bytes, piece_offsets, layout.line_space, layout.crlf, -1, np.zeros(0, np.int64))


def load_text(path: str | os.PathLike, tokenizer=None, **options) -> Stream:
    """A UTF-8 file as a text-mode ``Stream``: BOS then lossless tokens, ``nbytes`` = the file's real bytes.

    ``tokenizer`` and ``options`` (``space_runs``, ...): see ``encode_text`` (default: the shipped sp1024).
    Refuses (one-line ``CtxmixError``) a missing or empty file, a file that is not UTF-8 (naming the offset
    of the first bad byte), and any file whose tokens do not decode back to its exact bytes.
    """
    tok = resolve_tokenizer(tokenizer)
    path = Path(path)
    try:
        if path.is_dir():
            raise CtxmixError(f"{path}: is a directory, expected a text file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise CtxmixError(f"{path}: no such file") from None
    except OSError as exc:
        raise CtxmixError(f"{path}: cannot read it ({exc.strerror})") from None
    if not data:
        raise CtxmixError(f"{path}: file is empty, nothing to score")
    encoded = encode_text(data, tokenizer=tok, where=str(path), **options)
    return Stream(str(path), encoded.tokens, encoded.nbytes, tok.vocab_size, "text")


def sample_text_path() -> Path:
    """The sample text shipped in the package (FineWeb documents; see assets/SOURCES.md)."""
    return SAMPLE_TEXT_FILE
