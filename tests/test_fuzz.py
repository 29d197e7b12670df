"""Property-based fuzzing of every parser that takes untrusted bytes or strings.

Spec strings, shard headers, .ptz artifacts, .cmx containers, traces and text-mode input: whatever the
input, the answer is a result or one ``CtxmixError`` whose message is a single line. Any other exception
(an internal error) fails the test, and hypothesis shrinks it to a small example. Where a parser's result
feeds a score, the score must be finite.

The CI run is short and reproducible: a fixed number of examples per parser, ``derandomize=True``.
A longer run explores new inputs each time (random seeds, more examples):

    CTXMIX_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py

(docs/security.md).
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ctxmix import api, codec
from ctxmix.data import TextLayout, decode_text, encode_text, load_shards, load_text
from ctxmix.data.shard import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION
from ctxmix.errors import CtxmixError
from ctxmix.experts import registry as expert_registry
from ctxmix.mixers import registry as mixer_registry
from ctxmix.models import baseline, describe, load_model, quant
from ctxmix.models.artifact import META_KEY, compress as compress_payload, parse_artifact
from ctxmix.trace import load_trace, mix_trace
from fixtures.data import TEXT

from test_cli import invoke

LONG_RUN = int(os.environ.get("CTXMIX_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int):
    """Hypothesis settings: ``examples`` fixed examples in CI, CTXMIX_FUZZ_EXAMPLES random ones when set."""
    return settings(max_examples=LONG_RUN or examples, derandomize=not LONG_RUN, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def refused_or(fn, *args, **kwargs):
    """``fn``'s result, or None when it raised a CtxmixError of one non-empty line; anything else escapes."""
    try:
        result = fn(*args, **kwargs)
    except CtxmixError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        event(f"{fn.__name__}: refused")  # --hypothesis-show-statistics: how much reaches a result
        return None
    event(f"{fn.__name__}: result")
    return result


