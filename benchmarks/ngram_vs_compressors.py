"""n-gram expert throughput and memory, and n-gram-only ctxmix against classical compressors.

Run from the repository root (reads ../shared/data, which the package itself never does):

    python benchmarks/ngram_vs_compressors.py [--repeats 5] [--out docs/benchmarks_ngram.md] [--speed-only]

Prints the machine, library versions and three tables (markdown); every figure is a median of --repeats
runs made side by side in this one process. The third table times the whole public path
(``ctxmix.score([file], experts=["ngram"], mixers=["none"])``: lossless tokenization, its roundtrip
check, the engine) against pyppmd's PPMd order 6, interleaved repeat by repeat so that both see the same
machine load, with the n-gram expert on two threads (its default) and on one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from ctxmix.bench import PPMD_MEM, compare_compressors, expert_throughput, machine_line
from ctxmix.data import load_shards, load_text

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXTS = ["alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt", "enwik8.first1MB"]
# the default, the same on one thread (the target's "one core"), short orders, hashed tables
NGRAM_SPECS = ["ngram:orders=2-11,table=exact", "ngram:orders=2-11,table=exact,threads=1",
               "ngram:orders=2-6,table=exact", "ngram:orders=2-11,table=hashed"]


def versions() -> str:
    import numba
    import pyppmd
    import zstandard

    return f"numba {numba.__version__}, pyppmd {pyppmd.__version__}, zstandard {zstandard.__version__}"


def throughput_table(repeats: int) -> list[str]:
    shard = load_shards(str(SHARED / "fineweb" / "fineweb_val_000003.bin"), max_tokens=1_000_000)
    enwik = load_text(SHARED / "text" / "enwik8.first1MB")
    lines = ["| expert | stream | tokens | tokens/s | table MB | stored entries | bytes/entry |",
             "|---|---|---|---|---|---|---|"]
    for spec in NGRAM_SPECS:
        for name, stream in (("fineweb_val_000003 (1M)", shard), ("enwik8.first1MB", enwik)):
            tokens = stream.tokens
            if "hashed" in spec:  # O(V) per order per token: time a shorter prefix
                tokens = tokens[:50_000]
            s = expert_throughput(spec, tokens, stream.vocab_size, repeats if "hashed" not in spec else 1, name)
            per_entry = f"{s.bytes_per_entry:.1f}" if s.bytes_per_entry else "-"
            entries = f"{s.stored_entries:,}" if s.stored_entries else "-"
            lines.append(f"| `{spec}` | {name} | {s.tokens:,} | {s.tokens_per_s:,.0f} | {s.memory_bytes / 1e6:.1f} "
                         f"| {entries} | {per_entry} |")
    return lines


def compressor_table(repeats: int) -> list[str]:
    paths = [SHARED / "text" / name for name in TEXTS]
    figures = compare_compressors(paths, experts=["ngram"], mixers=["none"], repeats=repeats, label="ctxmix ngram")
    names = list(dict.fromkeys(f.name for f in figures))
    lines = ["| file | " + " | ".join(names) + " | ctxmix / PPMd o6 (bytes/s) |",
             "|---|" + "---|" * (len(names) + 1)]
    for file in dict.fromkeys(f.file for f in figures):
        row = {f.name: f for f in figures if f.file == file}
        cells = [f"{row[n].bpb:.3f} ({row[n].mb_per_s:.2f} MB/s)" for n in names]
        ratio = row["ctxmix ngram"].mb_per_s / row["PPMd o6"].mb_per_s
        lines.append(f"| {file} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    return lines


def speed_table(repeats: int) -> list[str]:
    """Whole-path bytes/s of n-gram-only ``ctxmix.score`` against PPMd o6, repeat by repeat."""
    import pyppmd

    import ctxmix

    def timed(fn) -> tuple[float, object]:
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    lines = [("| file | bytes | PPMd o6 ms | ctxmix ms, 2 threads | ratio | ctxmix ms, 1 thread | ratio "
              "| of which load_text ms | bpb ctxmix / PPMd o6 |"), "|---|---|---|---|---|---|---|---|---|"]
    for name in TEXTS:
        path = SHARED / "text" / name
        data = path.read_bytes()
        runs = {"ppmd": [], "two": [], "one": [], "load": []}
        for spec in ("ngram", "ngram:threads=1"):
            ctxmix.score([path], experts=[spec], mixers=["none"])  # JIT warm-up
        bits = {}
        for _ in range(repeats):
            seconds, packed = timed(lambda data=data: pyppmd.compress(data, max_order=6, mem_size=PPMD_MEM))
            runs["ppmd"].append(seconds)
            for key, spec in (("two", "ngram"), ("one", "ngram:threads=1")):
                seconds, report = timed(lambda path=path, spec=spec: ctxmix.score([path], experts=[spec],
                                                                                  mixers=["none"]))
                runs[key].append(seconds)
                bits[key] = report.runs[-1]["bits"]
            runs["load"].append(timed(lambda path=path: load_text(path))[0])
        assert bits["one"] == bits["two"], "threads must not change a number"
        ms = {key: 1e3 * statistics.median(values) for key, values in runs.items()}
        ratio_two, ratio_one = ms["ppmd"] / ms["two"], ms["ppmd"] / ms["one"]
        lines.append(f"| {name} | {len(data):,} | {ms['ppmd']:.1f} | {ms['two']:.1f} | {ratio_two:.2f}x "
                     f"| {ms['one']:.1f} | {ratio_one:.2f}x | {ms['load']:.1f} "
                     f"| {bits['two'] / len(data):.4f} / {8 * len(packed) / len(data):.4f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--speed-only", action="store_true", help="only the ctxmix / PPMd o6 speed table")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"error: {SHARED} not found (benchmarks read the shared data beside the checkout)", file=sys.stderr)
        return 1
    out = [f"Machine: {machine_line()}", f"Libraries: {versions()}", ""]
    if not args.speed_only:
        out += ["### n-gram expert, fast path (after JIT warm-up)", "", *throughput_table(args.repeats), "",
                "### bits per byte (compression speed), n-gram only vs classical compressors", "",
                *compressor_table(args.repeats), ""]
    out += ["### bytes/s of `ctxmix.score(..., experts=['ngram'], mixers=['none'])` against PPMd o6", "",
            *speed_table(args.repeats), ""]
    text = "\n".join(out)
    print(text)
    if args.out:
        from ctxmix.atomic import write_text_atomic

        write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
