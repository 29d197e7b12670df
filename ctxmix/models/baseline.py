"""The Parameter Golf baseline GPT (openai/parameter-golf ``train_gpt.py``), as a plain torch module.

Architecture, top to bottom:
- tied token embedding (``tok_emb``), RMSNorm'd; its normed output ``x0`` is fed to every block;
- ``num_layers`` blocks arranged as a U-Net: the first half pushes its outputs, the second half pops them
  and adds ``skip_weights[i] * skip`` before running;
- block: ``x = resid_mix[0] * x + resid_mix[1] * x0``; ``x += attn_scale * attn(norm(x))``;
  ``x += mlp_scale * mlp(norm(x))``;
- attention: grouped-query (``num_kv_heads`` <= ``num_heads``), RMSNorm on q and k per head, RoPE,
  per-head ``q_gain`` on q, causal SDPA;
- MLP: ``proj(relu(fc(x)) ** 2)``;
- head: final RMSNorm, logits = ``tok_emb.weight @ x`` (or ``lm_head``), soft-capped:
  ``softcap * tanh(logits / softcap)``.

State-dict keys match the challenge's exactly, so its artifacts load with ``strict=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CtxmixError
from ..kernels.attention import lane_attention
from .keys import check_keys, count_blocks, divide, shape_of
from .layers import CastedLinear, KVCache, LaneCache, RMSNorm, Rotary, apply_rotary, attend

NAME = "baseline"


@dataclass(frozen=True)
class Config:
    vocab_size: int = 1024
    num_layers: int = 9  # unique blocks
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4  # grouped-query attention: heads share num_heads // num_kv_heads k/v
    mlp_mult: int = 2  # MLP hidden = mlp_mult * model_dim
    tie_embeddings: bool = True  # logits use tok_emb.weight; False adds lm_head.weight
    logit_softcap: float = 30.0  # logits = softcap * tanh(logits / softcap)
    rope_base: float = 10000.0
    qk_gain_init: float = 1.5  # initial q_gain (the trained value is in the weights)
    train_seq_len: int = 1024  # training length: the scoring window (not visible in the weights)
    tied_embed_init_std: float = 0.005
    fake_quant_levels: int = 0  # >0: linear weights re-quantized per row at every forward (QAT runs)


# Inclusive (lo, hi) of each Config field, checked with ``ctxmix.spec.check_fields`` wherever a value comes
# from outside the weights (artifact metadata, caller overrides). The widths keep every tensor the model
# builds within reach of a real machine; the floats keep the forward finite in float32 and bfloat16
# (RoPE: base**(-i/d) for a base < 1 overflows; softcap: logits / cap). Floats not listed are still held
# to +-spec.FLOAT_LIMIT, ints to +-spec.INT_LIMIT.
BOUNDS = {
    "vocab_size": (1, 1 << 16),  # token ids of a shard are uint16
    "num_layers": (1, 1024),
    "model_dim": (1, 1 << 16),
    "num_heads": (1, 4096),
    "num_kv_heads": (1, 4096),
    "mlp_mult": (1, 64),
    "logit_softcap": (1e-2, 1e4),
    "rope_base": (1.0, 1e12),
    "train_seq_len": (1, 1 << 20),
    "tied_embed_init_std": (0.0, None),  # a normal's std
    "fake_quant_levels": (0, 127),  # values stored in an int8
}
# Fields the weights' shapes decide: metadata may repeat them but never contradict them.
SHAPE_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "tie_embeddings")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        dim = config.model_dim
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = dim // config.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        levels = config.fake_quant_levels
        self.c_q = CastedLinear(dim, dim, levels)
        self.c_k = CastedLinear(dim, kv_dim, levels)
        self.c_v = CastedLinear(dim, kv_dim, levels)
        self.proj = CastedLinear(dim, dim, levels)
        self.proj._zero_init = True
        self.q_gain = nn.Parameter(torch.full((config.num_heads,), config.qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(self.head_dim, base=config.rope_base)
        self.backend = "sdpa"

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0, n_queries: int | None = None) -> Tensor:
        """x (B, T, C) -> (B, Q, C) for the last Q = ``n_queries`` positions (default: all T); keys and
        values come from all T positions (and the cache)."""
        B, T, C = x.shape
        Q = T if n_queries is None else n_queries
        q = self.c_q(x[:, T - Q :]).reshape(B, Q, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Q, hd)
        k = self.c_k(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.c_v(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q = F.rms_norm(q, (q.size(-1),))
        k = F.rms_norm(k, (k.size(-1),))
        past = cache.length if cache is not None else 0
        cos, sin = self.rotary(past, T, x.device, q.dtype)  # positions past .. past + T - 1
        q = apply_rotary(q, cos[:, :, T - Q :], sin[:, :, T - Q :])
        k = apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(dtype=q.dtype)[None, :, None, None]
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # (B, Hkv, past + T, hd)
        y = attend(q, k, v, past + T - Q, self.backend)  # (B, H, Q, hd)
        y = y.transpose(1, 2).contiguous().reshape(B, Q, C)
        return self.proj(y)

    def step(self, x: Tensor, cache: KVCache, layer: int) -> Tensor:
        """``forward`` for one position of one sequence: x (1, 1, C) -> (1, 1, C), extending ``cache``.
        q, k and v come from one matmul over the stacked weights; every held key is in the past, so no mask."""
        C = x.size(-1)
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(x.reshape(C), self._stacked_qkv().to(x.dtype))
        # q and k heads take the same per-head norm and rotation: one call each for all of them.
        qk = F.rms_norm(qkv[: C + Hkv * hd].reshape(H + Hkv, hd), (hd,))
        cos, sin = self.rotary(cache.length, 1, x.device, qk.dtype)  # (1, 1, 1, hd/2)
        qk = apply_rotary(qk, cos[0, 0], sin[0, 0])
        q = qk[:H] * self.q_gain.to(dtype=qk.dtype)[:, None]
        k = qk[H:]
        v = qkv[C + Hkv * hd :].reshape(Hkv, 1, hd)
        keys, values = cache.extend(layer, k[None, :, None], v[None])  # (1, Hkv, past + 1, hd)
        # One query over held keys: two small batched matmuls and a softmax cost a fraction of SDPA's
        # set-up for a single row. Query heads that share a k/v head are rows of one matmul.
        q = q.reshape(Hkv, H // Hkv, hd)
        scores = torch.matmul(q, keys[0].transpose(1, 2)) * (hd**-0.5)  # (Hkv, H / Hkv, past + 1)
        y = torch.matmul(torch.softmax(scores, dim=-1), values[0])  # (Hkv, group, hd)
        return self.proj(y.reshape(1, 1, C))

    def step_lanes(self, x: Tensor, cache: LaneCache, layer: int) -> Tensor:
        """``step`` for one position of each of B lanes at once: x (B, C) -> (B, C), writing the position into
        ``cache``. Every lane sits at the same position, so one RoPE angle and one key count serve all.
        x is (B, 1, C) so that the blocks' broadcasting (and a family's ``adapt``) is that of ``forward``."""
        B, _, C = x.shape
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(x.reshape(B, C), self._stacked_qkv().to(x.dtype))  # (B, C + 2 kv_dim)
        qk = F.rms_norm(qkv[:, : C + Hkv * hd].reshape(B, H + Hkv, hd), (hd,))
        cos, sin = self.rotary(cache.length, 1, x.device, qk.dtype)  # (1, 1, 1, hd/2)
        qk = apply_rotary(qk, cos[0, 0], sin[0, 0])
        q = qk[:, :H] * self.q_gain.to(dtype=qk.dtype)[:, None]
        k = qk[:, H:]
        v = qkv[:, C + Hkv * hd :].reshape(B, Hkv, hd)
        keys_t, values = cache.extend(layer, k, v)  # (B, Hkv, hd, capacity), (B, Hkv, capacity, hd)
        n = min(cache.length + 1, cache.capacity)  # positions held, this one included
        q = q.reshape(B, Hkv, H // Hkv, hd)
        if q.device.type == "cpu" and q.dtype == torch.float32:
            # SDPA's CPU kernel took 2 ms a call for one query per lane, torch.matmul 0.3-0.5 ms (2 x B x Hkv
            # tiny products); the loops of kernels/attention.py run the same sums in one call.
            y = torch.empty_like(q)
            lane_attention(q.contiguous().numpy(), keys_t.numpy(), values.numpy(), n, hd**-0.5, y.numpy())
        else:
            scores = torch.matmul(q, keys_t[..., :n]) * (hd**-0.5)  # (B, Hkv, group, n)
            y = torch.matmul(torch.softmax(scores, dim=-1), values[:, :, :n])  # (B, Hkv, group, hd)
        return self.proj(y.reshape(B, 1, C))

    def _stacked_qkv(self) -> Tensor:
        """[W_q; W_k; W_v] (C + 2 kv_dim, C) as the forward uses them (fake-quantized when the family is), rebuilt
        only when a parameter changes (training updates them in place, which bumps their version)."""
        layers = (self.c_q, self.c_k, self.c_v)
        key = tuple((m.weight.data_ptr(), m.weight._version, m.weight.device, m.weight.dtype) for m in layers)
        if getattr(self, "_qkv", None) is None or self._qkv[0] != key:
            self._qkv = (key, torch.cat([m.effective_weight() for m in layers]))
        return self._qkv[1]


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        hidden = config.mlp_mult * config.model_dim
        self.fc = CastedLinear(config.model_dim, hidden, config.fake_quant_levels)
        self.proj = CastedLinear(hidden, config.model_dim, config.fake_quant_levels)
        self.proj._zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())  # relu^2


class Block(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        dim = config.model_dim
        self.attn_norm = RMSNorm()
        self.mlp_norm = RMSNorm()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())  # (2, dim)

    def forward(self, x: Tensor, x0: Tensor, cache: KVCache | None = None, layer: int = 0,
                n_queries: int | None = None) -> Tensor:
        """(B, T, C) -> (B, Q, C): the block's output for the last Q = ``n_queries`` positions (default T)."""
        return self._residual(x, x0, lambda h: self.attn(h, cache, layer, n_queries), n_queries)

    def step(self, x: Tensor, x0: Tensor, cache: KVCache, layer: int) -> Tensor:
        """``forward`` for one position of one sequence (1, 1, C), extending ``cache``."""
        return self._residual(x, x0, lambda h: self.attn.step(h, cache, layer))

    def step_lanes(self, x: Tensor, x0: Tensor, cache: LaneCache, layer: int) -> Tensor:
        """``forward`` for one position of each of B lanes (B, 1, C), writing it into ``cache`` (in integer
        matmuls and numba kernels when the cache asks for them: ``models/integer.py``)."""
        if cache.integer_step is not None:
            return cache.integer_step.block(self, x, x0, cache, layer)
        return self._residual(x, x0, lambda h: self.attn.step_lanes(h, cache, layer))

    def _residual(self, x: Tensor, x0: Tensor, attention, n_queries: int | None = None) -> Tensor:
        """The block around its attention: mix in x0, add the scaled attention of the normed input (for
        the last ``n_queries`` rows), add the scaled MLP. ``attention``: normed (B, T, C) -> (B, Q, C)."""
        mix = self.resid_mix.to(dtype=x.dtype)
        x = mix[0] * x + mix[1] * x0
        attn_out = attention(self.attn_norm(x))
        if n_queries is not None:
            x = x[:, x.size(1) - n_queries :]
        x = x + self.attn_scale.to(dtype=x.dtype) * attn_out
        return x + self.mlp_scale.to(dtype=x.dtype) * self.mlp(self.mlp_norm(x))


