"""Your own model class: the adapter in docs/models.md, run as written, against ctxmix's own baseline family.

The adapter rebuilds the challenge's baseline GPT from its published architecture, independently of
``ctxmix/models/baseline.py``; on a real challenge artifact and on a model ``ctxmix_train`` builds, the two
must give the same bits (float32 products in another order: within 1e-6 relative).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ctxmix.api import run_streams
from ctxmix.check import check_all
from ctxmix.data import load_shards
from ctxmix.errors import CtxmixError
from ctxmix.experts import registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
WINDOW = dict(window=128, stride=64, batch_size=4, device="cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: small forwards, shared cores


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """The doc's complete adapter, written to a file exactly as the page shows it."""
    text = DOC.read_text()
    section = text[text.index("## A complete adapter"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    path = tmp_path_factory.mktemp("adapter") / "baseline_adapter.py"
    path.write_text(code)
    return path


@pytest.fixture(scope="module")
def trained_artifact(tmp_path_factory) -> Path:
    """A baseline model ctxmix_train builds (weights moved off their initial values) and exports."""
    from ctxmix_train import export, resolve_config
    from ctxmix_train.model import artifact_meta, build_model

    cfg = resolve_config("toy", sets=["num_layers=3", "model_dim=64", "num_heads=4", "num_kv_heads=2",
                                      "train_seq_len=128", "threads=1"])
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("artifact") / "toy.ptz"
    export.write(path, export.pack(model, cfg, artifact_meta(cfg, steps=0)), cfg.size_cap_bytes)
    return path


def neural_bits(stream, spec: str) -> float:
    report = run_streams([stream], [spec], ["none"])
    (row,) = report.runs
    return row["bits"]


def options() -> str:
    return ",".join(f"{k}={v}" for k, v in WINDOW.items())


@pytest.mark.parametrize("which", ["samtruss", "ctxmix_train"])
def test_the_documented_adapter_gives_the_built_in_familys_bits(which, adapter, trained_artifact, artifacts,
                                                                 smoke_shard_path):
    path = artifacts / "samtruss_7L384d_c839523.int8.ptz" if which == "samtruss" else trained_artifact
    stream = load_shards(str(smoke_shard_path), max_tokens=600)
    built_in = neural_bits(stream, f"neural:model={path},{options()}")
    adapted = neural_bits(stream, f"neural:model={path},module={adapter},{options()}")
    assert adapted == pytest.approx(built_in, rel=1e-6)
    expert = registry.build(f"neural:model={path},module={adapter}", vocab_size=1024)
    assert expert.family == f"adapter {adapter}"
    assert expert.window == (1024 if which == "samtruss" else 128)  # the metadata's length, else the challenge's


def test_an_adapted_expert_passes_every_rule_and_mixes(adapter, trained_artifact, alice_path):
    from ctxmix.data import load_text

    stream = load_text(alice_path).prefix(301)
    spec = f"neural:model={trained_artifact},module={adapter},window=64,stride=32,batch_size=2,device=cpu"
    report = check_all(stream, [spec, "ngram"], ["cm"], positions=300)
    assert report.passed, [r.message for r in report.failures()]


def test_an_adapter_named_by_module_name_is_imported(adapter, trained_artifact, smoke_shard_path, monkeypatch):
    monkeypatch.syspath_prepend(str(adapter.parent))
    stream = load_shards(str(smoke_shard_path), max_tokens=300)
    by_path = neural_bits(stream, f"neural:model={trained_artifact},module={adapter},{options()}")
    by_name = neural_bits(stream, f"neural:model={trained_artifact},module=baseline_adapter,{options()}")
    assert by_name == by_path


@pytest.mark.parametrize("source, message", [
    ("raise ValueError('boom')\n", "cannot load it (ValueError: boom)"),
    ("x = 1\n", "defines no load(state_dict, meta) function"),
    ("def load(state_dict, meta):\n    return 3\n", "load() returned int, expected a torch.nn.Module"),
    ("def load(state_dict, meta):\n    raise KeyError('tok_emb.weight')\n", "load() raised KeyError: 'tok_emb.weight'"),
    ("import torch\ndef load(state_dict, meta):\n    return torch.nn.Linear(2, 2)\n", "forward on int64 (1, 2) raised"),
    ("import torch\nclass M(torch.nn.Module):\n    def forward(self, idx):\n        return idx.float()\n"
     "def load(state_dict, meta):\n    return M()\n", "returned (1, 2), expected logits (1, 2, V)"),
])
def test_a_broken_adapter_is_one_line(tmp_path, trained_artifact, source, message):
    bad = tmp_path / "bad_adapter.py"
    bad.write_text(source)
    with pytest.raises(CtxmixError) as info:
        registry.build(f"neural:model={trained_artifact},module={bad}", vocab_size=1024)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_family_options_are_refused_with_an_adapter(adapter, trained_artifact):
    with pytest.raises(CtxmixError, match="rope_base: an option of the built-in families"):
        registry.build(f"neural:model={trained_artifact},module={adapter},rope_base=500", vocab_size=1024)


def test_the_adapter_reads_the_artifact_as_data(adapter, trained_artifact, tmp_path):
    # the artifact is still read with weights_only: a pickle payload that would run code is refused before
    # the adapter is ever called
    import pickle
    import zlib

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    evil = tmp_path / "evil.ptz"
    evil.write_bytes(zlib.compress(pickle.dumps({"w": Evil()})))
    with pytest.raises(CtxmixError):
        registry.build(f"neural:model={evil},module={adapter}", vocab_size=1024)
    assert not (tmp_path / "ran").exists()
    assert np.isfinite(neural_bits(load_shards_smoke(), f"neural:model={trained_artifact},module={adapter},{options()}"))


def load_shards_smoke():
    from fixtures.data import SMOKE_SHARD

    return load_shards(str(SMOKE_SHARD), max_tokens=200)


@pytest.mark.parametrize("ttt", ["ttt=full", "ttt=lora"])
def test_test_time_training_adapts_a_users_model_as_it_adapts_the_built_in_family(ttt, adapter, artifacts,
                                                                                   smoke_shard_path):
    # lora "all" on a user's class: its q k v o fc proj maps (named as the baseline's), without the logits'
    # adapter that only the built-in families have; the built-in run is told the same roles.
    path = artifacts / "samtruss_7L384d_c839523.int8.ptz"
    stream = load_shards(str(smoke_shard_path), max_tokens=600)
    roles = ",ttt_params=q;k;v;o;fc;proj" if ttt == "ttt=lora" else ""
    static = neural_bits(stream, f"neural:model={path},{options()}")
    built_in = neural_bits(stream, f"neural:model={path},{options()},{ttt}{roles}")
    adapted = neural_bits(stream, f"neural:model={path},module={adapter},{options()},{ttt}")
    assert built_in < static  # it learned: the comparison below is between two runs that moved
    assert abs(adapted - built_in) <= 1e-6 * built_in
