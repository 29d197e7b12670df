"""The March record stack of Parameter Golf as a model family (``record``).

The architecture of the 11-layer records (openai/parameter-golf
records/track_10min_16mb/2026-03-22_11L_EMA_GPTQ-lite_warmdown3500_QAT015_1.1233 and
2026-03-23_LeakyReLU_LegalTTT_ParallelMuon), on top of the baseline GPT (RMSNorm, GQA attention with
q/k RMS-norm and per-head ``q_gain``, U-Net skips between the encoder and decoder halves, ``resid_mix``
with the embedding stream ``x0``, per-channel branch scales, tied embeddings, tanh logit softcap):

- MLP ``proj(leaky_relu(fc(x), 0.5) ** 2)``, 3x wide.
- Partial RoPE: only the first ``rope_dims`` (16 of 64) dims of each head rotate; the rest attend
  position-free. Trained at 2048 tokens, the records scale the RoPE base NTK-style against a 1024-token
  reference: ``base * (2048/1024) ** (rope_dims / (rope_dims - 2))``.
- LN scale: each block multiplies its normed inputs by ``1/sqrt(layer + 1)``.
- XSA (exclusive self-attention) on the last ``xsa_last_n`` layers: the attention output of each head
  loses its component along the (normalized) value vector of its own position.
- Bigram-hash embedding: ``(36313 * t_i) xor (27191 * t_{i-1}) mod (buckets - 1)`` picks a row of a small
  table (bucket ``buckets - 1`` for the first position), projected to the model width, times a learned scale.
- SmearGate: ``x_i <- (1 - g) * x_i + g * x_{i-1}`` per channel, ``g = sigmoid(gate)``.
- Value embeddings: one shared table of token embeddings, projected to the KV width and added to the
  values of a few layers (9 and 10), each with its own learned scale.

Parameter names follow the record's ``train_gpt.py`` so its state dicts map one to one. What the weights
do not show (``rope_dims``, ``xsa_last_n``, ``ln_scale``, the MLP slope, which layers take value embeddings,
the RoPE base and training length, the softcap) comes from the artifact's metadata (``__ctxmix_meta__``),
with the record's values as defaults.

Written for ctxmix from the published architecture description; not copied from the record's code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CtxmixError
from .keys import shape_of

NAME = "record"

BIGRAM_MUL_CUR = 36313  # hash multipliers of the record's BigramHashEmbedding
BIGRAM_MUL_PREV = 27191
ROPE_REF_SEQ_LEN = 1024  # the records' Rotary scales its base for sequences longer than this
BIGRAM_INIT_SCALE = 0.05
VE_INIT_SCALE = 0.1


@dataclass(frozen=True)
class Config:
    vocab_size: int = 1024
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_hidden: int = 1536  # MLP width (3 x 512)
    tie_embeddings: bool = True
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    rope_dims: int = 16  # rotated dims per head; 0 = all (full RoPE)
    train_seq_len: int = 2048  # sets the NTK-scaled RoPE base (see module docstring) and the eval window
    qk_gain_init: float = 1.5
    mlp_leaky_slope: float = 0.5  # 0 = relu^2
    ln_scale: bool = True
    xsa_last_n: int = 4
    bigram_vocab_size: int = 2048  # 0 = no bigram embedding
    bigram_dim: int = 128
    smear_gate: bool = True
    ve_dim: int = 128  # 0 = no value embeddings
    ve_layers: str = "9,10"  # comma-separated layers that add the value embedding (a string: metadata-friendly)

    @property
    def ve_layer_list(self) -> tuple[int, ...]:
        try:
            return tuple(int(s) for s in self.ve_layers.split(",") if s.strip())
        except ValueError:
            raise CtxmixError(f"record model config: ve_layers {self.ve_layers!r} is not a comma-separated list of layers") from None

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def effective_rope_dims(self) -> int:
        return self.rope_dims if 0 < self.rope_dims < self.head_dim else self.head_dim

    @property
    def effective_rope_base(self) -> float:
        """The records' NTK rule, applied once for the training length (see the module docstring)."""
        rd = self.effective_rope_dims
        if self.train_seq_len <= ROPE_REF_SEQ_LEN or rd <= 2:
            return self.rope_base
        return self.rope_base * (self.train_seq_len / ROPE_REF_SEQ_LEN) ** (rd / (rd - 2))

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise CtxmixError(f"record model config: {what}")

        need(self.model_dim % self.num_heads == 0, f"model_dim {self.model_dim} is not a multiple of num_heads {self.num_heads}")
        need(self.num_heads % self.num_kv_heads == 0, f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        need(self.head_dim % 2 == 0, f"head width {self.head_dim} is odd (RoPE rotates pairs)")
        need(self.rope_dims % 2 == 0 and self.rope_dims <= self.head_dim, f"rope_dims {self.rope_dims} must be even and <= {self.head_dim}")
        need(all(0 <= i < self.num_layers for i in self.ve_layer_list), f"ve_layers {self.ve_layers!r} outside 0..{self.num_layers - 1}")
        need((self.ve_dim > 0) == bool(self.ve_layer_list), "ve_layers must be given exactly when ve_dim > 0")
        need(self.logit_softcap > 0, "logit_softcap must be positive")
        # The bigram hash takes ids modulo buckets - 1 (the last bucket is the first position's).
        need(self.bigram_vocab_size != 1, "bigram_vocab_size must be 0 (off) or at least 2")


# As baseline.BOUNDS: inclusive (lo, hi) of the fields that can come from outside the weights.
BOUNDS = {
    "vocab_size": (1, 1 << 16),
    "num_layers": (1, 1024),
    "model_dim": (1, 1 << 16),
    "num_heads": (1, 4096),
    "num_kv_heads": (1, 4096),
    "mlp_hidden": (1, 1 << 20),
    "logit_softcap": (1e-2, 1e4),
    "rope_base": (1.0, 1e12),
    "rope_dims": (0, 1 << 16),
    "train_seq_len": (1, 1 << 20),
    "mlp_leaky_slope": (-1e3, 1e3),
    "xsa_last_n": (0, 1024),
    "bigram_vocab_size": (0, 1 << 24),
    "bigram_dim": (1, 1 << 16),
    "ve_dim": (0, 1 << 16),
}
# Fields the weights' shapes decide (ve_layers too: its count is that of the ve_layer_scales tensors,
# which the key check after the metadata compares).
SHAPE_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_hidden", "tie_embeddings",
                "bigram_vocab_size", "smear_gate", "ve_dim")


