"""The model of a run: built from ctxmix's own families (one definition for training and evaluation).

``build_model`` maps a ``TrainConfig`` onto the family's ``Config`` and initializes the weights the way
the challenge's scripts do; ``artifact_meta`` is what the artifact must carry beside the weights so that
ctxmix rebuilds the same model (``__ctxmix_meta__``).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import fields
from types import ModuleType

import torch
from torch import nn

from ctxmix.errors import CtxmixError

from .config import TrainConfig


def family_module(family: str) -> ModuleType:
    """``ctxmix.models.<family>``: exposes NAME, Config, detect, infer_config, Model."""
    try:
        return importlib.import_module(f"ctxmix.models.{family}")
    except ModuleNotFoundError:
        raise CtxmixError(f"model family {family!r} is not available in ctxmix.models") from None


def model_config(cfg: TrainConfig):
    """The family ``Config`` for ``cfg``: every field of the same name is copied, the rest derived."""
    module = family_module(cfg.family)
    values = cfg.to_dict()
    derived = {
        "mlp_hidden": int(cfg.mlp_mult * cfg.model_dim),
    }
    kwargs = {}
    for f in fields(module.Config):
        if f.name in derived:
            kwargs[f.name] = derived[f.name]
        elif f.name == "mlp_mult" and f.type in ("int", int):
            if cfg.mlp_mult != int(cfg.mlp_mult):
                raise CtxmixError(f"config mlp_mult={cfg.mlp_mult}: the {cfg.family} family takes a whole multiple")
            kwargs[f.name] = int(cfg.mlp_mult)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return module.Config(**kwargs)


def build_model(cfg: TrainConfig, device: torch.device | str = "cpu") -> nn.Module:
    """A freshly initialized float32 model of ``cfg``'s family and shape on ``device``."""
    module = family_module(cfg.family)
    model = module.Model(model_config(cfg))
    initialize(model, cfg)
    return model.to(device)


@torch.no_grad()
def initialize(model: nn.Module, cfg: TrainConfig) -> None:
    """The challenge scripts' initialization (uses torch's global RNG: seed first for reproducibility).

    Both families: tied token embedding ~ N(0, tied_embed_init_std); branch output projections
    (``attn.proj``, ``mlp.proj``) and an untied head start at zero, so every block starts as the identity;
    gains, scales and mixes start at their neutral values. Baseline: other linears keep torch's default
    init, as in ``train_gpt.py``. Record: other linears at least 64x64 are orthogonal, and projections
    into the residual stream are scaled by 1/sqrt(2 * num_layers); the bigram table starts at zero and
    the value-embedding table ~ N(0, 0.01), as in the record's script.
    """
    record = cfg.family == "record"
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
            if name.endswith(("attn.proj", "mlp.proj")) or name == "lm_head":
                nn.init.zeros_(module.weight)
            elif record and min(module.weight.shape) >= 64:
                nn.init.orthogonal_(module.weight)
                if name.endswith(".proj"):
                    module.weight.mul_(1.0 / math.sqrt(2 * cfg.num_layers))
        elif isinstance(module, nn.Embedding):
            if name == "tok_emb":
                std = cfg.tied_embed_init_std if cfg.tie_embeddings else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif name.startswith("bigram"):
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=0.01)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "q_gain":
            p.fill_(cfg.qk_gain_init)
        elif leaf in ("attn_scale", "mlp_scale", "skip_weights") or name.startswith("ve_layer_scales"):
            p.fill_(1.0)
        elif leaf == "resid_mix":
            p[0].fill_(1.0)
            p[1].fill_(0.0)


def artifact_meta(cfg: TrainConfig, **extra: int | float | str) -> dict[str, int | float | str]:
    """``__ctxmix_meta__``: hyperparameters the weights cannot show, as str -> int/float/str."""
    meta: dict[str, int | float | str] = {
        "family": cfg.family,
        "train_seq_len": cfg.train_seq_len,
        "rope_base": cfg.rope_base,
        "logit_softcap": cfg.logit_softcap,
        "qk_gain_init": cfg.qk_gain_init,
    }
    if cfg.family == "record":
        record = family_module("record")
        meta.update(record.config_meta(model_config(cfg)))
    meta.update(extra)
    return meta


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