def finite_rows(report) -> None:
    for row in report.runs:
        assert math.isfinite(row["bits"]) and math.isfinite(row["bpb"]), row


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: 0 flips bits of a byte, 1 truncates, 2 inserts a byte."""
    out = bytearray(data)
    for kind, position, value in edits:
        if not out:
            out.append(value)
            continue
        at = position % len(out)
        if kind == 0:
            out[at] ^= value or 1
        elif kind == 1:
            del out[at:]
        else:
            out.insert(at, value)
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1, max_size=4)

# Values that have broken option parsing and arithmetic before: non-finite, huge, tiny, negative, malformed;
# and plausible ones, so that a spec with several options often gets through to a run.
HOSTILE_TEXTS = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e308", "-1e308", "1e-300", "-1e-300", "-0", "-1",
                     "1_0", "99999999999999999999", "1e9", "-1e9", "2147483648", "", " ", "11-2", "0;0", "x",
                     "1e999"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(1 << 70), 1 << 70).map(str),
)
PLAUSIBLE_TEXTS = st.sampled_from(["0", "1", "2", "3", "4", "0.01", "0.1", "0.5", "0.9", "1e-6", "100", "2-4",
                                   "2-6", "3-3", "0.5;0.7", "true", "false", "exact", "hashed", "order", "none"])
NUMBER_TEXTS = st.one_of(PLAUSIBLE_TEXTS, PLAUSIBLE_TEXTS, HOSTILE_TEXTS)


@st.composite
def spec_strings(draw, registry, neural: bool = False):
    """``name:key=value,...`` over a registry's names (the neural expert only with ``neural``, alone) and
    option names, with hostile values."""
    name = "neural" if neural else draw(st.sampled_from([n for n in registry.names() if n != "neural"]))
    options = getattr(registry.get(name), "Options", None)
    fields = list(options.__dataclass_fields__.values()) if options is not None else []
    keys = [f.name for f in fields if not f.metadata.get("positional")]
    positional = any(f.metadata.get("positional") for f in fields)
    chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=2)) if keys else []
    items = [f"{key}={draw(NUMBER_TEXTS)}" for key in chosen]
    if positional:
        items += draw(st.lists(NUMBER_TEXTS, max_size=3))
    if draw(st.integers(0, 9)) == 0:
        items.append(draw(NUMBER_TEXTS))  # now and then a stray item
    return f"{name}:{','.join(items)}" if items else name


@pytest.fixture(scope="module")
def tiny_stream():
    """The first 160 tokens of grammar.lsp: long enough for every expert to learn, short enough to be quick."""
    return load_text(TEXT / "grammar.lsp").prefix(160)


# ---------------------------------------------------------------- spec strings


@fuzz(60)
@given(spec=st.text(max_size=40))
def test_any_string_parses_to_a_spec_or_one_line(spec):
    for registry in (expert_registry, mixer_registry):
        refused_or(registry.parse, spec)


@fuzz(80)
@given(spec=spec_strings(expert_registry))
def test_expert_specs_with_hostile_values_score_finite_or_refuse(tiny_stream, spec):
    report = refused_or(api.run_streams, [tiny_stream], [spec], ["none"])
    if report is not None:
        finite_rows(report)


@fuzz(80)
@given(spec=spec_strings(mixer_registry))
def test_mixer_specs_with_hostile_values_score_finite_or_refuse(tiny_stream, spec):
    report = refused_or(api.run_streams, [tiny_stream], ["unigram", "ngram:orders=2-4"], [spec])
    if report is not None:
        finite_rows(report)


@fuzz(30)
@given(spec=spec_strings(expert_registry, neural=True))
def test_neural_specs_with_hostile_values_build_or_refuse(spec):
    refused_or(expert_registry.parse, spec)


# ---------------------------------------------------------------- shard headers


@fuzz(80)
@given(
    magic=st.sampled_from([SHARD_MAGIC, SHARD_MAGIC, SHARD_MAGIC, SHARD_MAGIC + 1, 0, -1]),
    version=st.sampled_from([SHARD_VERSION, SHARD_VERSION, SHARD_VERSION, 0, 2, -(1 << 31)]),
    count=st.one_of(st.none(), st.integers(-(1 << 31), (1 << 31) - 1), st.integers(0, 40)),  # None: the true one
    tokens=st.lists(st.integers(0, 65535), max_size=40),
    stray=st.binary(max_size=3),
    max_tokens=st.one_of(st.none(), st.integers(-2, 50)),
)
def test_any_shard_header_loads_or_refuses_in_one_line(tmp_path_factory, magic, version, count, tokens, stray,
                                                       max_tokens):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = magic, version, len(tokens) if count is None else count
    path = tmp_path_factory.mktemp("shard") / "fuzz.bin"
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes() + stray)
    stream = refused_or(load_shards, str(path), max_tokens=max_tokens)
    if stream is not None:
        assert len(stream.tokens) >= 2 and int(stream.tokens.max()) < stream.vocab_size


@fuzz(40)
@given(data=st.binary(max_size=2100))
def test_any_bytes_as_a_shard_load_or_refuse_in_one_line(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("shard") / "bytes.bin"
    path.write_bytes(data)
    refused_or(load_shards, str(path))


# ---------------------------------------------------------------- .ptz artifacts

TINY_CONFIG = baseline.Config(vocab_size=32, num_layers=2, model_dim=16, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def tiny_artifacts() -> dict[str, bytes]:
    """A 2-layer, 16-wide baseline model's artifact in each compression (a few KB each)."""
    torch.manual_seed(0)
    model = baseline.Model(TINY_CONFIG)
    obj = quant.quantize_state_dict_int8({k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()})
    buf = io.BytesIO()
    torch.save({**obj, META_KEY: {"family": "baseline", "train_seq_len": 64}}, buf)
    return {name: compress_payload(buf.getvalue(), name, 1 if name != "zstd" else 3)
            for name in ("zlib", "zstd", "xz", "lzma", "none")}


def load_artifact_everywhere(data: bytes, directory: Path) -> None:
    """parse, then describe and load_model from a file: each a result or one line."""
    artifact = refused_or(parse_artifact, data, "fuzz.ptz")
    if artifact is None:
        return
    path = directory / "fuzz.ptz"
    path.write_bytes(data)
    if refused_or(describe, path) is not None:
        loaded = refused_or(load_model, path)
        if loaded is not None:
            with torch.inference_mode():
                assert torch.isfinite(loaded.model(torch.zeros(1, 4, dtype=torch.int64))).all()


@fuzz(60)
@given(compression=st.sampled_from(["zlib", "zstd", "xz", "lzma", "none"]), edits=EDITS)
def test_damaged_artifacts_load_or_refuse_in_one_line(tiny_artifacts, tmp_path_factory, compression, edits):
    load_artifact_everywhere(mutate(tiny_artifacts[compression], edits), tmp_path_factory.mktemp("ptz"))


META_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(1 << 70), 1 << 70), st.booleans(),
    st.sampled_from([0, 1, -5, 2, 16, 32, 64, 1 << 40, "baseline", "record", "repeat", "9,10", ""]),
    st.sampled_from([2, 16, 32, 64, 128, 1.5, 10.0, 30.0, 10000.0, True, "baseline"]),  # the tiny model's own
    st.sampled_from([2, 16, 32, 64, 128, 1.5, 10.0, 30.0, 10000.0, True, "baseline"]),
)


