"""The codec lanes' neural step in integer matmuls: int8 weights times int8 activations, summed in int32.

The lanes' step (``Model.decode_lanes``) must give the encoder and the decoder the same floats. A float32
matmul repeats only where both run the same kernel with the same blocking and threads; an integer matmul
repeats on any kernel and thread count, because integer sums do not depend on their order. So each linear
layer of a lane step runs as ``round(x / sx) @ round(W / sw)`` in int8 with int32 sums (exact: at most
K * 127 * 127 = 8,258,048 for K = 512; their float32 conversion is exact below 2**24 and one IEEE rounding
above it, the same everywhere), scaled back by one float32 product per output; the float work between the matmuls is ``kernels/lane_step.py``'s, one fixed-order
numba call per stage.

It is also the fast path: ``torch._int_mm`` (VNNI on x86) ran the shipped model's layers about 4x faster
than float32 at 64 lanes, and the fused kernels replace some seventy small torch operations per block
(docs/benchmarks.md). Where the CPU has AMX tiles, the matmuls run on them from numba with each weight
packed once (``kernels/amx.py``): the same integer sums, in a fraction of ``torch._int_mm``'s time a call.

Weights are quantized per output row to 127 levels (the scheme of the Parameter Golf int8 export, so a
matrix stored that way comes back to its own values); activations per row (each lane's vector) to 127
levels of their largest magnitude, except the final hidden state, which the logits need to about 14 bits:
two int8 terms (the second quantizes what the first left over).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# (imported here, not in the functions that use them: an import statement in a function costs some 25 us a
# call, and the step calls them five times per group of lanes)
from ..kernels import amx
from ..kernels.lane_step import (attention_quantize, dequantize, mix_norm_quantize, norm_quantize_parts,
                                 relu2_quantize, residual_add, residual_norm_quantize, softcap,
                                 softcap32)
from ..kernels.lane_step import quantize_rows as grid_rows

LEVELS = 127  # int8 values -127..127: a symmetric grid, so -x quantizes to -q
# Largest K whose int32 sums cannot overflow: K * 127 * 127 < 2**31.
MAX_EXACT_K = ((1 << 31) - 1) // (LEVELS * LEVELS)
# int8 terms of the final hidden state: with one, lcet10.txt's first 100 kB took 2% more bits than with
# float32 logits, with two 0.04% (64 lanes; the other layers' single grids cost nothing measurable).
HEAD_PARTS = 2
# Attention weights below this are 0 in the lanes of version 6 on (``attention_quantize``'s ``floor``). On
# enwik8 some 2.5% of the weights, times their values' scales, were float32 subnormals, and each product with
# one took a microcode assist on an Intel Xeon; with every weight 0 or at least 2**-100, no product or sum of
# the value loop is subnormal (a term's spacing is at least 2**-123). The weights dropped sum to below
# 128 * 2**-100 of a row's total.
ATTENTION_FLOOR = 2.0**-100


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32[R, K] -> (int8[R, K] values, float32[R] scales) with ``x ~ values * scales[:, None]``: the
    grid the lane kernels give the activations (``kernels/lane_step.py``), here for the weights."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    values, scales = np.empty(x.shape, np.int8), np.empty(x.shape[0], np.float32)
    grid_rows(x, values, scales)
    return values, scales


class IntegerWeights:
    """A weight float[N, K] on the int8 grid: ``weight_t`` int8[K, N] (as ``torch._int_mm`` takes it) and
    ``scale`` float32[N], with ``weight ~ weight_t.T * scale[:, None]``; ``packed``: the same weight in the
    layout of AMX tiles (``kernels/amx.py``) where this machine has them and the weight fits them, else None.
    Either way ``sums`` gives the same integers."""

    def __init__(self, weight: Tensor):
        if weight.dim() != 2 or weight.size(1) > MAX_EXACT_K:
            raise ValueError(f"integer matmul needs a matrix of at most {MAX_EXACT_K} columns, got {tuple(weight.shape)}")
        values, self.scale = quantize_rows(weight.detach().float().cpu().numpy())
        self.weight_t = torch.from_numpy(np.ascontiguousarray(values.T))
        self.packed = amx.pack_weight(values.T) if amx.available() and amx.fits(*values.T.shape) else None

    def sums(self, values: np.ndarray) -> np.ndarray:
        """int32[R, N]: the exact products of int8 rows ``values`` [R, K] with the weight."""
        if self.packed is None:
            return torch._int_mm(torch.from_numpy(values), self.weight_t).numpy()
        sums = np.empty((values.shape[0], self.scale.size), np.int32)
        amx.int8_matmul(values, self.packed, sums)
        return sums


def _float32(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


def _normed_rows(weight: Tensor) -> np.ndarray:
    """float32[V, C]: rms_norm of every embedding row, as ``decode_lanes`` norms the rows it gathers."""
    return F.rms_norm(weight.detach()[:, None], (weight.size(1),))[:, 0].cpu().numpy()


class _PreparedBlock:
    """One block's weights as the kernels take them (prepared once per coding run)."""

    def __init__(self, block):
        attn = block.attn
        self.qkv = IntegerWeights(attn._stacked_qkv())
        self.proj = IntegerWeights(attn.proj.effective_weight())
        self.fc = IntegerWeights(block.mlp.fc.effective_weight())
        self.mlp_proj = IntegerWeights(block.mlp.proj.effective_weight())
        self.mix = _float32(block.resid_mix)
        self.attn_scale = _float32(block.attn_scale)
        self.mlp_scale = _float32(block.mlp_scale)
        self.q_gain = _float32(attn.q_gain)
        self.heads = (attn.num_heads, attn.num_kv_heads, attn.head_dim)


