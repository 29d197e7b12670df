"""A Hugging Face model's own tokenizer, as a text-mode tokenizer (``hf:path=DIR`` brings it to a run).

The model directory holds the tokenizer (``tokenizer.json``, read by the ``tokenizers`` library that
transformers' fast tokenizers run on) and ``config.json`` (the model's vocabulary size). Text mode with
it is lossless and checked, like SentencePiece text mode (``text.py``), with no transform of its own:

* tokens: BOS (else EOS) at position 0, covering no byte, then the tokenizer's ids of the whole text
  (no special tokens added);
* lossless: ``decode(encode(text)) == text`` is verified for every file, and a tokenizer that cannot
  round-trip it (one that normalizes, or drops what it does not know) is refused in one line naming it
  and the first byte that differs;
* bytes: each file byte is attributed to exactly one token, from the tokenizer's character offsets:
  token i covers the bytes up to the furthest character end among tokens 0..i (the bytes of a character
  split into several byte-level tokens all go to the first; what no offset reaches, such as trailing
  whitespace a tokenizer trims from its offsets, goes to the last token). So ``nbytes[1:].sum()`` is
  the file's length, as in SentencePiece text mode.

``transformers`` is the optional extra ``[hf]``; it is imported only here and in ``experts/hf.py``, and a
run without it gets one line naming the extra. Nothing is downloaded: files are read from the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np

from ..errors import CtxmixError

# Files that define a Hugging Face tokenizer; their bytes and the model's vocabulary size make its sha256
# (two models saved with the same tokenizer and vocabulary size share one, and can score one stream).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model")
MAX_VOCAB_SIZE = 1 << 20  # the codec's 24-bit frequencies leave 2**24 - V for the distribution


def require_transformers():
    """The ``transformers`` module, or one line naming the ``[hf]`` extra that installs it."""
    try:
        import transformers
    except ImportError as exc:
        raise CtxmixError(f"the hf expert needs transformers ({exc}): pip install 'ctxmix[hf]'") from None
    return transformers


def tokenizer_files_sha256(directory: Path) -> str:
    """sha256 over the tokenizer files of ``directory`` (names and bytes, in ``TOKENIZER_FILES`` order) and
    the model's vocabulary size."""
    digest = hashlib.sha256(f"vocab_size\0{_config_vocab_size(directory)}\0".encode())
    for name in TOKENIZER_FILES:
        path = directory / name
        if path.is_file():
            data = path.read_bytes()
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
    return digest.hexdigest()


