"""Int8 matmuls on Intel AMX tiles, from numba: the lane step's linear layers without torch.

``torch._int_mm`` reaches the same tiles through oneDNN, but it packs its weight into the tiles' layout
again on every call, and each call goes through torch's dispatch and hands the GIL over twice. Here a weight
is packed once (``pack_weight``) and a call is one numba function: in the shipped model's step at 30 lanes,
9-12 us a layer against ``torch._int_mm``'s 18-28, and 31 us against 84 for the head's 60 rows
(docs/benchmarks.md, "AMX tiles from numba").

The sums are exact int32 sums of int8 products, as ``torch._int_mm``'s are, so both give the same integers
on every input (tests/test_amx.py): which one a machine runs changes no float and no file.

The tile instructions (``TDPBSSD``: C[16 x 16] int32 += A[16 x 64] int8 . B[16 x 64] int8 in the pairs-of-
four layout below) are LLVM intrinsics, reached as ``prefetch.py`` reaches ``llvm.prefetch``. A process
must ask Linux for the tiles' register state before it uses them (``arch_prctl``), and LLVM can only
compile the kernel where the CPU has them, so ``available()`` is checked before anything here is compiled
or run; elsewhere the integer step keeps ``torch._int_mm``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

ROWS = 16  # rows of a tile: of A (activations), of C (sums), and of the packed weight's B
DEPTH = 64  # int8 terms of one A row in a tile (64 bytes)
COLUMNS = 16  # int32 sums of one C row in a tile (64 bytes)
ROW_BYTES = 64

# Linux's arch_prctl: ask for the AMX tile data state (x86-64 syscall number, request, feature).
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18
DISABLE_ENV = "CTXMIX_AMX"  # "0": keep torch._int_mm even where the tiles are there (same sums)


@functools.cache
def available() -> bool:
    """True where this process may run the kernels: an x86-64 Linux CPU with AMX-INT8 (as LLVM sees the
    host, which is what numba compiles for), the tile state granted by the kernel, and ``CTXMIX_AMX`` not
    "0"."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        from llvmlite import binding

        features = binding.get_host_cpu_features()
    except (RuntimeError, OSError):
        return False
    if not (features.get("amx-tile") and features.get("amx-int8")):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def fits(depth: int, width: int) -> bool:
    """Whether a weight of ``width`` outputs and ``depth`` inputs tiles exactly (no padding needed)."""
    return depth > 0 and width > 0 and depth % DEPTH == 0 and width % COLUMNS == 0


def pack_weight(weight_t: np.ndarray) -> np.ndarray:
    """int8[K, N] (a weight, transposed: as ``torch._int_mm`` takes it) -> int8[N / 16, K / 4, 64], the layout
    TDPBSSD reads its B tiles in: ``packed[b, i, 4 * j + r] = weight_t[4 * i + r, 16 * b + j]`` (output
    column 16 * b + j, four consecutive inputs in a row). A column block's K / 4 rows follow each other, so a
    tile of 64 inputs is 16 rows of 64 bytes at a stride of 64."""
    depth, width = weight_t.shape
    if not fits(depth, width):
        raise ValueError(f"AMX tiles need a weight of K % {DEPTH} == 0 and N % {COLUMNS} == 0, got {weight_t.shape}")
    blocks = weight_t.reshape(depth // 4, 4, width // COLUMNS, COLUMNS).transpose(2, 0, 3, 1)
    return np.ascontiguousarray(blocks.reshape(width // COLUMNS, depth // 4, 4 * COLUMNS), dtype=np.int8)


# ----------------------------------------------------------------------------------------------------
# The intrinsics. A tile register is a constant of the instruction, so it is a literal argument.

_BYTE_POINTER = ir.IntType(8).as_pointer()
_I8, _I64 = ir.IntType(8), ir.IntType(64)


def _declare(builder, name: str, arguments: list):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), arguments), name)


def _byte_address(context, builder, array_type, array, offset):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(builder.bitcast(data, _BYTE_POINTER), [offset])


def _literal(value_type) -> int | None:
    return value_type.literal_value if isinstance(value_type, types.IntegerLiteral) else None


@intrinsic
def _tile_config_load(typingctx, config):
    def codegen(context, builder, signature, args):
        address = _byte_address(context, builder, signature.args[0], args[0], ir.Constant(_I64, 0))
        builder.call(_declare(builder, "llvm.x86.ldtilecfg", [_BYTE_POINTER]), [address])
        return context.get_dummy_value()

    return types.none(config), codegen


@intrinsic
def _tile_release(typingctx):
    def codegen(context, builder, signature, args):
        builder.call(_declare(builder, "llvm.x86.tilerelease", []), [])
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _tile_zero(typingctx, tile):
    number = _literal(tile)
    if number is None:
        return None

    def codegen(context, builder, signature, args):
        builder.call(_declare(builder, "llvm.x86.tilezero", [_I8]), [ir.Constant(_I8, number)])
        return context.get_dummy_value()

    return types.none(tile), codegen


def _tile_move(name: str):
    """``llvm.x86.tileloadd64`` or ``tilestored64``: tile <-> its configured rows of 64 bytes at ``offset``
    bytes into an array's data, rows ``stride`` bytes apart."""

    @intrinsic
    def move(typingctx, tile, array, offset, stride):
        number = _literal(tile)
        if number is None or not isinstance(array, types.Array):
            return None

        def codegen(context, builder, signature, args):
            offset_value = context.cast(builder, args[2], signature.args[2], types.int64)
            stride_value = context.cast(builder, args[3], signature.args[3], types.int64)
            address = _byte_address(context, builder, signature.args[1], args[1], offset_value)
            builder.call(_declare(builder, name, [_I8, _BYTE_POINTER, _I64]),
                         [ir.Constant(_I8, number), address, stride_value])
            return context.get_dummy_value()

        return types.none(tile, array, offset, stride), codegen

    return move


