"""The training run: data, model, optimizer loop, validation, EMA, artifact and its roundtrip check.

One function, ``train``, runs unchanged on one process or under ``torchrun`` (rank and world size come
from the environment). The global batch is fixed by the config, whatever the world size: each step every
rank takes its contiguous slice of the same global batch (``loader.BatchLoader``), accumulates gradients
over micro-batches, and DDP averages them once per step. Each rank scales its summed token losses by
``world_size / batch_tokens`` so that after DDP's average the gradient is the mean over the global batch.
Only rank 0 reports and writes; every rank takes part in validation (windows split across ranks).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctxmix.errors import CtxmixError

from . import export
from .config import TrainConfig
from .distributed import DistContext, all_reduce_sum_, any_rank, barrier, init_distributed, shutdown
from .evaluate import EvalResult, autocast_for, evaluate, make_val_data, unigram_eval
from .loader import BatchLoader, find_shards, load_val_tokens, read_checked_shard
from .model import artifact_meta, build_model, count_params
from .optim import build_optimizers, lr_scale, muon_momentum
from .progress import NullReporter, Reporter, StepRecord

UNIGRAM_FIT_TOKENS = 10_000_000  # fit the reference unigram on at most this many training tokens


@dataclass
class TrainResult:
    steps: int
    train_seconds: float
    stopped_by_time: bool
    params: int
    unigram: EvalResult  # static unigram fitted on training tokens, scored on the validation tokens
    final: EvalResult  # the weights that get quantized (EMA weights when ema_decay > 0), before quantization
    roundtrip: EvalResult  # the artifact as ctxmix loads it
    artifact_path: str
    artifact_bytes: int
    history: list[dict] = field(default_factory=list)  # validation points: step, train_time_s, val_loss, val_bpb


class LossModule(nn.Module):
    """``model`` plus the summed next-token cross-entropy, so DDP and torch.compile see one forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)  # (B, T, V)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def use_compile(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _on_rank0(ctx: DistContext, fn):
    """Run ``fn`` on rank 0; a CtxmixError there is raised on every rank (so no rank waits forever)."""
    error: CtxmixError | None = None
    result = None
    if ctx.is_main:
        try:
            result = fn()
        except CtxmixError as exc:
            error = exc
    if any_rank(error is not None, ctx):
        raise error or CtxmixError("rank 0 failed (its error is printed there)")
    return result


def train(cfg: TrainConfig, data_dir: str | os.PathLike, out_path: str | os.PathLike,
          reporter: Reporter | None = None, ctx: DistContext | None = None,
          save_float: str | os.PathLike | None = None) -> TrainResult:
    """Train ``cfg`` on the shards in ``data_dir`` and write the artifact to ``out_path``.

    ``save_float`` also writes the unquantized float32 state dict (``torch.save``, like the challenge's
    ``final_model.pt``) so the weights can be quantized again later.

    ``reporter`` receives progress (pass it on rank 0 only; the caller closes it). ``ctx`` defaults to the environment's
    (torchrun or a single process); a process group created here is destroyed on return.
    """
    own_ctx = ctx is None
    ctx = ctx or init_distributed(cfg.device)
    try:
        return _train(cfg, Path(data_dir), Path(out_path), reporter or NullReporter(), ctx,
                      Path(save_float) if save_float is not None else None)
    finally:
        if own_ctx:
            shutdown(ctx)


