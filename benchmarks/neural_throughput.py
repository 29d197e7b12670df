"""Neural expert throughput and memory on the CPU (a script, not a test).

Compares, on the same windows with the same loaded model:
  * ctxmix: ``NeuralExpert`` fast path (``begin`` + ``score_chunk``), sliding window;
  * plain: a plain PyTorch loop in the challenge's style (``eval_val_sliding``): batches of windows, full
    logits for every row, ``F.cross_entropy`` in float32, the scored rows summed.
Both are timed several times; the table shows medians (tokens scored per second). Then the peak RSS of a
separate process that scores ``--rss-tokens`` tokens with ctxmix (fast path, and the full path in 256-position
chunks), to show that scoring never holds more than one batch of full distributions.

    python benchmarks/neural_throughput.py                      # samtruss_7L384d_c839523, window 512
    python benchmarks/neural_throughput.py --tokens 2048 --runs 3 --rss-tokens 1000000 --rss-stride 512

GPU figures are out of reach on a CPU-only machine; ``--device cuda`` runs the same comparison on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

from ctxmix.bench import cpu_name  # noqa: E402
from ctxmix.data import load_shards  # noqa: E402
from ctxmix.experts import registry  # noqa: E402


def plain_loop(model, tokens: np.ndarray, window: int, stride: int, batch: int, device) -> float:
    """Total nats, the challenge's way: batches of windows, logits for all rows, float32 cross-entropy."""
    total = len(tokens) - 1
    toks = torch.from_numpy(tokens)
    starts = [s for s in range(0, total, stride) if s == 0 or s + window - stride < total]
    nats = 0.0
    with torch.inference_mode():
        for i in range(0, len(starts), batch):
            group = starts[i : i + batch]
            x = torch.zeros(len(group), window, dtype=torch.int64)
            y = torch.zeros(len(group), window, dtype=torch.int64)
            spans = []
            for j, s in enumerate(group):
                end = min(s + window, total)
                x[j, : end - s] = toks[s:end]
                y[j, : end - s] = toks[s + 1 : end + 1]
                first = 0 if s == 0 else window - stride
                spans.append((first, end - s))
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x.to(device))
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.to(device).reshape(-1),
                                  reduction="none").reshape(len(group), window)
            for j, (a, b) in enumerate(spans):
                nats += float(nll[j, a:b].double().sum())
    return nats


def ctxmix_run(expert, tokens: np.ndarray) -> float:
    expert.begin(tokens)
    return float(-expert.score_chunk(tokens).logp[1:].sum())


def measure_rss(args) -> dict:
    """Peak RSS (MiB) of a fresh process scoring rss_tokens tokens, fast and full path."""
    code = f"""
import resource, sys, time, numpy as np, torch
sys.path.insert(0, {str(REPO)!r})
from ctxmix.data import load_shards
from ctxmix.experts import registry
torch.set_num_threads({args.threads})
stream = load_shards({str(args.shard)!r}, max_tokens={args.rss_tokens})
expert = registry.build({args.spec!r} + ",stride={args.rss_stride}", vocab_size=1024)
expert.begin(stream.tokens)
t0 = time.perf_counter()
full = sys.argv[1] == "full"
step = 256 if full else 8192
bits = 0.0
for i in range(0, len(stream.tokens), step):
    out = expert.score_chunk(stream.tokens[i:i + step], full=full)
    bits -= out.logp[1 if i == 0 else 0:].sum() / np.log(2)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t0, bits / stream.scored_bytes)
"""
    result = {}
    for mode in ("fast", "full"):
        if mode == "full" and not args.rss_full:
            continue
        done = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        rss, seconds, bpb = map(float, done.stdout.split())
        result[mode] = {"peak_rss_mib": round(rss, 1), "seconds": round(seconds, 1), "bpb": round(bpb, 5)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHARED / "artifacts" / "samtruss_7L384d_c839523.int8.ptz")
    parser.add_argument("--shard", type=Path, default=SHARED / "fineweb" / "fineweb_val_000003.bin")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048, help="scored tokens per timed run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rss-tokens", type=int, default=0, help="tokens for the peak-RSS run (0: skip)")
    parser.add_argument("--rss-stride", type=int, default=512)
    parser.add_argument("--rss-full", action="store_true", help="also measure the full path's peak RSS")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.spec = f"neural:model={args.model},window={args.window},batch_size={args.batch_size},device={args.device}"

    stream = load_shards(str(args.shard), max_tokens=args.tokens)
    expert = registry.build(args.spec + f",stride={args.stride}", vocab_size=1024)
    model = expert.model
    device = expert.device

    ctx_times, plain_times = [], []
    ctx_nats = plain_nats = 0.0
    ctxmix_run(expert, stream.tokens[:600])  # warm up both paths
    plain_loop(model, stream.tokens[:600], args.window, args.stride, args.batch_size, device)
    for _ in range(args.runs):
        t0 = time.perf_counter()
        ctx_nats = ctxmix_run(expert, stream.tokens)
        ctx_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        plain_nats = plain_loop(model, stream.tokens, args.window, args.stride, args.batch_size, device)
        plain_times.append(time.perf_counter() - t0)
    n = len(stream.tokens) - 1
    rows = {
        "ctxmix NeuralExpert (fast path)": (n / statistics.median(ctx_times), ctx_nats / n),
        "plain PyTorch loop (challenge style)": (n / statistics.median(plain_times), plain_nats / n),
    }

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {args.threads}, device {device}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")
    print(f"model {args.model.name}, window {args.window}, stride {args.stride}, batch {args.batch_size} windows, "
          f"{n} scored tokens, median of {args.runs} runs")
    print(f"{'':40s} {'tokens/s':>10s} {'nats/token':>11s}")
    for name, (rate, nats) in rows.items():
        print(f"{name:40s} {rate:10.1f} {nats:11.6f}")
    report = {"machine": cpu_name(), "threads": args.threads, "torch": torch.__version__,
              "tokens": n, "window": args.window, "stride": args.stride, "batch_size": args.batch_size,
              "tokens_per_s": {k: v[0] for k, v in rows.items()}, "nats_per_token": {k: v[1] for k, v in rows.items()},
              "runs_s": {"ctxmix": ctx_times, "plain": plain_times}}
    if args.rss_tokens:
        rss = measure_rss(args)
        report["rss"] = {"tokens": args.rss_tokens, "stride": args.rss_stride, **rss}
        for mode, values in rss.items():
            print(f"peak RSS, {args.rss_tokens} tokens, stride {args.rss_stride}, {mode} path: "
                  f"{values['peak_rss_mib']} MiB ({values['seconds']} s, {values['bpb']} bpb)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    assert math.isclose(ctx_nats, plain_nats, rel_tol=1e-5), (ctx_nats, plain_nats)


if __name__ == "__main__":
    main()
