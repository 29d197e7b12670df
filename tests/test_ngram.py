"""The unigram and n-gram experts: the four rules on real tokens, against the references, and their specs."""

from __future__ import annotations

import numpy as np
import pytest
import reference  # tests/reference.py (pytest puts tests/ on the path)

from ctxmix.errors import CtxmixError
from ctxmix.experts import registry
from ctxmix.experts.base import FEATURE_ENTROPY
from ctxmix.experts.ngram import MAX_LOAD_PERCENT
from ctxmix.kernels.ngram_exact import (
    DEFERRED,
    EMPTY_KEY,
    NOT_STORED,
    _insert_pass,
    ngram_exact_counts_all,
    ngram_exact_rehash,
    probe,
)

V = 1024
SPECS = [
    "unigram",
    "ngram:orders=2-11,table=exact",
    "ngram:orders=3-5,table=exact,exclusion=false,escape_rate=0",
    "ngram:orders=2-6,table=hashed,buckets=4096",
]
N_REAL = 3000  # real tokens per test stream: every position is checked


def _shard_tokens(path, n):
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[0] == 20240520
    return np.fromfile(path, dtype="<u2", count=n, offset=256 * 4).astype(np.int64)


@pytest.fixture(scope="module")
def real_tokens(smoke_shard_path):
    """The first N_REAL tokens of a real sp1024 FineWeb shard (starts with BOS)."""
    return _shard_tokens(smoke_shard_path, N_REAL)


@pytest.fixture(scope="module")
def text_tokens(alice_path):
    """alice29.txt through the lossless text tokenizer: BOS, then 1,999 tokens."""
    from ctxmix.data import load_text

    return load_text(alice_path).tokens[:2000]


def random_tokens(n, seed):
    """A random 37-token motif repeated with 15% of positions replaced (by a small alphabet, or any
    token): long contexts repeat, short ones branch."""
    rng = np.random.default_rng(seed)
    tokens = np.resize(rng.integers(0, V, 37), n)
    mutated = rng.random(n) < 0.15
    tokens[mutated] = np.where(rng.random(mutated.sum()) < 0.7, rng.integers(0, 4, mutated.sum()),
                               rng.integers(0, V, mutated.sum()))
    return tokens.astype(np.int64)


def build(spec):
    return registry.build(spec, vocab_size=V)


def run(spec, tokens, chunk=None, full=False, want=()):
    """Score ``tokens`` with a fresh expert in chunks of ``chunk``; concatenated output."""
    expert = build(spec)
    expert.begin(tokens)
    chunk = chunk or len(tokens)
    parts = [expert.score_chunk(tokens[i : i + chunk], full=full, want=want) for i in range(0, len(tokens), chunk)]
    logp = np.concatenate([o.logp for o in parts])
    p = np.concatenate([o.p for o in parts]) if full else None
    features = {name: np.concatenate([o.features[name] for o in parts]) for name in parts[0].features}
    return logp, p, features, expert


# ---- against the references ----------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["random", "real"])
def test_unigram_matches_reference(source, real_tokens):
    tokens = random_tokens(1500, 1) if source == "random" else real_tokens[:1500]
    _, p, _, _ = run("unigram", tokens, full=True)
    np.testing.assert_allclose(p, reference.unigram_rows(tokens, V), rtol=1e-12, atol=0)


@pytest.mark.parametrize("spec, kwargs", [
    ("ngram", {}),
    ("ngram:orders=3-5,exclusion=false,escape_rate=0", {"lo": 3, "hi": 5, "exclusion": False, "escape_rate": 0.0}),
    ("ngram:orders=2-4,discount=0.3,strength=2;0.5,escape_rate=0.5",
     {"hi": 4, "discount": (0.3,), "strength": (2.0, 0.5), "escape_rate": 0.5}),
])
@pytest.mark.parametrize("source", ["random", "real", "text"])
def test_ngram_exact_matches_reference(spec, kwargs, source, real_tokens, text_tokens):
    tokens = {"random": random_tokens(1200, 2), "real": real_tokens[:1200], "text": text_tokens[:1200]}[source]
    _, p, features, _ = run(spec, tokens, chunk=500, full=True, want=("order", "ctx_total", "ctx_distinct"))
    want_p, want_features = reference.exact_rows(tokens, V, **kwargs)
    np.testing.assert_allclose(p, want_p, rtol=1e-11, atol=0)
    for i, name in enumerate(("order", "ctx_total", "ctx_distinct")):
        np.testing.assert_array_equal(features[name], want_features[i])
    if source == "random":
        assert features["order"].max() == kwargs.get("hi", 11)  # the longest contexts were really used


