"""Building blocks shared by the model families: norms, linear layers, RoPE, attention, KV cache.

Numerics follow the Parameter Golf baseline (openai/parameter-golf ``train_gpt.py``): RMSNorm without a
weight and with the dtype's epsilon, weights kept in fp32 and cast to the activation dtype at matmul
time, RoPE tables computed in fp32 from ``1 / base ** (2i / head_dim)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .integer import IntegerLaneStep

ATTENTION_BACKENDS = ("sdpa", "flash")


class RMSNorm(nn.Module):
    """``x / rms(x)`` over the last dim; no learned weight (the baseline's norm)."""

    def __init__(self, eps: float | None = None):
        super().__init__()
        self.eps = eps  # None: torch uses the dtype's machine epsilon, as the baseline does

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),), eps=self.eps)


def fake_quantize_rows(w: Tensor, levels: int) -> Tensor:
    """Round each row of ``w`` to ``2 * levels + 1`` values scaled by the row's max |w| (per-row QAT).

    Written as ``w + (w_q - w).detach()`` so gradients pass straight through in training; in inference the
    same expression is evaluated, so the floats equal what the training script's forward produced.
    """
    row_max = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
    scale = row_max / levels
    w_q = (w / scale).round().clamp(-levels, levels) * scale
    return w + (w_q - w).detach()


class CastedLinear(nn.Linear):
    """Bias-free linear layer: fp32 weight, cast to the input's dtype at matmul time (bf16 autocast keeps
    fp32 master weights). ``fake_quant_levels > 0`` re-quantizes the weight per row at every forward
    (montysteele's 6-bit QAT does this with 31 levels); without autograd the rounded weight is cached
    (keyed by the weight's storage and version), which gives the same floats since it is a pure function
    of the weight."""

    def __init__(self, in_features: int, out_features: int, fake_quant_levels: int = 0):
        super().__init__(in_features, out_features, bias=False)
        self.fake_quant_levels = fake_quant_levels
        self._cached: tuple[tuple, Tensor] | None = None

    def effective_weight(self) -> Tensor:
        if self.fake_quant_levels <= 0:
            return self.weight
        if torch.is_grad_enabled() and self.weight.requires_grad:  # training: autograd needs the graph
            return fake_quantize_rows(self.weight, self.fake_quant_levels)
        key = (self.weight.data_ptr(), self.weight._version, self.weight.device, self.weight.dtype)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, fake_quantize_rows(self.weight, self.fake_quant_levels))
        return self._cached[1]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight().to(x.dtype))


