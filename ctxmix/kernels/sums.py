"""Reductions of a row in a fixed order, on vectors of eight.

One running sum in order waits on each add; a sum reordered by the compiler (fastmath) would give floats
that differ by machine. ``dot8`` and ``sum8`` keep eight running partial sums, one per column modulo 8 (the
tail added to the first), then add them pairwise: a fixed order, so every machine computes the same floats.
A maximum is exact in any order, but one running maximum waits on each comparison (some 4 cycles a value);
``max8`` and ``absmax8`` keep eight and return the value one running maximum would.

LLVM does not turn eight scalar partial sums into one vector (its SLP vectorizer leaves the loop-carried
sums scalar: numba 0.68, LLVM 22), so for a C-contiguous 1-D row these functions build the loop themselves
(``_reduce8``): the eight partials are the eight lanes of one LLVM vector, each lane's operations those of
the scalar partial it stands for (IEEE, no fast-math), so the floats are the scalar form's, bit for bit
(tests/test_sums.py). Other layouts run the scalar form. About twice as fast on a row of 1,024 float32s.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

LANES = 8
_INDEX = ir.IntType(32)


# ---- the scalar forms (any layout), and the arithmetic the vector forms repeat lane by lane -------------


def _dot8_scalar(x, y, zero):
    n = x.shape[0]
    p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = zero
    full = n - n % 8
    for i in range(0, full, 8):
        p0 += x[i] * y[i]
        p1 += x[i + 1] * y[i + 1]
        p2 += x[i + 2] * y[i + 2]
        p3 += x[i + 3] * y[i + 3]
        p4 += x[i + 4] * y[i + 4]
        p5 += x[i + 5] * y[i + 5]
        p6 += x[i + 6] * y[i + 6]
        p7 += x[i + 7] * y[i + 7]
    for i in range(full, n):
        p0 += x[i] * y[i]
    return ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))


def _sum8_scalar(x, zero):
    n = x.shape[0]
    p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = zero
    full = n - n % 8
    for i in range(0, full, 8):
        p0, p1, p2, p3 = p0 + x[i], p1 + x[i + 1], p2 + x[i + 2], p3 + x[i + 3]
        p4, p5, p6, p7 = p4 + x[i + 4], p5 + x[i + 5], p6 + x[i + 6], p7 + x[i + 7]
    for i in range(full, n):
        p0 += x[i]
    return ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))


def _max8_scalar(row):  # (at least 8 values: ``max8`` takes shorter rows to row.max())
    n = row.shape[0]
    m0, m1, m2, m3, m4, m5, m6, m7 = row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7]
    full = n - n % 8
    for i in range(8, full, 8):
        m0, m1, m2, m3 = max(m0, row[i]), max(m1, row[i + 1]), max(m2, row[i + 2]), max(m3, row[i + 3])
        m4, m5, m6, m7 = max(m4, row[i + 4]), max(m5, row[i + 5]), max(m6, row[i + 6]), max(m7, row[i + 7])
    top = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for i in range(full, n):
        top = max(top, row[i])
    return top


def _absmax8_scalar(row, zero):
    n = row.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = zero
    full = n - n % 8
    for i in range(0, full, 8):
        m0, m1 = max(m0, abs(row[i])), max(m1, abs(row[i + 1]))
        m2, m3 = max(m2, abs(row[i + 2])), max(m3, abs(row[i + 3]))
        m4, m5 = max(m4, abs(row[i + 4])), max(m5, abs(row[i + 5]))
        m6, m7 = max(m6, abs(row[i + 6])), max(m7, abs(row[i + 7]))
    top = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for i in range(full, n):
        top = max(top, abs(row[i]))
    return top


# ---- the vector forms ----------------------------------------------------------------------------------


def _vector_rows(*arrays) -> bool:
    """True for C-contiguous 1-D float arrays of one dtype (what ``_reduce8`` loads as vectors)."""
    first = arrays[0]
    return all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and isinstance(a.dtype, types.Float)
               and a.dtype == first.dtype for a in arrays)


def _vector_sums(zero, *arrays) -> bool:
    """``_vector_rows``, summed in ``zero``'s float type, as wide as the rows' or wider (the vector sums widen
    each term; a narrower sum takes the scalar form)."""
    return _vector_rows(*arrays) and isinstance(zero, types.Float) and zero.bitwidth >= arrays[0].dtype.bitwidth


def _reduce8(context, builder, array_types, arrays, start, skip, step, combine):
    """The loop of the scalar forms above on a vector of eight lanes: lane k starts at ``start``'s lane k and
    takes ``step(acc, values)`` for the elements k, k + 8, ... from ``skip`` up to the last multiple of 8 (the
    values: one vector of each array's eight elements); the tail steps lane 0, one element at a time; then
    the lanes combine pairwise, ((0, 1), (2, 3)), ((4, 5), (6, 7)). ``step`` and ``combine`` build the same
    operations on vectors and on scalars."""
    rows = [context.make_array(t)(context, builder, a) for t, a in zip(array_types, arrays)]
    n = cgutils.unpack_tuple(builder, rows[0].shape)[0]
    intp = n.type
    full = builder.sub(n, builder.srem(n, ir.Constant(intp, LANES)))
    element = context.get_value_type(array_types[0].dtype)
    align = context.get_abi_sizeof(element)  # rows need not be aligned to a vector
    vector = ir.VectorType(element, LANES).as_pointer()
    acc = cgutils.alloca_once_value(builder, start)
    with cgutils.for_range_slice(builder, ir.Constant(intp, skip), full, ir.Constant(intp, LANES), intp=intp) as (i, _):
        values = [builder.load(builder.bitcast(builder.gep(r.data, [i]), vector), align=align) for r in rows]
        builder.store(step(builder, builder.load(acc), values), acc)
    lanes = builder.load(acc)
    parts = [builder.extract_element(lanes, ir.Constant(_INDEX, k)) for k in range(LANES)]
    first = cgutils.alloca_once_value(builder, parts[0])
    with cgutils.for_range_slice(builder, full, n, ir.Constant(intp, 1), intp=intp) as (i, _):
        values = [builder.load(builder.gep(r.data, [i])) for r in rows]
        builder.store(step(builder, builder.load(first), values), first)
    parts[0] = builder.load(first)
    pairs = [combine(builder, parts[k], parts[k + 1]) for k in range(0, LANES, 2)]
    return combine(builder, combine(builder, pairs[0], pairs[1]), combine(builder, pairs[2], pairs[3]))


def _splat(builder, value):
    """A vector of eight ``value``s."""
    out = ir.Constant(ir.VectorType(value.type, LANES), ir.Undefined)
    for k in range(LANES):
        out = builder.insert_element(out, value, ir.Constant(_INDEX, k))
    return out


def _widen(builder, value, scalar):
    """``value`` (a vector or scalar) as the accumulators' type ``scalar`` (an LLVM float type)."""
    if value.type == scalar or getattr(value.type, "element", None) == scalar:
        return value
    target = ir.VectorType(scalar, LANES) if isinstance(value.type, ir.VectorType) else scalar
    return builder.fpext(value, target)


def _max(builder, acc, value):
    """Python's (and numba's) max(acc, value) of floats: value where value > acc, else acc."""
    return builder.select(builder.fcmp_ordered(">", value, acc), value, acc)


def _fabs(builder, value):
    """|value| (LLVM's fabs, as numba's abs of a float), of a vector or a scalar."""
    kind = value.type
    scalar = kind.element if isinstance(kind, ir.VectorType) else kind
    suffix = ("f32" if isinstance(scalar, ir.FloatType) else "f64")
    if isinstance(kind, ir.VectorType):
        suffix = f"v{kind.count}{suffix}"
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(kind, [kind]), f"llvm.fabs.{suffix}")
    return builder.call(function, [value])