def test_leaves_give_the_numbers_of_storing_every_ngram():
    """Leaves (kernels/ngram_exact.py) store a once-seen context's one continuation only at the context's
    second occurrence. Runs and short periods make that second occurrence come one or two positions
    later, and chunks of 1, 2 and 5 put it on every side of a chunk boundary: the rows must still be
    those of the reference, which stores every n-gram, and stepwise must agree bit for bit."""
    tokens = np.concatenate((np.full(30, 5), np.tile([5, 6], 20), np.tile([7, 8, 9], 12), random_tokens(200, 9),
                             np.full(25, 3))).astype(np.int64)
    want_p, want_features = reference.exact_rows(tokens, V)
    for chunk in (1, 2, 5, len(tokens)):
        _, p, features, _ = run("ngram", tokens, chunk=chunk, full=True, want=("order", "ctx_total", "ctx_distinct"))
        np.testing.assert_allclose(p, want_p, rtol=1e-11, atol=0)
        for i, name in enumerate(("order", "ctx_total", "ctx_distinct")):
            np.testing.assert_array_equal(features[name], want_features[i])
    fast_logp, _, _, _ = run("ngram", tokens, chunk=3)
    np.testing.assert_allclose(np.exp(fast_logp), want_p[np.arange(len(tokens)), tokens], rtol=1e-12, atol=0)
    expert = build("ngram")
    expert.begin(tokens[:0])
    for t, token in enumerate(tokens):
        step_p, _ = expert.next_distribution()
        np.testing.assert_allclose(step_p, want_p[t], rtol=1e-11, atol=0)
        expert.observe(int(token))


def test_leaves_store_far_fewer_entries_than_distinct_ngrams(text_tokens):
    _, _, _, expert = run("ngram", text_tokens)
    distinct = {tuple(text_tokens[t - length + 1 : t + 1]) for length in range(1, 12)
                for t in range(length - 1, len(text_tokens))}
    assert expert.stored_entries() < len(distinct) / 3  # 2,860 of 19,436 on these 2,000 tokens of alice29


@pytest.mark.parametrize("source", ["random", "real"])
def test_ngram_hashed_matches_reference(source, real_tokens):
    tokens = random_tokens(800, 3) if source == "random" else real_tokens[:800]
    _, p, features, _ = run("ngram:orders=2-6,table=hashed,buckets=4096", tokens, chunk=300, full=True,
                            want=("order", "ctx_total", "ctx_distinct"))
    want_p, want_features = reference.hashed_rows(tokens, V, hi=6, buckets=4096)
    np.testing.assert_allclose(p, want_p, rtol=1e-11, atol=0)
    for i, name in enumerate(("order", "ctx_total", "ctx_distinct")):
        np.testing.assert_array_equal(features[name], want_features[i])


def _one_table_pass(keys, n_entries, capacity, limit, prefixes, tokens, ids, novel, start=0):
    """``_insert_pass`` on one table without leaves or lists (prefix ids given); returns where it stopped."""
    none, no_columns = np.zeros(0, np.int32), np.zeros((0, 0), np.int32)
    return _insert_pass(keys, n_entries, capacity, limit, no_columns, none, none, prefixes[0], prefixes[1:],
                        np.zeros(len(tokens), np.bool_), tokens, none, 0, 10, 26, ids, novel, none, none, none, start)


