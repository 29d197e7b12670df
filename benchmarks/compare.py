"""ctxmix ``compress`` against classical compressors: real compressed sizes (bpb) and speed, file by file.

Run from the repository root (reads the texts in ../shared/data/text, or in ``--text-dir``; the package
itself never reads them):

    python benchmarks/compare.py                                   # everything: hours with the neural model
    python benchmarks/compare.py --max-bytes 20000 --json out.json --markdown out.md --chart docs/compare.png
    python benchmarks/compare.py --files alice29.txt fineweb-sample --configs xz ppmd6 ppmd8 cm --max-bytes 4000

Inputs: every file in ``../shared/data/text/`` and the FineWeb sample shipped in the package
(``ctxmix.data.sample_text_path()``, named ``fineweb-sample``). Compressors (``--configs`` keys):

    xz      lzma preset 9 | PRESET_EXTREME (the .xz container, as ``xz -9e`` writes it)
    zstd    zstandard level 19 (one frame, content size in the header)
    bzip2   bz2 level 9
    ppmd6   pyppmd Ppmd7 (PPMd var. H, as in 7-Zip), order 6, 256 MB
    ppmd8   the same, order 8
    ngram   ctxmix compress -e ngram -m none
    neural  ctxmix compress -e neural -m none            (the default model shipped in the package)
    hedge   ctxmix compress -e neural -e ngram -m hedge  (the defaults before cm; hedge codes on one lane)
    cm      ctxmix compress -e neural -e ngram -m cm     (the defaults of ``ctxmix compress``: lanes from the length)
    cm1     the same with --lanes 1                       (one lane: the size lanes are measured against)

Every size is the length of real output: the classical compressors' bytes (each decompressed once and
compared with the input), and the whole ``.cmx`` file that ``ctxmix.codec.compress`` (the function
``ctxmix compress`` calls) writes, header included; each ``.cmx`` is decompressed with
``ctxmix.codec.decompress`` and must give back the input byte for byte, or the script stops. Classical
timings are medians of ``--repeats`` runs; ctxmix runs ``--ctxmix-repeats`` times (default 1) after one
warm-up on a short prefix (JIT compilation, model load), and its compression and decompression are
timed separately.

Progress goes to stderr; the machine, the versions and the table go to stdout.
"""

from __future__ import annotations

import argparse
import bz2
import json
import lzma
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TEXT_DIR = SHARED / "text"
sys.path.insert(0, str(REPO))

from rich.console import Console
from rich.table import Table

from ctxmix.errors import CtxmixError

SAMPLE_NAME = "fineweb-sample"
PPMD_MEM = 256 << 20  # generous: PPMd never runs out of model memory on these files (<= 1 MB)
WARMUP_BYTES = 1000  # prefix compressed once per ctxmix config before timing (JIT, model load)
PROGRESS_EVERY_S = 20.0  # at most one progress line per this many seconds during a ctxmix run
# torch threads for everything but the coding loop (the codec codes on one thread, see
# ctxmix.codec.CODING_TORCH_THREADS): on this shared 2-core machine two threads were 20x slower than one
# (105 s against 4.8 s for 1,607 tokens, other jobs running): OpenMP threads spin when cores are busy.
DEFAULT_THREADS = 1


@dataclass(frozen=True)
class Config:
    key: str
    label: str  # column heading
    kind: str  # "classical" or "ctxmix"
    experts: tuple[str, ...] = ()
    mixer: str = ""
    lanes: int | None = None  # ctxmix: lanes asked for (None: the default for the length)


CONFIGS = [
    Config("xz", "xz -9e", "classical"),
    Config("zstd", "zstd -19", "classical"),
    Config("bzip2", "bzip2 -9", "classical"),
    Config("ppmd6", "PPMd o6", "classical"),
    Config("ppmd8", "PPMd o8", "classical"),
    Config("ngram", "ctxmix n-gram", "ctxmix", ("ngram",), "none"),
    Config("neural", "ctxmix neural", "ctxmix", ("neural",), "none"),
    Config("hedge", "ctxmix neural+n-gram+hedge", "ctxmix", ("neural", "ngram"), "hedge"),
    Config("cm", "ctxmix neural+n-gram+cm", "ctxmix", ("neural", "ngram"), "cm"),
    Config("cm1", "ctxmix neural+n-gram+cm, 1 lane", "ctxmix", ("neural", "ngram"), "cm", lanes=1),
]
CONFIG_BY_KEY = {c.key: c for c in CONFIGS}
DEFAULT_MODEL_CONFIGS = ("neural", "hedge", "cm", "cm1")  # the configs that run the default neural model
DEFAULTS = "cm"  # the config ``ctxmix compress FILE`` runs with no options: the size targets are about it

