"""The codec on a CUDA device: lanes run the model's float step there, files repeat bit for bit on the same
device and software, and record both. Skipped where torch sees no CUDA device (CI); run on a GPU machine
with ``python -m pytest tests/test_cuda_codec.py``.
"""

from __future__ import annotations

import pytest

import torch

from ctxmix import codec
from ctxmix.codec import compress, decompress, read_container
from ctxmix.errors import CtxmixError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")

CUT_BYTES = 6000


@pytest.fixture
def cut(text_dir, tmp_path):
    def make(name: str, n: int = CUT_BYTES):
        path = tmp_path / f"{name}.head"
        path.write_bytes((text_dir / name).read_bytes()[:n])
        return path

    return make


def roundtrip(path, tmp_path, tag="", **kwargs):
    packed, restored = tmp_path / f"packed{tag}.cmx", tmp_path / f"restored{tag}.txt"
    result = compress(path, packed, **kwargs)
    decompress(packed, restored)
    assert restored.read_bytes() == path.read_bytes()
    return result, packed


@pytest.mark.parametrize("name", ["lcet10.txt", "enwik8.first300k"])
@pytest.mark.parametrize("lanes", [1, 7, 4096])
def test_cuda_files_roundtrip_and_record_their_device(cut, tmp_path, name, lanes):
    result, packed = roundtrip(cut(name), tmp_path, lanes=lanes)
    header, _ = read_container(packed)
    assert header["device"] == codec.DEVICE_CUDA
    assert header["device_record"].startswith(torch.cuda.get_device_name())
    assert header["engine"] == (codec.ENGINE_STEPWISE if result.lanes == 1 else codec.ENGINE_LANES)
    assert result.lanes == min(lanes, result.tokens)


def test_cuda_lanes_repeat_their_bytes(cut, tmp_path):
    path = cut("alice29.txt")
    _, first = roundtrip(path, tmp_path, "a", lanes=16)
    _, second = roundtrip(path, tmp_path, "b", lanes=16)
    assert first.read_bytes() == second.read_bytes()


def test_cuda_lanes_cost_about_what_the_cpu_s_integer_lanes_cost(cut, tmp_path):
    """The GPU's float32 step and the CPU's integer step are the same model: their payloads differ by
    rounding only."""
    path = cut("lcet10.txt", 20000)
    gpu, _ = roundtrip(path, tmp_path, "g", lanes=8)
    cpu, _ = roundtrip(path, tmp_path, "c", lanes=8, experts=["neural:device=cpu", "ngram"])
    assert read_container(tmp_path / "packedc.cmx")[0]["engine"] == codec.ENGINE_LANES_INTEGER
    assert abs(gpu.bits / cpu.bits - 1) < 0.01


def test_a_cuda_file_with_another_device_record_is_refused(cut, tmp_path):
    _, packed = roundtrip(cut("xargs.1", 3000), tmp_path, lanes=4)
    header, words = read_container(packed)
    header["device_record"] = header["device_record"].replace("torch", "torch 0.0 /")
    packed.write_bytes(b"".join(codec._container_parts(header, words)))
    with pytest.raises(CtxmixError, match="need not repeat its floats"):
        decompress(packed, tmp_path / "other.txt")
    assert not (tmp_path / "other.txt").exists()
