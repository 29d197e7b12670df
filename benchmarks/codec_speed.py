"""``ctxmix compress`` / ``decompress`` speed and size by lane count, with the default experts and mixer.

Run from the repository root (reads ../shared/data/text, or the paths given; the package never does):

    python benchmarks/codec_speed.py                                   # the >= 256 KB texts, 1 lane and the default
    python benchmarks/codec_speed.py --files lcet10.txt --lanes 1 16 64 --repeats 3 --threads 1 2
    python benchmarks/codec_speed.py --files plrabn12.txt --lanes 1 --no-decompress   # size of one lane only
    python benchmarks/codec_speed.py --files lcet10.txt --experts ngram --mixer none --lanes 1 64 --independent 64
    python benchmarks/codec_speed.py --files path/to/lcet10.txt --model wide.ptz --profile   # on a GPU machine

Each (file, lanes, threads) runs ``ctxmix.codec.compress`` then ``decompress`` ``--repeats`` times after one
warm-up on a short prefix (JIT compilation, model load); the decompressed bytes must equal the input. The
table gives medians: kB/s each way (1 kB = 1000 bytes of input), the decompress/compress time ratio, the
.cmx size and its header, and the size against the 1-lane file of the same text when that is in the run
(or given with ``--one-lane-bytes NAME=BYTES`` from an earlier run). Progress goes to stderr; the machine,
the versions and the table to stdout; ``--json`` writes every figure.

``--independent K``: also cut each text into K contiguous pieces (at line ends) and compress each as a file of
its own on one lane, summing their payloads: what lanes would cost if nothing were shared between them (the
n-gram tables and the mixer's weights are shared; the neural context is per lane either way).

``--model PATH``: the neural expert's artifact (default experts otherwise). On a machine with a CUDA device
the neural expert computes there (its ``device=auto``), and the lanes run its float step. ``--profile``: the
compressions' time split between the lane engine's components (each expert's and the mixer's rows and
updates; the rest is the coder, the checks and the tokenizer). ``--kernels``: the CPU time of each numba kernel
and of the integer matmuls, on whichever thread calls them, and the process's CPU time beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT_DIR = REPO.parent / "shared" / "data" / "text"
sys.path.insert(0, str(REPO))

LARGE_TEXTS = ("lcet10.txt", "plrabn12.txt", "enwik8.first1MB")  # the UTF-8 texts of 256 KB or more
WARMUP_BYTES = 2000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict:
    import numba
    import numpy
    import torch

    from ctxmix.bench import cpu_name
    from ctxmix.kernels import amx

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "logical_cores": os.cpu_count(), "amx_tiles": amx.available(), "gpu": gpu,
            "python": platform.python_version(),
            "versions": {"numpy": numpy.__version__, "numba": numba.__version__, "torch": torch.__version__},
            "load_average": os.getloadavg()}


def run_one(path: Path, lanes: int | None, threads: int, decompress_too: bool, work: Path, experts=None,
            mixer=None) -> dict:
    """One compression (and decompression) of ``path``: its sizes and times."""
    from ctxmix.codec import compress, decompress

    packed, restored = work / "x.cmx", work / "x.out"
    original = path.read_bytes()
    start = time.perf_counter()
    result = compress(path, packed, lanes=lanes, threads=threads, experts=experts, mixers=mixer)
    comp = time.perf_counter() - start
    decomp = float("nan")
    if decompress_too:
        start = time.perf_counter()
        back = decompress(packed, restored)
        decomp = time.perf_counter() - start
        if restored.read_bytes() != original or back.lanes != result.lanes:
            raise RuntimeError(f"{path.name}: the decompressed file differs from the input")
    n = len(original)
    return {"file": path.name, "bytes": n, "tokens": result.tokens, "lanes": result.lanes, "threads": threads,
            "file_bytes": result.file_bytes, "header_bytes": result.header_bytes, "payload_bytes": result.payload_bytes,
            "bpb": result.bpb, "model_bpb": result.model_bpb, "compress_s": comp, "decompress_s": decomp,
            "compress_kB_per_s": n / comp / 1000, "decompress_kB_per_s": n / decomp / 1000,
            "decompress_over_compress": decomp / comp}


def _median_row(rows: list[dict]) -> dict:
    """One row from single runs of the same set-up: medians of the times, the runs kept."""
    row = dict(rows[0])
    n = row["bytes"]
    comp = statistics.median(r["compress_s"] for r in rows)
    decomp = statistics.median(r["decompress_s"] for r in rows)
    row.update(compress_s=comp, decompress_s=decomp, compress_runs_s=[r["compress_s"] for r in rows],
               decompress_runs_s=[r["decompress_s"] for r in rows], compress_kB_per_s=n / comp / 1000,
               decompress_kB_per_s=n / decomp / 1000, decompress_over_compress=decomp / comp)
    return row


class Profile:
    """Seconds spent in each lane component's ``lanes_distributions`` and ``lanes_observe`` (by class), in the
    neural expert's model steps worked ahead (on either thread) and in the coding thread's waits for them
    (with the steps it took over meanwhile), while installed: the methods are wrapped on their classes, so the
    objects compress builds are timed too."""

    clock = staticmethod(time.perf_counter)

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.saved = []
        self.lock = threading.Lock()

    def _wrap(self, owner, attribute: str, name: str):
        """Replace ``owner.attribute`` (a method on its class, a function in its module) by a timed call of
        it, adding ``clock``'s seconds to ``seconds[name]``; ``__exit__`` puts it back."""
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = self.clock()
            try:
                return original(*args, **kwargs)
            finally:
                with self.lock:  # (the model's steps are timed on both threads)
                    self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - start

        setattr(owner, attribute, timed)
        self.saved.append((owner, attribute, original))

    def __enter__(self):
        from ctxmix.experts.neural import NeuralExpert
        from ctxmix.experts.ngram import NgramExpert
        from ctxmix.lanes import LaneEngine
        from ctxmix.mixers.cm import CMMixer

        for cls in (NeuralExpert, NgramExpert, CMMixer):
            for method in ("lanes_distributions", "lanes_observe"):
                self._wrap(cls, method, cls.__name__)
        self._wrap(NeuralExpert, "lanes_prepare", "neural steps ahead (either thread)")
        self._wrap(LaneEngine, "_wait", "coding thread: waits and the steps it took")
        return self

    def __exit__(self, *exc):
        for owner, attribute, original in reversed(self.saved):
            setattr(owner, attribute, original)


