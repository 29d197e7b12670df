"""Score-first test-time training (issue 18) on real artifacts and real FineWeb text: the four rules, the
illegal order rejected, chunked = one-shot, lr 0 = the static expert, per-document reset, a hand-written
reference step, mixing, traces, the codec and torchrun.

Small windows (64 or 128 tokens) and a few hundred positions keep each test to seconds on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ctxmix
from ctxmix.check import RULES, check_all
from ctxmix.components import experts as registry
from ctxmix.data import load_shards
from ctxmix.errors import CtxmixError
from ctxmix.models import baseline, quant
from ctxmix.models.artifact import save_artifact
from ctxmix.trace import load_trace, mix_trace, save_trace
from fixtures.ttt import AdaptThenScore

import neural_reference as ref

SAMTRUSS = "samtruss_7L384d_c839523.int8.ptz"
MONTY = "montysteele_6Lx2_adapters_6bit_dc69b08.int8.ptz"
BOS = 1
SMALL = "window=64,stride=16,ttt_chunk=16"  # every test's shape: 4 windows' worth of context, 16-token chunks
LORA = f"{SMALL},ttt=lora,ttt_lr=0.003"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread, as tests/test_neural.py (stepwise decoding spins with two on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def samtruss(artifacts) -> str:
    return str(artifacts / SAMTRUSS)


@pytest.fixture(scope="module")
def stream(fineweb_shard_path):
    """The first 1,600 tokens of the FineWeb shard: the end of one document, then BOS at 456, 997 and 1554."""
    s = load_shards(str(fineweb_shard_path), max_tokens=1599)
    assert list(np.flatnonzero(s.tokens == BOS)) == [456, 997, 1554]
    return s


def build(path: str, options: str):
    return registry.build(f"neural:model={path},{options}", vocab_size=1024)


def run_expert(expert, tokens: np.ndarray, chunk: int | None = None, full: bool = False):
    """(logp[N], entropy[N], p[N, V] or None) from consecutive score_chunk calls."""
    expert.begin(tokens)
    chunk = chunk or len(tokens)
    outs = [expert.score_chunk(tokens[i : i + chunk], full=full, want=("entropy",)) for i in range(0, len(tokens), chunk)]
    logp = np.concatenate([o.logp for o in outs])
    entropy = np.concatenate([o.features["entropy"] for o in outs])
    return logp, entropy, (np.concatenate([o.p for o in outs]) if full else None)


# -- the four rules, and the illegal order -------------------------------------------------------------------


@pytest.fixture(scope="module")
def across_a_document(stream):
    """Positions 400..: the BOS at 456 of the shard is at 56 here, so checks see a reset and a new context."""
    return dataclasses.replace(stream, tokens=stream.tokens[400:], nbytes=stream.nbytes[400:])


def test_ttt_expert_passes_every_rule_on_real_text(samtruss, across_a_document):
    # the defaults: per-document reset, same-document context
    report = check_all(across_a_document, [f"neural:model={samtruss},{LORA}"], [], positions=200)
    failures = [r.message for r in report.failures()]
    assert report.passed, failures
    assert "bit-identical" in report.results[RULES.index("causal")].detail


def test_adapting_on_a_chunk_before_scoring_it_is_rejected_naming_the_rule(samtruss, across_a_document):
    _, options = registry.parse(f"neural:model={samtruss},{LORA}")
    report = check_all(across_a_document, [lambda: AdaptThenScore(options, vocab_size=1024)], [], positions=200)
    subject = report.experts[0]
    failing = {r.rule for r in report.failures()}
    assert failing == {"causal", "score_before_update"}, [r.message for r in report.failures()]
    causal = report.get("causal", f"expert {subject}").detail
    stepwise = report.get("score_before_update", f"expert {subject}").detail
    assert "changed when the tokens >=" in causal and "rule 1, causal" in causal, causal
    assert "rule 3, score before update" in stepwise, stepwise


# -- chunking, determinism, the static expert ----------------------------------------------------------------


@pytest.mark.parametrize("options", [LORA, f"{SMALL},ttt=full,ttt_lr=0.0003,ttt_opt=sgd,ttt_context=window,ttt_reset=never"])
def test_chunked_run_equals_one_shot_and_repeats_itself(samtruss, stream, options):
    tokens = stream.tokens[:500]  # a document boundary at 456
    expert = build(samtruss, options)
    logp, entropy, p = run_expert(expert, tokens, chunk=256, full=True)
    for chunk in (7, 100, None):
        again, entropy_again, _ = run_expert(expert, tokens, chunk=chunk)
        assert np.array_equal(again, logp) and np.array_equal(entropy_again, entropy)
    assert np.abs(p.sum(axis=1) - 1).max() <= 1e-12 and (p > 0).all()
    assert np.abs(np.log(p[np.arange(len(tokens)), tokens]) - logp).max() <= 1e-12 * np.abs(logp).max()
    static, _, _ = run_expert(build(samtruss, SMALL), tokens)
    assert logp[1:].sum() > static[1:].sum()  # it learned something: fewer bits than the static expert


def test_perturbing_the_future_leaves_every_earlier_value_bit_identical(samtruss, stream):
    tokens = stream.tokens[:500]
    expert = build(samtruss, f"{SMALL},ttt=lora,ttt_lr=0.003,ttt_context=doc,ttt_reset=doc")
    logp, entropy, p = run_expert(expert, tokens, full=True)
    rng = np.random.default_rng(0)
    for cut in (200, 457, 499):  # mid-chunk, the first position of a document, the last position
        changed = tokens.copy()
        changed[cut:] = rng.integers(0, 1024, len(tokens) - cut)
        changed[cut + 3 : cut + 4] = BOS  # a document boundary in the future changes nothing either
        logp2, entropy2, p2 = run_expert(expert, changed[: len(tokens)], full=True)
        assert np.array_equal(p2[: cut + 1], p[: cut + 1])
        assert np.array_equal(logp2[:cut], logp[:cut]) and np.array_equal(entropy2[: cut + 1], entropy[: cut + 1])


@pytest.mark.parametrize("name, options", [
    (SAMTRUSS, "window=128,stride=32,ttt=lora,ttt_context=window,ttt_chunk=48"),  # chunks straddle windows
    (SAMTRUSS, "window=128,stride=32,ttt=full,ttt_context=window,ttt_params=all,ttt_chunk=32"),
    (MONTY, "window=128,stride=64,ttt=full,ttt_context=window,ttt_params=all,ttt_chunk=64"),  # 6-bit QAT forward
    (MONTY, "window=128,stride=64,ttt=lora,ttt_context=window,ttt_params=all;gains,ttt_chunk=64"),
])
def test_zero_learning_rate_equals_the_static_expert_bit_for_bit(artifacts, stream, name, options):
    path = str(artifacts / name)
    tokens = stream.tokens[:400]
    static_options = ",".join(o for o in options.split(",") if not o.startswith("ttt"))
    static, static_entropy, _ = run_expert(build(path, f"{static_options},batch_size=3"), tokens)
    learned, entropy, _ = run_expert(build(path, f"{options},ttt_lr=0"), tokens)
    assert np.array_equal(learned, static) and np.array_equal(entropy, static_entropy)


# -- documents ---------------------------------------------------------------------------------------------


def test_with_per_document_reset_a_document_does_not_depend_on_the_ones_before(samtruss, stream):
    tokens = stream.tokens
    options = f"{SMALL},ttt=lora,ttt_lr=0.003,ttt_context=doc,ttt_reset=doc"
    expert = build(samtruss, options)
    doc = slice(998, 1555)  # positions of the document opened by the BOS at 997, its closing BOS included
    within, _, _ = run_expert(expert, tokens)
    alone, _, _ = run_expert(expert, tokens[997:1555])  # the document by itself, its BOS at position 0
    other = np.concatenate([tokens[456:998], tokens[998:1555]])  # another document before it
    after_other, _, _ = run_expert(expert, other)
    assert np.array_equal(alone[1:], within[doc])
    assert np.array_equal(after_other[-len(alone) + 1 :], within[doc])
    # Without the reset the same document's bits do depend on what came before (the test is not vacuous).
    never = build(samtruss, f"{SMALL},ttt=lora,ttt_lr=0.003,ttt_context=doc,ttt_reset=never")
    within_never, _, _ = run_expert(never, tokens)
    alone_never, _, _ = run_expert(never, tokens[997:1555])
    assert not np.array_equal(alone_never[1:], within_never[doc])


# -- a reference step in plain PyTorch ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory) -> Path:
    """A random 2-layer baseline GPT (width 32), quantized as the baseline exports it."""
    torch.manual_seed(0)
    model = baseline.Model(baseline.Config(num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    path = tmp_path_factory.mktemp("tiny") / "tiny.ptz"
    save_artifact(path, quant.quantize_state_dict_int8(model.state_dict()), meta={"family": "baseline", "train_seq_len": 32})
    return path


def test_a_tiny_models_ttt_steps_equal_a_plain_pytorch_reference(tiny_artifact, stream):
    lr, beta1, beta2, eps, chunk = 0.01, 0.9, 0.95, 1e-8, 8
    expert = build(str(tiny_artifact), f"window=32,stride=8,ttt=lora,ttt_params=q;v;head,ttt_rank=2,ttt_lr={lr},"
                                       f"ttt_momentum={beta1},ttt_chunk={chunk},ttt_context=window,ttt_reset=never")
    tokens = stream.tokens[:40]
    expert.begin(tokens)
    twin = expert._adaptation.model
    adapters = {"q0": twin.blocks[0].attn.c_q.adapter, "v0": twin.blocks[0].attn.c_v.adapter,
                "q1": twin.blocks[1].attn.c_q.adapter, "v1": twin.blocks[1].attn.c_v.adapter,
                "head": twin.logit_adapter}
    # The reference: its own dequantization and forward (tests/neural_reference.py); the adapters merged into
    # the weights (W + B A) and the head's term added to the tied embedding on the output side only.
    w = ref.load_int8_artifact(tiny_artifact)
    params = {name: [a.lora_a.detach().clone().double(), a.lora_b.detach().clone().double()] for name, a in adapters.items()}
    assert all(float(b.abs().max()) == 0.0 for _, b in params.values())  # B starts at 0
    moments = {name: [[torch.zeros_like(t), torch.zeros_like(t)] for t in pair] for name, pair in params.items()}

    def reference_logp(end: int) -> torch.Tensor:
        """float64 log-softmax rows of positions 1 .. end - 1 (window 0: context from position 0)."""
        merged = dict(w)
        for layer in (0, 1):
            for role, key in (("q", "c_q"), ("v", "c_v")):
                a, b = params[f"{role}{layer}"]
                name = f"blocks.{layer}.attn.{key}.weight"
                merged[name] = w[name].double() + b @ a
        merged = {k: v.double() for k, v in merged.items()}
        a, b = params["head"]
        logits = ref.gpt_logits(merged, torch.from_numpy(tokens[: end - 1]), head_delta=b @ a)
        return torch.log_softmax(logits, dim=-1)

    logp = np.zeros(len(tokens))
    scored = 0  # positions the expert has scored so far
    for step, start in enumerate(range(1, 33, chunk), start=1):  # four chunks, all in window 0
        end = start + chunk
        logp[scored:end] = expert.score_chunk(tokens[scored:end]).logp  # scores the chunk, then learns from it
        scored = end
        for pair in params.values():
            for x in pair:
                x.requires_grad_(True)
        lp = reference_logp(end)
        expected = lp[torch.arange(start - 1, end - 1), torch.from_numpy(tokens[start:end])]
        assert np.allclose(logp[start:end], expected.detach().numpy(), rtol=0, atol=2e-5)
        loss = -expected.mean()
        grads = torch.autograd.grad(loss, [x for pair in params.values() for x in pair])
        with torch.no_grad():  # Adam, written out
            for (name, pair), g_pair in zip(params.items(), zip(grads[0::2], grads[1::2])):
                for i, (x, g) in enumerate(zip(pair, g_pair)):
                    m, v = moments[name][i]
                    m.mul_(beta1).add_((1 - beta1) * g)
                    v.mul_(beta2).add_((1 - beta2) * g * g)
                    update = lr * (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
                    pair[i] = (x - update).detach()
        for name, a in adapters.items():
            got_a, got_b = a.lora_a.detach().double(), a.lora_b.detach().double()
            want_a, want_b = params[name]
            # float32 against float64 arithmetic: about 1e-7 here; a wrong beta, target or order moves them by ~lr
            assert float((got_a - want_a).abs().max()) <= 1e-3 * lr and float((got_b - want_b).abs().max()) <= 1e-3 * lr, name
    assert step == 4


# -- mixing, traces, options ---------------------------------------------------------------------------------


def test_ttt_expert_mixes_with_ngram_experts_and_saves_a_trace(samtruss, fineweb_shard_path, tmp_path):
    spec = f"neural:model={samtruss},{LORA}"
    report = ctxmix.evaluate(str(fineweb_shard_path), experts=[spec, "ngram"], mixers=["none", "cm", "hedge"],
                             max_tokens=400, keep_trace=True)
    rows = {r["label"]: r for r in report.runs}
    spec = report.experts[0]  # the canonical spec labels the row
    assert spec in rows and all(math.isfinite(r["bpb"]) and r["tokens"] == 400 for r in rows.values())
    assert len(rows) == 4  # neural, ngram, cm, hedge
    result = report.results[0]
    assert result.expert_features[0]["entropy"].shape == (400,)  # the entropy feature flows
    path = tmp_path / "ttt.trace"
    save_trace(path, result, report.streams[0], report.experts)
    replayed = {r["label"]: r for r in mix_trace(load_trace(path), ["none", "hedge"]).runs}
    hedge = next(label for label in rows if label.startswith("hedge"))
    assert replayed[hedge]["bits"] == rows[hedge]["bits"] and replayed[spec]["bits"] == rows[spec]["bits"]


def test_ttt_options_are_checked_and_listed(samtruss):
    expert = build(samtruss, LORA)
    assert expert.spec == f"neural:model={samtruss},{SMALL.replace(',ttt_chunk=16', '')},ttt=lora,ttt_lr=0.003,ttt_chunk=16"
    assert registry.build(expert.spec, vocab_size=1024).spec == expert.spec
    for bad, message in [
        ("ttt=lora,ttt_lr=nan", "not a finite number"),
        ("ttt=lora,ttt_lr=-0.5", "must be >= 0, or -1 for the mode's default"),
        ("ttt=lora,ttt_lr=-2", "out of range"),
        ("ttt=lora,ttt_rank=0", "out of range"),
        ("ttt=maybe", "not one of none, lora, full"),
        ("ttt=lora,ttt_params=q;x", "unknown role 'x'"),
        ("ttt=lora,ttt_params=emb", "cannot adapt with ttt=lora"),
        ("ttt=lora,ttt_reset=sometimes", "not one of doc, never"),
        ("window=64,ttt=full,ttt_chunk=65", "ttt_chunk 65 is larger than the window 64"),
    ]:
        with pytest.raises(CtxmixError, match=message):
            build(samtruss, bad)
    from ctxmix.report import _entries

    (neural,) = [e for e in _entries(registry) if e["name"] == "neural"]
    listed = {o["name"]: o for o in neural["options"]}
    for name in ("ttt", "ttt_params", "ttt_rank", "ttt_opt", "ttt_lr", "ttt_steps", "ttt_chunk", "ttt_reset", "ttt_context"):
        assert name in listed and listed[name]["help"], name
    assert listed["ttt"]["default"] == "none"


# -- the codec --------------------------------------------------------------------------------------------


def test_compress_and_decompress_with_a_ttt_expert_round_trip(samtruss, write_file, alice_path, tmp_path):
    text = alice_path.read_bytes()[:1500]
    source = write_file("alice_head.txt", text)
    spec = f"neural:model={samtruss},{LORA}"
    done = ctxmix.compress(source, tmp_path / "a.cmx", experts=[spec], mixers="none")
    back = ctxmix.decompress(tmp_path / "a.cmx", tmp_path / "a.out")
    assert (tmp_path / "a.out").read_bytes() == text and back.output_bytes == len(text)
    scored = ctxmix.score([str(source)], experts=[spec], mixers=["none"])
    assert abs(done.bits - scored.runs[0]["bits"]) <= 1e-4 * done.bits  # the KV-cache path is close, not equal


def test_codec_refuses_a_ttt_expert_whose_updates_a_decoder_cannot_repeat(samtruss, write_file, tmp_path, monkeypatch):
    expert = build(samtruss, LORA)
    assert expert.coding_refusal() is None  # CPU: one thread, fixed order, bit for bit
    monkeypatch.setattr(expert, "device", torch.device("cuda"), raising=False)
    assert "not bit-reproducible" in expert.coding_refusal()
    from ctxmix.experts.ttt import TTTNeuralExpert

    monkeypatch.setattr(TTTNeuralExpert, "coding_refusal", lambda self: "a reason")
    source = write_file("x.txt", "some text to code")
    with pytest.raises(CtxmixError, match=r"^expert neural:.*ttt=lora.* cannot be used for coding: a reason$"):
        ctxmix.compress(source, tmp_path / "x.cmx", experts=[f"neural:model={samtruss},{LORA}"], mixers="none")
    assert not (tmp_path / "x.cmx").exists()


# -- torchrun ----------------------------------------------------------------------------------------------

TORCHRUN_SCRIPT = """
import json, os, sys
import ctxmix
shard, spec, out = sys.argv[1:4]
report = ctxmix.evaluate(shard, experts=[spec], mixers=["none"], max_tokens=1200, device="cpu")
if os.environ.get("RANK", "0") == "0":
    json.dump(report.runs, open(out, "w"))
else:
    assert report is None, report
"""


def test_torchrun_splits_documents_between_two_processes_and_gives_the_bits_of_one(tmp_path, fineweb_shard_path, samtruss):
    # ~15 s: two processes start, join a gloo group and load torch; the split is what issue 18 asks for.
    spec = f"neural:model={samtruss},{SMALL},ttt=lora,ttt_lr=0.003,ttt_context=doc,ttt_reset=doc"
    script = tmp_path / "run_eval.py"
    script.write_text(TORCHRUN_SCRIPT)
    out = tmp_path / "runs.json"
    env = dict(os.environ, PYTHONPATH=str(Path(ctxmix.__file__).parents[1]), OMP_NUM_THREADS="1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(script), str(fineweb_shard_path), spec, str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (two,) = json.loads(out.read_text())
    (one,) = ctxmix.evaluate(str(fineweb_shard_path), experts=[spec], mixers=["none"], max_tokens=1200, device="cpu").runs
    assert two["tokens"] == one["tokens"] == 1200
    assert abs(two["bits"] - one["bits"]) <= 1e-9 * one["bits"]
