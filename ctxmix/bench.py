"""Side-by-side measurements: n-gram expert throughput and memory, and ctxmix against classical
compressors on the same files. Speed is measured here, never in unit tests.

Every figure is the median of ``repeats`` runs made in this one process, so ratios between ctxmix and a
baseline compare runs on the same machine under the same load.
"""

from __future__ import annotations

import bz2
import lzma
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import CtxmixError
from .run import chunk_length

PPMD_MEM = 16 << 20  # pyppmd's order-6 setting used for DESIGN.md section 11's figures
PPMD8_MEM = 256 << 20


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """One line naming the machine the figures come from."""
    return f"{cpu_name()}, {os.cpu_count()} logical cores, Python {platform.python_version()}, numpy {np.__version__}"


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls of ``fn`` and the last call's result."""
    times = []
    result = None
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


@dataclass
class ExpertSpeed:
    spec: str
    input: str  # the stream's name
    tokens: int
    seconds: float  # median
    tokens_per_s: float
    memory_bytes: int
    stored_entries: int | None
    bytes_per_entry: float | None


def expert_throughput(spec: str, tokens: np.ndarray, vocab_size: int, repeats: int = 5, input_name: str = "") -> ExpertSpeed:
    """Fast-path tokens/s of one expert over ``tokens`` (after a JIT warm-up run on a short prefix),
    and the table memory it holds at the end of the stream."""
    from . import experts

    def one_pass():
        expert = experts.registry.build(spec, vocab_size=vocab_size)
        expert.begin(tokens)
        chunk = chunk_length([expert], full=False)  # as the engine chunks a pass
        for start in range(0, len(tokens), chunk):
            expert.score_chunk(tokens[start : start + chunk])
        return expert

    warm = experts.registry.build(spec, vocab_size=vocab_size)
    warm.begin(tokens[:2048])
    warm.score_chunk(tokens[:2048])  # compile every kernel the pass uses
    seconds, expert = median_seconds(one_pass, repeats)
    entries = expert.stored_entries() if hasattr(expert, "stored_entries") else None
    memory = expert.memory_bytes()
    return ExpertSpeed(spec, input_name, len(tokens), seconds, len(tokens) / seconds, memory, entries,
                       memory / entries if entries else None)


@dataclass
class CompressorFigure:
    name: str
    file: str
    input_bytes: int
    output_bits: float  # real compressed size for classical compressors; ctxmix: the run's code length
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def bpb(self) -> float:
        return self.output_bits / self.input_bytes

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / self.seconds / 1e6


def _classical(data: bytes) -> dict[str, Callable[[], bytes]]:
    import zstandard

    import pyppmd

    return {
        "xz -9e": lambda: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
        "zstd -19": lambda: zstandard.ZstdCompressor(level=19).compress(data),
        "bzip2 -9": lambda: bz2.compress(data, 9),
        "PPMd o6": lambda: pyppmd.compress(data, max_order=6, mem_size=PPMD_MEM),
    }


def compare_compressors(paths: Sequence[str | os.PathLike], experts: Sequence[str], mixers: Sequence[str],
                        repeats: int = 5, label: str | None = None) -> list[CompressorFigure]:
    """bpb and speed of xz, zstd, bzip2, PPMd o6 and a ctxmix run on each file, side by side."""
    from .api import score

    try:
        import pyppmd  # noqa: F401
    except ImportError:
        raise CtxmixError("the compressor comparison needs pyppmd: pip install 'ctxmix[bench]'") from None
    figures = []
    for path in paths:
        data = Path(path).read_bytes()
        for name, fn in _classical(data).items():
            seconds, out = median_seconds(fn, repeats)
            figures.append(CompressorFigure(name, Path(path).name, len(data), 8 * len(out), seconds))
        score([path], experts=experts, mixers=mixers)  # warm-up: JIT compile before timing
        seconds, report = median_seconds(lambda: score([path], experts=experts, mixers=mixers), repeats)
        row = report.runs[-1]
        figures.append(CompressorFigure(label or row["label"], Path(path).name, len(data), row["bits"], seconds,
                                        {"tokens": row["tokens"]}))
    return figures


DEFAULT_BENCH_EXPERTS = ("ngram:orders=2-11,table=exact",)


@dataclass
class BenchResult:
    machine: str
    speeds: list[ExpertSpeed]
    figures: list[CompressorFigure]

    def to_dict(self) -> dict:
        return {
            "machine": self.machine,
            "experts": [vars(s) for s in self.speeds],
            "compressors": [{"name": f.name, "file": f.file, "input_bytes": f.input_bytes, "bits": f.output_bits,
                             "bpb": f.bpb, "seconds": f.seconds, "mb_per_s": f.mb_per_s} for f in self.figures],
        }


def run_bench(paths: Sequence[str | os.PathLike], experts: Sequence[str] | None = None, repeats: int = 5,
              compressors: bool = True) -> BenchResult:
    """``ctxmix bench``: expert throughput on each file (default: the shipped sample text), then
    n-gram-only ctxmix against the classical compressors on the same files."""
    from .data import load_text, sample_text_path

    paths = list(paths) or [sample_text_path()]
    specs = list(experts) if experts else list(DEFAULT_BENCH_EXPERTS)
    speeds = []
    for path in paths:
        stream = load_text(path)
        for spec in specs:
            speeds.append(expert_throughput(spec, stream.tokens, stream.vocab_size, repeats, Path(path).name))
    figures = compare_compressors(paths, experts=specs[:1], mixers=["none"], repeats=repeats,
                                  label="ctxmix " + specs[0]) if compressors else []
    return BenchResult(machine_line(), speeds, figures)
