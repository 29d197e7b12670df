"""Artifact loading: formats, compressions, damaged and hostile files, family inference, describe()."""

from __future__ import annotations

import io
import os
import pickle
import zlib

import pytest
import torch

from ctxmix.errors import CtxmixError
from ctxmix.models import apply_overrides, baseline, describe, detect_family, load_model, quant, repeat
from ctxmix.models.artifact import (
    ARTIFACT_CAP_BYTES,
    META_KEY,
    decompress,
    detect_compression,
    pack_artifact,
    read_artifact,
    save_artifact,
    unpickle,
)

ARTIFACTS = {
    "samtruss_7L384d_c839523": "samtruss_7L384d_c839523.int8.ptz",
    "montysteele_6Lx2_adapters_6bit_dc69b08": "montysteele_6Lx2_adapters_6bit_dc69b08.int8.ptz",
}


@pytest.fixture(scope="module")
def artifact_dir(artifacts):
    return artifacts


@pytest.fixture(scope="module")
def samtruss_path(artifact_dir):
    return artifact_dir / ARTIFACTS["samtruss_7L384d_c839523"]


@pytest.fixture(scope="module")
def samtruss_raw(samtruss_path):
    """The decompressed torch payload of the samtruss artifact."""
    return zlib.decompress(samtruss_path.read_bytes())


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# -- real artifacts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARTIFACTS))
def test_every_shipped_artifact_loads_strictly(artifact_dir, name):
    loaded = load_model(artifact_dir / ARTIFACTS[name])
    assert loaded.family == ("repeat" if name.startswith("montysteele") else "baseline")
    # Every stored tensor became a parameter: nothing missing, nothing left over.
    params = dict(loaded.model.named_parameters())
    assert set(params) == set(loaded.artifact.state_dict)
    assert all(p.dtype == torch.float32 for p in params.values())


def test_describe_reports_the_samtruss_shape_and_size(samtruss_path):
    info = describe(samtruss_path)
    assert info["family"] == "baseline"
    assert (info["layers"], info["dim"], info["heads"], info["kv_heads"], info["vocab"]) == (7, 384, 8, 4, 1024)
    assert info["params"] == 7_630_520  # data README: parameter count of this artifact
    assert info["format"] == quant.INT8_FORMAT and info["value_bits"] == 8
    assert info["compression"] == "zlib"
    assert info["compressed_bytes"] == 2_943_945 == os.path.getsize(samtruss_path)
    assert info["raw_bytes"] == len(zlib.decompress(samtruss_path.read_bytes()))
    assert info["cap_bytes"] == ARTIFACT_CAP_BYTES == 16_000_000 and info["fits_cap"] is True
    assert info["train_seq_len"] == 1024 and info["train_seq_len_from"] == "default"  # no metadata in it


def test_describe_sees_the_montysteele_repeats_and_6_bit_values(artifact_dir):
    info = describe(artifact_dir / ARTIFACTS["montysteele_6Lx2_adapters_6bit_dc69b08"])
    assert info["family"] == "repeat"
    assert (info["layers"], info["effective_layers"], info["dim"]) == (6, 12, 512)
    assert info["params"] == 11_562_032
    assert info["value_bits"] == 6  # 31-level values stored in the int8 container


def test_an_artifact_over_16_000_000_bytes_is_reported_over_the_cap(tmp_path, samtruss_raw):
    obj = torch.load(io.BytesIO(samtruss_raw), map_location="cpu", weights_only=True)
    path = tmp_path / "big.ptz"
    save_artifact(path, obj, compression="none", meta={"note": "x" * 9_000_000})  # 7.7 MB of tensors + 9 MB
    info = describe(path)
    assert info["compressed_bytes"] == os.path.getsize(path) > ARTIFACT_CAP_BYTES
    assert info["fits_cap"] is False and info["compression"] == "none"


