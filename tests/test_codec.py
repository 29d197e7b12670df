"""The codec: compressed files decode bit-exactly, are as small as the run's bits say, and fail safely.

Core tests drive ``encode_tokens`` / ``decode_tokens`` with small counting experts written here (they
implement the stepwise protocol and ``score_chunk``); end-to-end tests compress real files with the
registered experts and compare the file size with what ``ctxmix.score`` reports for the same run.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from pathlib import Path

import constriction
import numpy as np
import pytest

from ctxmix import codec
from ctxmix.codec import (
    FORMAT_VERSION,
    MAGIC,
    TOTAL_FREQ,
    check_distribution,
    coded_probability,
    compress,
    decode_tokens,
    decompress,
    encode_tokens,
    quantize,
    read_container,
)
from ctxmix.errors import CtxmixError
from ctxmix.experts.base import FEATURE_ENTROPY, Expert, ExpertOutput
from ctxmix.mixers import registry as mixer_registry
from ctxmix.run import Predictor

# A range coder with 32-bit words ends with a flush of at most two words.
FLUSH_BITS = 64
# The size claim of the codec: payload bits <= run bits * (1 + 0.1%) + flush.
SIZE_TOLERANCE = 1e-3
NEURAL_STEPWISE_BITS_RTOL = 1e-4  # one lane: the codec's KV-cache neural path against the batched windows of score
V_SP1024 = 1024


# ----------------------------------------------------------------------------------------------------
# Small experts for the core tests: adaptive order-0 / order-1 counts, add-half smoothing.
# ----------------------------------------------------------------------------------------------------


class CountExpert(Expert):
    """p(v | previous token) proportional to count + 1/2 (order 1), or p(v) likewise (order 0)."""

    registry_name = "test-count"
    provides = (FEATURE_ENTROPY,)

    def __init__(self, vocab_size: int, order: int = 0):
        super().__init__(None, vocab_size=vocab_size)
        self.order = order
        self.begin(np.zeros(1, dtype=np.int64))

    def begin(self, tokens):
        self.counts = np.full((self.vocab_size if self.order else 1, self.vocab_size), 0.5)
        self.prev = 0

    def _row(self) -> np.ndarray:
        return self.counts[self.prev if self.order else 0]

    def next_distribution(self, want=()):
        row = self._row()
        p = row / row.sum()
        features = {FEATURE_ENTROPY: float(-(p * np.log(p)).sum())} if FEATURE_ENTROPY in want else {}
        return p, features

    def observe(self, token):
        self._row()[int(token)] += 1.0
        self.prev = int(token)

    def score_chunk(self, tokens, *, full=False, want=()):
        logp = np.empty(len(tokens))
        p_all = np.empty((len(tokens), self.vocab_size)) if full else None
        for i, token in enumerate(tokens):
            p, _ = self.next_distribution()
            logp[i] = math.log(p[token])
            if full:
                p_all[i] = p
            self.observe(token)
        return ExpertOutput(logp, p_all, {})


class LeakyExpert(CountExpert):
    """Breaks rule 2 at one position: its distribution sums to 1.01 there."""

    def __init__(self, vocab_size: int, bad_position: int):
        super().__init__(vocab_size, order=0)
        self.bad_position = bad_position

    def begin(self, tokens):
        super().begin(tokens)
        self.position = 0

    def next_distribution(self, want=()):
        p, features = super().next_distribution(want)
        return (p * 1.01 if self.position == self.bad_position else p), features

    def observe(self, token):
        super().observe(token)
        self.position += 1


def byte_tokens(data: bytes) -> np.ndarray:
    """int64[N]: a context token (256) then one token per byte, over a vocabulary of 257."""
    return np.concatenate([[256], np.frombuffer(data, dtype=np.uint8)]).astype(np.int64)


def count_predictor(vocab_size: int = 257, mixer: str | None = "hedge") -> Predictor:
    experts = [CountExpert(vocab_size, 0), CountExpert(vocab_size, 1)]
    if mixer is None:
        return Predictor(experts[1:], None, vocab_size)
    return Predictor(experts, mixer_registry.build(mixer, experts=["count0", "count1"]), vocab_size)


# ----------------------------------------------------------------------------------------------------
# Quantization and the coder
# ----------------------------------------------------------------------------------------------------


def test_quantize_gives_integer_weights_that_sum_exactly_to_the_free_total():
    rng = np.random.default_rng(0)
    cases = []
    for alpha in (0.01, 0.1, 1.0, 10.0):
        p = np.maximum(rng.dirichlet(np.full(V_SP1024, alpha)), 1e-300)  # small alphas give exact zeros
        cases.append(p / p.sum())
    peaked = np.full(V_SP1024, 1e-300)  # one token takes almost everything
    peaked[7] = 1.0 - peaked.sum() + peaked[7]
    cases.append(peaked)
    for p in cases:
        check_distribution(p, V_SP1024, "case")
        w = quantize(p)
        assert w.dtype == np.float64 and np.all(w == np.floor(w)) and w.min() >= 0
        assert int(w.sum()) == TOTAL_FREQ - V_SP1024
        # Every token's coded probability is at least p * (1 - V / 2**24): the stated per-token bound.
        q = (w + 1.0) / TOTAL_FREQ
        assert np.all(q >= p * (1.0 - V_SP1024 / TOTAL_FREQ) * (1 - 1e-15))


def test_coder_uses_exactly_the_quantized_frequencies():
    # Weights 0, 1, 2 give frequencies 1, 2, 3 out of 2**24: coding n copies costs n*log2(2**24/f) bits.
    # If the coder rescaled or rounded our weights, these rare symbols would show it (1 vs 2 is a whole bit).
    w = np.zeros(V_SP1024)
    w[5], w[6], w[7] = 0.0, 1.0, 2.0
    w[0] = TOTAL_FREQ - V_SP1024 - 3.0
    model = constriction.stream.model.Categorical(w, perfect=False, lazy=True)
    n = 2000
    for symbol, frequency in ((5, 1), (6, 2), (7, 3), (0, TOTAL_FREQ - V_SP1024 + 1 - 3)):
        encoder = constriction.stream.queue.RangeEncoder()
        for _ in range(n):
            encoder.encode(symbol, model)
        expected = n * math.log2(TOTAL_FREQ / frequency)
        assert coded_probability(w, symbol) == frequency / TOTAL_FREQ
        assert expected - 1 <= encoder.num_bits() <= expected + FLUSH_BITS + n * 0.01


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p * 1.001, "sum to"),
        (lambda p: np.where(np.arange(len(p)) == 3, 0.0, p / (1 - p[3])), "p(token 3) = 0.0"),
        (lambda p: np.where(np.arange(len(p)) == 9, np.nan, p), "sum to nan"),
        (lambda p: p.astype(np.float32), "dtype float32"),
        (lambda p: p[:-1] / p[:-1].sum(), "shape (1023,)"),
    ],
)
def test_unnormalized_distributions_are_refused_before_coding(make, expected):
    p = np.full(V_SP1024, 1.0 / V_SP1024)
    with pytest.raises(CtxmixError, match="position 5") as info:
        check_distribution(make(p), V_SP1024, "mixer test at position 5")
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_the_lanes_quantizer_gives_quantize_row_by_row():
    """codec.quantize_rows (one kernel for a step's rows) against codec.quantize of each row: the same
    integers, ties going to the first most probable token as np.argmax does."""
    rng = np.random.default_rng(1)
    rows = [np.maximum(rng.dirichlet(np.full(V_SP1024, alpha)), 1e-300) for alpha in (0.01, 0.3, 5.0)]
    tied = np.full(V_SP1024, 0.5 / (V_SP1024 - 2))
    tied[[40, 900]] = 0.25  # two most probable tokens: the first takes the left-over units
    rows += [tied, np.full(V_SP1024, 1.0 / V_SP1024)]
    p = np.stack([row / row.sum() for row in rows])
    w = codec.quantize_rows(p, V_SP1024, "mixer test", np.arange(len(p)))
    assert np.array_equal(w, np.stack([quantize(row) for row in p]))


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p * 1.001, "sum to"),
        (lambda p: np.where(np.arange(len(p)) == 3, 0.0, p / (1 - p[3])), "p(token 3) = 0.0"),
        (lambda p: np.where(np.arange(len(p)) == 9, np.nan, p), "sum to nan"),
        (lambda p: -p, "sum to"),
    ],
)
def test_the_lanes_quantizer_refuses_the_first_bad_row_as_check_distribution_does(make, expected):
    p = np.full((4, V_SP1024), 1.0 / V_SP1024)
    p[2], p[3] = make(p[2]), make(p[3])
    with pytest.raises(CtxmixError, match="mixer test at position 12") as info:
        codec.quantize_rows(p, V_SP1024, "mixer test", np.arange(10, 14))
    assert expected in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CtxmixError, match="expected float64"):
        codec.quantize_rows(p.astype(np.float32), V_SP1024, "mixer test", np.arange(10, 14))


# ----------------------------------------------------------------------------------------------------
# Encoder and decoder with the stepwise protocol
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", ["hedge", "fixed:0.3,0.7", None])
def test_stepwise_coding_roundtrips_and_matches_the_model_bits(text_dir, mixer):
    tokens = byte_tokens((text_dir / "grammar.lsp").read_bytes())
    words, stats = encode_tokens(tokens, count_predictor(mixer=mixer))
    decoded = decode_tokens(words, len(tokens), int(tokens[0]), count_predictor(mixer=mixer))
    assert np.array_equal(decoded, tokens)
    payload_bits = 32 * len(words)
    assert stats.bits <= payload_bits <= stats.bits * (1 + SIZE_TOLERANCE) + FLUSH_BITS
    assert abs(stats.quantized_bits - stats.bits) <= stats.tokens * 1e-4  # <= 1e-4 bits per token for V=257


def test_stepwise_bits_equal_the_engine_bits(text_dir):
    from ctxmix.run import run_stream
    from ctxmix.stream import Stream

    tokens = byte_tokens((text_dir / "xargs.1").read_bytes())
    stream = Stream("xargs.1", tokens, np.ones(len(tokens), dtype=np.int64), 257, "text")
    experts = [CountExpert(257, 0), CountExpert(257, 1)]
    result = run_stream(stream, experts, [mixer_registry.build("hedge", experts=["a", "b"])], expert_rows=False)
    _, stats = encode_tokens(tokens, count_predictor())
    assert stats.bits == pytest.approx(result.bits["hedge"], rel=1e-12)


def test_decoding_with_other_experts_does_not_reproduce_the_tokens(text_dir):
    tokens = byte_tokens((text_dir / "grammar.lsp").read_bytes()[:500])
    words, _ = encode_tokens(tokens, count_predictor(mixer="hedge"))
    # The wrong model reads the payload as other tokens, whose code length outruns the payload: the decoder
    # stops there instead of inventing the rest.
    with pytest.raises(CtxmixError, match=r"the payload \(\d+ words\) is used up at token \d+ of 500"):
        decode_tokens(words, len(tokens), int(tokens[0]), count_predictor(mixer="fixed"))


def test_an_unnormalized_expert_stops_the_encoder_with_its_position():
    tokens = byte_tokens(b"abcabcabc")
    predictor = Predictor([LeakyExpert(257, bad_position=4)], None, 257)
    with pytest.raises(CtxmixError, match=r"expert test-count at position 4: probabilities sum to 1\.01"):
        encode_tokens(tokens, predictor)


def test_coding_needs_one_mixer_or_one_expert():
    with pytest.raises(CtxmixError, match="2 experts and no mixer"):
        Predictor([CountExpert(257), CountExpert(257, 1)], None, 257)
    with pytest.raises(CtxmixError, match="vocabulary 300"):
        Predictor([CountExpert(300)], None, 257)


# ----------------------------------------------------------------------------------------------------
# compress / decompress on real files with the registered experts
# ----------------------------------------------------------------------------------------------------


def score_bits(path: Path, experts: list[str], mixer: str) -> float:
    """The bits ``ctxmix.score`` reports for the row of ``mixer`` (or the single expert, for ``none``)."""
    import ctxmix

    report = ctxmix.score([path], experts, [mixer])
    (row,) = report.runs
    return row["bits"]


def roundtrip(path: Path, tmp_path: Path, experts=None, mixers=None, lanes=None):
    packed = tmp_path / (path.name + ".cmx")
    restored = tmp_path / (path.name + ".restored")
    result = compress(path, packed, experts=experts, mixers=mixers, lanes=lanes)
    back = decompress(packed, restored)
    assert restored.read_bytes() == path.read_bytes()
    assert result.file_bytes == packed.stat().st_size == result.header_bytes + result.payload_bytes
    assert back.output_bytes == result.input_bytes == path.stat().st_size
    return result


def assert_size_matches_bits(result, reported_bits: float) -> None:
    # Same experts, same mixer: the codec's model bits are the run's bits ...
    assert result.bits == pytest.approx(reported_bits, rel=1e-9)
    # ... and the payload is within 0.1% of them, plus the coder's final flush.
    assert reported_bits - 1 <= 8 * result.payload_bytes <= reported_bits * (1 + SIZE_TOLERANCE) + FLUSH_BITS


@pytest.mark.parametrize("name", ["grammar.lsp", "xargs.1", "fields.c"])
def test_real_files_roundtrip_with_the_default_run_and_match_its_bits(text_dir, tmp_path, name):
    # One lane: the codec proves score's figure. The neural expert decodes with a KV cache
    # (``check.FLOAT32_STEPWISE_RTOL``: its p is within about 4e-5 of the batched windows' p), so its bits
    # match score's to that order, not to the last digit. (Lanes: tests/test_lanes.py.)
    result = roundtrip(text_dir / name, tmp_path, lanes=1)
    assert [spec.split(":")[0] for spec in result.experts] == ["neural", "ngram"] and result.mixer == "cm"
    reported = score_bits(text_dir / name, ["neural", "ngram"], "cm")
    assert result.bits == pytest.approx(reported, rel=NEURAL_STEPWISE_BITS_RTOL)
    assert result.bits - 1 <= 8 * result.payload_bytes <= result.bits * (1 + SIZE_TOLERANCE) + FLUSH_BITS


def test_alice_slice_roundtrips_with_the_ngram_expert_alone(alice_path, tmp_path, write_file):
    sliced = write_file("alice_slice.txt", alice_path.read_bytes()[:20_000])  # CRLF text, cut mid-line
    # One lane: the lane engine's n-gram path (tables without leaves) gives score's bits to 1e-9.
    result = roundtrip(sliced, tmp_path, experts=["ngram"], mixers=["none"], lanes=1)
    assert result.mixer is None and result.lanes == 1
    assert_size_matches_bits(result, score_bits(sliced, ["ngram"], "none"))
    assert result.bpb < 8 * 0.5  # it really compresses: under half the original size


CRAFTED = {
    "box_drawing.txt": "┌───┬───┐\n│ a │ b │\n├───┼───┤\n│ ✓ │ ☃ │\n└───┴───┘\n",
    "crlf.txt": "first line\r\nsecond  line\r\n\r\n   indented\r\n",
    "tabs_and_mixed_ends.txt": "a\tb\t\tc\n\tindented\r\nlone cr\rend  \t \n",
    "spaces_and_u2581.txt": "x" + " " * 40 + "y ▁ z▁▁\n" + "emoji 😀 and accents éàü\n",
    "no_final_newline.txt": "no newline at the end",
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_texts_roundtrip(tmp_path, write_file, name):
    path = write_file(name, CRAFTED[name])
    result = roundtrip(path, tmp_path, experts=["unigram", "ngram"], mixers=["hedge"])
    assert result.tokens >= 1


def test_a_one_token_file_roundtrips_and_an_empty_file_is_refused(tmp_path, write_file):
    from ctxmix.data import encode_text

    one = write_file("one.txt", "a")
    assert len(encode_text(b"a").tokens) == 2  # BOS + one token
    assert roundtrip(one, tmp_path).tokens == 1
    empty = write_file("empty.txt", b"")
    with pytest.raises(CtxmixError, match="empty.txt: file is empty, nothing to compress"):
        compress(empty, tmp_path / "empty.cmx", experts=["unigram"], mixers=["none"])
    assert not (tmp_path / "empty.cmx").exists()  # bits per byte of nothing is not a figure to print


def test_compress_refuses_text_that_is_not_utf8(text_dir, tmp_path):
    with pytest.raises(CtxmixError, match="not UTF-8"):
        compress(text_dir / "sum", tmp_path / "sum.cmx")
    assert not (tmp_path / "sum.cmx").exists()


def test_compress_takes_one_mixer_or_none_with_one_expert(text_dir, tmp_path):
    path = text_dir / "grammar.lsp"
    with pytest.raises(CtxmixError, match="one mixer, 2 were given"):
        compress(path, tmp_path / "x.cmx", mixers=["hedge", "fixed"])
    with pytest.raises(CtxmixError, match="2 experts and no mixer"):
        compress(path, tmp_path / "x.cmx", experts=["unigram", "ngram"], mixers=["none"])
    assert list(tmp_path.iterdir()) == []


def test_default_outputs_never_replace_an_existing_file(tmp_path, write_file):
    path = write_file("note.txt", "hello there\n")
    first = compress(path, experts=["unigram"], mixers="none")
    assert first.out == str(path) + ".cmx"
    with pytest.raises(CtxmixError, match="already exists"):
        compress(path, experts=["unigram"], mixers="none")
    with pytest.raises(CtxmixError, match="note.txt already exists"):
        decompress(first.out)  # the original is still there
    path.unlink()
    decompress(first.out)
    assert path.read_text() == "hello there\n"


# ----------------------------------------------------------------------------------------------------
# Damaged and mismatched files: one line, nothing written
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_bytes(text_dir, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("packed") / "xargs.1.cmx"
    compress(text_dir / "xargs.1", out, experts=["unigram", "ngram"], mixers=["hedge"])
    return out.read_bytes()


@pytest.fixture
def packed(packed_bytes, tmp_path) -> Path:
    """A fresh copy of a good .cmx file (xargs.1, unigram + ngram, hedge) for a test to damage."""
    out = tmp_path / "xargs.1.cmx"
    out.write_bytes(packed_bytes)
    return out


def header_span(data: bytes) -> tuple[int, int]:
    """(start, end) of the header bytes inside a .cmx file."""
    (length,) = struct.unpack_from("<H", data, len(MAGIC))
    start = len(MAGIC) + 2
    return start, start + length


def assert_refused(path: Path, pattern: str, tmp_path: Path, **kwargs) -> None:
    out = tmp_path / "restored.out"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CtxmixError, match=pattern) as info:
        decompress(path, out, **kwargs)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp file left behind


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x55
    path.write_bytes(bytes(data))


def test_a_corrupted_payload_is_refused(packed, tmp_path):
    flip_byte(packed, packed.stat().st_size - 10)
    assert_refused(packed, "corrupt payload", tmp_path)


def test_a_corrupted_header_is_refused(packed, tmp_path):
    start, end = header_span(packed.read_bytes())
    flip_byte(packed, (start + end) // 2)
    assert_refused(packed, r"corrupt header \(crc32 mismatch\)", tmp_path)


@pytest.mark.parametrize("keep", [5, 40, -4, -1])
def test_a_truncated_file_is_refused(packed, tmp_path, keep):
    data = packed.read_bytes()
    packed.write_bytes(data[:keep])
    assert_refused(packed, "bad magic|truncated", tmp_path)


def test_trailing_bytes_and_other_files_are_refused(packed, text_dir, tmp_path):
    packed.write_bytes(packed.read_bytes() + b"\0\0\0\0")
    assert_refused(packed, "followed by extra bytes", tmp_path)
    assert_refused(text_dir / "grammar.lsp", "not a ctxmix compressed file", tmp_path)


def rewrite_container(path: Path, edit_header=None, edit_words=None) -> None:
    """Re-pack ``path`` with its header and payload edited and every crc made consistent again."""
    header, words = read_container(path)
    if edit_header:
        edit_header(header)
    if edit_words is not None:
        words = edit_words(words.copy())
        header["payload_words"] = len(words)
        header["payload_crc32"] = zlib.crc32(words.astype("<u4").tobytes())
    path.write_bytes(b"".join(codec._container_parts(header, words)))


def test_a_payload_altered_with_valid_crcs_never_writes_wrong_output(packed, tmp_path):
    def alter(words):
        words[len(words) // 2] ^= 0x00010000
        return words

    rewrite_container(packed, edit_words=alter)
    assert_refused(packed, "fails its checksum|do not form valid text", tmp_path)


def test_decoded_bytes_are_checked_before_anything_is_written(packed, tmp_path, monkeypatch):
    from ctxmix.data import Tokenizer

    real = Tokenizer.decode_text
    monkeypatch.setattr(Tokenizer, "decode_text", lambda self, tokens, layout: real(self, tokens, layout)[:-1] + b"?")
    assert_refused(packed, "fails its checksum", tmp_path)


def test_a_file_from_another_tokenizer_is_refused(packed, tmp_path):
    rewrite_container(packed, edit_header=lambda h: h.update(tokenizer_sha256="ab" * 32))
    assert_refused(packed, "made with tokenizer sha256 abababababab", tmp_path)


@pytest.mark.parametrize("edit, pattern", [
    ({"coder": 2}, "coder id 2"),
    ({"format": FORMAT_VERSION + 1}, f"format version {FORMAT_VERSION + 1}"),
    ({"layout": b"\x07\x01"}, "layout"),
    ({"experts": []}, "no expert"),
    ({"tokens": 10**12}, "corrupt header: tokens=1000000000000 is out of range \\(maximum 8455\\)"),
])
def test_a_newer_format_coder_or_an_inconsistent_header_is_refused(packed, tmp_path, edit, pattern):
    rewrite_container(packed, edit_header=lambda h: h.update(edit))
    assert_refused(packed, pattern, tmp_path)


def test_a_missing_or_different_model_artifact_is_refused(packed, tmp_path, write_file):
    artifact = write_file("model.ptz", b"the weights the file was made with")
    spec = f"neural:model={artifact}"

    def use_artifact(header):
        header["experts"] = [spec, *header["experts"]]
        header["artifacts"] = {spec: hashlib.sha256(artifact.read_bytes()).hexdigest()}

    rewrite_container(packed, edit_header=use_artifact)
    artifact.write_bytes(b"other weights")
    assert_refused(packed, f"model artifact {artifact} has sha256", tmp_path)
    moved = write_file("elsewhere.ptz", b"other weights")
    assert_refused(packed, "has sha256", tmp_path, model=moved)
    artifact.unlink()
    assert_refused(packed, f"needs model artifact {artifact} .* which is missing", tmp_path)


def test_compress_output_appears_only_when_complete(text_dir, tmp_path, monkeypatch):
    real_parts = codec._container_parts

    def fail_midway(header, words):
        parts = real_parts(header, words)
        yield next(parts)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(codec, "_container_parts", fail_midway)
    with pytest.raises(OSError, match="simulated"):
        compress(text_dir / "grammar.lsp", tmp_path / "g.cmx", experts=["unigram"], mixers="none")
    assert list(tmp_path.iterdir()) == []


def test_cli_commands_compress_and_decompress(text_dir, tmp_path):
    from click.testing import CliRunner

    from ctxmix.cli import cli as group

    packed, restored = tmp_path / "g.cmx", tmp_path / "g.lsp"
    runner = CliRunner()
    result = runner.invoke(group, ["compress", str(text_dir / "grammar.lsp"), "-o", str(packed), "-e", "unigram",
                                   "-m", "hedge", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["file_bytes"] == packed.stat().st_size and info["mixer"] == "hedge"
    result = runner.invoke(group, ["decompress", str(packed), "-o", str(restored), "--quiet"])
    assert result.exit_code == 0, result.output
    assert restored.read_bytes() == (text_dir / "grammar.lsp").read_bytes()


def test_experts_and_mixers_without_the_stepwise_protocol_are_refused():
    class ChunkOnly(Expert):
        registry_name = "chunk-only"

        def score_chunk(self, tokens, *, full=False, want=()):
            return ExpertOutput(np.full(len(tokens), -math.log(self.vocab_size)))

    with pytest.raises(CtxmixError, match="expert chunk-only cannot be used for coding"):
        Predictor([ChunkOnly(None, vocab_size=257)], None, 257)


@pytest.mark.parametrize("mixer", sorted(mixer_registry.names()))
def test_every_registered_mixer_roundtrips_within_the_bound_of_its_reported_bits(text_dir, tmp_path, write_file, mixer):
    path = write_file("grammar_head.lsp", (text_dir / "grammar.lsp").read_bytes()[:1500])
    experts = ["unigram", "ngram:orders=2-4"]
    result = roundtrip(path, tmp_path, experts=experts, mixers=[mixer])
    assert result.mixer.split(":")[0] == mixer
    assert_size_matches_bits(result, score_bits(path, experts, mixer))


def test_the_uniform_expert_costs_exactly_log2_v_bits_per_token(text_dir, tmp_path):
    result = roundtrip(text_dir / "grammar.lsp", tmp_path, experts=["uniform"], mixers=["none"])
    assert result.bits == pytest.approx(10.0 * result.tokens, rel=1e-12)  # log2(1024) = 10
    assert result.quantized_bits == pytest.approx(result.bits, abs=1e-6)  # 1/1024 is exact in 24 bits
