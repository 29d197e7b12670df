"""An honest rerun of Parameter Golf PR #909's eval-time n-gram cache (a script, not a test).

For each (artifact, stream) it runs ONE ctxmix pass (each expert computed once) with the experts
  neural (sliding window), ngram:orders=2-11,table=hashed (4,194,304 buckets per order, normalized over the
  vocabulary), ngram:orders=2-11 (exact tables)
and the mixers none (each expert alone), hedge, adaptive (PR #909's entropy-adaptive alpha, published
constants) and pr909 (Hedge, beta 2 per 64 tokens, over neural and the adaptive mix) with either n-gram expert.

Next to those normalized figures it prints what PR #909's own formula claims on the same tokens: its
target-hashed cache (``p = min(full[ctx ^ target], ctx) / ctx`` at the longest order whose context was seen
at least twice, 4,194,304 buckets per order), mixed with the same neural log-probs by the same alpha and
Hedge. That number is not a code length (the cache's "distribution" is never normalized); it is shown to
measure the gap.

    python benchmarks/neural_pr909.py --max-tokens 16384 --json /tmp/pr909.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

import ctxmix  # noqa: E402
from ctxmix.data import default_tokenizer, load_shards, write_shard  # noqa: E402
from ctxmix.experts import registry  # noqa: E402

# PR #909's published constants (openai/parameter-golf pull request #909, train_gpt.py eval_val_sliding).
BUCKETS = 4_194_304
PR909_VAL_TOKENS = 62_021_846  # the validation tokens PR #909's cache saw
ORDERS = range(11, 1, -1)  # longest first
MIN_COUNT = 2  # a context counts as matched when seen at least twice
ALPHA_A, ALPHA_B, ALPHA_S, ALPHA_C, ALPHA_D, MIN_ORDER = 0.05, 0.55, 2.0, 3.0, 0.25, 2
HEDGE_BETA, SEGMENT, LOGW_FLOOR = 2.0, 64, -20.0
PRIME = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1
TEXTS = ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt")


def texts_shard(path: Path) -> Path:
    """The shared English texts as a challenge shard: BOS + the official tokenizer's ids, per document."""
    sp = default_tokenizer()
    tokens: list[int] = []
    for name in TEXTS:
        tokens += [sp.bos_id()] + sp.encode((SHARED / "text" / name).read_text(encoding="latin-1"))
    write_shard(path, np.array(tokens, dtype=np.int64))
    return path


def load_matched_buckets(n_tokens: int) -> int:
    """Buckets per order giving PR #909's load on n_tokens: it put 62,021,846 validation tokens into
    4,194,304 buckets per order (about 15 per bucket); a power of two, as its mask needs."""
    target = n_tokens * BUCKETS / PR909_VAL_TOKENS
    return 1 << max(4, round(math.log2(max(target, 1))))


def unnormalized_pr909_bits(tokens: np.ndarray, logp_neural: np.ndarray, entropy: np.ndarray, buckets: int) -> float:
    """PR #909's claimed bits on positions 1..N-1: target-hashed cache, adaptive alpha, Hedge (not a code)."""
    mask = buckets - 1
    ctx_count = np.zeros((len(ORDERS), buckets), dtype=np.int32)
    full_count = np.zeros((len(ORDERS), buckets), dtype=np.int32)
    logw = np.zeros(2)
    seg_logp = [[], []]
    total = 0.0
    toks = [int(t) for t in tokens]
    for j in range(1, len(toks)):
        target = toks[j]
        p_model = math.exp(logp_neural[j])
        keys = []
        p_ng = None
        order_hit = 0
        for i, n in enumerate(ORDERS):
            if j < n - 1:
                keys.append(None)
                continue
            h = 0
            for k, t in enumerate(toks[j - n + 1 : j]):
                h = (h * 1_000_003 + t + 1) & MASK64  # polynomial hash of the n-1 context tokens
            h = (h * 31 + n) & MASK64
            c, f = h & mask, (h ^ (target * PRIME)) & mask
            keys.append((c, f))
            if p_ng is None and ctx_count[i, c] >= MIN_COUNT:
                p_ng = min(full_count[i, f], ctx_count[i, c]) / ctx_count[i, c]
                order_hit = n
        if p_ng is None:
            p_mix = p_model
        else:
            centre = ALPHA_C - ALPHA_D * (order_hit - MIN_ORDER)
            alpha = ALPHA_A + ALPHA_B / (1.0 + math.exp(-ALPHA_S * (entropy[j] - centre)))
            p_mix = (1 - alpha) * p_model + alpha * p_ng
        w = np.exp(logw - logw.max())
        w /= w.sum()
        total -= math.log2(w[0] * p_model + w[1] * p_mix)
        seg_logp[0].append(math.log(max(p_model, 1e-12)))
        seg_logp[1].append(math.log(max(p_mix, 1e-12)))
        if len(seg_logp[0]) == SEGMENT:
            logw += HEDGE_BETA * np.array([np.mean(seg_logp[0]), np.mean(seg_logp[1])])
            logw = np.maximum(logw - logw.max(), LOGW_FLOOR)
            seg_logp = [[], []]
        for i, key in enumerate(keys):  # update after scoring
            if key is not None:
                ctx_count[i, key[0]] += 1
                full_count[i, key[1]] += 1
    return total


