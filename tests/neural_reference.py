"""An independent, minimal reimplementation of the challenge's neural evaluation, for tests only.

Nothing here imports ctxmix. It reads a baseline ``int8_clean_per_row_v1`` artifact with its own
dequantization, runs its own plain-loop baseline-GPT forward (explicit softmax attention, no SDPA, no
modules), counts bytes with its own SentencePiece tables, and scores tokens the two ways the challenge
does (openai/parameter-golf ``train_gpt.py`` ``eval_val`` and the records' ``eval_val_sliding``):

* ``eval_non_overlapping``: windows of ``seq_len`` tokens side by side, every target scored once.
* ``eval_sliding``: windows every ``stride`` tokens; the first scores all its targets, the others their
  last ``stride``. ``each_once=False`` is the challenge's loop verbatim in effect, whose last, partial
  windows score the final targets again; ``each_once=True`` scores each target once (what ctxmix does).

Slow and obviously correct is the point: a plain loop over windows, one window at a time.
"""

from __future__ import annotations

import io
import math
import zlib

import numpy as np
import sentencepiece as spm
import torch


def load_int8_artifact(path) -> dict[str, torch.Tensor]:
    """zlib + torch.load(weights_only) + per-row dequantization -> float32 tensors."""
    obj = torch.load(io.BytesIO(zlib.decompress(open(path, "rb").read())), map_location="cpu", weights_only=True)
    assert obj["__quant_format__"] == "int8_clean_per_row_v1"
    weights = {}
    for name, q in obj["quantized"].items():
        scale = obj["scales"][name].float()
        if scale.ndim:
            value = q.float() * scale[:, None]
        else:
            value = q.float() * float(scale)
        # Round through the recorded dtype exactly as the challenge's dequantizer does.
        weights[name] = value.to(getattr(torch, obj["dtypes"][name])).float()
    for name, t in obj["passthrough"].items():
        dtype = obj.get("passthrough_orig_dtypes", {}).get(name)
        weights[name] = (t.to(getattr(torch, dtype)) if dtype else t).float()
    return weights


