"""The data layer on real data: shard format and errors, the challenge's byte accounting, lossless text mode."""

from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from ctxmix.data import (
    EncodedText,
    TextLayout,
    decode_text,
    default_tokenizer,
    encode_text,
    identity_tokenizer,
    load_shards,
    load_text,
    read_shard,
    sample_text_path,
    shard_byte_counts,
    write_shard,
)
from ctxmix.data.shard import HEADER_INTS, SHARD_MAGIC
from ctxmix.data.text import MAX_RUN, RUN_TOKEN_BYTES
from ctxmix.data.tokenizer import TOKENIZER_FILE, identity_model_proto
from ctxmix.errors import CtxmixError

BOS = 1
V = 1024
NOT_UTF8 = {"cp.html": 24069, "sum": 27}  # first bad byte offsets, from tests/data/SOURCES.md
SAMPLE_DOCS = [k for k in range(45) if k not in (3, 30, 38, 40)]  # as assets/SOURCES.md states


def piece_id(piece: str) -> int:
    sp = default_tokenizer()
    token_id = sp.piece_to_id(piece)
    assert sp.id_to_piece(token_id) == piece, piece
    return token_id


def header(magic=SHARD_MAGIC, version=1, count=0) -> bytes:
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[0], h[1], h[2] = magic, version, count
    return h.tobytes()


def assert_refused(call, *fragments: str) -> str:
    with pytest.raises(CtxmixError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ---------------------------------------------------------------------------------------------- shards


def test_shard_write_then_read_gives_the_same_tokens(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=5000)
    path = tmp_path / "val_000.bin"
    write_shard(path, tokens)
    assert path.stat().st_size == 4 * HEADER_INTS + 2 * len(tokens)
    back = read_shard(path)
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, tokens)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic writer left no temp file


def test_shard_file_layout_is_the_challenge_format(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, [1, 2, 65535])
    raw = path.read_bytes()
    assert raw[:12] == np.array([20240520, 1, 3], dtype="<i4").tobytes()
    assert raw[12:1024] == bytes(1012)
    assert raw[1024:] == np.array([1, 2, 65535], dtype="<u2").tobytes()


def test_write_shard_refuses_tokens_outside_uint16(tmp_path):
    assert_refused(lambda: write_shard(tmp_path / "a.bin", [1, 65536]), "a.bin", "65536", "position 1")
    assert_refused(lambda: write_shard(tmp_path / "b.bin", [-1]), "b.bin", "-1")
    assert not (tmp_path / "a.bin").exists()


def test_read_shard_refuses_a_missing_file(tmp_path):
    assert_refused(lambda: read_shard(tmp_path / "nope.bin"), "nope.bin", "no such file")


def test_read_shard_refuses_a_truncated_header(write_file):
    path = write_file("short.bin", header(count=0)[:1000])
    assert_refused(lambda: read_shard(path), "short.bin", "1000 bytes", "header")


def test_read_shard_refuses_a_bad_magic(write_file):
    path = write_file("magic.bin", header(magic=12345, count=1) + b"\x01\x00")
    assert_refused(lambda: read_shard(path), "magic.bin", "magic number 12345", str(SHARD_MAGIC))


def test_read_shard_refuses_a_bad_version(write_file):
    path = write_file("version.bin", header(version=2, count=1) + b"\x01\x00")
    assert_refused(lambda: read_shard(path), "version.bin", "version 2")


def test_read_shard_refuses_a_count_that_disagrees_with_the_size(write_file):
    path = write_file("count.bin", header(count=10) + bytes(2 * 9))
    assert_refused(lambda: read_shard(path), "count.bin", "header says 10 tokens, file holds 9")
    odd = write_file("odd.bin", header(count=2) + bytes(5))
    assert_refused(lambda: read_shard(odd), "odd.bin", "header says 2 tokens, file holds 2 and 1 stray byte")


def test_load_shards_refuses_tokens_outside_the_vocabulary(tmp_path):
    write_shard(tmp_path / "val_0.bin", [1, 5, 6])
    write_shard(tmp_path / "val_1.bin", [1, 7, 1023, 1024, 9])
    assert_refused(lambda: load_shards(str(tmp_path / "val_*.bin")), "val_1.bin", "token 1024", "position 3")