# The Canterbury corpus's own categories decide what counts as English text. The four prose files are
# "English text". xargs.1 is a man page in troff source (English sentences between .TP/\fB macros, 4 KB)
# and enwik8 is a MediaWiki XML dump (English articles inside XML, links, templates and tables): both are
# markup formats, so they are not counted for the target; their ratios are still shown and reported.
ENGLISH = {
    "alice29.txt": "yes",
    "asyoulik.txt": "yes",
    "lcet10.txt": "yes",
    "plrabn12.txt": "yes",
    SAMPLE_NAME: "yes (web)",
    "xargs.1": "no: troff",
    "enwik8.first1MB": "no: wiki XML",
    "cp.html": "no: HTML",
    "fields.c": "no: C",
    "grammar.lsp": "no: Lisp",
    "sum": "no: binary",
}
TARGET_FILES = ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt")  # the English texts in text/
# docs/training.md: the default model trained on 95% of each of these files (the last ~5% was validation).
SEEN_IN_TRAINING = {"alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt", "enwik8.first1MB"}


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


@dataclass
class Input:
    name: str
    path: Path
    data: bytes  # what every compressor gets (a prefix when --max-bytes cuts the file)
    file_bytes: int  # the whole file's length
    utf8: bool
    english: str
    training: str  # "seen" / "held out" / "unknown": whether the default model trained on this text

    @property
    def truncated(self) -> bool:
        return len(self.data) < self.file_bytes


def utf8_prefix_length(data: bytes, max_bytes: int) -> int:
    """Largest n <= max_bytes that does not cut a UTF-8 character (data is valid UTF-8)."""
    n = min(max_bytes, len(data))
    while 0 < n < len(data) and (data[n] & 0xC0) == 0x80:  # a continuation byte: step back to its lead
        n -= 1
    return n


def find_inputs(names: Sequence[str] | None, max_bytes: int | None, text_dir: Path = TEXT_DIR) -> list[Input]:
    from ctxmix.data import sample_text_path

    found = {p.name: p for p in sorted(text_dir.iterdir()) if p.is_file()} if text_dir.is_dir() else {}
    found[SAMPLE_NAME] = Path(sample_text_path())
    # Table order: the target's English texts, the held-out sample, the markup texts, then the rest.
    first = [n for n in (*TARGET_FILES, SAMPLE_NAME, "enwik8.first1MB", "xargs.1") if n in found]
    available = {n: found[n] for n in first + [n for n in found if n not in first]}
    chosen = []
    for name in names or list(available):
        if name in available:
            chosen.append((name, available[name]))
        elif Path(name).is_file():
            chosen.append((Path(name).name, Path(name)))
        else:
            raise CtxmixError(f"--files: {name!r} is neither a file in {text_dir} nor {SAMPLE_NAME} nor a path "
                              f"(known: {', '.join(available)})")
    inputs = []
    for name, path in chosen:
        whole = path.read_bytes()
        try:
            whole.decode("utf-8")  # the criterion of ctxmix.data.text.check_utf8, which compress applies
            utf8 = True
        except UnicodeDecodeError:
            utf8 = False
        n = len(whole) if max_bytes is None else (utf8_prefix_length(whole, max_bytes) if utf8 else min(max_bytes, len(whole)))
        data = whole[:n]
        if utf8:
            data.decode("utf-8")  # a prefix cut at a character boundary stays valid UTF-8
        training = "seen" if name in SEEN_IN_TRAINING else ("held out" if path.parent == text_dir or name == SAMPLE_NAME else "unknown")
        inputs.append(Input(name, path, data, len(whole), utf8, ENGLISH.get(name, "?"), training))
    return inputs


