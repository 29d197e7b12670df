"""Fused multiply-add for numba kernels (LLVM's ``llvm.fma``): a * b + c with one rounding.

numba (without fast-math) rounds a product and a sum separately, and LLVM may not fuse them, since the
result would differ from machine to machine with the CPU's FMA unit. ``llvm.fma`` is the exact operation
IEEE 754 defines: one rounding of the exact a * b + c. LLVM emits the CPU's FMA instruction where there is
one (x86-64 since Haswell, ARMv8) and a correctly rounded library call where there is none, so every machine
gives the same float, in one instruction instead of two where it can.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def fma32(typingctx, a, b, c):
    """a * b + c for float32 a, b, c, rounded once."""
    if not all(isinstance(x, types.Float) and x.bitwidth == 32 for x in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        single = ir.FloatType()
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(single, [single] * 3), "llvm.fma.f32")
        return builder.call(function, args)

    return types.float32(a, b, c), codegen
