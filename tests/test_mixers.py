"""Mixers: the four rules, the hand-computable cases, option errors.

The experts here are small counting predictors defined in this file (an add-one unigram and a backoff
trigram that reports a matched order), run on real tokens: the start of alice29.txt tokenized with the
official sp1024 SentencePiece model. They are slow and simple on purpose; what is under test is the mixers.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import sentencepiece as spm

from ctxmix.data.tokenizer import TOKENIZER_FILE
from ctxmix.errors import CtxmixError
from ctxmix.experts.base import FEATURE_ENTROPY, FEATURE_ORDER, Expert, ExpertOutput
from ctxmix.experts.uniform import UniformExpert
from ctxmix.kernels.mixers import GEO_LOG_RATIO_MIN
from ctxmix.mixers import registry
from ctxmix.mixers.base import HISTORY_MAX_ROWS
from ctxmix.run import run_stream
from ctxmix.stream import Stream

V = 1024
N_TOKENS = 1500  # tokens of alice29.txt (plus BOS) that the mixer tests run on
EXPERT_SPECS = ["unigram:test", "ngram:test", "uniform"]

# Every registered mixer, with defaults and with non-default options.
MIXER_SPECS = [
    "fixed",
    "fixed:0.7,0.2,0.1",
    "hedge",
    "hedge:eta=0.25",
    "fixedshare",
    "fixedshare:eta=0.5,alpha=0.05",
    "adaptive",
    "adaptive:base=uniform,ngram=1,c=4,d=0.5",
    "pr909",
    "pr909:eta=1,logw_floor=-5",
    "geometric",
    "geometric:select=order,lr=0.01",
    "cm",
    "cm:base=uniform,ngram=1,layers=1,bias_lr=1,sse=false",
    "cm:geometric=false",
    "cm:geometric=false,layers=1,lr=0.5",
    "tilt",
    "tilt:base=uniform,threshold=0.1,boosts=0;1;3,eta=0.5",
]
LINEAR_SPECS = [s for s in MIXER_SPECS if registry.build(s, experts=EXPERT_SPECS).linear]


def _entropy(p: np.ndarray) -> float:
    return float(-(p * np.log(p)).sum())


class AddOneUnigram(Expert):
    """p(v) = (count(v) + 1) / (n + V) over the tokens seen so far."""

    provides = (FEATURE_ENTROPY,)

    def begin(self, tokens):
        self.counts = np.zeros(self.vocab_size)

    def score_chunk(self, tokens, *, full=False, want=()):
        rows = []
        for token in tokens:
            rows.append((self.counts + 1.0) / (self.counts.sum() + self.vocab_size))
            self.counts[token] += 1
        return _output(np.array(rows), tokens, full, want, order=None)


class BackoffTrigram(Expert):
    """Witten-Bell style backoff trigram; ``order`` = 3 / 2 when the 2- / 1-token context was seen, else 0."""

    provides = (FEATURE_ENTROPY, FEATURE_ORDER)

    def begin(self, tokens):
        self.uni = np.zeros(self.vocab_size)
        self.ctx: dict[tuple, dict[int, int]] = defaultdict(dict)
        self.history: list[int] = []

    def _dist(self, counts: dict[int, int], lower: np.ndarray) -> np.ndarray:
        p = lower * len(counts)
        for v, c in counts.items():
            p[v] += c
        return p / (sum(counts.values()) + len(counts))

    def score_chunk(self, tokens, *, full=False, want=()):
        rows, orders = [], []
        for token in tokens:
            p = (self.uni + 1.0) / (self.uni.sum() + self.vocab_size)
            order = 0
            for n in (1, 2):
                key = tuple(self.history[-n:]) if len(self.history) >= n else None
                if key is not None and key in self.ctx:
                    p = self._dist(self.ctx[key], p)
                    order = n + 1
            rows.append(p)
            orders.append(order)
            for n in (1, 2):
                if len(self.history) >= n:
                    key = tuple(self.history[-n:])
                    self.ctx[key][int(token)] = self.ctx[key].get(int(token), 0) + 1
            self.uni[token] += 1
            self.history.append(int(token))
        return _output(np.array(rows), tokens, full, want, order=np.array(orders, dtype=np.float64))


def _output(p, tokens, full, want, order):
    logp = np.log(p[np.arange(len(tokens)), tokens])
    features = {}
    if FEATURE_ENTROPY in want:
        features[FEATURE_ENTROPY] = np.array([_entropy(row) for row in p])
    if FEATURE_ORDER in want:
        features[FEATURE_ORDER] = order
    return ExpertOutput(logp, p if full else None, features)


def _experts():
    return [AddOneUnigram(None, vocab_size=V), BackoffTrigram(None, vocab_size=V), UniformExpert(None, vocab_size=V)]


@pytest.fixture(scope="module")
def alice_stream(alice_path) -> Stream:
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_FILE))
    text = alice_path.read_bytes().decode("ascii")
    ids = sp.encode(text[: 8 * N_TOKENS])[:N_TOKENS]
    assert len(ids) == N_TOKENS
    tokens = np.array([sp.bos_id(), *ids], dtype=np.int64)
    # Bytes are not under test here; each token counts one so that bpb = bits per token.
    return Stream("alice29.txt[:1500 tokens]", tokens, np.ones(len(tokens), dtype=np.int64), V, "text")


@pytest.fixture(scope="module")
def outputs(alice_stream):
    """The experts' full distributions, log p(target) and features on the scored positions."""
    experts = _experts()
    tokens = alice_stream.tokens
    for e in experts:
        e.begin(tokens)
    outs = [e.score_chunk(tokens, full=True, want=e.provides) for e in experts]
    p = np.stack([o.p[1:] for o in outs], axis=1)  # float64[T, K, V]
    logp = np.stack([o.logp[1:] for o in outs], axis=1)  # float64[T, K]
    features = [{name: values[1:] for name, values in o.features.items()} for o in outs]
    return p, tokens[1:], logp, features


