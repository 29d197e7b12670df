"""Text and JSONL files -> training and validation token shards (the challenge's shard format).

Each input is a list of documents: a ``.jsonl`` file has one JSON object per line with the document in
its ``"text"`` field; any other file is one UTF-8 document. Every document is written as BOS (id 1)
followed by its tokens, as the challenge's export does. Two tokenizations:

- ``challenge`` (default): the official sp1024 model as the challenge's export runs it (NFKC
  normalization, whitespace folded): the tokens of the FineWeb shards.
- ``text``: ctxmix's lossless text mode (``ctxmix.data.encode_text``): the tokens ``ctxmix score FILE``
  scores, newlines and runs of spaces included. Train on these for a model meant to score text files.

Validation split: the last ``val_fraction`` of each input file's tokens. When a file holds several
documents the cut moves to the nearest document start; a single document is cut mid-text and its
validation part starts with a BOS of its own. Shards hold at most ``shard_tokens`` tokens each and are
named ``train_000000.bin``, ``val_000000.bin``, ...; a ``prepare.json`` beside them records what was done.

Order: the loader streams training tokens in shard order, as the challenge's does (FineWeb shards come
shuffled). Inputs that are a few long files would then be learned one after the other; ``shuffle_block``
> 0 cuts the training tokens into blocks of that many tokens and writes them in a seeded random order
(validation tokens keep their order).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ctxmix.atomic import write_text_atomic
from ctxmix.errors import CtxmixError

TOKENIZATIONS = ("challenge", "text")
DEFAULT_SHARD_TOKENS = 100_000_000  # the challenge's shards hold 100M tokens
MANIFEST = "prepare.json"


@dataclass
class PrepareResult:
    out_dir: str
    tokenization: str
    files: list[dict] = field(default_factory=list)  # per input: path, documents, train/val tokens
    train_shards: list[str] = field(default_factory=list)
    val_shards: list[str] = field(default_factory=list)
    train_tokens: int = 0
    val_tokens: int = 0

    @property
    def documents(self) -> int:
        return sum(f["documents"] for f in self.files)


def read_documents(path: Path) -> list[str]:
    """The documents of one input file (see the module docstring)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CtxmixError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CtxmixError(f"{path}: is a directory, expected a text or JSONL file") from None
    except OSError as exc:
        raise CtxmixError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CtxmixError(f"{path}: not UTF-8 (first bad byte at offset {exc.start})") from None
    if path.suffix.lower() != ".jsonl":
        if not text:
            raise CtxmixError(f"{path}: file is empty")
        return [text]
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CtxmixError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:  # an integer of too many digits, nesting too deep
            raise CtxmixError(f"{path}:{lineno}: cannot be read ({type(exc).__name__})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CtxmixError(f"{path}:{lineno}: expected an object with a string \"text\" field")
        docs.append(obj["text"])
    if not docs:
        raise CtxmixError(f"{path}: no documents (expected one JSON object per line with a \"text\" field)")
    return docs


def tokenize_documents(docs: list[str], tokenization: str, sp_model: str | os.PathLike | None = None) -> list[np.ndarray]:
    """BOS + tokens for each document (int64 arrays), with the SentencePiece model ``sp_model`` (default:
    the shipped sp1024)."""
    from ctxmix.data import resolve_tokenizer

    tok = resolve_tokenizer(sp_model)
    if tokenization == "challenge":
        sp = tok.processor
        bos = tok.bos_id
        return [np.asarray([bos] + ids, dtype=np.int64) for ids in sp.encode(docs)]
    if tokenization == "text":
        return [tok.encode_text(doc.encode("utf-8")).tokens for doc in docs]  # tokens[0] is BOS
    raise CtxmixError(f"unknown tokenization {tokenization!r}: expected one of {', '.join(TOKENIZATIONS)}")