_tile_load = _tile_move("llvm.x86.tileloadd64")
_tile_store = _tile_move("llvm.x86.tilestored64")


@intrinsic
def _tile_dot(typingctx, sums, a, b):
    numbers = [_literal(t) for t in (sums, a, b)]
    if None in numbers:
        return None

    def codegen(context, builder, signature, args):
        builder.call(_declare(builder, "llvm.x86.tdpbssd", [_I8, _I8, _I8]), [ir.Constant(_I8, n) for n in numbers])
        return context.get_dummy_value()

    return types.none(sums, a, b), codegen


# ----------------------------------------------------------------------------------------------------
# The kernel. Tiles 0-3 hold sums, 4-5 activations, 6-7 the weight. The tiles' state is the thread's own, set
# up and released by each call, so either of the codec's threads may run it.


@njit(cache=True)
def _configure(config, rows):
    """LDTILECFG's 64 bytes for palette 1: every tile 64 bytes wide; the weight's tiles 16 rows, the sums'
    and the activations' ``rows`` (16, or the rows of a last, partial row block)."""
    config[:] = 0
    config[0] = 1
    for tile in range(8):
        config[16 + 2 * tile] = ROW_BYTES  # bytes a row, a little-endian uint16
        config[48 + tile] = ROWS if tile >= 6 else rows
    _tile_config_load(config)


@njit(cache=True)
def _tiles(a, a_offset, a_stride, two_rows, packed, block, two_blocks, sums, sums_offset, sums_stride):
    """Sums of one or two row blocks (``two_rows``; tiles of the configured rows, ``a_stride`` bytes apart
    in ``a`` from byte ``a_offset``) in column block ``block`` of the weight and the next (``two_blocks``),
    written at byte ``sums_offset`` of ``sums``. Every tile loaded serves two products where there are two."""
    quads = packed.shape[1]
    block_bytes = quads * ROW_BYTES  # one column block of the packed weight
    second_a = a_offset + ROWS * a_stride
    second_sums = sums_offset + ROWS * sums_stride
    _tile_zero(0)
    _tile_zero(1)
    _tile_zero(2)
    _tile_zero(3)
    for k in range(0, 4 * quads, DEPTH):
        weight_offset = block * block_bytes + k * 16  # (k / 4 rows of 64 bytes in)
        _tile_load(4, a, a_offset + k, a_stride)
        _tile_load(6, packed, weight_offset, ROW_BYTES)
        _tile_dot(0, 4, 6)
        if two_blocks:
            _tile_load(7, packed, weight_offset + block_bytes, ROW_BYTES)
            _tile_dot(1, 4, 7)
        if two_rows:
            _tile_load(5, a, second_a + k, a_stride)
            _tile_dot(2, 5, 6)
            if two_blocks:
                _tile_dot(3, 5, 7)
    _tile_store(0, sums, sums_offset + block * ROW_BYTES, sums_stride)
    if two_blocks:
        _tile_store(1, sums, sums_offset + (block + 1) * ROW_BYTES, sums_stride)
    if two_rows:
        _tile_store(2, sums, second_sums + block * ROW_BYTES, sums_stride)
        if two_blocks:
            _tile_store(3, sums, second_sums + (block + 1) * ROW_BYTES, sums_stride)


def int8_matmul(values: np.ndarray, packed: np.ndarray, sums: np.ndarray) -> None:
    """sums int32[M, N] (C order) = values int8[M, K] @ the weight ``packed`` (``pack_weight``), in exact int32
    sums. ``values``' rows may be any stride apart; its columns must be contiguous. Only where ``available()``:
    a tile instruction without the granted state stops the process (SIGILL)."""
    if not available():
        raise RuntimeError("AMX tiles are not available in this process")
    if values.strides[1] != 1 or not sums.flags.c_contiguous:
        raise ValueError("int8_matmul needs contiguous columns of values and C-ordered sums")
    if values.shape[1] != 4 * packed.shape[1] or sums.shape != (values.shape[0], packed.shape[0] * COLUMNS):
        raise ValueError(f"int8_matmul: shapes {values.shape} x packed {packed.shape} -> {sums.shape} do not match")
    _int8_matmul(values, packed, sums)


@njit(cache=True)  # (keeps the GIL: a few us a call; kernels/lane_step.py's docstring says why)
def _int8_matmul(values, packed, sums):
    """``int8_matmul`` after its checks: 32 rows by 32 columns at a time, column pairs outermost (a pair's
    weight, 8 kB at 256 inputs, stays in L1 while every row block reads it, so the weight comes from L2 once a
    call); then a last row block of fewer than 16 rows with tiles of that many rows, so no tile reads or
    writes past either array."""
    n_rows = values.shape[0]
    n_blocks = packed.shape[0]
    a_stride = values.strides[0]
    sums_stride = n_blocks * COLUMNS * 4
    full = n_rows - n_rows % ROWS
    config = np.empty(64, np.uint8)
    if full:
        _configure(config, ROWS)
        for block in range(0, n_blocks, 2):
            two_blocks = block + 1 < n_blocks
            for row in range(0, full, 2 * ROWS):
                _tiles(values, row * a_stride, a_stride, row + ROWS < full, packed, block, two_blocks, sums,
                       row * sums_stride, sums_stride)
    if full < n_rows:
        _configure(config, n_rows - full)
        for block in range(0, n_blocks, 2):
            _tiles(values, full * a_stride, a_stride, False, packed, block, block + 1 < n_blocks, sums,
                   full * sums_stride, sums_stride)
    _tile_release()