def _block_lanes(w: _PreparedBlock, xs, x0s, keys_t, values, kv_scales, position, floor: float, float32: bool,
                 lo: int, hi: int) -> None:
    """One block for lanes lo..hi-1 (rows of xs, written in place; their slices of the cache; ``kv_scales``:
    (key scales, value scales) of an int8 cache, else (None, None); ``floor``: attention weights below it are
    0; ``float32``: the attention's float32 softmax and fused products: ``IntegerLaneStep``)."""
    n_heads, n_kv_heads, head_dim = w.heads
    cos, sin, slot, n_keys = position
    xs, x0s, keys_t, values = xs[lo:hi], x0s[lo:hi], keys_t[lo:hi], values[lo:hi]
    key_scales, value_scales = (None, None) if kv_scales[0] is None else (kv_scales[0][lo:hi], kv_scales[1][lo:hi])
    B, C = xs.shape
    q = np.empty((B, max(C, w.fc.scale.size)), np.int8)
    scales, y_scales = np.empty(B, np.float32), np.empty(B, np.float32)
    mix_norm_quantize(xs, x0s, w.mix, q[:, :C], scales)
    attention_quantize(w.qkv.sums(q[:, :C]), scales, w.qkv.scale, n_heads, n_kv_heads, w.q_gain, cos, sin, keys_t,
                       values, slot, n_keys, np.float32(head_dim**-0.5), q[:, :C], y_scales, key_scales, value_scales,
                       floor, float32)
    residual_norm_quantize(xs, w.proj.sums(q[:, :C]), y_scales, w.proj.scale, w.attn_scale, q[:, :C], scales)
    sums = w.fc.sums(q[:, :C])
    hidden = sums.shape[1]
    relu2_quantize(sums, scales, w.fc.scale, q[:, :hidden], y_scales)
    residual_add(xs, w.mlp_proj.sums(q[:, :hidden]), y_scales, w.mlp_proj.scale, w.mlp_scale)


