"""Score-first test-time training against the static neural expert (a script, not a test; docs/ttt.md).

For each artifact, the static expert and each TTT variant score the first ``--tokens`` targets of a
FineWeb validation shard with the same window and stride. Every run is a separate process (so its peak
RSS is its own) on ``--threads`` torch threads. The table gives bpb, the gain over the static run, the wall
time and its ratio to the static run's in this same script, the peak RSS and what TTT adds to it, and the
bytes of the state TTT keeps (adapters or weight copies, and the optimizer's moments).

    python benchmarks/ttt.py                                  # both artifacts, 16,384 targets, window 512, stride 64
    python benchmarks/ttt.py --tokens 131072 --stride 512 --models samtruss
    python benchmarks/ttt.py --variants static lora-doc       # a subset of VARIANTS
    python benchmarks/ttt.py --device cuda                    # tokens/s on a GPU, and the 8xH100 projection

On a GPU (``--device cuda``) it also projects the challenge's whole validation set (63,779,840 tokens)
on 8 GPUs from the measured tokens/s of one: ``ttt_reset=doc`` runs split documents across torchrun ranks,
so the projection divides by 8 (that split is exact; the per-GPU rate is the measured one).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

ARTIFACTS = {
    "samtruss": "samtruss_7L384d_c839523.int8.ptz",
    "monty": "montysteele_6Lx2_adapters_6bit_dc69b08.int8.ptz",
}
# name -> the spec options a variant adds to neural:model=...,window=W,stride=S ("" = the static expert)
VARIANTS = {
    "static": "",
    "full": "ttt=full",  # the defaults (docs/ttt.md): every weight, Adam lr 5e-5, 32-token chunks, per-document
    "lora": "ttt=lora",  # rank-8 adapters on every linear map and the head, lr 3e-3
    "lora-qvh": "ttt=lora,ttt_params=q;v;head",  # PR #77's targets
    "full-window": "ttt=full,ttt_context=window",  # the stream's sliding windows instead of same-document context
    "full-never": "ttt=full,ttt_reset=never,ttt_lr=0.00003",  # dynamic evaluation (Krause et al.): no reset
    "full-lr1e-4": "ttt=full,ttt_lr=0.0001",
    "full-lr3e-5": "ttt=full,ttt_lr=0.00003",
}
VALIDATION_TARGETS = 63_779_840  # tokens of the challenge's validation set (DESIGN.md section 11)
BUDGET_S = 600.0


def one_run(spec: str, shard: str, tokens: int, threads: int) -> dict:
    """Score in this process and report {bpb, seconds, rss_mb, state_bytes}."""
    import torch

    torch.set_num_threads(threads)
    import ctxmix
    from ctxmix.components import experts as registry
    from ctxmix.data import load_shards
    from ctxmix.run import run_stream

    stream = load_shards(shard, max_tokens=tokens)
    expert = registry.build(spec, vocab_size=stream.vocab_size)
    started = time.perf_counter()
    result = run_stream(stream, [expert])
    seconds = time.perf_counter() - started
    (bits,) = result.bits.values()
    state = 0
    if getattr(expert, "_adaptation", None) is not None:
        state = expert.memory_bytes() - super(type(expert), expert).memory_bytes()
    return {"bpb": bits / result.nbytes, "seconds": seconds, "tokens": result.tokens,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "state_bytes": state,
            "version": ctxmix.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", default=str(SHARED / "fineweb" / "fineweb_val_000003.bin"))
    parser.add_argument("--artifacts", default=str(SHARED / "artifacts"))
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=list(ARTIFACTS), choices=list(ARTIFACTS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one spec, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.shard, args.tokens, args.threads)))
        return

    import torch

    from ctxmix.bench import cpu_name

    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads available, {args.threads} used; "
          f"device {args.device}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    print(f"shard {args.shard}: first {args.tokens:,} targets, window {args.window}, stride {args.stride}")
    rows = []
    for model in args.models:
        path = Path(args.artifacts) / ARTIFACTS[model]
        static = None
        for variant in ["static"] + [v for v in args.variants if v != "static"]:
            spec = f"neural:model={path},window={args.window},stride={args.stride},device={args.device}"
            spec += f",{VARIANTS[variant]}" if VARIANTS[variant] else ""
            cmd = [sys.executable, __file__, "--one", spec, "--shard", args.shard, "--tokens", str(args.tokens),
                   "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{model} {variant} failed:\n{done.stderr[-3000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            static = static or run
            rows.append((model, variant, run, static))
            print(f"  {model:9s} {variant:16s} {run['bpb']:.4f} bpb  {run['seconds']:7.1f} s", file=sys.stderr, flush=True)
    print()
    print(f"{'model':9s} {'variant':16s} {'bpb':>7s} {'gain':>7s} {'time s':>8s} {'ratio':>6s} {'tok/s':>7s} "
          f"{'RSS MB':>7s} {'+RSS':>6s} {'state MB':>8s}")
    for model, variant, run, static in rows:
        print(f"{model:9s} {variant:16s} {run['bpb']:7.4f} {run['bpb'] - static['bpb']:+7.4f} {run['seconds']:8.1f} "
              f"{run['seconds'] / static['seconds']:6.2f} {run['tokens'] / run['seconds']:7.0f} {run['rss_mb']:7.0f} "
              f"{run['rss_mb'] - static['rss_mb']:+6.0f} {run['state_bytes'] / 2**20:8.2f}")
    if args.device.startswith("cuda"):
        print()
        for model, variant, run, _ in rows:
            rate = run["tokens"] / run["seconds"]
            projected = VALIDATION_TARGETS / (8 * rate)
            print(f"{model} {variant}: {rate:,.0f} tokens/s on one GPU -> {projected:,.0f} s for the validation set "
                  f"on 8 GPUs ({projected / BUDGET_S:.2f} x the {BUDGET_S:.0f} s budget)")


if __name__ == "__main__":
    main()