def _rms(x: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(torch.float32).eps
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def gpt_logits(w: dict, tokens: torch.Tensor, rope_base: float = 10000.0, softcap: float = 30.0,
               head_delta: torch.Tensor | None = None) -> torch.Tensor:
    """Baseline GPT forward of one sequence: tokens int64[T] -> logits float32[T, V] (the weights' dtype).

    ``head_delta`` (V, d): added to the output side of the head only (test-time training's logit adapter)."""
    n_layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    dim = w["tok_emb.weight"].shape[1]
    n_heads = w["blocks.0.attn.q_gain"].shape[0]
    hd = dim // n_heads
    n_kv = w["blocks.0.attn.c_k.weight"].shape[0] // hd
    T = tokens.shape[0]
    inv_freq = 1.0 / (rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()  # (T, hd/2)
    causal = torch.ones(T, T).tril().bool()

    def rope(x):  # x: (heads, T, hd)
        a, b = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat((a * cos + b * sin, -a * sin + b * cos), dim=-1)

    def block(i, x, x0):
        p = f"blocks.{i}."
        mix = w[p + "resid_mix"]
        x = mix[0] * x + mix[1] * x0
        h = _rms(x)
        q = (h @ w[p + "attn.c_q.weight"].T).view(T, n_heads, hd).transpose(0, 1)
        k = (h @ w[p + "attn.c_k.weight"].T).view(T, n_kv, hd).transpose(0, 1)
        v = (h @ w[p + "attn.c_v.weight"].T).view(T, n_kv, hd).transpose(0, 1)
        q, k = rope(_rms(q)), rope(_rms(k))
        q = q * w[p + "attn.q_gain"][:, None, None]
        k = k.repeat_interleave(n_heads // n_kv, dim=0)
        v = v.repeat_interleave(n_heads // n_kv, dim=0)
        scores = (q @ k.transpose(1, 2)) / math.sqrt(hd)
        scores = scores.masked_fill(~causal, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v  # (heads, T, hd)
        y = y.transpose(0, 1).reshape(T, dim) @ w[p + "attn.proj.weight"].T
        x = x + w[p + "attn_scale"] * y
        m = torch.relu(_rms(x) @ w[p + "mlp.fc.weight"].T).square() @ w[p + "mlp.proj.weight"].T
        return x + w[p + "mlp_scale"] * m

    x = _rms(w["tok_emb.weight"][tokens])
    x0 = x
    skips = []
    n_enc = n_layers // 2
    for i in range(n_layers):
        if i >= n_enc and skips:
            x = x + w["skip_weights"][i - n_enc] * skips.pop()
        x = block(i, x, x0)
        if i < n_enc:
            skips.append(x)
    head = w["lm_head.weight"] if "lm_head.weight" in w else w["tok_emb.weight"]
    if head_delta is not None:
        head = head + head_delta
    logits = _rms(x) @ head.T
    return softcap * torch.tanh(logits / softcap)


def byte_tables(tokenizer_path):
    """The challenge's tables: base bytes, leading-space flag, boundary flag per token id."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    n = sp.vocab_size()
    base = np.zeros(n, np.int64)
    space = np.zeros(n, bool)
    boundary = np.ones(n, bool)
    for t in range(n):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            continue
        boundary[t] = False
        if sp.is_byte(t):
            base[t] = 1
            continue
        piece = sp.id_to_piece(t)
        if piece.startswith("\u2581"):
            space[t] = True
            piece = piece[1:]
        base[t] = len(piece.encode("utf-8"))
    return base, space, boundary


def _target_bytes(tables, prev: np.ndarray, tgt: np.ndarray) -> int:
    base, space, boundary = tables
    return int((base[tgt] + (space[tgt] & ~boundary[prev])).sum())


def _nll(w, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = gpt_logits(w, torch.from_numpy(x))
        logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp[torch.arange(len(y)), torch.from_numpy(y)].numpy()


def eval_non_overlapping(w, tokens: np.ndarray, seq_len: int, tables) -> tuple[float, float, int]:
    """(nats per target, bpb, targets) of ``eval_val``: targets tokens[1:], windows of seq_len side by side."""
    n_windows = (len(tokens) - 1) // seq_len
    nats = 0.0
    nbytes = 0
    for i in range(n_windows):
        x = tokens[i * seq_len : (i + 1) * seq_len]
        y = tokens[i * seq_len + 1 : (i + 1) * seq_len + 1]
        nats += float(_nll(w, x, y).sum())
        nbytes += _target_bytes(tables, x, y)
    count = n_windows * seq_len
    return nats / count, nats / math.log(2) / nbytes, count


def eval_sliding(w, tokens: np.ndarray, seq_len: int, stride: int, tables, each_once: bool = True):
    """(nats per target, bpb, targets) of the sliding evaluation over targets tokens[1:]."""
    total = len(tokens) - 1
    starts = [s for s in range(0, total, stride) if min(s + seq_len, total) - s >= 1]
    nats = 0.0
    nbytes = 0
    count = 0
    done = 0  # targets 0 .. done-1 (0-based) already scored
    for s in starts:
        end = min(s + seq_len, total)
        x = tokens[s:end]
        y = tokens[s + 1 : end + 1]
        first = 0 if s == 0 else max(end - s - stride, 0)
        if each_once:
            first = max(first, done - s)
            if first >= end - s:
                continue
        nll = _nll(w, x, y)[first:]
        nats += float(nll.sum())
        nbytes += _target_bytes(tables, x[first:], y[first:])
        count += len(nll)
        done = max(done, end)
    return nats / count, nats / math.log(2) / nbytes, count


def read_shard(path, n_tokens: int) -> np.ndarray:
    """The first n_tokens of a challenge shard (256 int32 header, then uint16 tokens)."""
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[0] == 20240520 and header[1] == 1
    return np.fromfile(path, dtype="<u2", count=n_tokens, offset=256 * 4).astype(np.int64)
