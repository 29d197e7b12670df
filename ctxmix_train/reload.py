"""Reading an artifact back exactly as ctxmix does (its loader, its families): the roundtrip check."""

from __future__ import annotations

import os

import torch
from torch import nn


def load_artifact_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """The model ``ctxmix`` builds from ``path`` (eval mode, float32), moved to ``device``."""
    from ctxmix.models import load_model

    return load_model(path).model.to(device)
