"""The artifact: quantize, compress, fit an int6 artifact to the size cap when asked (``fit_to_cap``),
check the cap, write atomically, and reload through ctxmix.

Quantization and packing are ctxmix's own (``ctxmix.models.quant``, ``ctxmix.models.artifact``): the
writer and the loader share one definition of each format, so the dequantized weights ctxmix loads are
exactly the ones ``dequantized_state_dict`` gives here.

Nothing ctxmix would refuse to load is written: weights that are not finite (a run that diverged) stop
the export before any file (``check_finite_weights``), and ``write`` reads the packed bytes back with
ctxmix's own reader before it writes them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctxmix.atomic import output_target, write_bytes_atomic
from ctxmix.errors import CtxmixError
from ctxmix.models import artifact as artifact_io
from ctxmix.models import quant

from .config import TrainConfig


@dataclass(frozen=True)
class FitReport:
    """What the fit-to-cap step did to an int6 artifact (also stored in its ``__ctxmix_meta__``)."""

    method: str  # "prune" or "coarsen"
    amount: float  # prune: fraction of all int6 values zeroed; coarsen: relative widening of every int6 step
    changed_values: int  # int6 values whose level differs from plain rounding
    int6_values: int  # int6 values in the artifact
    bytes_before: int  # the artifact without the step
    bytes_after: int  # the artifact written (or, when nothing fits, the one at the most allowed amount)
    compressions: int  # full compressions run by the search (the estimates in between are cheap)
    forced: bool  # amount came from fit_force, not from the search

    @property
    def changed_fraction(self) -> float:
        return self.changed_values / self.int6_values if self.int6_values else 0.0


@dataclass(frozen=True)
class PackedArtifact:
    data: bytes  # the compressed file contents
    quantized: dict  # the quantized object before torch.save (for dequantized_state_dict)
    meta: dict  # what was stored under __ctxmix_meta__
    fit: FitReport | None = None  # set when the fit-to-cap step changed the quantized values

    @property
    def nbytes(self) -> int:
        return len(self.data)


def check_finite_weights(model: nn.Module, step: int) -> None:
    """Refuse (one line, before anything is written) weights that hold NaN or infinity."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CtxmixError(f"training diverged: weight {name!r} holds non-finite values after step {step}; "
                              "nothing was written (lower the learning rates)")


