"""benchmarks/compare.py on short prefixes of real files: the sizes it reports are real outputs.

Speed is not checked here (benchmarks measure it); these tests check that each size is the length of what
the compressor really writes, that every ctxmix output was decoded back to the input, and that a file
ctxmix's text mode refuses still gets its classical rows.
"""

from __future__ import annotations

import importlib.util
import json
import lzma
import sys
from pathlib import Path

import pyppmd
import pytest

from ctxmix.codec import compress

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"
MAX_BYTES = 2000


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("ctxmix_compare_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def run(compare, tmp_path_factory, text_dir):
    out = tmp_path_factory.mktemp("compare")
    report = compare.main(["--text-dir", str(text_dir), "--files", "alice29.txt", "xargs.1", "sum",
                           "--configs", "xz", "ppmd8", "ngram",
                           "--max-bytes", str(MAX_BYTES), "--repeats", "1",
                           "--json", str(out / "r.json"), "--markdown", str(out / "r.md"), "--chart", str(out / "r.png")])
    return report, out


def _rows(report) -> dict:
    return {(r["file"], r["config"]): r for r in report["results"]}


def test_sizes_are_real_outputs(run, text_dir, tmp_path):
    report, _ = run
    rows = _rows(report)
    for name in ("alice29.txt", "xargs.1"):
        data = (text_dir / name).read_bytes()[:MAX_BYTES]  # ASCII files: the cut is exactly MAX_BYTES
        assert rows[(name, "xz")]["output_bytes"] == len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
        # pyppmd's one-shot helper with variant H is its Ppmd7 coder: the same bytes by another route.
        assert rows[(name, "ppmd8")]["output_bytes"] == len(pyppmd.compress(data, max_order=8, mem_size=256 << 20, variant="H"))
        prefix = tmp_path / name
        prefix.write_bytes(data)
        cmx = tmp_path / f"{name}.cmx"
        compress(prefix, cmx, experts=["ngram"], mixers="none")
        ngram = rows[(name, "ngram")]
        assert ngram["output_bytes"] == cmx.stat().st_size == ngram["header_bytes"] + ngram["payload_bytes"]
        assert ngram["roundtrip_checked"] is True
        assert ngram["bpb"] == pytest.approx(8 * cmx.stat().st_size / MAX_BYTES)
        assert ngram["input_bytes"] == MAX_BYTES


def test_non_utf8_file_keeps_classical_rows(run, text_dir):
    report, _ = run
    rows = _rows(report)
    data = (text_dir / "sum").read_bytes()[:MAX_BYTES]
    assert rows[("sum", "xz")]["output_bytes"] == len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    assert rows[("sum", "ngram")]["skipped"] == "not UTF-8"
    table = dict(zip(report["table"]["header"], next(r for r in report["table"]["rows"] if r[0] == "sum")))
    assert table["ctxmix n-gram"] == "not UTF-8"


def test_outputs_written_and_labelled(run):
    report, out = run
    assert json.loads((out / "r.json").read_text())["results"] == json.loads(json.dumps(report["results"]))
    text = (out / "r.md").read_text()
    assert f"first {MAX_BYTES:,} bytes" in text
    assert "| alice29.txt | 2,000 of 152,089 | yes | seen |" in text  # the default model trained on alice29
    assert "Quick run" in text
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_utf8_cut_never_splits_a_character(compare):
    text = "ab\u00e9\u20ac".encode()  # 2 ASCII bytes, then a 2-byte and a 3-byte character
    assert [compare.utf8_prefix_length(text, n) for n in range(1, 9)] == [1, 2, 2, 4, 4, 4, 7, 7]