# ----------------------------------------------------------------------------------------------------
# Classical compressors
# ----------------------------------------------------------------------------------------------------


def _ppmd_pair(order: int) -> tuple[Callable[[bytes], bytes], Callable[[bytes, int], bytes]]:
    import pyppmd

    def compress(data: bytes) -> bytes:
        encoder = pyppmd.Ppmd7Encoder(order, PPMD_MEM)
        return encoder.encode(data) + encoder.flush()

    def decompress(blob: bytes, length: int) -> bytes:
        decoder = pyppmd.Ppmd7Decoder(order, PPMD_MEM)
        out = decoder.decode(blob, length)
        if len(out) < length:  # pyppmd's README: the encoder may leave out a final NUL the decoder needs
            out += decoder.decode(b"\0" if decoder.needs_input else b"", length - len(out))
        return out

    return compress, decompress


def classical_codec(key: str) -> tuple[Callable[[bytes], bytes], Callable[[bytes, int], bytes]]:
    """(compress(data) -> bytes, decompress(blob, original length) -> bytes) for a classical config."""
    if key == "xz":
        return (lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME)), (lambda b, n: lzma.decompress(b))
    if key == "zstd":
        import zstandard

        return (lambda d: zstandard.ZstdCompressor(level=19).compress(d)), (lambda b, n: zstandard.ZstdDecompressor().decompress(b))
    if key == "bzip2":
        return (lambda d: bz2.compress(d, 9)), (lambda b, n: bz2.decompress(b))
    if key == "ppmd6":
        return _ppmd_pair(6)
    if key == "ppmd8":
        return _ppmd_pair(8)
    raise CtxmixError(f"unknown classical compressor {key!r}")


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_classical(item: Input, config: Config, repeats: int) -> dict:
    compress, decompress = classical_codec(config.key)
    runs = [timed(lambda: compress(item.data)) for _ in range(max(repeats, 1))]
    blob = runs[-1][1]
    if any(out != blob for _, out in runs):
        raise RuntimeError(f"{config.label} on {item.name}: output differs between runs")
    decompress_runs = [timed(lambda: decompress(blob, len(item.data))) for _ in range(max(repeats, 1))]
    if decompress_runs[-1][1] != item.data:
        raise RuntimeError(f"{config.label} on {item.name}: decompressed output differs from the input")
    return _figures(item, config, len(blob), [t for t, _ in runs], [t for t, _ in decompress_runs])


def _figures(item: Input, config: Config, output_bytes: int, compress_s: list[float], decompress_s: list[float],
             **extra) -> dict:
    n = len(item.data)
    comp = statistics.median(compress_s)
    decomp = statistics.median(decompress_s)
    return {
        "file": item.name, "config": config.key, "label": config.label, "kind": config.kind,
        "input_bytes": n, "output_bytes": output_bytes, "bpb": 8.0 * output_bytes / n,
        "compress_s": comp, "decompress_s": decomp, "compress_runs_s": compress_s, "decompress_runs_s": decompress_s,
        "compress_bytes_per_s": n / comp, "decompress_bytes_per_s": n / decomp,
        "decompress_over_compress": decomp / comp, "roundtrip_checked": True, **extra,
    }


# ----------------------------------------------------------------------------------------------------
# ctxmix
# ----------------------------------------------------------------------------------------------------


