"""Reading and writing ``.ptz`` artifacts: compressed ``torch.save`` of a quantized state dict.

An artifact is untrusted input. It is decompressed with a size cap, unpickled only by
``torch.load(weights_only=True)`` (which refuses any pickle that names a callable, so loading can never run
code), every tensor in it checked to be an ordinary one (on the CPU, dense, a plain number dtype, no
bigger than the data it was read from), dequantized by ``quant.dequantize`` and checked for non-finite
values. Every failure is one ``CtxmixError`` line naming the file.

Damage must show: a torch zip payload carries a CRC-32 per member (checked here; torch does not), zlib
and xz streams and zstd frames with their checksum flag carry their own. A legacy (non-zip) torch payload
has none, so it is only read inside a compression that checks it; uncompressed, in lzma "alone" or in a
zstd frame without a checksum it is refused, since a flipped byte in its weights would load silently.

Compression is told by the first bytes, not the file name: zlib (``0x78`` with a valid header check),
zstd (``28 b5 2f fd``), xz (``fd 37 7a 58 5a 00``), legacy lzma ("alone", ``5d 00 00``), or none (a torch
zip ``PK\\x03\\x04``).

ctxmix_train writes hyperparameters that the weights cannot show (training length, RoPE base, soft cap)
as a plain dict under ``META_KEY`` beside the quantized tensors; other writers' artifacts lack it.
"""

from __future__ import annotations

import io
import lzma
import os
import pickle
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import write_bytes_atomic
from ..errors import CtxmixError
from . import quant

ARTIFACT_CAP_BYTES = 16_000_000  # Parameter Golf's limit on artifact + code bytes (decimal MB)
MAX_RAW_BYTES = 1 << 30  # refuse to inflate an artifact beyond 1 GiB (decompression bombs)
META_KEY = "__ctxmix_meta__"  # plain dict of hyperparameters written by ctxmix_train
COMPRESSIONS = ("zlib", "zstd", "xz", "lzma", "none")

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
LZMA_ALONE_MAGIC = b"\x5d\x00\x00"  # properties byte of lzma's default lc=3,lp=0,pb=2, then dict size
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) container
PICKLE_MAGIC = b"\x80"  # torch.save's legacy container starts with a pickle protocol opcode
ZSTD_CHECKSUM_FLAG = 0x04  # bit 2 of a zstd frame header descriptor (the byte after the magic)
XZ_CHECK_NONE = 0  # the low nibble of an xz stream's second flag byte: which check the blocks carry
# Tensors an artifact may hold: the formats above store int8 values, float scales and float or integer
# passthrough tensors; anything else (complex, quantized, sparse, on another device) is not a weight.
TENSOR_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16,
                           torch.int32, torch.int64, torch.uint8, torch.bool})


@dataclass
class Artifact:
    """A loaded artifact: dequantized tensors plus what the file said about itself."""

    path: str
    compression: str  # one of COMPRESSIONS
    compressed_bytes: int  # file size
    raw_bytes: int  # size of the torch.save payload after decompression
    format: str  # quant.INT8_FORMAT, quant.INT6_MIXED_FORMAT or quant.FLOAT_FORMAT
    value_bits: int | None  # bits the stored integers use (8, or 6 when all lie in -31..31)
    state_dict: dict[str, Tensor]
    meta: dict[str, object] = field(default_factory=dict)  # META_KEY contents ({} when absent)


def detect_compression(data: bytes) -> str:
    """Compression of an artifact's bytes, from its magic bytes."""
    if data.startswith(ZSTD_MAGIC):
        return "zstd"
    if data.startswith(XZ_MAGIC):
        return "xz"
    if data.startswith(ZIP_MAGIC) or data.startswith(PICKLE_MAGIC):
        return "none"
    if len(data) >= 2 and data[0] & 0x0F == 8 and data[0] >> 4 <= 7 and (data[0] << 8 | data[1]) % 31 == 0:
        return "zlib"  # RFC 1950: deflate method 8 and a header checksum divisible by 31
    if data.startswith(LZMA_ALONE_MAGIC):
        return "lzma"
    raise CtxmixError(f"unknown compression: first bytes {data[:6].hex(' ')} (expected zlib, zstd, xz/lzma or a torch zip)")


