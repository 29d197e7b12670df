"""Plots of a run: bits per byte along the stream for every expert and mixer, and the mixers' weights.

``render_png(report)`` draws, for each scored stream, one panel with the smoothed bpb of every row label
(each expert alone and each mixer) against the position in the stream in bytes, and one panel per mixer
that records weights (``history()["weights"]``) showing each expert's weight over the same axis.
``plot_report(report, out_png)`` writes that PNG atomically.

The report must carry per-position bits (``ctxmix.score(..., keep_bits=True)``). matplotlib is optional:
without it these functions raise one CtxmixError line. The figure is drawn with matplotlib's object API
(``Figure``), never ``pyplot``, so no global state or GUI backend is touched.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from .atomic import write_bytes_atomic
from .errors import CtxmixError

SMOOTH_POINTS = 800  # points per curve: enough for a smooth line at any figure width
SMOOTH_FRACTION = 0.02  # the smoothing window covers this fraction of the stream ...
SMOOTH_MIN_BYTES = 256  # ... but at least this many bytes, so short files are not pure noise
MAX_STREAMS = 8  # streams drawn; a report over more files plots the first ones (the title says so)
PANEL_HEIGHT_IN = 2.8
FIGURE_WIDTH_IN = 10.0
DPI = 110


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise CtxmixError("plotting needs matplotlib, which is not installed (pip install matplotlib)") from None
    return Figure


def position_nbytes(report: Any, index: int) -> np.ndarray | None:
    """int64[tokens]: bytes covered by each scored position of stream ``index``, if the report has them."""
    result = report.results[index]
    nbytes = getattr(result, "position_nbytes", None)
    if nbytes is None:
        streams = getattr(report, "streams", None)
        if streams is not None and index < len(streams):
            nbytes = streams[index].nbytes[1:]
    if nbytes is None:
        return None
    nbytes = np.asarray(nbytes, dtype=np.int64)
    return nbytes if len(nbytes) == result.tokens else None


def smoothed_rate(bits: np.ndarray, nbytes: np.ndarray | None, points: int = SMOOTH_POINTS
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(x, rate): bits per byte in a centered window of bytes, sampled at ``points`` positions.

    ``bits`` float64[T] per position; ``nbytes`` int64[T] per position (None: every position counts as
    one unit, giving bits per token). The window spans ``SMOOTH_FRACTION`` of the stream, at least
    ``SMOOTH_MIN_BYTES``; each point is (bits inside the window) / (bytes inside it), so long tokens
    weigh as much as the bytes they stand for.
    """
    units = np.ones(len(bits)) if nbytes is None else nbytes.astype(np.float64)
    cum_units = np.concatenate([[0.0], np.cumsum(units)])  # float64[T+1]
    cum_bits = np.concatenate([[0.0], np.cumsum(bits)])
    total = cum_units[-1]
    if total <= 0:
        return np.zeros(0), np.zeros(0)
    half = max(total * SMOOTH_FRACTION, SMOOTH_MIN_BYTES if nbytes is not None else 16) / 2
    centers = np.linspace(0.0, total, min(points, len(bits)) + 1)[1:]
    lo = np.searchsorted(cum_units, np.maximum(centers - half, 0.0), side="left")
    hi = np.searchsorted(cum_units, np.minimum(centers + half, total), side="left")
    hi = np.clip(hi, lo + 1, len(bits))
    lo = np.minimum(lo, hi - 1)
    width = cum_units[hi] - cum_units[lo]
    rate = np.divide(cum_bits[hi] - cum_bits[lo], width, out=np.full(len(width), np.nan), where=width > 0)
    return centers, rate


def render_png(report: Any) -> bytes:
    """The report's plot as PNG bytes (see the module docstring for what is drawn)."""
    figure_class = _figure_class()
    results = list(report.results)
    if not results:
        raise CtxmixError("nothing to plot: the report has no scored stream")
    if not all(r.position_bits for r in results):
        raise CtxmixError("plot needs per-position bits: score with keep_bits=True (the CLI does so for --plot)")
    shown = results[:MAX_STREAMS]
    panels: list[tuple[int, str | None]] = []  # (stream index, mixer label or None for the bpb panel)
    for i, result in enumerate(shown):
        panels.append((i, None))
        for label, history in result.mixer_history.items():
            if "weights" in history and len(history["weights"]):
                panels.append((i, label))

    figure = figure_class(figsize=(FIGURE_WIDTH_IN, PANEL_HEIGHT_IN * len(panels)), dpi=DPI, layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (i, mixer_label) in zip(axes, panels):
        result = shown[i]
        nbytes = position_nbytes(report, i)
        if mixer_label is None:
            _draw_rates(ax, result, nbytes)
        else:
            _draw_weights(ax, result, nbytes, mixer_label, list(getattr(report, "experts", [])))
    if len(results) > len(shown):
        figure.suptitle(f"first {len(shown)} of {len(results)} streams")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _draw_rates(ax, result, nbytes) -> None:
    unit = "bpb" if nbytes is not None else "bits/token"
    for label, bits in result.position_bits.items():
        x, rate = smoothed_rate(np.asarray(bits, dtype=np.float64), nbytes)
        total = float(np.sum(bits)) / (float(nbytes.sum()) if nbytes is not None else max(len(bits), 1))
        ax.plot(x, rate, linewidth=1.0, label=f"{label}  ({total:.4f} {unit})")
    ax.set_title(f"{os.path.basename(str(result.name))}: {unit}, smoothed", fontsize=10, loc="left")
    ax.set_xlabel("position in stream (bytes)" if nbytes is not None else "position in stream (tokens)")
    ax.set_ylabel(unit)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.8)


def _draw_weights(ax, result, nbytes, mixer_label: str, expert_labels: list[str]) -> None:
    history = result.mixer_history[mixer_label]
    weights = np.asarray(history["weights"], dtype=np.float64)  # float64[R, K]
    positions = np.asarray(history.get("positions", np.arange(len(weights))), dtype=np.int64)  # int64[R]
    if nbytes is not None:
        cum = np.cumsum(nbytes)
        x = cum[np.clip(positions, 0, len(cum) - 1)]
    else:
        x = positions + 1
    for k in range(weights.shape[1]):
        # a mixer may weigh its own inputs (cm: its layer-1 mixers; tilt: its boosts) rather than the experts
        name = expert_labels[k] if weights.shape[1] == len(expert_labels) else f"input {k}"
        ax.plot(x, weights[:, k], linewidth=1.0, label=name)
    ax.set_title(f"{os.path.basename(str(result.name))}: weights of {mixer_label}", fontsize=10, loc="left")
    ax.set_xlabel("position in stream (bytes)" if nbytes is not None else "position in stream (tokens)")
    ax.set_ylabel("weight")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.8)


def plot_report(report: Any, out_png: str | os.PathLike) -> None:
    """Write the report's plot to ``out_png`` (atomically)."""
    write_bytes_atomic(out_png, render_png(report))