class ProgressLines:
    """The codec's ``progress(task, done, total)`` callback, as a line on stderr every PROGRESS_EVERY_S."""

    def __init__(self, console: Console):
        self.console = console
        self.started = time.monotonic()
        self.last = self.started

    def __call__(self, task: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            rate = done / (now - self.started)
            self.console.log(f"  {task.split(' ')[0]} {done:,}/{total:,} bytes, {rate / 1000:,.1f} kB/s, "
                             f"about {(total - done) / rate:,.0f} s left")


def run_ctxmix(item: Input, config: Config, workdir: Path, repeats: int, console: Console) -> dict:
    """Compress ``item`` with the codec's public API, decompress it, check the bytes; time both."""
    from ctxmix.codec import compress, decompress

    source = workdir / f"{item.name}.in"
    source.write_bytes(item.data)
    packed = workdir / f"{item.name}.{config.key}.cmx"
    restored = workdir / f"{item.name}.{config.key}.out"
    compress_s, decompress_s = [], []
    result = None
    for _ in range(max(repeats, 1)):
        seconds, result = timed(lambda: compress(source, packed, experts=list(config.experts), mixers=config.mixer,
                                                 progress=ProgressLines(console), lanes=config.lanes))
        compress_s.append(seconds)
        seconds, _ = timed(lambda: decompress(packed, restored, progress=ProgressLines(console)))
        decompress_s.append(seconds)
        if restored.read_bytes() != item.data:
            raise RuntimeError(f"{config.label} on {item.name}: decompressed .cmx differs from the input")
    file_bytes = packed.stat().st_size
    if file_bytes != result.file_bytes:
        raise RuntimeError(f"{config.label} on {item.name}: .cmx is {file_bytes} bytes, the codec reported {result.file_bytes}")
    return _figures(item, config, file_bytes, compress_s, decompress_s, tokens=result.tokens,
                    header_bytes=result.header_bytes, payload_bytes=result.payload_bytes, model_bpb=result.model_bpb,
                    experts=result.experts, mixer=result.mixer, lanes=result.lanes,
                    compress_tokens_per_s=result.tokens / statistics.median(compress_s))


def _logged(log: Console, where: str, r: dict) -> dict:
    log.log(f"{where}: {r['bpb']:.4f} bpb, {r['output_bytes']:,} bytes, compress "
            f"{speed_text(r['compress_bytes_per_s'])}, decompress {speed_text(r['decompress_bytes_per_s'])}")
    return r


def _ctxmix_task(where: str, item: Input, config: Config, warm_source: bytes, args, workdir: Path,
                 warmups: dict[str, float]) -> dict:
    """One ctxmix compressor on one input, after a warm-up of that compressor in this process."""
    log = Console(stderr=True, highlight=False, width=200)
    if config.key not in warmups:
        log.log(f"warm-up {config.label} on a {WARMUP_BYTES:,}-byte prefix")
        warmups[config.key] = warm_up(config, warm_source, workdir)
    log.log(f"{where} ...")
    return _logged(log, where, run_ctxmix(item, config, workdir, args.ctxmix_repeats, log))


_WORKER_WARMUPS: dict[str, float] = {}  # per worker process: the compressors it has warmed up


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _ctxmix_worker(where: str, item: Input, config: Config, warm_source: bytes, args) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory(prefix="ctxmix_compare_") as tmp:
        result = _ctxmix_task(where, item, config, warm_source, args, Path(tmp), _WORKER_WARMUPS)
    return result, _WORKER_WARMUPS[config.key]


def warm_up(config: Config, data: bytes, workdir: Path) -> float:
    """Compress and decompress a short prefix once: numba JIT, torch start-up and the model load happen here."""
    from ctxmix.codec import compress, decompress

    source = workdir / f"warmup.{config.key}.in"
    source.write_bytes(data[: utf8_prefix_length(data, WARMUP_BYTES)])
    packed = workdir / f"warmup.{config.key}.cmx"
    start = time.perf_counter()
    compress(source, packed, experts=list(config.experts), mixers=config.mixer, lanes=config.lanes)
    decompress(packed, workdir / f"warmup.{config.key}.out")
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------
# Machine, table, verdicts, chart
# ----------------------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict:
    from importlib import metadata

    import numpy as np

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for package in ("ctxmix", "torch", "numba", "constriction", "zstandard", "pyppmd"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    try:
        import zstandard

        versions["libzstd"] = ".".join(map(str, zstandard.ZSTD_VERSION))
    except ImportError:
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": threads, "platform": platform.platform(),
            "versions": versions}


def speed_text(bytes_per_s: float) -> str:
    if bytes_per_s >= 1e5:
        return f"{bytes_per_s / 1e6:.2f} MB/s"
    if bytes_per_s >= 1e3:
        return f"{bytes_per_s / 1e3:.1f} KB/s"
    return f"{bytes_per_s:.0f} B/s"


def ratio(results: dict, file: str, num: str, den: str) -> float | None:
    a, b = results.get((file, num)), results.get((file, den))
    if not a or not b or "output_bytes" not in a or "output_bytes" not in b:
        return None
    return a["output_bytes"] / b["output_bytes"]


def table_rows(inputs: list[Input], configs: list[Config], results: dict) -> tuple[list[str], list[list[str]]]:
    """The one table, as a header and rows of strings (markdown and rich share them)."""
    header = ["file", "bytes", "English", "default model", *[c.label for c in configs],
              "cm / xz", "cm / PPMd o8", "cm / cm 1 lane (size)",
              "decompress / compress time (neural, hedge, cm, cm 1 lane)"]
    rows = []
    for item in inputs:
        size = f"{len(item.data):,}" + (f" of {item.file_bytes:,}" if item.truncated else "")
        cells = [item.name, size, item.english, item.training]
        for config in configs:
            r = results.get((item.name, config.key))
            if r is None:
                cells.append("-")
            elif "skipped" in r:
                cells.append(r["skipped"])
            else:
                lanes = f", {r['lanes']} lanes" if r.get("lanes", 1) != 1 else ""
                cells.append(f"{r['bpb']:.3f} ({speed_text(r['compress_bytes_per_s'])} / "
                             f"{speed_text(r['decompress_bytes_per_s'])}{lanes})")
        for den in ("xz", "ppmd8", "cm1"):
            value = ratio(results, item.name, DEFAULTS, den)
            cells.append("-" if value is None else f"{value:.3f}")
        times = []
        for key in DEFAULT_MODEL_CONFIGS:
            r = results.get((item.name, key))
            times.append(f"{r['decompress_over_compress']:.2f}" if r and "bpb" in r else "-")
        cells.append(" / ".join(times))
        rows.append(cells)
    return header, rows


def verdicts(inputs: list[Input], results: dict) -> list[str]:
    """Plain sentences: the size target on every English text, and the decompression-time target."""
    lines = []
    cut = [item.name for item in inputs if item.truncated]
    if cut:
        lines.append(f"Quick run: {len(cut)} of {len(inputs)} files were cut short, so every sentence below is about "
                     "prefixes, not the files.")
    names = {item.name for item in inputs}
    target = [f for f in TARGET_FILES if f in names]
    if target:
        misses, missing = [], []
        for f in target:
            rx, rp = ratio(results, f, DEFAULTS, "xz"), ratio(results, f, DEFAULTS, "ppmd8")
            if rx is None or rp is None:
                missing.append(f)
            elif not (rx < 1.0 and rp < 1.0):
                misses.append(f"{f} ({rx:.3f} of xz, {rp:.3f} of PPMd o8)")
        if missing:
            lines.append(f"Size target (ctxmix defaults (neural+n-gram+cm) < xz -9e and < PPMd o8 on every English text): "
                         f"not evaluated for {', '.join(missing)} (a config was not run).")
        elif misses:
            lines.append("Size target (ctxmix defaults (neural+n-gram+cm) < xz -9e and < PPMd o8 on every English text): "
                         f"MISSED on {', '.join(misses)}.")
        else:
            left_out = [f for f in TARGET_FILES if f not in names]
            scope = (f"on all {len(target)}" if not left_out else
                     f"on the {len(target)} run ({', '.join(target)}; not run: {', '.join(left_out)})")
            lines.append(f"Size target (ctxmix defaults (neural+n-gram+cm) < xz -9e and < PPMd o8 on every English text): "
                         f"holds {scope}, but the default model trained on 95% of each of these files "
                         "(docs/training.md), so this says little about unseen text.")
    for f in (SAMPLE_NAME, "enwik8.first1MB", "xargs.1"):
        rx, rp = ratio(results, f, DEFAULTS, "xz"), ratio(results, f, DEFAULTS, "ppmd8")
        if rx is not None and rp is not None:
            why = {SAMPLE_NAME: "held out: the default model never trained on it", "enwik8.first1MB":
                   "markup, seen in training", "xargs.1": "markup, held out"}[f]
            holds = "smaller than both" if rx < 1.0 and rp < 1.0 else "NOT smaller than both"
            r6 = ratio(results, f, DEFAULTS, "ppmd6")
            o6 = "" if r6 is None else f", {r6:.3f} of PPMd o6"
            lines.append(f"{f} ({why}): the defaults (neural+n-gram+cm) are {rx:.3f} of xz and {rp:.3f} of PPMd o8{o6}, "
                         f"{holds}.")
    timed_rows = [r for (f, key), r in results.items() if key in DEFAULT_MODEL_CONFIGS and "bpb" in r]
    if timed_rows:
        worst = max(timed_rows, key=lambda r: r["decompress_over_compress"])
        ok = all(r["decompress_over_compress"] <= 1.2 for r in timed_rows)
        for key in DEFAULT_MODEL_CONFIGS:
            rows = [r for r in timed_rows if r["config"] == key]
            if rows:
                rates = ", ".join(f"{r['file']} {r['compress_bytes_per_s']:,.0f}" for r in rows)
                total = sum(r["input_bytes"] for r in rows) / sum(r["compress_s"] for r in rows)
                tokens = sum(r["tokens"] for r in rows) / sum(r["compress_s"] for r in rows)
                back = sum(r["input_bytes"] for r in rows) / sum(r["decompress_s"] for r in rows)
                lines.append(f"Compression speed on CPU, {CONFIG_BY_KEY[key].label} (bytes/s): {rates}; "
                             f"overall {total:,.0f} bytes/s ({tokens:,.0f} tokens/s); decompression {back:,.0f} bytes/s.")
        lanes_cost = [(f, ratio(results, f, DEFAULTS, "cm1")) for f in {r["file"] for r in timed_rows}]
        lanes_cost = [(f, value) for f, value in lanes_cost if value is not None]
        if lanes_cost:
            lines.append("Size of lanes (cm at its default lanes over cm on 1 lane): " +
                         ", ".join(f"{f} {100 * (value - 1):+.2f}%" for f, value in sorted(lanes_cost)) + ".")
        lines.append(f"Decompression within 1.2x of compression time with the default model: {'yes' if ok else 'NO'} "
                     f"(largest ratio {worst['decompress_over_compress']:.2f}, {worst['file']} {worst['config']}).")
    return lines


def header_note(results: dict) -> list[str]:
    sizes = sorted({r["header_bytes"] for r in results.values() if "header_bytes" in r})
    if not sizes:
        return []
    span = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    return [(f"A .cmx header is {span} bytes (magic, lengths, 8-byte sha256 prefixes of input, tokenizer and model, "
             "lanes, threads, specs or the defaults' flag): counted in every ctxmix size (60 bytes = 0.12 bpb on "
             "4,000 bytes; format 2's were 145-205).")]


def notes(args, inputs: list[Input], results: dict) -> list[str]:
    out = []
    if args.max_bytes is not None:
        out.append(f"Every file is cut to its first {args.max_bytes:,} bytes (UTF-8 files at the character boundary "
                   "before that); 'bytes' shows the length used and the file's length.")
    out += [
        ("Cells: bits per byte of the real compressed output (its compression speed, wall time, "
         f"classical: median of {args.repeats} runs; ctxmix: {args.ctxmix_repeats} run(s) after a warm-up, "
         f"torch threads {args.threads}, coding itself on one; {args.jobs} ctxmix run(s) at once, each on "
         "its own core). ctxmix sizes are whole .cmx files, header included; each was "
         "decompressed and compared byte for byte with the input."),
        *header_note(results),
        ("PPMd: pyppmd's Ppmd7 (var. H) raw stream, 256 MB; its length is not stored in it (a container would add "
         "a few bytes), so PPMd sizes are, if anything, slightly flattering."),
        ("'default model': 'seen' = the shipped neural model trained on 95% of this file (docs/training.md), so "
         "its neural columns are not a fair compression result; 'held out' = never in its training data. "
         f"{SAMPLE_NAME} is the package's FineWeb sample (ctxmix/data/assets/sample.txt)."),
        ("English: the Canterbury corpus's English-text files; xargs.1 (troff man page) and enwik8 (MediaWiki XML) "
         "are markup formats and not counted for the size target (their ratios are shown anyway)."),
        "'not UTF-8': ctxmix compresses text mode only and refuses the file (cp.html is ISO-8859-1, sum is a binary).",
        ("Ratio columns: .cmx size of the defaults (neural+n-gram+cm) over the xz / PPMd o8 size (< 1: ctxmix "
         "smaller). Last column: decompression time over compression time for ctxmix neural / +hedge / +cm."),
    ]
    return out


def markdown(header: list[str], rows: list[list[str]], machine: dict, args, inputs, results, verdict_lines) -> str:
    v = machine["versions"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores, torch threads {machine['torch_threads']}.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        *(f"- {n}" for n in notes(args, inputs, results)),
        "",
        *(f"- {line}" for line in verdict_lines),
    ]
    return "\n".join(lines) + "\n"


def write_chart(path: Path, inputs: list[Input], configs: list[Config], results: dict, truncated_to: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ctxmix.atomic import atomic_output

    files = [item.name for item in inputs]
    width = 0.8 / max(len(configs), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(files) + 3), 5.5))
    x = np.arange(len(files))
    for k, config in enumerate(configs):
        values = [results.get((f, config.key), {}).get("bpb", np.nan) for f in files]
        offset = (k - (len(configs) - 1) / 2) * width
        ax.bar(x + offset, values, width, label=config.label,
               hatch="//" if config.kind == "ctxmix" else None, edgecolor="white" if config.kind == "ctxmix" else None)
        for j, f in enumerate(files):
            if "skipped" in results.get((f, config.key), {}):
                ax.text(x[j] + offset, 0.05, "not UTF-8", rotation=90, ha="center", va="bottom", fontsize=6)
    labels = [f"{item.name}\n({'seen' if item.training == 'seen' else item.training})" for item in inputs]
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("bits per byte (real compressed size)")
    title = "ctxmix compress vs classical compressors"
    if truncated_to is not None:
        title += f" (first {truncated_to:,} bytes of each file)"
    ax.set_title(title + "\n'seen': the default model trained on this file (docs/training.md); hatched: ctxmix", fontsize=10)
    top = max((r["bpb"] for r in results.values() if "bpb" in r), default=1.0)
    ax.set_ylim(0, top * 1.3)  # headroom for the legend above the bars
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_output(path) as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