def decompress(data: bytes, compression: str) -> bytes:
    """Inflate ``data``; a truncated or corrupt stream, trailing bytes or an oversized payload raise."""
    try:
        if compression == "none":
            return data
        if compression == "zlib":
            d = zlib.decompressobj()
            raw = d.decompress(data, MAX_RAW_BYTES + 1)
            ended = d.eof
            trailing = d.unused_data
        elif compression == "zstd":
            import zstandard

            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_RAW_BYTES + 1)
            ended, trailing = True, b""
        elif compression in ("xz", "lzma"):
            d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ if compression == "xz" else lzma.FORMAT_ALONE)
            raw = d.decompress(data, MAX_RAW_BYTES + 1)
            ended = d.eof
            trailing = d.unused_data
        else:
            raise CtxmixError(f"unknown compression {compression!r} (expected one of {', '.join(COMPRESSIONS)})")
    except CtxmixError:
        raise
    except Exception as exc:  # zlib.error, lzma.LZMAError, zstandard.ZstdError: corrupt stream
        raise CtxmixError(f"corrupt {compression} stream: {_first_line(exc)}") from None
    if len(raw) > MAX_RAW_BYTES:
        raise CtxmixError(f"{compression} payload inflates beyond {MAX_RAW_BYTES} bytes")
    if not ended:
        raise CtxmixError(f"truncated {compression} stream: it ends before its end marker")
    if trailing:
        raise CtxmixError(f"{len(trailing)} unexpected bytes after the {compression} stream")
    return raw


def compress(raw: bytes, compression: str, level: int | None = None) -> bytes:
    """Inverse of ``decompress``: zlib level 9, zstd 22 and xz preset 9 unless ``level`` says otherwise."""
    if compression == "none":
        return raw
    if compression == "zlib":
        return zlib.compress(raw, 9 if level is None else level)
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=22 if level is None else level, write_checksum=True).compress(raw)
    if compression == "xz":
        return lzma.compress(raw, preset=9 if level is None else level)
    if compression == "lzma":
        return lzma.compress(raw, format=lzma.FORMAT_ALONE, preset=9 if level is None else level)
    raise CtxmixError(f"unknown compression {compression!r} (expected one of {', '.join(COMPRESSIONS)})")


def _first_line(exc: BaseException) -> str:
    """The informative line of a third-party message (torch's weights_only refusal is several lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line
    return lines[0] if lines else type(exc).__name__


def check_zip_crc(raw: bytes) -> None:
    """Verify every member's CRC-32 of a torch zip payload.

    torch's zip reader does not check them, so without this a flipped bit inside a tensor of an
    uncompressed (or checksum-less zstd) artifact would load as silently different weights.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            # torch stores its members uncompressed: a member that inflates could outgrow the payload.
            packed = [info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED]
            if packed:
                raise CtxmixError(f"damaged torch zip payload: member {packed[0]!r} is compressed (torch stores them)")
            bad = archive.testzip()
    except CtxmixError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile fails on damaged bytes with many types; one line here
        raise CtxmixError(f"damaged torch zip payload: {_first_line(exc)}") from None
    if bad is not None:
        raise CtxmixError(f"damaged torch zip payload: CRC-32 mismatch in member {bad!r}")


def has_checksum(data: bytes, compression: str) -> bool:
    """Does the compressed stream ``data`` carry a checksum of its content that decompressing verifies?"""
    if compression == "zlib":
        return True  # Adler-32 trailer
    if compression == "xz":
        return len(data) > 7 and data[7] & 0x0F != XZ_CHECK_NONE
    if compression == "zstd":
        return len(data) > 4 and bool(data[4] & ZSTD_CHECKSUM_FLAG)
    return False  # none, lzma "alone"


def unpickle(raw: bytes) -> object:
    """``torch.load(weights_only=True)`` of the payload: tensors, dicts, lists, strings and numbers only."""
    if raw.startswith(ZIP_MAGIC):
        check_zip_crc(raw)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: the refusal below says enough
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CtxmixError(f"refused to unpickle: {_first_line(exc)} (an artifact may hold only tensors and plain data; nothing was run)") from None
    except Exception as exc:  # RuntimeError from the zip reader, EOFError, ...: a damaged payload
        raise CtxmixError(f"cannot read the torch payload: {_first_line(exc)}") from None


def _check_meta(meta: object) -> dict[str, object]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise CtxmixError(f"{META_KEY} is a {type(meta).__name__}, expected a dict")
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, (bool, int, float, str)):
            raise CtxmixError(f"{META_KEY} entry {key!r} = {value!r}: expected a name and a number, bool or string")
    return dict(meta)


