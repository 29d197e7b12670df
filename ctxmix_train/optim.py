"""Optimizers and schedules: Muon for block matrices, Adam for embeddings and scalars.

Muon (Keller Jordan, https://kellerjordan.github.io/posts/muon/, as used by modded-nanogpt and the
Parameter Golf baseline) replaces each matrix update by the nearest semi-orthogonal matrix, found with a
quintic Newton-Schulz iteration (coefficients 3.4445, -4.7750, 2.0315). Parameters are split into groups
by the module that owns them, not by name patterns:

- ``nn.Embedding`` tables (token embedding, bigram and value embeddings): Adam at the embedding LR.
- an untied output head (``lm_head``): Adam at ``head_lr``.
- every other ``nn.Linear`` weight: Muon at ``matrix_lr``.
- everything else (gains, scales, mixes, skip weights, gates): Adam at ``scalar_lr``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import TrainConfig

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients from modded-nanogpt
NS_EPS = 1e-7


def newton_schulz5(grad: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with the row/column space of ``grad`` (2-D)."""
    a, b, c = NS_COEFFS
    x = grad.to(dtype)
    x = x / (x.norm() + NS_EPS)
    transposed = grad.size(0) > grad.size(1)
    if transposed:  # iterate on the wide orientation: X @ X.T is then the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        poly = b * gram + c * gram @ gram
        x = a * x + poly @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Momentum SGD whose (Nesterov) update is orthogonalized per matrix.

    Under torch.distributed each rank orthogonalizes every ``world_size``-th matrix and one all-reduce of
    the flat update buffer shares the results; the other ranks contribute exact zeros, so every rank applies
    the same update as a single process would.
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float = 0.0,
                 nesterov: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay, nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            device = params[0].device
            # bf16 Newton-Schulz is the fast path on GPUs; CPUs are faster (and no less exact) in fp32.
            ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            flat = torch.zeros(sum(p.numel() for p in params), device=device, dtype=ns_dtype)
            offset = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(p.grad)
                    g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    u = newton_schulz5(g, group["backend_steps"], ns_dtype)
                    u = u * max(1.0, u.size(0) / u.size(1)) ** 0.5  # same RMS step for tall matrices
                    flat[offset : offset + p.numel()] = u.reshape(-1)
                offset += p.numel()
            if distributed and world_size > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                if group["weight_decay"] > 0:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


@dataclass
class ParamGroups:
    embed: list[nn.Parameter]
    head: list[nn.Parameter]
    matrix: list[nn.Parameter]
    scalar: list[nn.Parameter]


def split_params(model: nn.Module) -> ParamGroups:
    """Parameters by role (see the module docstring); every trainable parameter lands in exactly one group."""
    groups = ParamGroups([], [], [], [])
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(module, nn.Embedding):
                groups.embed.append(p)
            elif isinstance(module, nn.Linear) and full.startswith("lm_head"):
                groups.head.append(p)
            elif isinstance(module, nn.Linear) and p.ndim == 2:
                groups.matrix.append(p)
            else:
                groups.scalar.append(p)
    return groups


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> tuple[list[torch.optim.Optimizer], Muon]:
    """The optimizers of one run (each param group carries ``base_lr`` for the schedule) and the Muon one."""
    groups = split_params(model)
    fused = next(model.parameters()).device.type == "cuda"
    embed_lr = cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr
    adam_kwargs = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)
    optimizers: list[torch.optim.Optimizer] = []
    # AdamW with weight_decay=0 is exactly Adam; one class keeps the record's Adam weight decay optional.
    optimizers.append(torch.optim.AdamW([{"params": groups.embed, "lr": embed_lr, "base_lr": embed_lr}],
                                        weight_decay=cfg.adam_wd, **adam_kwargs))
    if groups.head:
        optimizers.append(torch.optim.AdamW([{"params": groups.head, "lr": cfg.head_lr, "base_lr": cfg.head_lr}],
                                            weight_decay=0.0, **adam_kwargs))
    muon = Muon(groups.matrix, lr=cfg.matrix_lr, momentum=cfg.muon_momentum,
                backend_steps=cfg.muon_backend_steps, weight_decay=cfg.muon_wd)
    for group in muon.param_groups:
        group["base_lr"] = cfg.matrix_lr
    optimizers.append(muon)
    if groups.scalar:
        optimizers.append(torch.optim.AdamW([{"params": groups.scalar, "lr": cfg.scalar_lr,
                                              "base_lr": cfg.scalar_lr}],
                                            weight_decay=cfg.adam_wd, **adam_kwargs))
    return optimizers, muon


def lr_scale(cfg: TrainConfig, step: int, elapsed_s: float) -> float:
    """LR multiplier in [0, 1] for ``step`` (0-based): an optional linear warmup, 1, then a linear warmdown
    to 0 over the last ``warmdown_iters`` steps.

    Under a wall-clock cap the warmdown is also scheduled by time, as the challenge does: it starts when the
    time left is less than ``warmdown_iters`` steps at the average step time so far. The smaller of the
    step-based and time-based multipliers is used, so whichever limit comes first still gets a warmdown.
    """
    warmup = min((step + 1) / cfg.lr_warmup_steps, 1.0) if cfg.lr_warmup_steps > 0 else 1.0
    if cfg.warmdown_iters <= 0:
        return warmup
    by_steps = min(max((cfg.iterations - step) / cfg.warmdown_iters, 0.0), 1.0)
    if cfg.max_wallclock_seconds <= 0 or step == 0:
        return min(warmup, by_steps)
    warmdown_s = cfg.warmdown_iters * elapsed_s / step
    remaining_s = max(cfg.max_wallclock_seconds - elapsed_s, 0.0)
    by_time = min(remaining_s / max(warmdown_s, 1e-9), 1.0)
    return min(warmup, by_steps, by_time)


def muon_momentum(cfg: TrainConfig, step: int) -> float:
    """Muon momentum, warmed up linearly from ``muon_momentum_warmup_start``."""
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum
