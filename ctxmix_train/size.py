"""Artifact size of a recipe without training: quantize and compress a model of its exact shape.

Two weight choices, since a size check cannot know the trained weights:

- ``gaussian``: every matrix ~ N(0, 1). Per-row int6/int8 of Gaussian rows uses close to all the levels,
  so it is close to the worst case for the compressor.
- ``laplace``: every matrix ~ Laplace(0, 1): heavier tails, closer to trained weights, which leave more
  of the levels unused and compress better still (the March records' trained 11-layer artifacts of this
  shape measured 15.9-16.0 MB; see docs/training.md).
- ``init``: the recipe's own initialization (zero branch projections, zero bigram table, ...): a lower
  bound that says little about a trained model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import export
from .config import TrainConfig
from .model import artifact_meta, build_model, count_params

WEIGHT_CHOICES = ("gaussian", "laplace", "init")


@dataclass(frozen=True)
class SizeReport:
    params: int
    raw_bytes: int  # torch.save payload before compression
    artifact_bytes: int  # what export would write (after the fit-to-cap step, when it ran)
    cap_bytes: int
    weights: str
    fit: export.FitReport | None = None  # the fit-to-cap step, when the artifact was over the cap (or forced)

    @property
    def fits(self) -> bool:
        return self.cap_bytes == 0 or self.artifact_bytes <= self.cap_bytes


@torch.no_grad()
def randomize(model: nn.Module, seed: int, kind: str = "gaussian") -> None:
    """Every matrix ~ N(0, 1) or Laplace(0, 1). Per-row quantization divides out each row's scale, so only
    the shape of the distribution matters for the compressed size, not its width."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.ndim == 2:
            if kind == "laplace":
                # Inverse CDF of Laplace(0, 1); u = -0.5 (rand() == 0) would give an infinite weight.
                u = (torch.rand(p.shape, generator=gen) - 0.5).clamp(-0.5 + 1e-7, 0.5 - 1e-7)
                p.copy_(-torch.sign(u) * torch.log1p(-2 * u.abs()))
            else:
                p.copy_(torch.randn(p.shape, generator=gen))


def size_check(cfg: TrainConfig, weights: str = "gaussian") -> SizeReport:
    """Quantize + compress a ``cfg``-shaped model (CPU) and measure the artifact; nothing is written.

    With ``cfg.fit_to_cap`` on, this runs the same fit-to-cap search as a training run's export, so
    ``fit`` says how much pruning (or step widening) these weights would need, or that even the most
    allowed does not fit (``fits`` false).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # as a run does: on shared cores one thread can be far faster
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, "cpu")
    if weights != "init":
        randomize(model, cfg.seed, weights)
    packed = export.pack(model, cfg, artifact_meta(cfg), refuse=False)
    raw = len(_raw_payload(packed))
    return SizeReport(count_params(model), raw, packed.nbytes, cfg.size_cap_bytes, weights, packed.fit)


def _raw_payload(packed: export.PackedArtifact) -> bytes:
    from ctxmix.models import artifact

    return artifact.decompress(packed.data, artifact.detect_compression(packed.data))