def check_tensors(obj: object, limit_bytes: int = MAX_RAW_BYTES) -> None:
    """Every tensor inside ``obj`` (dicts, lists and tuples walked without recursion) is a dense CPU tensor
    of a ``TENSOR_DTYPES`` dtype, and together they hold no more than ``limit_bytes``.

    A pickle can rebuild a view with stride 0 over one stored number and any shape: each tensor must be
    backed by as many stored bytes as it has, so nothing the payload declares can outgrow what it holds.
    """
    total = 0
    pending = [obj]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, Tensor):
            shape = tuple(item.shape)
            if item.device.type != "cpu" or item.layout != torch.strided or item.dtype not in TENSOR_DTYPES:
                raise CtxmixError(f"a tensor of shape {shape} is {str(item.dtype).removeprefix('torch.')} "
                                  f"({item.layout}, {item.device.type}); expected a dense CPU tensor of a real number type")
            nbytes = item.numel() * item.element_size()
            if nbytes > item.untyped_storage().nbytes():
                raise CtxmixError(f"a tensor of shape {shape} holds {nbytes:,} bytes over a storage of "
                                  f"{item.untyped_storage().nbytes():,} (a view that repeats its data)")
            total += nbytes
            if total > limit_bytes:
                raise CtxmixError(f"the tensors hold more than {limit_bytes:,} bytes")


def _check_finite(state_dict: dict[str, Tensor]) -> None:
    for name, tensor in state_dict.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise CtxmixError(f"state dict entry {name!r} is {type(tensor).__name__}, expected a named tensor")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CtxmixError(f"tensor {name!r} holds non-finite values (corrupt artifact?)")


def read_artifact(path: str | os.PathLike) -> Artifact:
    """Load and dequantize ``path``; any problem is one CtxmixError line naming the file."""
    name = os.fspath(path)
    try:
        if Path(path).stat().st_size > MAX_RAW_BYTES:  # never read a file no artifact can be
            raise CtxmixError(f"artifact {name}: larger than {MAX_RAW_BYTES:,} bytes")
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CtxmixError(f"artifact {name}: no such file") from None
    except OSError as exc:
        raise CtxmixError(f"artifact {name}: cannot read ({exc.strerror})") from None
    return parse_artifact(data, name)


def parse_artifact(data: bytes, name: str) -> Artifact:
    """``read_artifact`` of bytes already in memory (``name`` for messages): what a writer checks before
    it writes, so that nothing ctxmix would refuse to load is ever written."""
    try:
        if not data:
            raise CtxmixError("empty file (0 bytes)")
        compression = detect_compression(data)
        raw = decompress(data, compression)
        if not raw.startswith(ZIP_MAGIC) and not has_checksum(data, compression):
            raise CtxmixError(f"a legacy (non-zip) torch payload in compression {compression} has no checksum, so "
                              "damage to it could not be detected; save it with torch.save's default zip format "
                              "or compress it with zlib or xz")
        obj = unpickle(raw)
        check_tensors(obj)
        try:
            state_dict, fmt = quant.dequantize(obj)
            bits = quant.value_bits(obj)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # torch refusing odd shapes or values
            raise CtxmixError(f"cannot dequantize: {_first_line(exc)}") from None
        # A recorded dtype may name any torch dtype; int8 values become float32, four times their bytes.
        check_tensors(state_dict, 4 * MAX_RAW_BYTES)
        meta = _check_meta(obj.get(META_KEY))
        if not state_dict:
            raise CtxmixError("the state dict is empty")
        _check_finite(state_dict)
    except CtxmixError as exc:
        raise CtxmixError(f"artifact {name}: {exc}") from None
    return Artifact(name, compression, len(data), len(raw), fmt, bits, state_dict, meta)


def pack_artifact(obj: dict, compression: str = "zlib", meta: dict | None = None, level: int | None = None) -> bytes:
    """``torch.save`` a quantized object (from ``quant.quantize_*``), with ``meta`` under META_KEY, and compress."""
    payload = dict(obj)
    if meta:
        payload[META_KEY] = _check_meta(meta)
    buf = io.BytesIO()
    torch.save(payload, buf)
    return compress(buf.getvalue(), compression, level)


def save_artifact(path: str | os.PathLike, obj: dict, compression: str = "zlib", meta: dict | None = None,
                  level: int | None = None) -> int:
    """Write ``pack_artifact(...)`` to ``path`` atomically; returns the file size in bytes."""
    data = pack_artifact(obj, compression, meta, level)
    write_bytes_atomic(path, data)
    return len(data)
