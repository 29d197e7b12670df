"""ctxmix_train under torchrun on the CPU (gloo): two processes give the artifact one process gives.

Why the bytes can be identical, not just close: the global batch is the same for any world size (rank r
takes sequences [S*r/K, S*(r+1)/K) of it), every micro-batch here is one sequence in both runs (the same
shapes, so the same kernels and the same floats per sequence, one thread each), and the per-sequence
gradients are combined by one addition either way: autograd's accumulation in the single process, gloo's
two-rank all-reduce sum under torchrun (a + b is exact and commutative). The loss scale differs by the
world size (a power of two) and DDP divides by it again, which is exact in floating point. Muon splits its
Newton-Schulz work across the ranks and all-reduces updates where the other rank contributes exact zeros.
With more than two ranks the all-reduce sums in a different order than the accumulation, so only "close"
would hold; two ranks is what this test pins down.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ctxmix_train import prepare

REPO = Path(__file__).resolve().parents[1]
SETS = ["num_layers=2", "model_dim=64", "num_heads=2", "num_kv_heads=1", "train_seq_len=64",
        "train_batch_tokens=128", "micro_batch_seqs=1", "val_tokens=1024", "val_every=0", "log_every=1",
        "warmdown_iters=0", "threads=1", "iterations=2", "seed=7"]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def train_args(data: Path, out: Path) -> list[str]:
    args = ["run", "--recipe", "toy", "--data", str(data), "--out", str(out)]
    for item in SETS:
        args += ["--set", item]
    return args


def reported(stdout: str) -> list[str]:
    """The train-loss and roundtrip lines without their timings."""
    timing = ("train_time", "step_avg", "tok/s", "eval_time")
    lines = [line for line in stdout.splitlines() if "train_loss" in line or "roundtrip val_loss" in line]
    return [" ".join(w for w in line.split() if not w.startswith(timing)) for line in lines]


def test_torchrun_two_processes_write_the_artifact_one_process_writes(tmp_path: Path, text_dir: Path):
    data = tmp_path / "data"
    prepare([text_dir / "alice29.txt"], data, val_fraction=0.1)
    single = run([sys.executable, "-m", "ctxmix_train", *train_args(data, tmp_path / "one.ptz")])
    assert single.returncode == 0, single.stderr
    multi = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 "-m", "ctxmix_train", *train_args(data, tmp_path / "two.ptz")])
    assert multi.returncode == 0, multi.stderr[-2000:]
    assert "world_size:2" in multi.stdout and "world_size:1" in single.stdout
    assert multi.stdout.count("final_int8_zlib_roundtrip val_loss") == 1  # rank 0 alone reports
    one, two = (tmp_path / "one.ptz").read_bytes(), (tmp_path / "two.ptz").read_bytes()
    assert one == two
    assert reported(single.stdout) == reported(multi.stdout) and len(reported(single.stdout)) == 3


def test_torchrun_three_processes_split_an_uneven_batch_and_agree(tmp_path: Path, text_dir: Path):
    # 8 sequences over 3 ranks: slices of 2, 3 and 3 sequences, so the ranks run different numbers of
    # micro-batches and only the last one of each synchronizes. The sums are ordered differently from
    # the single process, so the floats agree to rounding (checked at print precision), not bit for bit.
    data = tmp_path / "data"
    prepare([text_dir / "alice29.txt"], data, val_fraction=0.1)
    extra = ["--set", "train_batch_tokens=512", "--set", "iterations=3"]
    single = run([sys.executable, "-m", "ctxmix_train", *train_args(data, tmp_path / "one.ptz"), *extra])
    multi = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                 "-m", "ctxmix_train", *train_args(data, tmp_path / "three.ptz"), *extra])
    assert single.returncode == 0 and multi.returncode == 0, multi.stderr[-2000:]
    assert "world_size:3" in multi.stdout
    assert reported(single.stdout) == reported(multi.stdout) and len(reported(single.stdout)) == 4
