"""Model families as plain torch modules: registry, incremental decoding, training, the 6-bit QAT forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ctxmix.models import baseline, families, get_family, load_model, repeat
from ctxmix.models.layers import CastedLinear, fake_quantize_rows
from ctxmix.errors import CtxmixError

TINY = dict(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: these models are tiny, and with 2 threads OpenMP's spin-waiting dominates
    (results do not depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial weights (the training init zeroes the output projections)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model.eval()


def test_registry_lists_every_family_with_the_interface():
    names = [m.NAME for m in families()]
    assert names[-2:] == ["repeat", "baseline"]  # most specific first; record (if present) leads
    for module in families():
        assert callable(module.detect) and callable(module.infer_config) and isinstance(module.NAME, str)
        assert hasattr(module, "Config") and hasattr(module, "Model")
    with pytest.raises(CtxmixError, match="unknown model family 'gpt5'"):
        get_family("gpt5")


@pytest.mark.parametrize("family, extra", [(baseline, {}), (repeat, {"num_repeats": 2, "fake_quant_levels": 31})])
def test_kv_cache_decoding_matches_the_full_forward(family, extra):
    model = randomized(family.Model(family.Config(**TINY, **extra)))
    idx = torch.randint(0, 64, (2, 20))
    with torch.inference_mode():
        full = model(idx)  # (2, 20, 64)
        cache = model.new_cache()
        parts = [model(idx[:, :7], cache)]  # a prefill of 7, then 3 at once, then one at a time
        parts.append(model(idx[:, 7:10], cache))
        parts += [model(idx[:, t : t + 1], cache) for t in range(10, 20)]
    assert cache.length == 20
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family, extra", [(baseline, {}), (repeat, {"num_repeats": 2, "fake_quant_levels": 31})])
def test_one_position_decode_step_matches_the_full_forward_and_repeats_itself(family, extra):
    model = randomized(family.Model(family.Config(**TINY, **extra)))
    n = 150  # past KVCache.MIN_CAPACITY: the cache grows (and copies what it holds) on the way
    idx = torch.randint(0, 64, (1, n))
    with torch.inference_mode():
        full = model(idx)[0]  # (n, 64)
        runs = []
        for _ in range(2):
            cache = model.new_cache()
            prefill = model(idx[:, :5], cache)[0, -1]
            runs.append(torch.stack([prefill] + [model.decode_step(int(idx[0, t]), cache) for t in range(5, n)]))
    assert cache.length == n
    assert torch.allclose(runs[0], full[4:], atol=1e-4, rtol=1e-4)
    assert torch.equal(runs[0], runs[1])  # what encoder and decoder rely on: the same floats every time


@pytest.mark.parametrize("family, extra", [(baseline, {}), (repeat, {"num_repeats": 2, "fake_quant_levels": 31})])
def test_a_family_trains_its_loss_goes_down(family, extra):
    model = family.Model(family.Config(**TINY, **extra)).train()
    idx = torch.randint(0, 64, (4, 16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 64).float(), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    # Straight-through fake quantization still gives every linear weight a gradient.
    assert all(p.grad is not None for p in model.parameters() if p.ndim == 2)


def test_causal_forward_ignores_future_tokens_exactly():
    model = randomized(baseline.Model(baseline.Config(**TINY)))
    idx = torch.randint(0, 64, (1, 24))
    other = idx.clone()
    other[0, 12:] = torch.randint(0, 64, (12,))
    with torch.inference_mode():
        assert torch.equal(model(idx)[0, :12], model(other)[0, :12])


def test_fake_quantized_linear_rounds_each_row_to_31_levels_and_caches_it():
    layer = CastedLinear(16, 8, fake_quant_levels=31)
    with torch.no_grad():
        layer.weight.normal_()
    w = layer.weight.detach()
    scale = w.abs().amax(dim=1, keepdim=True) / 31
    with torch.inference_mode():
        effective = layer.effective_weight()
        assert layer.effective_weight() is effective  # cached in inference
    steps = effective / scale
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 31 + 1e-4
    assert torch.equal(effective, fake_quantize_rows(w, 31))


def test_montysteele_forward_uses_its_6_bit_qat_weights(artifacts):
    loaded = load_model(artifacts / "montysteele_6Lx2_adapters_6bit_dc69b08.int8.ptz")
    layer = loaded.model.blocks[0].attn.c_q
    assert layer.fake_quant_levels == 31
    with torch.inference_mode():
        effective = layer.effective_weight()
    stored = loaded.artifact.state_dict["blocks.0.attn.c_q.weight"]
    # The stored values use only a few of the 31 levels per row (max |q| = 5 here); the training forward
    # stretches each row to the full -31..31 range, so the weights it scored with differ from the stored ones.
    assert not torch.equal(effective, stored)
    assert torch.allclose(effective, fake_quantize_rows(stored.float(), 31))
    assert [loaded.model.schedule[i] for i in range(12)] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("family, extra", [(baseline, {}), (repeat, {"num_repeats": 2, "fake_quant_levels": 31})])
def test_running_the_last_layer_on_the_scored_suffix_gives_the_same_rows(family, extra):
    model = randomized(family.Model(family.Config(**TINY, **extra)))
    idx = torch.randint(0, 64, (3, 24))
    with torch.inference_mode():
        full = model.hidden(idx)
        suffix = model.hidden(idx, last=5)
        cache = model.new_cache()
        model.hidden(idx[:, :10], cache)
        cached = model.hidden(idx[:, 10:], cache, last=1)  # a prefill that needs its last row only
    assert suffix.shape == (3, 5, 32) and cached.shape == (3, 1, 32)
    assert torch.allclose(suffix, full[:, -5:], atol=1e-5, rtol=1e-5)
    assert torch.allclose(cached, full[:, -1:], atol=1e-4, rtol=1e-4)
