"""Lanes: the codec's stream cut into segments coded in lockstep, decoded bit for bit, and refused safely.

Real roundtrips with the default experts (the shipped neural model, the n-gram expert, cm) on the committed
texts, cut short so the whole module runs in well under a minute.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import pytest

from ctxmix import codec
from ctxmix.codec import (
    compress,
    decode_lanes,
    decompress,
    encode_lanes,
    encode_tokens,
    read_container,
)
from ctxmix.errors import CtxmixError
from ctxmix.models.integer import ATTENTION_FLOOR
from ctxmix.lanes import (
    AHEAD_MIN_LANES,
    ATTENTION_FLOOR_FROM,
    LANE_VERSION,
    LaneEngine,
    LanePlan,
    default_lanes,
)

UTF8_TEXTS = ["alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt", "fields.c", "grammar.lsp", "xargs.1",
              "enwik8.first300k"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: small forwards, shared cores
CUT_BYTES = 1500  # ~600 tokens a text: every step of the lane engine, in a second or two per roundtrip


@pytest.fixture
def cut(text_dir, tmp_path):
    def make(name: str, n: int = CUT_BYTES):
        path = tmp_path / f"{name}.head"
        path.write_bytes((text_dir / name).read_bytes()[:n])  # ASCII texts: any cut is valid UTF-8
        return path

    return make


def roundtrip(path, tmp_path, **kwargs):
    packed, restored = tmp_path / "packed.cmx", tmp_path / "restored.txt"
    result = compress(path, packed, **kwargs)
    back = decompress(packed, restored)
    assert restored.read_bytes() == path.read_bytes()
    assert back.lanes == result.lanes == read_container(packed)[0]["lanes"]
    return result


# ----------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_tokens, lanes", [(2, 1), (2, 5), (10, 3), (100, 7), (1001, 64), (64, 64), (65, 64)])
def test_lanes_cover_every_coded_position_once_in_contiguous_segments(n_tokens, lanes):
    plan = LanePlan.make(n_tokens, lanes)
    assert plan.lanes == min(lanes, max(1, n_tokens - 1))  # as asked, but never an empty lane
    assert plan.lengths().min() >= 1 and len(plan.lengths()) == plan.lanes
    seen = []
    for step in range(plan.steps):
        active = plan.active(step)
        assert active >= 1
        seen += list(plan.starts()[:active] + step)
    assert sorted(seen) == list(range(1, n_tokens))
    segments = [list(range(s, s + n)) for s, n in zip(plan.starts(), plan.lengths())]
    assert sum(segments, []) == list(range(1, n_tokens))  # contiguous, in stream order
    assert plan.lengths().max() - plan.lengths().min() <= 1


def test_default_lanes_grow_with_the_length_and_are_capped():
    assert default_lanes(2) == 1 and default_lanes(5000) == 2 and default_lanes(110_000) == 53
    assert default_lanes(300_000) == 128
    assert default_lanes(10**8) == default_lanes(10**7) > 1


# ----------------------------------------------------------------------------------------------------
# Roundtrips with the default experts
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", UTF8_TEXTS)
def test_every_text_roundtrips_bit_exactly_with_lanes(cut, tmp_path, name):
    result = roundtrip(cut(name), tmp_path, lanes=5)
    assert result.lanes == 5 and [e.split(":")[0] for e in result.experts] == ["neural", "ngram"]
    assert result.bits - 1 <= 8 * result.payload_bytes <= result.bits * 1.001 + 64  # the size is the bits


@pytest.mark.parametrize("lanes", [1, 64, 256])
def test_one_lane_many_lanes_and_more_lanes_than_tokens_roundtrip(cut, tmp_path, lanes):
    result = roundtrip(cut("grammar.lsp", 400), tmp_path, lanes=lanes)
    assert result.lanes == min(lanes, result.tokens)


def test_the_header_is_compact_for_the_default_specs(cut, tmp_path):
    result = roundtrip(cut("xargs.1", 300), tmp_path)
    assert result.header_bytes <= 64  # format 2 wrote 200-odd bytes for the same file


def test_the_decoder_follows_the_lanes_the_header_records(cut, tmp_path):
    path = cut("fields.c", 800)
    packed = tmp_path / "f.cmx"
    compress(path, packed, experts=["ngram", "ngram:orders=2-4"], mixers="cm", lanes=4)
    header, words = read_container(packed)
    assert header["lanes"] == 4 and header["engine"] == codec.ENGINE_LANES_INTEGER
    header["lanes"] = 3  # a decoder that took its own lane count would decode something else
    packed.write_bytes(b"".join(codec._container_parts(header, words)))
    with pytest.raises(CtxmixError, match="fails its checksum|do not form valid text|used up"):
        decompress(packed, tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()


def test_one_lane_of_the_lane_engine_gives_the_stepwise_engine_s_bits(text_dir):
    # n-gram tables without leaves and cm's lane kernels: the numbers of the one-stream path, float for float
    from ctxmix.data import encode_text

    tokens = encode_text((text_dir / "xargs.1").read_bytes()).tokens.astype(np.int64)
    specs = ["ngram", "ngram:orders=2-4"]
    _, lanes_stats = encode_lanes(tokens, LaneEngine(*_parts(specs), 1024), LanePlan.make(len(tokens), 1))
    _, step_stats = encode_tokens(tokens, codec._build(specs, "cm", 1024))
    assert lanes_stats.bits == pytest.approx(step_stats.bits, rel=1e-12)


def _parts(specs):
    predictor = codec._build(specs, "cm", 1024)
    return predictor.experts, predictor.mixer


def test_lane_distributions_are_causal_in_decode_order(text_dir):
    """Changing the tokens from some lane of a step on (in decode order: step by step, lanes in order) leaves
    every distribution computed before those tokens are coded unchanged: those of earlier steps, and of the
    step's groups of lanes up to the changed one's (the shared n-gram tables read only earlier steps, the
    neural expert only its own lane, and the mixer, from lane version 5 on, the step's earlier groups too).
    The next group's rows do move: the mixer learned from the changed group before mixing it."""
    from ctxmix.data import encode_text

    tokens = encode_text((text_dir / "grammar.lsp").read_bytes()[:600]).tokens.astype(np.int64)
    plan = LanePlan.make(len(tokens), 4)  # groups of lanes (AHEAD_GROUPS = 3): 0, 1, then 2-3
    cut_step, cut_lane = plan.steps // 2, 1
    changed = tokens.copy()
    for step in range(cut_step, plan.steps):
        lanes = plan.starts()[: plan.active(step)] + step
        changed[lanes[cut_lane if step == cut_step else 0:]] = 7

    def rows(stream):
        engine = LaneEngine(*_parts_default(), 1024, ahead=True)  # working ahead, in groups of lanes
        engine.begin(plan, int(stream[0]))
        out = []
        for step in range(cut_step + 1):
            positions = plan.starts()[: plan.active(step)] + step

            def code(lo, p):
                out.append((step, lo, p.copy()))
                return stream[positions[lo: lo + len(p)]]

            engine.step(len(positions), code)
        return out

    before, after = rows(tokens), rows(changed)
    coded_first = [(step, lo) for step, lo, _ in before].index((cut_step, cut_lane))  # the changed group's rows
    assert (before[coded_first + 1][:2]) == (cut_step, 2)
    for (_, _, a), (_, _, b) in zip(before[: coded_first + 1], after[: coded_first + 1]):
        assert np.array_equal(a, b)
    assert not np.array_equal(before[coded_first + 1][2], after[coded_first + 1][2])


def _parts_default():
    predictor = codec._build(["neural", "ngram"], "cm", 1024)
    return predictor.experts, predictor.mixer


def test_working_ahead_on_a_second_thread_changes_no_bit(cut):
    """The neural expert's rows prepared on the engine's second thread, in groups of lanes each stepped as
    soon as its tokens are coded, give the payload of the same engine run on one thread, bit for bit; and
    the decoder working ahead gets the tokens back. The last step's active lanes are the first group, so
    the others sit out that step. From lane version 5 on every run mixes in the same groups (the mixer learns
    group by group); before, a run not working ahead mixed all lanes at once."""
    from ctxmix.components import run_text_options, run_tokenizer

    specs = ["neural", "ngram"]
    tokens = run_tokenizer(specs).encode_text(cut("alice29.txt", 2500).read_bytes(),
                                              **run_text_options(specs)).tokens.astype(np.int64)
    tokens = tokens[: len(tokens) - (len(tokens) - 3) % 6]  # N - 1 = 2 (mod 6): 2 lanes take the last step
    plan = LanePlan.make(len(tokens), 6)
    assert plan.active(plan.steps - 1) == 2
    payloads = []
    for ahead in (True, False):
        engine = LaneEngine(*_parts_default(), 1024, ahead=ahead)
        payloads.append(encode_lanes(tokens, engine, plan)[0])
        assert engine._ahead == ([0] if ahead else [])
        assert engine._groups == [(0, 2), (2, 4), (4, 6)]
        # the groups' caches share one integer step: one copy of the prepared weights, used by both threads
        steps = [group.cache.integer_step for group in engine.experts[0]._lane_groups]
        assert steps[0] is not None and all(step is steps[0] for step in steps)
        assert sum(kind == "block" for kind, _ in steps[0]._prepared) == len(engine.experts[0].model.blocks)
    assert np.array_equal(payloads[0], payloads[1])
    decoded = decode_lanes(payloads[0], plan, int(tokens[0]), LaneEngine(*_parts_default(), 1024, ahead=True))
    assert np.array_equal(decoded, tokens)
    engine = LaneEngine(*_parts_default(), 1024)  # by default only from AHEAD_MIN_LANES lanes, where it pays
    for lanes in (6, AHEAD_MIN_LANES):
        engine.begin(LanePlan.make(10 * AHEAD_MIN_LANES, lanes), int(tokens[0]))
        assert engine._ahead == ([0] if lanes >= AHEAD_MIN_LANES else [])
    for version in (LANE_VERSION - 1, LANE_VERSION):
        engine = LaneEngine(*_parts_default(), 1024, ahead=False, version=version)
        engine.begin(plan, int(tokens[0]))
        assert engine._groups == ([(0, 6)] if version < 5 else [(0, 2), (2, 4), (4, 6)])
        engine = LaneEngine(*_parts_default(), 1024, integer=False, ahead=True, version=version)
        engine.begin(plan, int(tokens[0]))  # float rows depend on the batch: all lanes at once, not ahead
        assert engine._ahead == ([0] if version < 5 else [])
        assert engine._groups == ([(0, 6)] if version < 5 else [(0, 2), (2, 4), (4, 6)])
    with pytest.raises(CtxmixError, match="only the integer lane step"):
        engine.experts[0].lanes_begin(6, len(tokens), int(tokens[0]), integer=False, groups=[(0, 3), (3, 6)])


def test_the_coding_thread_takes_groups_the_second_thread_has_not_started(cut, monkeypatch):
    """While it waits for a group's rows, the coding thread steps the later groups still queued for the second
    thread (here a slowed one): both threads step groups, and the payload is one thread's, bit for bit."""
    import threading
    import time

    from ctxmix.components import run_text_options, run_tokenizer
    from ctxmix.experts.neural import NeuralExpert

    specs = ["neural", "ngram"]
    tokens = run_tokenizer(specs).encode_text(cut("alice29.txt", 1500).read_bytes(),
                                              **run_text_options(specs)).tokens.astype(np.int64)
    plan = LanePlan.make(len(tokens), 6)
    expected = encode_lanes(tokens, LaneEngine(*_parts_default(), 1024, ahead=False), plan)[0]
    stepped_on = set()
    prepare = NeuralExpert.lanes_prepare

    def slowed(self, group=0):
        on_worker = threading.current_thread().name.startswith("ctxmix-ahead")
        stepped_on.add("second" if on_worker else "coding")
        if on_worker:
            time.sleep(0.005)
        prepare(self, group)

    monkeypatch.setattr(NeuralExpert, "lanes_prepare", slowed)
    engine = LaneEngine(*_parts_default(), 1024, ahead=True)
    payload = encode_lanes(tokens, engine, plan)[0]
    assert engine._groups == [(0, 2), (2, 4), (4, 6)]
    assert stepped_on == {"second", "coding"}
    assert np.array_equal(payload, expected)


@pytest.mark.parametrize("lane_state", [1, 2, 3])
def test_cm_mixes_a_step_s_lanes_in_groups_as_it_mixes_them_at_once(lane_state):
    """cm's rows of lanes lo..hi-1 (``lanes=(lo, hi)``) are its rows of all lanes at once, with their order and
    entropy contexts, and it learns the same (every lane state); groups come from lane 0 on, in order, and
    cover the step before it learns."""
    from ctxmix.experts.base import FEATURE_ENTROPY, FEATURE_ORDER

    rng = np.random.default_rng(3)
    mixers = []
    for grouped in (False, True):
        _, mixer = _parts(["ngram", "ngram:orders=2-4"])
        mixer.lanes_begin(5, lane_state=lane_state)
        mixers.append(mixer)
    for _ in range(4):
        p = rng.dirichlet(np.ones(1024), size=(5, 2))
        features = [{FEATURE_ORDER: rng.integers(0, 7, 5).astype(float), FEATURE_ENTROPY: rng.uniform(0, 6, 5)}
                    for _ in range(2)]
        whole = mixers[0].lanes_distributions(p, features)
        parts = [mixers[1].lanes_distributions(p, features, lanes=(lo, hi)) for lo, hi in ((0, 2), (2, 5))]
        assert np.array_equal(whole, np.concatenate(parts))
        tokens = rng.integers(0, 1024, 5)
        for mixer in mixers:
            mixer.lanes_observe(tokens)
    assert len(np.unique(mixers[0]._contexts(features, 5), axis=0)) > 1  # the lanes' contexts differ
    with pytest.raises(CtxmixError, match="asked before lanes 0..1"):
        mixers[1].lanes_distributions(p, features, lanes=(2, 5))
    mixers[1].lanes_distributions(p, features, lanes=(0, 2))
    with pytest.raises(CtxmixError, match="after mixing lanes 0..1 of 5"):
        mixers[1].lanes_observe(tokens)
    # learning group by group (lane state 4's way): each group once mixed, from where the last one stopped
    with pytest.raises(CtxmixError, match="lanes 0..2, where lane 0 is the next to learn from and lanes 0..1 are"):
        mixers[1].lanes_observe(tokens[:3], lanes=(0, 3))
    with pytest.raises(CtxmixError, match="3 tokens for lanes 0..1"):
        mixers[1].lanes_observe(tokens[:3], lanes=(0, 2))
    mixers[1].lanes_observe(tokens[:2], lanes=(0, 2))
    with pytest.raises(CtxmixError, match="lanes 0..1, where lane 2 is the next"):
        mixers[1].lanes_observe(tokens[:2], lanes=(0, 2))
    mixers[1].lanes_distributions(p, features, lanes=(2, 5))
    mixers[1].lanes_observe(tokens[2:], lanes=(2, 5))
    with pytest.raises(CtxmixError, match="without a preceding lanes_distributions"):
        mixers[1].lanes_observe(tokens)


def test_one_engine_codes_again_after_a_run_that_failed_midway(cut):
    """The engine working ahead (here with fewer lanes than groups would take) drops what a failed run left on
    its second thread: after a corrupt payload stops a decode mid-step, the same engine decodes the good one,
    and encoding twice gives the same payload."""
    from ctxmix.components import run_text_options, run_tokenizer

    specs = ["neural", "ngram"]
    tokens = run_tokenizer(specs).encode_text(cut("asyoulik.txt", 900).read_bytes(),
                                              **run_text_options(specs)).tokens.astype(np.int64)
    plan = LanePlan.make(len(tokens), 2)
    engine = LaneEngine(*_parts_default(), 1024, ahead=True)
    words = encode_lanes(tokens, engine, plan)[0]
    assert engine._groups == [(0, 1), (1, 2)]
    assert np.array_equal(encode_lanes(tokens, engine, plan)[0], words)
    assert np.array_equal(words, encode_lanes(tokens, LaneEngine(*_parts_default(), 1024, ahead=False), plan)[0])
    with pytest.raises(CtxmixError, match="used up|cannot be decoded"):
        decode_lanes(words[: len(words) // 3], plan, int(tokens[0]), engine)
    assert not engine._pending
    assert np.array_equal(decode_lanes(words, plan, int(tokens[0]), engine), tokens)


def test_float_lane_files_of_the_first_lane_version_still_decode(cut, tmp_path):
    """Lane files without the integer flag were coded with float32 neural matmuls; the decoder follows the flag."""
    from ctxmix.components import run_text_options, run_tokenizer

    path = cut("asyoulik.txt", 700)
    packed = tmp_path / "a.cmx"
    compress(path, packed, lanes=4)
    header, integer_words = read_container(packed)
    assert header["engine"] == codec.ENGINE_LANES_INTEGER
    specs = ["neural", "ngram"]  # compress's defaults, tokenized as it does
    tokens = run_tokenizer(specs).encode_text(path.read_bytes(), **run_text_options(specs)).tokens.astype(np.int64)
    float_words, _ = encode_lanes(tokens, LaneEngine(*_parts_default(), 1024, integer=False),
                                  LanePlan.make(len(tokens), 4))
    assert not np.array_equal(float_words, integer_words)  # the two engines' floats differ
    header.update(engine=codec.ENGINE_LANES, payload_words=len(float_words),
                  payload_crc32=zlib.crc32(float_words.astype("<u4").tobytes()))
    packed.write_bytes(b"".join(codec._container_parts(header, float_words)))
    assert read_container(packed)[0]["engine"] == codec.ENGINE_LANES
    decompress(packed, tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_bytes() == path.read_bytes()
    header["engine"] = codec.ENGINE_LANES_INTEGER  # the same payload read as integer lanes is not the text
    packed.write_bytes(b"".join(codec._container_parts(header, float_words)))
    with pytest.raises(CtxmixError, match="fails its checksum|do not form valid text|used up"):
        decompress(packed, tmp_path / "b.txt")


@pytest.mark.parametrize("version", [6, 7])
def test_a_file_written_at_an_earlier_commit_still_decodes_to_its_text(test_data, tmp_path, version):
    """A .cmx an earlier ctxmix wrote (tests/data/SOURCES.md: lane version 6 at 7f4fc0c, its matmuls through
    torch._int_mm; lane version 7 at the commit that made it; each 41 lanes working ahead in 3 groups, 148
    steps: past the model's 128 cached positions) decodes to its text today: any change to the arithmetic of
    its version (a kernel's order, a matmul that is not exact, the AMX tiles, the vector reductions, a fused
    product) would decode other tokens and fail the input's digest."""
    name = f"alice29.first14000.lanes41.v{version}.cmx"
    packed, restored = test_data / "cmx" / name, tmp_path / "back.txt"
    header = read_container(packed)[0]
    assert (header["lane_version"], header["lanes"], header["tokens"]) == (version, 41, 6085)
    decompress(packed, restored)
    assert restored.read_bytes() == (test_data / "text" / "alice29.txt").read_bytes()[:14000]


@pytest.mark.parametrize("version", range(1, LANE_VERSION + 1))
def test_files_of_every_lane_version_decode_with_their_version(cut, tmp_path, version):
    """A lane file records its lanes' version (flag 8 when above 1); the decoder runs that version's
    arithmetic, so files of earlier versions still decode, and no other version decodes them, unless that
    version codes these tokens into the same payload (versions 5 and 6 differ only where an attention weight
    falls below the floor, which a text this short may never reach)."""
    from ctxmix.components import run_text_options, run_tokenizer

    path = cut("lcet10.txt", 3000)
    packed = tmp_path / "v.cmx"
    compress(path, packed, lanes=5)
    header, _ = read_container(packed)
    assert header["lane_version"] == LANE_VERSION
    specs = ["neural", "ngram"]
    tokens = run_tokenizer(specs).encode_text(path.read_bytes(), **run_text_options(specs)).tokens.astype(np.int64)
    def payload(v):
        engine = LaneEngine(*_parts_default(), 1024, version=v)
        words = encode_lanes(tokens, engine, LanePlan.make(len(tokens), 5))[0]
        step = engine.experts[0]._lane_groups[0].cache.integer_step
        assert step.attention_floor == (ATTENTION_FLOOR if v >= ATTENTION_FLOOR_FROM else 0)
        return words

    words = payload(version)
    header.update(lane_version=version, payload_words=len(words), payload_crc32=zlib.crc32(words.astype("<u4").tobytes()))
    packed.write_bytes(b"".join(codec._container_parts(header, words)))
    assert read_container(packed)[0]["lane_version"] == version
    decompress(packed, tmp_path / "v.txt")
    assert (tmp_path / "v.txt").read_bytes() == path.read_bytes()
    for other in set(range(1, LANE_VERSION + 1)) - {version}:
        header["lane_version"] = other
        packed.write_bytes(b"".join(codec._container_parts(header, words)))
        # (only the floor's two versions can agree: every earlier change reaches every file's floats)
        if {version, other} == {ATTENTION_FLOOR_FROM - 1, ATTENTION_FLOOR_FROM} and np.array_equal(payload(other), words):
            decompress(packed, tmp_path / f"other{other}.txt")
            assert (tmp_path / f"other{other}.txt").read_bytes() == path.read_bytes()
            continue
        with pytest.raises(CtxmixError, match="fails its checksum|do not form valid text|used up|cannot be decoded"):
            decompress(packed, tmp_path / f"other{other}.txt")


def test_experts_without_lanes_code_on_one_lane(cut, tmp_path):
    result = roundtrip(cut("xargs.1", 800), tmp_path, experts=["unigram", "ngram"], mixers="hedge", lanes=8)
    assert result.lanes == 1
    assert read_container(tmp_path / "packed.cmx")[0]["engine"] == codec.ENGINE_STEPWISE


def test_two_threads_roundtrip_and_are_recorded(cut, tmp_path):
    # (tiny: on a busy 2-core machine two OpenMP threads spin-wait at every op; conftest.one_torch_thread)
    result = roundtrip(cut("alice29.txt", 60), tmp_path, lanes=3, threads=2)
    assert result.threads == 2 and read_container(tmp_path / "packed.cmx")[0]["threads"] == 2


# ----------------------------------------------------------------------------------------------------
# Refusals: one line, nothing written
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lane_packed_bytes(text_dir, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("lanes") / "x.cmx"
    compress(text_dir / "xargs.1", out, experts=["ngram", "ngram:orders=2-4"], mixers="cm", lanes=6)
    return out.read_bytes()


@pytest.fixture
def lane_packed(lane_packed_bytes, tmp_path):
    out = tmp_path / "x.cmx"
    out.write_bytes(lane_packed_bytes)
    return out


def assert_refused(path, pattern, tmp_path, **kwargs):
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CtxmixError, match=pattern) as info:
        decompress(path, tmp_path / "restored.out", **kwargs)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_decoder_asked_for_other_threads_is_refused(lane_packed, tmp_path):
    assert_refused(lane_packed, r"coded with 1 torch thread\(s\); decoding with 2", tmp_path, threads=2)
    decompress(lane_packed, tmp_path / "ok.out", threads=1)  # the recorded count is accepted


@pytest.mark.parametrize("keep", [6, 30, -3])
def test_a_truncated_lane_file_is_refused(lane_packed, tmp_path, keep):
    lane_packed.write_bytes(lane_packed.read_bytes()[:keep])
    assert_refused(lane_packed, "bad magic|truncated", tmp_path)


@pytest.mark.parametrize("where", ["header", "payload"])
def test_a_bit_flipped_lane_file_is_refused(lane_packed, tmp_path, where):
    data = bytearray(lane_packed.read_bytes())
    offset = 20 if where == "header" else len(data) - 5
    data[offset] ^= 0x10
    lane_packed.write_bytes(bytes(data))
    assert_refused(lane_packed, "corrupt (header|payload)", tmp_path)


@pytest.mark.parametrize("edit, pattern", [
    ({"lanes": 10**9}, "lanes=1000000000 is out of range"),
    ({"lanes": 0}, "lanes=0 is out of range"),
    ({"threads": 10**6}, "threads=1000000 is out of range"),
    ({"device": 9}, "device=9 is out of range"),
    ({"device_record": "NVIDIA H200, sm_90, 132 SMs; torch 2.11.0, CUDA 13.0"}, "CUDA device recorded for a file coded on the CPU"),
    ({"device": codec.DEVICE_CUDA}, "integer lanes, which run on the CPU only, on a CUDA device"),
    ({"lane_version": 99}, "lanes of version 99; this ctxmix codes lanes of versions 1"),
])
def test_crafted_lane_and_thread_counts_are_refused_before_anything_is_allocated(lane_packed, tmp_path, edit, pattern):
    header, words = read_container(lane_packed)
    header.update(edit)
    lane_packed.write_bytes(b"".join(codec._container_parts(header, words)))
    assert_refused(lane_packed, pattern, tmp_path)


def test_format_2_files_still_decode(text_dir, tmp_path):
    """A file in the previous format (one lane, run.Predictor, full sha256 digests) decodes as before."""
    from ctxmix.components import run_tokenizer

    path = text_dir / "grammar.lsp"
    packed = tmp_path / "g.cmx"
    compress(path, packed, experts=["unigram", "ngram"], mixers="hedge")
    header, words = read_container(packed)
    header.update(format=2, input_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                  tokenizer_sha256=run_tokenizer(["unigram", "ngram"]).sha256)
    body = codec._pack_header_v2(header)
    packed.write_bytes(codec.MAGIC + codec._U16.pack(len(body)) + body + codec._U32.pack(zlib.crc32(body))
                       + words.astype("<u4").tobytes())
    assert read_container(packed)[0]["format"] == 2
    decompress(packed, tmp_path / "g.lsp")
    assert (tmp_path / "g.lsp").read_bytes() == path.read_bytes()


CUDA_RECORD = "NVIDIA H200, sm_90, 132 SMs; torch 2.11.0+cu130, CUDA 13.0"


def test_a_cuda_file_records_its_device_and_is_refused_on_the_cpu(lane_packed, tmp_path):
    """A file coded by the float lanes on a CUDA device keeps the device record through the header, and a
    CPU decoder refuses it in one line, writing nothing."""
    header, words = read_container(lane_packed)
    header.update(device=codec.DEVICE_CUDA, device_record=CUDA_RECORD, engine=codec.ENGINE_LANES)
    lane_packed.write_bytes(b"".join(codec._container_parts(header, words)))
    back, _ = read_container(lane_packed)
    assert (back["device"], back["device_record"], back["engine"]) == (codec.DEVICE_CUDA, CUDA_RECORD, codec.ENGINE_LANES)
    assert_refused(lane_packed, "computed on a CUDA device when coding and would compute on the CPU here", tmp_path)


def test_a_cuda_file_is_refused_on_another_gpu_or_software():
    header = {"device": codec.DEVICE_CUDA, "device_record": CUDA_RECORD}
    codec.check_device("x.cmx", header, codec.DEVICE_CUDA, CUDA_RECORD)  # the same device and software: decoded
    for other in ("NVIDIA H100 80GB HBM3, sm_90, 132 SMs; torch 2.11.0+cu130, CUDA 13.0",
                  "NVIDIA H200, sm_90, 132 SMs; torch 2.12.0+cu130, CUDA 13.0"):
        with pytest.raises(CtxmixError, match="coded on NVIDIA H200.*this machine is NVIDIA H.*need not repeat"):
            codec.check_device("x.cmx", header, codec.DEVICE_CUDA, other)
    with pytest.raises(CtxmixError, match="hide the GPU with CUDA_VISIBLE_DEVICES"):
        codec.check_device("x.cmx", {"device": codec.DEVICE_CPU, "device_record": ""}, codec.DEVICE_CUDA, CUDA_RECORD)
