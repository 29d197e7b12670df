"""The lanes' integer neural step (ctxmix/models/integer.py, ctxmix/kernels/lane_step.py): exact integer
products, its kernels against plain numpy, and the shipped model's lane step against the independent
reference forward (tests/neural_reference.py) and against its float32 step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neural_reference as ref
from ctxmix.kernels.amx import available as amx_available
from ctxmix.kernels.lane_step import attention_quantize, norm_quantize_parts, softcap, softmax_rows
from ctxmix.models.integer import ATTENTION_FLOOR, LEVELS, MAX_EXACT_K, IntegerWeights, quantize_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def shipped():
    from ctxmix.experts.neural import DEFAULT_MODEL, resolve_model_path
    from ctxmix.models import load_model

    return load_model(resolve_model_path(DEFAULT_MODEL)).model


def lane_tokens(text_dir, lanes: int, steps: int) -> torch.Tensor:
    """int64 (steps, lanes): real text, lane j reading its own contiguous piece."""
    from ctxmix.data import encode_text

    text = encode_text((text_dir / "alice29.txt").read_bytes()[:20000]).tokens
    return torch.from_numpy(text[: lanes * steps].astype(np.int64).reshape(lanes, steps).T.copy())


# ----------------------------------------------------------------------------------------------------
# Integer products and grids
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, k, n", [(1, 8, 3), (7, 256, 512), (64, 512, 256)])
def test_integer_sums_are_the_exact_products_of_the_grids(rows, k, n):
    gen = np.random.default_rng(rows + k)
    w = gen.standard_normal((n, k)).astype(np.float32)
    weights = IntegerWeights(torch.from_numpy(w))
    values = gen.integers(-LEVELS, LEVELS + 1, (rows, k)).astype(np.int8)
    values[0] = LEVELS  # the largest sums the grids allow
    expected = values.astype(np.int64) @ weights.weight_t.numpy().astype(np.int64)
    assert np.array_equal(weights.sums(values), expected)
    # and the grid is the per-row 127-level one
    back = weights.weight_t.t().numpy() * weights.scale[:, None]
    assert np.abs(back - w).max(axis=1).max() <= (np.abs(w).max(axis=1) / LEVELS).max() / 2 * 1.0001


def test_weights_on_a_127_level_grid_come_back_as_themselves():
    # an int8 per-row matrix of a Parameter Golf artifact, dequantized: quantizing it again loses nothing
    gen = np.random.default_rng(5)
    q = gen.integers(-LEVELS, LEVELS + 1, (64, 128))
    q[:, 0] = LEVELS  # the clipped maximum every such row reaches
    scales = gen.uniform(1e-3, 1e-1, (64, 1)).astype(np.float32)
    weights = IntegerWeights(torch.from_numpy((q * scales).astype(np.float32)))
    assert np.array_equal(weights.weight_t.t().numpy().astype(np.int64), q)


def test_quantize_rows_is_symmetric_and_bounded():
    x = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [-3e-30, 1e-30, 0.0]], np.float32)
    values, scale = quantize_rows(x)
    assert values.dtype == np.int8 and np.abs(values).max() <= LEVELS
    assert values[0].tolist() == [0, 0, 0]  # an all-zero row stays zero (no division by zero)
    assert values[1].tolist() == [64, -127, 32]
    assert np.array_equal(quantize_rows(-x)[0], -values)


@pytest.mark.parametrize("n", [1, 7, 8, 13, 64, 512])
def test_the_grid_is_the_plain_arithmetic(n):
    """The int8 grid built on ``absmax8`` (kernels/sums.py, whose maxima tests/test_sums.py checks) is the plain
    one: scale = the largest magnitude (at least the smallest normal float32) / 127, values round(x / scale),
    half to even."""
    gen = np.random.default_rng(n)
    x = (gen.standard_normal((3, n)) * np.array([[1.0], [1e-3], [0.0]])).astype(np.float32)
    x[0, n // 2] = -4.5  # the first row's largest magnitude, negative
    values, scales = quantize_rows(x)
    plain_scales = np.maximum(np.abs(x).max(1), np.finfo(np.float32).tiny).astype(np.float32) / np.float32(LEVELS)
    assert np.array_equal(scales, plain_scales)
    assert np.array_equal(values, np.round(x / plain_scales[:, None]).astype(np.int8))


def test_too_wide_a_matrix_is_refused():
    with pytest.raises(ValueError, match="at most"):
        IntegerWeights(torch.zeros(4, MAX_EXACT_K + 1))


def test_a_second_int8_term_recovers_what_the_first_grid_blurs():
    gen = np.random.default_rng(3)
    x = gen.standard_normal((32, 256)).astype(np.float32)
    x[:, 5] *= 40  # one large coordinate, as the final hidden state has: one grid blurs the rest
    normed = x / np.sqrt((x.astype(np.float64) ** 2).mean(1, keepdims=True))
    errors = []
    for parts in (1, 2):
        q = np.empty((parts, 32, 256), np.int8)
        scales = np.empty((parts, 32), np.float32)
        norm_quantize_parts(x, parts, q, scales)
        back = sum(q[p].astype(np.float64) * scales[p][:, None] for p in range(parts))
        errors.append(np.abs(back - normed).max())
    assert errors[1] < errors[0] / 50


def test_softcap_and_softmax_rows_match_numpy():
    gen = np.random.default_rng(7)
    logits = (gen.standard_normal((5, 1024)) * 40).astype(np.float32)
    capped = np.empty(logits.shape)
    softcap(logits, 30.0, capped)
    np.testing.assert_allclose(capped, 30 * np.tanh(logits.astype(np.float64) / 30), rtol=0, atol=1e-10)
    p, entropy = np.empty(capped.shape), np.empty(5)
    softmax_rows(capped, p, entropy)
    z = capped - capped.max(1, keepdims=True)
    expected = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(p, expected, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(entropy, -(expected * np.log(expected)).sum(1), rtol=1e-10)
    assert np.abs(p.sum(1) - 1).max() <= 1e-12 and p.min() > 0
    for b in range(5):  # four rows at a time (then one) give each row's floats alone
        alone, alone_entropy = np.empty((1, 1024)), np.empty(1)
        softmax_rows(capped[b:b + 1].copy(), alone, alone_entropy)
        assert np.array_equal(alone[0], p[b]) and alone_entropy[0] == entropy[b]


def test_float32_softcap_and_softmax_rows_match_numpy_to_float32_precision():
    """Lane version 7's head: ``softcap32`` (float32 throughout) and ``softmax_rows32`` (float32 exponentials,
    float64 sums and p) against float64 numpy, within float32's precision; each p row sums to 1 in float64
    with every p > 0, even for logits 60 apart (the cap's widest gap), and a row's floats do not depend on the
    other rows."""
    from ctxmix.kernels.lane_step import softcap32, softmax_rows32

    gen = np.random.default_rng(8)
    logits = (gen.standard_normal((5, 1024)) * 40).astype(np.float32)
    logits[0, :2] = [1e4, -1e4]  # capped to +-30: the widest gap a row can have
    capped = np.empty(logits.shape, np.float32)
    softcap32(logits, 30.0, capped)
    np.testing.assert_allclose(capped, 30 * np.tanh(logits.astype(np.float64) / 30), rtol=0, atol=2e-5)
    p, entropy = np.empty(capped.shape), np.empty(5)
    softmax_rows32(capped, p, entropy)
    z = capped.astype(np.float64) - capped.max(1, keepdims=True)
    expected = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    # (a float32 logit's rounding, up to 60 * 2**-24 in the exponent, moves p by up to some 4e-6 relative)
    np.testing.assert_allclose(p, expected, rtol=5e-6, atol=0)
    np.testing.assert_allclose(entropy, -(expected * np.log(expected)).sum(1), rtol=1e-6)
    assert p.dtype == np.float64 and np.abs(p.sum(1) - 1).max() <= 1e-12 and p.min() > 0
    alone, alone_entropy = np.empty((1, 1024)), np.empty(1)
    softmax_rows32(capped[3:4].copy(), alone, alone_entropy)
    assert np.array_equal(alone[0], p[3]) and alone_entropy[0] == entropy[3]


@pytest.mark.parametrize("float32", [False, True])
@pytest.mark.parametrize("group, dim, int8", [(2, 64, True), (2, 6, False), (3, 64, False), (3, 6, True)])
def test_attention_pairs_of_query_heads_give_the_floats_of_heads_taken_one_by_one(group, dim, int8, float32):
    """attention_quantize runs the query heads that share a key/value head two at a time, four keys (or
    four d's) per pass over a sum (lane_step._add_scaled4_twice, _softmax_pair; with ``float32``, lane version
    7's fused products and float32 softmax). The same queries with every key/value head repeated once per
    query head take the one-head path: the outputs must be equal float for float, at key counts on and off
    the multiples of 4."""
    gen = np.random.default_rng(group * 100 + dim)
    n_lanes, capacity, n_heads = 3, 12, group
    for n_keys in (1, 3, 4, 5, 8, 11, 12):
        q_part = gen.integers(-3000, 3000, (n_lanes, n_heads * dim))
        kv_part = gen.integers(-3000, 3000, (n_lanes, 2, dim))
        w_q, w_kv = gen.random(n_heads * dim) * 1e-3, gen.random((2, dim)) * 1e-3
        if int8:
            held_k = gen.integers(-127, 128, (n_lanes, 1, dim, capacity)).astype(np.int8)
            held_v = gen.integers(-127, 128, (n_lanes, 1, capacity, dim)).astype(np.int8)
            held_scales = [gen.random((n_lanes, 1, capacity)).astype(np.float32) for _ in range(2)]
        else:
            held_k = gen.standard_normal((n_lanes, 1, dim, capacity)).astype(np.float32)
            held_v = gen.standard_normal((n_lanes, 1, capacity, dim)).astype(np.float32)
            held_scales = [None, None]
        angles = gen.random((2, dim // 2)).astype(np.float32)
        q_gain = (1 + gen.random(n_heads)).astype(np.float32)
        outputs = []
        for kv_heads in (1, n_heads):  # shared (pairs) or repeated (one head each)
            qkv = np.concatenate([q_part, np.tile(kv_part[:, 0], kv_heads), np.tile(kv_part[:, 1], kv_heads)], 1)
            w = np.concatenate([w_q, np.tile(w_kv[0], kv_heads), np.tile(w_kv[1], kv_heads)]).astype(np.float32)
            keys_t, values = np.repeat(held_k, kv_heads, 1), np.repeat(held_v, kv_heads, 1)
            scales = [None if t is None else np.repeat(t, kv_heads, 1) for t in held_scales]
            q, q_scales = np.empty((n_lanes, n_heads * dim), np.int8), np.empty(n_lanes, np.float32)
            attention_quantize(qkv.astype(np.int32), np.full(n_lanes, 0.5, np.float32), w, n_heads, kv_heads,
                               q_gain, angles[0], angles[1], keys_t, values, n_keys - 1, n_keys,
                               np.float32(dim**-0.5), q, q_scales, *scales, 0.0, float32)
            outputs.append((q, q_scales, keys_t[:, :1], values[:, :1]))
        for shared, repeated in zip(*outputs):
            assert np.array_equal(shared, repeated)


@pytest.mark.parametrize("float32", [False, True])  # (float64 softmax, or lane version 7's float32 one)
@pytest.mark.parametrize("n_heads", [1, 2])  # one query head alone, and a pair (_softmax_pair)
def test_attention_floor_drops_exactly_the_weights_below_it(n_heads, float32):
    """Lane version 6: a weight below ATTENTION_FLOOR is 0, as the softmax gives it and once it takes its
    value's scale. Four near keys (score about 51) and four far ones (about -29: weights near e**-80, normal
    float32 below the floor); the new position's value is 0. Dropping a weight is the same as a value scale
    of 0, so the floored kernel must give the floats of the unfloored one with those scales zeroed. Lane 1
    reads only far keys' values, lane 2 only two near keys with scales of 1e-33: without the floor their
    outputs are tiny but not 0 (their int8 grids are not), with it they are 0. Lane 1's far values have
    scales of 1e6, so only the floor before the scale drops them."""
    gen = np.random.default_rng(n_heads)
    n_lanes, dim, n_keys = 3, 4, 9
    near, far = slice(0, 4), slice(4, 8)
    keys_t = np.zeros((n_lanes, 1, dim, n_keys), np.int8)
    keys_t[:, 0, :, near], keys_t[:, 0, :, far] = 127, -127
    values = gen.integers(-127, 128, (n_lanes, 1, n_keys, dim)).astype(np.int8)
    key_scales = np.zeros((n_lanes, 1, n_keys), np.float32)
    key_scales[..., near], key_scales[..., far] = 0.2, 0.115
    value_scales = gen.uniform(0.5, 1, (n_lanes, 1, n_keys)).astype(np.float32)
    value_scales[1, 0, near] = 0
    value_scales[1, 0, far] = 1e6  # scaled, the far weights would be above the floor: dropped before the scale
    value_scales[2, 0, :] = 0
    value_scales[2, 0, 1:3] = 1e-33  # weights about 0.25: 2.5e-34 once scaled, below the floor
    dropped = np.zeros(value_scales.shape, bool)
    dropped[..., far] = True
    dropped[2, 0, 1:3] = True
    # q heads, then k, then v (0): q and k equal positive rows, so every q head is (1, 1, 1, 1) once normed
    qkv = np.concatenate([np.full((n_lanes, (n_heads + 1) * dim), 1000), np.zeros((n_lanes, dim))], 1).astype(np.int32)

    def run(scales_v, floor):
        k, v = keys_t.copy(), values.copy()
        q, q_scales = np.empty((n_lanes, n_heads * dim), np.int8), np.empty(n_lanes, np.float32)
        attention_quantize(qkv, np.full(n_lanes, 1e-3, np.float32), np.ones(qkv.shape[1], np.float32), n_heads, 1,
                           np.ones(n_heads, np.float32), np.ones(dim // 2, np.float32), np.zeros(dim // 2, np.float32),
                           k, v, n_keys - 1, n_keys, np.float32(dim**-0.5), q, q_scales, key_scales.copy(),
                           scales_v.copy(), floor, float32)
        return q, q_scales

    floored = run(value_scales, ATTENTION_FLOOR)
    zeroed = run(np.where(dropped, np.float32(0), value_scales), 0.0)
    assert all(np.array_equal(a, b) for a, b in zip(floored, zeroed))
    unfloored = run(value_scales, 0.0)
    assert np.array_equal(floored[0][0], unfloored[0][0])  # lane 0: the far keys' terms were below its sums' spacing
    assert not floored[0][1:].any() and unfloored[0][1].any() and unfloored[0][2].any()  # lanes 1, 2: 0 against not


# ----------------------------------------------------------------------------------------------------
# The shipped model's lane step
# ----------------------------------------------------------------------------------------------------


def _kl(lp_a: torch.Tensor, lp_b: torch.Tensor) -> torch.Tensor:
    return (lp_a.exp() * (lp_a - lp_b)).sum(-1)


def test_the_integer_steps_normed_embedding_table_gives_the_rows_a_batch_gets(shipped):
    """IntegerLaneStep.embed reads rms_norm's rows from a table normed once: at every batch size the
    codec's groups use, they must be the floats F.rms_norm gives the gathered rows."""
    from ctxmix.models.integer import IntegerLaneStep

    weight, step = shipped.tok_emb.weight, IntegerLaneStep()
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for n_lanes in (1, 2, 7, 31, 64, 128):
            tokens = torch.randint(0, weight.size(0), (n_lanes,), generator=gen)
            expected = torch.nn.functional.rms_norm(weight[tokens][:, None], (weight.size(1),))
            assert torch.equal(step.embed(weight, tokens), expected)


def test_the_integer_steps_skip_sum_gives_torchs_floats(shipped):
    """IntegerLaneStep.add_skip sums the U-Net's skips in numpy: the floats of Model._run_layers' torch sum
    ``x + skip_weights[i] * skip``, for the shipped model's skip weights and for spread-out ones."""
    from ctxmix.models.integer import IntegerLaneStep

    step, gen = IntegerLaneStep(), torch.Generator().manual_seed(4)
    spread = torch.randn(3, 256, generator=gen) * torch.logspace(-6, 6, 256)
    with torch.inference_mode():
        for weights in (shipped.skip_weights, spread):
            for n_lanes in (1, 7, 30):
                x, skip = (torch.randn(n_lanes, 1, 256, generator=gen) for _ in range(2))
                for i in range(weights.size(0)):
                    assert torch.equal(step.add_skip(x, weights, i, skip), x + weights[i] * skip)


@pytest.mark.parametrize("int8, float32_softmax", [(False, False), (True, False), (True, True)])
def test_the_integer_lane_step_follows_the_independent_reference(artifacts, text_dir, int8, float32_softmax):
    """Within the cache's capacity a lane's context is its whole prefix: the integer step's rows against
    neural_reference.gpt_logits (its own dequantization and plain forward) on each lane's tokens so far,
    with samtruss_7L384d (7 layers, 384 wide: U-Net skips of an odd layer count); with float32 keys and values
    in the cache, with int8 ones (lane version 3), and with lane version 7's float32 softmaxes and fused
    products (its logits float32)."""
    from ctxmix.models import load_model

    path = artifacts / "samtruss_7L384d_c839523.int8.ptz"
    model, weights = load_model(path).model, ref.load_int8_artifact(path)
    lanes, steps = 3, 24
    tokens = lane_tokens(text_dir, lanes, steps)
    cache = model.new_lane_cache(32, integer=True, int8=int8, float32_softmax=float32_softmax)
    kl = []
    with torch.inference_mode():
        for step in range(steps):
            logits = model.decode_lanes(tokens[step], cache)
            assert logits.dtype == (torch.float32 if float32_softmax else torch.float64)
            got = torch.log_softmax(logits.double(), -1)
            for lane in range(lanes):
                expected = ref.gpt_logits(weights, tokens[: step + 1, lane])[-1].double()
                kl.append(_kl(torch.log_softmax(expected, -1), got[lane]))
    kl = torch.stack(kl)
    assert float(kl.mean()) < 3e-3 and float(kl.max()) < 3e-2  # nats: the int8 grids' blur, far below a bit


@pytest.mark.parametrize("int8", [False, True])
def test_the_integer_lane_step_follows_the_float_step_past_the_cache_capacity(shipped, text_dir, int8):
    model = shipped
    lanes, steps = 8, 40  # past the cache's 16 positions: the rolling slots too
    tokens = lane_tokens(text_dir, lanes, steps)
    caches = {integer: model.new_lane_cache(16, integer, int8=int8) for integer in (False, True)}
    assert caches[True].buffers(0, lanes, 2, 64)[0].dtype == (torch.int8 if int8 else torch.float32)
    kl = []
    with torch.inference_mode():
        for step in range(steps):
            lp = {integer: torch.log_softmax(model.decode_lanes(tokens[step], cache).double(), -1)
                  for integer, cache in caches.items()}
            kl.append(_kl(lp[False], lp[True]))
    kl = torch.stack(kl)
    assert 0 < float(kl.mean()) < 2e-3 and float(kl.max()) < 2e-2


@pytest.mark.parametrize("int8", [False, True])
def test_lane_groups_on_two_threads_give_the_floats_of_one(shipped, text_dir, int8):
    from ctxmix.models.integer import IntegerLaneStep

    model = shipped
    tokens = lane_tokens(text_dir, 7, 20)  # 7 lanes: groups of 3 and 4
    caches = [model.new_lane_cache(16, integer=True, int8=int8) for _ in range(2)]
    caches[1].integer_step = IntegerLaneStep(threads=2)
    with torch.inference_mode():
        for step in range(tokens.size(0)):
            one, two = (model.decode_lanes(tokens[step], cache) for cache in caches)
            assert torch.equal(one, two)


@pytest.mark.skipif(not amx_available(), reason="this CPU (or this kernel) gives no AMX-INT8 tiles")
@pytest.mark.parametrize("int8", [False, True])
def test_the_lane_step_gives_the_same_floats_with_and_without_the_tiles(shipped, text_dir, int8, monkeypatch):
    """The shipped model's integer step over 40 steps of 37 lanes (past the cache's 16 positions): every
    logit the same whether its matmuls ran on the tiles or through torch._int_mm."""
    from ctxmix.kernels import amx

    model = shipped
    tokens = lane_tokens(text_dir, 37, 40)
    tiled, untiled = (model.new_lane_cache(16, integer=True, int8=int8) for _ in range(2))
    with torch.inference_mode():
        for step in range(tokens.size(0)):
            one = model.decode_lanes(tokens[step], tiled)
            with monkeypatch.context() as patch:  # (the untiled step prepares its weights in its first call)
                patch.setattr(amx, "available", lambda: False)
                two = model.decode_lanes(tokens[step], untiled)
            assert torch.equal(one, two)
    held = [w for key, (_, w) in tiled.integer_step._prepared.items() if key[0] == "block"]
    assert held and all(w.qkv.packed is not None for w in held)
    held = [w for key, (_, w) in untiled.integer_step._prepared.items() if key[0] == "block"]
    assert held and all(w.qkv.packed is None for w in held)