class Rotary(nn.Module):
    """RoPE tables for absolute positions ``start .. start + length - 1``: (cos, sin) of shape (1, 1, T, D/2).

    One table from position 0 is kept and grown by doubling, so a decoder stepping one position at a time
    slices it instead of recomputing it; each entry is an elementwise function of its position, so a slice
    holds the same floats as a table built for that range alone."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._tables: tuple[Tensor, Tensor] | None = None  # float32 (1, 1, n, D/2), positions 0 .. n - 1
        self._cast: tuple | None = None  # (dtype, the tables, cos, sin): the tables in the last dtype asked

    def forward(self, start: int, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # read and written through locals only: the codec's lane groups call this from two threads at once
        end = start + length
        tables = self._tables
        held = tables[0] if tables is not None else None
        if held is None or held.size(2) < end or held.device != device:
            n = max(end, 2 * held.size(2) if held is not None and held.device == device else 0)
            t = torch.arange(0, n, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))  # (n, D/2)
            tables = self._tables = (freqs.cos()[None, None], freqs.sin()[None, None])
        cast = self._cast
        if cast is None or cast[0] != dtype or cast[1] is not tables:
            cast = self._cast = (dtype, tables, tables[0].to(dtype), tables[1].to(dtype))
        _, _, cos, sin = cast
        return cos[:, :, start:end], sin[:, :, start:end]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of the head dim of ``x`` (B, H, T, D) by the position angles."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1)


class KVCache:
    """Keys and values of every position a model has seen, one slot per effective layer (stepwise decoding).

    ``length`` counts positions held; a family's forward reads it as the position offset of the new tokens
    and advances it after the last layer. Each layer's keys and values live in a buffer that grows by
    doubling, so a one-token step writes one row instead of copying everything held (``torch.cat``).
    """

    MIN_CAPACITY = 64  # positions; a window's prefill usually sets the first size

    def __init__(self, n_layers: int):
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers
        self.length = 0

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append (B, Hkv, T, D) keys/values to ``layer``; return views of all keys/values held for it."""
        held, end = self.length, self.length + k.size(2)
        if self.k[layer] is None or self.k[layer].size(2) < end:
            capacity = max(end, self.MIN_CAPACITY, 2 * (self.k[layer].size(2) if self.k[layer] is not None else 0))
            for store, new in ((self.k, k), (self.v, v)):
                grown = new.new_empty(new.size(0), new.size(1), capacity, new.size(3))
                if store[layer] is not None:
                    grown[:, :, :held] = store[layer][:, :, :held]
                store[layer] = grown
        self.k[layer][:, :, held:end] = k
        self.v[layer][:, :, held:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class LaneCache:
    """Keys and values of B lanes decoded in lockstep (``Model.decode_lanes``): every lane holds the same
    number of positions, so one (B, Hkv, W, D) buffer per layer serves them all.

    It holds at most ``capacity`` positions per lane: slot 0 keeps the lane's first position for good
    (the attention sink every window of training began with), and slots 1 .. capacity-1 hold the most
    recent positions, overwritten in turn. Keys keep the RoPE angle of their absolute position, so a
    query sees each held key at its true distance. ``length`` counts positions seen; ``held`` how many
    slots are filled (the prefix of the buffer that attention reads). With ``int8`` (the integer step of lane
    version 3) the buffers hold each key and value head row on its int8 grid, and ``scales`` their scales.
    """

    def __init__(self, n_layers: int, capacity: int, integer: bool = False, threads: int = 1, int8: bool = False,
                 step: IntegerLaneStep | None = None, attention_floor: float = 0.0, float32_softmax: bool = False):
        if capacity < 2:
            raise ValueError(f"a lane cache needs room for at least 2 positions, got {capacity}")
        # integer: the blocks run the integer step (models/integer.py), in ``threads`` groups of lanes, instead
        # of their float32 torch code; int8 (integer only): it keeps keys and values on their int8 grids, with
        # a scale per head and position (``scales``); ``step``: an integer step to share with other caches (the
        # lane engine's groups: one copy of the prepared weights, stepped from either thread); attention_floor:
        # and float32_softmax: the integer step's (``IntegerLaneStep``) when it is made here
        self.integer_step = None
        if integer:
            self.integer_step = step if step is not None else IntegerLaneStep(threads, attention_floor, float32_softmax)
        self.int8 = bool(int8 and integer)
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers
        self.k_scale: list[Tensor | None] = [None] * n_layers
        self.v_scale: list[Tensor | None] = [None] * n_layers
        self._arrays: list[tuple | None] = [None] * n_layers  # numpy views of the four (``arrays``)
        self.capacity = capacity
        self.length = 0

    @property
    def held(self) -> int:
        return min(self.length, self.capacity)

    def slot(self) -> int:
        """The buffer slot of the next position: its own while the buffer fills, then the oldest recent one."""
        if self.length < self.capacity:
            return self.length
        return 1 + (self.length - 1) % (self.capacity - 1)

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write one position's (B, Hkv, D) key and value; return the whole buffers, keys transposed
        (B, Hkv, D, capacity) and values (B, Hkv, capacity, D), of which the first ``held`` positions
        (after this one) are filled. Keys are kept transposed for the attention kernel (``kernels/attention.py``)."""
        keys_t, values = self.buffers(layer, *k.shape, dtype=k.dtype, device=k.device)
        slot = self.slot()
        keys_t[:, :, :, slot] = k
        values[:, :, slot] = v
        return keys_t, values

    def buffers(self, layer: int, n_lanes: int, n_heads: int, head_dim: int, dtype=torch.float32,
                device=None) -> tuple[Tensor, Tensor]:
        """The layer's keys (B, Hkv, D, capacity) and values (B, Hkv, capacity, D), zeros when first asked
        (int8 ones with ``int8``)."""
        if self.k[layer] is None:
            dtype = torch.int8 if self.int8 else dtype
            self.k[layer] = torch.zeros((n_lanes, n_heads, head_dim, self.capacity), dtype=dtype, device=device)
            self.v[layer] = torch.zeros((n_lanes, n_heads, self.capacity, head_dim), dtype=dtype, device=device)
        return self.k[layer], self.v[layer]

    def arrays(self, layer: int, n_lanes: int, n_heads: int, head_dim: int) -> tuple:
        """The integer step's view of a layer (CPU only): numpy arrays of its keys, values, and key and value
        scales (None without ``int8``), made once per layer (a tensor's ``.numpy()`` per step cost more than
        the kernels that read it at a few lanes)."""
        held = self._arrays[layer]
        if held is None:
            keys_t, values = self.buffers(layer, n_lanes, n_heads, head_dim)
            scales = self.scales(layer, n_lanes, n_heads)
            held = self._arrays[layer] = (keys_t.numpy(), values.numpy(),
                                          *(None if t is None else t.numpy() for t in scales))
        return held

    def scales(self, layer: int, n_lanes: int, n_heads: int) -> tuple[Tensor, Tensor] | tuple[None, None]:
        """With ``int8``: the layer's key and value scales, float32 (B, Hkv, capacity); else (None, None)."""
        if not self.int8:
            return None, None
        if self.k_scale[layer] is None:
            self.k_scale[layer] = torch.zeros((n_lanes, n_heads, self.capacity), dtype=torch.float32)
            self.v_scale[layer] = torch.zeros((n_lanes, n_heads, self.capacity), dtype=torch.float32)
        return self.k_scale[layer], self.v_scale[layer]


def _flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` -> flash-attn on CUDA when installed, else PyTorch SDPA."""
    if name == "auto":
        return "flash" if device.type == "cuda" and _flash_available() else "sdpa"
    return name


def attend(q: Tensor, k: Tensor, v: Tensor, past: int, backend: str = "sdpa") -> Tensor:
    """Causal attention of T new queries over ``past + T`` keys (grouped-query when Hkv < H).

    q: (B, H, T, D); k, v: (B, Hkv, past + T, D) -> (B, H, T, D). Query i sits at absolute position
    ``past + i`` and sees keys 0 .. past + i.
    """
    n_queries, n_keys = q.size(2), k.size(2)
    gqa = k.size(1) != q.size(1)
    if backend == "flash" and q.is_cuda:
        from flash_attn import flash_attn_func

        # flash-attn aligns the causal mask to the bottom-right when seqlen_q < seqlen_k: the cache case.
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        y = flash_attn_func(q.transpose(1, 2).to(dtype), k.transpose(1, 2).to(dtype), v.transpose(1, 2).to(dtype), causal=True)
        return y.transpose(1, 2).to(q.dtype)
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if n_queries == 1:  # one new token: every held key is in its past
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    keys = torch.arange(n_keys, device=q.device)
    queries = torch.arange(past, past + n_queries, device=q.device)
    mask = keys[None, :] <= queries[:, None]  # (T, past + T), True = may attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