def split_tokens(doc_tokens: list[np.ndarray], val_fraction: float, bos: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) tokens of one file: the last ``val_fraction`` of its tokens go to validation."""
    tokens = np.concatenate(doc_tokens)
    if val_fraction <= 0:
        return tokens, np.zeros(0, dtype=np.int64)
    cut = int(round(len(tokens) * (1.0 - val_fraction)))
    starts = np.cumsum([0] + [len(d) for d in doc_tokens[:-1]])
    if len(doc_tokens) > 1:
        inner = starts[1:]  # document starts that leave at least one document on each side
        cut = int(inner[np.argmin(np.abs(inner - cut))])
        return tokens[:cut], tokens[cut:]
    cut = min(max(cut, 1), len(tokens) - 1)
    return tokens[:cut], np.concatenate(([bos], tokens[cut:]))


def shuffle_blocks(tokens: np.ndarray, block: int, seed: int) -> np.ndarray:
    """``tokens`` cut into blocks of ``block`` tokens (the last may be shorter), in a seeded random order."""
    if block <= 0 or len(tokens) <= block:
        return tokens
    blocks = [tokens[i : i + block] for i in range(0, len(tokens), block)]
    order = np.random.default_rng(seed).permutation(len(blocks))
    return np.concatenate([blocks[i] for i in order])


def _shard_paths(out_dir: Path, split: str, n_tokens: int, shard_tokens: int) -> list[Path]:
    n = max(1, -(-n_tokens // shard_tokens)) if n_tokens else 0
    return [out_dir / f"{split}_{i:06d}.bin" for i in range(n)]


def _existing_shards(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.suffix == ".bin" and ("train_" in p.name or "val_" in p.name))


def _make_directory(out: Path) -> bool:
    """Create ``out`` if missing (True when this call created it); refuse one that cannot be written."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CtxmixError(f"cannot create output directory {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise CtxmixError(f"output directory {out} is not writable")
    return created


def prepare(inputs: list[str | os.PathLike], out_dir: str | os.PathLike, val_fraction: float = 0.1,
            tokenization: str = "challenge", shard_tokens: int = DEFAULT_SHARD_TOKENS,
            force: bool = False, shuffle_block: int = 0, seed: int = 0,
            sp_model: str | os.PathLike | None = None) -> PrepareResult:
    """Tokenize ``inputs`` and write train/val shards plus ``prepare.json`` into ``out_dir``; ``sp_model``:
    a SentencePiece ``.model`` file to tokenize with instead of the shipped sp1024 (its sha256 is recorded;
    train with ``--set vocab_size=V --set tokenizer=FILE``)."""
    from ctxmix.data import resolve_tokenizer, write_shard

    if not inputs:
        raise CtxmixError("no input files given: expected text or JSONL files")
    if not 0.0 <= val_fraction < 1.0:
        raise CtxmixError(f"--val-fraction {val_fraction}: expected a number in [0, 1)")
    if shuffle_block < 0:
        raise CtxmixError(f"--shuffle-block {shuffle_block}: expected a number of tokens >= 0")
    if shard_tokens < 1:
        raise CtxmixError(f"--shard-tokens {shard_tokens}: expected a positive number")
    if tokenization not in TOKENIZATIONS:
        raise CtxmixError(f"unknown tokenization {tokenization!r}: expected one of {', '.join(TOKENIZATIONS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CtxmixError(f"output {out} exists and is not a directory")
    existing = _existing_shards(out)
    if existing and not force:
        raise CtxmixError(f"{out} already holds shards ({existing[0].name}, ...): use --force to replace them "
                          "or choose another directory")

    # Every input is read and tokenized before anything is created: a bad input leaves no folder behind.
    tok = resolve_tokenizer(sp_model)
    if tok.kind != "sentencepiece":
        raise CtxmixError(f"--sp-model {sp_model}: expected a SentencePiece .model file")
    bos = tok.bos_id
    result = PrepareResult(str(out), tokenization)
    train_parts, val_parts = [], []
    for item in inputs:
        path = Path(item)
        docs = read_documents(path)
        train, val = split_tokens(tokenize_documents(docs, tokenization, tok), val_fraction, bos)
        train_parts.append(train)
        val_parts.append(val)
        result.files.append({"path": str(path), "documents": len(docs), "bytes": path.stat().st_size,
                             "train_tokens": int(len(train)), "val_tokens": int(len(val))})
    train_all = shuffle_blocks(np.concatenate(train_parts), shuffle_block, seed)
    val_all = np.concatenate(val_parts)
    created = _make_directory(out)
    written: list[Path] = []
    try:
        for stale in existing:
            stale.unlink()
        for split, tokens, names in (("train", train_all, result.train_shards), ("val", val_all, result.val_shards)):
            for i, path in enumerate(_shard_paths(out, split, len(tokens), shard_tokens)):
                write_shard(path, tokens[i * shard_tokens : (i + 1) * shard_tokens])
                written.append(path)
                names.append(path.name)
        result.train_tokens, result.val_tokens = int(len(train_all)), int(len(val_all))
        manifest = asdict(result) | {"val_fraction": val_fraction, "shard_tokens": shard_tokens,
                                     "shuffle_block": shuffle_block, "seed": seed,
                                     "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
                                     "bos_id": int(bos)}
        write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        if created:  # a folder this run made: take away what it wrote, then the folder if that empties it
            for path in written:
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    return result