@fuzz(60)
@given(meta=st.dictionaries(st.sampled_from([*TINY_CONFIG.__dataclass_fields__, "family", "steps"]), META_VALUES,
                            max_size=4))
def test_any_metadata_loads_a_consistent_model_or_refuses_in_one_line(tmp_path_factory, meta):
    model = baseline.Model(TINY_CONFIG)
    obj = quant.quantize_state_dict_int8(model.state_dict())
    buf = io.BytesIO()
    torch.save({**obj, META_KEY: meta}, buf)
    load_artifact_everywhere(zlib.compress(buf.getvalue(), 1), tmp_path_factory.mktemp("meta"))


# ---------------------------------------------------------------- .cmx containers


@pytest.fixture(scope="module")
def tiny_container(tmp_path_factory) -> Path:
    """The first 400 bytes of grammar.lsp coded with unigram alone."""
    directory = tmp_path_factory.mktemp("cmx")
    source = directory / "grammar.txt"
    source.write_bytes((TEXT / "grammar.lsp").read_bytes()[:400])
    out = directory / "grammar.cmx"
    codec.compress(source, out, experts=["unigram"], mixers=["none"])
    return out


@fuzz(60)
@given(edits=EDITS)
def test_damaged_containers_read_or_refuse_in_one_line(tiny_container, edits):
    data = mutate(tiny_container.read_bytes(), edits)
    path = tiny_container.parent / "damaged.cmx"
    path.write_bytes(data)
    refused_or(codec.read_container, path)


HEADER_FIELDS = st.fixed_dictionaries({}, optional={
    "tokens": st.one_of(st.integers(0, (1 << 64) - 1), st.integers(0, 1000)),  # the file holds about 250
    "input_bytes": st.integers(0, (1 << 64) - 1),
    "first_token": st.integers(0, 65535),
    "vocab_size": st.sampled_from([0, 1, 2, 1023, 1024, 65535]),
    "layout": st.binary(min_size=2, max_size=2),
    "experts": st.lists(spec_strings(expert_registry), min_size=1, max_size=2),
    "mixer": st.one_of(st.none(), spec_strings(mixer_registry)),
})


@fuzz(50)
@given(fields=HEADER_FIELDS, words=st.one_of(st.none(), st.lists(st.integers(0, (1 << 32) - 1), max_size=40)))
def test_crafted_container_headers_decompress_or_refuse_in_one_line(tiny_container, fields, words):
    """Headers with valid crcs but hostile fields: the decoder is bounded by the payload, whatever it says."""
    header, payload = codec.read_container(tiny_container)
    header.update(fields)
    if words is not None:
        payload = np.asarray(words, dtype=np.uint32)
        header["payload_words"], header["payload_crc32"] = len(payload), zlib.crc32(payload.astype("<u4").tobytes())
    path = tiny_container.parent / "crafted.cmx"
    try:
        path.write_bytes(b"".join(codec._container_parts(header, payload)))
    except (CtxmixError, struct.error):
        return  # a field the format cannot hold at all: nothing to read
    out = tiny_container.parent / "crafted.out"
    out.unlink(missing_ok=True)
    result = refused_or(codec.decompress, path, out)
    if result is None:
        assert not out.exists()  # nothing wrong is ever written


# ---------------------------------------------------------------- traces


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory, tiny_stream) -> dict[str, np.ndarray]:
    from ctxmix.trace import save_trace

    report = api.run_streams([tiny_stream], ["unigram", "ngram:orders=2-4"], ["none"], keep_trace=True)
    path = tmp_path_factory.mktemp("trace") / "tiny.trace"
    save_trace(path, report.results[0], tiny_stream, report.experts)
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


HOSTILE_FLOATS = st.sampled_from([np.nan, np.inf, -np.inf, -1e308, 1e308, -745.0, -744.0, 0.0, 1e-9, 2e-9, -1.0])
HOSTILE_INTS = st.sampled_from([-1, 0, 1, 5, 1023, 1024, 65536, 1 << 62, -(1 << 63)])