def test_load_shards_refuses_a_pattern_with_no_match(tmp_path):
    assert_refused(lambda: load_shards(str(tmp_path / "val_*.bin")), "no shard matches", "val_*.bin")


def test_load_shards_concatenates_in_name_order(tmp_path):
    write_shard(tmp_path / "val_b.bin", [30, 31])
    write_shard(tmp_path / "val_a.bin", [1, 20, 21])
    stream = load_shards(str(tmp_path / "val_*.bin"))
    assert stream.mode == "shard" and stream.vocab_size == V
    np.testing.assert_array_equal(stream.tokens, [1, 20, 21, 30, 31])
    listed = load_shards([tmp_path / "val_b.bin", tmp_path / "val_a.bin"])  # a list keeps its order
    np.testing.assert_array_equal(listed.tokens, [30, 31, 1, 20, 21])


def test_load_shards_accepts_a_file_name_with_glob_characters(tmp_path):
    path = tmp_path / "val [x] é.bin"
    write_shard(path, [1, 261, 262])
    np.testing.assert_array_equal(load_shards(str(path)).tokens, [1, 261, 262])


def test_max_tokens_keeps_that_many_scored_targets(fineweb_shard_path):
    stream = load_shards(fineweb_shard_path, max_tokens=1000)
    assert len(stream.tokens) == 1001 and stream.n_scored == 1000
    np.testing.assert_array_equal(stream.tokens, read_shard(fineweb_shard_path)[:1001])
    assert_refused(lambda: load_shards(fineweb_shard_path, max_tokens=0), "max_tokens")


def test_smoke_shard_loads(smoke_shard_path):
    stream = load_shards(smoke_shard_path)
    assert len(stream.tokens) == 131_073
    assert stream.tokens[0] == BOS
    assert stream.nbytes.dtype == np.int64 and stream.nbytes.shape == stream.tokens.shape


# ------------------------------------------------------------------------------- shard byte accounting


def test_shard_byte_counts_match_a_hand_count_from_the_pieces():
    # Pieces and their bytes, by the challenge's rule: base = UTF-8 length without the leading "▁";
    # the "▁" adds one byte unless the previous token is a control token; a byte token is one byte.
    sequence = [
        ("<s>", 0),  # position 0: not scored
        ("▁the", 3),  # after BOS (a boundary): the leading space is not counted
        ("▁the", 4),
        ("in", 2),
        ("<0xC3>", 1),
        ("<0xA9>", 1),
        ("▁a", 2),  # after a byte token, which is not a boundary
        ("“", 3),  # U+201C is three UTF-8 bytes
        ("▁“", 4),
        ("</s>", 0),
        ("▁", 0),  # a lone "▁" after EOS: base 0, space not counted
        ("▁", 1),
        ("<unk>", 0),
    ]
    tokens = np.array([piece_id(p) for p, _ in sequence])
    np.testing.assert_array_equal(shard_byte_counts(tokens), [n for _, n in sequence])


def test_fineweb_first_16384_targets_are_40991_bytes(fineweb_shard_path):
    tokens = read_shard(fineweb_shard_path, max_tokens=16_385)
    assert int(shard_byte_counts(tokens)[1:].sum()) == 40_991  # the figure in tests/data/SOURCES.md
    assert load_shards(fineweb_shard_path, max_tokens=16_384).scored_bytes == 40_991


def test_shard_bytes_equal_the_decoded_text_of_whole_documents(fineweb_shard_path):
    # For complete documents the challenge's count is the UTF-8 size of the decoded text.
    tokens = read_shard(fineweb_shard_path, max_tokens=60_000)
    bos = np.flatnonzero(tokens == BOS)
    nbytes = shard_byte_counts(tokens)
    sp = default_tokenizer()
    for start, end in itertools.pairwise(bos[:21]):
        text = sp.decode(tokens[start + 1 : end].tolist())
        assert int(nbytes[start + 1 : end].sum()) == len(text.encode("utf-8"))


# ------------------------------------------------------------------------------------------- tokenizer


# sha256 of the official Parameter Golf sp1024 model, as published with its origin (ctxmix/data/assets/SOURCES.md)
OFFICIAL_SP1024_SHA256 = "4f5e8adb109c66b4886963bc75a7befd73bda36d27fd7102df8e9e66503b0e2a"


