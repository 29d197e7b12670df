"""Training hyperparameters: one flat frozen dataclass, named recipes, and typed overrides.

Every hyperparameter of a run lives in ``TrainConfig``. A recipe is a named set of values for it
(``baseline``, ``record`` and a toy CPU config beside each: ``toy``, ``toy-record``). A run starts from its
recipe, then applies a config file (JSON or TOML, read as data and never executed), then ``--set key=value``
flags, then ``--steps`` / ``--max-minutes``. An override must name a known key and keep its type, or the
run stops with one line saying which key and what was expected (as nanoGPT's configurator does). Every
number is checked by ``ctxmix.spec.check_fields`` against ``BOUNDS`` (the check spec options and artifact
metadata use): finite, within its range, and held to the spec limits when no range is listed.

Sources for the recipe values: openai/parameter-golf ``train_gpt.py`` (the naive baseline,
records/track_10min_16mb/2026-03-17_NaiveBaseline) and the March record stack
(records/track_10min_16mb/2026-03-22_11L_EMA_GPTQ-lite_warmdown3500_QAT015_1.1233 and
2026-03-23_LeakyReLU_LegalTTT_ParallelMuon).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from ctxmix.errors import CtxmixError
from ctxmix.spec import check_fields

FAMILIES = ("baseline", "record")
QUANT_FORMATS = ("int8", "int6")
COMPRESSORS = ("zlib", "zstd", "xz", "lzma")  # as ctxmix.models.artifact names them
COMPILE_MODES = ("auto", "on", "off")
FIT_METHODS = ("off", "prune", "coarsen")  # what export may do to an int6 artifact over size_cap_bytes
DEVICES = ("auto", "cpu", "cuda")
ARTIFACT_SIZE_CAP_BYTES = 16_000_000  # the challenge's decimal 16 MB cap on the artifact
MAX_COARSEN = 4.0  # widening int6 steps 5x leaves about 2 of its 6 bits: beyond that, use a smaller model


@dataclass(frozen=True)
class TrainConfig:
    # --- model (family and shape; everything the artifact cannot carry goes into its metadata) ---
    family: str = "baseline"  # model family in ctxmix.models: "baseline" or "record"
    vocab_size: int = 1024  # tokenizer vocabulary (sp1024); every shard token must be below it
    tokenizer: str = ""  # SentencePiece .model the shards were made with (val_bpb's byte accounting); "" = the shipped sp1024
    num_layers: int = 9  # transformer blocks
    model_dim: int = 512  # residual width
    num_heads: int = 8  # query heads
    num_kv_heads: int = 4  # key/value heads (GQA)
    mlp_mult: float = 2.0  # MLP hidden width = mlp_mult * model_dim
    tie_embeddings: bool = True  # output head shares the token embedding
    tied_embed_init_std: float = 0.005  # init std of the tied embedding
    logit_softcap: float = 30.0  # logits = cap * tanh(logits / cap)
    rope_base: float = 10000.0  # RoPE base frequency
    qk_gain_init: float = 1.5  # initial per-head query gain
    # --- record-family options (ignored by the baseline family) ---
    mlp_leaky_slope: float = 0.0  # MLP activation leaky_relu(x, slope)^2; 0 = relu^2
    rope_dims: int = 0  # rotate only the first rope_dims dims of each head (0 = all: full RoPE)
    ln_scale: bool = False  # scale each block's normed inputs by 1/sqrt(layer+1)
    xsa_last_n: int = 0  # exclusive self-attention on the last n layers (0 = off)
    bigram_vocab_size: int = 0  # hashed bigram embedding buckets (0 = off)
    bigram_dim: int = 128  # bigram embedding width before its projection
    smear_gate: bool = False  # blend each position's embedding with the previous one (learned gate)
    ve_dim: int = 0  # shared value-embedding width (0 = off)
    ve_layers: str = ""  # comma-separated layers that add the value embedding, e.g. "9,10"
    # --- data and batch ---
    train_seq_len: int = 1024  # tokens per training sequence (also the eval window)
    train_batch_tokens: int = 524_288  # global batch in tokens per optimizer step, for any world size
    micro_batch_seqs: int = 64  # sequences per forward/backward on one rank (gradient accumulation)
    val_tokens: int = 0  # evaluate on at most this many validation tokens (0 = all)
    val_every: int = 1000  # validate every n steps (0 = only at the end)
    log_every: int = 200  # log the training loss every n steps (and on the first 10)
    # --- schedule ---
    iterations: int = 20_000  # optimizer steps
    lr_warmup_steps: int = 0  # linear LR warmup from 0 over the first n steps (the challenge uses none)
    warmdown_iters: int = 1200  # linear LR decay to 0 over the last n steps (by time under a wall-clock cap)
    compile_warmup_steps: int = 20  # steps run then undone to prime compiled kernels (as the challenge does)
    max_wallclock_seconds: float = 600.0  # stop training after this much time, still writing the artifact (0 = no cap)
    # --- optimizer: Muon for block matrices, Adam for embeddings and scalars ---
    embed_lr: float = 0.6  # untied token embedding LR (Adam)
    head_lr: float = 0.008  # untied output head LR (Adam)
    tied_embed_lr: float = 0.05  # tied embedding LR (Adam)
    matrix_lr: float = 0.04  # block matrices LR (Muon)
    scalar_lr: float = 0.04  # vectors and scalars LR (Adam)
    muon_momentum: float = 0.95  # Muon momentum after warmup
    muon_backend_steps: int = 5  # Newton-Schulz iterations
    muon_momentum_warmup_start: float = 0.85  # Muon momentum at step 0
    muon_momentum_warmup_steps: int = 500  # linear momentum warmup length
    muon_wd: float = 0.0  # decoupled weight decay on Muon matrices
    adam_wd: float = 0.0  # decoupled weight decay on Adam groups (AdamW when > 0)
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.95  # Adam beta2
    adam_eps: float = 1e-8  # Adam epsilon
    grad_clip_norm: float = 0.0  # global gradient-norm clip (0 = off)
    ema_decay: float = 0.0  # export an exponential moving average of the weights (0 = off)
    # --- export ---
    quant: str = "int8"  # "int8" (int8_clean_per_row_v1) or "int6" (per-row int6 in int8 storage)
    compressor: str = "zlib"  # artifact compression: zlib, zstd, xz (lzma.compress default) or lzma (alone)
    compress_level: int = 9  # zlib 0-9, zstd 1-22, xz/lzma preset 0-9
    size_cap_bytes: int = ARTIFACT_SIZE_CAP_BYTES  # refuse to write a larger artifact (0 = no cap)
    fit_to_cap: str = "off"  # int6 artifact over the cap: "off" (refuse), "prune" (zero the cheapest +-1 values), "coarsen" (widen every int6 step)
    prune_max_fraction: float = 0.1  # "prune" may zero at most this fraction of all int6 values, else refuse
    coarsen_max: float = 0.25  # "coarsen" may widen the int6 steps by at most this much (0.25 = x1.25), else refuse
    fit_force: float = 0.0  # apply exactly this much of fit_to_cap (prune fraction / step widening) whatever the size (0 = only what the cap needs)
    # --- run ---
    seed: int = 1337  # seeds python, numpy and torch identically on every rank
    device: str = "auto"  # "auto" (cuda when available), "cpu" or "cuda"
    compile: str = "auto"  # torch.compile the model: "auto" = on CUDA only
    threads: int = 0  # torch CPU threads per process (0 = leave torch's default)

    def __post_init__(self) -> None:
        check_config(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The laptop-sized shape and schedule shared by the two toy recipes.
_TOY_SHAPE_AND_RUN: dict[str, Any] = {
    "num_layers": 4,
    "model_dim": 256,
    "num_heads": 4,
    "num_kv_heads": 2,
    "train_seq_len": 256,
    "train_batch_tokens": 4096,
    "micro_batch_seqs": 16,
    "val_tokens": 65_536,
    "val_every": 50,
    "log_every": 10,
    "iterations": 300,
    "lr_warmup_steps": 10,
    "warmdown_iters": 100,
    "compile_warmup_steps": 0,
    "max_wallclock_seconds": 0.0,
    "muon_momentum_warmup_steps": 50,
}

# Each recipe lists only what differs from the defaults above (the defaults are the naive baseline).
RECIPES: dict[str, dict[str, Any]] = {
    # The challenge's naive baseline: 9x512, GQA 8/4, relu^2 MLP x2, tied embeddings, seq 1024,
    # 524,288 tokens per step, 10-minute cap, int8 per-row + zlib.
    "baseline": {},
    # The March record stack (2026-03-23 LeakyReLU record's shape): 11 layers, 3x LeakyReLU(0.5)^2 MLP,
    # partial RoPE 16/64, LN scale, XSA on the last 4 layers, bigram-hash embedding (1536 x 128),
    # SmearGate, value embeddings on layers 9-10,
    # EMA 0.997, Muon with weight decay, int6 per-row + xz-9 (the 03-23 record's lzma), 16,000,000-byte cap
    # met by widening the int6 steps when needed.
    "record": {
        "family": "record",
        "num_layers": 11,
        "mlp_mult": 3.0,
        "mlp_leaky_slope": 0.5,
        "rope_dims": 16,
        "ln_scale": True,
        "xsa_last_n": 4,
        "bigram_vocab_size": 1536,
        "bigram_dim": 128,
        "smear_gate": True,
        "ve_dim": 128,
        "ve_layers": "9,10",
        "train_seq_len": 2048,
        "train_batch_tokens": 786_432,
        "micro_batch_seqs": 48,
        "val_every": 4000,
        "log_every": 500,
        "warmdown_iters": 3500,
        "tied_embed_lr": 0.035,
        "matrix_lr": 0.025,
        "scalar_lr": 0.025,
        "muon_momentum": 0.99,
        "muon_momentum_warmup_start": 0.92,
        "muon_momentum_warmup_steps": 1500,
        "muon_wd": 0.04,
        "adam_wd": 0.04,
        "grad_clip_norm": 0.3,
        "ema_decay": 0.997,
        "quant": "int6",
        "compressor": "xz",
        "compress_level": 9,
        # Over the cap, widen the int6 steps just enough (at most x1.25) rather than refuse: at equal bytes
        # this cost a third of the bpb that pruning +-1 values did on a trained toy-record model
        # (docs/training.md, "Fitting the cap").
        "fit_to_cap": "coarsen",
    },
    # Baseline family at laptop size: trains in minutes on 2 CPU cores. Batch 4096 with a 10-step LR warmup
    # beat batch 2048 and 8192 and doubled LRs in 3-minute runs on this machine (docs/training.md).
    "toy": dict(_TOY_SHAPE_AND_RUN),
    # Record family at laptop size: every record feature switched on, small enough for a CPU.
    "toy-record": {
        **_TOY_SHAPE_AND_RUN,
        "family": "record",
        "mlp_mult": 3.0,
        "mlp_leaky_slope": 0.5,
        "rope_dims": 16,
        "ln_scale": True,
        "xsa_last_n": 2,
        "bigram_vocab_size": 512,
        "bigram_dim": 64,
        "smear_gate": True,
        "ve_dim": 64,
        "ve_layers": "2,3",
        "muon_wd": 0.04,
        "adam_wd": 0.04,
        "grad_clip_norm": 0.3,
        "ema_decay": 0.95,
        "quant": "int6",
        "compressor": "zstd",
        "compress_level": 19,
    },
}


# Inclusive (lo, hi) per numeric field; None = the spec limit. The model fields match the families'
# BOUNDS (ctxmix.models), so every config trains a model ctxmix can load; rates and weights are >= 0.
BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "vocab_size": (1, 1 << 16),  # shard tokens are uint16
    "num_layers": (1, 1024),
    "model_dim": (1, 1 << 16),
    "num_heads": (1, 4096),
    "num_kv_heads": (1, 4096),
    "mlp_mult": (1e-3, 64.0),
    "tied_embed_init_std": (0.0, None),
    "logit_softcap": (1e-2, 1e4),
    "rope_base": (1.0, 1e12),
    "mlp_leaky_slope": (-1e3, 1e3),
    "rope_dims": (0, 1 << 16),
    "xsa_last_n": (0, 1024),
    "bigram_vocab_size": (0, 1 << 24),
    "bigram_dim": (1, 1 << 16),
    "ve_dim": (0, 1 << 16),
    "train_seq_len": (1, 1 << 20),
    "train_batch_tokens": (1, None),
    "micro_batch_seqs": (1, None),
    "val_tokens": (0, None),
    "val_every": (0, None),
    "log_every": (0, None),
    "iterations": (0, None),
    "lr_warmup_steps": (0, None),
    "warmdown_iters": (0, None),
    "compile_warmup_steps": (0, None),
    "max_wallclock_seconds": (0.0, None),
    "embed_lr": (0.0, None),
    "head_lr": (0.0, None),
    "tied_embed_lr": (0.0, None),
    "matrix_lr": (0.0, None),
    "scalar_lr": (0.0, None),
    "muon_momentum": (0.0, 1.0),
    "muon_backend_steps": (0, 100),
    "muon_momentum_warmup_start": (0.0, 1.0),
    "muon_momentum_warmup_steps": (0, None),
    "muon_wd": (0.0, None),
    "adam_wd": (0.0, None),
    "beta1": (0.0, 1.0),
    "beta2": (0.0, 1.0),
    "adam_eps": (0.0, None),
    "grad_clip_norm": (0.0, None),
    "ema_decay": (0.0, 1.0),
    "compress_level": (0, 22),
    "size_cap_bytes": (0, None),
    "prune_max_fraction": (0.0, 1.0),
    "coarsen_max": (0.0, MAX_COARSEN),
    "fit_force": (0.0, MAX_COARSEN),
    "seed": (0, None),
    "threads": (0, 1024),
}


def field_types() -> dict[str, type]:
    # ``from __future__ import annotations`` makes field.type a string: map it back to the class.
    names = {"int": int, "float": float, "bool": bool, "str": str}
    return {f.name: names[f.type] for f in fields(TrainConfig)}


def check_config(cfg: TrainConfig) -> None:
    """Raise CtxmixError for values no run could use (each message names the key)."""

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise CtxmixError(f"config {key}={getattr(cfg, key)!r}: expected {expected}")

    check_fields(cfg, "config", BOUNDS)  # finite and in range; the relations between fields follow

    need(cfg.family in FAMILIES, "family", "one of " + ", ".join(FAMILIES))
    need(cfg.quant in QUANT_FORMATS, "quant", "one of " + ", ".join(QUANT_FORMATS))
    need(cfg.compressor in COMPRESSORS, "compressor", "one of " + ", ".join(COMPRESSORS))
    need(cfg.compile in COMPILE_MODES, "compile", "one of " + ", ".join(COMPILE_MODES))
    need(cfg.device in DEVICES, "device", "one of " + ", ".join(DEVICES))
    need(cfg.model_dim % cfg.num_heads == 0, "num_heads", f"a divisor of model_dim={cfg.model_dim}")
    need(cfg.num_heads % cfg.num_kv_heads == 0, "num_kv_heads", f"a divisor of num_heads={cfg.num_heads}")
    head_dim = cfg.model_dim // cfg.num_heads
    need(head_dim % 2 == 0, "num_heads", "a head width model_dim/num_heads that is even (RoPE pairs dims)")
    need(cfg.rope_dims % 2 == 0 and cfg.rope_dims <= head_dim, "rope_dims", f"an even number <= head width {head_dim}")
    need(cfg.train_batch_tokens % cfg.train_seq_len == 0, "train_batch_tokens",
         f"a multiple of train_seq_len={cfg.train_seq_len}")
    need(cfg.ema_decay < 1.0, "ema_decay", "a number in [0, 1)")
    if cfg.family == "baseline":
        record_only = [f.name for f in fields(TrainConfig)
                       if f.name in _RECORD_ONLY and getattr(cfg, f.name) != f.default]
        if record_only:
            raise CtxmixError(f"config {record_only[0]}={getattr(cfg, record_only[0])!r}: "
                              "record-family option, but family=baseline (set family=record)")
    ve_layers = parse_layer_list(cfg.ve_layers, "ve_layers")
    need(all(0 <= i < cfg.num_layers for i in ve_layers), "ve_layers",
         f"layer indices in 0..{cfg.num_layers - 1}")
    need(bool(ve_layers) == (cfg.ve_dim > 0), "ve_layers", "a non-empty list exactly when ve_dim > 0")
    need(cfg.fit_to_cap in FIT_METHODS, "fit_to_cap", "one of " + ", ".join(FIT_METHODS))
    need(cfg.fit_to_cap == "off" or cfg.quant == "int6", "fit_to_cap", "off unless quant=int6 (it changes int6 values only)")
    need(0.0 <= cfg.fit_force <= MAX_COARSEN and (cfg.fit_force == 0.0 or cfg.fit_to_cap != "off"), "fit_force",
         f"a number in [0, {MAX_COARSEN:g}], and 0 unless fit_to_cap is prune or coarsen")
    need(cfg.fit_to_cap != "prune" or cfg.fit_force <= 1.0, "fit_force", "a fraction in [0, 1] for fit_to_cap=prune")
    levels = {"zlib": (0, 9), "zstd": (1, 22), "xz": (0, 9), "lzma": (0, 9)}[cfg.compressor]
    need(levels[0] <= cfg.compress_level <= levels[1], "compress_level",
         f"{levels[0]}..{levels[1]} for {cfg.compressor}")


_RECORD_ONLY = ("mlp_leaky_slope", "rope_dims", "ln_scale", "xsa_last_n", "bigram_vocab_size", "smear_gate",
                "ve_dim", "ve_layers")


def parse_layer_list(text: str, key: str) -> list[int]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        return [int(s) for s in items]
    except ValueError:
        raise CtxmixError(f"config {key}={text!r}: expected comma-separated layer indices like '9,10'") from None


def recipe_names() -> list[str]:
    return list(RECIPES)


def _coerce(key: str, value: Any, source: str) -> Any:
    """``value`` as the type of field ``key``; ints widen to float, nothing else converts."""
    types = field_types()
    if key not in types:
        from difflib import get_close_matches

        close = get_close_matches(key, list(types), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CtxmixError(f"{source}: unknown config key {key!r}{hint}")
    want = types[key]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not want:
        raise CtxmixError(f"{source}: {key}={value!r} is {type(value).__name__}, expected {want.__name__}")
    return value


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, Any], source: str) -> TrainConfig:
    """A new config with ``overrides`` applied; each key must exist and keep its type."""
    checked = {key: _coerce(key, value, source) for key, value in overrides.items()}
    return dataclasses.replace(cfg, **checked)


def parse_set(item: str) -> tuple[str, Any]:
    """``key=value`` from the command line, parsed to the type of field ``key``."""
    if "=" not in item:
        raise CtxmixError(f"--set {item!r}: expected key=value")
    key, text = (s.strip() for s in item.split("=", 1))
    types = field_types()
    if key not in types:
        _coerce(key, None, f"--set {item}")  # raises with close matches
    want = types[key]
    try:
        if want is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            value: Any = lowered in ("true", "1", "yes", "on")
        elif want is int:
            value = int(text.replace("_", ""))
        elif want is float:
            value = float(text)
        else:
            value = text
    except ValueError:
        raise CtxmixError(f"--set {item}: expected {want.__name__} for {key}") from None
    return key, value


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A flat ``{key: value}`` table from a .json or .toml file (data only, never executed).

    The optional key ``recipe`` names the starting recipe; every other key is a config override.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise CtxmixError(f"config file {p}: {exc.strerror}") from None
    try:
        if p.suffix.lower() == ".toml":
            data = tomllib.loads(raw.decode("utf-8"))
        elif p.suffix.lower() == ".json":
            data = json.loads(raw.decode("utf-8"))
        else:
            raise CtxmixError(f"config file {p}: expected a .json or .toml file")
    except (ValueError, RecursionError) as exc:  # bad UTF-8, JSON or TOML; too many digits; nesting too deep
        raise CtxmixError(f"config file {p}: not valid {p.suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise CtxmixError(f"config file {p}: expected a table of key = value, got {type(data).__name__}")
    return data


def resolve_config(
    recipe: str | None = None,
    config_file: str | os.PathLike | None = None,
    sets: tuple[str, ...] | list[str] = (),
    steps: int | None = None,
    max_minutes: float | None = None,
) -> TrainConfig:
    """Recipe, then config file, then ``--set`` items, then ``--steps`` / ``--max-minutes``."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = load_config_file(config_file)
        file_recipe = file_values.pop("recipe", None)
        if file_recipe is not None:
            if not isinstance(file_recipe, str):
                raise CtxmixError(f"config file {config_file}: recipe must be a string")
            if recipe is not None and recipe != file_recipe:
                raise CtxmixError(f"config file {config_file} names recipe {file_recipe!r} but --recipe is {recipe!r}")
            recipe = file_recipe
    recipe = recipe or "baseline"
    if recipe not in RECIPES:
        raise CtxmixError(f"unknown recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    values = dict(RECIPES[recipe])
    values.update({k: _coerce(k, v, f"config file {config_file}") for k, v in file_values.items()})
    for item in sets:
        key, value = parse_set(item)
        values[key] = value
    if steps is not None:
        values["iterations"] = int(steps)
    if max_minutes is not None:
        values["max_wallclock_seconds"] = float(max_minutes) * 60.0
    checked = {k: _coerce(k, v, f"recipe {recipe}") for k, v in values.items()}
    return TrainConfig(**checked)