def _build(spec):
    return registry.build(spec, experts=EXPERT_SPECS)


def _rows(features, lo, hi):
    return [{name: values[lo:hi] for name, values in f.items()} for f in features]


def _mix_in_chunks(mixer, p, targets, features, bounds):
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        parts.append(mixer.mix_full(p[lo:hi], targets[lo:hi], _rows(features, lo, hi)))
    return np.concatenate(parts)


# ---------------------------------------------------------------- the four rules on real tokens


def test_test_experts_are_normalized_and_differ(outputs):
    p, targets, logp, features = outputs
    assert np.abs(p.sum(axis=2) - 1.0).max() <= 1e-12 and p.min() > 0
    assert set(np.unique(features[1][FEATURE_ORDER])) == {0.0, 2.0, 3.0}
    bits = -logp.sum(axis=0) / math.log(2)
    assert bits[1] < bits[0] < bits[2]  # trigram < unigram < uniform on real text


@pytest.mark.parametrize("spec", MIXER_SPECS)
def test_every_mixer_output_is_normalized_and_positive(spec, outputs):
    p, targets, logp, features = outputs
    mixed = _build(spec).mix_full(p, targets, features)
    assert mixed.shape == (len(targets), V)
    assert np.abs(mixed.sum(axis=1) - 1.0).max() <= 1e-9
    assert mixed.min() > 0.0


@pytest.mark.parametrize("spec", LINEAR_SPECS)
def test_linear_mixer_fast_path_matches_full_distribution(spec, outputs):
    p, targets, logp, features = outputs
    fast = _build(spec).mix_logp(logp, features)
    full = np.log(_build(spec).mix_full(p, targets, features)[np.arange(len(targets)), targets])
    np.testing.assert_allclose(fast, full, rtol=1e-12, atol=0)


@pytest.mark.parametrize("spec", MIXER_SPECS)
def test_chunked_mixing_equals_one_pass(spec, outputs):
    p, targets, logp, features = outputs
    whole = _build(spec).mix_full(p, targets, features)
    chunked = _mix_in_chunks(_build(spec), p, targets, features, [0, 1, 8, 300, 301, len(targets)])
    np.testing.assert_allclose(chunked, whole, rtol=1e-12, atol=0)
    if _build(spec).linear:
        fast_whole = _build(spec).mix_logp(logp, features)
        mixer = _build(spec)
        fast_chunked = np.concatenate(
            [mixer.mix_logp(logp[lo:hi], _rows(features, lo, hi)) for lo, hi in [(0, 97), (97, 98), (98, len(targets))]]
        )
        np.testing.assert_allclose(fast_chunked, fast_whole, rtol=1e-12, atol=0)


