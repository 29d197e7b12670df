"""A one-page HTML report: the run table and the plot, in one self-contained file.

``write_html(report, out_html, png)`` writes the experts and mixers used, the table of rows (label,
file, tokens, bytes, bits, bpb; the best bpb of each file in bold) and the plot embedded as a base64
PNG, so the page can be mailed or attached without its image. Every string from the report is
HTML-escaped. The file is written atomically.
"""

from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .errors import CtxmixError

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 0.25em 0.8em; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
td.best { font-weight: bold; }
code { background: #f4f4f4; padding: 0 0.25em; }
img { max-width: 100%; }
.note { color: #777; }
"""


def _png_bytes(report: Any, png: bytes | str | os.PathLike | None) -> tuple[bytes | None, str]:
    """(PNG bytes or None, a note saying why there is no plot)."""
    if isinstance(png, (bytes, bytearray)):
        return bytes(png), ""
    if png is not None:
        try:
            return Path(png).read_bytes(), ""
        except OSError as exc:
            raise CtxmixError(f"cannot read plot {png}: {exc.strerror}") from None
    from .plot import render_png

    try:
        return render_png(report), ""
    except CtxmixError as exc:
        # The table alone is still a report; the page says why the plot is missing.
        return None, str(exc)


def _fmt_bpb(bpb: Any) -> str:
    return f"{bpb:.4f}" if isinstance(bpb, (int, float)) and math.isfinite(bpb) else "n/a"


def render_html(report: Any, png: bytes | str | os.PathLike | None = None) -> str:
    """The page as a string. ``png``: PNG bytes, a PNG file's path, or None to draw the plot here."""
    from . import __version__

    esc = html.escape
    image, note = _png_bytes(report, png)
    best: dict[str, float] = {}
    for row in report.runs:
        bpb = row.get("bpb")
        if isinstance(bpb, float) and math.isfinite(bpb):
            best[row["file"]] = min(best.get(row["file"], math.inf), bpb)

    rows = []
    for row in report.runs:
        bpb_cell = '<td class="best">' if row.get("bpb") == best.get(row["file"]) else "<td>"
        rows.append(
            "<tr>"
            f"<td><code>{esc(str(row['label']))}</code></td><td>{esc(str(row['file']))}</td>"
            f"<td>{row['tokens']:,}</td><td>{row['bytes']:,}</td><td>{row['bits']:,.1f}</td>"
            f"{bpb_cell}{_fmt_bpb(row.get('bpb'))}</td>"
            "</tr>"
        )
    experts = ", ".join(f"<code>{esc(s)}</code>" for s in getattr(report, "experts", [])) or "none"
    mixers = ", ".join(f"<code>{esc(s)}</code>" for s in getattr(report, "mixers", [])) or "none"
    if image is not None:
        figure = f'<img alt="bits per byte along the stream" src="data:image/png;base64,{base64.b64encode(image).decode("ascii")}">'
    else:
        figure = f'<p class="note">No plot: {esc(note)}</p>'
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ctxmix report</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>ctxmix report</h1>
<p>ctxmix {esc(__version__)}. Experts: {experts}. Mixers: {mixers}.</p>
<h2>Bits per byte</h2>
<table>
<thead><tr><th>label</th><th>file</th><th>tokens</th><th>bytes</th><th>bits</th><th>bpb</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
<p class="note">bpb = bits / bytes; the best row of each file is in bold.</p>
<h2>Along the stream</h2>
{figure}
</body>
</html>
"""


def write_html(report: Any, out_html: str | os.PathLike, png: bytes | str | os.PathLike | None = None) -> None:
    """Write the one-page report to ``out_html`` (atomically); see ``render_html`` for ``png``."""
    write_text_atomic(out_html, render_html(report, png))