def test_exact_table_insert_and_rehash_keep_every_key():
    rng = np.random.default_rng(4)
    id_bits = 26
    keys = np.full(64, EMPTY_KEY, np.int64)
    n_entries = np.zeros(1, np.int64)
    prefixes = rng.integers(0, 30, 40)
    tokens = rng.integers(0, 4, 40)
    ids, novel = np.empty(40, np.int64), np.empty(40, np.bool_)
    assert _one_table_pass(keys, n_entries, 44, 44, prefixes, tokens, ids, novel) == 40
    expected: dict[tuple[int, int], int] = {}
    for t, key in enumerate(zip(prefixes.tolist(), tokens.tolist())):
        assert novel[t] == (key not in expected)
        expected.setdefault(key, len(expected))
        assert ids[t] == expected[key]
    assert n_entries[0] == len(expected)
    new_keys = ngram_exact_rehash(keys, 101, id_bits)
    for (prefix, token), entry in expected.items():
        key = (prefix << 10) | token
        stored = new_keys[probe(new_keys, key, id_bits)]
        assert stored >> id_bits == key and stored & ((1 << id_bits) - 1) == entry
    assert (new_keys != EMPTY_KEY).sum() == len(expected)


def test_insert_pass_stops_where_its_table_might_fill_and_resumes_after_growing():
    """A pass into a table that can still grow stops at the first n-gram it has no room for, before
    writing anything of it; grown and resumed there, it gives the ids of one pass into a big table. A
    table at its limit does not stop: it fills and stores nothing more."""
    rng = np.random.default_rng(5)
    prefixes, tokens = rng.integers(0, 30, 40), rng.integers(0, 4, 40)
    want_ids, want_novel = np.empty(40, np.int64), np.empty(40, np.bool_)
    want_entries = np.zeros(1, np.int64)
    _one_table_pass(np.full(64, EMPTY_KEY, np.int64), want_entries, 44, 44, prefixes, tokens, want_ids, want_novel)

    keys, n_entries = np.full(8, EMPTY_KEY, np.int64), np.zeros(1, np.int64)
    ids, novel = np.empty(40, np.int64), np.empty(40, np.bool_)
    stop = _one_table_pass(keys, n_entries, 5, 44, prefixes, tokens, ids, novel)
    assert 0 < stop < 40 and n_entries[0] == 5  # full, and the n-gram at stop is new (the 6th)
    np.testing.assert_array_equal(ids[:stop], want_ids[:stop])
    assert want_novel[stop] and want_ids[stop] == 5
    keys = ngram_exact_rehash(keys, 64, 26)
    assert _one_table_pass(keys, n_entries, 44, 44, prefixes, tokens, ids, novel, start=stop) == 40
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(novel, want_novel)
    assert n_entries[0] == want_entries[0]

    full_keys, full_entries = np.full(8, EMPTY_KEY, np.int64), np.zeros(1, np.int64)
    assert _one_table_pass(full_keys, full_entries, 5, 5, prefixes, tokens, ids, novel) == 40
    assert full_entries[0] == 5
    assert (ids == NOT_STORED).sum() > 0 and set(ids[ids >= 0].tolist()) == set(range(5))


def test_tables_grown_mid_pass_give_the_numbers_of_tables_sized_in_advance(monkeypatch):
    """The fast path grows a table when a pass might fill it (after the first block's room); the numbers
    equal those of tables given room for the whole stream before it starts."""
    from ctxmix.experts import ngram as ngram_module

    stops = []
    insert = ngram_module.ngram_exact_insert_lengths

    def spy(*args):
        stop = insert(*args)
        stops.append(stop[0])
        return stop

    monkeypatch.setattr(ngram_module, "ngram_exact_insert_lengths", spy)
    tokens = random_tokens(60_000, 11)
    grown_logp, _, _, grown = run("ngram:threads=1", tokens)
    assert any(stops)  # some pass did stop to grow its table
    sized = build("ngram:threads=1")
    sized.begin(tokens)
    for length in range(1, sized.hi + 1):
        sized._tables[length].reserve_index(len(tokens), 0, len(tokens))
    stops.clear()
    sized_logp = sized.score_chunk(tokens).logp
    assert not any(stops)
    np.testing.assert_array_equal(grown_logp, sized_logp)
    assert grown.stored_entries() == sized.stored_entries()


def test_entry_ids_stay_within_the_slot_packing():
    """Slots hold key << id_bits | id in 63 bits: the expert's tables never hold more than 2^id_bits
    entries, whatever memory cap is asked for."""
    expert = build("ngram:max_mb=1000000")
    assert 2 * expert._id_bits + expert._token_bits <= 63
    for table in expert._tables:
        assert table.max_slots * MAX_LOAD_PERCENT // 100 <= 1 << expert._id_bits