@pytest.mark.parametrize("spec", MIXER_SPECS)
def test_stepwise_protocol_equals_chunked(spec, outputs):
    p, targets, logp, features = outputs
    n = 400
    chunked = _build(spec).mix_full(p[:n], targets[:n], _rows(features, 0, n))
    mixer = _build(spec)
    for t in range(n):
        step_features = [{name: float(values[t]) for name, values in f.items()} for f in features]
        row = mixer.next_distribution(p[t], step_features)
        again = mixer.next_distribution(p[t], step_features)  # no state change between calls
        np.testing.assert_array_equal(row, again)
        np.testing.assert_allclose(row, chunked[t], rtol=1e-12, atol=0)
        mixer.observe(int(targets[t]))


@pytest.mark.parametrize("spec", ["hedge", "fixedshare", "pr909", "adaptive"])
def test_weights_at_t_ignore_rows_from_t_on(spec, outputs):
    p, targets, logp, features = outputs
    t = 700
    reference = _build(spec).weights(logp, features)
    rng = np.random.default_rng(5)
    changed_logp = logp.copy()
    changed_logp[t:] = np.log(rng.dirichlet(np.ones(V), size=(len(logp) - t, logp.shape[1]))[:, :, 0])
    changed_features = [{name: values.copy() for name, values in f.items()} for f in features]
    for f in changed_features:
        for values in f.values():
            values[t + 1 :] = rng.permutation(values[t + 1 :])
    changed = _build(spec).weights(changed_logp, changed_features)
    np.testing.assert_array_equal(changed[: t + 1], reference[: t + 1])
    assert not np.array_equal(changed[t + 1 :], reference[t + 1 :])


def test_geometric_row_t_ignores_targets_from_t_on(outputs):
    p, targets, logp, features = outputs
    t = 500
    spec = "geometric:select=order,lr=0.05"
    reference = _build(spec).mix_full(p, targets, features)
    changed_targets = targets.copy()
    changed_targets[t:] = (changed_targets[t:] + 17) % V
    changed = _build(spec).mix_full(p, changed_targets, features)
    np.testing.assert_array_equal(changed[: t + 1], reference[: t + 1])
    assert not np.array_equal(changed[t + 1 :], reference[t + 1 :])


def test_engine_run_gives_same_bits_on_fast_full_and_small_chunks(alice_stream):
    specs = ["hedge", "fixedshare", "adaptive", "pr909", "fixed:2,1,1"]

    def run(**kwargs):
        mixers = [_build(s) for s in specs]
        return run_stream(alice_stream, _experts(), mixers, **kwargs).bits

    fast = run()
    full = run(full=True, chunk_size=211)
    for label in fast:
        assert math.isclose(fast[label], full[label], rel_tol=1e-12), label


def test_engine_chunks_suit_the_slowest_expert_and_totals_do_not_depend_on_them(fineweb_shard_path):
    """A pass runs the longest chunks all its experts suit (exact n-grams and unigrams: long, anything
    slow: short; the full path: FULL_CHUNK); totals, added FAST_CHUNK-aligned, are the same floats for
    any chunk sizes that keep chunks FAST_CHUNK-aligned."""
    from ctxmix import run
    from ctxmix.data import load_shards
    from ctxmix.experts import registry as experts_registry
    from ctxmix.experts.base import LONG_CHUNK, SHORT_CHUNK

    def built(*specs):
        return [experts_registry.build(s, vocab_size=V) for s in specs]

    assert run.chunk_length(built("unigram", "ngram"), full=False) == LONG_CHUNK
    assert run.chunk_length(built("unigram", "ngram:table=hashed"), full=False) == SHORT_CHUNK
    assert run.chunk_length(built("ngram") + _experts(), full=False) == SHORT_CHUNK  # test experts: the default
    assert run.chunk_length(built("ngram"), full=True) == run.FULL_CHUNK
    assert run.chunk_length(built("ngram"), full=False, chunk_size=1000) == 1000

    stream = load_shards(str(fineweb_shard_path), max_tokens=5 * run.FAST_CHUNK + 99)

    def totals(**kwargs):
        experts = built("unigram", "ngram")
        mixers = [registry.build("hedge", experts=[e.spec for e in experts])]
        return run_stream(stream, experts, mixers, **kwargs).bits

    one_chunk = totals()
    assert one_chunk == totals(chunk_size=run.FAST_CHUNK) == totals(chunk_size=2 * run.FAST_CHUNK)