def test_shipped_tokenizer_is_the_official_model():
    assert hashlib.sha256(TOKENIZER_FILE.read_bytes()).hexdigest() == OFFICIAL_SP1024_SHA256
    sp = default_tokenizer()
    assert sp.vocab_size() == V and sp.bos_id() == BOS
    assert sp.encode("Hello world") == [piece_id(p) for p in ("H", "ell", "o", "▁wor", "ld")]


def test_identity_proto_changes_only_the_normalizer():
    raw = TOKENIZER_FILE.read_bytes()
    proto = identity_model_proto(raw)
    assert proto != raw and b"nmt_nfkc" in raw and b"nmt_nfkc" not in proto
    assert identity_model_proto(proto) == proto  # idempotent: one normalizer field, replaced in place
    official, identity = default_tokenizer(), identity_tokenizer()
    assert [identity.id_to_piece(i) for i in range(V)] == [official.id_to_piece(i) for i in range(V)]
    assert [identity.get_score(i) for i in range(V)] == [official.get_score(i) for i in range(V)]
    assert official.encode("a  b\tc") != identity.encode("a  b\tc")  # only the normalization differs


# --------------------------------------------------------------------------------------------- text mode

CRAFTED = {
    "box.txt": "┌──┬──┐\n│ a│ b│\n└──┴──┘\n",
    "tabs.c": "int main(void)\n{\n\treturn 0;\t/* done */\n\t\tx\ty\n}\n",
    "crlf.txt": "first line\r\nsecond line\r\n\r\n  indented\r\n",
    "mixed.txt": "unix line\nwindows line\r\nunix again\n\r\n",
    "lonecr.txt": "old mac\rline two\r\rthe end",
    "trailing.txt": "trailing spaces   \nand more \t \n   \n",
    "runs.txt": "a" + " " * 2 + "b" + " " * 14 + "c" + " " * 15 + "d" + " " * 16 + "e" + " " * 100 + "f  ",
    "emoji.txt": "smile 😀 family 👨‍👩‍👧 flag 🇫🇷 done\n",
    "underbar.txt": "a ▁ literal ▁▁ stays▁ put\n▁\n",
    "odd.txt": "\ufeffBOM, NUL \x00, nbsp\u00a0, ﬁ ligature, é vs e\u0301, ①, full\u3000width",
    "lead.txt": "\n\n  \t leading whitespace\n",
    "space.txt": " ",
    "newline.txt": "\n",
    "qz.txt": "\nQuiet\nxylophone\n9 lives\n“quoted”\n–dash\n",
}


def check_lossless(data: bytes) -> EncodedText:
    encoded = encode_text(data)
    assert encoded.tokens[0] == BOS and encoded.nbytes[0] == 0
    assert encoded.tokens.dtype == np.int64 and encoded.nbytes.dtype == np.int64
    assert ((encoded.tokens >= 0) & (encoded.tokens < V)).all()
    assert (encoded.nbytes >= 0).all()
    assert int(encoded.nbytes[1:].sum()) == len(data)
    assert decode_text(encoded.tokens, encoded.layout) == data
    return encoded


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_text_decodes_to_its_exact_bytes(name, write_file):
    data = CRAFTED[name].encode("utf-8")
    check_lossless(data)
    stream = load_text(write_file(name, data))
    assert stream.mode == "text" and stream.vocab_size == V
    assert stream.scored_bytes == len(data)


def test_every_utf8_shared_text_file_round_trips(text_dir):
    checked = 0
    for path in sorted(text_dir.iterdir()):
        if path.name in NOT_UTF8:
            continue
        data = path.read_bytes()
        stream = load_text(path)
        assert stream.scored_bytes == len(data), path.name
        assert decode_text(stream.tokens, encode_text(data).layout) == data, path.name
        checked += 1
    assert checked == 8


@pytest.mark.parametrize("name", sorted(NOT_UTF8))
def test_non_utf8_files_are_refused_at_the_first_bad_byte(name, text_dir):
    assert_refused(lambda: load_text(text_dir / name), name, "not UTF-8", f"offset {NOT_UTF8[name]}")


def test_empty_and_missing_files_are_refused(write_file, tmp_path):
    assert_refused(lambda: load_text(write_file("empty.txt", b"")), "empty.txt", "empty")
    assert_refused(lambda: load_text(tmp_path / "missing.txt"), "missing.txt", "no such file")


