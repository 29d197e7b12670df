"""Quantized state-dict formats of Parameter Golf artifacts: each dequantizer with its quantizer.

Two container formats are in use (facts read from openai/parameter-golf ``train_gpt.py`` and the
``records/`` submissions; the code here is ctxmix's own):

``int8_clean_per_row_v1`` (the baseline's export)
    ``{"__quant_format__": "int8_clean_per_row_v1", "quantized": {name: int8}, "scales": {name: fp16[rows]
    or fp32 scalar}, "dtypes": {name: "float32"|...}, "passthrough": {name: tensor}, "qmeta": {name:
    {"scheme": "per_row", "axis": 0}}, "passthrough_orig_dtypes": {name: dtype}}`` (the last two optional).
    Float matrices with more than 65,536 elements are quantized per row (clip at the 99.99984th percentile
    of |w| per row, scale = clip / levels, at least 1 / levels); smaller float tensors pass through
    (control tensors as fp32, others as fp16 with their original dtype recorded). ``levels`` is 127 in the
    baseline; some submissions (montysteele's 6-bit run) store 31-level values in the same container.

``{"w": ..., "m": ...}`` (the record stacks' ``mixed_quantize_int6``, named ``int6_mixed`` here)
    ``w`` maps ``name`` -> passthrough tensor, or ``name.q`` -> int8 values and ``name.scale`` -> fp16
    scale (one per row for matrices, a scalar otherwise); ``m`` maps each name to ``"passthrough"``,
    ``"passthrough_ctrl"``, ``"passthrough_fp16"`` or ``{"type": "int6"}`` (values in -31..31, per-row
    scale chosen by the smallest reconstruction error over a few clip percentiles) / ``{"type": "int8"}``
    (the baseline's 127-level per-row scheme).

Dequantized tensors come back in the dtype the writer recorded (``int8_clean``) or float32 (``int6_mixed``,
which does not record it); models load them into float32 parameters either way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import CtxmixError

INT8_FORMAT = "int8_clean_per_row_v1"
INT6_MIXED_FORMAT = "int6_mixed"
FLOAT_FORMAT = "float"  # a plain state dict of float tensors (unquantized checkpoint)

# Name fragments of the small "control" tensors every format keeps in fp32 (baseline's list).
CONTROL_PATTERNS = (
    "attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes", "q_gain",
    "skip_weight", "skip_weights",
)
KEEP_FLOAT_MAX_NUMEL = 65_536  # float tensors up to this size pass through unquantized
CLIP_QUANTILE = 0.9999984  # baseline: per-row clip at the 99.99984th percentile of |w|
INT8_LEVELS = 127  # values -127..127
INT6_LEVELS = 31  # values -31..31 (6 bits stored in an int8)
INT6_CLIP_QUANTILES = (0.9990, 0.9995, 0.9999, 0.99999, 1.0)  # record stacks' candidate clips (1.0 = row max)
INT6_CATEGORIES = ("mlp", "attn")  # record stacks quantize these to int6, the rest to int8
PASSTHROUGH_KINDS = ("passthrough", "passthrough_ctrl", "passthrough_fp16")


def _is_control(name: str) -> bool:
    return any(pattern in name for pattern in CONTROL_PATTERNS)


# ----------------------------------------------------------------------------------------------------
# Per-row quantizers


def quantize_per_row(t: Tensor, levels: int = INT8_LEVELS) -> tuple[Tensor, Tensor]:
    """The baseline's clipped per-row scheme: float[rows, cols] -> (int8 values, fp16[rows] scales).

    Tensors that are not matrices get one fp32 scalar scale. ``levels`` 127 = int8, 31 = 6-bit values.
    """
    t32 = t.detach().float()
    if t32.ndim == 2:
        if t32.numel():
            clip = torch.quantile(t32.abs(), CLIP_QUANTILE, dim=1)
        else:
            clip = torch.zeros(t32.shape[0])
        clipped = torch.maximum(torch.minimum(t32, clip[:, None]), -clip[:, None])
        scale = (clip / levels).clamp_min(1.0 / levels)
        q = torch.clamp(torch.round(clipped / scale[:, None]), -levels, levels).to(torch.int8).contiguous()
        return q, scale.to(torch.float16).contiguous()
    clip_value = float(torch.quantile(t32.abs().flatten(), CLIP_QUANTILE)) if t32.numel() else 0.0
    scale = torch.tensor(clip_value / levels if clip_value > 0 else 1.0, dtype=torch.float32)
    q = torch.clamp(torch.round(torch.clamp(t32, -clip_value, clip_value) / scale), -levels, levels)
    return q.to(torch.int8).contiguous(), scale


def quantize_int6_per_row(t: Tensor, levels: int = INT6_LEVELS) -> tuple[Tensor, Tensor]:
    """The record stacks' int6 scheme: per row, the clip (among ``INT6_CLIP_QUANTILES``) whose
    reconstruction has the smallest mean squared error; scales fp16. Non-matrices: one fp16 scalar."""
    t32 = t.detach().float()
    if t32.ndim == 2:
        best: tuple[Tensor, Tensor] | None = None
        best_err = float("inf")
        for quantile in INT6_CLIP_QUANTILES:
            clip = torch.quantile(t32.abs(), quantile, dim=1) if quantile < 1.0 else t32.abs().amax(dim=1)
            scale = (clip / levels).clamp_min(1.0 / levels).to(torch.float16)
            q = torch.clamp(torch.round(t32 / scale.float()[:, None]), -levels, levels).to(torch.int8)
            err = float((t32 - q.float() * scale.float()[:, None]).pow(2).mean())
            if err < best_err:
                best, best_err = (q.contiguous(), scale.contiguous()), err
        assert best is not None
        return best
    amax = float(t32.abs().max()) if t32.numel() else 0.0
    scale = torch.tensor(amax / levels if amax > 0 else 1.0, dtype=torch.float16)
    q = torch.clamp(torch.round(t32 / scale.float()), -levels, levels).to(torch.int8).contiguous()
    return q, scale


def dequantize_rows(q: Tensor, scale: Tensor, name: str) -> Tensor:
    """int8 values times their scale (one per row along dim 0, or one scalar) -> float32."""
    if q.dtype != torch.int8:
        raise CtxmixError(f"quantized tensor {name!r} has dtype {str(q.dtype).removeprefix('torch.')}, expected int8")
    if not scale.is_floating_point():
        raise CtxmixError(f"scale of {name!r} has dtype {str(scale.dtype).removeprefix('torch.')}, expected a float")
    if scale.ndim == 0 or scale.numel() == 1 and q.ndim == 0:
        return q.float() * float(scale.reshape(()).float())
    if scale.ndim != 1 or q.ndim == 0 or scale.shape[0] != q.shape[0]:
        raise CtxmixError(
            f"scale of {name!r} has shape {tuple(scale.shape)}, expected ({q.shape[0] if q.ndim else 1},) for values of shape {tuple(q.shape)}"
        )
    return q.float() * scale.float().view(q.shape[0], *([1] * (q.ndim - 1)))


# ----------------------------------------------------------------------------------------------------
# int8_clean_per_row_v1


def quantize_state_dict_int8(state_dict: dict[str, Tensor], levels: int = INT8_LEVELS) -> dict:
    """A float state dict -> the ``int8_clean_per_row_v1`` object (inverse of ``dequantize_state_dict_int8``)."""
    quantized: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    dtypes: dict[str, str] = {}
    passthrough: dict[str, Tensor] = {}
    orig_dtypes: dict[str, str] = {}
    qmeta: dict[str, dict] = {}
    for name, tensor in state_dict.items():
        t = tensor.detach().cpu().contiguous()
        if not t.is_floating_point():
            passthrough[name] = t
        elif t.numel() <= KEEP_FLOAT_MAX_NUMEL:
            if _is_control(name):
                passthrough[name] = t.float().contiguous()
            else:
                if t.dtype in (torch.float32, torch.bfloat16):
                    orig_dtypes[name] = str(t.dtype).removeprefix("torch.")
                passthrough[name] = t.to(torch.float16).contiguous()
        else:
            q, scale = quantize_per_row(t, levels)
            if scale.ndim > 0:
                qmeta[name] = {"scheme": "per_row", "axis": 0}
            quantized[name], scales[name] = q, scale
            dtypes[name] = str(t.dtype).removeprefix("torch.")
    obj: dict = {"__quant_format__": INT8_FORMAT, "quantized": quantized, "scales": scales, "dtypes": dtypes,
                 "passthrough": passthrough}
    if qmeta:
        obj["qmeta"] = qmeta
    if orig_dtypes:
        obj["passthrough_orig_dtypes"] = orig_dtypes
    return obj


def _dict_field(obj: dict, key: str, required: bool = True) -> dict:
    value = obj.get(key, None)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise CtxmixError(f"{INT8_FORMAT} object: field {key!r} is {type(value).__name__}, expected a dict")
    return value


def _torch_dtype(name: str, text: object) -> torch.dtype:
    dtype = getattr(torch, text, None) if isinstance(text, str) else None
    if not isinstance(dtype, torch.dtype):
        raise CtxmixError(f"tensor {name!r}: unknown dtype {text!r}")
    return dtype


def dequantize_state_dict_int8(obj: dict) -> dict[str, Tensor]:
    """The ``int8_clean_per_row_v1`` object -> state dict (tensors in their recorded dtypes)."""
    quantized = _dict_field(obj, "quantized")
    scales = _dict_field(obj, "scales")
    dtypes = _dict_field(obj, "dtypes")
    passthrough = _dict_field(obj, "passthrough")
    orig_dtypes = _dict_field(obj, "passthrough_orig_dtypes", required=False)
    out: dict[str, Tensor] = {}
    for name, q in quantized.items():
        if not isinstance(q, Tensor):
            raise CtxmixError(f"quantized entry {name!r} is {type(q).__name__}, expected a tensor")
        if name not in scales or not isinstance(scales[name], Tensor):
            raise CtxmixError(f"quantized tensor {name!r} has no scale tensor")
        if name not in dtypes:
            raise CtxmixError(f"quantized tensor {name!r} has no recorded dtype")
        out[name] = dequantize_rows(q, scales[name], name).to(_torch_dtype(name, dtypes[name])).contiguous()
    for name, t in passthrough.items():
        if not isinstance(t, Tensor):
            raise CtxmixError(f"passthrough entry {name!r} is {type(t).__name__}, expected a tensor")
        if name in out:
            raise CtxmixError(f"tensor {name!r} is both quantized and passed through")
        if name in orig_dtypes:
            t = t.to(_torch_dtype(name, orig_dtypes[name]))
        out[name] = t.contiguous()
    return out


# ----------------------------------------------------------------------------------------------------
# int6_mixed ({"w": ..., "m": ...})


def _category(name: str) -> str:
    """Record stacks' parameter classes: which matrices go to int6."""
    if "tok_emb" in name or "lm_head" in name:
        return "embed"
    if ".mlp." in name:
        return "mlp"
    if ".attn." in name:
        return "attn"
    return "other"


