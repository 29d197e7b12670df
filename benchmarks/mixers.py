"""Every mixer on every stream: bits per byte, the mixer's own cost per token, and a plot of cm's weights.

Streams (each with its own fresh experts, a neural model and ``ngram``):
  - every UTF-8 text in ``--data``/text (default ../shared/data/text) and the sample shipped in the package,
    with the shipped model (its training length as window, stride 64, as ``ctxmix score`` runs it);
  - the first 131,072 targets of ``fineweb_val_000003.bin`` with the shipped model, samtruss_7L384d_c839523
    (window 512) and montysteele_6Lx2_adapters_6bit_dc69b08 (window 1024), stride 128 for all three.

One engine pass per stream computes each expert once and feeds every mixer (``ctxmix.run.run_stream``), so
every row of a stream sees the same expert outputs. Cost per token is the mixer's own time, measured after
the pass on recorded inputs, median of ``--repeats`` runs, one thread: p(target) rows through ``mix_logp``
for the mixers that have a fast path, full rows (the first ``--cost-positions`` positions) through
``mix_full`` for the others.

    python benchmarks/mixers.py --json /tmp/mixers.json --markdown /tmp/mixers.md --plot docs/mixing_weights.png
    python benchmarks/mixers.py --streams sample --max-tokens 8192          # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctxmix.components import build_experts, build_mixers  # noqa: E402
from ctxmix.data import load_shards, load_text, sample_text_path  # noqa: E402
from ctxmix.metric import bits_per_byte  # noqa: E402
from ctxmix.run import run_stream  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data"
FINEWEB = "fineweb/fineweb_val_000003.bin"
FINEWEB_TARGETS = 131_072
MODELS = {  # name -> (artifact under --data, or "default"; neural options)
    "shipped": ("default", {"stride": 128}),
    "samtruss": ("artifacts/samtruss_7L384d_c839523.int8.ptz", {"window": 512, "stride": 128}),
    "montysteele": ("artifacts/montysteele_6Lx2_adapters_6bit_dc69b08.int8.ptz", {"window": 1024, "stride": 128}),
}
MIXERS = [
    "hedge",
    "fixedshare",
    "geometric:select=order,lr=0.003",
    "pr909",
    "tilt",
    "tilt:boosts=0;1;2;3;4",
    "cm",
    "cm:layers=1",
    "cm:sse=false",
    "cm:contexts=false",
    "cm:bias_lr=0",
    "cm:bias_lr=0.3,bias_decay=0.999",
    "cm:token_lr=0",
    "cm:stretch_lr=0",
    "cm:geometric=false",
]
COST_CHUNK = 256  # positions per mix call when timing, as the engine's full path runs


@dataclass
class Stream:
    name: str  # table label
    load: object  # () -> ctxmix.stream.Stream
    experts: list[str]


def find_streams(data: Path, chosen: list[str] | None, max_tokens: int | None) -> list[Stream]:
    def text(path):
        return lambda: _cut(load_text(path), max_tokens)

    streams = []
    text_dir = data / "text"
    for path in sorted(text_dir.iterdir()) if text_dir.is_dir() else []:
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue  # cp.html and sum: not text mode's input
        streams.append(Stream(path.name, text(path), ["neural", "ngram"]))
    streams.append(Stream("sample", text(sample_text_path()), ["neural", "ngram"]))
    shard = data / FINEWEB
    for model, (artifact, options) in MODELS.items():
        path = artifact if artifact == "default" else str(data / artifact)
        spec = "neural:model=" + path + "".join(f",{k}={v}" for k, v in options.items())
        n = min(FINEWEB_TARGETS, max_tokens or FINEWEB_TARGETS)
        streams.append(Stream(f"fineweb/{model}", lambda n=n: load_shards(str(shard), max_tokens=n), [spec, "ngram"]))
    if chosen:
        streams = [s for s in streams if any(s.name == c or s.name.startswith(c + "/") for c in chosen)]
    return streams


def _cut(stream, max_tokens):
    return stream.prefix(max_tokens + 1) if max_tokens else stream


class Recorder:
    """Stands in front of one full-path mixer and keeps the first ``limit`` rows it is given (for timing)."""

    def __init__(self, mixer, limit: int):
        self.mixer, self.limit = mixer, limit
        self.p, self.targets, self.features = [], [], []
        self.kept = 0

    def __getattr__(self, name):
        return getattr(self.mixer, name)

    def mix_full(self, p, targets, features):
        if self.kept < self.limit:
            take = min(len(targets), self.limit - self.kept)
            self.p.append(p[:take].copy())
            self.targets.append(targets[:take].copy())
            self.features.append([{k: v[:take].copy() for k, v in f.items()} for f in features])
            self.kept += take
        return self.mixer.mix_full(p, targets, features)

    def rows(self):
        p = np.concatenate(self.p)
        targets = np.concatenate(self.targets)
        features = [{k: np.concatenate([part[i][k] for part in self.features]) for k in self.features[0][i]}
                    for i in range(len(self.features[0]))]
        return p, targets, features


def mixer_cost(spec: str, experts: list[str], fast_inputs, full_inputs, repeats: int) -> tuple[str, float]:
    """(path, median microseconds per token) of one mixer on recorded inputs."""
    from ctxmix.mixers import registry

    mixer = registry.build(spec, experts=experts)
    if mixer.linear:
        logp, features = fast_inputs
        path, run = "fast", lambda: [mixer.mix_logp(logp[i:i + 65536], _rows(features, i, i + 65536))
                                     for i in range(0, len(logp), 65536)]
        n = len(logp)
    else:
        p, targets, features = full_inputs
        path, run = "full", lambda: [mixer.mix_full(p[i:i + COST_CHUNK], targets[i:i + COST_CHUNK],
                                                    _rows(features, i, i + COST_CHUNK))
                                     for i in range(0, len(targets), COST_CHUNK)]
        n = len(targets)
    times = []
    for _ in range(repeats + 1):  # the first run compiles and warms up: not counted
        mixer.begin()
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return path, statistics.median(times[1:]) / n * 1e6


def _rows(features, lo, hi):
    return [{k: v[lo:hi] for k, v in f.items()} for f in features]


def run_one(stream: Stream, repeats: int, cost_positions: int) -> dict:
    loaded = stream.load()
    experts = build_experts(stream.experts, loaded.vocab_size)
    expert_specs = [e.spec for e in experts]
    _, mixers = build_mixers(MIXERS, experts)
    recorder = Recorder(next(m for m in mixers if not m.linear), cost_positions)
    engine_mixers = [recorder if m is recorder.mixer else m for m in mixers]
    started = time.perf_counter()
    result = run_stream(loaded, experts, engine_mixers, keep_trace=True)
    seconds = time.perf_counter() - started
    rows = []
    for label, bits in result.bits.items():
        rows.append({"stream": stream.name, "label": label, "bits": bits, "bpb": bits_per_byte(bits, result.nbytes)})
    fast_inputs = (result.expert_logp, result.expert_features)
    full_inputs = recorder.rows()
    for row in rows[len(experts):]:
        spec = row["label"]
        row["path"], row["us_per_token"] = mixer_cost(spec, expert_specs, fast_inputs, full_inputs, repeats)
    best = min(r["bpb"] for r in rows[: len(experts)])
    for row in rows:
        row["vs_best_expert"] = row["bpb"] / best
    cm = next(m for m in mixers if m.spec == "cm")
    return {"stream": stream.name, "tokens": result.tokens, "bytes": result.nbytes, "seconds": seconds, "rows": rows,
            "experts": expert_specs, "cm_weights": cm.history(), "cm_components": cm.components,
            "nbytes": loaded.nbytes}


def markdown(results: list[dict]) -> str:
    labels = [r["label"] for r in results[0]["rows"]]
    labels = ["neural", "ngram"] + labels[2:]
    out = ["| stream | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for res in results:
        cells = [f"{row['bpb']:.4f}" for row in res["rows"]]
        out.append(f"| {res['stream']} | " + " | ".join(cells) + " |")
    out += ["", "Mixer cost, microseconds per token (median; first stream's inputs):", "",
            "| mixer | path | us/token |", "|---|---|---|"]
    for row in results[0]["rows"][2:]:
        out.append(f"| {row['label']} | {row['path']} | {row['us_per_token']:.2f} |")
    out += ["", "cm against the best expert alone (bpb ratio): " +
            ", ".join(f"{res['stream']} {next(r for r in res['rows'] if r['label'] == 'cm')['vs_best_expert']:.3f}"
                      for res in results)]
    return "\n".join(out)


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in results if r["stream"].startswith("fineweb")][:1] or results[:1]
    res = chosen[0]
    history = res["cm_weights"]
    positions = history["positions"]
    x = np.cumsum(res["nbytes"][1:])[np.clip(positions, 0, len(res["nbytes"]) - 2)]
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
    for k, name in enumerate(res["cm_components"]):
        ax.plot(x, history["weights"][:, k], linewidth=1.0, label=name)
    ax.set_title(f"cm's final-layer weights along {res['stream']} ({res['experts'][0].split(',')[0]} + ngram)",
                 fontsize=10, loc="left")
    ax.set_xlabel("position in stream (bytes)")
    ax.set_ylabel("weight")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"folder with text/, fineweb/, artifacts/ ({DEFAULT_DATA})")
    parser.add_argument("--streams", nargs="+", help="stream names (a text's file name, sample, fineweb or fineweb/MODEL)")
    parser.add_argument("--max-tokens", type=int, help="cut every stream to this many targets (quick runs)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per mixer cost (median)")
    parser.add_argument("--cost-positions", type=int, default=8192, help="positions of full rows timed per mixer")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plot", type=Path, help="PNG of cm's weights along the first FineWeb stream")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores; python "
          f"{platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}; one torch thread",
          flush=True)
    results = []
    for stream in find_streams(args.data, args.streams, args.max_tokens):
        res = run_one(stream, args.repeats, args.cost_positions)
        print(f"{stream.name}: {res['tokens']:,} tokens, {res['seconds']:.1f} s; "
              + ", ".join(f"{r['label'].split(',')[0]} {r['bpb']:.4f}" for r in res["rows"]), flush=True)
        results.append(res)
    table = markdown(results)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k not in ("cm_weights", "nbytes")}
                                         for r in results], indent=1))
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()