def test_random_text_from_awkward_characters_round_trips():
    alphabet = list("ab Z9.\n\r\tQx") + ["  ", "\r\n", "▁", "é", "😀", "│", "\u00a0", "\x00", "“", "–"]
    rng = np.random.default_rng(1)
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 60))))
        check_lossless(text.encode("utf-8"))


def test_crlf_flag_is_set_only_when_every_line_end_is_crlf(alice_path):
    alice = check_lossless(alice_path.read_bytes())
    assert alice.layout.crlf
    lf = np.flatnonzero(alice.tokens == piece_id("<0x0A>"))
    assert len(lf) == 3608 and (alice.nbytes[lf] == 2).all()  # each LF token also carries its CR
    assert not check_lossless(CRAFTED["mixed.txt"].encode()).layout.crlf
    assert not check_lossless(CRAFTED["lonecr.txt"].encode()).layout.crlf
    assert_refused(lambda: encode_text(b"a\nb", crlf=True), "CRLF")


def test_words_after_a_line_break_get_word_initial_pieces():
    # The challenge's normalizer turns the newline into "▁"; text mode keeps it as a byte token and
    # otherwise gives the same tokens, "▁The" included (its inserted space counts 0 bytes).
    encoded = check_lossless(b"The end.\nThe cat sat")
    lf = piece_id("<0x0A>")
    body = encoded.tokens[1:].tolist()
    assert [t for t in body if t != lf] == default_tokenizer().encode("The end. The cat sat")
    after = body.index(lf) + 1
    assert body[after] == piece_id("▁The") and encoded.nbytes[1 + after] == 3


def test_space_runs_become_run_tokens():
    run_ids = {b + 4 for b in RUN_TOKEN_BYTES}  # byte-fallback ids are 4 + byte value
    for spaces, expect_runs, expect_nbytes in (
        (29, [False, True, True, False], [1, MAX_RUN, MAX_RUN, 2]),  # a, 28 standalone "▁" = 14 + 14, "▁b"
        (30, [False, True, True, False, False], [1, MAX_RUN, MAX_RUN, 1, 2]),  # one "▁" left over
        (3, [False, True, False], [1, 2, 2]),
    ):
        data = b"a" + b" " * spaces + b"b"
        runs = check_lossless(data)
        plain = check_lossless_with(data, space_runs=False)
        assert len(plain.tokens) == 1 + 1 + (spaces - 1) + 1  # BOS, a, standalone "▁"s, "▁b"
        assert [int(t) in run_ids for t in runs.tokens[1:]] == expect_runs
        assert runs.nbytes[1:].tolist() == expect_nbytes


def check_lossless_with(data: bytes, **options) -> EncodedText:
    encoded = encode_text(data, **options)
    assert decode_text(encoded.tokens, encoded.layout) == data
    assert int(encoded.nbytes[1:].sum()) == len(data)
    return encoded


@pytest.mark.parametrize(
    "options",
    [{"crlf": False, "line_space": False, "space_runs": False}, {"line_space": False}, {"space_runs": False}],
)
def test_every_layout_variant_is_lossless(options, alice_path):
    check_lossless_with(alice_path.read_bytes(), **options)
    for text in CRAFTED.values():
        check_lossless_with(text.encode("utf-8"), **{k: v for k, v in options.items() if k != "crlf" or not v})


def test_layout_serializes_and_refuses_junk():
    for layout in (TextLayout(), TextLayout(crlf=True), TextLayout(False, False, False)):
        assert TextLayout.from_bytes(layout.to_bytes()) == layout
        assert TextLayout.from_dict(layout.to_dict()) == layout
    assert_refused(lambda: TextLayout.from_bytes(b"\x01\x08"), "text layout")
    assert_refused(lambda: TextLayout.from_bytes(b"\x02\x00"), "text layout")
    assert_refused(lambda: TextLayout.from_dict({"crlf": 1}), "text layout")


def test_decode_text_refuses_tokens_text_mode_never_makes():
    layout = TextLayout()
    assert_refused(lambda: decode_text(np.array([261, 262]), layout), "BOS")
    assert_refused(lambda: decode_text(np.array([BOS, 261, 2]), layout), "position 2")
    assert_refused(lambda: decode_text(np.array([BOS, 5000]), layout), "5000")