def _train(cfg: TrainConfig, data_dir: Path, out_path: Path, rep: Reporter, ctx: DistContext,
           save_float: Path | None) -> TrainResult:
    device = ctx.device
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # --- data -------------------------------------------------------------------------------------
    train_paths = find_shards(data_dir, "train")
    val_paths = find_shards(data_dir, "val")
    export.check_writable(out_path, train_paths + val_paths)  # no output may replace a shard it reads
    if save_float is not None:
        export.check_writable(save_float, train_paths + val_paths)
    T = cfg.train_seq_len
    batch_seqs = cfg.train_batch_tokens // T
    val = make_val_data(load_val_tokens(val_paths, cfg.vocab_size, T, cfg.val_tokens), cfg.vocab_size, cfg.tokenizer)
    loader = BatchLoader(train_paths, cfg.vocab_size, T, batch_seqs, cfg.micro_batch_seqs, ctx.rank, ctx.world_size)
    unigram = unigram_eval(read_checked_shard(train_paths[0], cfg.vocab_size)[:UNIGRAM_FIT_TOKENS], val,
                           cfg.vocab_size)

    # --- model and optimizers ----------------------------------------------------------------------
    seed_everything(cfg.seed)
    model = build_model(cfg, device)
    n_params = count_params(model)
    loss_module: nn.Module = LossModule(model)
    compiled = use_compile(cfg, device)
    if compiled:
        loss_module = torch.compile(loss_module, dynamic=False)
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # The only buffers are RoPE frequency tables, identical on every rank: DDP's default buffer sync is cheap.
        loss_module = DDP(loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    optimizers, muon = build_optimizers(model, cfg)

    rep.event(f"ctxmix-train: family:{cfg.family} params:{n_params:,} world_size:{ctx.world_size} "
              f"device:{device.type} compile:{compiled} seed:{cfg.seed}")
    rep.event(f"data: train_shards:{len(train_paths)} val_tokens:{val.n_targets:,} val_bytes:{val.nbytes:,} "
              f"batch:{cfg.train_batch_tokens:,} tokens ({batch_seqs} x {T}) micro_batch_seqs:{cfg.micro_batch_seqs}")
    rep.event(f"reference: val_unigram_loss:{unigram.loss:.4f} val_unigram_bpb:{unigram.bpb:.4f} "
              f"(static unigram of the first training shard)",
              {"kind": "unigram", "val_loss": unigram.loss, "val_bpb": unigram.bpb})

    def zero_grad() -> None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)

    loss_scale = ctx.world_size / (batch_seqs * T)  # summed token losses -> global mean after DDP's average

    def run_step(step: int, scale: float, want_loss: bool) -> float | None:
        micro = loader.next_batch()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        for i, mb in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if (last or not ctx.distributed) else loss_module.no_sync()
            with sync:
                x = torch.from_numpy(mb.x).to(device, non_blocking=True)
                y = torch.from_numpy(mb.y).to(device, non_blocking=True)
                with autocast_for(device):
                    loss = loss_module(x, y)
                (loss * loss_scale).backward()
                loss_sum += loss.detach().double()
        momentum = muon_momentum(cfg, step)
        for group in muon.param_groups:
            group["momentum"] = momentum
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        zero_grad()
        if not want_loss:
            return None
        all_reduce_sum_(loss_sum, ctx)
        return float(loss_sum.item()) / (batch_seqs * T)

    # --- compile warmup: run a few steps to compile, then restore the initial state (as the challenge does)
    if compiled and cfg.compile_warmup_steps > 0:
        initial_model = copy.deepcopy(model.state_dict())
        initial_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        for i in range(cfg.compile_warmup_steps):
            run_step(i, 1.0, want_loss=False)
        model.load_state_dict(initial_model)
        for opt, state in zip(optimizers, initial_opts):
            opt.load_state_dict(state)
        zero_grad()
        loader = BatchLoader(train_paths, cfg.vocab_size, T, batch_seqs, cfg.micro_batch_seqs, ctx.rank,
                             ctx.world_size)
        rep.event(f"compile_warmup: {cfg.compile_warmup_steps} steps run and undone")

    ema_names = list(model.state_dict())
    ema: list[torch.Tensor] | None = None
    if cfg.ema_decay > 0:
        ema = [t.detach().float().clone() for t in model.state_dict().values()]

    def validate(step: int, train_s: float) -> EvalResult:
        result = evaluate(model, val, T, cfg.micro_batch_seqs, ctx)
        history.append({"step": step, "train_time_s": train_s, "val_loss": result.loss, "val_bpb": result.bpb})
        return result

    # --- main loop -----------------------------------------------------------------------------------
    history: list[dict] = []
    train_s = 0.0
    step = 0
    stopped_by_time = False
    rep.start(cfg.iterations)
    model.train()
    while True:
        last_step = step >= cfg.iterations or stopped_by_time
        if cfg.val_every > 0 and (step % cfg.val_every == 0) and not last_step:
            res = validate(step, train_s)
            rep.step(StepRecord(step, cfg.iterations, train_s, _tps(step, train_s, cfg), lr_scale(cfg, step, train_s),
                                _eta(cfg, step, train_s), val_loss=res.loss, val_bpb=res.bpb), logged=True)
        if last_step:
            break
        _synchronize(device)
        t0 = time.perf_counter()
        scale = lr_scale(cfg, step, train_s)
        logged = cfg.log_every > 0 and (step + 1 <= 10 or (step + 1) % cfg.log_every == 0)
        loss = run_step(step, scale, want_loss=logged)
        if ema is not None:
            with torch.no_grad():
                current = [t.detach().float() for t in model.state_dict().values()]
                torch._foreach_mul_(ema, cfg.ema_decay)
                torch._foreach_add_(ema, current, alpha=1.0 - cfg.ema_decay)
        _synchronize(device)
        train_s += time.perf_counter() - t0
        step += 1
        if cfg.max_wallclock_seconds > 0:
            stopped_by_time = any_rank(train_s >= cfg.max_wallclock_seconds, ctx) and step < cfg.iterations
        rep.step(StepRecord(step, cfg.iterations, train_s, _tps(step, train_s, cfg), scale, _eta(cfg, step, train_s),
                            train_loss=loss), logged=logged)
    if stopped_by_time:
        rep.event(f"stopping_early: wallclock_cap train_time:{train_s * 1000:.0f}ms step:{step}/{cfg.iterations}")

    # --- final weights, artifact, roundtrip ------------------------------------------------------------
    if ema is not None:
        state = model.state_dict()
        model.load_state_dict({n: t.to(state[n].dtype) for n, t in zip(ema_names, ema)})
        rep.event(f"ema: exporting the moving average of the weights (decay {cfg.ema_decay})")
    final = evaluate(model, val, T, cfg.micro_batch_seqs, ctx)
    history.append({"step": step, "train_time_s": train_s, "val_loss": final.loss, "val_bpb": final.bpb})
    rep.step(StepRecord(step, cfg.iterations, train_s, _tps(step, train_s, cfg), 0.0, 0.0,
                        val_loss=final.loss, val_bpb=final.bpb), logged=True)

    export.check_finite_weights(model, step)  # every rank holds the same weights: all stop alike
    if save_float is not None:
        _on_rank0(ctx, lambda: export.save_float(save_float, model))
    meta = artifact_meta(cfg, steps=step)
    packed = _on_rank0(ctx, lambda: export.pack(model, cfg, meta))

    def write() -> int:
        return export.write(out_path, packed, cfg.size_cap_bytes)

    nbytes = _on_rank0(ctx, write)
    if ctx.is_main:
        rep.event(f"artifact: {out_path} {nbytes:,} bytes ({cfg.quant}+{cfg.compressor}, cap "
                  f"{cfg.size_cap_bytes:,})", {"kind": "artifact", "path": str(out_path), "bytes": nbytes})
        if packed.fit is not None:  # the cap was met by changing int6 values: say how much
            fit = packed.fit
            rep.event(f"fit_to_cap: {fit.method} {fit.amount:.4g} ({fit.changed_values:,} of {fit.int6_values:,} "
                      f"int6 values changed), {fit.bytes_before:,} -> {fit.bytes_after:,} bytes",
                      {"kind": "fit", **dataclasses.asdict(fit)})
    barrier(ctx)

    from .reload import load_artifact_model

    t_eval = time.perf_counter()
    reloaded = load_artifact_model(out_path, device)
    roundtrip = evaluate(reloaded, val, T, cfg.micro_batch_seqs, ctx)
    label = f"final_{cfg.quant}_{cfg.compressor}_roundtrip"
    rep.event(f"{label} val_loss:{roundtrip.loss:.4f} val_bpb:{roundtrip.bpb:.4f} "
              f"eval_time:{1000 * (time.perf_counter() - t_eval):.0f}ms")
    rep.event(f"{label}_exact val_loss:{roundtrip.loss:.8f} val_bpb:{roundtrip.bpb:.8f}",
              {"kind": "roundtrip", "val_loss": roundtrip.loss, "val_bpb": roundtrip.bpb,
               "prequant_val_bpb": final.bpb, "steps": step, "train_time_s": train_s})
    return TrainResult(step, train_s, stopped_by_time, n_params, unigram, final, roundtrip, str(out_path),
                       nbytes or 0, history)


def _tps(step: int, train_s: float, cfg: TrainConfig) -> float:
    return step * cfg.train_batch_tokens / train_s if train_s > 0 else 0.0


def _eta(cfg: TrainConfig, step: int, train_s: float) -> float | None:
    if step == 0:
        return None
    by_steps = (cfg.iterations - step) * train_s / step
    if cfg.max_wallclock_seconds > 0:
        return max(min(by_steps, cfg.max_wallclock_seconds - train_s), 0.0)
    return by_steps
