"""The context-mixing network (``cm``) and the n-gram tilt (``tilt``): each learning step by hand, the rules
on real text, trace replay, coding, and the defaults that make ``cm`` the mix of every run."""

from __future__ import annotations

import math

import numpy as np
import pytest

import ctxmix
from ctxmix.components import DEFAULT_MIXER, DEFAULT_MIXERS
from ctxmix.check import check_all
from ctxmix.codec import compress, decompress
from ctxmix.kernels.approx import exp_rows, log_rows
from ctxmix.kernels.cm import APM_BINS, APM_MIN, APM_RANGE, ORDER_SETS, apm_init
from ctxmix.mixers import registry
from ctxmix.mixers.cm import (
    CM_LANE_STATE_COMPACT,
    CM_LANE_STATE_DELTAS,
    CM_LANE_STATE_FLOAT32,
    CM_LANE_STATE_GROUPS,
    CM_LANE_STATE_SHARED,
    CM_LANE_STATES,
    row_scratch,
)
from ctxmix.mixers.tilt import tilted_rows
from ctxmix.trace import load_trace, mix_trace, save_trace
from fixtures.streams import alice

# Two experts over a vocabulary of four tokens, one position, target token 0.
P1 = np.array([0.5, 0.25, 0.125, 0.125])
P2 = np.array([0.25, 0.25, 0.25, 0.25])
ROWS = np.stack([P1, P2])[None]  # float64[1, 2, 4]
TARGET = np.array([0])
# The n-gram expert's matched order 3 and the base expert's entropy 1.2 nats: order set 3, entropy bucket 2.
FEATURES = [{"entropy": np.array([1.2])}, {"order": np.array([3.0])}]
SPECS = ["neural", "ngram"]  # base = expert 0, n-gram = expert 1 (only the names matter to the mixer)


def _mixer(spec: str):
    return registry.build(spec, experts=SPECS)


# ---------------------------------------------------------------- one learning step, by hand


def test_linear_gates_take_one_gradient_step_of_log_loss():
    mixer = _mixer("cm:geometric=false,layers=1,lr=0.1")  # one linear mixer, weight set = order x entropy
    out = mixer.mix_full(ROWS, TARGET, FEATURES)
    np.testing.assert_allclose(out[0], 0.5 * P1 + 0.5 * P2, rtol=1e-15)  # zero gates: equal weights
    # c(y) = 0.5 * 0.5 + 0.5 * 0.25 = 0.375; gate_k += lr * w_k * (p_k(y) / c(y) - 1) = +-0.1 * 0.5 / 3
    weight_set = 3 * 12 + 2
    np.testing.assert_allclose(mixer._gates[0, weight_set], [0.1 / 6, -0.1 / 6], rtol=1e-14)
    assert np.count_nonzero(mixer._gates) == 2  # no other weight set moved


def test_geometric_weights_and_token_bias_take_their_gradient_steps():
    # one geometric mixer, without per-token exponents or log(1 - p) inputs (their steps: the next test)
    mixer = _mixer("cm:layers=1,sse=false,geo_lr=0.01,bias_lr=0.3,bias_decay=0.9,token_lr=0,stretch_lr=0")
    mixer.mix_full(ROWS, TARGET, FEATURES)  # bias is 0 before: this first row is the plain geometric mean
    logp = np.log(np.stack([P1, P2]))
    q = np.exp(0.5 * logp.sum(axis=0))
    q /= q.sum()
    # u_k -= lr * (E_q[log p_k] - log p_k(y)), from u = (1/2, 1/2); agree = 1 (both experts' top token is 0)
    expected_u = 0.5 - 0.01 * (logp @ q - logp[:, 0])
    weight_set = 1 * 12 + 3  # agree x order
    np.testing.assert_allclose(mixer._geo[0, weight_set], expected_u, rtol=1e-11)
    # bias <- decay * bias - lr * q, then bias(y) += lr: the token bias (row 0) and the previous token's row,
    # which for the first position of a stream is the last row (V = 4 tokens give 4 rows for tokens, then it)
    bias = mixer._state[2][0]
    assert bias.shape == (1 + 4 + 1, 4)
    expected_bias = -0.3 * q
    expected_bias[0] += 0.3
    np.testing.assert_allclose(bias[0], expected_bias, rtol=1e-11)
    np.testing.assert_allclose(bias[5], expected_bias, rtol=1e-11)
    assert not bias[1:5].any()
    # the next row (after token 0: its row, 1, still zero) uses them: p proportional to exp(u . log p + bias)
    row = mixer.next_distribution(ROWS[0], [{"entropy": 1.2}, {"order": 3.0}])
    z = np.exp(expected_u @ logp + expected_bias)
    np.testing.assert_allclose(row, z / z.sum(), rtol=1e-11)
    mixer.observe(1)
    assert bias[1].any() and not bias[2:5].any()  # the row of the previous token (0) learned this time


