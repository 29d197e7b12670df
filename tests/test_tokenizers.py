"""Any SentencePiece tokenizer: sp4096 and sp8192 models trained here on the shared texts (byte fallback),
their shards and byte accounting, lossless text mode, a toy model trained at vocabulary 4096, the CLI
and the codec with ``--tokenizer``, and the refusals (one line each)."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures.data import TEXT
from fixtures.tokenizers import UTF8_TEXTS, shared_lines, train_sentencepiece

from ctxmix.cli import cli
from ctxmix.data import (
    Tokenizer,
    decode_text,
    encode_text,
    load_shards,
    load_text,
    load_tokenizer,
    shipped_tokenizer,
    write_shard,
)
from ctxmix.data.text import _scheme, _tokenize, _tokenize_sentencepiece
from ctxmix.data.tokenizer import (
    KIND_BYTE,
    MODEL_BPE,
    MODEL_UNIGRAM,
    SPACE_PIECE,
    TOKENIZER_FILE,
)
from ctxmix.errors import CtxmixError


@pytest.fixture(scope="session")
def sp_models(tmp_path_factory) -> dict[int, Path]:
    """sp4096 and sp8192 BPE models trained on the shared texts (about a second each)."""
    folder = tmp_path_factory.mktemp("sp")
    return {v: train_sentencepiece(v, folder / f"sp{v}.model") for v in (4096, 8192)}


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def refused(call, *fragments: str) -> str:
    with pytest.raises(CtxmixError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def documents(tok: Tokenizer, n_docs: int = 400) -> list[list[int]]:
    """The shared texts' paragraphs as the challenge's export tokenizes documents (its own normalizer)."""
    paragraphs = [p for p in "\n".join(shared_lines()).split("\n\n") if p.strip()]
    return tok.processor.encode(paragraphs[:n_docs])


def challenge_shard_tokens(tok: Tokenizer) -> np.ndarray:
    """BOS + tokens per document, concatenated, as in a challenge shard."""
    return np.concatenate([[tok.bos_id] + doc for doc in documents(tok)]).astype(np.int64)


# ------------------------------------------------------------------------------------------- the model


def test_a_trained_tokenizer_is_reproducible_and_loads_as_one_cached_object(sp_models, tmp_path):
    again = train_sentencepiece(4096, tmp_path / "again.model")
    assert again.read_bytes() == sp_models[4096].read_bytes()  # fixed options, one thread
    tok = load_tokenizer(sp_models[4096])
    assert load_tokenizer(again) is tok  # cached by sha256: tables are built once per model
    assert (tok.vocab_size, tok.bos_id, tok.model_type) == (4096, 1, MODEL_BPE)
    assert tok.sha256 == hashlib.sha256(sp_models[4096].read_bytes()).hexdigest()
    assert tok.byte_ids is not None and all(tok.kinds[tok.byte_ids] == KIND_BYTE)
    assert load_tokenizer(TOKENIZER_FILE) is shipped_tokenizer()  # a copy of the shipped model is the shipped model


@pytest.mark.parametrize("vocab", [4096, 8192])
def test_shard_bytes_equal_an_independent_per_piece_count_and_the_decoded_documents(sp_models, vocab, tmp_path):
    tok = load_tokenizer(sp_models[vocab])
    tokens = challenge_shard_tokens(tok)
    assert tokens.max() >= 1024  # beyond sp1024's ids: a uint16 shard of this vocabulary
    write_shard(tmp_path / "val_000000.bin", tokens)
    stream = load_shards(str(tmp_path / "val_*.bin"), tokenizer=tok)
    np.testing.assert_array_equal(stream.tokens, tokens)
    assert stream.vocab_size == vocab

    # An independent count, piece by piece from the processor (the challenge's rule, written out here).
    sp = tok.processor
    expected = np.zeros(len(tokens), np.int64)
    for t, token in enumerate(tokens.tolist()):
        if sp.is_control(token) or sp.is_unknown(token) or sp.is_unused(token):
            continue
        if sp.is_byte(token):
            expected[t] = 1
            continue
        piece = sp.id_to_piece(token)
        previous_is_boundary = t == 0 or sp.is_control(int(tokens[t - 1]))
        if piece.startswith(SPACE_PIECE):
            piece = piece[1:]
            expected[t] += 0 if previous_is_boundary else 1
        expected[t] += len(piece.encode("utf-8"))
    np.testing.assert_array_equal(stream.nbytes[1:], expected[1:])

    # For whole documents, the challenge's count is the UTF-8 size of the decoded text.
    starts = np.flatnonzero(tokens == tok.bos_id)
    for a, b in itertools.pairwise(starts[:51]):
        text = sp.decode(tokens[a + 1 : b].tolist())
        assert int(stream.nbytes[a + 1 : b].sum()) == len(text.encode("utf-8"))


def test_a_shard_of_another_vocabulary_is_refused_in_one_line(sp_models, tmp_path):
    tok = load_tokenizer(sp_models[8192])
    write_shard(tmp_path / "val_000000.bin", challenge_shard_tokens(tok)[:5000])
    message = refused(lambda: load_shards(str(tmp_path / "val_000000.bin")), "val_000000.bin", "outside the vocabulary",
                      "0..1023", "sp1024 (shipped)", "--tokenizer")
    code, _out, err = run_cli("eval", "--shard", str(tmp_path / "val_000000.bin"), "-e", "ngram", "-m", "none")
    assert code == 1 and err.strip() == f"error: {message}"


def test_byte_counts_from_a_sidecar_replace_the_pieces_counts(sp_models, tmp_path):
    tok = load_tokenizer(sp_models[4096])
    tokens = challenge_shard_tokens(tok)[:3000]
    sidecar = (np.arange(len(tokens)) % 5 + 1).astype(np.int64)
    write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", sidecar)
    # the pattern that matches both leaves the sidecar out, as the CaseOps loaders do
    pattern = str(tmp_path / "fineweb_val_*.bin")
    stream = load_shards(pattern, tokenizer=tok, token_bytes=str(tmp_path / "fineweb_val_bytes_*.bin"))
    np.testing.assert_array_equal(stream.tokens, tokens)
    np.testing.assert_array_equal(stream.nbytes, sidecar)
    write_shard(tmp_path / "short_bytes_000000.bin", sidecar[:100])
    refused(lambda: load_shards(pattern, tokenizer=tok, token_bytes=str(tmp_path / "short_bytes_000000.bin")),
            "hold 100 entries", "need 3000")
    code, out, err = run_cli("eval", "--shard", pattern, "--bytes", str(tmp_path / "fineweb_val_bytes_*.bin"),
                             "--tokenizer", str(sp_models[4096]), "-e", "unigram", "-m", "none", "--json")
    assert code == 0, err
    assert json.loads(out)["runs"][0]["bytes"] == int(sidecar[1:].sum())


# ------------------------------------------------------------------------------------------- text mode


@pytest.mark.parametrize("vocab", [4096, 8192])
def test_text_mode_is_lossless_on_every_shared_utf8_text(sp_models, vocab):
    tok = load_tokenizer(sp_models[vocab])
    scheme = _scheme(tok)
    for name in UTF8_TEXTS:
        data = (TEXT / name).read_bytes()
        encoded = encode_text(data, tokenizer=tok, where=name)
        assert decode_text(encoded.tokens, encoded.layout, tokenizer=tok) == data, name
        assert encoded.tokens[0] == tok.bos_id and encoded.nbytes[0] == 0
        assert int(encoded.nbytes[1:].sum()) == len(data)
        assert int(encoded.tokens.max()) < vocab
        if scheme.bpe is not None:  # sp4096: the numba encoder gives SentencePiece's own ids
            np.testing.assert_array_equal(_tokenize(data, scheme), _tokenize_sentencepiece(data, scheme))
    assert (scheme.bpe is not None) == (vocab == 4096)  # larger vocabularies: SentencePiece encodes
    stream = load_text(TEXT / "alice29.txt", tok)
    assert stream.vocab_size == vocab and stream.scored_bytes == (TEXT / "alice29.txt").stat().st_size
    # a larger vocabulary needs fewer tokens for the same bytes
    assert len(stream.tokens) < len(load_text(TEXT / "alice29.txt").tokens)


def test_a_tokenizer_without_byte_fallback_says_it_cannot_round_trip_a_file(tmp_path):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(shared_lines()[:3000]), model_writer=model, model_type="bpe",
                                   vocab_size=400, byte_fallback=False, num_threads=1, minloglevel=2)
    path = tmp_path / "nofallback.model"
    path.write_bytes(model.getvalue())
    tok = load_tokenizer(path)
    assert tok.byte_ids is None
    text = b"the words of the text"
    encoded = encode_text(text, tokenizer=tok)
    assert decode_text(encoded.tokens, encoded.layout, tokenizer=tok) == text and not encoded.layout.space_runs
    refused(lambda: encode_text("caf\u00e9 \u2603\n".encode(), tokenizer=tok, where="snow.txt"), "snow.txt",
            f"tokenizer {path} cannot round-trip this file", "byte-fallback")


def test_a_unigram_model_is_encoded_by_sentencepiece_and_round_trips(tmp_path):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(shared_lines()[:6000]), model_writer=model,
                                   model_type="unigram", vocab_size=600, byte_fallback=True, num_threads=1,
                                   minloglevel=2)
    path = tmp_path / "unigram.model"
    path.write_bytes(model.getvalue())
    tok = load_tokenizer(path)
    assert tok.model_type == MODEL_UNIGRAM and _scheme(tok).bpe is None
    for name in ("fields.c", "xargs.1", "grammar.lsp"):
        data = (TEXT / name).read_bytes()
        encoded = encode_text(data, tokenizer=tok)
        assert decode_text(encoded.tokens, encoded.layout, tokenizer=tok) == data


# ------------------------------------------------------------------------------ CLI, codec, training


def test_score_check_and_compress_take_a_tokenizer(sp_models, tmp_path):
    model = str(sp_models[8192])
    code, out, err = run_cli("score", str(TEXT / "xargs.1"), "--tokenizer", model, "-e", "ngram", "-m", "none",
                             "--json")
    assert code == 0, err
    row = json.loads(out)["runs"][0]
    assert row["bytes"] == 4227 and row["tokens"] == len(load_text(TEXT / "xargs.1", model).tokens) - 1
    code, out, err = run_cli("check", str(TEXT / "grammar.lsp"), "--tokenizer", model, "-e", "ngram", "-m", "none",
                             "--positions", "200")
    assert code == 0, out + err

    packed = tmp_path / "x.cmx"
    code, out, err = run_cli("compress", str(TEXT / "xargs.1"), "-o", str(packed), "--tokenizer", model,
                             "-e", "ngram", "-m", "none")
    assert code == 0, err
    code, out, err = run_cli("decompress", str(packed), "-o", str(tmp_path / "x.out"))
    assert code == 0, err and (tmp_path / "x.out").read_bytes() == (TEXT / "xargs.1").read_bytes()
    moved = tmp_path / "moved.model"
    moved.write_bytes(sp_models[8192].read_bytes())
    sp_models[8192].rename(tmp_path / "away.model")
    try:
        code, _out, err = run_cli("decompress", str(packed), "-o", str(tmp_path / "y.out"))
        assert code == 1 and "needs tokenizer" in err and "pass --tokenizer PATH" in err and err.count("\n") == 1
        code, _out, err = run_cli("decompress", str(packed), "-o", str(tmp_path / "y.out"), "--tokenizer",
                                  str(sp_models[4096]))
        assert code == 1 and "made with tokenizer sha256" in err and "vocab 8192" in err
        code, _out, err = run_cli("decompress", str(packed), "-o", str(tmp_path / "y.out"), "--tokenizer", str(moved))
        assert code == 0, err
        assert (tmp_path / "y.out").read_bytes() == (TEXT / "xargs.1").read_bytes()
    finally:
        (tmp_path / "away.model").rename(sp_models[8192])


def test_the_default_model_refuses_another_vocabulary_in_one_line(sp_models):
    code, _out, err = run_cli("score", str(TEXT / "xargs.1"), "--tokenizer", str(sp_models[4096]), "-e", "neural",
                              "-m", "none")
    assert code == 1 and err.count("\n") == 1 and "vocabulary 1024" in err and "4096" in err


TINY = ["num_layers=1", "model_dim=32", "num_heads=2", "num_kv_heads=1", "train_seq_len=64",
        "train_batch_tokens=1024", "micro_batch_seqs=16", "val_tokens=2048", "val_every=0", "log_every=0",
        "warmdown_iters=2", "lr_warmup_steps=1", "threads=1", "muon_momentum_warmup_steps=2"]


def test_a_toy_model_trained_at_vocabulary_4096_loads_and_scores(sp_models, tmp_path):
    from ctxmix_train.config import resolve_config
    from ctxmix_train.prepare import prepare
    from ctxmix_train.trainer import train

    model = str(sp_models[4096])
    prepare([TEXT / "alice29.txt"], tmp_path / "data", val_fraction=0.1, tokenization="text", sp_model=model)
    info = json.loads((tmp_path / "data" / "prepare.json").read_text())
    assert info["vocab_size"] == 4096 and info["tokenizer_sha256"] == load_tokenizer(model).sha256
    cfg = resolve_config("toy", sets=TINY + ["iterations=3", "vocab_size=4096", f"tokenizer={model}"])
    result = train(cfg, tmp_path / "data", tmp_path / "sp4096.ptz")
    assert math.isfinite(result.final.bpb) and result.final.nbytes > 0

    code, out, err = run_cli("score", str(TEXT / "grammar.lsp"), "--tokenizer", model, "--model",
                             str(tmp_path / "sp4096.ptz"), "-e", "ngram", "-m", "none", "-m", "cm", "--json")
    assert code == 0, err
    rows = {row["label"].split(":")[0]: row for row in json.loads(out)["runs"]}
    assert set(rows) == {"neural", "ngram", "cm"} and all(math.isfinite(r["bpb"]) for r in rows.values())
    assert rows["neural"]["bytes"] == 3721
