"""The hf expert against a plain transformers loop on the same windows: bits and CPU tokens/s.

Run from the repository root (reads ../shared/data, which the package itself never does):

    python benchmarks/hf_expert.py [--tokens 20000] [--window 1024] [--stride 256] [--repeats 3]

A GPT-2-shaped model (vocabulary 50,257, context 1,024, 6 layers x 384, random seeded weights: nothing is
downloaded) is built from a config and saved with a byte-level BPE trained here on the decoded FineWeb
validation shard (as ``ngram_vocab.py`` does). The first ``--tokens`` tokens of that text are scored twice,
side by side in this process: by ``ctxmix.score`` with ``-e hf:path=DIR,window=W,stride=S -m none``, and by
the loop a user would write with transformers alone (each window of the same plan through ``model(x,
labels=..., shift_labels=...)``, its mean loss times the scored positions). Prints the machine, versions,
the relative difference of the bits (target: <= 1e-6) and tokens/s of each (medians; target: ctxmix >=
1.0x the loop).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ngram_vocab import fineweb_text, train_gpt2_sized

from ctxmix.bench import machine_line


def build_model(directory: Path, vocab_size: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=1024, n_embd=384, n_layer=6, n_head=6,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    GPT2LMHeadModel(config).save_pretrained(directory)


def plain_loop_bits(directory: Path, tokens, window: int, stride: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from ctxmix.experts.neural import WindowPlan

    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    plan = WindowPlan(len(tokens), window, stride, 1)
    nats = 0.0
    with torch.inference_mode():
        for k in range(plan.n_windows):
            lo, hi = plan.scored_range(k)
            start = k * stride
            x = torch.as_tensor(tokens[start : hi - 1])[None]
            targets = torch.as_tensor(tokens[start + 1 : hi])[None].clone()
            targets[:, : lo - start - 1] = -100
            nats += float(model(x, labels=x, shift_labels=targets).loss) * (hi - lo)
    return nats / math.log(2)


def main(argv=None) -> None:
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    import tokenizers
    import torch
    import transformers

    from ctxmix.api import score
    from ctxmix.components import run_tokenizer
    from ctxmix.data import load_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"# hf expert against a plain transformers loop\n\n{machine_line()}\n"
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"tokenizers {tokenizers.__version__}\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        directory = train_gpt2_sized(fineweb_text(), Path(tmp) / "gpt2ish")
        build_model(directory, 50_257)
        spec = f"hf:path={directory},window={args.window},stride={args.stride}"
        text = Path(tmp) / "text.txt"
        tok = run_tokenizer([spec])
        full = fineweb_text().encode("utf-8")
        encoded = tok.encode_text(full)
        cut = int(encoded.nbytes[: args.tokens + 1].sum())  # the bytes of the first --tokens tokens
        text.write_bytes(full[:cut])
        tokens = load_text(text, tok).tokens
        n = len(tokens) - 1
        ours, loop = [], []
        bits_ours = bits_loop = None
        for _ in range(args.repeats):  # interleaved, so that both see the same machine load
            started = time.perf_counter()
            report = score([text], [spec], ["none"])
            ours.append(time.perf_counter() - started)
            bits_ours = report.results[0].bits[report.runs[0]["label"]]
            started = time.perf_counter()
            bits_loop = plain_loop_bits(directory, tokens, args.window, args.stride)
            loop.append(time.perf_counter() - started)
        t_ours, t_loop = statistics.median(ours), statistics.median(loop)
        print(f"text: {n:,} tokens ({cut:,} bytes) of the decoded fineweb_val_000003; window {args.window}, "
              f"stride {args.stride}; medians of {args.repeats}\n")
        print("| path | bpb | tokens/s | seconds |\n|---|---|---|---|")
        print(f"| ctxmix `hf` expert (score, -m none) | {bits_ours / cut:.6f} | {n / t_ours:,.0f} | {t_ours:.1f} |")
        print(f"| plain transformers loop (labels) | {bits_loop / cut:.6f} | {n / t_loop:,.0f} | {t_loop:.1f} |")
        print(f"\nrelative difference of the bits: {abs(bits_ours - bits_loop) / bits_loop:.2e}; "
              f"speed ratio ctxmix / loop: {t_loop / t_ours:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