def float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors on the CPU in float32 (what gets quantized)."""
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}


def save_float(path: str | os.PathLike, model: nn.Module) -> None:
    """The unquantized float32 state dict, ``torch.save``d atomically (for quantizing again later)."""
    import io

    buf = io.BytesIO()
    torch.save(float_state_dict(model), buf)
    write_bytes_atomic(path, buf.getvalue())


def quantize(state_dict: dict[str, torch.Tensor], fmt: str) -> dict:
    if fmt == "int8":
        return quant.quantize_state_dict_int8(state_dict)
    if fmt == "int6":
        return quant.quantize_state_dict_mixed_int6(state_dict)
    raise CtxmixError(f"unknown quantization {fmt!r}: expected int8 or int6")


def pack(model: nn.Module, cfg: TrainConfig, meta: dict, refuse: bool = True) -> PackedArtifact:
    """Quantize ``model`` per ``cfg.quant`` and compress per ``cfg.compressor`` (nothing is written).

    With ``cfg.fit_to_cap`` on and the artifact over ``cfg.size_cap_bytes``, the int6 values are changed
    as little as the search can find to fit (``fit_int6``). When even the most allowed does not fit this
    raises one line, unless ``refuse`` is false (``ctxmix-train size``): then the artifact at the most
    allowed amount comes back with its ``fit`` report, and ``write`` refuses it.
    """
    state = float_state_dict(model)
    obj = quantize(state, cfg.quant)
    data = artifact_io.pack_artifact(obj, cfg.compressor, meta=meta, level=cfg.compress_level)
    if cfg.fit_to_cap == "off":
        return PackedArtifact(data, obj, meta)
    over = cfg.size_cap_bytes > 0 and len(data) > cfg.size_cap_bytes
    if not over and cfg.fit_force == 0.0:
        return PackedArtifact(data, obj, meta)  # already fits: byte for byte what "off" writes
    return fit_int6(obj, state, cfg, meta, len(data), refuse)


def check_size(nbytes: int, cap_bytes: int, where: str) -> None:
    """Refuse an artifact over the cap (before anything is written)."""
    if cap_bytes and nbytes > cap_bytes:
        raise CtxmixError(f"artifact {where} would be {nbytes:,} bytes, over the size cap of {cap_bytes:,} bytes "
                          f"by {nbytes - cap_bytes:,}; nothing was written (shrink the model or raise size_cap_bytes)")


def check_writable(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Fail before training, not after, when the artifact could not be written: a directory, a device, one
    of the run's ``inputs`` (``ctxmix.atomic.output_target``), or a directory that is missing or read-only."""
    if Path(path).is_dir():
        raise CtxmixError(f"cannot write artifact {path}: it is a directory")
    target = output_target(path, inputs)  # the file a link points to: its directory is the one written
    directory = target.parent
    if not directory.is_dir():
        raise CtxmixError(f"cannot write artifact {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CtxmixError(f"cannot write artifact {path}: directory {directory} is not writable")


def write(path: str | os.PathLike, packed: PackedArtifact, cap_bytes: int) -> int:
    """Check the cap and that ctxmix can read the bytes back, then write atomically; returns the bytes written."""
    check_size(packed.nbytes, cap_bytes, os.fspath(path))
    try:
        artifact_io.parse_artifact(packed.data, os.fspath(path))
    except CtxmixError as exc:
        raise CtxmixError(f"{exc}; nothing was written") from None
    write_bytes_atomic(path, packed.data)
    return packed.nbytes


def dequantized_state_dict(packed: PackedArtifact) -> dict[str, torch.Tensor]:
    """The weights a loader gets back from ``packed`` (ctxmix's own dequantizer)."""
    state_dict, _ = quant.dequantize(packed.quantized)
    return state_dict


def load_dequantized(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load dequantized weights into ``model`` (float32 parameters), refusing missing or extra names."""
    own = model.state_dict()
    cast = {k: v.to(own[k].dtype) if k in own else v for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=True)


# ----------------------------------------------------------------------------------------------------
# Fit to the size cap (int6 only)
#
# A trained int6 artifact a little over the cap can be made to fit by changing the int6 values the least
# that saves enough bytes, instead of retraining a smaller model. Two ways, one amount x each:
#   prune    zero the x * (int6 values) cheapest +-1 values (the later Parameter Golf records' "selective
#            pruning"); cost of zeroing value q at scale s of weight w = w^2 - (w - q s)^2, the growth of
#            its squared reconstruction error, smallest first across every int6 matrix.
#   coarsen  widen every int6 step (row scale) by the factor 1 + x and round again: fewer levels in use.
# Both keep the artifact format: the loader sees ordinary int6 rows. The amount is searched with few full
# compressions (xz-9 of the full record model, 27 MB, takes 20-50 s on a CPU): between them, the order-0
# entropy of the int6 values, calibrated on the compressions done so far, predicts the next amount.

FIT_TARGET_MARGIN = 0.0005  # aim this fraction of the cap below it (16 MB: 8 KB) so a prediction that is a little off still fits
FIT_SLACK = 0.002  # a fitting artifact within this fraction of the cap (16 MB: 32 KB) ends the search
FIT_MAX_COMPRESSIONS = 6  # full compressions per search, the first (unfitted) one not counted
ESTIMATE_BISECTIONS = 16  # bisection steps on the cheap estimate per prediction (x resolution: range / 65,536)
INT6_OFFSET = quant.INT6_LEVELS  # int6 value + offset = histogram bin (0..62)


class Int6Fit:
    """The int6 matrices of a quantized object (``quant.quantize_state_dict_mixed_int6``) and their
    weights; ``apply(x)`` gives the object with ``method`` applied by amount x (untouched entries shared)."""

    def __init__(self, obj: dict, state_dict: dict[str, torch.Tensor], method: str):
        if method not in ("prune", "coarsen"):
            raise CtxmixError(f"unknown fit_to_cap method {method!r}: expected prune or coarsen")
        self.obj, self.method = obj, method
        self.names = [n for n, kind in obj["m"].items() if isinstance(kind, dict) and kind.get("type") == "int6"]
        self.q = [obj["w"][n + ".q"] for n in self.names]
        self.scales = [obj["w"][n + ".scale"] for n in self.names]
        self.weights = [state_dict[n].detach().float() for n in self.names]
        self.n_values = sum(q.numel() for q in self.q)
        if method == "prune":
            self._order = self._prune_order()
            # For estimate(): each matrix's histogram, and the (matrix, bin) of every candidate in order.
            self._counts = np.stack([_histogram(q) for q in self.q]) if self.q else np.zeros((0, 2 * INT6_OFFSET + 1), np.int64)
            sizes = torch.tensor([0] + [q.numel() for q in self.q], dtype=torch.int64)
            matrix = torch.searchsorted(torch.cumsum(sizes, 0)[1:], self._order, right=True)
            value = torch.cat([q.flatten() for q in self.q])[self._order].to(torch.int64) if self.q else self._order
            self._order_bins = (matrix * (2 * INT6_OFFSET + 1) + value + INT6_OFFSET).numpy()

    def _prune_order(self) -> torch.Tensor:
        """Flat indices (over the int6 matrices in order) of the +-1 values, cheapest to zero first."""
        costs, where, offset = [], [], 0
        for q, scale, w in zip(self.q, self.scales, self.weights):
            s = _row_scale(scale, q)
            idx = (q.abs() == 1).flatten().nonzero().squeeze(1)
            wf = w.flatten()[idx]
            deq = q.flatten()[idx].float() * s.expand_as(q).flatten()[idx]
            costs.append(wf * wf - (wf - deq) ** 2)
            where.append(idx + offset)
            offset += q.numel()
        if not costs:
            return torch.zeros(0, dtype=torch.int64)
        cost, flat = torch.cat(costs), torch.cat(where)
        return flat[torch.argsort(cost, stable=True)]  # stable: ties keep matrix order, so runs repeat exactly

    def max_amount(self, limit: float) -> float:
        """``limit`` within what the method can do (prune: no more than the +-1 values there are)."""
        if self.method == "prune" and self.n_values:
            return min(limit, len(self._order) / self.n_values)
        return limit

    def apply(self, x: float, count: bool = True) -> tuple[dict, int]:
        """(object with amount ``x`` applied, number of int6 values changed; 0 unless ``count``)."""
        w = dict(self.obj["w"])
        changed = 0
        if self.method == "prune":
            k = min(round(x * self.n_values), len(self._order))
            flat = torch.cat([q.flatten() for q in self.q])
            flat[self._order[:k]] = 0
            offset = 0
            for name, q in zip(self.names, self.q):
                w[name + ".q"] = flat[offset : offset + q.numel()].view_as(q).clone()
                offset += q.numel()
            changed = k
        else:
            for name, q, scale, weight in zip(self.names, self.q, self.scales, self.weights):
                wider = (scale.float() * (1.0 + x)).to(scale.dtype)
                new_q = torch.clamp(torch.round(weight / _row_scale(wider, q)), -quant.INT6_LEVELS, quant.INT6_LEVELS)
                w[name + ".q"], w[name + ".scale"] = new_q.to(torch.int8).contiguous(), wider.contiguous()
                if count:
                    changed += int((w[name + ".q"] != q).sum())
        return {**self.obj, "w": w}, changed

    def estimate(self, x: float) -> float:
        """Order-0 entropy of the int6 values after ``apply(x)``, in bytes (a histogram per matrix)."""
        if self.method == "prune":
            # Zeroing moves counts from a matrix's +-1 bins to its 0 bin: no need to build the values.
            k = min(round(x * self.n_values), len(self._order))
            moved = np.bincount(self._order_bins[:k], minlength=self._counts.size).reshape(self._counts.shape)
            counts = self._counts - moved
            counts[:, INT6_OFFSET] += moved.sum(axis=1)
        else:
            fitted, _ = self.apply(x, count=False)
            counts = np.stack([_histogram(fitted["w"][n + ".q"]) for n in self.names])
        return _entropy_bytes(counts)


def _histogram(q: torch.Tensor) -> np.ndarray:
    """Counts of the int6 values -31..31 of ``q`` (bin = value + INT6_OFFSET)."""
    values = q.detach().cpu().numpy().ravel().astype(np.int64) + INT6_OFFSET
    return np.bincount(values, minlength=2 * INT6_OFFSET + 1)


def _entropy_bytes(counts: np.ndarray) -> float:
    """Sum over rows of (values x order-0 entropy) of each row's histogram, in bytes."""
    counts = counts.astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(counts > 0, counts / np.maximum(totals, 1.0), 1.0)
    return float(-(counts * np.log2(p)).sum() / 8.0)


def _row_scale(scale: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The scale as a float32 tensor broadcastable against ``q`` (one per row, or one scalar)."""
    s = scale.float()
    return s.view(q.shape[0], *([1] * (q.ndim - 1))) if s.ndim == 1 else s


def fit_meta(meta: dict, method: str, amount: float, changed: int, n_values: int, bytes_before: int) -> dict:
    """``meta`` plus what the fit step did (plain values: the artifact's metadata takes nothing else)."""
    return {**meta, "fit_method": method, "fit_amount": float(amount), "fit_changed_values": int(changed),
            "fit_int6_values": int(n_values), "fit_bytes_before": int(bytes_before)}


def fit_int6(obj: dict, state_dict: dict[str, torch.Tensor], cfg: TrainConfig, meta: dict, bytes_before: int,
             refuse: bool = True) -> PackedArtifact:
    """The int6 object changed by ``cfg.fit_to_cap`` as little as found to fit ``cfg.size_cap_bytes`` (or by
    exactly ``cfg.fit_force``), packed; see the section comment. Refuses (one line) when the most allowed
    does not fit, unless ``refuse`` is false."""
    method, cap = cfg.fit_to_cap, cfg.size_cap_bytes
    fitter = Int6Fit(obj, state_dict, method)
    knob = "prune_max_fraction" if method == "prune" else "coarsen_max"
    limit = cfg.prune_max_fraction if method == "prune" else cfg.coarsen_max
    compressions = 0

    def full(x: float) -> tuple[bytes, dict, dict, int]:
        nonlocal compressions
        fitted, changed = fitter.apply(x)
        m = fit_meta(meta, method, x, changed, fitter.n_values, bytes_before)
        compressions += 1
        return artifact_io.pack_artifact(fitted, cfg.compressor, meta=m, level=cfg.compress_level), fitted, m, changed

    def packed(x: float, trial: tuple[bytes, dict, dict, int], forced: bool = False) -> PackedArtifact:
        data, fitted, m, changed = trial
        report = FitReport(method, x, changed, fitter.n_values, bytes_before, len(data), compressions, forced)
        return PackedArtifact(data, fitted, m, report)

    if cfg.fit_force > 0.0:
        x = fitter.max_amount(cfg.fit_force)
        return packed(x, full(x), forced=True)

    x_max = fitter.max_amount(limit)
    estimate = _Estimates(fitter)
    target = cap * (1.0 - FIT_TARGET_MARGIN)
    lo = (0.0, estimate(0.0), bytes_before)  # the largest amount known to be over the cap: (x, estimate, bytes)
    hi = None  # the smallest amount known to fit: (x, estimate, bytes, trial)
    at_max = None  # the trial of the most allowed, once run
    while compressions < FIT_MAX_COMPRESSIONS and x_max > 0.0:
        if hi is not None and (cap - hi[2] <= FIT_SLACK * cap or _too_close(fitter, lo[0], hi[0])):
            break
        x = _predict(estimate, lo, hi, target, x_max)
        trial = full(x)
        point = (x, estimate(x), len(trial[0]))
        if x == x_max:
            at_max = trial
        if point[2] <= cap:
            hi = (*point, trial)
        elif x == x_max:
            break  # the most allowed does not fit
        else:
            lo = point
    if hi is None and at_max is None:
        at_max = full(x_max)
        if len(at_max[0]) <= cap:
            hi = (x_max, 0.0, len(at_max[0]), at_max)
    if hi is not None:
        return packed(hi[0], hi[3])
    if refuse:
        raise CtxmixError(
            f"artifact would be {bytes_before:,} bytes, over the size cap of {cap:,}, and the most {method} allowed "
            f"({knob}={limit:g}: {at_max[3]:,} of {fitter.n_values:,} int6 values changed) still leaves "
            f"{len(at_max[0]):,} bytes; nothing was written (raise {knob} or size_cap_bytes, or shrink the model)")
    return packed(x_max, at_max)


class _Estimates:
    """Cached ``Int6Fit.estimate``."""

    def __init__(self, fitter: Int6Fit):
        self.fitter, self.cache = fitter, {}

    def __call__(self, x: float) -> float:
        if x not in self.cache:
            self.cache[x] = self.fitter.estimate(x)
        return self.cache[x]


def _too_close(fitter: Int6Fit, x_lo: float, x_hi: float) -> bool:
    """No amount between the two is worth a compression (prune: they differ by under one value)."""
    step = 1.0 / max(fitter.n_values, 1) if fitter.method == "prune" else 1e-4
    return x_hi - x_lo <= step


def _predict(estimate: _Estimates, lo: tuple, hi: tuple | None, target: float, x_max: float) -> float:
    """The amount whose calibrated estimate hits ``target`` bytes, inside (lo, hi or x_max].

    Bytes are modelled as linear in the entropy estimate: through the two bracketing compressions when
    both exist, else through ``lo`` with slope 1 (a byte of entropy saved is a byte of file saved).
    """
    x_lo, e_lo, b_lo = lo
    slope = 1.0
    if hi is not None and hi[1] != e_lo:
        slope = (hi[2] - b_lo) / (hi[1] - e_lo)
        if not slope > 0.0:
            slope = 1.0
    want = e_lo - (b_lo - target) / slope  # the estimate the target needs
    x_top = hi[0] if hi is not None else x_max
    if estimate(x_top) > want:
        return x_top if hi is None else 0.5 * (x_lo + x_top)
    a, b = x_lo, x_top
    for _ in range(ESTIMATE_BISECTIONS):
        mid = 0.5 * (a + b)
        if estimate(mid) > want:
            a = mid
        else:
            b = mid
    if hi is not None and not (x_lo < b < x_top):
        b = 0.5 * (x_lo + x_top)
    return b
