"""Int8 matmuls on AMX tiles (ctxmix/kernels/amx.py): the same integers as a plain int64 product and as
torch._int_mm at every edge of the tiles, and nothing written past the sums (tests/test_integer.py checks
the lane step's floats with the tiles and without them). The kernel's tests need a CPU with AMX-INT8 and
the tile state granted by Linux; elsewhere they are skipped, and the integer step runs torch._int_mm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctxmix.kernels import amx
from ctxmix.models.integer import IntegerWeights

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py
needs_tiles = pytest.mark.skipif(not amx.available(), reason="this CPU (or this kernel) gives no AMX-INT8 tiles")


def plain_product(values: np.ndarray, weight_t: np.ndarray) -> np.ndarray:
    return values.astype(np.int64) @ weight_t.astype(np.int64)


def test_the_packed_layout_is_the_one_the_tile_product_reads():
    gen = np.random.default_rng(0)
    weight_t = gen.integers(-128, 128, (128, 48)).astype(np.int8)
    packed = amx.pack_weight(weight_t)
    assert packed.shape == (3, 32, 64)
    for block in range(3):
        for quad in range(32):
            for column in range(16):
                for r in range(4):
                    assert packed[block, quad, 4 * column + r] == weight_t[4 * quad + r, 16 * block + column]


@pytest.mark.parametrize("shape", [(100, 64), (64, 40), (0, 16)])
def test_a_weight_off_the_tiles_is_not_packed(shape):
    assert not amx.fits(*shape)
    with pytest.raises(ValueError, match="AMX tiles need"):
        amx.pack_weight(np.zeros(shape, np.int8))


@needs_tiles
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 31, 32, 33, 47, 48, 86])
@pytest.mark.parametrize("depth, width", [(64, 16), (256, 48), (512, 256), (256, 1024)])
def test_tile_sums_are_the_exact_products_at_every_edge(rows, depth, width):
    """Row counts on and off the 16-row tiles and the 32-row pairs, odd and even column blocks, one and
    several 64-term depths; the activations a view with rows further apart than their length, as the lane
    step passes them; the full int8 range, and rows of the largest sums."""
    gen = np.random.default_rng(rows * depth + width)
    weight_t = gen.integers(-128, 128, (depth, width)).astype(np.int8)
    weight_t[:, 0] = 127
    weight_t[:, 1] = -128
    wide = gen.integers(-128, 128, (rows, depth + 64)).astype(np.int8)
    values = wide[:, :depth]
    values[0] = 127
    if rows > 1:
        values[-1] = -128
    sums = np.empty((rows, width), np.int32)
    amx.int8_matmul(values, amx.pack_weight(weight_t), sums)
    expected = plain_product(values, weight_t)
    assert np.array_equal(sums, expected)
    assert sums[0, 0] == 127 * 127 * depth
    assert rows == 1 or sums[-1, 1] == 128 * 128 * depth
    assert np.array_equal(sums, torch._int_mm(torch.from_numpy(values.copy()), torch.from_numpy(weight_t)).numpy())


@needs_tiles
@pytest.mark.parametrize("rows", [5, 16, 40])
def test_nothing_is_written_past_the_sums(rows):
    gen = np.random.default_rng(rows)
    weight_t = gen.integers(-127, 128, (128, 32)).astype(np.int8)
    values = gen.integers(-127, 128, (rows, 128)).astype(np.int8)
    room = np.full((rows + 16, 32), -7, np.int32)
    amx.int8_matmul(values, amx.pack_weight(weight_t), room[:rows])
    assert np.array_equal(room[:rows], plain_product(values, weight_t))
    assert (room[rows:] == -7).all()


@needs_tiles
def test_mismatched_shapes_are_refused():
    packed = amx.pack_weight(np.zeros((64, 16), np.int8))
    with pytest.raises(ValueError, match="do not match"):
        amx.int8_matmul(np.zeros((4, 128), np.int8), packed, np.empty((4, 16), np.int32))
    with pytest.raises(ValueError, match="contiguous"):
        amx.int8_matmul(np.zeros((64, 4), np.int8).T, packed, np.empty((4, 16), np.int32))


def test_the_switch_turns_the_tiles_off(monkeypatch):
    amx.available.cache_clear()
    try:
        monkeypatch.setenv(amx.DISABLE_ENV, "0")
        assert not amx.available()
        assert IntegerWeights(torch.ones(16, 64)).packed is None
    finally:
        monkeypatch.delenv(amx.DISABLE_ENV)
        amx.available.cache_clear()


@needs_tiles
def test_integer_weights_take_the_tiles_where_they_fit():
    gen = torch.Generator().manual_seed(1)
    tiled, untiled = IntegerWeights(torch.randn(48, 128, generator=gen)), IntegerWeights(torch.randn(48, 100, generator=gen))
    assert tiled.packed is not None and untiled.packed is None
    values = np.random.default_rng(2).integers(-127, 128, (21, 128)).astype(np.int8)
    assert np.array_equal(tiled.sums(values), plain_product(values, tiled.weight_t.numpy()))
