"""The integer lane step's matmuls: AMX tiles from numba (kernels/amx.py) against torch._int_mm, side by side.

Run from the repository root, on a CPU with AMX-INT8 (elsewhere it says so and stops):

    python benchmarks/int8_matmul.py                       # the shipped model's weights at 16-86 rows
    python benchmarks/int8_matmul.py --rows 30 43 --repeats 15 --model path/to/model.ptz

For every weight shape of the model's integer step (a block's q/k/v, output, MLP up and down, the head) and
every row count (the lanes of a group; the head takes twice as many: its two int8 terms), both matmuls run
on the same int8 rows in the same process, alternating: ``--repeats`` runs of ``--calls`` calls each, the
median of the per-call times. Each pair's sums must be equal. Results print as a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctxmix.bench import machine_line  # noqa: E402


def per_call_seconds(call, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def weight_shapes(model) -> dict[str, tuple[int, int]]:
    """name -> (outputs, inputs) of each distinct integer-step weight of the model."""
    block = model.blocks[0]
    head = model.tok_emb.weight if model.lm_head is None else model.lm_head.effective_weight()
    weights = {"q/k/v": block.attn._stacked_qkv(), "attention out": block.attn.proj.effective_weight(),
               "MLP up": block.mlp.fc.effective_weight(), "MLP down": block.mlp.proj.effective_weight(), "head": head}
    return {name: tuple(w.shape) for name, w in weights.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="an artifact (default: the shipped model)")
    parser.add_argument("--rows", nargs="+", type=int, default=[16, 30, 43])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from ctxmix.experts.neural import DEFAULT_MODEL, resolve_model_path
    from ctxmix.kernels import amx
    from ctxmix.models import load_model
    from ctxmix.models.integer import IntegerWeights

    if not amx.available():
        sys.exit("int8_matmul: this CPU (or this kernel, or CTXMIX_AMX=0) gives no AMX-INT8 tiles")
    torch.set_num_threads(1)  # as the codec runs the integer step
    model = load_model(args.model or resolve_model_path(DEFAULT_MODEL)).model
    print(machine_line())
    print("| weight | outputs x inputs | rows | AMX tiles us | torch._int_mm us | ratio |")
    print("|---|---|---|---|---|---|")
    gen = np.random.default_rng(0)
    for name, (outputs, inputs) in weight_shapes(model).items():
        weights = IntegerWeights(torch.from_numpy(gen.standard_normal((outputs, inputs)).astype(np.float32)))
        if weights.packed is None:
            print(f"| {name} | {outputs} x {inputs} | - | off the tiles | | |")
            continue
        for lanes in args.rows:
            rows = 2 * lanes if name == "head" else lanes
            values = gen.integers(-127, 128, (rows, inputs)).astype(np.int8)
            sums = np.empty((rows, outputs), np.int32)
            tiles = lambda: amx.int8_matmul(values, weights.packed, sums)  # noqa: E731
            torch_mm = lambda: torch._int_mm(torch.from_numpy(values), weights.weight_t)  # noqa: E731
            tiles()
            if not np.array_equal(sums, torch_mm().numpy()):
                sys.exit(f"int8_matmul: {name} at {rows} rows: the sums differ")
            timed = {"tiles": [], "torch": []}
            for _ in range(args.repeats):
                timed["tiles"].append(per_call_seconds(tiles, args.calls))
                timed["torch"].append(per_call_seconds(torch_mm, args.calls))
            a, b = (1e6 * statistics.median(timed[k]) for k in ("tiles", "torch"))
            print(f"| {name} | {outputs} x {inputs} | {rows} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
