"""Streaming training batches from token shards, for any world size.

The training shards are read in name order as one endless stream (epoch after epoch, like the challenge's
``TokenStream``). Each optimizer step takes the next ``S * T`` tokens of the stream as the global batch of
``S`` sequences of length ``T`` (plus one token of lookahead for the last target), so every token is a
target exactly once per epoch and the global batch does not depend on the number of processes. Rank ``r``
of ``K`` gets its own contiguous slice of the batch, sequences ``[S*r//K, S*(r+1)//K)``, and splits it into
micro-batches of at most ``micro_batch_seqs`` sequences (gradient accumulation).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctxmix.errors import CtxmixError

TRAIN_GLOB = "*train_*.bin"  # prepare writes train_000000.bin...; the challenge's fineweb_train_*.bin match too
VAL_GLOB = "*val_*.bin"


def find_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """Sorted shard paths of ``split`` ("train" or "val") in ``data_dir``; raises if there are none."""
    directory = Path(data_dir)
    if not directory.is_dir():
        raise CtxmixError(f"data directory {directory} does not exist (make one with `ctxmix-train prepare`)")
    pattern = TRAIN_GLOB if split == "train" else VAL_GLOB
    paths = sorted(Path(p) for p in glob.glob(str(directory / pattern)))
    if not paths:
        raise CtxmixError(f"no {split} shards in {directory}: expected files named {pattern} "
                          "(make them with `ctxmix-train prepare`)")
    return paths


def read_checked_shard(path: Path, vocab_size: int) -> np.ndarray:
    """The tokens of one shard as int64[N]; raises if a token id is outside the model's vocabulary."""
    from ctxmix.data import read_shard

    tokens = np.asarray(read_shard(path)).astype(np.int64, copy=False)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise CtxmixError(f"shard {path}: holds token id {int(tokens.max())}, but the model's vocab_size is "
                          f"{vocab_size} (shards and model must use the same tokenizer)")
    if tokens.size == 0:
        raise CtxmixError(f"shard {path}: holds no tokens")
    return tokens


def load_val_tokens(paths: list[Path], vocab_size: int, seq_len: int, max_tokens: int = 0) -> np.ndarray:
    """Validation tokens: all shards concatenated, cut to a whole number of windows plus one (int64).

    ``max_tokens`` > 0 keeps only the first ``max_tokens`` targets (rounded down to whole windows).
    """
    parts, total = [], 0
    for path in paths:
        part = read_checked_shard(path, vocab_size)
        parts.append(part)
        total += part.size
        if max_tokens and total > max_tokens:
            break
    tokens = np.concatenate(parts)
    limit = tokens.size - 1 if not max_tokens else min(tokens.size - 1, max_tokens)
    usable = (limit // seq_len) * seq_len
    if usable <= 0:
        raise CtxmixError(f"validation shards hold {tokens.size} tokens: need at least train_seq_len+1 = "
                          f"{seq_len + 1}")
    return tokens[: usable + 1]


class TokenStream:
    """The training shards as one endless token stream (shards in order, then from the first again)."""

    def __init__(self, paths: list[Path], vocab_size: int):
        assert paths
        self.paths = paths
        self.vocab_size = vocab_size
        self.shard_index = 0
        self.tokens = read_checked_shard(paths[0], vocab_size)
        self.pos = 0
        self.epoch = 0

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` tokens (int64[n]), crossing shard boundaries and wrapping around."""
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            if self.pos >= self.tokens.size:
                self.shard_index += 1
                if self.shard_index == len(self.paths):
                    self.shard_index, self.epoch = 0, self.epoch + 1
                # A single shard is not re-read on every wrap.
                if len(self.paths) > 1:
                    self.tokens = read_checked_shard(self.paths[self.shard_index], self.vocab_size)
                self.pos = 0
            k = min(n - filled, self.tokens.size - self.pos)
            out[filled : filled + k] = self.tokens[self.pos : self.pos + k]
            filled += k
            self.pos += k
        return out


def rank_slice(n_seqs: int, rank: int, world_size: int) -> tuple[int, int]:
    """The sequences ``[start, end)`` of a global batch of ``n_seqs`` that belong to ``rank``."""
    return n_seqs * rank // world_size, n_seqs * (rank + 1) // world_size


@dataclass(frozen=True)
class MicroBatch:
    x: np.ndarray  # int64[m, T] inputs
    y: np.ndarray  # int64[m, T] targets (inputs shifted by one)


class BatchLoader:
    """Global batches of ``batch_seqs`` sequences, sliced for one rank and split into micro-batches."""

    def __init__(self, paths: list[Path], vocab_size: int, seq_len: int, batch_seqs: int,
                 micro_batch_seqs: int, rank: int = 0, world_size: int = 1):
        if batch_seqs < world_size:
            raise CtxmixError(f"global batch of {batch_seqs} sequences cannot feed {world_size} processes: "
                              "raise train_batch_tokens or use fewer processes")
        self.stream = TokenStream(paths, vocab_size)
        self.seq_len = seq_len
        self.batch_seqs = batch_seqs
        self.micro_batch_seqs = micro_batch_seqs
        self.rank = rank
        self.world_size = world_size
        self._last: np.ndarray | None = None  # the previous batch's final token: the next batch's first input

    def next_global(self) -> np.ndarray:
        """The next global batch as int64[S*T + 1] tokens (identical on every rank)."""
        n = self.batch_seqs * self.seq_len
        if self._last is None:
            chunk = self.stream.take(n + 1)
        else:
            chunk = np.concatenate([self._last, self.stream.take(n)])
        self._last = chunk[-1:]
        return chunk

    def next_batch(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next global batch, in order."""
        chunk = self.next_global()
        start, end = rank_slice(self.batch_seqs, self.rank, self.world_size)
        T = self.seq_len
        local = chunk[start * T : end * T + 1]
        x = local[:-1].reshape(-1, T)  # (n_local, T)
        y = local[1:].reshape(-1, T)
        m = self.micro_batch_seqs
        return [MicroBatch(x[i : i + m], y[i : i + m]) for i in range(0, x.shape[0], m)]
