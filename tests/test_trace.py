"""Traces: saving a run's expert outputs, loading them back (refusing anything else), and re-mixing them
with the very same bits as the live run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ctxmix import CtxmixError
from ctxmix.api import run_streams
from ctxmix.mixers import registry as mixer_registry
from ctxmix.trace import load_trace, mix_trace, save_trace
from fixtures.streams import alice, fineweb

EXPERTS = ["unigram", "ngram:orders=2-6"]
# Every registered linear mixer at its defaults, plus "none" (each expert alone) and a non-default one.
LINEAR_MIXERS = ["none", "fixed:0.3,0.7"] + [
    name for name in mixer_registry.names() if mixer_registry.get(name).linear
]
POSITIONS = 20_000  # more than two engine chunks (8192), so chunk boundaries are replayed too


@pytest.fixture(scope="module")
def live():
    """A live run with its trace kept, and the trace saved from it."""
    stream = alice(POSITIONS + 1)
    report = run_streams([stream], EXPERTS, LINEAR_MIXERS, keep_trace=True, keep_bits=True)
    return stream, report


@pytest.fixture
def saved(live, tmp_path):
    stream, report = live
    path = tmp_path / "alice.trace.npz"
    save_trace(path, report.results[0], stream, report.experts)
    return path


def test_mixing_a_saved_trace_gives_the_live_runs_bits(live, saved):
    _, report = live
    mixed = mix_trace(load_trace(saved), LINEAR_MIXERS, keep_bits=True)
    assert mixed.runs == report.runs  # same labels, tokens, bytes, bits and bpb, in the same order
    assert mixed.experts == report.experts and mixed.mixers == report.mixers
    live_bits, trace_bits = report.results[0].position_bits, mixed.results[0].position_bits
    assert list(trace_bits) == list(live_bits)
    for label in live_bits:
        assert np.array_equal(trace_bits[label], live_bits[label]), label


def test_trace_round_trip_keeps_stream_experts_and_features(live, saved):
    stream, report = live
    trace = load_trace(saved)
    result = report.results[0]
    assert (trace.name, trace.mode, trace.vocab_size) == (stream.name, "text", stream.vocab_size)
    assert trace.expert_specs == report.experts
    assert np.array_equal(trace.tokens, stream.tokens) and np.array_equal(trace.nbytes, stream.nbytes)
    assert np.array_equal(trace.logp, result.expert_logp)
    assert trace.logp.shape == (POSITIONS, len(EXPERTS))
    for k, features in enumerate(result.expert_features):
        assert sorted(trace.features[k]) == sorted(features) and features  # every provided feature is kept
        for name, values in features.items():
            assert np.array_equal(trace.features[k][name], values)
    # Plain arrays only: readable with pickle refused, metadata as one JSON string.
    with np.load(saved, allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta"][0]))
    assert meta["format"] == "ctxmix-trace" and meta["experts"] == report.experts


def test_shard_mode_trace_round_trips(tmp_path):
    stream = fineweb(3001)
    report = run_streams([stream], ["unigram"], ["none", "hedge"], keep_trace=True)
    path = tmp_path / "shard.npz"
    save_trace(path, report.results[0], stream, report.experts)
    trace = load_trace(path)
    assert trace.mode == "shard"
    assert mix_trace(trace, ["none", "hedge"]).runs == report.runs


def test_trace_refuses_mixers_that_need_full_distributions(saved):
    trace = load_trace(saved)
    full_only = [name for name in mixer_registry.names() if not mixer_registry.get(name).linear]
    assert full_only, "expected at least one registered mixer that needs full distributions (geometric)"
    for name in full_only:
        with pytest.raises(CtxmixError, match="needs full distributions; a trace only holds each expert's p\\(target\\)"):
            mix_trace(trace, ["none", name])


def test_save_trace_needs_a_kept_trace_and_leaves_the_old_file(live, saved):
    stream, _ = live
    before = saved.read_bytes()
    untraced = run_streams([stream.prefix(100)], ["unigram"], ["none"]).results[0]
    with pytest.raises(CtxmixError, match="keep_trace=True"):
        save_trace(saved, untraced, stream.prefix(100), ["unigram"])
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]  # no temp file left behind


def test_save_trace_refuses_a_stream_that_does_not_match(live, tmp_path):
    stream, report = live
    with pytest.raises(CtxmixError, match="expected \\(99, 2\\)"):
        save_trace(tmp_path / "x.npz", report.results[0], stream.prefix(100), report.experts)


def _one_line_error(path) -> str:
    with pytest.raises(CtxmixError) as info:
        load_trace(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_load_trace_refuses_missing_corrupt_and_foreign_files(saved, tmp_path):
    assert "no such file" in _one_line_error(tmp_path / "absent.npz")

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive at all" * 10)
    assert "not a ctxmix trace" in _one_line_error(garbage)

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    assert "corrupt or truncated" in _one_line_error(truncated)

    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    assert "no 'meta' array" in _one_line_error(foreign)

    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    assert "single .npy array" in _one_line_error(single)

    with np.load(saved, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}

    other_format = tmp_path / "other.npz"
    meta = json.loads(str(arrays["meta"][0]))
    np.savez(other_format, **{**arrays, "meta": np.array([json.dumps({**meta, "format": "kenlm-arpa"})])})
    assert "format is 'kenlm-arpa', expected 'ctxmix-trace'" in _one_line_error(other_format)

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{**arrays, "logp": np.array([{"evil": 1}], dtype=object)})
    assert "'logp' is object, expected float64" in _one_line_error(pickled)  # refused from its header, unread

    wrong_shape = tmp_path / "wrong_shape.npz"
    np.savez(wrong_shape, **{**arrays, "logp": arrays["logp"][:-1]})
    assert "logp is float64" in _one_line_error(wrong_shape)

    impossible = tmp_path / "impossible.npz"
    np.savez(impossible, **{**arrays, "logp": np.abs(arrays["logp"])})
    assert "not log-probabilities" in _one_line_error(impossible)


def test_a_run_s_total_is_the_same_float_for_any_chunks():
    """``run.AlignedTotal`` sums each FAST_CHUNK-aligned piece of positions whole, however the chunks cut it
    (the full path's 256-position chunks, a replay's long ones): the same float as summing the pieces of the
    whole row, which plain per-chunk sums are not."""
    from ctxmix.run import FAST_CHUNK, AlignedTotal

    gen = np.random.default_rng(3)
    bits = gen.exponential(3.0, 2 * FAST_CHUNK + 777) * 10.0 ** gen.integers(-3, 3, 2 * FAST_CHUNK + 777)
    first = 1  # position 0 is never scored
    expected = 0.0
    for lo in range(0, len(bits), FAST_CHUNK):
        piece = bits[max(lo - first, 0): lo + FAST_CHUNK - first]
        expected += float(piece.sum())
    naive = set()
    random_cuts = sorted(gen.choice(len(bits), 40, replace=False))
    for cuts in ([], [255, 511, 767], list(range(100, len(bits), 256)), random_cuts):
        total = AlignedTotal()
        naive_total = 0.0
        for lo, hi in zip([0, *cuts], [*cuts, len(bits)]):
            total.add(bits[lo:hi], first + lo)
            naive_total += float(bits[lo:hi].sum())
        assert total.value() == expected
        naive.add(naive_total)
    assert len(naive) > 1  # (per-chunk sums do depend on the chunks here)
