"""The Hugging Face expert (``hf:path=DIR``) on tiny GPT-2 and Llama models built here from a config, with a
byte-level BPE tokenizer trained here on the shared texts: nothing is downloaded (HF_HUB_OFFLINE=1).

Its bits equal transformers' own loss on the same windows; its text mode (the model's own tokenizer) is
lossless on every shared UTF-8 text; the n-gram expert counts over the same stream and cm mixes both; the
four rules hold; files compress and decompress with it; and the refusals are one line each."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures.data import TEXT
from fixtures.tokenizers import UTF8_TEXTS, save_tiny_model, train_byte_level_bpe

from ctxmix.api import score
from ctxmix.cli import cli
from ctxmix.components import run_tokenizer
from ctxmix.data import decode_text, encode_text, load_text, load_tokenizer
from ctxmix.errors import CtxmixError
from ctxmix.experts.neural import WindowPlan

VOCAB = 1024
CONTEXT = 96


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """{"gpt2": DIR, "llama": DIR}: tiny seeded models saved beside one byte-level BPE tokenizer."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is faster and the floats do not depend on the machine
    root = tmp_path_factory.mktemp("hf")
    tokenizer = train_byte_level_bpe(VOCAB, root / "tokenizer")
    out = {}
    for family in ("gpt2", "llama"):
        folder = root / family
        shutil.copytree(tokenizer, folder)
        out[family] = save_tiny_model(folder, family, VOCAB, context=CONTEXT)
    yield out
    torch.set_num_threads(before)