def test_token_exponents_and_stretch_weights_take_their_gradient_steps():
    mixer = _mixer("cm:layers=1,sse=false,geo_lr=0.01,bias_lr=0,token_lr=0.05,stretch_lr=0.1")
    mixer.mix_full(ROWS, TARGET, FEATURES)  # both start at 0: the first row is the plain geometric mean q
    p = np.stack([P1, P2])
    logp, log1m = np.log(p), np.log(1.0 - p)
    q = np.exp(0.5 * logp.sum(axis=0))
    q /= q.sum()
    weight_set = 1 * 12 + 3  # agree x order
    expected_u = 0.5 - 0.01 * (logp @ q - logp[:, 0])
    # s_k -= lr * (E_q[log(1 - p_k)] - log(1 - p_k(y)))
    expected_s = -0.1 * (log1m @ q - log1m[:, 0])
    np.testing.assert_allclose(mixer._stretch[0, weight_set], expected_s, rtol=1e-11)
    assert not np.delete(mixer._stretch[0], weight_set, axis=0).any()  # no other weight set moved
    # e_k(v) -= lr * (q(v) log p_k(v) - [v = y] log p_k(y)): one row per expert, shared by every weight set
    expected_e = -0.05 * q * logp
    expected_e[:, 0] += 0.05 * logp[:, 0]
    token_exp = mixer._state[7][0]
    np.testing.assert_allclose(token_exp, expected_e, rtol=1e-11)
    # the next row: p proportional to exp(sum_k (u_k + e_k(v)) log p_k(v) + s_k log(1 - p_k(v)))
    row = mixer.next_distribution(ROWS[0], [{"entropy": 1.2}, {"order": 3.0}])
    z = np.exp(((expected_u[:, None] + expected_e) * logp).sum(axis=0) + expected_s @ log1m)
    np.testing.assert_allclose(row, z / z.sum(), rtol=1e-11)


def test_each_geometric_mixer_keeps_a_cache_at_its_own_rates():
    mixer = _mixer("cm:sse=false,bias_lr=0.3;0.2;0.1,bias_decay=0.9;0.8;1")
    assert mixer.components[2:] == ["geometric (agree x order)", "geometric (order x entropy)", "geometric (one set)"]
    mixer.mix_full(ROWS, TARGET, FEATURES)
    q = np.sqrt(P1 * P2) / np.sqrt(P1 * P2).sum()  # every geometric mixer's first row
    bias = mixer._state[2]  # float64[3, rows, 4]: mixer i's token bias is row 0
    for i, rate in enumerate((0.3, 0.2, 0.1)):
        expected = -rate * q
        expected[0] += rate
        np.testing.assert_allclose(bias[i, 0], expected, rtol=1e-11)
    mixer.mix_full(ROWS, np.array([1]), FEATURES)  # the decays apply before the second step
    for i, (rate, decay) in enumerate(((0.3, 0.9), (0.2, 0.8), (0.1, 1.0))):
        c = mixer._scratch[2][2 + i]  # mixer i's row at this second position
        expected = decay * rate * (np.eye(4)[0] - q) + rate * (np.eye(4)[1] - c)
        np.testing.assert_allclose(bias[i, 0], expected, rtol=1e-11)


def test_cm_refuses_a_cache_rate_list_of_the_wrong_length():
    from ctxmix.errors import CtxmixError

    with pytest.raises(CtxmixError, match="bias_lr takes one value or 3"):
        _mixer("cm:bias_lr=0.3;0.2")


