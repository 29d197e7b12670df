"""Bits and bits per byte: computed here and nowhere else."""

from __future__ import annotations

import math

import numpy as np

LN2 = math.log(2.0)


def bits_from_logp(logp: np.ndarray) -> np.ndarray:
    """float64[...] natural-log probabilities -> float64[...] code lengths in bits."""
    return -np.asarray(logp, dtype=np.float64) / LN2


def bits_per_byte(bits: float, nbytes: int) -> float:
    return float(bits) / nbytes if nbytes > 0 else float("nan")