def test_alice_text_tokens_look_like_the_challenge_tokens(alice_path):
    # Apart from whitespace, text mode must tokenize like the official tokenizer: a line of prose
    # without CR, tabs or double spaces gets identical tokens.
    line = b"So she was considering in her own mind (as well as she could,"
    assert line in alice_path.read_bytes()
    assert encode_text(line).tokens[1:].tolist() == default_tokenizer().encode(line.decode())


# -------------------------------------------------------------------------------------------- sample


def test_sample_text_is_the_documented_fineweb_documents(fineweb_shard_path):
    path = sample_text_path()
    import ctxmix

    assert path.is_file() and Path(ctxmix.__file__).resolve().parent in path.resolve().parents  # shipped inside
    data = path.read_bytes()
    assert 60_000 <= len(data) <= 100_000
    sources = (path.parent / "SOURCES.md").read_text(encoding="utf-8")
    assert hashlib.sha256(data).hexdigest() in sources

    tokens = read_shard(fineweb_shard_path, max_tokens=80_000)
    bos = np.flatnonzero(tokens == BOS)
    sp = default_tokenizer()
    docs = [tokens[bos[k] + 1 : bos[k + 1]].tolist() for k in SAMPLE_DOCS]
    lines = data.decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(docs)
    for doc, line in zip(docs, lines):
        assert sp.decode(doc) == line
        assert encode_text(line.encode("utf-8")).tokens[1:].tolist() == doc  # text mode = the shard's tokens
    stream = load_text(path)
    assert stream.scored_bytes == len(data)
    assert re.fullmatch(r"[^\r\t]*", data.decode("utf-8"))


def test_two_thread_encoding_equals_one_pass_tokenization(text_dir):
    """Both texts are long enough for the two-thread split (``SPLIT_NBYTES``): the halves' tokens joined
    are SentencePiece's tokens of the whole text, and with every layout step on, those of one pass."""
    from ctxmix.data.text import SPLIT_NBYTES, _scheme, _tokenize
    from ctxmix.kernels.text import layout_apply

    scheme = _scheme()
    for name in ("lcet10.txt", "enwik8.first300k"):
        data = (text_dir / name).read_bytes()
        assert "▁".encode() not in data and len(data) > max(10 * 4096, SPLIT_NBYTES) and scheme.splits
        plain = encode_text(data, crlf=False, line_space=False, space_runs=False)
        np.testing.assert_array_equal(plain.tokens[1:], identity_tokenizer().encode(data.decode("utf-8")))
        layout = encode_text(data).layout
        one_pass = _tokenize(layout_apply(np.frombuffer(data, np.uint8), 0, len(data), layout.crlf, True,
                                          scheme.starts_word).tobytes(), scheme)
        no_runs = encode_text(data, space_runs=False)
        np.testing.assert_array_equal(no_runs.tokens[1:], one_pass)
        assert no_runs.layout.crlf == (name == "lcet10.txt")


def _reference_decode(tokens: np.ndarray, layout) -> bytes:
    """decode_text as byte-string steps (join, regex, replace): what the numba kernel must equal."""
    from ctxmix.data.text import _scheme

    scheme = _scheme()
    pieces = scheme.pieces_runs if layout.space_runs else scheme.pieces
    text = b"".join(pieces[t] for t in tokens[1:].tolist())
    if layout.line_space:
        text = re.sub(rb"([\n\r\t]) ", rb"\1", text)
    if layout.crlf:
        text = text.replace(b"\n", b"\r\n")
    return text


def test_numba_bpe_equals_sentencepiece_on_awkward_and_long_words():
    """The numba encoder against SentencePiece itself: short mixed texts, and words long enough for the
    heap path (runs without spaces, repeated merges, ties between equal pairs)."""
    from ctxmix.data.text import _scheme, _tokenize, _tokenize_sentencepiece
    from ctxmix.kernels.text import SCAN_MAX_SYMBOLS

    scheme = _scheme()
    assert scheme.bpe is not None  # the shipped vocabulary meets the encoder's assumptions
    alphabet = list("ab Z9.,\n\r\tQx") + ["  ", "the", "ing", "▁", "é", "😀", "\u00a0", "\x00", "“", "aaaa", "=="]
    rng = np.random.default_rng(11)
    texts = ["".join(rng.choice(alphabet, size=int(rng.integers(1, 120)))) for _ in range(400)]
    letters = list("abcdefghijklmnopqrstuvwxyz.,'")
    texts += ["a" * 500, "ab" * 301, "the" * 200, "".join(rng.choice(letters, size=3000)),
              " " + "".join(rng.choice(letters, size=SCAN_MAX_SYMBOLS + 1))]
    for text in texts:
        data = text.encode("utf-8")
        np.testing.assert_array_equal(_tokenize(data, scheme), _tokenize_sentencepiece(data, scheme), err_msg=text)