def test_final_layer_and_sse_table_take_their_steps():
    mixer = _mixer("cm:final_lr=0.05,sse_rate=0.02")
    out = mixer.mix_full(ROWS, TARGET, FEATURES)[0]
    # Layer 1 before any step: two linear mixers give (P1 + P2) / 2, three geometric the plain geometric mean.
    linear = 0.5 * (P1 + P2)
    geometric = np.sqrt(P1 * P2) / np.sqrt(P1 * P2).sum()
    mixed = 0.4 * linear + 0.6 * geometric  # final gates 0: equal weights over the five
    # SSE on the top token (0): the mean of p and the table read between the two bins around stretch(p)
    position = (math.log(mixed[0] / (1 - mixed[0])) + APM_RANGE) * (APM_BINS - 1) / (2 * APM_RANGE)
    lo, frac = int(position), position - int(position)
    before = apm_init(ORDER_SETS)[3]  # sigmoid of each bin's centre
    refined = 0.5 * (before[lo] * (1 - frac) + before[lo + 1] * frac + mixed[0])
    expected = np.concatenate([[refined], mixed[1:] * (1 - refined) / (1 - mixed[0])])
    np.testing.assert_allclose(out, expected, rtol=1e-9)
    # final_j += lr * g_j * (c_j(y) / m(y) - 1) with g_j = 1/5 (m: the final mix, before SSE)
    c_y = np.array([linear[0], linear[0], geometric[0], geometric[0], geometric[0]])
    np.testing.assert_allclose(mixer._final, 0.05 * 0.2 * (c_y / mixed[0] - 1.0), rtol=1e-9)
    # the two table entries around stretch(p_top) move toward 1 (a hit) by rate x their share
    after = mixer._apm[3]
    np.testing.assert_allclose(after[lo], before[lo] + 0.02 * (1 - frac) * (1 - before[lo]), rtol=1e-12)
    np.testing.assert_allclose(after[lo + 1], before[lo + 1] + 0.02 * frac * (1 - before[lo + 1]), rtol=1e-12)
    assert np.count_nonzero(mixer._apm != apm_init(ORDER_SETS)) == 2


def test_sse_keeps_the_row_normalized_when_the_top_token_is_nearly_certain():
    sure = np.full(4, 1e-17)
    sure[2] = 1.0 - 3e-17
    mixer = _mixer("cm")
    out = mixer.mix_full(np.stack([sure, sure])[None], np.array([2]), FEATURES)[0]
    assert abs(out.sum() - 1.0) <= 1e-12 and out.min() > 0.0


def test_fast_exp_and_log_agree_with_libm():
    rng = np.random.default_rng(3)
    z = np.concatenate([-rng.random(4000) * 708.0, [0.0, -708.0, -1e-300]])
    expected = np.exp(z)
    exp_rows(z, np.empty(len(z), np.int64))
    np.testing.assert_allclose(z, expected, rtol=1e-12)
    p = np.concatenate([rng.random(4000) ** 20, [1.0, 2.0**-1022, 0.5, math.sqrt(0.5)]])
    out = np.empty_like(p)
    log_rows(p, out)
    np.testing.assert_allclose(out, np.log(p), rtol=1e-12, atol=1e-12)


def test_float32_exp_and_log_agree_with_libm_to_float32_precision():
    """Lane state 5's exp and log (``kernels/approx.py``): float32 results within a few float32 ulps of libm's
    float64 value, over their whole domain; log floors p at 2**-120 (so a float32 exponent stays finite)."""
    from ctxmix.kernels.approx import EXP_MIN_32, P_MIN_32, exp_rows32, log_rows32

    rng = np.random.default_rng(4)
    z = np.concatenate([-rng.random(4000) * -float(EXP_MIN_32), [0.0, float(EXP_MIN_32), -1e-30]]).astype(np.float32)
    expected = np.exp(z.astype(np.float64))
    exp_rows32(z, np.empty(len(z), np.int32))
    assert z.dtype == np.float32
    np.testing.assert_allclose(z, expected, rtol=4e-7)
    p = np.concatenate([rng.random(4000) ** 20, [1.0, 0.5, math.sqrt(0.5), 1 - 1e-7, 2.0**-120, 1e-200, 2.0**-1074]])
    out = np.empty(len(p), np.float32)
    log_rows32(p, out, np.empty(len(p), np.int32))
    np.testing.assert_allclose(out, np.log(np.maximum(p, P_MIN_32)), rtol=3e-7, atol=2e-7)


# ---------------------------------------------------------------- the tilt


def test_tilt_closed_form_equals_explicit_renormalization_over_v():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(1024), size=5)
    top = np.array([3, 7, 1000, 0, 512])
    gate = np.array([True, True, False, True, True])
    for boost in (0.0, 0.7, 2.0, 9.0):
        explicit = p * np.exp(boost * ((np.arange(1024)[None, :] == top[:, None]) & gate[:, None]))
        explicit /= explicit.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(tilted_rows(p, top, gate, boost), explicit, rtol=1e-13)


def test_tilt_boosts_the_ngram_top_token_only_above_the_threshold():
    base = np.array([0.4, 0.3, 0.2, 0.1])
    confident = np.array([0.05, 0.05, 0.8, 0.1])  # top token 2 with p = 0.8
    unsure = np.array([0.3, 0.2, 0.35, 0.15])  # top token 2 with p = 0.35
    mixer = registry.build("tilt:threshold=0.5,boost=1", experts=SPECS)
    out = mixer.mix_full(np.stack([[base, confident], [base, unsure]]), np.array([0, 0]), [])
    z = 1 + 0.2 * (math.e - 1)
    np.testing.assert_allclose(out[0], [0.4 / z, 0.3 / z, 0.2 * math.e / z, 0.1 / z], rtol=1e-14)
    np.testing.assert_allclose(out[1], base, rtol=1e-15)