class Model(nn.Module):
    """The baseline GPT. ``forward(idx (B, T)) -> logits (B, T, V)``; ``hidden`` + ``head`` split it so a
    scorer can run the head on the rows it scores only; ``new_cache`` + ``forward(idx, cache)`` decode
    incrementally."""

    supports_kv_cache = True
    supports_last_rows = True  # hidden(idx, last=Q)

    def __init__(self, config: Config):
        super().__init__()
        if config.logit_softcap <= 0:
            raise ValueError(f"logit_softcap must be positive, got {config.logit_softcap}")
        self.config = config
        self.schedule = self.layer_schedule(config)  # block index run at each effective layer
        self.num_encoder_layers = len(self.schedule) // 2
        self.num_decoder_layers = len(self.schedule) - self.num_encoder_layers
        num_skips = min(self.num_encoder_layers, self.num_decoder_layers)
        self.tok_emb = nn.Embedding(config.vocab_size, config.model_dim)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, config.model_dim, dtype=torch.float32))
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm()
        self.lm_head = None if config.tie_embeddings else CastedLinear(config.model_dim, config.vocab_size)
        if self.lm_head is not None:
            self.lm_head._zero_init = True
        self.logit_adapter: nn.Module | None = None  # test-time training's low-rank logit term (models/lora.py)
        self._init_weights()

    @staticmethod
    def layer_schedule(config: Config) -> list[int]:
        return list(range(config.num_layers))

    def adapt(self, x: Tensor, layer: int) -> Tensor:
        """Hook after each effective layer (identity here; the repeat family scales and shifts)."""
        return x

    def _init_weights(self) -> None:
        if self.config.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=self.config.tied_embed_init_std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and getattr(module, "_zero_init", False):
                nn.init.zeros_(module.weight)

    def set_attention_backend(self, backend: str) -> None:
        for block in self.blocks:
            block.attn.backend = backend

    def new_cache(self) -> KVCache:
        return KVCache(len(self.schedule))

    def hidden(self, idx: Tensor, cache: KVCache | None = None, last: int | None = None) -> Tensor:
        """Token ids (B, T) -> final normed hidden states (B, T, model_dim). With ``cache``, ``idx``
        continues the sequence the cache holds and the cache is extended.

        ``last``: return only the last ``last`` positions (B, last, model_dim). The final layer then runs
        its queries and MLP on those rows alone (its keys and values still see every position), which is
        what a sliding-window scorer needs: each window after the first scores only its last ``stride``
        positions. Mathematically the same rows; not the same floats (other matmul shapes).
        """
        x0 = F.rms_norm(self.tok_emb(idx), (self.config.model_dim,))
        final = len(self.schedule) - 1
        x = self._run_layers(x0, lambda block, x, layer: block(x, x0, cache, layer, last if layer == final else None))
        if cache is not None:
            cache.length += idx.size(1)
        return self.final_norm(x)

    def decode_step(self, token: int, cache: KVCache) -> Tensor:
        """Logits (V,) after ``token``, which continues the sequence ``cache`` holds; the cache is extended.

        The same function as ``forward(tensor([[token]]), cache)[0, -1]``, written for one position of one
        sequence, which the codec runs once per token on both sides: the blocks' ``step`` takes q, k and v
        from one matmul and attends with a plain softmax over the held keys instead of SDPA, whose set-up
        costs more than the arithmetic for one row. Floats may differ from ``forward``'s in the last bits
        (other matmul shapes); encoder and decoder both take this path, so they agree bit for bit.
        """
        x0 = F.rms_norm(self.tok_emb.weight[token].reshape(1, 1, -1), (self.config.model_dim,))
        x = self._run_layers(x0, lambda block, x, layer: block.step(x, x0, cache, layer))
        cache.length += 1
        return self.head(self.final_norm(x)).reshape(-1)

    def new_lane_cache(self, capacity: int, integer: bool = False, threads: int = 1, int8: bool = False,
                       step=None, attention_floor: float = 0.0, float32_softmax: bool = False) -> LaneCache:
        """``step``: another cache's ``integer_step`` to share (its prepared weights), for groups of lanes;
        ``attention_floor``, ``float32_softmax``: a new integer step's (``IntegerLaneStep``)."""
        return LaneCache(len(self.schedule), capacity, integer, threads, int8, step, attention_floor, float32_softmax)

    def decode_lanes(self, tokens: Tensor, cache: LaneCache) -> Tensor:
        """Logits (B, V) after one more token of each of B lanes (``tokens`` int64 (B,)), which continue the
        sequences ``cache`` holds; the cache takes the new position (dropping its oldest recent one when full).

        The codec's lane engine runs this once per step on both sides with the same B, so the floats agree
        bit for bit; a lane's row does not depend on the other lanes' tokens (rows of a matmul are
        independent), only on the batch shape, which both sides share. With a cache of ``capacity``
        positions each query sees the lane's first position and the ``capacity - 1`` latest: a sliding
        window that never recomputes its keys (the blocks above the first see more than the window through
        the keys they hold, which is not how the model was trained; docs/benchmarks.md measures the cost).
        """
        step = cache.integer_step
        if step is not None:
            x0 = step.embed(self.tok_emb.weight, tokens)  # (B, 1, C)
        else:
            x0 = F.rms_norm(self.tok_emb.weight[tokens][:, None], (self.config.model_dim,))
        x = self._run_layers(x0, lambda block, x, layer: block.step_lanes(x, x0, cache, layer),
                             None if step is None else step.add_skip)
        cache.length += 1
        if step is not None:
            weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.effective_weight()
            return step.head(weight, x, self.config.logit_softcap)
        return self.head(self.final_norm(x)).reshape(tokens.size(0), -1)

    def _run_layers(self, x0: Tensor, run_block, add_skip=None) -> Tensor:
        """The U-Net over the layer schedule from the normed embeddings ``x0``: the first half pushes its
        outputs, the second half pops them, adds ``skip_weights[i] * skip`` and runs. ``run_block(block,
        x, layer)`` runs one block (it sees x0 through its closure) and ``adapt`` follows it. ``add_skip(x,
        skip_weights, i, skip)``: the integer lane step's own sum, the same floats (``IntegerLaneStep``)."""
        x = x0
        skips: list[Tensor] = []
        for layer, block_index in enumerate(self.schedule):
            decoder_index = layer - self.num_encoder_layers
            if decoder_index >= 0 and skips:
                if add_skip is not None:
                    x = add_skip(x, self.skip_weights, decoder_index, skips.pop())
                else:
                    x = x + self.skip_weights[decoder_index].to(dtype=x.dtype) * skips.pop()
            x = self.adapt(run_block(self.blocks[block_index], x, layer), layer)
            if decoder_index < 0:
                skips.append(x)
        return x

    def head(self, h: Tensor) -> Tensor:
        """Hidden states (..., model_dim) -> soft-capped logits (..., vocab_size)."""
        logits = F.linear(h, self.tok_emb.weight) if self.lm_head is None else self.lm_head(h)
        if self.logit_adapter is not None:  # only on a test-time-training twin; a loaded model has none
            logits = logits + self.logit_adapter(h)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap)

    def forward(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        return self.head(self.hidden(idx, cache))


# ----------------------------------------------------------------------------------------------------
# Artifact detection


def detect(state_dict: dict[str, Tensor]) -> bool:
    """A baseline state dict: a token embedding and blocks, no adapters of other families."""
    return "tok_emb.weight" in state_dict and "blocks.0.attn.c_q.weight" in state_dict and not any(
        key.startswith("repeat_") for key in state_dict
    )


def infer_shape(state_dict: dict[str, Tensor], family: str = NAME, num_layers: int | None = None) -> dict:
    """Shape fields shared with the families built on this one (``num_layers`` defaults to the blocks seen)."""
    vocab_size, dim = shape_of(state_dict, "tok_emb.weight", 2, family)
    (num_heads,) = shape_of(state_dict, "blocks.0.attn.q_gain", 1, family)
    head_dim = divide(dim, num_heads, f"model_dim over {num_heads} heads (from blocks.0.attn.q_gain)", family)
    if head_dim % 2:
        raise CtxmixError(f"{family}: head_dim {head_dim} is odd; RoPE needs an even head_dim")
    kv_dim, _ = shape_of(state_dict, "blocks.0.attn.c_k.weight", 2, family)
    num_kv_heads = divide(kv_dim, head_dim, f"blocks.0.attn.c_k.weight rows over head_dim {head_dim}", family)
    if num_heads % num_kv_heads:
        raise CtxmixError(f"{family}: {num_heads} heads are not a multiple of {num_kv_heads} kv heads")
    hidden, _ = shape_of(state_dict, "blocks.0.mlp.fc.weight", 2, family)
    return dict(
        vocab_size=vocab_size,
        num_layers=num_layers if num_layers is not None else count_blocks(state_dict, family),
        model_dim=dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        mlp_mult=divide(hidden, dim, f"blocks.0.mlp.fc.weight rows over model_dim {dim}", family),
        tie_embeddings="lm_head.weight" not in state_dict,
    )


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict a model built from the config holds."""
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


def infer_config(state_dict: dict[str, Tensor]) -> Config:
    """Config from key names and shapes; raises CtxmixError naming the first key or shape that does not fit."""
    config = Config(**infer_shape(state_dict))
    with torch.device("meta"):
        shapes = expected_shapes(Model(config))
    check_keys(state_dict, shapes, NAME)
    return config
