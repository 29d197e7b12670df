"""Hostile input, one test per defect found against the CLI (issue 15): outputs, crafted containers,
absurd option values, lying artifact metadata, damaged payloads, crafted traces, empty input, training
configs, names that hold control characters or undecodable bytes, and the neural options of ``score``.

Every refusal must keep the error contract of ``test_cli.assert_one_line_error``: exit status 1, nothing
on stdout, one ``error: ...`` line on stderr, never ``internal error``, and no result printed.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import stat
import subprocess
import sys
import time
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ctxmix import codec
from ctxmix.codec import read_container
from ctxmix.errors import CtxmixError, printable
from ctxmix.models.artifact import ZIP_MAGIC, read_artifact, save_artifact
from ctxmix.trace import load_trace
from ctxmix_train.cli import cli as train_cli
from fixtures.data import TEXT

from test_cli import assert_one_line_error, invoke, json_of

SMALL_TEXT = TEXT / "grammar.lsp"  # 3,721 bytes of ASCII
UNIGRAM = ["-e", "unigram", "-m", "none"]


def one_line_error(result, *fragments: str) -> str:
    """``assert_one_line_error``, and never the catch-all for unexpected failures."""
    line = assert_one_line_error(result, *fragments)
    assert "internal error" not in line, line
    return line


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A copy of grammar.lsp that the test may lose (and must not)."""
    path = tmp_path / "grammar.lsp"
    path.write_bytes(SMALL_TEXT.read_bytes())
    return path


@pytest.fixture
def packed(small: Path, tmp_path: Path) -> Path:
    """grammar.lsp compressed with the unigram expert alone (fast to code and decode)."""
    out = tmp_path / "grammar.cmx"
    codec.compress(small, out, experts=["unigram"], mixers=["none"])
    return out


# ---------------------------------------------------------------- 1. outputs go where the path points