def test_tilt_hedge_over_boosts_moves_weight_to_the_boost_that_predicts():
    base = np.full(4, 0.25)
    ngram = np.array([0.1, 0.1, 0.7, 0.1])
    mixer = registry.build("tilt:boosts=0;3,eta=1", experts=SPECS)
    n = 20
    rows = np.broadcast_to(np.stack([base, ngram]), (n, 2, 4))
    mixer.mix_full(rows, np.full(n, 2), [])  # the n-gram's top token keeps coming: the boost of 3 wins
    weights = mixer.history()["weights"]
    assert weights[0].tolist() == [0.5, 0.5] and weights[-1][1] > 0.99
    # Hedge with eta 1 is the Bayesian mixture: the weight of boost b is its tilted p(2)^t, normalized
    p2 = np.array([0.25, 0.25 * math.exp(3) / (1 + 0.25 * (math.exp(3) - 1))])
    expected = p2 ** (n - 1) / (p2 ** (n - 1)).sum()
    np.testing.assert_allclose(weights[-1], expected, rtol=1e-12)


# ---------------------------------------------------------------- the four rules, traces, coding


@pytest.fixture(scope="module")
def alice_prefix():
    return alice(1201)


@pytest.mark.parametrize("mixer", ["cm", "cm:geometric=false", "cm:layers=1", "tilt", "tilt:boosts=0;1;2"])
def test_cm_and_tilt_pass_every_rule_on_real_text(alice_prefix, mixer):
    report = check_all(alice_prefix, ["unigram", "ngram"], [mixer], positions=1200)
    assert report.passed, [r.message for r in report.results if not r.passed]


def test_fast_cm_replayed_from_a_trace_equals_the_live_run_bit_for_bit(alice_prefix, tmp_path):
    from ctxmix.api import run_streams

    live = run_streams([alice_prefix], ["unigram", "ngram"], ["none", "cm:geometric=false"], keep_trace=True,
                       keep_bits=True)
    save_trace(tmp_path / "alice.trace", live.results[0], alice_prefix, live.experts)
    replay = mix_trace(load_trace(tmp_path / "alice.trace"), ["none", "cm:geometric=false"], keep_bits=True)
    assert [r["bits"] for r in replay.runs] == [r["bits"] for r in live.runs]
    for label, bits in live.results[0].position_bits.items():
        np.testing.assert_array_equal(replay.results[0].position_bits[label], bits)


def test_a_trace_refuses_the_full_path_cm(alice_prefix, tmp_path):
    from ctxmix.api import run_streams
    from ctxmix.errors import CtxmixError

    live = run_streams([alice_prefix], ["unigram", "ngram"], ["none"], keep_trace=True)
    save_trace(tmp_path / "alice.trace", live.results[0], alice_prefix, live.experts)
    with pytest.raises(CtxmixError, match="needs full distributions"):
        mix_trace(load_trace(tmp_path / "alice.trace"), ["cm"])


def test_cm_is_the_default_mixer_of_score_eval_and_compress(text_dir, tmp_path):
    assert DEFAULT_MIXER == "cm" and DEFAULT_MIXERS == ("none", "cm")
    path = text_dir / "grammar.lsp"
    report = ctxmix.score([path], ["unigram", "ngram"])
    assert [row["label"] for row in report.runs][-1] == "cm"
    packed, restored = tmp_path / "g.cmx", tmp_path / "g.out"
    result = compress(path, packed, experts=["unigram", "ngram"])
    decompress(packed, restored)
    assert result.mixer == "cm" and restored.read_bytes() == path.read_bytes()
    # the file is the run's code: its model bits are those score reports for cm
    assert result.bits == pytest.approx(report.runs[-1]["bits"], rel=1e-9)
    assert 8 * result.payload_bytes <= result.bits * 1.001 + 64


def test_cm_beats_every_expert_alone_and_hedge_on_real_text(text_dir):
    report = ctxmix.score([text_dir / "alice29.txt"], ["unigram", "ngram:orders=2-6"], ["none", "hedge", "cm"])
    bpb = {row["label"].split(":")[0]: row["bpb"] for row in report.runs}
    assert bpb["cm"] < 0.995 * min(bpb["unigram"], bpb["ngram"], bpb["hedge"])


# ---------------------------------------------------------------- lanes: the lane states


