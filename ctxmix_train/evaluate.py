"""Validation loss and bits per byte, as the challenge's ``eval_val`` computes them.

The validation tokens are cut into non-overlapping windows of ``train_seq_len``; each window predicts its
``train_seq_len`` targets. Ranks split the windows and sum (loss, tokens) with one all-reduce. Bytes per
target follow the challenge's shard accounting (``ctxmix.data.shard_byte_counts``), so the printed
``val_bpb`` is the challenge's figure for the same tokens.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .distributed import DistContext, all_reduce_sum_
from .loader import rank_slice

LN2 = math.log(2.0)


@dataclass(frozen=True)
class ValData:
    tokens: np.ndarray  # int64[W*T + 1]: W windows of T targets
    target_nbytes: np.ndarray  # int64[W*T]: bytes of each target (challenge accounting)

    @property
    def n_targets(self) -> int:
        return len(self.target_nbytes)

    @property
    def nbytes(self) -> int:
        return int(self.target_nbytes.sum())


def make_val_data(tokens: np.ndarray, vocab_size: int, tokenizer: str = "") -> ValData:
    """``tokens`` with the challenge's byte count of each target, from the pieces of ``tokenizer`` (a
    SentencePiece ``.model`` path; "" = the shipped sp1024)."""
    from ctxmix.data import resolve_tokenizer, shard_byte_counts

    nbytes = shard_byte_counts(tokens, resolve_tokenizer(tokenizer or None).shard_byte_tables(vocab_size))
    return ValData(tokens, nbytes[1:])


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean nats per target
    bpb: float  # bits per byte
    tokens: int
    nbytes: int


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (as the challenge trains and evaluates); full fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, val: ValData, seq_len: int, batch_seqs: int, ctx: DistContext) -> EvalResult:
    """Mean loss and bpb of ``model`` (any callable idx[B,T] -> logits[B,T,V]) on ``val``."""
    n_windows = val.n_targets // seq_len
    start, end = rank_slice(n_windows, ctx.rank, ctx.world_size)
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    was_training = model.training
    model.eval()
    try:
        for w in range(start, end, batch_seqs):
            w_end = min(w + batch_seqs, end)
            chunk = torch.from_numpy(val.tokens[w * seq_len : w_end * seq_len + 1]).to(ctx.device)
            x = chunk[:-1].view(-1, seq_len)
            y = chunk[1:].view(-1, seq_len)
            with autocast_for(ctx.device):
                logits = model(x)
            nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
            loss_sum += nll.double().sum()
    finally:
        model.train(was_training)
    all_reduce_sum_(loss_sum, ctx)
    n_tokens = n_windows * seq_len
    nbytes = int(val.target_nbytes[:n_tokens].sum())
    loss = float(loss_sum.item()) / max(n_tokens, 1)
    bpb = loss / LN2 * n_tokens / nbytes if nbytes else float("nan")
    return EvalResult(loss, bpb, n_tokens, nbytes)


def unigram_eval(train_tokens: np.ndarray, val: ValData, vocab_size: int) -> EvalResult:
    """A static unigram fitted on ``train_tokens`` (add-1/2 smoothing): the floor a model must beat."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 0.5
    logp = np.log(counts / counts.sum())
    targets = val.tokens[1 : val.n_targets + 1]
    loss = float(-logp[targets].mean())
    return EvalResult(loss, loss / LN2 * val.n_targets / val.nbytes, val.n_targets, val.nbytes)