def rotate_partial(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dims: int) -> torch.Tensor:
    """RoPE on the first ``rope_dims`` dims of x (B, T, H, hd); cos/sin (1, T, 1, rope_dims/2)."""
    x_rope, x_pass = x[..., :rope_dims], x[..., rope_dims:]
    half = rope_dims // 2
    x1, x2 = x_rope[..., :half], x_rope[..., half:]
    rotated = torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.size(-1) else rotated


class Attention(nn.Module):
    def __init__(self, cfg: Config, use_xsa: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.rope_dims = cfg.effective_rope_dims
        self.use_xsa = use_xsa
        self.c_q = nn.Linear(cfg.model_dim, cfg.model_dim, bias=False)
        self.c_k = nn.Linear(cfg.model_dim, cfg.kv_dim, bias=False)
        self.c_v = nn.Linear(cfg.model_dim, cfg.kv_dim, bias=False)
        self.proj = nn.Linear(cfg.model_dim, cfg.model_dim, bias=False)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                v_embed: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x)
        if v_embed is not None:
            v = v + v_embed
        v = v.view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        q = F.rms_norm(q, (self.head_dim,))
        k = F.rms_norm(k, (self.head_dim,))
        q = rotate_partial(q, cos, sin, self.rope_dims)
        k = rotate_partial(k, cos, sin, self.rope_dims)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=self.num_kv_heads != self.num_heads,
        ).transpose(1, 2)  # (B, T, H, hd)
        if self.use_xsa:
            # Remove from each head's output its component along its own position's value vector
            # (heads grouped by the KV head they share): causal, it only reads position t's own value.
            group = self.num_heads // self.num_kv_heads
            y_g = y.reshape(B, T, self.num_kv_heads, group, self.head_dim)
            v_n = F.normalize(v, dim=-1).unsqueeze(-2)  # (B, T, Hkv, 1, hd)
            y = (y_g - (y_g * v_n).sum(dim=-1, keepdim=True) * v_n).reshape(B, T, self.num_heads, self.head_dim)
        return self.proj(y.reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.slope = cfg.mlp_leaky_slope
        self.fc = nn.Linear(cfg.model_dim, cfg.mlp_hidden, bias=False)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.model_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, self.slope) if self.slope else torch.relu(h)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.attn = Attention(cfg, use_xsa=layer >= cfg.num_layers - cfg.xsa_last_n)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim))))
        self.ln_factor = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0

    def forward(self, x, x0, cos, sin, v_embed=None):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        d = x.size(-1)
        x = x + self.attn_scale.to(x.dtype) * self.attn(F.rms_norm(x, (d,)) * self.ln_factor, cos, sin, v_embed)
        x = x + self.mlp_scale.to(x.dtype) * self.mlp(F.rms_norm(x, (d,)) * self.ln_factor)
        return x