def _lane_case(steps=7, lanes=3, vocab=8, seed=0):
    """Random experts' rows float64[steps, lanes, 2, vocab], targets int64[steps, lanes] and features."""
    rng = np.random.default_rng(seed)
    rows = rng.dirichlet(np.full(vocab, 0.5), size=(steps, lanes, 2)) + 1e-3
    rows /= rows.sum(axis=-1, keepdims=True)
    targets = rng.integers(0, vocab, size=(steps, lanes))
    order = rng.integers(0, 6, size=(steps, lanes)).astype(float)
    entropy = rng.uniform(0.0, 3.0, size=(steps, lanes))
    return rows, targets, order, entropy


def _lane_features(order, entropy):
    return [{"entropy": entropy.copy()}, {"order": order.copy()}]  # SPECS: base = expert 0, n-gram = expert 1


def _run_lanes(mixer, rows, targets, order, entropy, lane_state, lanes=None, groups=None):
    """Each step's rows of every lane (float64[steps, lanes, V]) from ``lanes_distributions``; with ``groups``
    ((lo, hi) bounds), each group mixed, then learned from, before the next is mixed."""
    mixer.lanes_begin(lanes or rows.shape[1], lane_state)
    out = []
    for s in range(rows.shape[0]):
        features = _lane_features(order[s], entropy[s])
        if groups is None:
            out.append(mixer.lanes_distributions(rows[s], features))
            mixer.lanes_observe(targets[s])
            continue
        parts, step_rows = [], rows[s]  # (one array for the step's calls, as the lane engine passes)
        for lo, hi in groups:
            parts.append(mixer.lanes_distributions(step_rows, features, lanes=(lo, hi)))
            mixer.lanes_observe(targets[s, lo:hi], lanes=(lo, hi))
        out.append(np.concatenate(parts))
    return np.array(out)


@pytest.mark.parametrize("lane_state", CM_LANE_STATES)
def test_one_lane_of_every_lane_state_gives_the_one_lane_path_float_for_float(lane_state):
    rows, targets, order, entropy = _lane_case(steps=40, lanes=1)
    stepwise = _mixer("cm")
    expected = []
    for s in range(rows.shape[0]):
        expected.append(stepwise.next_distribution(rows[s, 0], [{"entropy": entropy[s, 0]}, {"order": order[s, 0]}]))
        stepwise.observe(int(targets[s, 0]))
    got = _run_lanes(_mixer("cm"), rows, targets, order, entropy, lane_state)
    np.testing.assert_array_equal(got[:, 0], np.array(expected))


def test_lane_state_1_shares_every_weight_but_each_lane_s_token_bias():
    """Lane state 1 (the first lane files) is the one-lane kernels run lane by lane on one shared state, with
    each lane's previous token and token-bias rows swapped in: rows from the state before the step, then
    lane 0's update, lane 1's on top of it, ..."""
    from ctxmix.kernels.cm import cm_learn, cm_row, contexts

    rows, targets, order, entropy = _lane_case()
    n_steps, lanes, n_experts, vocab = rows.shape
    got = _run_lanes(_mixer("cm"), rows, targets, order, entropy, CM_LANE_STATE_SHARED)
    ref = _mixer("cm")
    state, _ = ref._ready(vocab)
    bias, last = state[2], state[5]
    lane_bias = np.zeros((lanes, bias.shape[0], vocab))
    lane_last = np.full(lanes, -1)
    n_comp = len(ref._final)
    for s in range(n_steps):
        ctx = contexts(order[s], entropy[s])
        scratches = []
        for j in range(lanes):
            scratch = row_scratch(n_experts, vocab, n_comp)
            bias[:, 0], last[0] = lane_bias[j], lane_last[j]
            out = np.empty(vocab)
            cm_row(rows[s, j], ctx[j, 0], ctx[j, 1], ref._base, ref._ngram, ref._layout, state, scratch, out)
            np.testing.assert_array_equal(got[s, j], out)
            scratches.append(scratch)
        for j in range(lanes):
            bias[:, 0], last[0] = lane_bias[j], lane_last[j]
            cm_learn(rows[s, j], int(targets[s, j]), ctx[j, 0], ref._layout, state, scratches[j], ref._rates)
            lane_bias[j], lane_last[j] = bias[:, 0], targets[s, j]


@pytest.mark.parametrize("lane_state, groups", [(CM_LANE_STATE_DELTAS, None), (CM_LANE_STATE_COMPACT, None),
                                                (CM_LANE_STATE_GROUPS, ((0, 1), (1, 3)))])