class KernelProfile(Profile):
    """CPU seconds of the calling thread (``time.thread_time``: no waits) in each numba kernel the lane engine's
    components call, and in the neural step's integer matmuls, while installed; and the process's CPU seconds
    (both threads), so that what is left outside the kernels (Python, the coder, the engine) shows. Kernels are
    wrapped where their callers look them up (the modules' names for them), so the objects compress builds
    call the wrappers, on either thread."""

    CALLERS = ("ctxmix.mixers.cm", "ctxmix.experts.ngram", "ctxmix.experts.neural", "ctxmix.models.integer",
               "ctxmix.codec")
    clock = staticmethod(time.thread_time)

    def __init__(self):
        super().__init__()
        self.process_seconds = 0.0

    def __enter__(self):
        import importlib

        from numba.core.dispatcher import Dispatcher

        from ctxmix.models.integer import IntegerWeights

        for module_name in self.CALLERS:
            module = importlib.import_module(module_name)
            for name, value in vars(module).copy().items():
                if isinstance(value, Dispatcher):
                    self._wrap(module, name, name)
        self._wrap(IntegerWeights, "sums", "integer matmuls (AMX tiles or torch._int_mm)")
        self.started = time.process_time()
        return self

    def __exit__(self, *exc):
        self.process_seconds += time.process_time() - self.started
        super().__exit__(*exc)