def quantize_state_dict_mixed_int6(state_dict: dict[str, Tensor], int6_categories=INT6_CATEGORIES) -> dict:
    """A float state dict -> ``{"w": ..., "m": ...}`` (inverse of ``dequantize_mixed_int6``)."""
    w: dict[str, Tensor] = {}
    m: dict[str, object] = {}
    for name, tensor in state_dict.items():
        t = tensor.detach().cpu().contiguous()
        if not t.is_floating_point() or t.numel() <= KEEP_FLOAT_MAX_NUMEL:
            w[name] = t.to(torch.float16) if t.is_floating_point() else t
            m[name] = "passthrough"
        elif _is_control(name):
            w[name] = t.float()
            m[name] = "passthrough_ctrl"
        elif _category(name) in int6_categories:
            w[name + ".q"], w[name + ".scale"] = quantize_int6_per_row(t)
            m[name] = {"type": "int6"}
        else:
            w[name + ".q"], w[name + ".scale"] = quantize_per_row(t, INT8_LEVELS)
            m[name] = {"type": "int8"}
    return {"w": w, "m": m}


def dequantize_mixed_int6(obj: dict) -> dict[str, Tensor]:
    """``{"w": ..., "m": ...}`` -> state dict (float tensors in float32)."""
    w, m = obj.get("w"), obj.get("m")
    if not isinstance(w, dict) or not isinstance(m, dict):
        raise CtxmixError(f"{INT6_MIXED_FORMAT} object: 'w' and 'm' must both be dicts")
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for name, kind in m.items():
        if kind in PASSTHROUGH_KINDS:
            t = w.get(name)
            if not isinstance(t, Tensor):
                raise CtxmixError(f"{INT6_MIXED_FORMAT}: passthrough tensor {name!r} is missing")
            out[name] = t.float() if t.is_floating_point() else t
            used.add(name)
            continue
        qtype = kind.get("type") if isinstance(kind, dict) else None
        if qtype not in ("int6", "int8"):
            raise CtxmixError(f"{INT6_MIXED_FORMAT}: tensor {name!r} has unsupported quantization {kind!r} (expected int6, int8 or passthrough)")
        q, scale = w.get(name + ".q"), w.get(name + ".scale")
        if not isinstance(q, Tensor) or not isinstance(scale, Tensor):
            raise CtxmixError(f"{INT6_MIXED_FORMAT}: tensor {name!r} lacks {name}.q or {name}.scale")
        levels = INT6_LEVELS if qtype == "int6" else INT8_LEVELS
        if q.dtype == torch.int8 and q.numel() and int(q.to(torch.int16).abs().max()) > levels:
            raise CtxmixError(f"{INT6_MIXED_FORMAT}: {qtype} tensor {name!r} holds values outside -{levels}..{levels}")
        out[name] = dequantize_rows(q, scale, name).contiguous()
        used.update((name + ".q", name + ".scale"))
    extra = sorted(set(w) - used)
    if extra:
        raise CtxmixError(f"{INT6_MIXED_FORMAT}: entry {extra[0]!r} of 'w' has no entry in 'm'")
    return out


