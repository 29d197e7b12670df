"""The artifact: quantize, compress, check the size cap, write atomically, and reload through ctxmix.

Quantization and packing are ctxmix's own (``ctxmix.models.quant``, ``ctxmix.models.artifact``): the
writer and the loader share one definition of each format, so the dequantized weights ctxmix loads are
exactly the ones ``dequantized_state_dict`` gives here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ctxmix.atomic import write_bytes_atomic
from ctxmix.errors import CtxmixError
from ctxmix.models import artifact as artifact_io
from ctxmix.models import quant

from .config import TrainConfig


@dataclass(frozen=True)
class PackedArtifact:
    data: bytes  # the compressed file contents
    quantized: dict  # the quantized object before torch.save (for dequantized_state_dict)
    meta: dict  # what was stored under __ctxmix_meta__

    @property
    def nbytes(self) -> int:
        return len(self.data)


def float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors on the CPU in float32 (what gets quantized)."""
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}


def save_float(path: str | os.PathLike, model: nn.Module) -> None:
    """The unquantized float32 state dict, ``torch.save``d atomically (for quantizing again later)."""
    import io

    buf = io.BytesIO()
    torch.save(float_state_dict(model), buf)
    write_bytes_atomic(path, buf.getvalue())


def quantize(state_dict: dict[str, torch.Tensor], fmt: str) -> dict:
    if fmt == "int8":
        return quant.quantize_state_dict_int8(state_dict)
    if fmt == "int6":
        return quant.quantize_state_dict_mixed_int6(state_dict)
    raise CtxmixError(f"unknown quantization {fmt!r}: expected int8 or int6")


def pack(model: nn.Module, cfg: TrainConfig, meta: dict) -> PackedArtifact:
    """Quantize ``model`` per ``cfg.quant`` and compress per ``cfg.compressor`` (nothing is written)."""
    obj = quantize(float_state_dict(model), cfg.quant)
    data = artifact_io.pack_artifact(obj, cfg.compressor, meta=meta, level=cfg.compress_level)
    return PackedArtifact(data, obj, meta)


def check_size(nbytes: int, cap_bytes: int, where: str) -> None:
    """Refuse an artifact over the cap (before anything is written)."""
    if cap_bytes and nbytes > cap_bytes:
        raise CtxmixError(f"artifact {where} would be {nbytes:,} bytes, over the size cap of {cap_bytes:,} bytes "
                          f"by {nbytes - cap_bytes:,}; nothing was written (shrink the model or raise size_cap_bytes)")


def check_writable(path: str | os.PathLike) -> None:
    """Fail before training, not after, when the artifact could not be written."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise CtxmixError(f"cannot write artifact {target}: it is a directory")
    if not directory.is_dir():
        raise CtxmixError(f"cannot write artifact {target}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CtxmixError(f"cannot write artifact {target}: directory {directory} is not writable")


def write(path: str | os.PathLike, packed: PackedArtifact, cap_bytes: int) -> int:
    """Check the cap, then write atomically; returns the bytes written."""
    check_size(packed.nbytes, cap_bytes, os.fspath(path))
    write_bytes_atomic(path, packed.data)
    return packed.nbytes


def dequantized_state_dict(packed: PackedArtifact) -> dict[str, torch.Tensor]:
    """The weights a loader gets back from ``packed`` (ctxmix's own dequantizer)."""
    state_dict, _ = quant.dequantize(packed.quantized)
    return state_dict


def load_dequantized(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load dequantized weights into ``model`` (float32 parameters), refusing missing or extra names."""
    own = model.state_dict()
    cast = {k: v.to(own[k].dtype) if k in own else v for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=True)