@pytest.mark.parametrize("options", [{}, {"line_space": False}, {"space_runs": False}, {"crlf": True}])
def test_decode_kernel_equals_the_byte_string_steps(options, alice_path):
    data = alice_path.read_bytes()[:20000]
    data = data[: data.rfind(b"\r\n") + 2]
    encoded = encode_text(data, **options)
    assert _reference_decode(encoded.tokens, encoded.layout) == data == decode_text(encoded.tokens, encoded.layout)
    rng = np.random.default_rng(2)  # any token sequence, not only what the encoder makes
    from ctxmix.data.text import _scheme

    allowed = np.flatnonzero(~_scheme().forbidden)
    for _ in range(50):
        tokens = np.concatenate(([BOS], rng.choice(allowed, size=200))).astype(np.int64)
        assert decode_text(tokens, encoded.layout) == _reference_decode(tokens, encoded.layout)


def test_layout_kernel_equals_the_byte_string_steps_whole_and_in_spans(text_dir):
    """``layout_apply`` against ``bytes.replace`` (CRLF) and the regex (line space), on the whole text and
    cut in two right after each of the first line ends: the spans' texts joined are the whole text's."""
    from ctxmix.data.text import _scheme, is_all_crlf
    from ctxmix.kernels.text import layout_apply

    scheme = _scheme()
    samples = [CRAFTED[name].encode("utf-8") for name in sorted(CRAFTED)]
    samples += [(text_dir / name).read_bytes() for name in ("alice29.txt", "xargs.1", "fields.c")]
    for data in samples:
        view = np.frombuffer(data, np.uint8)
        for crlf in {False, is_all_crlf(data)}:
            for line_space in (False, True):
                replaced = data.replace(b"\r\n", b"\n") if crlf else data
                expected = scheme.line_space_insert.sub(rb"\1 ", replaced) if line_space else replaced
                assert layout_apply(view, 0, len(data), crlf, line_space, scheme.starts_word).tobytes() == expected
                cuts = [i + 1 for i in range(len(data)) if data[i] == 0x0A][:20]
                for cut in cuts:
                    spans = (layout_apply(view, 0, cut, crlf, line_space, scheme.starts_word),
                             layout_apply(view, cut, len(data), crlf, line_space, scheme.starts_word))
                    assert b"".join(span.tobytes() for span in spans) == expected


def _line_space_reference(data: bytes, crlf: bool, starters: set[int]) -> bytes:
    """The layout steps character by character: CRs before LFs dropped, then a space after each "\n",
    "\r", "\t" whose next character is in ``starters``."""
    text = data.decode("utf-8")
    if crlf:
        text = text.replace("\r\n", "\n")
    out = []
    for k, char in enumerate(text):
        out.append(char)
        if char in "\n\r\t" and k + 1 < len(text) and ord(text[k + 1]) in starters:
            out.append(" ")
    return "".join(out).encode("utf-8")