# ----------------------------------------------------------------------------------------------------


def detect_format(obj: object) -> str:
    """Which container ``obj`` (the unpickled artifact) is; raises CtxmixError when none fits."""
    if not isinstance(obj, dict):
        raise CtxmixError(f"artifact holds a {type(obj).__name__}, expected a dict (quantized state dict)")
    if "__quant_format__" in obj:
        fmt = obj["__quant_format__"]
        if fmt != INT8_FORMAT:
            raise CtxmixError(f"unknown __quant_format__ {fmt!r} (supported: {INT8_FORMAT})")
        return INT8_FORMAT
    if "w" in obj and "m" in obj:
        return INT6_MIXED_FORMAT
    tensors = {k: v for k, v in obj.items() if not (isinstance(k, str) and k.startswith("__"))}
    if tensors and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in tensors.items()):
        return FLOAT_FORMAT
    keys = ", ".join(sorted(str(k) for k in obj)[:5])
    raise CtxmixError(f"unknown artifact layout: top-level keys {keys} (expected __quant_format__, w/m, or a tensor dict)")


def dequantize(obj: dict) -> tuple[dict[str, Tensor], str]:
    """Any supported container -> ``(state dict, format name)``."""
    fmt = detect_format(obj)
    if fmt == INT8_FORMAT:
        return dequantize_state_dict_int8(obj), fmt
    if fmt == INT6_MIXED_FORMAT:
        return dequantize_mixed_int6(obj), fmt
    return {k: v for k, v in obj.items() if not k.startswith("__")}, fmt


def value_bits(obj: dict) -> int | None:
    """Bits the stored integer values actually use (8, or 6 when every value lies in -31..31)."""
    fmt = detect_format(obj)
    if fmt == FLOAT_FORMAT:
        return None
    if fmt == INT8_FORMAT:
        tensors = [q for q in obj["quantized"].values() if isinstance(q, Tensor)]
    else:
        tensors = [t for k, t in obj["w"].items() if k.endswith(".q") and isinstance(t, Tensor)]
    peak = max((int(t.to(torch.int16).abs().max()) for t in tensors if t.numel()), default=0)
    return 6 if peak <= INT6_LEVELS else 8