@intrinsic
def _vector_dot8(typingctx, x, y, zero):
    if not _vector_sums(zero, x, y):
        return None

    def codegen(context, builder, signature, args):
        scalar = context.get_value_type(signature.args[2])
        return _reduce8(context, builder, signature.args[:2], args[:2], _splat(builder, args[2]), 0,
                        lambda b, acc, v: b.fadd(acc, _widen(b, b.fmul(v[0], v[1]), scalar)),
                        lambda b, p, q: b.fadd(p, q))

    return zero(x, y, zero), codegen


@intrinsic
def _vector_sum8(typingctx, x, zero):
    if not _vector_sums(zero, x):
        return None

    def codegen(context, builder, signature, args):
        scalar = context.get_value_type(signature.args[1])
        return _reduce8(context, builder, signature.args[:1], args[:1], _splat(builder, args[1]), 0,
                        lambda b, acc, v: b.fadd(acc, _widen(b, v[0], scalar)), lambda b, p, q: b.fadd(p, q))

    return zero(x, zero), codegen


@intrinsic
def _vector_max8(typingctx, row):
    if not _vector_rows(row):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        element = context.get_value_type(signature.args[0].dtype)
        first = builder.load(builder.bitcast(data, ir.VectorType(element, LANES).as_pointer()),
                             align=context.get_abi_sizeof(element))
        return _reduce8(context, builder, signature.args, args, first, LANES,
                        lambda b, acc, v: _max(b, acc, v[0]), _max)

    return row.dtype(row), codegen


