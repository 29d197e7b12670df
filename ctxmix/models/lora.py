"""What test-time training adapts: low-rank adapters (LoRA) or the weights themselves, on a twin of a model.

The neural expert's loaded model is shared (``experts.neural`` caches it, and other experts may score with
it), so test-time training never touches it. ``Adaptation`` builds a *twin*: the same family and config,
whose tensors are the loaded model's own (no copy) except the ones that train, which are the twin's.

- ``lora``: each adapted linear map ``W`` becomes ``y = x W^T + (x A^T) B^T`` (Hu et al. 2021), ``A`` (r, in)
  drawn from a generator seeded with ``seed``, ``B`` (out, r) zero. A fresh adapter adds exactly 0.0 to
  every output, so a model with fresh adapters gives the loaded model's floats to the last bit. ``head``
  adds a low-rank term to the logits before the soft cap (the baseline families' ``logit_adapter``).
- ``full``: each adapted linear map gets a dense float32 delta, ``y = x (W + D)^T`` with ``D`` zero at start:
  training ``D`` is training the weights the forward uses, with the very gradients and optimizer steps of
  training ``W`` itself, except that a family that re-quantizes its weights at every forward (6-bit QAT,
  ``CastedLinear.fake_quant_levels``) adapts the float weights it computes with (its rounded ``W``, plus
  ``D``), where steps on ``W`` would vanish in the rounding. Other tensors (embeddings, gains) that train
  are the twin's own float32 copies; the loaded ones stay as they were.

``reset()`` puts every trained tensor back where it started (adapters: drawn again from the same seed;
deltas: zero; copies: copied from the loaded model), so a reset costs no stored copy.

Roles (``ttt_params``, ";"-separated): ``q k v o`` (attention's query, key, value and output maps), ``fc
proj`` (the MLP's two maps), ``head`` (the logits), ``gains`` (every per-channel vector: residual mixes,
branch scales, q gains, skip weights, repeat adapters; trained directly in both modes), ``emb`` (the
embedding tables; ``full`` only) and ``all`` (every role the mode has).
"""

from __future__ import annotations

import copy
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CtxmixError

LINEAR_ROLES = {"q": "attn.c_q", "k": "attn.c_k", "v": "attn.c_v", "o": "attn.proj", "fc": "mlp.fc", "proj": "mlp.proj"}
ROLES = (*LINEAR_ROLES, "head", "gains", "emb")
MODE_ROLES = {"lora": (*LINEAR_ROLES, "head", "gains"), "full": ROLES}
ALL = "all"
ALL_ROLES = {"lora": (*LINEAR_ROLES, "head"), "full": ROLES}  # what "all" means in each mode
_BLOCK_MODULE = re.compile(r"blocks\.\d+\.(.+)")


def parse_roles(text: str, mode: str) -> tuple[str, ...]:
    """``"q;v;head"`` -> ``("q", "v", "head")`` in ``ROLES`` order; ``"all"`` -> every role of the mode.
    Raises CtxmixError naming an unknown role, or one the mode cannot adapt."""
    items = [item.strip() for item in text.split(";") if item.strip()]
    if not items:
        raise CtxmixError(f"ttt_params={text!r} names no weights (roles: {', '.join(MODE_ROLES[mode])}, or all)")
    if ALL in items:
        return ALL_ROLES[mode]
    for item in items:
        if item not in ROLES:
            raise CtxmixError(f"ttt_params: unknown role {item!r} (roles: {', '.join(ROLES)}, or all)")
        if item not in MODE_ROLES[mode]:
            raise CtxmixError(f"ttt_params: role {item!r} cannot adapt with ttt={mode} (roles: {', '.join(MODE_ROLES[mode])})")
    return tuple(role for role in ROLES if role in items)


class LowRank(nn.Module):
    """``x -> (x A^T) B^T``: A (rank, in), B (out, rank), B zero at start so the term starts as exactly 0."""

    def __init__(self, in_features: int, out_features: int, rank: int, device: torch.device):
        super().__init__()
        self.lora_a = nn.Parameter(torch.zeros(rank, in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=device))

    def init_(self, generator: torch.Generator) -> None:
        """A uniform in +-1/sqrt(in) (nn.Linear's default range), drawn on the CPU from ``generator``; B = 0."""
        bound = 1.0 / math.sqrt(self.lora_a.size(1))
        values = torch.empty(self.lora_a.shape).uniform_(-bound, bound, generator=generator)
        with torch.no_grad():
            self.lora_a.copy_(values)
            self.lora_b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))