def test_lane_states_2_to_4_are_shared_weights_plus_each_lane_s_delta_and_own_previous_token_rows(lane_state, groups):
    """Lane states 2-4 against a plain composition of the one-lane kernels: lane j's row is ``cm_row``
    on the effective state (shared + lane j's deltas, its token-bias row plus its own previous-token row);
    each lane's learning step (``cm_learn`` on that effective state, in lane order) moves the shared weights
    by LANE_SHARED_FACTOR of it and the lane's deltas by LANE_OWN_FACTOR; the bias rows step by hand. Lane
    states 3 and 4 store the tables of V columns in float32: here each update of them is rounded where the
    kernels store it (their sums in 8 partial sums move a row by about 1e-16, within the tolerance). Lane
    state 4 learns from each group of lanes before the next group's rows: lane 0's, then lanes 1-2's."""
    from ctxmix.kernels.cm import cm_learn, cm_row, contexts
    from ctxmix.mixers import cm as cm_module

    rows, targets, order, entropy = _lane_case(steps=8, lanes=3, vocab=8, seed=1)
    n_steps, lanes, n_experts, vocab = rows.shape
    mixer = _mixer("cm")
    got = _run_lanes(mixer, rows, targets, order, entropy, lane_state, groups=groups)
    table = np.float32 if lane_state >= CM_LANE_STATE_COMPACT else np.float64
    assert mixer._ready(vocab)[0][2].dtype == table  # the shared previous-token rows
    assert [a.dtype for a in mixer._lanes[1:]] == [table, *[np.float64] * 3, table, np.float64, np.float64, table]
    assert cm_module.LANE_OWN_DECAY == (1.0,) * 6  # (the composition below has no decay of the deltas)
    a, b = cm_module.LANE_SHARED_FACTOR[0], cm_module.LANE_OWN_FACTOR[0]
    assert set(cm_module.LANE_SHARED_FACTOR) == {a} and set(cm_module.LANE_OWN_FACTOR) == {b}
    pair_factor = cm_module.LANE_PAIR_FACTOR[0]
    ref = _mixer("cm")
    shared, _ = ref._ready(vocab)
    shared = (*shared[:2], shared[2].astype(table), *shared[3:])
    small = (0, 1, 3, 4, 6, 7)  # gates, geo, final, apm, stretch, token_exp: the arrays with deltas
    deltas = [[np.zeros(shared[i].shape, table if i == 7 else np.float64) for i in small] for _ in range(lanes)]
    n_geo, rows_own = shared[2].shape[0], cm_module.LANE_PAIR_ROWS
    token_rows = np.zeros((lanes, n_geo, vocab), table)
    own_pair = np.zeros((lanes, n_geo, rows_own, vocab), table)
    lane_last = np.full(lanes, -1)
    n_comp, n_lin = len(ref._final), len(ref._selectors[0])

    def effective(j):
        arrays = [shared[i] + d for i, d in zip(small, deltas[j])]
        arrays[3] = np.clip(arrays[3], APM_MIN, 1 - APM_MIN)
        bias = shared[2].astype(np.float64)
        bias[:, 0] = token_rows[j].astype(np.float64) + (own_pair[j, :, lane_last[j] % rows_own] if lane_last[j] >= 0 else 0.0)
        gates, geo, final, apm, stretch, token_exp = arrays
        return (gates, geo, bias, final, apm, np.array([lane_last[j]]), stretch, token_exp)

    def compose_group(s, ctx, lo, hi):
        """Lanes lo..hi-1 of step s: every row from the state before the group, then each lane's learning."""
        scratches = {}
        for j in range(lo, hi):
            scratch = row_scratch(n_experts, vocab, n_comp)
            out = np.empty(vocab)
            cm_row(rows[s, j], ctx[j, 0], ctx[j, 1], ref._base, ref._ngram, ref._layout, effective(j), scratch, out)
            np.testing.assert_allclose(got[s, j], out, rtol=1e-11, atol=0)
            scratches[j] = scratch
        for j in range(lo, hi):
            y = int(targets[s, j])
            before = effective(j)
            after = tuple(x.copy() for x in before)
            cm_learn(rows[s, j], y, ctx[j, 0], ref._layout, after, scratches[j], ref._rates)
            for n, i in enumerate(small):
                step = after[i] - before[i]
                shared[i][...] += a * step
                deltas[j][n][...] = deltas[j][n] + b * step  # (float64 sums, then stored: rounded in states 3-4)
            pair = 1 + lane_last[j] % (shared[2].shape[1] - 2) if lane_last[j] >= 0 else shared[2].shape[1] - 1
            for g in range(n_geo):
                comp = scratches[j][2][n_lin + g]
                rate, decay = ref._rates[6 + 2 * g], ref._rates[7 + 2 * g]
                steps = [(token_rows[j, g], rate), (shared[2][g, pair], rate)]
                if lane_last[j] >= 0:
                    steps.append((own_pair[j, g, lane_last[j] % rows_own], pair_factor * rate))
                for row, r in steps:
                    row[:] = decay * row.astype(np.float64) - r * comp
                    row[y] = np.float64(row[y]) + r
            lane_last[j] = y

    for s in range(n_steps):
        ctx = contexts(order[s], entropy[s])
        for lo, hi in groups or ((0, lanes),):
            compose_group(s, ctx, lo, hi)


