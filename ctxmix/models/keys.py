"""State-dict checks shared by the families' ``infer_config``: exact key sets and shapes, one-line errors."""

from __future__ import annotations

import re

from torch import Tensor

from ..errors import CtxmixError

BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def shape_of(state_dict: dict[str, Tensor], key: str, ndim: int, family: str) -> tuple[int, ...]:
    """Shape of a required tensor, which must have ``ndim`` dims."""
    tensor = state_dict.get(key)
    if tensor is None:
        raise CtxmixError(f"{family}: missing key {key!r}")
    if tensor.ndim != ndim:
        raise CtxmixError(f"{family}: {key} has shape {tuple(tensor.shape)}, expected {ndim} dims")
    return tuple(tensor.shape)


def count_blocks(state_dict: dict[str, Tensor], family: str) -> int:
    """Number of ``blocks.N.`` entries; the indices must run 0..N-1 without a gap."""
    indices = {int(m.group(1)) for key in state_dict if (m := BLOCK_KEY.match(key))}
    if not indices:
        raise CtxmixError(f"{family}: no blocks.N.* keys")
    for i in range(max(indices) + 1):
        if i not in indices:
            raise CtxmixError(f"{family}: blocks.{i}.* keys are missing (blocks 0..{max(indices)} expected)")
    return max(indices) + 1


def divide(numerator: int, denominator: int, what: str, family: str) -> int:
    if denominator <= 0 or numerator % denominator:
        raise CtxmixError(f"{family}: {what}: {numerator} is not a multiple of {denominator}")
    return numerator // denominator


def check_keys(state_dict: dict[str, Tensor], expected: dict[str, tuple[int, ...]], family: str) -> None:
    """``state_dict`` must hold exactly the keys of ``expected``, each with that shape."""
    for key in state_dict:
        if key not in expected:
            raise CtxmixError(f"{family}: unexpected key {key!r}")
    for key, shape in expected.items():
        tensor = state_dict.get(key)
        if tensor is None:
            raise CtxmixError(f"{family}: missing key {key!r}")
        if tuple(tensor.shape) != tuple(shape):
            raise CtxmixError(f"{family}: {key} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