def run(shard: str, artifact: Path, window: int, stride: int, max_tokens: int, batch_size: int) -> dict:
    loaded = load_matched_buckets(max_tokens)
    neural = f"neural:model={artifact},window={window},stride={stride},batch_size={batch_size}"
    experts = [neural, "ngram:orders=2-11,table=hashed", "ngram:orders=2-11",
               f"ngram:orders=2-11,table=hashed,buckets={loaded}"]
    mixers = ["none", "hedge", "adaptive:ngram=1", "adaptive:ngram=2", "pr909:ngram=1", "pr909:ngram=2", "pr909:ngram=3"]
    names = ["neural alone", "ngram hashed 4M (normalized) alone", "ngram exact alone",
             f"ngram hashed {loaded} (PR #909's load, normalized) alone", "hedge (all four experts)",
             "adaptive (neural, hashed 4M)", "adaptive (neural, exact)",
             "pr909 (neural, hashed 4M): the PR #909 config, normalized", "pr909 (neural, exact)",
             f"pr909 (neural, hashed {loaded}), normalized"]
    t0 = time.perf_counter()
    report = ctxmix.evaluate(shard, experts=experts, mixers=mixers, max_tokens=max_tokens)
    seconds = time.perf_counter() - t0
    assert len(report.runs) == len(names)
    table = {name: r["bpb"] for name, r in zip(names, report.runs)}
    nbytes = report.runs[0]["bytes"]
    # PR #909's own (unnormalized) claim on the same tokens, from the same neural log-probs and entropies.
    stream = load_shards(shard, max_tokens=max_tokens)
    expert = registry.build(neural, vocab_size=stream.vocab_size)
    expert.begin(stream.tokens)
    out = expert.score_chunk(stream.tokens, want=("entropy",))
    for buckets in (BUCKETS, loaded):
        bits = unnormalized_pr909_bits(stream.tokens, out.logp, out.features["entropy"], buckets)
        table[f"PR #909 formula, {buckets} buckets, unnormalized: NOT a code length"] = bits / nbytes
    return {"shard": shard, "artifact": artifact.name, "window": window, "stride": stride,
            "tokens": report.runs[0]["tokens"], "bytes": nbytes, "seconds": round(seconds, 1),
            "labels": [r["label"] for r in report.runs], "bpb": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=16_384)
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", choices=("samtruss", "montysteele"), default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path("/tmp") / "ctxmix_pr909"
    work.mkdir(exist_ok=True)
    shards = [str(SHARED / "fineweb" / "fineweb_val_000003.bin"), str(texts_shard(work / "texts_val_000000.bin"))]
    models = [("samtruss", SHARED / "artifacts" / "samtruss_7L384d_c839523.int8.ptz", 512),
              ("montysteele", SHARED / "artifacts" / "montysteele_6Lx2_adapters_6bit_dc69b08.int8.ptz", 1024)]
    results = []
    print(f"python {platform.python_version()}, torch {torch.__version__}, threads {args.threads}, "
          f"{args.max_tokens} targets, stride {args.stride}", flush=True)
    for key, artifact, window in models:
        if args.only and key != args.only:
            continue
        for shard in shards:
            result = run(shard, artifact, window, min(args.stride, window), args.max_tokens, args.batch_size)
            results.append(result)
            print(f"\n{artifact.name} on {Path(shard).name}: {result['tokens']} tokens, {result['bytes']} bytes, "
                  f"window {window}, stride {result['stride']} ({result['seconds']} s)", flush=True)
            for name, bpb in result["bpb"].items():
                print(f"  {name:70s} {bpb:.4f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
