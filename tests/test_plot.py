"""Plots and the HTML report: real PNGs from a real run, and a one-line error without matplotlib."""

from __future__ import annotations

import base64
import re
import sys

import numpy as np
import pytest

from ctxmix.errors import CtxmixError
from ctxmix.html_report import write_html
from ctxmix.plot import plot_report, position_nbytes, render_png, smoothed_rate

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(text_dir):
    import ctxmix

    return ctxmix.score([text_dir / "xargs.1"], ["unigram", "ngram"], ["none", "hedge"], keep_bits=True)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which must come first."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_report_writes_a_real_png(report, tmp_path):
    out = tmp_path / "run.png"
    plot_report(report, out)
    data = out.read_bytes()
    width, height = png_size(data)
    assert width >= 800 and height >= 400
    assert len(data) > 20_000  # three curves, a weights panel, text: far from an empty canvas
    assert data.endswith(b"IEND\xaeB`\x82")
    assert [p.name for p in tmp_path.iterdir()] == ["run.png"]  # no temp file left


def test_a_weights_panel_is_drawn_for_each_mixer_with_weights(report):
    history = report.results[0].mixer_history["hedge"]
    assert history["weights"].shape[1] == 2
    with_weights = png_size(render_png(report))[1]
    report.results[0].mixer_history.clear()
    try:
        without = png_size(render_png(report))[1]
    finally:
        report.results[0].mixer_history["hedge"] = history
    assert with_weights > 1.5 * without


def test_positions_are_placed_by_the_bytes_they_cover(report, text_dir):
    nbytes = position_nbytes(report, 0)
    assert nbytes is not None and len(nbytes) == report.results[0].tokens
    assert int(nbytes.sum()) == (text_dir / "xargs.1").stat().st_size  # the x axis ends at the file's size


def test_smoothed_rate_is_bits_over_bytes_in_the_window():
    bits = np.full(1000, 3.0)  # 3 bits per token ...
    nbytes = np.full(1000, 2, dtype=np.int64)  # ... of 2 bytes each: 1.5 bpb everywhere
    x, rate = smoothed_rate(bits, nbytes)
    assert np.allclose(rate, 1.5) and x[-1] == 2000
    bits[500:] = 9.0  # the second half costs 4.5 bpb
    x, rate = smoothed_rate(bits, nbytes)
    assert rate[0] == pytest.approx(1.5) and rate[-1] == pytest.approx(4.5)
    assert np.all(np.diff(rate) >= -1e-12)  # a centered window moves monotonically between the two


def test_write_html_embeds_the_table_and_the_plot(report, tmp_path):
    png = render_png(report)
    out = tmp_path / "run.html"
    write_html(report, out, png)
    page = out.read_text(encoding="utf-8")
    for row in report.runs:
        assert f"<code>{row['label']}</code>" in page and f"{row['bpb']:.4f}" in page
    (encoded,) = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert base64.b64decode(encoded) == png


def test_html_escapes_what_the_report_says(report, tmp_path):
    report.runs[0]["label"], saved = "<script>alert(1)</script>", report.runs[0]["label"]
    try:
        out = tmp_path / "run.html"
        write_html(report, out, b"\x89PNG not really")
        page = out.read_text(encoding="utf-8")
    finally:
        report.runs[0]["label"] = saved
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_plot_needs_per_position_bits(text_dir, tmp_path):
    import ctxmix

    report = ctxmix.score([text_dir / "grammar.lsp"], ["unigram"], ["none"])
    with pytest.raises(CtxmixError, match="keep_bits=True"):
        plot_report(report, tmp_path / "x.png")
    write_html(report, tmp_path / "x.html")  # the table alone is still written, saying why there is no plot
    assert "No plot: plot needs per-position bits" in (tmp_path / "x.html").read_text(encoding="utf-8")
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_is_one_line(report, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes ``import matplotlib...`` raise ImportError
    with pytest.raises(CtxmixError, match="needs matplotlib, which is not installed") as info:
        plot_report(report, tmp_path / "x.png")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