def print_rich(console: Console, header, rows, machine, args, inputs, results, verdict_lines) -> None:
    v = machine["versions"]
    console.print(f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores, "
                  f"torch threads {machine['torch_threads']}")
    console.print("Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    title = "bits per byte (compression speed)"
    if args.max_bytes is not None:
        title += f", first {args.max_bytes:,} bytes of each file"
    table = Table(title=title, show_lines=False)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i in (0, 2, 3) else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for note in notes(args, inputs, results):
        console.print(f"- {note}")
    for line in verdict_lines:
        console.print(f"- {line}")


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs="+", metavar="NAME",
                        help=f"files in --text-dir (by name), {SAMPLE_NAME}, or paths (default: all of them)")
    parser.add_argument("--text-dir", type=Path, default=TEXT_DIR, help=f"folder of the named files (default {TEXT_DIR})")
    parser.add_argument("--configs", nargs="+", metavar="KEY", choices=list(CONFIG_BY_KEY),
                        help="compressors to run: " + ", ".join(CONFIG_BY_KEY) + " (default: all)")
    parser.add_argument("--max-bytes", type=int, default=None, help="cut each file to its first N bytes (quick runs)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per classical figure (median)")
    parser.add_argument("--ctxmix-repeats", type=int, default=1, help="runs per ctxmix figure (median)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads for the neural model")
    parser.add_argument("--jobs", type=int, default=1,
                        help="ctxmix runs in this many processes at once (one per core; classical runs stay alone)")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--markdown", type=Path, help="write the table (markdown) to this file")
    parser.add_argument("--chart", type=Path, help="write a bar chart (PNG) of bpb per file per compressor")
    args = parser.parse_args(argv)
    if args.max_bytes is not None and args.max_bytes < 1:
        parser.error("--max-bytes must be >= 1")
    if args.repeats < 1 or args.ctxmix_repeats < 1 or args.threads < 1:
        parser.error("--repeats, --ctxmix-repeats and --threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the comparison; print the table; return the JSON object (also written with --json)."""
    args = parse_args(argv)
    log = Console(stderr=True, highlight=False)
    if not log.is_terminal:  # logs: one line per message
        log = Console(stderr=True, highlight=False, width=200)
    configs = [CONFIG_BY_KEY[k] for k in args.configs] if args.configs else list(CONFIGS)
    configs = [c for c in CONFIGS if c in configs]  # canonical column order
    inputs = find_inputs(args.files, args.max_bytes, args.text_dir)
    if any(c.kind == "ctxmix" for c in configs):
        import torch

        torch.set_num_threads(args.threads)
    machine = machine_info(args.threads)
    log.log(f"{len(inputs)} inputs, {len(configs)} compressors; {machine['cpu']}, {machine['logical_cores']} cores")

    results: dict[tuple[str, str], dict] = {}
    warmups: dict[str, float] = {}
    ctxmix_tasks = []
    for i, item in enumerate(inputs, 1):
        for config in configs:
            where = f"[{i}/{len(inputs)}] {item.name} ({len(item.data):,} bytes): {config.label}"
            if config.kind == "classical":  # fast: run first, alone, so that their timings are not shared
                log.log(f"{where} ...")
                results[(item.name, config.key)] = _logged(log, where, run_classical(item, config, args.repeats))
            elif not item.utf8:
                results[(item.name, config.key)] = {"file": item.name, "config": config.key, "label": config.label,
                                                    "kind": config.kind, "skipped": "not UTF-8"}
                log.log(f"{where}: not UTF-8, skipped")
            else:
                ctxmix_tasks.append((where, item, config))
    warm_source = next((item.data for item in inputs if item.utf8), b"")
    if args.jobs <= 1:
        with tempfile.TemporaryDirectory(prefix="ctxmix_compare_") as tmp:
            for where, item, config in ctxmix_tasks:
                results[(item.name, config.key)] = _ctxmix_task(where, item, config, warm_source, args, Path(tmp), warmups)
    else:  # one process per core, the longest inputs first so that the last ones finish together
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctxmix_tasks.sort(key=lambda task: -len(task[1].data))
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(args.threads,)) as pool:
            futures = {pool.submit(_ctxmix_worker, where, item, config, warm_source, args): (item, config)
                       for where, item, config in ctxmix_tasks}
            for future, (item, config) in futures.items():
                results[(item.name, config.key)], warmup_s = future.result()
                warmups.setdefault(config.key, warmup_s)

    header, rows = table_rows(inputs, configs, results)
    verdict_lines = verdicts(inputs, results)
    from ctxmix.report import stdout_console

    print_rich(stdout_console(), header, rows, machine, args, inputs, results, verdict_lines)
    report = {
        "machine": machine,
        "options": {"max_bytes": args.max_bytes, "repeats": args.repeats, "ctxmix_repeats": args.ctxmix_repeats,
                    "threads": args.threads, "jobs": args.jobs, "ppmd_mem_bytes": PPMD_MEM, "configs": [c.key for c in configs]},
        "inputs": [{"name": item.name, "path": str(item.path), "bytes": len(item.data), "file_bytes": item.file_bytes,
                    "utf8": item.utf8, "english": item.english, "default_model_training": item.training}
                   for item in inputs],
        "warmup_s": warmups,
        "results": list(results.values()),
        "ratios": {item.name: {f"{DEFAULTS}_over_{den}": ratio(results, item.name, DEFAULTS, den)
                               for den in ("xz", "ppmd6", "ppmd8")} for item in inputs},
        "verdicts": verdict_lines,
        "table": {"header": header, "rows": rows},
    }
    from ctxmix.atomic import write_text_atomic

    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    if args.markdown:
        write_text_atomic(args.markdown, markdown(header, rows, machine, args, inputs, results, verdict_lines))
    if args.chart:
        write_chart(args.chart, inputs, configs, results, args.max_bytes)
    return report


if __name__ == "__main__":
    try:
        main()
    except CtxmixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