# -- compression and containers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_quantized():
    """A small random baseline GPT (2 layers, width 64), quantized as the baseline exports it."""
    torch.manual_seed(0)
    model = baseline.Model(baseline.Config(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return quant.quantize_state_dict_int8(model.state_dict())


@pytest.mark.parametrize("compression", ["zlib", "zstd", "xz", "lzma", "none"])
def test_each_compression_is_detected_by_magic_bytes_and_loads_the_same_tensors(tmp_path, tiny_quantized, compression):
    path = tmp_path / "model.bin"  # the name says nothing; the bytes do
    save_artifact(path, tiny_quantized, compression=compression)
    assert detect_compression(path.read_bytes()) == compression
    loaded = load_model(path)
    assert loaded.artifact.compression == compression and loaded.family == "baseline"
    expected = quant.dequantize_state_dict_int8(tiny_quantized)
    assert set(loaded.artifact.state_dict) == set(expected)
    assert all(torch.equal(loaded.artifact.state_dict[k], expected[k]) for k in expected)


def test_int8_quantizer_round_trips_through_the_dequantizer():
    torch.manual_seed(0)
    state = {"blocks.0.mlp.fc.weight": torch.randn(512, 256) * 0.05, "blocks.0.attn_scale": torch.rand(256),
             "tok_emb.weight": torch.randn(300, 256).bfloat16(), "step": torch.tensor(7)}
    obj = quant.quantize_state_dict_int8(state)
    assert obj["__quant_format__"] == quant.INT8_FORMAT and set(obj["quantized"]) == {"blocks.0.mlp.fc.weight", "tok_emb.weight"}
    back = quant.dequantize_state_dict_int8(obj)
    assert back["tok_emb.weight"].dtype == torch.bfloat16 and back["step"].item() == 7
    assert torch.equal(back["blocks.0.attn_scale"], state["blocks.0.attn_scale"])  # control tensors stay fp32
    w = state["blocks.0.mlp.fc.weight"]
    step = obj["scales"]["blocks.0.mlp.fc.weight"].float()[:, None]
    # Within half a step, plus what the fp16 rounding of the stored scale adds (|q| <= 127 steps of 2^-11).
    assert ((back["blocks.0.mlp.fc.weight"] - w).abs() <= step * (0.5 + 127 * 2.0**-11)).all()


def test_int6_mixed_quantizer_round_trips_and_keeps_values_in_6_bits():
    torch.manual_seed(1)
    state = {"blocks.0.attn.c_q.weight": torch.randn(512, 256), "tok_emb.weight": torch.randn(400, 256),
             "blocks.0.resid_mix": torch.rand(2, 256), "skip_weights": torch.rand(1, 256)}
    obj = quant.quantize_state_dict_mixed_int6(state)
    assert obj["m"]["blocks.0.attn.c_q.weight"] == {"type": "int6"}
    assert obj["m"]["tok_emb.weight"] == {"type": "int8"}
    assert int(obj["w"]["blocks.0.attn.c_q.weight.q"].abs().max()) <= 31
    back, fmt = quant.dequantize(obj)
    assert fmt == quant.INT6_MIXED_FORMAT and set(back) == set(state)
    w = state["blocks.0.attn.c_q.weight"]
    step = obj["w"]["blocks.0.attn.c_q.weight.scale"].float()[:, None]
    assert ((back["blocks.0.attn.c_q.weight"] - w).abs() <= step * 31).all()
    assert (back["blocks.0.attn.c_q.weight"] - w).pow(2).mean() < (w.pow(2).mean() * 0.01)


def test_an_int6_artifact_with_out_of_range_values_is_refused():
    obj = quant.quantize_state_dict_mixed_int6({"blocks.0.attn.c_q.weight": torch.randn(300, 256)})
    obj["w"]["blocks.0.attn.c_q.weight.q"][0, 0] = 100
    with pytest.raises(CtxmixError) as exc:
        quant.dequantize(obj)
    assert "outside -31..31" in one_line(exc)


# -- damaged and hostile files --------------------------------------------------------------------------


def test_zero_byte_file_is_one_line(tmp_path):
    path = tmp_path / "empty.ptz"
    path.write_bytes(b"")
    with pytest.raises(CtxmixError) as exc:
        read_artifact(path)
    assert "empty file" in one_line(exc) and str(path) in one_line(exc)


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(CtxmixError) as exc:
        load_model(tmp_path / "nope.ptz")
    assert "no such file" in one_line(exc)


def test_truncated_artifact_is_one_line(tmp_path, samtruss_path):
    path = tmp_path / "cut.ptz"
    data = samtruss_path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CtxmixError) as exc:
        read_artifact(path)
    assert "truncated zlib stream" in one_line(exc)


def test_bit_flipped_artifact_is_one_line(tmp_path, samtruss_path):
    path = tmp_path / "flip.ptz"
    data = bytearray(samtruss_path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CtxmixError) as exc:
        read_artifact(path)
    assert "corrupt zlib stream" in one_line(exc) or "truncated" in one_line(exc)


def test_bit_flip_inside_an_uncompressed_payload_is_one_line(tmp_path, samtruss_raw):
    # No compression checksum to catch it: the torch zip's own CRC must.
    data = bytearray(samtruss_raw)
    data[len(data) // 2] ^= 0x01
    path = tmp_path / "flip_raw.ptz"
    path.write_bytes(bytes(data))
    with pytest.raises(CtxmixError) as exc:
        read_artifact(path)
    assert str(path) in one_line(exc)


def test_unknown_magic_is_one_line(tmp_path):
    path = tmp_path / "junk.ptz"
    path.write_bytes(b"GIF89a not a model")
    with pytest.raises(CtxmixError) as exc:
        read_artifact(path)
    assert "unknown compression" in one_line(exc)


def test_trailing_bytes_after_the_stream_are_refused(samtruss_path):
    with pytest.raises(CtxmixError) as exc:
        decompress(samtruss_path.read_bytes() + b"extra", "zlib")
    assert "5 unexpected bytes" in one_line(exc)


class _RunsCode:
    """A pickle payload that would call os.system when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"__quant_format__": quant.INT8_FORMAT, "quantized": {"x": _RunsCode(marker)}}, buf)
    path = tmp_path / "evil.ptz"
    path.write_bytes(zlib.compress(buf.getvalue()))
    with pytest.raises(CtxmixError) as exc:
        load_model(path)
    assert "refused to unpickle" in one_line(exc) and "system" in one_line(exc)
    assert not marker.exists()
    # The same payload as a bare (legacy) pickle stream is refused too.
    with pytest.raises(CtxmixError):
        unpickle(pickle.dumps({"x": _RunsCode(marker)}))
    assert not marker.exists()


def test_non_finite_weights_are_refused(tmp_path, samtruss_raw):
    obj = torch.load(io.BytesIO(samtruss_raw), map_location="cpu", weights_only=True)
    obj["scales"]["blocks.0.attn.c_q.weight"][3] = float("inf")
    path = tmp_path / "inf.ptz"
    save_artifact(path, obj)
    with pytest.raises(CtxmixError) as exc:
        read_artifact(path)
    assert "'blocks.0.attn.c_q.weight' holds non-finite values" in one_line(exc)


# -- family inference -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samtruss_state(samtruss_path):
    return read_artifact(samtruss_path).state_dict


@pytest.fixture(scope="module")
def montysteele_state(artifact_dir):
    return read_artifact(artifact_dir / ARTIFACTS["montysteele_6Lx2_adapters_6bit_dc69b08"]).state_dict


def test_infer_config_reads_the_shape_from_keys(samtruss_state, montysteele_state):
    config = baseline.infer_config(samtruss_state)
    assert (config.num_layers, config.model_dim, config.num_heads, config.num_kv_heads, config.mlp_mult) == (7, 384, 8, 4, 2)
    assert config.tie_embeddings and config.fake_quant_levels == 0
    config = repeat.infer_config(montysteele_state)
    assert (config.num_layers, config.num_repeats, config.model_dim, config.fake_quant_levels) == (6, 2, 512, 31)
    assert detect_family(montysteele_state) is repeat and detect_family(samtruss_state) is baseline


def test_montysteele_keys_do_not_fit_a_baseline_gpt(montysteele_state):
    state = {k: v for k, v in montysteele_state.items() if not k.startswith("repeat_")}
    with pytest.raises(CtxmixError) as exc:  # 6 blocks: skip_weights must have 3 rows, not 6
        baseline.infer_config(state)
    assert "skip_weights has shape (6, 512), expected (3, 512)" in one_line(exc)


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.pop("repeat_shifts"), "missing key 'repeat_shifts'"),
    (lambda s: s.__setitem__("blocks.0.attn.c_v.weight", torch.zeros(100, 512)), "blocks.0.attn.c_v.weight has shape (100, 512), expected (256, 512)"),
    (lambda s: s.__setitem__("extra.weight", torch.zeros(4, 4)), "unexpected key 'extra.weight'"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("blocks.3.")], "blocks.3.* keys are missing"),
    (lambda s: s.__setitem__("repeat_scales", torch.zeros(7, 512)), "repeat_scales rows over 6 unique blocks: 7 is not a multiple of 6"),
])
def test_inconsistent_state_dicts_name_the_key_or_shape(montysteele_state, edit, expected):
    state = dict(montysteele_state)
    edit(state)
    with pytest.raises(CtxmixError) as exc:
        detect_family(state).infer_config(state)
    assert expected in one_line(exc)


def test_an_artifact_of_no_known_family_is_one_line(tmp_path):
    path = tmp_path / "mlp.ptz"
    save_artifact(path, {"layer.weight": torch.randn(4, 4), "layer.bias": torch.randn(4)})
    with pytest.raises(CtxmixError) as exc:
        load_model(path)
    assert "unknown architecture" in one_line(exc) and str(path) in one_line(exc)


def test_metadata_sets_hyperparameters_the_weights_cannot_show(tmp_path, samtruss_raw):
    obj = torch.load(io.BytesIO(samtruss_raw), map_location="cpu", weights_only=True)
    path = tmp_path / "meta.ptz"
    save_artifact(path, obj, compression="none", meta={"family": "baseline", "train_seq_len": 512, "rope_base": 20000.0, "steps": 1530})
    info = describe(path)
    assert info["train_seq_len"] == 512 and info["train_seq_len_from"] == "metadata"
    loaded = load_model(path, {"rope_base": 5000.0})  # caller overrides beat metadata
    assert loaded.config.train_seq_len == 512 and loaded.config.rope_base == 5000.0
    assert loaded.artifact.meta["steps"] == 1530
    with pytest.raises(CtxmixError) as exc:
        save_artifact(path, obj, compression="none", meta={"family": "repeat"})
        load_model(path)
    assert "repeat: missing key 'repeat_scales'" in one_line(exc)  # the named family decides, and says what is missing
    with pytest.raises(CtxmixError) as exc:
        apply_overrides(baseline.Config(), {"train_seq_len": "long"}, "metadata")
    assert "train_seq_len='long' is not a int" in one_line(exc)


def test_pack_artifact_refuses_metadata_that_is_not_plain_data():
    with pytest.raises(CtxmixError) as exc:
        pack_artifact({"x": torch.zeros(1)}, meta={"train_seq_len": [512]})
    assert META_KEY in one_line(exc)