@pytest.mark.parametrize("lane_state, spec", [(CM_LANE_STATE_DELTAS, "cm"), (CM_LANE_STATE_FLOAT32, "cm"),
                                              (CM_LANE_STATE_FLOAT32, "cm:sse=false"),
                                              (CM_LANE_STATE_FLOAT32, "cm:layers=1,stretch_lr=0,pair_rows=0")])
def test_lane_rows_are_normalized_and_causal(lane_state, spec):
    """Every lane row sums to 1 in float64 and has every p > 0 (lane state 5's float32 rows too, with SSE to
    rescale them and without), and no row reads a later token."""
    rows, targets, order, entropy = _lane_case(steps=30, lanes=5, vocab=16, seed=2)
    got = _run_lanes(_mixer(spec), rows, targets, order, entropy, lane_state, groups=((0, 2), (2, 5)))
    assert got.dtype == np.float64 and np.all(got > 0) and np.abs(got.sum(axis=-1) - 1).max() <= 1e-9
    # other tokens from step 12 on: the rows of earlier steps, and of step 12's first group, must not move
    # (the second group's rows read the first group's tokens: they are coded before it is mixed)
    cut = 12
    changed = targets.copy()
    changed[cut:] = (changed[cut:] + 3) % 16
    again = _run_lanes(_mixer(spec), rows, changed, order, entropy, lane_state, groups=((0, 2), (2, 5)))
    np.testing.assert_array_equal(again[:cut], got[:cut])
    np.testing.assert_array_equal(again[cut, :2], got[cut, :2])
    assert not np.array_equal(again[cut, 2:], got[cut, 2:])


@pytest.mark.parametrize("spec", ["cm", "cm:sse=false,stretch_lr=0", "cm:pair_rows=0,token_lr=0"])
def test_lane_state_5_is_lane_state_4_in_float32(spec):
    """Lane state 5 runs lane state 4's formulas on float32 rows and tables (its kernels are not lane state 4's
    code, so this compares the two): over 60 steps of learning, every row stays within float32's precision
    of lane state 4's, apart from the tokens below exp(-80) of a geometric mixer's top (which lane state 4
    floors at exp(-700)), and the bits of the targets agree to 1e-6."""
    rows, targets, order, entropy = _lane_case(steps=60, lanes=5, vocab=64, seed=5)
    groups = ((0, 2), (2, 5))
    compact = _mixer(spec)
    want = _run_lanes(compact, rows, targets, order, entropy, CM_LANE_STATE_GROUPS, groups=groups)
    single = _mixer(spec)
    got = _run_lanes(single, rows, targets, order, entropy, CM_LANE_STATE_FLOAT32, groups=groups)
    state, _ = single._ready(64)
    assert state[2].dtype == state[7].dtype == np.float32  # the shared previous-token rows, the token exponents
    assert compact._ready(64)[0][7].dtype == np.float64
    assert [a.dtype for a in single._lane_scratch] == [np.float32] * 3 + [np.float64] * 2 + [np.int64, np.float64,
                                                                                          np.int32]
    assert not np.array_equal(got, want)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-12)
    pick = (*np.indices(targets.shape), targets)
    bits_got, bits_want = -np.log2(got[pick]).sum(), -np.log2(want[pick]).sum()
    assert abs(bits_got / bits_want - 1) < 1e-6


def test_lanes_refuse_an_unknown_lane_state():
    from ctxmix.errors import CtxmixError

    with pytest.raises(CtxmixError, match="lane state 6"):
        _mixer("cm").lanes_begin(4, 6)


