"""The codec lanes' neural step: float32 torch against the integer step (models/integer.py), side by side.

Run from the repository root (reads ../shared/data/text for the size rows; the package never does):

    python benchmarks/lane_step.py                              # the shipped model, 16/32/64 lanes, 1 thread
    python benchmarks/lane_step.py --lanes 64 --threads 1 2 --size-bytes 100000

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


def step_seconds(model, lanes: int, integer: bool, threads: int, repeats: int) -> float:
    import torch

    torch.set_num_threads(threads)
    cache = model.new_lane_cache(128, integer)
    tokens = torch.randint(0, model.config.vocab_size, (lanes,), generator=torch.Generator().manual_seed(lanes))
    times = []
    with torch.inference_mode():
        for _ in range(130):
            model.decode_lanes(tokens, cache)
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(20):
                model.decode_lanes(tokens, cache)
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
    args = parser.parse_args(argv)

    from ctxmix.experts.neural import DEFAULT_MODEL, resolve_model_path
    from ctxmix.models import load_model

    model = load_model(resolve_model_path(DEFAULT_MODEL)).model
    print(machine_line())
    print("| lanes | threads | float32 us/token | integer us/token | float / integer |")
    print("|---|---|---|---|---|")
    for lanes in args.lanes:
        for threads in args.threads:
            float_s = step_seconds(model, lanes, False, threads, args.repeats)
            integer_s = step_seconds(model, lanes, True, threads, args.repeats)
            print(f"| {lanes} | {threads} | {1e6 * float_s / lanes:.1f} | {1e6 * integer_s / lanes:.1f} "
                  f"| {float_s / integer_s:.2f} |", flush=True)
    if args.size_bytes:
        for lanes in args.lanes:
            bits = {integer: payload_bits(args.size_bytes, lanes, integer) for integer in (False, True)}
            print(f"lcet10.txt first {args.size_bytes} bytes, {lanes} lanes: float32 {bits[False] / 8:,.0f} bytes, "
                  f"integer {bits[True] / 8:,.0f} ({100 * (bits[True] / bits[False] - 1):+.2f}%)", flush=True)


if __name__ == "__main__":
    main()