@intrinsic
def _vector_absmax8(typingctx, row, zero):
    if not (_vector_rows(row) and zero == row.dtype):
        return None

    def codegen(context, builder, signature, args):
        return _reduce8(context, builder, signature.args[:1], args[:1], _splat(builder, args[1]), 0,
                        lambda b, acc, v: _max(b, acc, _fabs(b, v[0])), _max)

    return zero(row, zero), codegen


# ---- what kernels call (numba only) ----------------------------------------------------------------------


def _reduction(name: str, doc: str):
    """A function numba kernels call by ``name`` (its overload below picks the vector or the scalar form)."""

    def stub(*args):
        raise TypeError(f"{name} runs inside numba kernels only")

    stub.__name__ = stub.__qualname__ = name
    stub.__doc__ = doc
    return stub


dot8 = _reduction("dot8", """sum_i x[i] y[i] in eight partial sums added pairwise; ``zero`` (0 of the sums'
type: float64, or float32 to sum in float32) starts them. Each product in the rows' type, then widened.""")
sum8 = _reduction("sum8", """sum_i x[i] in eight partial sums added pairwise (``dot8``'s order); ``zero``: 0 of
the sums' type.""")
_max8_long = _reduction("_max8_long", "max8 of a row of at least eight values.")
absmax8 = _reduction("absmax8", "max(zero, max_i |row[i]|) in 8 running maxima; ``zero``: 0 of the row's type.")


@overload(dot8, inline="always")
def _dot8_overload(x, y, zero):
    return (lambda x, y, zero: _vector_dot8(x, y, zero)) if _vector_sums(zero, x, y) else _dot8_scalar


@overload(sum8, inline="always")
def _sum8_overload(x, zero):
    return (lambda x, zero: _vector_sum8(x, zero)) if _vector_sums(zero, x) else _sum8_scalar


@overload(_max8_long, inline="always")
def _max8_overload(row):
    return (lambda row: _vector_max8(row)) if _vector_rows(row) else _max8_scalar


@overload(absmax8, inline="always")
def _absmax8_overload(row, zero):
    vector = _vector_rows(row) and zero == row.dtype
    return (lambda row, zero: _vector_absmax8(row, zero)) if vector else _absmax8_scalar


@njit(cache=True, nogil=True, inline="always")
def max8(row):
    """row.max() in 8 running maxima."""
    if row.shape[0] < 8:
        return row.max()
    return _max8_long(row)