@contextlib.contextmanager
def ahead_setting(ahead: bool):
    """The lane engine with or without its second thread (``LaneEngine(ahead=...)``) for the runs inside."""
    from ctxmix.lanes import LaneEngine

    original = LaneEngine.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "ahead": ahead})

    LaneEngine.__init__ = init
    try:
        yield
    finally:
        LaneEngine.__init__ = original


def independent_payload(path: Path, pieces: int, work: Path, experts, mixer) -> int:
    """Payload bytes of ``path`` cut into ``pieces`` contiguous parts (at line ends), each compressed alone on one lane."""
    from ctxmix.codec import compress

    data = path.read_bytes()
    cuts = [0]
    for k in range(1, pieces):
        at = data.find(b"\n", len(data) * k // pieces)
        cuts.append(len(data) if at < 0 else at + 1)
    cuts.append(len(data))
    total = 0
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        if b <= a:
            continue
        piece = work / f"piece{k}.txt"
        piece.write_bytes(data[a:b])
        result = compress(piece, work / "piece.cmx", lanes=1, experts=experts, mixers=mixer)
        total += result.payload_bytes
    return total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs="+", default=list(LARGE_TEXTS), help="names in --text-dir, or paths")
    parser.add_argument("--text-dir", type=Path, default=TEXT_DIR)
    parser.add_argument("--lanes", nargs="+", type=int, default=[1, 0], help="lane counts (0: the default for the length)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1], help="torch threads of the coding loop")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-decompress", action="store_true", help="compress only (sizes, compression speed)")
    parser.add_argument("--one-lane-bytes", nargs="*", default=[], metavar="NAME=BYTES",
                        help="1-lane .cmx sizes from an earlier run, for the size column")
    parser.add_argument("--experts", nargs="+", default=None, help="expert specs (default: compress's)")
    parser.add_argument("--mixer", default=None, help="mixer spec (default: compress's)")
    parser.add_argument("--independent", type=int, default=0, metavar="K",
                        help="also code K pieces of each text as separate one-lane files (nothing shared)")
    parser.add_argument("--ahead", choices=["on", "off", "both"], default="on",
                        help="the lane engine's second thread (both: each run with and without, alternating)")
    parser.add_argument("--model", default=None, help="the neural expert's artifact (default: the shipped model)")
    parser.add_argument("--profile", action="store_true", help="time split between the lane engine's components")
    parser.add_argument("--kernels", action="store_true",
                        help="CPU time in each numba kernel and the integer matmuls, and outside them")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.model is not None and args.experts is None:
        args.experts = [f"neural:model={args.model}", "ngram"]

    import torch

    from ctxmix.codec import compress

    torch.set_num_threads(1)
    info = machine()
    print(f"Machine: {info['cpu']}, {info['logical_cores']} logical cores, GPU {info['gpu'] or 'none'}, load average at start "
          f"{', '.join(f'{x:.2f}' for x in info['load_average'])}")
    print("Versions: python " + info["python"] + ", " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    paths = [Path(f) if Path(f).is_file() else args.text_dir / f for f in args.files]
    one_lane = {k: int(v) for k, v in (item.split("=", 1) for item in args.one_lane_bytes)}
    one_lane_payload: dict[str, int] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="ctxmix_codec_speed_") as tmp:
        work = Path(tmp)
        warm = work / "warm.txt"
        warm.write_bytes(paths[0].read_bytes()[:WARMUP_BYTES])
        for threads in args.threads:
            compress(warm, work / "warm.cmx", lanes=4, threads=threads, experts=args.experts,
                     mixers=args.mixer)  # JIT, model load, thread pool
        for path in paths:
            for lanes in args.lanes:
                for threads in args.threads:
                    log(f"{path.name}: lanes {lanes or 'default'}, threads {threads} ...")
                    settings = {"on": [True], "off": [False], "both": [True, False]}[args.ahead]
                    profile = Profile() if args.profile else contextlib.nullcontext()
                    kernels = KernelProfile() if args.kernels else contextlib.nullcontext()
                    runs = {ahead: [] for ahead in settings}
                    with profile, kernels:
                        for _ in range(args.repeats):  # alternating, so both settings see the same machine
                            for ahead in settings:
                                with ahead_setting(ahead):
                                    runs[ahead].append(run_one(path, lanes or None, threads, not args.no_decompress,
                                                               work, args.experts, args.mixer))
                    if len(settings) > 1:
                        for ahead in settings:
                            log(f"  ahead {'on' if ahead else 'off'}: compress "
                                + " ".join(f"{r['compress_kB_per_s']:.2f}" for r in runs[ahead]) + " kB/s, decompress "
                                + " ".join(f"{r['decompress_kB_per_s']:.2f}" for r in runs[ahead]) + " kB/s")
                    row = _median_row(runs[settings[0]])
                    if args.profile:
                        # both directions ran every component once per repeat: us per coded token and direction
                        runs = args.repeats * len(settings) * (1 if args.no_decompress else 2)
                        row["profile_us_per_token"] = {k: 1e6 * v / runs / row["tokens"] for k, v in profile.seconds.items()}
                        total = 1e6 * (row["compress_s"] + (0 if args.no_decompress else row["decompress_s"])) / (
                            (1 if args.no_decompress else 2) * row["tokens"])
                        parts = ", ".join(f"{k} {v:.1f}" for k, v in row["profile_us_per_token"].items())
                        log(f"  us a token (one direction): {parts}; all {total:.1f}")
                    if args.kernels:
                        directions = args.repeats * len(settings) * (1 if args.no_decompress else 2)
                        per_token = 1e6 / (directions * row["tokens"])
                        row["kernels_cpu_us_per_token"] = {k: v * per_token for k, v in kernels.seconds.items()}
                        row["process_cpu_us_per_token"] = process = kernels.process_seconds * per_token
                        ranked = sorted(row["kernels_cpu_us_per_token"].items(), key=lambda item: -item[1])
                        inside = sum(row["kernels_cpu_us_per_token"].values())
                        log("  CPU us a token (one direction), by kernel: "
                            + ", ".join(f"{k} {v:.1f}" for k, v in ranked if v >= 0.05)
                            + f"; kernels {inside:.1f}, process {process:.1f} (both threads; outside the kernels "
                              f"{process - inside:.1f})")
                    if row["lanes"] == 1:
                        one_lane.setdefault(path.name, row["file_bytes"])
                        one_lane_payload.setdefault(path.name, row["payload_bytes"])
                    rows.append(row)
                    log(f"  {row['lanes']} lanes: {row['file_bytes']:,} bytes, compress {row['compress_kB_per_s']:.2f} kB/s, "
                        f"decompress {row['decompress_kB_per_s']:.2f} kB/s")
        if args.independent:
            for path in paths:
                log(f"{path.name}: {args.independent} pieces, each on its own ...")
                payload = independent_payload(path, args.independent, work, args.experts, args.mixer)
                base = one_lane_payload.get(path.name)
                versus = f" ({100 * (payload / base - 1):+.2f}% vs the whole file's on 1 lane)" if base else ""
                print(f"- {path.name}: {args.independent} pieces coded as separate files (nothing shared): "
                      f"{payload:,} payload bytes{versus}")
                rows.append({"file": path.name, "independent_pieces": args.independent, "payload_bytes": payload})
    print("| file | bytes | tokens | lanes | threads | .cmx bytes | header | bpb | vs 1 lane | compress kB/s | "
          "decompress kB/s | decompress / compress |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "lanes" not in r:
            continue
        base = one_lane.get(r["file"])
        versus = f"{100 * (r['file_bytes'] / base - 1):+.2f}%" if base else "n/a"
        print(f"| {r['file']} | {r['bytes']:,} | {r['tokens']:,} | {r['lanes']} | {r['threads']} | {r['file_bytes']:,} | "
              f"{r['header_bytes']} | {r['bpb']:.4f} | {versus} | {r['compress_kB_per_s']:.2f} | "
              f"{r['decompress_kB_per_s']:.2f} | {r['decompress_over_compress']:.2f} |")
    report = {"machine": info, "rows": rows, "one_lane_bytes": one_lane}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
