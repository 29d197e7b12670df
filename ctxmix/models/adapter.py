"""Your own model class: an adapter module turns an artifact's weights into a torch module ctxmix scores.

Parameter Golf records each ship their own model class in their own ``train_gpt.py``; ctxmix cannot know
them all. An adapter is a Python module the user names (``neural:model=A.ptz,module=my_adapter.py``), or
that an installed package registers in the entry-point group ``ctxmix.models``. It defines

    def load(state_dict: dict[str, torch.Tensor], meta: dict) -> torch.nn.Module

returning a module whose ``forward(idx)`` maps int64 tokens (B, T) to logits (B, T, V), causally. It may set
``train_seq_len`` (the scoring window; else the artifact's metadata says it, else 1024). ctxmix does the
rest: it reads the artifact as data (``torch.load(weights_only=True)``, dequantized, sizes checked), and
runs the sliding windows, batching, float64 log-softmax, devices, torchrun, the checks and the codec
around the module. The module's code is the user's to run: naming it on the command line runs it, as
``python my_adapter.py`` would. ``docs/models.md`` has a complete adapter.

A module is named by a path ending in ``.py``, by an entry point's name, or by an importable module name.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import CtxmixError
from ..spec import check_number
from .artifact import read_artifact

ENTRY_POINTS = "ctxmix.models"
DEFAULT_WINDOW = 1024  # the challenge's training length, when neither the module nor the metadata says
MAX_WINDOW = 1 << 20


@dataclass(frozen=True)
class AdapterConfig:
    """What the neural expert needs to know of a module's model (the rest is the module's business)."""

    vocab_size: int
    train_seq_len: int


def find_loader(name: str) -> Callable:
    """The ``load`` function of the adapter ``name`` (a ``.py`` path, an entry point, or a module)."""
    where = f"model adapter {name!r}"
    try:
        if name.endswith(".py"):
            if not os.path.isfile(name):
                raise CtxmixError(f"{where}: no such file")
            # one module per file content: the same file always gives the same module object
            digest = hashlib.sha256(open(name, "rb").read()).hexdigest()[:16]
            spec = importlib.util.spec_from_file_location(f"ctxmix_adapter_{digest}", name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            from importlib.metadata import entry_points

            points = [p for p in entry_points(group=ENTRY_POINTS) if p.name == name]
            module = points[0].load() if points else importlib.import_module(name)
    except CtxmixError:
        raise
    except Exception as exc:  # the user's module failed to import: one line, the reason kept
        raise CtxmixError(f"{where}: cannot load it ({type(exc).__name__}: {exc})") from None
    load = getattr(module, "load", module if callable(module) else None)
    if not callable(load):
        raise CtxmixError(f"{where}: defines no load(state_dict, meta) function")
    return load


def load_adapted(path: str | os.PathLike, module_name: str):
    """``models.LoadedModel`` of the artifact ``path`` built by the adapter ``module_name``."""
    from . import LoadedModel

    artifact = read_artifact(path)
    where = f"artifact {artifact.path} with model adapter {module_name!r}"
    load = find_loader(module_name)
    try:
        model = load(dict(artifact.state_dict), dict(artifact.meta))
    except CtxmixError as exc:
        raise CtxmixError(f"{where}: {exc}") from None
    except Exception as exc:  # the user's code: its failure is reported, not hidden
        raise CtxmixError(f"{where}: load() raised {type(exc).__name__}: {' '.join(str(exc).split())}") from None
    if not isinstance(model, nn.Module):
        raise CtxmixError(f"{where}: load() returned {type(model).__name__}, expected a torch.nn.Module")
    model.float().eval()
    model.requires_grad_(False)
    window = getattr(model, "train_seq_len", artifact.meta.get("train_seq_len", DEFAULT_WINDOW))
    check_number("train_seq_len", window, where, 1, MAX_WINDOW)
    return LoadedModel(f"adapter {module_name}", AdapterConfig(_vocab_size(model, where), int(window)), model,
                       artifact)


def _vocab_size(model: nn.Module, where: str) -> int:
    """V from one forward of two tokens, which also checks the module's output shape."""
    with torch.inference_mode():
        try:
            logits = model(torch.zeros((1, 2), dtype=torch.int64))
        except Exception as exc:
            raise CtxmixError(f"{where}: forward on int64 (1, 2) raised {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())}") from None
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or logits.shape[:2] != (1, 2):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CtxmixError(f"{where}: forward on int64 (1, 2) returned {shape}, expected logits (1, 2, V)")
    vocab = int(logits.shape[-1])
    check_number("vocab_size", vocab, where, 1, 1 << 20)
    return vocab