@st.composite
def trace_changes(draw, arrays):
    """Point changes to a trace's arrays and meta: hostile values, other dtypes and shapes."""
    changed = {name: array.copy() for name, array in arrays.items()}
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(["logp", "features", "tokens", "nbytes", "meta", "shape", "dtype"]))
        unchanged_dtype = name in arrays and changed[name].dtype == arrays[name].dtype
        if name in ("logp", "features") and changed[name].size and unchanged_dtype:
            flat = changed[name].reshape(-1)
            flat[draw(st.integers(0, flat.size - 1))] = draw(HOSTILE_FLOATS)
        elif name in ("tokens", "nbytes") and len(changed[name]) and unchanged_dtype:
            changed[name][draw(st.integers(0, len(changed[name]) - 1))] = draw(HOSTILE_INTS)
        elif name == "meta":
            meta = json.loads(str(changed["meta"][0]))
            key = draw(st.sampled_from(["name", "mode", "vocab_size", "experts", "features", "version", "format"]))
            meta[key] = draw(st.one_of(st.text(max_size=6), st.integers(-3, 1 << 40), st.none(), st.floats(),
                                       st.lists(st.text(max_size=4), max_size=2),
                                       st.lists(st.lists(st.integers(-1, 3), max_size=2), max_size=2)))
            changed["meta"] = np.array([json.dumps(meta)])
        elif name == "shape":
            target = draw(st.sampled_from(["logp", "features", "tokens", "nbytes"]))
            changed[target] = changed[target][: draw(st.integers(0, 3))]
        else:
            target = draw(st.sampled_from(["logp", "tokens", "nbytes"]))
            with np.errstate(invalid="ignore"):  # NaN cast to an int: whatever it gives is the hostile value
                changed[target] = arrays[target].astype(draw(st.sampled_from([np.float32, np.int32, np.uint8, "<U3"])))
    return changed


def score_trace(path: Path) -> None:
    trace = refused_or(load_trace, path)
    if trace is not None:
        report = refused_or(mix_trace, trace, ["none", "hedge", "fixedshare", "adaptive", "pr909"])
        if report is not None:
            finite_rows(report)


@fuzz(60)
@given(data=st.data())
def test_any_changed_trace_mixes_finite_or_refuses_in_one_line(tiny_trace, tmp_path_factory, data):
    arrays = data.draw(trace_changes(tiny_trace))
    path = tmp_path_factory.mktemp("trace") / "changed.trace"
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    score_trace(path)


@fuzz(40)
@given(edits=EDITS)
def test_damaged_trace_files_load_or_refuse_in_one_line(tiny_trace, tmp_path_factory, edits):
    buf = io.BytesIO()
    np.savez(buf, **tiny_trace)
    path = tmp_path_factory.mktemp("trace") / "damaged.trace"
    path.write_bytes(mutate(buf.getvalue(), edits))
    score_trace(path)


# ---------------------------------------------------------------- text mode

TEXTISH = st.lists(st.one_of(
    st.sampled_from([b"\r\n", b"\n", b"\r", b"\t", b" ", b"  ", b" " * 20, "\u2581".encode(), b"a", b"word",
                     b"\xc3\xa9", b"\xf0\x9f\x98\x80", b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\x00"]),
    st.binary(max_size=4),
    st.text(max_size=6).map(lambda s: s.encode("utf-8")),
), max_size=24).map(b"".join)


@fuzz(100)
@given(data=TEXTISH)
def test_any_bytes_tokenize_losslessly_or_refuse_in_one_line(data):
    encoded = refused_or(encode_text, data, where="fuzz")
    if encoded is not None:
        assert decode_text(encoded.tokens, encoded.layout) == data
        assert int(encoded.nbytes[1:].sum()) == len(data)


@fuzz(60)
@given(tokens=st.lists(st.integers(-2, 1100), max_size=30),
       layout=st.one_of(st.builds(lambda *flags: TextLayout(*flags).to_bytes(), st.booleans(), st.booleans(),
                                  st.booleans()),
                        st.binary(min_size=0, max_size=3)))
def test_any_tokens_and_layout_decode_or_refuse_in_one_line(tokens, layout):
    parsed = refused_or(TextLayout.from_bytes, layout)
    if parsed is not None:
        refused_or(decode_text, np.asarray([1, *tokens], dtype=np.int64), parsed)


# ---------------------------------------------------------------- the CLI on hostile files


@fuzz(15)
@given(edits=EDITS)
def test_the_cli_answers_a_damaged_container_with_one_error_line(tiny_container, edits):
    path = tiny_container.parent / "cli.cmx"
    path.write_bytes(mutate(tiny_container.read_bytes(), edits))
    out = tiny_container.parent / "cli.out"
    out.unlink(missing_ok=True)
    result = invoke("decompress", path, "-o", out, "--quiet")
    if result.exit_code != 0:
        lines = result.stderr.splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert "internal error" not in lines[0] and not out.exists()