def transformers_bits(directory: Path, tokens: np.ndarray, window: int, stride: int) -> float:
    """Bits of tokens[1:] from transformers' own loss (``labels``), window by window as the expert slides."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    plan = WindowPlan(len(tokens), window, stride, 1)
    nats = 0.0
    with torch.no_grad():
        for k in range(plan.n_windows):
            lo, hi = plan.scored_range(k)
            start = k * stride
            x = torch.as_tensor(tokens[start : hi - 1])[None]
            targets = torch.as_tensor(tokens[start + 1 : hi])[None].clone()
            targets[:, : lo - start - 1] = -100  # positions before lo are context only
            nats += float(model(x, labels=x, shift_labels=targets).loss) * (hi - lo)
    return nats / math.log(2)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bits_equal_transformers_loss_on_the_same_windows(hf_models, family):
    directory = hf_models[family]
    for window, stride in ((CONTEXT, CONTEXT), (CONTEXT, 24), (40, 16)):
        spec = f"hf:path={directory},window={window},stride={stride}"
        report = score([TEXT / "grammar.lsp"], [spec], ["none"])
        tokens = load_text(TEXT / "grammar.lsp", run_tokenizer([spec])).tokens
        expected = transformers_bits(directory, tokens, window, stride)
        bits = report.results[0].bits[report.runs[0]["label"]]
        assert abs(bits - expected) / expected < 1e-6, (window, stride, bits, expected)
        assert report.runs[0]["bytes"] == 3721


def test_text_mode_with_the_models_tokenizer_is_lossless_on_every_shared_text(hf_models):
    tok = load_tokenizer(hf_models["gpt2"])
    assert tok.kind == "hf" and tok.vocab_size == VOCAB and tok.bos_id == VOCAB - 1
    for name in UTF8_TEXTS + ("underbar.txt",):
        data = (TEXT / name).read_bytes() if name != "underbar.txt" else "a ▁ b\r\n\t😀 é\u0301\x00".encode()
        encoded = encode_text(data, tokenizer=tok, where=name)
        assert decode_text(encoded.tokens, encoded.layout, tokenizer=tok) == data, name
        assert encoded.nbytes[0] == 0 and int(encoded.nbytes[1:].sum()) == len(data), name
    # byte-level pieces: each token's count is the length of its own bytes (a character split over several
    # tokens gives its bytes to the first, and 0 to the others)
    data = (TEXT / "fields.c").read_bytes()
    encoded = encode_text(data, tokenizer=tok)
    pieces = [len(tok.backend.decode([int(t)]).encode("utf-8")) for t in encoded.tokens[1:]]
    assert encoded.nbytes[1:].tolist() == pieces  # ASCII: every token decodes alone


def test_ngram_counts_over_the_models_stream_and_cm_mixes_them(hf_models):
    spec = f"hf:path={hf_models['llama']},stride=48"
    report = score([TEXT / "xargs.1"], [spec, "ngram"], ["none", "cm"])
    rows = {row["label"].split(":")[0]: row for row in report.runs}
    assert set(rows) == {"hf", "ngram", "cm"}
    assert len({row["tokens"] for row in rows.values()}) == 1 and rows["cm"]["bytes"] == 4227
    assert rows["cm"]["bpb"] < min(rows["hf"]["bpb"], rows["ngram"]["bpb"]) + 0.05  # a random model: ngram wins


def test_the_four_rules_hold(hf_models):
    code, out, err = run_cli("check", str(TEXT / "grammar.lsp"), "-e", f"hf:path={hf_models['gpt2']},window=48,stride=16",
                             "-e", "ngram", "-m", "none", "-m", "cm", "--positions", "150")
    assert code == 0, out + err


def test_compress_and_decompress_with_the_model_moved(hf_models, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(hf_models["gpt2"], moved)
    packed = tmp_path / "g.cmx"
    code, out, err = run_cli("compress", str(TEXT / "grammar.lsp"), "-o", str(packed), "-e",
                             f"hf:path={moved},window=48,stride=16", "-e", "ngram", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["overhead"] < 0.02
    elsewhere = tmp_path / "elsewhere"
    moved.rename(elsewhere)
    code, _out, err = run_cli("decompress", str(packed), "-o", str(tmp_path / "a.out"))
    assert code == 1 and "missing" in err and err.count("\n") == 1
    code, _out, err = run_cli("decompress", str(packed), "-o", str(tmp_path / "b.out"), "--model", str(elsewhere))
    assert code == 0, err
    assert (tmp_path / "b.out").read_bytes() == (TEXT / "grammar.lsp").read_bytes()


def test_refusals_are_one_line(hf_models, monkeypatch, tmp_path):
    from ctxmix.data import shipped_tokenizer

    spec = f"hf:path={hf_models['gpt2']}"
    # two models saved with one tokenizer share the stream; another tokenizer is refused, even of the same size
    assert run_tokenizer([spec, f"hf:path={hf_models['llama']}"]).sha256 == load_tokenizer(hf_models["gpt2"]).sha256
    refused(lambda: run_tokenizer([spec], tokenizer=tmp_path / "missing.model"), "no such file")
    refused(lambda: run_tokenizer([spec], tokenizer=shipped_tokenizer()), "one run, one tokenizer",
            "--tokenizer uses sp1024 (shipped) (vocabulary 1024)", f"{spec} uses")
    refused(lambda: score([TEXT / "xargs.1"], [f"hf:path={tmp_path}"], ["none"]), "no tokenizer.json")
    refused(lambda: score([TEXT / "xargs.1"], [f"{spec},window=4096"], ["none"]), "longer than the model's context")

    # a tokenizer that normalizes cannot give the file back: refused, naming it and the byte
    from tokenizers import Tokenizer, normalizers

    lowered = tmp_path / "lower"
    shutil.copytree(hf_models["gpt2"], lowered)
    backend = Tokenizer.from_file(str(lowered / "tokenizer.json"))
    backend.normalizer = normalizers.Lowercase()
    backend.save(str(lowered / "tokenizer.json"))
    refused(lambda: score([TEXT / "xargs.1"], [f"hf:path={lowered}"], ["none"]), "cannot round-trip this file",
            "first difference at byte 1")

    # without transformers: one line naming the extra
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setattr("ctxmix.data.hf_tokenizer._loaded", {})
    refused(lambda: score([TEXT / "xargs.1"], [spec], ["none"]), "pip install 'ctxmix[hf]'")


def refused(call, *fragments: str) -> str:
    with pytest.raises(CtxmixError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_ngram_fast_path_equals_its_distributions_at_a_150k_vocabulary(hf_models):
    """Qwen-sized vocabularies (151,936 ids): the n-gram expert's keys hold 18-bit tokens; its fast path gives
    the log of the stepwise distribution's entry, which sums to 1 over all ids."""
    from ctxmix.components import experts

    vocab = 151_936
    stream = load_text(TEXT / "xargs.1", load_tokenizer(hf_models["gpt2"]))
    tokens = (stream.tokens * 148 + 7) % vocab  # the same text, spread over the large id range
    fast = experts.build("ngram", vocab_size=vocab)
    fast.begin(tokens)
    logp = fast.score_chunk(tokens).logp
    step = experts.build("ngram", vocab_size=vocab)
    step.begin(tokens)
    for t, token in enumerate(tokens[:400].tolist()):
        p, _ = step.next_distribution()
        if t % 40 == 1:
            assert abs(p.sum() - 1.0) < 1e-9 and p.min() > 0
            assert abs(math.log(p[token]) - logp[t]) <= 1e-12 * abs(logp[t])
        step.observe(token)