class IntegerLaneStep:
    """The integer lane step of the baseline family (and the families built on it): ``block`` runs one
    block for one position of each lane, ``head`` the logits. Weights are prepared the first time a block
    is seen (they do not change while coding). The lane engine's groups of lanes share one step (one copy
    of the weights) and call it from two threads at once: what it keeps is prepared once under a lock
    (``_kept``) and never changed after, and the RoPE tables are replaced whole when they grow."""

    def __init__(self, threads: int = 1, attention_floor: float = 0.0, float32_softmax: bool = False):
        self.threads = threads
        self.attention_floor = attention_floor  # 0, or ATTENTION_FLOOR from lane version 6 on (lanes.py)
        # from lane version 7 on (lanes.py): the attention's softmax in float32 and its products fused
        # (``attention_quantize``'s float32), and the soft-capped logits float32 (``head``)
        self.float32_softmax = float32_softmax
        self._prepared: dict[tuple[str, int], tuple] = {}  # (kind, id(obj)) -> (obj, what _kept made of it)
        self._executor: ThreadPoolExecutor | None = None
        self._rope_tables: dict[int, tuple] = {}  # id(rotary) -> (rotary, cos, sin): its tables, float32 [n, D/2]
        self._lock = threading.Lock()

    def _pool(self) -> ThreadPoolExecutor:
        """The group threads (idle between steps; they end with the step object, when the run's cache goes)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="ctxmix-lanes")
        return self._executor

    def _angles(self, rotary, length: int) -> tuple[np.ndarray, np.ndarray]:
        """RoPE's (cos, sin) float32[D/2] of position ``length``: rows of numpy views of ``rotary``'s tables,
        taken again only when they must grow (doubling), so a block's step reads its angles for free."""
        held = self._rope_tables.get(id(rotary))
        if held is None or held[0] is not rotary or held[1].shape[0] <= length:
            size = max(length + 1, 2 * held[1].shape[0] if held is not None and held[0] is rotary else 0, 256)
            cos, sin = rotary(0, size, torch.device("cpu"), torch.float32)  # (1, 1, size, D/2)
            held = (rotary, cos[0, 0].numpy(), sin[0, 0].numpy())
            self._rope_tables = {**self._rope_tables, id(rotary): held}  # replaced whole: two threads read it
        return held[1][length], held[2][length]

    def _kept(self, kind: str, obj, prepare):
        """``prepare(obj)``, made the first time ``obj`` is seen for ``kind`` (a block's weights, the head's,
        the normed embeddings) and kept: checked again under the lock, so the two threads prepare it once.
        The entry holds ``obj``, so its id() cannot be reused while the entry lives."""
        key = (kind, id(obj))
        held = self._prepared.get(key)
        if held is None or held[0] is not obj:
            with self._lock:
                held = self._prepared.get(key)
                if held is None or held[0] is not obj:
                    held = self._prepared[key] = (obj, prepare(obj))
        return held[1]

    def block(self, block, x: Tensor, x0: Tensor, cache, layer: int) -> Tensor:
        """x, x0 float32 (B, 1, C) -> the block's output (B, 1, C); writes the position into ``cache``.
        With ``threads`` > 1 the lanes are cut into that many contiguous groups run side by side: every
        lane's arithmetic is its own (rows of exact integer matmuls, per-lane kernels), so the floats are
        those of one thread."""
        w = self._kept("block", block, _PreparedBlock)
        B, _, C = x.shape
        out = x.numpy().reshape(B, C).copy()  # x may be a U-Net skip held for a later layer: not written in place
        keys_t, values, key_scales, value_scales = cache.arrays(layer, B, w.heads[1], w.heads[2])
        position = (*self._angles(block.attn.rotary, cache.length), cache.slot(), min(cache.length + 1, cache.capacity))
        args = (w, out, x0.numpy().reshape(B, C), keys_t, values, (key_scales, value_scales), position,
                self.attention_floor, self.float32_softmax)
        if self.threads == 1 or B == 1:
            _block_lanes(*args, 0, B)
        else:  # (torch on one thread, as the codec runs this engine: no OpenMP team per group)
            bounds = np.linspace(0, B, min(self.threads, B) + 1).astype(int)
            for job in [self._pool().submit(_block_lanes, *args, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]:
                job.result()
        return torch.from_numpy(out.reshape(B, 1, C))

    def add_skip(self, x: Tensor, weights: Tensor, index: int, skip: Tensor) -> Tensor:
        """The U-Net's ``x + weights[index] * skip`` (``Model._run_layers``) in numpy: float32 arrays, so the
        same two roundings as torch's product and sum, without two torch calls and their GIL hand-offs."""
        held = self._kept("skip weights", weights, _float32)
        return torch.from_numpy(x.numpy() + held[index] * skip.numpy())

    def embed(self, weight: Tensor, tokens: Tensor) -> Tensor:
        """rms_norm of the embedding rows of ``tokens`` (B,) as float32 (B, 1, C): rows of a table normed once
        (each row's norm is a function of that row alone, so the table's rows are the floats a batch of
        rows gets: tests/test_integer.py checks it), where the gather and the norm cost some 20 us a call."""
        table = self._kept("embedding", weight, _normed_rows)
        return torch.from_numpy(table[tokens.numpy()])[:, None]

    def head(self, weight: Tensor, x: Tensor, cap: float) -> Tensor:
        """Soft-capped logits (B, V) of the final hidden state x (B, 1, C) before its norm: float64, or with
        ``float32_softmax`` float32 (``softcap32``: half the vector work; the neural expert's softmax of them,
        ``softmax_rows32``, is float32 too)."""
        w = self._kept("head", weight, IntegerWeights)
        B, _, C = x.shape
        q = np.empty((HEAD_PARTS, B, C), np.int8)
        scales = np.empty((HEAD_PARTS, B), np.float32)
        norm_quantize_parts(np.ascontiguousarray(x.reshape(B, C).numpy()), HEAD_PARTS, q, scales)
        logits = np.zeros((B, w.scale.size), np.float32)
        sums = w.sums(q.reshape(HEAD_PARTS * B, C))  # the parts' rows in one call (torch._int_mm packs once)
        for part in range(HEAD_PARTS):
            dequantize(sums[part * B:(part + 1) * B], scales[part], w.scale, logits)
        if self.float32_softmax:
            capped = np.empty(logits.shape, np.float32)
            softcap32(logits, float(cap), capped)
        else:
            capped = np.empty(logits.shape)
            softcap(logits, float(cap), capped)
        return torch.from_numpy(capped)