def test_registry_experts_and_mixers_stepwise_give_the_engine_bits(alice_stream):
    """The codec's path: unigram + ngram experts and every mixer, token by token, equal the engine's run."""
    from ctxmix.experts import registry as experts_registry

    stream = alice_stream.prefix(400)

    def experts():
        return [experts_registry.build(s, vocab_size=V) for s in ("unigram", "ngram")]

    specs = [e.spec for e in experts()]
    mixer_specs = ["fixed:1,3", "hedge", "fixedshare", "adaptive", "pr909", "geometric:select=order"]
    result = run_stream(stream, experts(), [registry.build(s, experts=specs) for s in mixer_specs],
                        expert_rows=False, keep_bits=True)
    step_experts = experts()
    for e in step_experts:
        e.begin(stream.tokens)
        e.observe(int(stream.tokens[0]))  # position 0 is context only
    mixers = [registry.build(s, experts=specs) for s in mixer_specs]
    bits = np.zeros((len(mixers), stream.n_scored))
    for t, token in enumerate(stream.tokens[1:]):
        outs = [e.next_distribution(want=e.provides) for e in step_experts]
        p = np.stack([o[0] for o in outs])
        features = [o[1] for o in outs]
        for i, mixer in enumerate(mixers):
            mixed = mixer.next_distribution(p, features)
            assert abs(mixed.sum() - 1.0) <= 1e-9 and mixed.min() > 0
            bits[i, t] = -math.log2(mixed[token])
            mixer.observe(int(token))
        for e in step_experts:
            e.observe(int(token))
    for i, label in enumerate(result.position_bits):
        np.testing.assert_allclose(bits[i], result.position_bits[label], rtol=1e-10, err_msg=label)


# ---------------------------------------------------------------- hand-computable cases


def test_fixed_half_half_over_two_uniform_experts_costs_log2_v_bits(alice_stream):
    experts = [UniformExpert(None, vocab_size=V), UniformExpert(None, vocab_size=V)]
    mixer = registry.build("fixed:0.5,0.5", experts=[e.spec for e in experts])
    result = run_stream(alice_stream, experts, [mixer], expert_rows=False, keep_bits=True)
    np.testing.assert_allclose(result.position_bits["fixed:0.5,0.5"], math.log2(V), rtol=1e-15)
    assert math.isclose(result.bits["fixed:0.5,0.5"], N_TOKENS * math.log2(V), rel_tol=1e-12)


def test_fixed_weights_are_normalized():
    mixer = registry.build("fixed:2,1,1", experts=EXPERT_SPECS)
    np.testing.assert_allclose(mixer.weights(np.zeros((2, 3)), [{}, {}, {}]), [[0.5, 0.25, 0.25]] * 2, rtol=1e-15)
    equal = registry.build("fixed", experts=EXPERT_SPECS)
    np.testing.assert_allclose(equal.next_weights([{}, {}, {}]), [1 / 3] * 3, rtol=1e-15)


def test_hedge_eta_1_is_the_bayesian_posterior_on_three_positions():
    # p_k(target) at t = 0, 1, 2 for two experts; weights by hand:
    # t=0: prior (1/2, 1/2); t=1: (.5*.5, .5*.25) / .375 = (2/3, 1/3); t=2: (.5*.5*.25, .5*.25*.5) -> (1/2, 1/2)
    p_target = np.array([[0.5, 0.25], [0.25, 0.5], [0.1, 0.4]])
    mixer = registry.build("hedge:eta=1", experts=["a", "b"])
    w = mixer.weights(np.log(p_target), [{}, {}])
    np.testing.assert_allclose(w, [[0.5, 0.5], [2 / 3, 1 / 3], [0.5, 0.5]], rtol=1e-15)
    # The mixed sequence probability is the prior-weighted sequence likelihood: .5*(.5*.25*.1) + .5*(.25*.5*.4)
    mixed = registry.build("hedge:eta=1", experts=["a", "b"]).mix_logp(np.log(p_target), [{}, {}])
    assert math.isclose(math.exp(mixed.sum()), 0.03125, rel_tol=1e-14)