def _config_vocab_size(directory: Path) -> int | None:
    """``vocab_size`` of the model's ``config.json`` (or of its ``text_config``), None when absent."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CtxmixError(f"{path}: cannot be read as JSON ({type(exc).__name__})") from None
    for holder in (config, config.get("text_config") if isinstance(config, dict) else None):
        if isinstance(holder, dict) and isinstance(holder.get("vocab_size"), int):
            return int(holder["vocab_size"])
    return None


class HFTokenizer:
    """The tokenizer of a Hugging Face model directory, with ``Tokenizer``'s text-mode methods."""

    kind = "hf"

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        self.path = str(directory)
        self.name = str(directory)
        if not (directory / "tokenizer.json").is_file():
            what = "no such directory" if not directory.is_dir() else "no tokenizer.json in it"
            raise CtxmixError(f"tokenizer {directory}: {what} (a Hugging Face model directory saved with its "
                              "fast tokenizer is expected)")
        require_transformers()
        from tokenizers import Tokenizer as Backend

        try:
            self.backend = Backend.from_file(str(directory / "tokenizer.json"))
        except Exception as exc:  # noqa: BLE001 - the library's failure, one line here
            raise CtxmixError(f"tokenizer {directory}: cannot load tokenizer.json ({type(exc).__name__}: {exc})") from None
        self.sha256 = tokenizer_files_sha256(directory)
        own = int(self.backend.get_vocab_size(with_added_tokens=True))
        self.vocab_size = _config_vocab_size(directory) or own  # the model's output size: every id it scores
        if not 2 <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise CtxmixError(f"tokenizer {directory}: vocabulary of {self.vocab_size}, expected 2..{MAX_VOCAB_SIZE}")
        self.bos_id = self._start_id(directory)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name}, vocab {self.vocab_size}, sha256 {self.sha256[:12]})"

    shipped = False

    def _start_id(self, directory: Path) -> int:
        """BOS, else EOS, from ``tokenizer_config.json`` / ``special_tokens_map.json`` (a token name or dict)."""
        names = {}
        for file in ("special_tokens_map.json", "tokenizer_config.json"):
            path = directory / file
            if path.is_file():
                try:
                    found = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                for key in ("bos_token", "eos_token"):
                    value = found.get(key) if isinstance(found, dict) else None
                    if isinstance(value, dict):
                        value = value.get("content")
                    if isinstance(value, str) and key not in names:
                        names[key] = value
        for key in ("bos_token", "eos_token"):
            token_id = self.backend.token_to_id(names[key]) if key in names else None
            if token_id is not None and 0 <= token_id < self.vocab_size:
                return int(token_id)
        raise CtxmixError(f"tokenizer {directory}: no BOS or EOS token to start a text stream with")

    def encode_text(self, data: bytes, *, where: str = "text", **_options):
        """``text.EncodedText`` of UTF-8 ``data``: BOS, then the tokenizer's ids; checked lossless (module
        docstring). Text-mode options of SentencePiece (``crlf``, ``line_space``, ``space_runs``) do not
        apply and are ignored."""
        from .text import EncodedText, TextLayout, check_utf8

        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CtxmixError(f"encode_text takes bytes, got {type(data).__name__}")
        data = bytes(data)
        text = check_utf8(data, where)
        with self._lock:  # (a tokenizers object is not documented as safe to share between threads)
            encoding = self.backend.encode(text, add_special_tokens=False)
            ids = np.asarray(encoding.ids, dtype=np.int64)
            decoded = self.backend.decode(encoding.ids, skip_special_tokens=False)
        if decoded != text:
            restored = decoded.encode("utf-8", "surrogatepass")
            at = next((i for i, (a, b) in enumerate(zip(restored, data)) if a != b), min(len(restored), len(data)))
            raise CtxmixError(f"{where}: tokenizer {self.name} cannot round-trip this file (first difference at "
                              f"byte {at}); refusing to score it")
        if len(ids) and int(ids.max()) >= self.vocab_size:
            raise CtxmixError(f"{where}: tokenizer {self.name} gave id {int(ids.max())}, beyond the model's "
                              f"vocabulary 0..{self.vocab_size - 1}")
        tokens = np.concatenate([[self.bos_id], ids]).astype(np.int64)
        nbytes = np.zeros(len(tokens), np.int64)
        nbytes[1:] = _bytes_per_token(data, encoding.offsets)
        return EncodedText(tokens, nbytes, TextLayout(crlf=False, line_space=False, space_runs=False))

    def decode_text(self, tokens, layout) -> bytes:
        """The bytes of ``tokens`` (BOS first, as ``encode_text`` returns them)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or len(tokens) == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise CtxmixError(f"decode_text needs a non-empty 1-D integer token array, got shape {tokens.shape}")
        if int(tokens[0]) != self.bos_id:
            raise CtxmixError(f"decode_text: token 0 is {int(tokens[0])}, expected BOS ({self.bos_id})")
        body = tokens[1:]
        if len(body) and (int(body.min()) < 0 or int(body.max()) >= self.vocab_size):
            bad = int(np.flatnonzero((body < 0) | (body >= self.vocab_size))[0])
            raise CtxmixError(f"decode_text: token {int(body[bad])} at position {bad + 1} is outside "
                              f"0..{self.vocab_size - 1}")
        with self._lock:
            text = self.backend.decode(body.tolist(), skip_special_tokens=False)
        return text.encode("utf-8", "surrogatepass")

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "path": self.path, "sha256": self.sha256,
                "vocab_size": self.vocab_size}


def _bytes_per_token(data: bytes, offsets) -> np.ndarray:
    """int64[N]: bytes of ``data`` attributed to each of N tokens from their (start, end) character offsets
    (module docstring); sums to ``len(data)``."""
    n = len(offsets)
    if n == 0:
        return np.zeros(0, np.int64)
    view = np.frombuffer(data, np.uint8)
    char_starts = np.flatnonzero((view & 0xC0) != 0x80)  # byte offset of each character
    byte_of_char = np.append(char_starts, len(data)).astype(np.int64)  # char index -> byte offset
    ends = np.fromiter((end for _start, end in offsets), np.int64, n)
    reach = np.maximum.accumulate(np.clip(ends, 0, len(byte_of_char) - 1))
    covered = byte_of_char[reach]
    counts = np.diff(np.concatenate([[0], covered]))
    counts[-1] += len(data) - covered[-1]
    return counts


_loaded: dict[str, HFTokenizer] = {}
_loaded_lock = threading.Lock()


def hf_tokenizer(directory: str | os.PathLike) -> HFTokenizer:
    """The tokenizer of the model directory ``directory`` (cached by path and tokenizer sha256)."""
    key = os.path.realpath(directory)
    with _loaded_lock:
        found = _loaded.get(key)
    if found is not None and found.sha256 == tokenizer_files_sha256(Path(directory)):
        return found
    made = HFTokenizer(directory)
    with _loaded_lock:
        _loaded[key] = made
    return made
