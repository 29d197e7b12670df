"""The codec lanes' neural step: float32 torch against the integer step (models/integer.py), side by side.

Run from the repository root (reads ../shared/data/text for the size rows; the package never does):

    python benchmarks/lane_step.py                              # the shipped model, 16/32/64 lanes, 1 thread
    python benchmarks/lane_step.py --lanes 64 --threads 1 2 --size-bytes 100000
    python benchmarks/lane_step.py --device cuda --model wide.ptz --lanes 64 256   # float32 against bf16 autocast

On a CUDA device the lanes run the float step (the integer kernels are the CPU's): the table then compares
float32 with the bf16 autocast that the neural expert runs there.

Speed: ``Model.decode_lanes`` on one batch of L lanes, after 130 warm-up steps (the rolling cache full),
``--repeats`` runs of 20 steps each, median; both engines in the same process, alternating. Size (with
``--size-bytes N``): the first N bytes of lcet10.txt coded by the lane engine with each neural step
(default experts and mixer), the payload bits of both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "data" / "text" / "lcet10.txt"
sys.path.insert(0, str(REPO))

from ctxmix.bench import machine_line  # noqa: E402


def step_seconds(model, lanes: int, mode: str, threads: int, repeats: int) -> float:
    """Median seconds of one ``decode_lanes`` step; mode: "integer", "float32" or "bf16" (CUDA autocast)."""
    import contextlib

    import torch

    device = next(model.parameters()).device
    torch.set_num_threads(threads)
    cache = model.new_lane_cache(128, mode == "integer", int8=mode == "integer")  # (lane version 3's cache)
    tokens = torch.randint(0, model.config.vocab_size, (lanes,), generator=torch.Generator().manual_seed(lanes))
    tokens = tokens.to(device)
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if mode == "bf16"
                else contextlib.nullcontext())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode(), autocast:
        for _ in range(130):
            model.decode_lanes(tokens, cache)
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            for _ in range(20):
                model.decode_lanes(tokens, cache)
            sync()
            times.append((time.perf_counter() - start) / 20)
    return statistics.median(times)


def payload_bits(n_bytes: int, lanes: int, integer: bool) -> float:
    import numpy as np

    from ctxmix.codec import _build, encode_lanes
    from ctxmix.components import DEFAULT_EXPERTS, DEFAULT_MIXER, run_text_options, run_tokenizer
    from ctxmix.lanes import LaneEngine, LanePlan

    specs = list(DEFAULT_EXPERTS)
    tok = run_tokenizer(specs)
    tokens = tok.encode_text(TEXT.read_bytes()[:n_bytes], where=str(TEXT), **run_text_options(specs)).tokens
    predictor = _build(specs, DEFAULT_MIXER, tok.vocab_size)
    engine = LaneEngine(predictor.experts, predictor.mixer, tok.vocab_size, integer=integer)
    _, stats = encode_lanes(np.asarray(tokens, dtype=np.int64), engine, LanePlan.make(len(tokens), lanes))
    return stats.bits


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lanes", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--threads", nargs="+", type=int, default=[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size-bytes", type=int, default=0, help="also code this much of lcet10.txt both ways")
    parser.add_argument("--model", default=None, help="artifact (default: the shipped model)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: float32 against bf16 autocast")
    args = parser.parse_args(argv)

    import torch

    from ctxmix.experts.neural import DEFAULT_MODEL, resolve_model_path
    from ctxmix.models import load_model

    model = load_model(args.model or resolve_model_path(DEFAULT_MODEL)).model.to(args.device)
    modes = ("float32", "integer") if args.device == "cpu" else ("float32", "bf16")
    gpu = f", GPU {torch.cuda.get_device_name()}" if args.device != "cpu" else ""
    params = sum(p.numel() for p in model.parameters())
    print(f"{machine_line()}{gpu}; model {args.model or DEFAULT_MODEL} ({params:,} parameters)")
    print(f"| lanes | threads | {modes[0]} us/token | {modes[1]} us/token | {modes[1]} ms/step | {modes[0]} / {modes[1]} |")
    print("|---|---|---|---|---|---|")
    for lanes in args.lanes:
        for threads in args.threads:
            first = step_seconds(model, lanes, modes[0], threads, args.repeats)
            second = step_seconds(model, lanes, modes[1], threads, args.repeats)
            print(f"| {lanes} | {threads} | {1e6 * first / lanes:.1f} | {1e6 * second / lanes:.1f} | {1e3 * second:.2f} "
                  f"| {first / second:.2f} |", flush=True)
    if args.size_bytes:
        for lanes in args.lanes:
            bits = {integer: payload_bits(args.size_bytes, lanes, integer) for integer in (False, True)}
            print(f"lcet10.txt first {args.size_bytes} bytes, {lanes} lanes: float32 {bits[False] / 8:,.0f} bytes, "
                  f"integer {bits[True] / 8:,.0f} ({100 * (bits[True] / bits[False] - 1):+.2f}%)", flush=True)


if __name__ == "__main__":
    main()