def test_hedge_eta_1_code_length_is_the_bayesian_mixture_on_real_tokens(outputs):
    p, targets, logp, features = outputs
    mixed = _build("hedge:eta=1").mix_logp(logp, features)
    totals = logp.sum(axis=0)  # log-likelihood of the whole sequence under each expert
    bayes = np.logaddexp.reduce(totals) - math.log(len(totals))
    assert math.isclose(mixed.sum(), bayes, rel_tol=1e-11)


def test_hedge_log_domain_weights_survive_a_million_positions():
    n = 1_000_000
    logp = np.empty((n, 2))
    logp[:, 0] = -1.0
    logp[:, 1] = -40.0  # expert 1 loses 39 nats per token: its linear-domain weight underflows after ~19 tokens
    logp[n // 2 :, 1] = -0.5  # then it is better
    mixer = registry.build("fixedshare:eta=1,alpha=0.001", experts=["a", "b"])
    w = mixer.weights(logp, [{}, {}])
    assert np.isfinite(w).all() and np.abs(w.sum(axis=1) - 1.0).max() <= 1e-12
    assert w[n // 2 - 1, 1] < 1e-3 and w[n // 2 + 100, 1] > 0.99  # fixed share recovers quickly
    hedge = registry.build("hedge", experts=["a", "b"])
    hw = hedge.weights(logp, [{}, {}])
    assert np.isfinite(hw).all() and hw[-1, 1] == 0.0  # Hedge never recovers: weight exp(-10^7) is 0
    assert np.isfinite(registry.build("hedge", experts=["a", "b"]).mix_logp(logp, [{}, {}])).all()


def test_fixedshare_with_alpha_0_equals_hedge(outputs):
    p, targets, logp, features = outputs
    hedge = _build("hedge:eta=0.5").weights(logp, features)
    share = _build("fixedshare:eta=0.5,alpha=0").weights(logp, features)
    np.testing.assert_allclose(share, hedge, rtol=1e-12, atol=1e-300)


def test_fixedshare_matches_naive_reference(outputs):
    p, targets, logp, features = outputs
    eta, alpha = 0.7, 0.02
    k = logp.shape[1]
    w = np.full(k, 1.0 / k)
    expected = []
    for t in range(len(logp)):
        expected.append(w.copy())
        v = w * np.exp(eta * logp[t])
        w = (1 - alpha) * v / v.sum() + alpha / k
    got = _build(f"fixedshare:eta={eta},alpha={alpha}").weights(logp, features)
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_adaptive_alpha_on_a_hand_example():
    mixer = registry.build("adaptive", experts=["unigram", "ngram:orders=2-11"])
    assert mixer.wanted_features() == {0: (FEATURE_ENTROPY,), 1: (FEATURE_ORDER,)}
    # H = 4 nats, order 6: centre = 3 - 0.25 * (6 - 2) = 2; alpha = 0.05 + 0.55 * sigmoid(2 * (4 - 2)) = 0.05 + 0.55 / (1 + e^-4)
    # order 2 at H = 3: exactly on the centre, alpha = 0.05 + 0.55 / 2; order 0 (no match): alpha = 0.
    entropy = np.array([4.0, 3.0, 5.0])
    order = np.array([6.0, 2.0, 0.0])
    w = mixer.weights(np.zeros((3, 2)), [{FEATURE_ENTROPY: entropy}, {FEATURE_ORDER: order}])
    alpha = np.array([0.05 + 0.55 / (1 + math.exp(-4.0)), 0.325, 0.0])
    assert math.isclose(alpha[0], 0.5901075845208497, rel_tol=1e-15)
    np.testing.assert_allclose(w, np.stack([1 - alpha, alpha], axis=1), rtol=1e-15)
    np.testing.assert_allclose(mixer.history()["alpha"], alpha, rtol=1e-15)


def test_adaptive_and_pr909_pick_experts_by_prefix_or_index():
    specs = ["neural:model=m.ptz", "unigram", "ngram:orders=2-6"]
    assert registry.build("adaptive", experts=specs).wanted_features() == {0: ("entropy",), 2: ("order",)}
    assert registry.build("adaptive:base=unigram", experts=specs).wanted_features() == {1: ("entropy",), 2: ("order",)}
    assert registry.build("pr909:base=1,ngram=2", experts=specs).wanted_features() == {1: ("entropy",), 2: ("order",)}


def test_pr909_weights_are_hedge_over_base_and_adaptive_mix(outputs):
    p, targets, logp, features = outputs
    base, ngram, eta, floor = 0, 1, 0.5, -3.0
    alpha = _build("adaptive").weights(logp, features)[:, ngram]
    inputs = np.stack([logp[:, base], np.log((1 - alpha) * np.exp(logp[:, base]) + alpha * np.exp(logp[:, ngram]))], axis=1)
    logw = np.zeros(2)
    expected = np.zeros_like(logp)
    for t in range(len(logp)):
        h = np.exp(logw) / np.exp(logw).sum()
        expected[t, base] = h[0] + h[1] * (1 - alpha[t])
        expected[t, ngram] = h[1] * alpha[t]
        logw = logw + eta * inputs[t]
        logw = np.maximum(logw - logw.max(), floor)
    got = _build(f"pr909:eta={eta},logw_floor={floor}").weights(logp, features)
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-300)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-14)


