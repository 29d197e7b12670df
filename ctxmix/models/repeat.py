"""The baseline GPT with its blocks run several times and a per-layer "repeat adapter".

This is the recipe of the montysteele artifact (github MontySteele/parameter-golf-attempt,
``train_gpt_6bit.py``, run ``6bit_6Lx2_ada``): ``num_layers`` unique blocks run ``num_repeats`` times
(effective layer i runs block ``i % num_layers``), after each effective layer
``x = x * repeat_scales[i] + repeat_shifts[i]``, and the U-Net skips span the effective depth
(``skip_weights`` has ``effective // 2`` rows). Its linear layers re-quantize their weights per row to 31
levels at every forward (6-bit QAT), so ``fake_quant_levels`` defaults to 31: the artifact's scores are
those of that forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import baseline
from .keys import check_keys, count_blocks, divide, shape_of

NAME = "repeat"


@dataclass(frozen=True)
class Config(baseline.Config):
    num_repeats: int = 2  # each unique block runs this many times
    fake_quant_levels: int = 31  # the 6-bit QAT forward of the only known artifact of this family


BOUNDS = {**baseline.BOUNDS, "num_repeats": (1, 64)}  # as baseline.BOUNDS
SHAPE_FIELDS = (*baseline.SHAPE_FIELDS, "num_repeats")


class Model(baseline.Model):
    def __init__(self, config: Config):
        super().__init__(config)
        effective = config.num_layers * config.num_repeats
        self.repeat_scales = nn.Parameter(torch.ones(effective, config.model_dim, dtype=torch.float32))
        self.repeat_shifts = nn.Parameter(torch.zeros(effective, config.model_dim, dtype=torch.float32))

    @staticmethod
    def layer_schedule(config: Config) -> list[int]:
        return [i % config.num_layers for i in range(config.num_layers * config.num_repeats)]

    def adapt(self, x: Tensor, layer: int) -> Tensor:
        scale = self.repeat_scales[layer].to(dtype=x.dtype)[None, None, :]
        shift = self.repeat_shifts[layer].to(dtype=x.dtype)[None, None, :]
        return x * scale + shift


def detect(state_dict: dict[str, Tensor]) -> bool:
    return "repeat_scales" in state_dict or "repeat_shifts" in state_dict


def infer_config(state_dict: dict[str, Tensor]) -> Config:
    num_layers = count_blocks(state_dict, NAME)
    effective, _ = shape_of(state_dict, "repeat_scales", 2, NAME)
    num_repeats = divide(effective, num_layers, f"repeat_scales rows over {num_layers} unique blocks", NAME)
    config = Config(**baseline.infer_shape(state_dict, NAME, num_layers), num_repeats=num_repeats)
    with torch.device("meta"):
        shapes = baseline.expected_shapes(Model(config))
    check_keys(state_dict, shapes, NAME)
    return config