def test_an_output_through_a_symlink_writes_the_target_and_keeps_the_link(small, tmp_path):
    target = tmp_path / "real" / "out.cmx"
    target.parent.mkdir()
    target.write_bytes(b"old contents")
    link = tmp_path / "link.cmx"
    link.symlink_to(target)
    result = invoke("compress", small, "-o", link, *UNIGRAM, "--quiet")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes().startswith(codec.MAGIC)
    assert not list(target.parent.glob(".*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_a_symlink_to_a_missing_file_creates_that_file(packed, tmp_path):
    link = tmp_path / "restored.txt"
    link.symlink_to(tmp_path / "created.txt")
    assert invoke("decompress", packed, "-o", link, "--quiet").exit_code == 0
    assert link.is_symlink() and (tmp_path / "created.txt").read_bytes() == SMALL_TEXT.read_bytes()


def test_a_replaced_output_keeps_its_permission_bits(small, tmp_path):
    out = tmp_path / "kept.cmx"
    out.write_bytes(b"x")
    out.chmod(0o640)
    assert invoke("compress", small, "-o", out, *UNIGRAM, "--quiet").exit_code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


@pytest.mark.parametrize("device", ["/dev/null", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/2"])
def test_a_device_or_descriptor_output_is_refused_and_left_alone(packed, device):
    before = os.lstat(device)
    line = one_line_error(invoke("decompress", packed, "-o", device))
    assert "cannot write" in line and ("device" in line or "descriptor" in line)
    after = os.lstat(device)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)  # not replaced by a regular file


def test_a_fifo_or_directory_output_is_refused_before_any_work(small, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    one_line_error(invoke("score", small, *UNIGRAM, "--save-trace", fifo), "it is a FIFO")
    assert_one_line_error(invoke("compress", small, "-o", tmp_path, *UNIGRAM), "is a directory", exit_code=2)
    with pytest.raises(CtxmixError, match="it is a directory"):  # the library refuses it too
        codec.compress(small, tmp_path, experts=["unigram"], mixers=["none"])
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    link = tmp_path / "to_null"
    link.symlink_to("/dev/null")
    one_line_error(invoke("score", small, *UNIGRAM, "--plot", link), "character device")


# ---------------------------------------------------------------- 2. an output never replaces an input


def test_outputs_equal_to_the_input_are_refused_and_the_input_is_untouched(small, packed, tmp_path):
    original, container = small.read_bytes(), packed.read_bytes()
    one_line_error(invoke("compress", small, "-o", small, *UNIGRAM), "it is the input")
    one_line_error(invoke("score", small, *UNIGRAM, "--save-trace", small), "it is the input")
    one_line_error(invoke("score", small, *UNIGRAM, "--html", small), "it is the input")
    one_line_error(invoke("decompress", packed, "-o", packed), "it is the input")
    hard = tmp_path / "hard.txt"
    os.link(small, hard)  # another name for the same file
    one_line_error(invoke("compress", small, "-o", hard, *UNIGRAM), "it is the input")
    soft = tmp_path / "soft.txt"
    soft.symlink_to(small)
    one_line_error(invoke("compress", small, "-o", soft, *UNIGRAM), "it is the input")
    assert small.read_bytes() == original and packed.read_bytes() == container


def test_an_output_equal_to_the_model_artifact_is_refused(small, tmp_path):
    from ctxmix.experts.neural import resolve_model_path

    model = tmp_path / "model.ptz"
    model.write_bytes(Path(resolve_model_path("default")).read_bytes())
    one_line_error(invoke("score", small, "--model", model, "--save-trace", model), "it is the input")
    with pytest.raises(CtxmixError, match="it is the input"):
        codec.compress(small, model, experts=[f"neural:model={model}"], mixers=["none"])


# ---------------------------------------------------------------- 3. a .cmx is bounded by its own size


def rewrite_header(path: Path, **fields) -> None:
    """Re-pack ``path`` with header fields replaced and its crcs made consistent again (a crafted file)."""
    header, words = read_container(path)
    header.update(fields)
    path.write_bytes(b"".join(codec._container_parts(header, words)))


def test_a_header_announcing_more_tokens_than_the_payload_holds_stops_quickly(packed, tmp_path):
    rewrite_header(packed, tokens=10**7, input_bytes=10**7)
    started = time.perf_counter()
    line = one_line_error(invoke("decompress", packed, "-o", tmp_path / "out"),
                          "corrupt file: the payload", "is used up at token")
    assert time.perf_counter() - started < 30, line
    assert not (tmp_path / "out").exists()


def test_a_header_announcing_trillions_of_tokens_is_refused_before_allocating(packed, tmp_path):
    rewrite_header(packed, tokens=2 * 10**12, input_bytes=10**12)
    tracemalloc.start()
    try:
        line = one_line_error(invoke("decompress", packed, "-o", tmp_path / "out"), "corrupt header: tokens=")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "is out of range (maximum" in line and peak < 64 << 20


@pytest.mark.parametrize("spec, fragment", [
    ("ngram:max_mb=nan", "max_mb=nan is not a finite number"),
    ("ngram:table=hashed,buckets=3000000000", "buckets=3000000000 is out of range"),
    ("unigram:alpha=inf", "alpha=inf is not a finite number"),
])
def test_specs_stored_in_a_header_are_checked_like_command_line_specs(packed, tmp_path, spec, fragment):
    rewrite_header(packed, experts=[spec])
    one_line_error(invoke("decompress", packed, "-o", tmp_path / "out"), fragment)


# ---------------------------------------------------------------- 4. non-finite and absurd option values


@pytest.mark.parametrize("args, fragment", [
    (["-e", "ngram:max_mb=nan"], "not a finite number"),
    (["-e", "ngram:escape_rate=nan"], "not a finite number"),
    (["-e", "unigram:alpha=inf"], "not a finite number"),
    (["-e", "unigram:alpha=1e308"], "out of range (maximum"),
    (["-e", "unigram:alpha=5e-324"], "at least 1e-06"),  # > 0, yet an unseen token's p underflows to 0
    (["-e", "ngram:discount=1e-300"], "must be >= 1e-06"),
    (["-e", "neural:rope_base=nan"], "not a finite number"),
    (["-e", "neural:rope_base=1e-300"], "rope_base=1e-300 is out of range (minimum 1)"),
    (["-e", "neural:logit_softcap=1e-300"], "logit_softcap=1e-300 is out of range"),
    (["-e", "unigram", "-e", "ngram", "-m", "pr909:logw_floor=-inf"], "not a finite number"),
    (["-e", "unigram", "-e", "ngram", "-m", "adaptive:s=nan"], "not a finite number"),
    (["-e", "unigram", "-e", "uniform", "-m", "hedge:eta=1e308"], "out of range (maximum"),
    (["-e", "unigram", "-e", "uniform", "-m", "fixed:1e308,1e308"], "out of range (maximum"),
    (["-e", "ngram:orders=2-99999999999999999999"], "out of range"),
])
def test_non_finite_and_absurd_option_values_are_refused_in_one_line(small, args, fragment):
    args = args if "-m" in args else [*args, "-m", "none"]
    one_line_error(invoke("score", small, *args), fragment)


def test_no_command_prints_a_non_finite_score(small):
    from ctxmix.report import report_json, require_scores

    rows = [{"label": "x", "file": "f", "tokens": 3, "bytes": 4, "bits": float("nan"), "bpb": float("nan")},
            {"label": "y", "file": "f", "tokens": 3, "bytes": 0, "bits": 1.0, "bpb": float("nan")}]
    with pytest.raises(CtxmixError, match="not a finite number"):
        require_scores(rows[:1])
    with pytest.raises(CtxmixError, match="cover 0 bytes"):
        require_scores(rows[1:])

    class Rows:
        runs = rows
    with pytest.raises(CtxmixError):
        report_json(Rows())


# ---------------------------------------------------------------- 5. artifact metadata is checked


@pytest.fixture(scope="module")
def default_payload() -> dict:
    """The shipped model's quantized object (4 layers, 256 wide, 4 heads, vocabulary 1024)."""
    from ctxmix.experts.neural import resolve_model_path

    raw = lzma.decompress(Path(resolve_model_path("default")).read_bytes())
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def with_meta(payload: dict, path: Path, **meta) -> Path:
    obj = {k: v for k, v in payload.items() if k != "__ctxmix_meta__"}
    save_artifact(path, obj, compression="zlib", level=1, meta={"family": "baseline", **meta})
    return path


@pytest.mark.parametrize("meta, fragment", [
    ({"num_heads": 0}, "num_heads=0 is out of range"),
    ({"num_heads": 8}, "num_heads=8 contradicts the weights, which give num_heads=4"),
    ({"model_dim": 0}, "model_dim=0 is out of range"),
    ({"num_layers": 1_000_000_000}, "num_layers=1000000000 is out of range"),
    ({"num_layers": 5}, "num_layers=5 contradicts the weights"),
    ({"vocab_size": 2048}, "vocab_size=2048 contradicts the weights, which give vocab_size=1024"),
    ({"logit_softcap": float("nan")}, "logit_softcap=nan is not a finite number"),
    ({"rope_base": 0.0}, "rope_base=0 is out of range (minimum 1)"),
    ({"train_seq_len": -5}, "train_seq_len=-5 is out of range (minimum 1)"),
    ({"rope_base": 10**400}, "rope_base=(an integer of 1329 bits) is out of range"),
])
def test_metadata_that_is_absurd_or_contradicts_the_weights_is_refused(default_payload, tmp_path, small, meta, fragment):
    path = with_meta(default_payload, tmp_path / "meta.ptz", **meta)
    started = time.perf_counter()
    one_line_error(invoke("info", path), "artifact metadata", fragment)
    one_line_error(invoke("score", small, "--model", path, "-m", "none", "--quiet"), fragment)
    assert time.perf_counter() - started < 30


def test_metadata_that_repeats_the_weights_is_accepted(default_payload, tmp_path):
    path = with_meta(default_payload, tmp_path / "same.ptz", num_heads=4, vocab_size=1024, train_seq_len=128)
    info = json_of(invoke("info", path, "--json"))
    assert (info["heads"], info["vocab"], info["train_seq_len"]) == (4, 1024, 128)


@pytest.mark.parametrize("obj, fragment", [
    ({"w": torch.zeros(3, device="meta")}, "expected a dense CPU tensor"),
    ({"w": torch.zeros(3, dtype=torch.complex64)}, "expected a dense CPU tensor"),
    ({"w": torch.zeros(1).expand(10**8)}, "a view that repeats its data"),
    ({"w": torch.zeros(3), "b": "text"}, "unknown artifact layout"),
    ({"__quant_format__": "int8_clean_per_row_v1", "quantized": {"a": torch.zeros(2, 3, dtype=torch.int8)},
      "scales": {"a": torch.ones(2)}, "dtypes": {"a": "float8_e4m3fn"}, "passthrough": {}}, "expected a dense CPU tensor"),
])
def test_odd_state_dicts_are_refused_in_one_line(tmp_path, obj, fragment):
    buf = io.BytesIO()
    torch.save(obj, buf)
    path = tmp_path / "odd.ptz"
    path.write_bytes(zlib.compress(buf.getvalue()))
    one_line_error(invoke("info", path), fragment)


def test_a_refused_pickle_protocol_is_one_line_without_torch_warnings(default_payload, tmp_path):
    buf = io.BytesIO()
    torch.save(default_payload, buf, _use_new_zipfile_serialization=False, pickle_protocol=4)
    path = tmp_path / "legacy.ptz"
    path.write_bytes(zlib.compress(buf.getvalue(), 1))  # zlib's Adler-32 checks it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CtxmixError, match="refused to unpickle"):
            read_artifact(path)
    assert not caught, [str(w.message) for w in caught]
    # A real process, where Python would print a warning to stderr beside the error line.
    done = subprocess.run([sys.executable, "-m", "ctxmix", "info", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: artifact "), done.stderr


# ---------------------------------------------------------------- 6. damage never loads silently


def test_a_legacy_payload_without_a_checksum_is_refused_so_damage_cannot_pass(default_payload, tmp_path):
    buf = io.BytesIO()
    torch.save(default_payload, buf, _use_new_zipfile_serialization=False)
    raw = bytearray(buf.getvalue())
    assert not raw.startswith(ZIP_MAGIC)
    raw[len(raw) // 2] ^= 0x01  # a flipped bit in the weights
    for name, data in [("none", bytes(raw)), ("lzma", lzma.compress(bytes(raw), format=lzma.FORMAT_ALONE)),
                       ("xz", lzma.compress(bytes(raw), check=lzma.CHECK_NONE))]:
        path = tmp_path / f"legacy-{name}.ptz"
        path.write_bytes(data)
        one_line_error(invoke("info", path), "has no checksum")


def test_a_flipped_byte_in_a_zlib_compressed_legacy_payload_is_detected(default_payload, tmp_path):
    buf = io.BytesIO()
    torch.save(default_payload, buf, _use_new_zipfile_serialization=False)
    data = bytearray(zlib.compress(buf.getvalue(), 1))
    data[len(data) // 2] ^= 0x01
    path = tmp_path / "damaged.ptz"
    path.write_bytes(bytes(data))
    one_line_error(invoke("info", path), "corrupt zlib stream")


# ---------------------------------------------------------------- 7. traces are checked before use


@pytest.fixture
def trace_arrays(small, tmp_path) -> dict[str, np.ndarray]:
    trace = tmp_path / "small.trace"
    assert invoke("score", small, "-e", "unigram", "-e", "ngram:orders=2-4", "-m", "none", "--quiet",
                  "--save-trace", trace).exit_code == 0
    with np.load(trace, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def saved_trace(path: Path, arrays: dict, **changes) -> Path:
    with open(path, "wb") as handle:
        np.savez(handle, **{**arrays, **changes})
    return path


def test_a_trace_whose_byte_counts_would_wrap_is_refused(trace_arrays, tmp_path):
    nbytes = trace_arrays["nbytes"].copy()
    nbytes[1:3] = 1 << 62  # summed, these wrap to a negative int64
    path = saved_trace(tmp_path / "wrap.trace", trace_arrays, nbytes=nbytes)
    one_line_error(invoke("mix", "--trace", path, "-m", "hedge"), "byte counts outside 0..65536")


@pytest.mark.parametrize("change, fragment", [
    ("logp_tiny", "not log-probabilities"),
    ("logp_nan", "not log-probabilities"),
    ("features_nan", "features hold non-finite values"),
    ("features_inf", "features hold non-finite values"),
])
def test_a_trace_with_values_no_expert_gives_is_refused(trace_arrays, tmp_path, change, fragment):
    logp, features = trace_arrays["logp"].copy(), trace_arrays["features"].copy()
    if change == "logp_tiny":
        logp[5, 0] = -1e308  # finite, but no positive float64 has this log: its bits would overflow the sum
    elif change == "logp_nan":
        logp[5, 1] = np.nan
    else:
        features[7, 0] = np.nan if change == "features_nan" else np.inf
    path = saved_trace(tmp_path / "bad.trace", trace_arrays, logp=logp, features=features)
    one_line_error(invoke("mix", "--trace", path, "-m", "hedge", "-m", "adaptive"), fragment)


def test_a_trace_declaring_more_than_it_holds_is_refused_before_reading(trace_arrays, tmp_path):
    path = tmp_path / "declared.trace"
    saved_trace(path, trace_arrays)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (300_000_000, 2)})
    with zipfile.ZipFile(path, "a") as archive:  # a second 'logp' member, read in place of the first
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
            archive.writestr("logp.npy", header.getvalue() + b"\0" * 64)
    tracemalloc.start()
    try:
        with pytest.raises(CtxmixError, match="declares 4,800,000,000 bytes of data, its member holds 64"):
            load_trace(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


def test_a_deflated_trace_that_inflates_past_the_cap_is_refused_before_reading(trace_arrays, tmp_path):
    path = tmp_path / "bomb.trace"
    count = (1 << 30) // 8 + 1  # one float64 more than the cap
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (count,)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, array in trace_arrays.items():
            if name != "features":
                buf = io.BytesIO()
                np.save(buf, array)
                archive.writestr(name + ".npy", buf.getvalue())
        with archive.open("features.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            zeros = bytes(1 << 24)
            for _ in range(count * 8 // len(zeros)):
                member.write(zeros)
            member.write(bytes(count * 8 % len(zeros)))
    assert path.stat().st_size < 8 << 20  # a few MB that declare over 1 GiB
    tracemalloc.start()
    try:
        with pytest.raises(CtxmixError, match="declare more than 1,073,741,824 bytes"):
            load_trace(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


def test_control_characters_in_a_trace_name_never_reach_the_terminal(trace_arrays, tmp_path):
    meta = json.loads(str(trace_arrays["meta"][0]))
    meta["name"] = "evil\x1b]0;owned\x07\x1b[2J\u202ename"
    path = saved_trace(tmp_path / "named.trace", trace_arrays, meta=np.array([json.dumps(meta)]))
    result = invoke("mix", "--trace", path, "-m", "none")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout and "\u202e" not in result.stdout
    assert "evil\\x1b]0;owned\\x07\\x1b[2J\\u202ename" in result.stdout


# ---------------------------------------------------------------- 8. empty input


def test_compress_refuses_an_empty_file_like_score_does(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    one_line_error(invoke("compress", empty, "-o", tmp_path / "e.cmx", *UNIGRAM), "file is empty")
    one_line_error(invoke("score", empty, *UNIGRAM), "file is empty")
    assert not (tmp_path / "e.cmx").exists()


# ---------------------------------------------------------------- 9. ctxmix-train


def train_invoke(*args: str | os.PathLike):
    return CliRunner().invoke(train_cli, [os.fspath(a) for a in args])


@pytest.mark.parametrize("item, fragment", [
    ("matrix_lr=nan", "matrix_lr=nan is not a finite number"),
    ("matrix_lr=inf", "matrix_lr=inf is not a finite number"),
    ("matrix_lr=-1", "matrix_lr=-1 is out of range (minimum 0)"),
    ("vocab_size=99999999999999999999", "vocab_size=99999999999999999999 is out of range"),
    ("rope_base=1e-300", "rope_base=1e-300 is out of range"),
    ("beta2=2", "beta2=2 is out of range (maximum 1)"),
])
def test_train_config_refuses_non_finite_and_out_of_range_values(item, fragment):
    one_line_error(train_invoke("config", "--recipe", "toy", "--set", item), fragment)
    assert "NaN" not in train_invoke("config", "--recipe", "toy").stdout


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from ctxmix_train.prepare import prepare

    out = tmp_path_factory.mktemp("shards")
    prepare([TEXT / "alice29.txt"], out, 0.1, "challenge", 100_000)
    return out


TINY = ["num_layers=2", "model_dim=64", "num_heads=2", "num_kv_heads=1", "train_seq_len=64",
        "train_batch_tokens=2048", "micro_batch_seqs=32", "val_tokens=8192", "val_every=0", "log_every=0",
        "warmdown_iters=10", "lr_warmup_steps=0", "threads=1", "iterations=3"]


@pytest.mark.parametrize("diverging", [
    ["adam_eps=0", "scalar_lr=1e9"],  # NaN weights after a few steps
    ["matrix_lr=1e9", "tied_embed_lr=1e9", "scalar_lr=1e9"],  # finite weights whose fp16 scales overflow
])
def test_a_run_that_ends_with_unloadable_weights_writes_no_artifact(shards, tmp_path, diverging):
    out = tmp_path / "model.ptz"
    args = ["run", "--recipe", "toy", "--data", shards, "--out", out, "--quiet"]
    for item in TINY + diverging:
        args += ["--set", item]
    one_line_error(train_invoke(*args), "nothing was written")
    assert not out.exists() and not list(tmp_path.glob(".model.ptz*"))


def test_a_training_run_refuses_to_write_its_artifact_over_a_shard(shards):
    shard = next(shards.glob("val_*.bin"))
    before = shard.read_bytes()
    args = ["run", "--recipe", "toy", "--data", shards, "--out", shard, "--quiet"]
    for item in TINY:
        args += ["--set", item]
    one_line_error(train_invoke(*args), "it is the input")
    assert shard.read_bytes() == before


def test_prepare_leaves_no_folder_behind_after_a_bad_input(tmp_path):
    out = tmp_path / "new" / "shards"
    one_line_error(train_invoke("prepare", TEXT / "sum", "--out", out), "not UTF-8")
    one_line_error(train_invoke("prepare", TEXT / "grammar.lsp", tmp_path / "absent.txt", "--out", out),
                   "no such file")
    assert not out.exists()


# ---------------------------------------------------------------- 10. small ones


def test_model_beside_a_spec_that_names_its_model_is_refused_not_ignored(small):
    one_line_error(invoke("score", small, "-e", "neural:model=default", "--model", "other.ptz"),
                   "--model other.ptz is not used")


def test_undecodable_bytes_of_a_file_name_stay_valid_json(tmp_path):
    name = tmp_path / os.fsdecode(b"caf\xe9\x1b.txt")
    name.write_bytes(SMALL_TEXT.read_bytes())
    result = invoke("score", name, *UNIGRAM, "--json")
    (row,) = json.loads(result.stdout.encode("utf-8"))["runs"]  # stdout is valid UTF-8
    assert row["file"].endswith("caf\\xe9\x1b.txt")
    table = invoke("score", name, *UNIGRAM)
    assert table.exit_code == 0 and "\x1b" not in table.stdout and "caf\\xe9\\x1b.txt" in table.stdout


def test_printable_escapes_controls_and_undecodable_bytes_only():
    assert printable("plain ▁text ünïcode") == "plain ▁text ünïcode"
    assert printable("a\x1b[31mb\x00\u2028\u202e") == "a\\x1b[31mb\\x00\\u2028\\u202e"
    assert printable(os.fsdecode(b"\xff.txt")) == "\\xff.txt"
    assert printable("tab\there", controls=False) == "tab\there"
    assert "\n" not in str(CtxmixError("two\nlines\x1b"))


# ---------------------------------------------------------------- 11. score has eval's neural options


def test_score_takes_the_neural_options_eval_takes(small):
    options = ["--window", "256", "--stride", "128", "--batch-size", "4", "--device", "cpu"]
    data = json_of(invoke("score", small, "-e", "neural", "-m", "none", "--json", "--quiet", *options))
    spec = "neural:model=default,window=256,stride=128,batch_size=4,device=cpu"
    assert data["experts"] == [spec]
    same = json_of(invoke("score", small, "-e", spec, "-m", "none", "--json", "--quiet"))
    assert same["runs"] == data["runs"]
    one_line_error(invoke("score", small, "-e", "neural", "-m", "none", "--stride", "512", "--window", "256"),
                   "stride 512 is larger than the window 256")