def test_pr909_default_eta_is_beta_2_per_64_token_segment():
    mixer = registry.build("pr909", experts=["unigram", "ngram"])
    assert mixer.options.eta == 2.0 / 64 and mixer.options.logw_floor == -20.0
    assert (mixer.options.a, mixer.options.b, mixer.options.s, mixer.options.c, mixer.options.d) == (0.05, 0.55, 2.0, 3.0, 0.25)


def test_geometric_with_equal_weights_over_identical_experts_returns_that_expert(outputs):
    p, targets, logp, features = outputs
    same = np.repeat(p[:, 1:2, :], 2, axis=1)  # the trigram expert, twice
    frozen = registry.build("geometric:lr=0", experts=["x", "y"]).mix_full(same, targets, [{}, {}])
    np.testing.assert_allclose(frozen, p[:, 1, :], rtol=1e-12)
    learning = registry.build("geometric", experts=["x", "y"]).mix_full(same, targets, [{}, {}])
    np.testing.assert_allclose(learning[0], p[0, 1, :], rtol=1e-12)


def test_geometric_update_is_the_gradient_of_log_loss():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.full(50, 0.3), size=(1, 3))  # one position, three experts, V = 50
    w0 = np.array([0.2, 0.5, 0.3])
    target = 7

    def loss(w):
        z = (w[:, None] * np.log(p[0])).sum(axis=0)
        return -(z[target] - np.logaddexp.reduce(z))

    eps = 1e-6
    numeric = np.array([(loss(w0 + eps * e) - loss(w0 - eps * e)) / (2 * eps) for e in np.eye(3)])
    mixer = registry.build("geometric:lr=0.01", experts=["a", "b", "c"])
    mixer._w[0] = w0
    mixer.mix_full(p, np.array([target]), [{}, {}, {}])
    np.testing.assert_allclose(mixer._w[0], w0 - 0.01 * numeric, rtol=1e-7)
    assert (mixer._w[0] != w0).all()


def test_geometric_output_stays_positive_with_extreme_experts():
    p = np.full((1, 2, 4), 1e-300)
    p[0, :, 0] = 1.0 - 3e-300  # both experts all but certain of token 0
    mixer = registry.build("geometric:lr=0", experts=["a", "b"])
    mixer._w[0] = [16.0, 16.0]  # p^32: 1e-9600 for tokens 1..3 without the floor
    out = mixer.mix_full(p, np.array([0]), [{}, {}])
    assert out.min() > 0 and abs(out.sum() - 1) <= 1e-12
    assert math.isclose(out[0, 1], math.exp(GEO_LOG_RATIO_MIN), rel_tol=1e-9)


def test_geometric_select_order_learns_one_weight_set_per_order(outputs):
    p, targets, logp, features = outputs
    mixer = _build("geometric:select=order,lr=0.01")
    assert mixer.wanted_features() == {1: (FEATURE_ORDER,)}
    mixer.mix_full(p, targets, features)
    used = sorted(set(features[1][FEATURE_ORDER].astype(int)))
    moved = [s for s in range(len(mixer._w)) if not np.allclose(mixer._w[s], 1 / 3)]
    assert moved == used == [0, 2, 3]
    # Learning helps on real text: fewer bits than the fixed geometric mean.
    learned = _build("geometric:select=order,lr=0.01").mix_full(p, targets, features)[np.arange(len(targets)), targets]
    fixed = _build("geometric:lr=0").mix_full(p, targets, features)[np.arange(len(targets)), targets]
    assert np.log(learned).sum() > np.log(fixed).sum()