@pytest.mark.parametrize("starters", ["the vocabulary's", " a\t\n\r"])
def test_layout_kernel_follows_the_rule_for_any_starters_and_any_cut(starters):
    """Also where line breaks themselves would start words (no shipped vocabulary does that): a dropped
    CR is neither a line break nor the character after one, and spans cut at any character boundary
    join to the whole text."""
    from ctxmix.data.text import MAX_CODEPOINT, _scheme
    from ctxmix.kernels.text import layout_apply

    if starters == "the vocabulary's":
        starts_word = _scheme().starts_word
    else:
        starts_word = np.zeros(MAX_CODEPOINT + 1, np.bool_)
        starts_word[[ord(c) for c in starters]] = True
    codes = set(np.flatnonzero(starts_word).tolist())
    alphabet = ["a", "b", " ", "\n", "\r\n", "\r", "\t", "é", "▁", "\n\r\n", "\t\r\n"]
    rng = np.random.default_rng(5)
    for _ in range(200):
        data = "".join(rng.choice(alphabet, size=int(rng.integers(1, 40)))).encode("utf-8")
        view = np.frombuffer(data, np.uint8)
        boundaries = [i for i in range(1, len(data)) if data[i] & 0xC0 != 0x80]  # character starts
        for crlf in (False, True):
            expected = _line_space_reference(data, crlf, codes)
            assert layout_apply(view, 0, len(data), crlf, True, starts_word).tobytes() == expected, data
            for cut in boundaries:  # (even between a dropped CR and its LF)
                joined = (layout_apply(view, 0, cut, crlf, True, starts_word).tobytes()
                          + layout_apply(view, cut, len(data), crlf, True, starts_word).tobytes())
                assert joined == expected, (data, crlf, cut)


def test_tokens_that_do_not_decode_back_are_refused_with_the_first_difference(write_file, monkeypatch):
    """Every text is decoded again before it is scored or coded; a tokenizer fault (here: a swapped
    pair of tokens) is refused in one line naming the file and the first differing byte."""
    import ctxmix.data.text as text

    path = write_file("swapped.txt", "a cat sat on the mat\n")
    real = text._tokenize

    def swapped(data, scheme):
        ids = real(data, scheme).copy()
        ids[[1, 2]] = ids[[2, 1]]
        return ids

    monkeypatch.setattr(text, "_tokenize", swapped)
    message = assert_refused(lambda: load_text(path), str(path), "do not decode back", "first difference at byte")
    offset = int(re.search(r"byte (\d+)", message).group(1))
    assert 0 < offset < len("a cat sat")


def test_a_fault_in_either_half_of_a_long_text_is_refused_where_it_is(write_file, monkeypatch):
    """A long text is encoded and checked in two halves: a swapped pair in the second half is reported
    at its byte in the file, and a first half that ends in a state other than its "\n" (here a trailing
    space token, which decodes to nothing there) is refused at the cut."""
    from ctxmix.data import text

    first_line, second_line = b"a cat sat on the mat\n", b"the dog ran far off.\n"
    assert len(first_line) == len(second_line)
    lines = 2 * text.SPLIT_NBYTES // len(first_line)
    data = first_line * lines + second_line * lines
    path = write_file("long.txt", data.decode())
    cut = data.find(b"\n", len(data) // 2) + 1
    assert data[cut : cut + len(second_line)] == second_line  # the second half starts with a "dog" line
    real = text._tokenize

    def second_half_swapped(span, scheme):
        ids = real(span, scheme).copy()
        if b"dog" in span[:8]:
            ids[[1, 2]] = ids[[2, 1]]
        return ids

    def first_half_trailing_space(span, scheme):
        ids = real(span, scheme)
        return np.append(ids, scheme.space_id) if span.startswith(b"a cat") else ids

    monkeypatch.setattr(text, "_tokenize", second_half_swapped)
    message = assert_refused(lambda: load_text(path), str(path), "do not decode back", "first difference at byte")
    assert cut < int(re.search(r"byte (\d+)", message).group(1)) < cut + len("the dog")
    monkeypatch.setattr(text, "_tokenize", first_half_trailing_space)
    assert_refused(lambda: load_text(path), str(path), f"first difference at byte {cut})")
    monkeypatch.setattr(text, "_tokenize", lambda span, scheme: second_half_swapped(
        span, scheme) if b"dog" in span[:8] else first_half_trailing_space(span, scheme))
    assert_refused(lambda: load_text(path), str(path), f"first difference at byte {cut})")  # the first one


def test_byte_counts_are_the_bytes_each_token_decodes_to(alice_path):
    """alice29 is CRLF: its LF tokens count 2 bytes; dropped line spaces count 0."""
    encoded = encode_text(alice_path.read_bytes()[:30000])
    assert encoded.layout.crlf and encoded.layout.line_space
    for t in (1, 2, 100, 2000, len(encoded.tokens) - 1):
        assert int(encoded.nbytes[: t + 1].sum()) == len(decode_text(encoded.tokens[: t + 1], encoded.layout)), t