class LoRALinear(nn.Module):
    """A frozen linear layer plus a low-rank term: ``base(x) + (x A^T) B^T`` (base keeps its own forward,
    fake quantization included)."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.adapter = LowRank(base.in_features, base.out_features, rank, base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.adapter(x)


class DeltaLinear(nn.Module):
    """A frozen linear layer plus a dense delta on the weight its forward uses: ``x (W + D)^T``, D zero at
    start (``W``: the layer's ``effective_weight()``, fake-quantized where the family does that)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.delta = nn.Parameter(torch.zeros_like(base.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base.effective_weight() if hasattr(self.base, "effective_weight") else self.base.weight
        return F.linear(x, (weight + self.delta).to(x.dtype))  # + a zero delta: W's floats, unchanged


def twin(source: nn.Module) -> nn.Module:
    """A new model of ``source``'s family and config whose parameters and buffers are ``source``'s own
    tensors (nothing is copied, nothing is cached yet), in eval mode with every parameter frozen.

    A model built by a user's adapter module (``models/adapter.py``) has no family config to rebuild it
    from: it is deep-copied instead, its parameters and buffers still shared."""
    if not type(source).__module__.startswith(__package__ + ".") or not hasattr(source, "config"):
        shared = {id(t): t for t in (*source.parameters(), *source.buffers())}
        model = copy.deepcopy(source, shared)
        model.eval()
        model.requires_grad_(False)
        return model
    with torch.device("meta"):
        model = type(source)(source.config)
    model.load_state_dict({k: v.detach() for k, v in source.named_parameters()}, strict=False, assign=True)
    for name, buffer in source.named_buffers():  # non-persistent buffers (RoPE frequencies) too
        path, _, attr = name.rpartition(".")
        model.get_submodule(path)._buffers[attr] = buffer
    for mine, theirs in zip(model.modules(), source.modules()):  # attributes set after construction
        if hasattr(theirs, "backend"):
            mine.backend = theirs.backend
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:  # a parameter not registered under its state-dict name: not a family this file knows
        raise CtxmixError(f"test-time training: cannot share the model's tensor {missing[0]}")
    model.eval()
    model.requires_grad_(False)
    return model


class Adaptation:
    """A twin of ``source`` with the tensors that train, and how they start again.

    ``params``: the trained tensors, in a fixed order (the optimizer's). ``reset()`` restores them.
    """

    def __init__(self, source: nn.Module, mode: str, roles: tuple[str, ...], rank: int, seed: int, *,
                 every_role: bool = False):
        """``every_role``: the roles came from ``all``, so a role this model lacks (a user's model class has
        no ``logit_adapter``) is skipped rather than refused."""
        self.source = source
        self.mode = mode
        self.seed = seed
        self.model = twin(source)
        self.adapters: list[LowRank] = []
        self.deltas: list[nn.Parameter] = []
        self.copies: list[tuple[nn.Parameter, torch.Tensor]] = []  # (twin's own tensor, the loaded one)
        wanted = set(roles)
        own = self._selected_weights(wanted)
        for name in own:  # the twin gets its own float copy of each weight that trains
            path, _, attr = name.rpartition(".")
            module = self.model.get_submodule(path)
            loaded = getattr(module, attr)
            param = nn.Parameter(loaded.detach().clone(), requires_grad=True)
            setattr(module, attr, param)
            self.copies.append((param, loaded))
        for name, module in list(self.model.named_modules()):
            match = _BLOCK_MODULE.fullmatch(name)
            role = next((r for r, suffix in LINEAR_ROLES.items() if match and match.group(1) == suffix), None)
            if role in wanted:
                path, _, attr = name.rpartition(".")
                wrapped = LoRALinear(module, rank) if mode == "lora" else DeltaLinear(module)
                setattr(self.model.get_submodule(path), attr, wrapped)
                if mode == "lora":
                    self.adapters.append(wrapped.adapter)
                else:
                    self.deltas.append(wrapped.delta)
        if mode == "lora":
            if "head" in wanted and not (every_role and not hasattr(self.model, "logit_adapter")):
                if not hasattr(self.model, "logit_adapter"):
                    raise CtxmixError(f"ttt_params: the {type(self.model).__module__.rsplit('.', 1)[-1]} family has no "
                                      "head adapter (adapt q k v o fc proj gains instead)")
                dim = self.model.config.model_dim
                self.model.logit_adapter = LowRank(dim, self.model.config.vocab_size, rank, self.model.tok_emb.weight.device)
                self.adapters.append(self.model.logit_adapter)
        self.params: list[nn.Parameter] = [p for a in self.adapters for p in (a.lora_a, a.lora_b)]
        self.params += self.deltas + [param for param, _ in self.copies]
        if not self.params:
            raise CtxmixError(f"ttt_params: nothing in this model matches {';'.join(roles)}")
        self.reset()

    def _selected_weights(self, wanted: set[str]) -> list[str]:
        """Names of the parameters that train as themselves (a copy each): the selected embeddings and head
        in ``full`` mode, and the gains in either mode (linear maps train through adapters or deltas)."""
        linear = {name for name, m in self.model.named_modules() if isinstance(m, nn.Linear)}
        embedding = {name for name, m in self.model.named_modules() if isinstance(m, nn.Embedding)}
        head = "lm_head.weight" if getattr(self.model, "lm_head", None) is not None else "tok_emb.weight"
        chosen = []
        for name, _ in self.model.named_parameters():
            owner, _, _ = name.rpartition(".")
            match = _BLOCK_MODULE.fullmatch(owner)
            if owner in linear or owner in embedding:
                role = next((r for r, suffix in LINEAR_ROLES.items() if match and match.group(1) == suffix), None)
                if role is not None:
                    continue  # a block's linear map: adapters (lora) or a delta (full), not a copy
                if self.mode == "full" and ((name == head and "head" in wanted) or (owner in embedding and "emb" in wanted)):
                    chosen.append(name)
            elif "gains" in wanted:
                chosen.append(name)
        return chosen

    def reset(self) -> None:
        """Every trained tensor back to its start: adapters drawn again from the seed, weights copied back."""
        generator = torch.Generator().manual_seed(self.seed)
        for adapter in self.adapters:  # always in the same order, so every reset draws the same values
            adapter.init_(generator)
        with torch.no_grad():
            for delta in self.deltas:
                delta.zero_()
            for param, loaded in self.copies:
                param.copy_(loaded)

    def state_bytes(self) -> int:
        """Bytes of the trained tensors (the optimizer's state comes on top, and gradients of the same size)."""
        return sum(p.numel() * p.element_size() for p in self.params)