def test_history_is_thinned_evenly_and_matches_the_weights():
    rng = np.random.default_rng(9)
    logp = np.log(rng.uniform(0.01, 1.0, size=(3 * HISTORY_MAX_ROWS + 5, 2)))
    mixer = registry.build("hedge", experts=["a", "b"])
    w = np.concatenate([mixer.weights(logp[lo : lo + 1000], [{}, {}]) for lo in range(0, len(logp), 1000)])
    history = mixer.history()
    positions = history["positions"]
    assert 0 < len(positions) <= HISTORY_MAX_ROWS and positions[0] == 0
    assert len(set(np.diff(positions))) == 1  # evenly spaced
    np.testing.assert_array_equal(history["weights"], w[positions])
    mixer.begin()
    assert mixer.history() == {}


def test_begin_resets_state(outputs):
    p, targets, logp, features = outputs
    for spec in ["hedge", "fixedshare", "pr909", "geometric:select=order"]:
        mixer = _build(spec)
        first = mixer.mix_full(p[:50], targets[:50], _rows(features, 0, 50))
        mixer.mix_full(p[50:100], targets[50:100], _rows(features, 50, 100))
        mixer.begin()
        np.testing.assert_array_equal(mixer.mix_full(p[:50], targets[:50], _rows(features, 0, 50)), first)


def test_canonical_spec_rebuilds_the_same_mixer():
    for spec in MIXER_SPECS:
        mixer = _build(spec)
        assert _build(mixer.spec).options == mixer.options
    assert _build("hedge").spec == "hedge"
    assert _build("fixed:0.7,0.2,0.1").spec == "fixed:0.7,0.2,0.1"


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "spec, experts, message",
    [
        ("fixed:0.5,0.5", EXPERT_SPECS, "2 weights given for 3 experts"),
        ("fixed:0.5,-0.5", ["a", "b"], "out of range"),
        ("fixed:0,0", ["a", "b"], "all zero"),
        ("fixed:0.5,x", ["a", "b"], "bad value"),
        ("hedge:eta=0", ["a", "b"], "eta must be"),
        ("hedge:eta=-1", ["a", "b"], "out of range"),
        ("hedge:eta=inf", ["a", "b"], "eta=inf is not a finite number"),
        ("hedge:eta=1e308", ["a", "b"], "out of range (maximum 1e+09)"),
        ("hedge:beta=2", ["a", "b"], "unknown option 'beta'"),
        ("fixedshare:alpha=1.5", ["a", "b"], "out of range"),
        ("adaptive:a=0.5,b=0.6", ["unigram", "ngram"], "within [0, 1]"),
        ("adaptive", ["unigram", "uniform"], "no expert matches ngram='ngram'"),
        ("adaptive", ["ngram"], "needs a base expert"),
        ("adaptive:base=1", ["unigram", "ngram"], "same expert"),
        ("adaptive:ngram=5", ["unigram", "ngram"], "only 2 experts"),
        ("pr909:eta=0", ["unigram", "ngram"], "eta must be"),
        ("pr909:logw_floor=1", ["unigram", "ngram"], "out of range"),
        ("geometric:select=topic", ["a", "b"], "not one of none, order"),
        ("geometric:select=order", ["a", "b"], "no expert matches"),
        ("geometric:ngram=0", ["ngram", "b"], "only used with select=order"),
        ("geometric:lr=-1", ["a", "b"], "out of range"),
    ],
)
def test_bad_options_give_one_line_errors(spec, experts, message):
    with pytest.raises(CtxmixError) as info:
        registry.build(spec, experts=experts)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_misuse_of_the_stepwise_protocol_is_an_error(outputs):
    p, targets, logp, features = outputs
    for spec in ["hedge", "geometric"]:
        mixer = _build(spec)
        with pytest.raises(CtxmixError, match="without a preceding next_distribution"):
            mixer.observe(3)
        with pytest.raises(CtxmixError, match="expected"):
            mixer.next_distribution(p[0, :2], [{}, {}])
    with pytest.raises(CtxmixError, match="feature 'order' of expert #1 was not given"):
        _build("adaptive").weights(logp[:2], [{FEATURE_ENTROPY: np.ones(2)}, {}, {}])