# ---- the four rules on real tokens ------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_every_distribution_is_normalized_and_positive(spec, real_tokens, text_tokens):
    for tokens in (real_tokens, text_tokens):
        _, p, _, _ = run(spec, tokens, full=True)
        assert np.abs(p.sum(axis=1) - 1.0).max() <= 1e-9
        assert p.min() > 0.0


@pytest.mark.parametrize("spec", SPECS)
def test_fast_path_matches_full_distribution(spec, real_tokens):
    want = tuple(build(spec).provides)
    fast_logp, _, fast_features, _ = run(spec, real_tokens, want=want)
    full_logp, p, full_features, _ = run(spec, real_tokens, full=True, want=want)
    np.testing.assert_allclose(fast_logp, np.log(p[np.arange(len(real_tokens)), real_tokens]), rtol=1e-12, atol=0)
    np.testing.assert_allclose(fast_logp, full_logp, rtol=1e-12, atol=0)
    for name in want:
        np.testing.assert_allclose(fast_features[name], full_features[name], rtol=1e-12, atol=0)
    if FEATURE_ENTROPY in want:
        np.testing.assert_allclose(full_features[FEATURE_ENTROPY], -(p * np.log(p)).sum(axis=1), rtol=1e-10)


@pytest.mark.parametrize("spec", SPECS)
def test_chunked_run_equals_single_pass(spec, real_tokens):
    want = tuple(build(spec).provides)
    tokens = real_tokens[:2000]
    whole_logp, _, whole_features, _ = run(spec, tokens, want=want)
    for chunk in (1, 7, 1000):
        logp, _, features, _ = run(spec, tokens, chunk=chunk, want=want)
        np.testing.assert_array_equal(logp, whole_logp)
        for name in want:
            np.testing.assert_array_equal(features[name], whole_features[name])


@pytest.mark.parametrize("spec", SPECS)
def test_stepwise_equals_chunked(spec, real_tokens):
    want = tuple(build(spec).provides)
    tokens = real_tokens[:600]
    _, p, features, _ = run(spec, tokens, chunk=256, full=True, want=want)
    expert = build(spec)
    expert.begin(tokens[:0])  # the decoder does not know the stream
    for t, token in enumerate(tokens):
        step_p, step_features = expert.next_distribution(want=want)
        again_p, _ = expert.next_distribution(want=want)  # asking twice changes nothing
        np.testing.assert_array_equal(step_p, p[t])
        np.testing.assert_array_equal(again_p, step_p)
        for name in want:
            assert step_features[name] == features[name][t], (t, name)
        expert.observe(int(token))


@pytest.mark.parametrize("spec", SPECS)
def test_perturbed_future_does_not_move_the_past(spec, real_tokens):
    tokens = real_tokens[:1500].copy()
    _, p, _, _ = run(spec, tokens, chunk=512, full=True)
    cut = 900
    perturbed = tokens.copy()
    perturbed[cut:] = np.random.default_rng(5).integers(0, V, len(tokens) - cut)
    _, p_perturbed, _, _ = run(spec, perturbed, chunk=512, full=True)
    np.testing.assert_array_equal(p_perturbed[: cut + 1], p[: cut + 1])  # position cut still sees only < cut
    assert not np.array_equal(p_perturbed[cut + 1 :], p[cut + 1 :])


# ---- the memory cap --------------------------------------------------------------------------------


def test_memory_cap_stops_inserting_and_stays_normalized(real_tokens):
    capped_spec = "ngram:orders=2-6,max_mb=0.004"  # 4 KiB per table: a few hundred entries
    _, p, _, capped = run(capped_spec, real_tokens, full=True)
    _, p_free, _, free = run("ngram:orders=2-6", real_tokens, full=True)
    assert np.abs(p.sum(axis=1) - 1.0).max() <= 1e-9 and p.min() > 0.0
    for table in capped._tables[1:]:
        # the full path reads continuation lists (12 bytes per row), which come on top of the cap
        lists = sum(a.nbytes for a in (table.first_child, table.sibling, table.child_token))
        assert lists == 12 * len(table.entries)
        assert table.n_entries[0] <= table.capacity and table.nbytes - lists <= 4096 + 1024
    assert capped._tables[6].n_entries[0] < free._tables[6].n_entries[0]  # it did stop inserting
    assert capped.stored_entries() < free.stored_entries()
    assert not np.array_equal(p, p_free)
    for chunk in (1, 333):  # what is stored is decided by the cap, not by the chunking
        logp, _, _, _ = run(capped_spec, real_tokens, chunk=chunk)
        np.testing.assert_array_equal(logp, np.log(p[np.arange(len(real_tokens)), real_tokens]))


