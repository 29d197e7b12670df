"""The data layer: token streams from text files (lossless) and Parameter Golf shards (challenge bytes).

* ``load_text(path)``: a UTF-8 file as a text-mode ``Stream`` (BOS, then tokens that decode back to the
  exact bytes; ``nbytes`` are the file's real bytes). See ``text.py`` for the tokenization scheme.
* ``load_shards(pattern_or_list, max_tokens=None)``: shards concatenated in name order as a shard-mode
  ``Stream``, bytes counted as the challenge counts them (``nbytes.py``).
* ``default_tokenizer()``: the official sp1024 SentencePiece model shipped in ``assets/``.
* ``Tokenizer`` / ``load_tokenizer(path)`` / ``shipped_tokenizer()``: one object per SentencePiece model
  (any vocabulary up to 65,536), which ``load_text``, ``encode_text``, ``decode_text`` and ``load_shards``
  take as ``tokenizer=`` (default: the shipped sp1024); ``hf_tokenizer.HFTokenizer`` is a Hugging Face
  model's own tokenizer with the same text-mode methods.

Nothing here reads outside the package at run time except the files it is asked to load.
"""

from .nbytes import ShardByteTables, default_shard_byte_tables, shard_byte_counts
from .shard import load_shards, read_shard, write_shard
from .text import EncodedText, TextLayout, decode_text, encode_text, load_text, sample_text_path
from .tokenizer import (
    Tokenizer,
    default_tokenizer,
    identity_tokenizer,
    load_tokenizer,
    resolve_tokenizer,
    shipped_tokenizer,
    tokenizer_sha256,
    tokenizer_vocab_size,
)

__all__ = [
    "EncodedText",
    "ShardByteTables",
    "TextLayout",
    "Tokenizer",
    "decode_text",
    "default_shard_byte_tables",
    "default_tokenizer",
    "encode_text",
    "identity_tokenizer",
    "load_shards",
    "load_text",
    "load_tokenizer",
    "read_shard",
    "resolve_tokenizer",
    "sample_text_path",
    "shard_byte_counts",
    "shipped_tokenizer",
    "tokenizer_sha256",
    "tokenizer_vocab_size",
    "write_shard",
]