@pytest.mark.parametrize("n", [1, 7, 8, 13, 1024])
def test_eight_running_maxima_and_sums_are_the_stated_arithmetic(n):
    """``_argmax`` is np.argmax (the first of the largest); ``max8`` (kernels/sums.py) is row.max() exactly
    (any order gives the same maximum, which keeps lane states 1-3 and the one-lane path bit for bit); ``_sum``
    is the in-order sum, or with ``eight`` (lane state 3) eight running sums over columns mod 8 (the tail added to the first),
    then added pairwise: here both written plainly."""
    from numba import njit

    from ctxmix.kernels.cm import _argmax, _sum
    from ctxmix.kernels.sums import max8

    @njit
    def run(row, eight):
        return max8(row), _sum(row, eight), _argmax(row)

    row = np.random.default_rng(n).standard_normal(n) * 10.0 ** np.random.default_rng(n + 1).integers(-8, 8, n)
    top, in_order, first = run(row, False)
    assert top == row.max() and first == np.argmax(row)
    tied = np.concatenate([row, row])  # every value twice: the first of the largest, as np.argmax
    assert run(tied, False)[2] == np.argmax(tied) < n
    with_nan = row.copy()
    with_nan[n // 2] = np.nan  # (not a distribution; _argmax still returns a place of a largest number)
    assert 0 <= run(with_nan, False)[2] < n
    plain = 0.0
    for value in row:
        plain += value
    assert in_order == plain
    full = n - n % 8
    parts = [0.0] * 8
    for i in range(full):
        parts[i % 8] += row[i]
    for i in range(full, n):
        parts[0] += row[i]
    assert run(row, True)[1] == ((parts[0] + parts[1]) + (parts[2] + parts[3])) + ((parts[4] + parts[5]) + (parts[6] + parts[7]))


def test_one_pass_rows_are_the_floats_of_the_passes_they_replace():
    """``_geo_row_two`` (a geometric mixer's exponent row for two experts, in one pass) and ``_weighted_sum``
    of 2 and 5 rows (one pass) give the floats of the passes they replace, written here as numpy passes:
    the biases summed, then expert 0's terms added, then expert 1's; 0 plus each weighted row in turn."""
    from numba import njit

    from ctxmix.kernels.cm import _geo_row_two, _weighted_sum

    @njit
    def geo_row(token_row, shared_row, own_row, geo, d_geo, stretch, d_stretch, token_exp, d_token, logp, log1m):
        row, kept = np.empty(token_row.shape[0]), np.empty(2)
        _geo_row_two(row, token_row, shared_row, own_row, 1, 2, geo, d_geo, stretch, d_stretch, token_exp, d_token,
                     logp, log1m, kept)
        return row, kept

    @njit
    def weighted(rows, weights):
        out, kept = np.empty(rows.shape[1]), np.empty(rows.shape[0])
        _weighted_sum(rows, rows.shape[0], weights, kept, out)
        return out

    gen = np.random.default_rng(4)
    vocab = 37

    def draw(*shape, dtype=np.float64):
        return gen.standard_normal(shape).astype(dtype)

    token_row, shared_row, own_row = draw(vocab, dtype=np.float32), draw(vocab), draw(vocab)  # (float64: sums round)
    geo, d_geo, stretch, d_stretch = (draw(2, 3, 2) for _ in range(4))
    token_exp, d_token = draw(2, 2, vocab), draw(2, 2, vocab, dtype=np.float32)
    logp, log1m = -np.abs(draw(2, vocab)) * 10, -np.abs(draw(2, vocab)) * 1e-3
    row, kept = geo_row(token_row, shared_row, own_row, geo, d_geo, stretch, d_stretch, token_exp, d_token, logp,
                        log1m)
    expected = token_row.astype(np.float64) + shared_row + own_row
    for k in range(2):
        weight = geo[1, 2, k] + d_geo[1, 2, k]
        assert kept[k] == weight
        stretch_weight = stretch[1, 2, k] + d_stretch[1, 2, k]
        expected += (weight + (token_exp[1, k] + d_token[1, k])) * logp[k] + stretch_weight * log1m[k]
    assert np.array_equal(row, expected)
    for n in (2, 3, 5):
        rows, weights = draw(n, vocab), gen.dirichlet(np.ones(n))
        expected = np.zeros(vocab)
        for j in range(n):
            expected += weights[j] * rows[j]
        assert np.array_equal(weighted(rows, weights), expected)


@pytest.mark.parametrize("n", [1, 7, 8, 13, 1024])
def test_learning_s_eight_partial_expectations_are_the_stated_arithmetic(n):
    """``_expectations_eight`` (lane state 4's learning): sum_v row(v) a(v) and sum_v row(v) b(v), each as eight
    running sums over columns mod 8 (the tail added to the first), then added pairwise: written plainly."""
    from numba import njit

    from ctxmix.kernels.cm import _expectations_eight

    rng = np.random.default_rng(n)
    row, a, b = rng.dirichlet(np.ones(n)), np.log(rng.dirichlet(np.ones(n))), -rng.random(n) * 30.0

    def plain(x):
        parts = [0.0] * 8
        for i in range(n):
            parts[i % 8 if i < n - n % 8 else 0] += row[i] * x[i]
        return ((parts[0] + parts[1]) + (parts[2] + parts[3])) + ((parts[4] + parts[5]) + (parts[6] + parts[7]))

    assert njit(lambda r, x, y: _expectations_eight(r, x, y))(row, a, b) == (plain(a), plain(b))