class BigramHash(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.buckets = cfg.bigram_vocab_size
        self.embed = nn.Embedding(cfg.bigram_vocab_size, cfg.bigram_dim)
        self.proj = nn.Linear(cfg.bigram_dim, cfg.model_dim, bias=False) if cfg.bigram_dim != cfg.model_dim else None
        self.scale = nn.Parameter(torch.tensor(BIGRAM_INIT_SCALE))

    def bucket_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """int64[B, T]: hash of (token, previous token); the first position has no previous token."""
        t = idx.to(torch.int64)
        mod = self.buckets - 1
        out = torch.full_like(t, mod)
        out[:, 1:] = torch.bitwise_xor(BIGRAM_MUL_CUR * t[:, 1:], BIGRAM_MUL_PREV * t[:, :-1]) % mod
        return out

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(self.bucket_ids(idx))
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(h.dtype)


class SmearGate(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(cfg.model_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))  # x_{i-1}, zeros at position 0
        return (1 - g) * x + g * prev


class ValueEmbedding(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.ve_dim)
        self.proj = nn.Linear(cfg.ve_dim, cfg.kv_dim, bias=False) if cfg.ve_dim != cfg.kv_dim else None
        self.scale = nn.Parameter(torch.tensor(VE_INIT_SCALE))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(h.dtype)


class Model(nn.Module):
    """Record-stack GPT: ``forward(idx int64[B, T]) -> logits[B, T, V]`` (softcapped)."""

    def __init__(self, config: Config):
        super().__init__()
        config.validate()
        self.config = config
        cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.bigram = BigramHash(cfg) if cfg.bigram_vocab_size > 0 else None
        self.smear = SmearGate(cfg) if cfg.smear_gate else None
        self.num_encoder_layers = cfg.num_layers // 2
        self.num_decoder_layers = cfg.num_layers - self.num_encoder_layers
        self.skip_weights = nn.Parameter(torch.ones(min(self.num_encoder_layers, self.num_decoder_layers), cfg.model_dim))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.ve_layer_index = {layer: j for j, layer in enumerate(cfg.ve_layer_list)}
        if cfg.ve_dim > 0:
            self.ve_shared = ValueEmbedding(cfg)
            self.ve_layer_scales = nn.ParameterList(nn.Parameter(torch.ones(1)) for _ in cfg.ve_layer_list)
        else:
            self.ve_shared = None
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.model_dim, cfg.vocab_size, bias=False)
        rd = cfg.effective_rope_dims
        inv_freq = 1.0 / (cfg.effective_rope_base ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope_tables(self, T: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (1, T, 1, rope_dims/2) for positions 0..T-1."""
        t = torch.arange(T, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))
        return freqs.cos()[None, :, None, :].to(dtype), freqs.sin()[None, :, None, :].to(dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        x = self.tok_emb(idx)  # (B, T, D)
        if self.bigram is not None:
            x = x + self.bigram(idx)
        x = F.rms_norm(x, (x.size(-1),))
        if self.smear is not None:
            x = self.smear(x)
        x0 = x
        cos, sin = self.rope_tables(T, idx.device, x.dtype)
        ve = self.ve_shared(idx) if self.ve_shared is not None else None  # (B, T, kv_dim), shared by ve_layers
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder_layers:
                j = i - self.num_encoder_layers
                if j < self.skip_weights.size(0):
                    x = x + self.skip_weights[j].to(x.dtype) * skips.pop()
            v_embed = None
            if ve is not None and i in self.ve_layer_index:
                v_embed = ve * self.ve_layer_scales[self.ve_layer_index[i]].to(ve.dtype)
            x = block(x, x0, cos, sin, v_embed)
            if i < self.num_encoder_layers:
                skips.append(x)
        x = F.rms_norm(x, (x.size(-1),))
        logits = F.linear(x, self.tok_emb.weight) if self.lm_head is None else self.lm_head(x)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap)  # (B, T, V)


# --- artifact side: recognise a record state dict and rebuild its config -------------------------------

_MARKER_KEYS = ("smear.gate", "bigram.embed.weight", "ve_shared.embed.weight")


def detect(state_dict: Mapping[str, Any]) -> bool:
    """True for state dicts only the record family has (bigram, smear or value-embedding tensors)."""
    return "tok_emb.weight" in state_dict and any(k in state_dict for k in _MARKER_KEYS)


def _shape(state_dict: Mapping[str, Any], key: str, ndim: int) -> tuple[int, ...]:
    return shape_of(state_dict, key, ndim, NAME)


def infer_config(state_dict: Mapping[str, Any]) -> Config:
    """The Config whose Model has exactly these tensor names and shapes.

    Shapes give the widths, layer count, bigram and value-embedding sizes. What they cannot show keeps the
    record's values here (value embeddings on the last layers, partial RoPE 16, XSA on the last 4, LN
    scale, LeakyReLU 0.5, 2048-token training); the artifact's ``__ctxmix_meta__`` (``config_meta``)
    overrides them field by field when the registry loads it.
    """
    vocab_size, model_dim = _shape(state_dict, "tok_emb.weight", 2)
    layers = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")})
    if not layers or layers != list(range(len(layers))):
        raise CtxmixError(f"{NAME}: block indices {layers[:5]} are not 0..n-1")
    (num_heads,) = _shape(state_dict, "blocks.0.attn.q_gain", 1)
    if num_heads <= 0 or model_dim % num_heads:
        raise CtxmixError(f"{NAME}: model_dim {model_dim} is not a multiple of {num_heads} heads")
    head_dim = model_dim // num_heads
    kv_dim = _shape(state_dict, "blocks.0.attn.c_k.weight", 2)[0]
    if kv_dim % head_dim:
        raise CtxmixError(f"{NAME}: blocks.0.attn.c_k.weight rows {kv_dim} are not a multiple of head_dim {head_dim}")
    mlp_hidden = _shape(state_dict, "blocks.0.mlp.fc.weight", 2)[0]
    has_bigram = "bigram.embed.weight" in state_dict
    bigram_vocab_size, bigram_dim = _shape(state_dict, "bigram.embed.weight", 2) if has_bigram else (0, 128)
    ve_dim = _shape(state_dict, "ve_shared.embed.weight", 2)[1] if "ve_shared.embed.weight" in state_dict else 0
    n_ve = len([k for k in state_dict if k.startswith("ve_layer_scales.")])
    n_layers = len(layers)
    cfg = Config(
        vocab_size=vocab_size,
        num_layers=n_layers,
        model_dim=model_dim,
        num_heads=num_heads,
        num_kv_heads=kv_dim // head_dim,
        mlp_hidden=mlp_hidden,
        tie_embeddings="lm_head.weight" not in state_dict,
        bigram_vocab_size=bigram_vocab_size,
        bigram_dim=bigram_dim,
        smear_gate="smear.gate" in state_dict,
        ve_dim=ve_dim,
        ve_layers=",".join(str(i) for i in range(n_layers - n_ve, n_layers)) if ve_dim else "",
        xsa_last_n=min(Config.xsa_last_n, n_layers),
        rope_dims=min(Config.rope_dims, head_dim),
    )
    cfg.validate()
    return cfg


def config_meta(cfg: Config) -> dict[str, int | float | str | bool]:
    """The ``__ctxmix_meta__`` entries (Config field -> value, same types) that shapes cannot show."""
    return {
        "family": NAME,
        "logit_softcap": float(cfg.logit_softcap),
        "rope_base": float(cfg.rope_base),
        "rope_dims": int(cfg.rope_dims),
        "train_seq_len": int(cfg.train_seq_len),
        "qk_gain_init": float(cfg.qk_gain_init),
        "mlp_leaky_slope": float(cfg.mlp_leaky_slope),
        "ln_scale": bool(cfg.ln_scale),
        "xsa_last_n": int(cfg.xsa_last_n),
        "ve_layers": cfg.ve_layers,
    }