def test_a_full_table_keeps_its_leaves_and_all_paths_agree(text_tokens):
    """When a table is full at a leaf's second occurrence, the leaf stays one (its continuation counts 1
    without an entry): fast, full and stepwise paths must still give the same normalized numbers."""
    from ctxmix.kernels.ngram_exact import TOTAL

    capped_spec = "ngram:orders=2-6,max_mb=0.004"
    tokens = text_tokens[:1200]
    fast_logp, _, _, _ = run(capped_spec, tokens, chunk=100)
    _, p, _, capped = run(capped_spec, tokens, full=True)
    assert np.abs(p.sum(axis=1) - 1.0).max() <= 1e-9 and p.min() > 0.0
    np.testing.assert_allclose(fast_logp, np.log(p[np.arange(len(tokens)), tokens]), rtol=1e-12, atol=0)
    full_with_leaves = [table for table in capped._tables[1:6] if table.n_entries[0] == table.capacity
                        and ((table.nexts[: table.capacity] >= 0)
                             & (table.entries[: table.capacity, TOTAL] >= 1)).any()]
    assert full_with_leaves, "the cap must leave some full table with leaves for this test to mean anything"
    expert = build(capped_spec)
    expert.begin(tokens[:0])
    for t, token in enumerate(tokens):
        step_p, _ = expert.next_distribution()
        np.testing.assert_array_equal(step_p, p[t])
        expert.observe(int(token))


def test_memory_bytes_and_entries_are_reported(real_tokens):
    _, _, _, expert = run("ngram", real_tokens)
    assert expert.stored_entries() > len(real_tokens)  # many lengths of n-grams are stored
    assert 0 < expert.memory_bytes() < 200 * expert.stored_entries()


# ---- specs and errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, canonical", [
    ("ngram", "ngram:orders=2-11,table=exact"),
    ("ngram:orders=2-11,table=exact", "ngram:orders=2-11,table=exact"),
    ("ngram:orders=2-6,table=hashed,buckets=4194304", "ngram:orders=2-6,table=hashed,buckets=4194304"),
    ("ngram:table=hashed,orders=2-6", "ngram:orders=2-6,table=hashed,buckets=4194304"),
    ("ngram:orders=4,max_mb=64", "ngram:orders=4-4,table=exact,max_mb=64"),
    ("ngram:discount=0.6;0.8,exclusion=false", "ngram:orders=2-11,table=exact,discount=0.6;0.8,exclusion=false"),
    ("unigram", "unigram"),
    ("unigram:alpha=0.25", "unigram:alpha=0.25"),
])
def test_canonical_spec_round_trips(spec, canonical):
    expert = build(spec)
    assert expert.spec == canonical
    assert build(expert.spec).spec == canonical


@pytest.mark.parametrize("spec, message", [
    ("ngram:orders=1-3", "minimum 2"),
    ("ngram:orders=5-2", "must not exceed"),
    ("ngram:orders=2-12", "maximum 11"),
    ("ngram:table=bogus", "not one of"),
    ("ngram:table=hashed,buckets=0", "minimum 1"),
    ("ngram:buckets=1000", "table=hashed only"),
    ("ngram:table=hashed,max_mb=5", "table=exact only"),
    ("ngram:discount=1", "[0, 1)"),
    ("ngram:discount=0,strength=0", "must be >= 1e-06"),
    ("ngram:discount=1e-300", "must be >= 1e-06"),  # > 0, but an unseen token's p would underflow to 0
    ("ngram:table=hashed,buckets=3000000000", "maximum 16777216"),
    ("ngram:max_mb=nan", "not a finite number"),
    ("ngram:escape_rate=2", "maximum"),
    ("ngram:order=3", "unknown option"),
    ("unigram:alpha=0", "must be > 0"),
])
def test_bad_options_raise_one_line_errors(spec, message):
    with pytest.raises(CtxmixError) as info:
        build(spec)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("spec", ["unigram", "ngram"])
