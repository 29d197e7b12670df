"""Cache prefetch hints for numba kernels (LLVM's ``llvm.prefetch``).

A hint only: it reads nothing, writes nothing, cannot fault (an address outside the array is allowed) and
changes no result. A kernel asks for the lines it will read a little later, so that their cache misses
overlap with the work in between instead of each stalling it.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _prefetch_call(builder, pointer) -> None:
    byte_pointer = ir.IntType(8).as_pointer()
    int32 = ir.IntType(32)
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32]), "llvm.prefetch.p0i8")
    # (address, 0 = read, 3 = keep in all cache levels, 1 = data cache)
    builder.call(function, [builder.bitcast(pointer, byte_pointer), ir.Constant(int32, 0), ir.Constant(int32, 3),
                            ir.Constant(int32, 1)])


@intrinsic
def prefetch(typingctx, array, index):
    """Ask the CPU to start loading ``array[index]`` (row ``index`` of a 2-D array) into the cache."""
    if not isinstance(array, types.Array) or array.ndim not in (1, 2) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array_value = context.make_array(array_type)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        position = context.cast(builder, args[1], signature.args[1], types.intp)
        pointer = cgutils.get_item_pointer2(
            context, builder, data=array_value.data, shape=cgutils.unpack_tuple(builder, array_value.shape),
            strides=cgutils.unpack_tuple(builder, array_value.strides), layout=array_type.layout,
            inds=[position] if array_type.ndim == 1 else [position, zero], wraparound=False, boundscheck=False)
        _prefetch_call(builder, pointer)
        return context.get_dummy_value()

    return types.none(array, index), codegen


@intrinsic
def prefetch_bytes(typingctx, array, offset):
    """Ask the CPU to start loading the cache line ``offset`` bytes past the start of ``array``'s data (any
    shape and layout: the line of a contiguous block's byte ``offset``)."""
    if not isinstance(array, types.Array) or not isinstance(offset, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        array_value = context.make_array(signature.args[0])(context, builder, args[0])
        position = context.cast(builder, args[1], signature.args[1], types.intp)
        byte_pointer = builder.bitcast(array_value.data, ir.IntType(8).as_pointer())
        _prefetch_call(builder, builder.gep(byte_pointer, [position]))
        return context.get_dummy_value()

    return types.none(array, offset), codegen
