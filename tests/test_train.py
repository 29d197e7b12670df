"""ctxmix_train on real text: shards, loader slicing, a short training run, the artifact roundtrip, errors.

Every training run here is a tiny model (2 layers x 64) for a few dozen steps on one CPU thread, so the
file stays well under a minute on two shared cores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ctxmix.data import default_tokenizer, read_shard
from ctxmix.errors import CtxmixError
from ctxmix_train import prepare, resolve_config, train
from ctxmix_train.cli import main
from ctxmix_train.config import TrainConfig, apply_overrides
from ctxmix_train.loader import BatchLoader, TokenStream, rank_slice
from ctxmix_train.model import artifact_meta, build_model

# A model small enough that a few dozen steps take seconds on one thread.
TINY = [
    "num_layers=2", "model_dim=64", "num_heads=2", "num_kv_heads=1", "train_seq_len=64",
    "train_batch_tokens=2048", "micro_batch_seqs=32", "val_tokens=8192", "val_every=0", "log_every=0",
    "warmdown_iters=10", "lr_warmup_steps=5", "threads=1", "muon_momentum_warmup_steps=10",
]
TINY_RECORD = TINY + [
    "family=record", "mlp_mult=3.0", "mlp_leaky_slope=0.5", "rope_dims=16", "ln_scale=true", "xsa_last_n=1",
    "bigram_vocab_size=128", "bigram_dim=16", "smear_gate=true", "ve_dim=16", "ve_layers=1", "ema_decay=0.9",
    "quant=int6", "compressor=zstd", "compress_level=3",
]


@pytest.fixture(scope="module")
def alice_shards(tmp_path_factory, text_dir: Path) -> Path:
    """alice29 + asyoulik as challenge-tokenized shards, 10% of each file held out for validation."""
    out = tmp_path_factory.mktemp("shards")
    prepare([text_dir / "alice29.txt", text_dir / "asyoulik.txt"], out, val_fraction=0.1)
    return out


def tiny(extra: list[str] = (), base: list[str] = TINY) -> TrainConfig:
    return resolve_config("toy", sets=list(base) + list(extra))


# --- prepare and the loader -------------------------------------------------------------------------


def test_prepare_writes_bos_plus_challenge_tokens_split_at_the_tail(alice_shards: Path, text_dir: Path):
    sp = default_tokenizer()
    expected = []
    for name in ("alice29.txt", "asyoulik.txt"):
        expected.append(np.asarray([1] + sp.encode((text_dir / name).read_text(encoding="utf-8")), dtype=np.int64))
    train_tokens = read_shard(alice_shards / "train_000000.bin")
    val_tokens = read_shard(alice_shards / "val_000000.bin")
    manifest = json.loads((alice_shards / "prepare.json").read_text())
    # Each file: its first 90% of tokens go to train, the rest (after a BOS of its own) to val.
    t_offset = v_offset = 0
    for tokens, info in zip(expected, manifest["files"]):
        n_train, n_val = info["train_tokens"], info["val_tokens"]
        assert n_train == round(len(tokens) * 0.9)
        np.testing.assert_array_equal(train_tokens[t_offset : t_offset + n_train], tokens[:n_train])
        assert val_tokens[v_offset] == 1  # BOS
        np.testing.assert_array_equal(val_tokens[v_offset + 1 : v_offset + n_val], tokens[n_train:])
        t_offset += n_train
        v_offset += n_val
    assert t_offset == len(train_tokens) and v_offset == len(val_tokens)


def test_prepare_jsonl_splits_at_document_starts(write_file, tmp_path: Path):
    docs = [f"Document number {i}: " + "the quick brown fox jumps over the lazy dog. " * (i + 1) for i in range(10)]
    path = write_file("docs.jsonl", "\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    result = prepare([path], tmp_path / "out", val_fraction=0.2)
    assert result.documents == 10
    train_tokens = read_shard(tmp_path / "out" / "train_000000.bin")
    val_tokens = read_shard(tmp_path / "out" / "val_000000.bin")
    n_train_docs = int((train_tokens == 1).sum())
    assert n_train_docs + int((val_tokens == 1).sum()) == 10  # whole documents, one BOS each
    assert train_tokens[0] == 1 and val_tokens[0] == 1
    sp = default_tokenizer()
    assert sp.decode(val_tokens[1:].tolist()).startswith(f"Document number {n_train_docs}:")


def test_prepare_with_several_shards_and_shuffled_blocks_keeps_every_token(alice_shards: Path, text_dir: Path,
                                                                           tmp_path: Path):
    from ctxmix_train.prepare import shuffle_blocks

    result = prepare([text_dir / "alice29.txt", text_dir / "asyoulik.txt"], tmp_path, val_fraction=0.1,
                     shard_tokens=30_000, shuffle_block=1000, seed=3)
    assert len(result.train_shards) == 4
    shuffled = np.concatenate([read_shard(tmp_path / name) for name in result.train_shards])
    ordered = read_shard(alice_shards / "train_000000.bin")
    assert not np.array_equal(shuffled, ordered)
    np.testing.assert_array_equal(np.sort(shuffled), np.sort(ordered))
    # Blocks move whole: a shuffled arange breaks only at block starts.
    moved = shuffle_blocks(np.arange(10_500), 1000, seed=3)
    runs = moved[np.r_[0, np.flatnonzero(np.diff(moved) != 1) + 1]]
    assert sorted(runs.tolist()) == list(range(0, 10_500, 1000)) and moved[0] != 0


def test_loader_rank_slices_are_disjoint_and_cover_each_global_batch(alice_shards: Path):
    paths = [alice_shards / "train_000000.bin"]
    T, S = 64, 24
    for K in range(1, 9):
        owned = [set() for _ in range(S)]
        for r in range(K):
            start, end = rank_slice(S, r, K)
            for s in range(start, end):
                owned[s].add(r)
        assert all(len(o) == 1 for o in owned)  # every sequence has exactly one rank
        loaders = [BatchLoader(paths, 1024, T, S, micro_batch_seqs=5, rank=r, world_size=K) for r in range(K)]
        single = BatchLoader(paths, 1024, T, S, micro_batch_seqs=S)
        for _ in range(3):
            whole = single.next_batch()[0]
            parts = [loader.next_batch() for loader in loaders]
            x = np.concatenate([mb.x for part in parts for mb in part])
            y = np.concatenate([mb.y for part in parts for mb in part])
            np.testing.assert_array_equal(x, whole.x)  # the same global batch for every world size
            np.testing.assert_array_equal(y, whole.y)
            assert all(len(mb.x) <= 5 for part in parts for mb in part)


def test_loader_targets_every_token_once_per_epoch(alice_shards: Path):
    tokens = read_shard(alice_shards / "train_000000.bin")
    T, S = 64, 8
    loader = BatchLoader([alice_shards / "train_000000.bin"], 1024, T, S, micro_batch_seqs=S)
    n_batches = (len(tokens) - 1) // (S * T)
    targets = np.concatenate([loader.next_batch()[0].y.ravel() for _ in range(n_batches)])
    np.testing.assert_array_equal(targets, tokens[1 : 1 + n_batches * S * T])  # in order, no gaps, no repeats
    stream = TokenStream([alice_shards / "train_000000.bin"], 1024)
    stream.take(len(tokens) - 5)
    np.testing.assert_array_equal(stream.take(10), np.concatenate([tokens[-5:], tokens[:5]]))  # wraps around


# --- config ---------------------------------------------------------------------------------------------


def test_config_overrides_keep_types_and_name_known_keys(write_file):
    cfg = resolve_config("toy", sets=["matrix_lr=0.02", "num_layers=3", "ln_scale=false"])
    assert cfg.matrix_lr == 0.02 and cfg.num_layers == 3
    toml = write_file("c.toml", 'recipe = "toy-record"\nnum_layers = 2\nmatrix_lr = 1\nve_layers = "1"\n')
    cfg = resolve_config(config_file=toml)
    assert cfg.family == "record" and cfg.num_layers == 2 and cfg.matrix_lr == 1.0  # int widens to float
    for bad, message in [
        ('{"num_layerz": 2}', "unknown config key 'num_layerz' (did you mean num_layers"),
        ('{"num_layers": 2.5}', "num_layers=2.5 is float, expected int"),
        ('{"ln_scale": 1}', "ln_scale=1 is int, expected bool"),
    ]:
        with pytest.raises(CtxmixError, match=re.escape(message)):
            resolve_config("toy", config_file=write_file("bad.json", bad))
    with pytest.raises(CtxmixError, match="expected int for num_layers"):
        resolve_config("toy", sets=["num_layers=two"])
    with pytest.raises(CtxmixError, match="record-family option"):
        resolve_config("toy", sets=["xsa_last_n=2"])
    with pytest.raises(CtxmixError, match="unknown config key"):
        apply_overrides(TrainConfig(), {"nope": 1}, "test")


def test_lr_schedule_warms_up_then_warms_down_by_steps_or_by_time():
    from ctxmix_train.optim import lr_scale

    cfg = resolve_config("toy", sets=["iterations=100", "lr_warmup_steps=10", "warmdown_iters=20"])
    assert [lr_scale(cfg, s, 0.0) for s in (0, 4, 9, 50, 80, 90, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0, 0.5, 0.05]
    # Under a 100 s cap with 1 s steps, the warmdown (20 steps = 20 s) starts 20 s before the cap.
    capped = resolve_config("toy", sets=["iterations=10000", "warmdown_iters=20", "max_wallclock_seconds=100"])
    assert lr_scale(capped, 50, 50.0) == 1.0
    assert lr_scale(capped, 90, 90.0) == pytest.approx(0.5)
    assert lr_scale(capped, 100, 100.0) == 0.0


# --- training, artifact, roundtrip --------------------------------------------------------------------


def test_toy_training_on_real_text_lowers_validation_loss(alice_shards: Path, tmp_path: Path):
    steps_cfg = tiny(["iterations=40", "val_every=20"])
    result = train(steps_cfg, alice_shards, tmp_path / "tiny.ptz")
    first, last = result.history[0], result.history[-1]
    assert first["step"] == 0 and last["step"] == 40
    assert first["val_loss"] > 6.5  # ~log(1024) at initialization
    assert last["val_loss"] < first["val_loss"] - 1.0
    assert result.final.bpb < result.unigram.bpb  # beats a unigram fitted on the training text
    assert (tmp_path / "tiny.ptz").stat().st_size == result.artifact_bytes
    assert abs(result.roundtrip.bpb - result.final.bpb) < 0.02  # int8 costs little
    assert result.roundtrip.tokens == 8192  # the val_tokens cap (whole windows of 64)


@pytest.mark.parametrize("sets", [TINY, TINY_RECORD], ids=["baseline-int8-zlib", "record-int6-zstd"])
def test_artifact_loaded_by_ctxmix_gives_the_dequantized_models_logits(sets, tmp_path: Path, text_dir: Path):
    from ctxmix.models import load_model
    from ctxmix_train import export

    cfg = tiny(base=sets)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # trained-looking weights: nothing zero, every tensor used
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    packed = export.pack(model, cfg, artifact_meta(cfg, steps=0))
    path = tmp_path / "m.ptz"
    assert export.write(path, packed, cfg.size_cap_bytes) == path.stat().st_size
    loaded = load_model(path)
    assert loaded.family == cfg.family
    export.load_dequantized(model, export.dequantized_state_dict(packed))
    model.eval()
    sp = default_tokenizer()
    idx = torch.tensor([[1] + sp.encode((text_dir / "alice29.txt").read_text()[:2000])[:127]])
    with torch.no_grad():
        assert torch.equal(loaded.model(idx), model(idx))


def test_record_family_trains_with_ema_and_writes_an_int6_artifact(alice_shards: Path, tmp_path: Path):
    from ctxmix.models import load_model

    result = train(tiny(["iterations=8", "val_every=4"], base=TINY_RECORD), alice_shards, tmp_path / "rec.ptz")
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"] - 0.5
    loaded = load_model(tmp_path / "rec.ptz")
    assert loaded.family == "record" and loaded.artifact.format == "int6_mixed"
    # At this size the embedding (65,536 values) passes through as fp16, so every stored integer is int6.
    assert loaded.artifact.compression == "zstd" and loaded.artifact.value_bits == 6
    assert loaded.config.xsa_last_n == 1 and loaded.config.ve_layers == "1" and loaded.config.ln_scale
    assert abs(result.roundtrip.bpb - result.final.bpb) < 0.05


def test_wallclock_budget_stops_training_and_still_writes_the_artifact(alice_shards: Path, tmp_path: Path):
    cfg = tiny(["iterations=1000", "max_wallclock_seconds=0.001"])
    result = train(cfg, alice_shards, tmp_path / "budget.ptz")
    assert result.stopped_by_time and result.steps == 1
    assert (tmp_path / "budget.ptz").exists()


# --- CLI errors: one line, exit 1, no traceback -------------------------------------------------------


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def tiny_args(extra: list[str] = ()) -> list[str]:
    args = []
    for item in TINY + ["iterations=2", *extra]:
        args += ["--set", item]
    return args


def test_cli_size_cap_refuses_an_oversized_artifact(alice_shards: Path, tmp_path: Path, capsys):
    out = tmp_path / "big.ptz"
    code, _, err = run_cli(["run", "--recipe", "toy", "--data", str(alice_shards), "--out", str(out), "--quiet",
                            *tiny_args(["size_cap_bytes=1000"])], capsys)
    line = one_error_line(err)
    assert code == 1 and "over the size cap of 1,000 bytes" in line and "nothing was written" in line
    assert not out.exists() and not list(tmp_path.glob(".big.ptz*"))


def test_cli_bad_inputs_give_one_line_errors(alice_shards: Path, text_dir: Path, tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--data", str(empty), "--out", str(tmp_path / "a.ptz")], "no train shards in"),
        (["--data", str(alice_shards), "--out", str(tmp_path / "a.ptz"), "--set", "vocab_size=512"],
         "but the model's vocab_size is 512"),
        (["--data", str(alice_shards), "--out", str(tmp_path / "missing" / "a.ptz")], "does not exist"),
        (["--data", str(alice_shards), "--out", str(tmp_path)], "is a directory"),
        (["--data", str(alice_shards), "--out", str(tmp_path / "a.ptz"), "--set", "num_layerz=3"],
         "unknown config key 'num_layerz'"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(["run", "--recipe", "toy", "--quiet", *tiny_args(), *extra], capsys)
        assert code == 1 and message in one_error_line(err), (extra, err)
    code, _, err = run_cli(["run", "--recipe", "nope", "--data", str(alice_shards), "--out", "x.ptz"], capsys)
    assert code == 2 and "'nope' is not one of 'baseline', 'record', 'toy', 'toy-record'" in one_error_line(err)
    code, _, err = run_cli(["prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "p")], capsys)
    assert code == 1 and "no such file" in one_error_line(err)
    code, _, err = run_cli(["prepare", str(text_dir / "sum"), "--out", str(tmp_path / "p")], capsys)
    assert code == 1 and "not UTF-8 (first bad byte at offset 27)" in one_error_line(err)


def test_cli_run_writes_artifact_and_json_log(alice_shards: Path, tmp_path: Path, capsys):
    log = tmp_path / "log.jsonl"
    out = tmp_path / "cli.ptz"
    code, stdout, err = run_cli(["run", "--recipe", "toy", "--data", str(alice_shards), "--out", str(out),
                                 "--json-log", str(log), "--save-float", str(tmp_path / "float.pt"),
                                 *tiny_args(["log_every=1"])], capsys)
    assert code == 0, err
    floats = torch.load(tmp_path / "float.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in floats.values()) and "tok_emb.weight" in floats
    assert "final_int8_zlib_roundtrip val_loss:" in stdout
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step" and "train_loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["tokens_per_s"] > 0 for r in steps)
    assert rows[0]["kind"] == "config" and rows[-1]["kind"] == "roundtrip"
    assert out.stat().st_size == next(r["bytes"] for r in rows if r["kind"] == "artifact")


def test_cli_size_measures_a_recipe_without_training(capsys):
    from ctxmix_train.size import size_check

    cfg = tiny(base=TINY_RECORD)
    report = size_check(cfg, "gaussian")
    assert report.params == sum(p.numel() for p in build_model(cfg).parameters())
    assert report.fits and report.artifact_bytes < report.raw_bytes
    assert size_check(cfg, "init").artifact_bytes < report.artifact_bytes  # zero-initialized branches
    args = ["size", "--recipe", "toy"] + [a for item in TINY_RECORD for a in ("--set", item)] + ["--set", "size_cap_bytes=1000"]
    code, out, _ = run_cli(args, capsys)
    assert code == 0 and f"params {report.params:,}" in out and "DOES NOT FIT" in out