def test_out_of_vocabulary_token_is_an_error(spec):
    expert = build(spec)
    expert.begin(np.zeros(3, np.int64))
    with pytest.raises(CtxmixError, match="outside the vocabulary"):
        expert.score_chunk(np.array([1, 2, V], np.int64))


@pytest.mark.parametrize("chunk_blocks", [2, 40])
def test_threads_give_the_same_numbers(real_tokens, chunk_blocks):
    """Two threads (a worker inserting blocks ahead) give one thread's numbers: chunks of a few blocks,
    and a chunk long enough for blocks above the smallest size."""
    from ctxmix.experts.ngram import BLOCKS, MIN_BLOCK

    tokens = np.concatenate([real_tokens, random_tokens(chunk_blocks * MIN_BLOCK, 8)])
    chunk = chunk_blocks * MIN_BLOCK + 5
    assert (chunk // BLOCKS > MIN_BLOCK) == (chunk_blocks > BLOCKS)
    want = ("order", "ctx_total", "ctx_distinct")
    one_logp, _, one_features, one = run("ngram:threads=1", tokens, want=want)
    two_logp, _, two_features, two = run("ngram:threads=2", tokens, chunk=chunk, want=want)
    np.testing.assert_array_equal(one_logp, two_logp)
    for name in want:
        np.testing.assert_array_equal(one_features[name], two_features[name])
    np.testing.assert_array_equal(one._escape_scales, two._escape_scales)
    assert one.stored_entries() == two.stored_entries()


def test_counting_absent_ngrams_changes_no_entry_and_full_tables_leave_the_sink_row_free():
    """The counts run branch-free: an n-gram or context that is not stored reads its table's last row
    and writes it back unchanged. That row must belong to no entry, even in a full table: with two
    threads the insert worker may be creating an entry while the counts run, and a write-back of the
    row it was creating (row 0 of an empty table, before) would undo it."""
    hi, lo, n, sentinel = 3, 2, 50, 7
    entries = tuple(np.full((5, 1 if length == hi else 3), sentinel, np.int32) for length in range(hi + 1))
    ids = np.where(np.arange(n) % 3 == 0, DEFERRED, NOT_STORED) * np.ones((hi + 1, 1), np.int64)
    ids[0] = 0  # the empty context
    novel = np.ones((hi + 2, n), np.bool_)
    stats = np.full((n, hi - lo + 1, 3), -1, np.int32)
    ngram_exact_counts_all(entries, ids, novel, np.array([0, NOT_STORED, NOT_STORED, NOT_STORED]), lo, True, stats)
    assert (stats == 0).all()  # nothing stored: c, N and D are 0 everywhere
    assert all((table == sentinel).all() for table in entries)

    _, _, _, capped = run("ngram:orders=2-6,max_mb=0.004", random_tokens(20_000, 3))
    full = [table for table in capped._tables[1:] if table.n_entries[0] == table.limit]
    assert full, "the cap must fill some table for this test to mean anything"
    for table in capped._tables[1:]:
        stored = table.keys[table.keys != EMPTY_KEY] & ((1 << table.id_bits) - 1)
        assert stored.max(initial=0) < len(table.entries) - 1 and table.limit < len(table.entries)


def test_insert_worker_errors_reach_the_caller_and_a_closed_handoff_stops_the_worker():
    from ctxmix.experts.ngram import _Handoff

    def produce(j):
        if j == 1:
            raise ValueError("block 1 failed")

    failing = _Handoff(produce, 5)
    failing.wait_for(0)
    with pytest.raises(ValueError, match="block 1 failed"):
        failing.wait_for(1)
    failing.close()

    produced = []
    handoff = _Handoff(produced.append, 1000)
    handoff.wait_for(0)
    handoff.close()  # the caller stops after block 0 (as on an error): the worker stops within its lead
    assert produced == list(range(len(produced))) and len(produced) <= 1 + _Handoff.LEAD


@pytest.mark.parametrize("spec", ["ngram", "ngram:orders=3-5,exclusion=false,escape_rate=0"])
def test_stepwise_after_chunks_equals_full_path(spec, real_tokens):
    """The continuation lists the stepwise path reads are built mid-stream from the tables, then kept
    up to date by every insert: distributions equal the full path's, before and after more chunks."""
    tokens = real_tokens[:1200]
    _, p, _, _ = run(spec, tokens, chunk=256, full=True)
    expert = build(spec)
    expert.begin(tokens)
    expert.score_chunk(tokens[:500])  # fast path, no lists yet
    for t in range(500, 700):
        step_p, _ = expert.next_distribution()
        np.testing.assert_array_equal(step_p, p[t])
        expert.observe(int(tokens[t]))
    expert.score_chunk(tokens[700:1000])  # chunks again, lists kept by the inserts
    for t in range(1000, 1100):
        step_p, _ = expert.next_distribution()
        np.testing.assert_array_equal(step_p, p[t])
        expert.observe(int(tokens[t]))


def test_ngram_beats_unigram_on_real_text(text_tokens):
    ngram_logp, _, _, _ = run("ngram", text_tokens)
    unigram_logp, _, _, _ = run("unigram", text_tokens)
    assert ngram_logp[1:].sum() > unigram_logp[1:].sum()  # more log-probability: fewer bits


def test_lane_rows_equal_the_chain_over_dense_counts_found_by_scanning_the_tables():
    """The lanes' rows walk the continuation lists of WALK_LANES lanes side by side and apply each order to
    the listed tokens only (``interpolate_listed``); they equal, float for float, the chain over dense count
    rows (``ngram_chain_distribution``) whose counts come from a scan of every stored key of the table, lane
    by lane, at 37 lanes (blocks of 16, 16 and 5) after 40 steps of a stream whose contexts repeat."""
    from ctxmix.experts.ngram import BASE_ALPHA
    from ctxmix.kernels.ngram_chain import ngram_chain_distribution
    from ctxmix.kernels.ngram_exact import COUNT, DISTINCT, TOTAL, WALK_LANES
    from ctxmix.kernels.unigram import unigram_distribution

    n_lanes, steps = 37, 40
    assert n_lanes > 2 * WALK_LANES and n_lanes % WALK_LANES
    expert = build("ngram:orders=2-11,table=exact")
    tokens = random_tokens(1 + n_lanes * steps, seed=5)
    expert.lanes_begin(n_lanes, len(tokens), int(tokens[0]))
    lanes = tokens[1:].reshape(n_lanes, steps)
    for step in range(steps):
        expert.lanes_observe(lanes[:, step])
    rows, features = expert.lanes_distributions(n_lanes, want=("order",))

    tables = expert._tables
    mask = (1 << expert._id_bits) - 1
    stored = [t.keys[t.keys != EMPTY_KEY] for t in tables]
    base = unigram_distribution(expert._unigram_counts, expert._unigram_total, BASE_ALPHA)
    active_orders = 0
    for j in range(n_lanes):
        n_orders = expert.hi - expert.lo + 1
        totals = np.zeros((n_orders, 2), np.int64)
        counts = np.zeros((n_orders, V), np.int32)
        for order in range(expert.lo, expert.hi + 1):
            ctx = expert._lane_ids[j, order - 1]
            if ctx < 0 or tables[order - 1].entries[ctx, TOTAL] == 0:
                continue
            i = order - expert.lo
            totals[i] = tables[order - 1].entries[ctx, TOTAL], tables[order - 1].entries[ctx, DISTINCT]
            keys = stored[order] >> expert._id_bits
            mine = (keys >> expert._token_bits) == ctx
            counts[i, keys[mine] & (V - 1)] = tables[order].entries[stored[order][mine] & mask, COUNT]
            active_orders += 1
        expected, found = ngram_chain_distribution(totals, counts, base, expert._params, expert.lo,
                                                   expert._escape_scales)
        assert np.array_equal(rows[j], expected)
        assert features["order"][j] == found[0]
    assert active_orders > 4 * n_lanes  # lanes have several orders in play
