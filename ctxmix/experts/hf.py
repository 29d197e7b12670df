"""The Hugging Face expert: a local causal LM (``hf:path=DIR``) scored with sliding windows, in float64.

``DIR`` is a directory saved by ``transformers`` (``save_pretrained``): ``config.json``, the weights
(safetensors), and the model's own fast tokenizer (``tokenizer.json``). A run whose experts include
``hf:path=DIR`` tokenizes its text with that tokenizer (``ctxmix.data.hf_tokenizer``: lossless, checked,
every byte attributed to one token), so every expert of the run scores the same token stream, and the
n-gram experts count over the model's own vocabulary. Nothing is downloaded (``local_files_only``), no
code from the directory is run (no ``trust_remote_code``), and ``transformers`` is the optional extra
``[hf]``, imported only when this expert is built.

Windows: the neural expert's plan (``neural.WindowPlan``): window k starts at ``k * stride`` and scores
its last ``stride`` positions (window 0: all of them), so each position is scored once, with between
``window - stride + 1`` and ``window`` tokens of context; ``window=0`` takes the model's context length
(``max_position_embeddings`` or ``n_positions``). Windows go through the model in batches of
``batch_size``, padded at the end (causal attention never reads the padding); only the rows a batch
scores go through the head when the model's ``forward`` takes ``logits_to_keep``. Logits come out in
the model's dtype; ``log_softmax`` runs in float64, on row blocks of ``ROW_BLOCK`` for both the fast and
the full path, so log p(target) is the same float either way (rule 4).

Stepwise (the codec): a KV cache per window, rebuilt at each window's start with one canonical prefill
(window 0: its first token; window k >= 1: the ``window - stride + 1`` tokens its first scored position
sees), then extended one token at a time: the same computation on both sides of the codec, close to the
batched path (float32 rounding), not bit-identical to it.
"""

from __future__ import annotations

import inspect
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CtxmixError
from .base import FEATURE_ENTROPY, Expert, ExpertOutput
from .neural import (DEVICE_PATTERN, WindowPlan, checked_stream, chunk_span, chunk_distributions, observe_growing,
                     resolve_device)

DEFAULT_STRIDE = 64  # as the neural expert: the challenge's sliding-window stride
DEFAULT_BATCH_SIZE = 4  # windows per forward pass
ROW_BLOCK = 256  # rows per float64 log_softmax: R x V float64 stays at 256 x V x 8 bytes (100 MB at V = 50,257)
MODEL_CACHE_SIZE = 2  # loaded models kept for the next stream (run_streams builds experts per file)
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class HFOptions:
    # the model directory (save_pretrained's output, with its tokenizer)
    path: str = field(default="", metadata={"help": "Hugging Face model directory (config, weights, tokenizer.json)", "label": True})
    # scoring window in tokens: 0 = the model's context length
    window: int = field(default=0, metadata={"help": "context window in tokens (0: the model's context length)", "min": 0})
    # sliding-window stride
    stride: int = field(default=DEFAULT_STRIDE, metadata={"help": "sliding-window stride (= window: non-overlapping)", "min": 1})
    # windows per forward pass
    batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata={"help": "windows per forward pass", "min": 1})
    # where to run the model
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu, cuda or cuda:N"})
    # weights' dtype
    dtype: str = field(default="auto", metadata={"help": "weights' dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16", "choices": DTYPES})

    def __post_init__(self) -> None:
        if not self.path:
            raise CtxmixError("the hf expert needs path=DIR (a Hugging Face model directory)")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise CtxmixError(f"device={self.device} is not one of auto, cpu, cuda, cuda:N")


_models: OrderedDict = OrderedDict()
_models_lock = threading.Lock()


def _context_length(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_hf_model(path: str, device, dtype_name: str):
    """``AutoModelForCausalLM`` from the local directory ``path`` in eval mode on ``device`` (cached by path,
    modification time, device and dtype). One line for any failure."""
    from ..data.hf_tokenizer import require_transformers

    transformers = require_transformers()
    import torch

    directory = Path(path)
    if not (directory / "config.json").is_file():
        what = "no such directory" if not directory.is_dir() else "no config.json in it"
        raise CtxmixError(f"hf model {path}: {what} (expected a directory written by save_pretrained)")
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    stamp = max((p.stat().st_mtime_ns for p in directory.iterdir() if p.is_file()), default=0)
    key = (os.path.realpath(path), stamp, str(device), dtype_name)
    with _models_lock:
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
    transformers.utils.logging.set_verbosity_error()  # no load reports or progress bars on stderr
    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False, dtype=getattr(torch, dtype_name))
    except Exception as exc:  # noqa: BLE001 - the library's failure, one line at the boundary
        raise CtxmixError(f"hf model {path}: cannot load it ({type(exc).__name__}: {exc})") from None
    model.eval().to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with _models_lock:
        _models[key] = model
        while len(_models) > MODEL_CACHE_SIZE:
            _models.popitem(last=False)
    return model


class HFExpert(Expert):
    """A local Hugging Face causal LM, with its own tokenizer, scored with sliding windows."""

    Options = HFOptions
    registry_name = "hf"
    provides = (FEATURE_ENTROPY,)
    pretrained = True

    @classmethod
    def stream_tokenizer(cls, options: HFOptions):
        """The model's own tokenizer: a run with this expert is tokenized by it."""
        from ..data.hf_tokenizer import hf_tokenizer

        return hf_tokenizer(options.path)

    def __init__(self, options: HFOptions, *, vocab_size: int):
        super().__init__(options, vocab_size=vocab_size)
        import torch

        self._torch = torch
        self.device = resolve_device(options.device)
        self.artifact_path = options.path  # the codec hashes this directory
        self.model = load_hf_model(options.path, self.device, options.dtype)
        out_size = int(self.model.get_output_embeddings().weight.shape[0])
        if out_size != self.vocab_size:
            raise CtxmixError(f"hf model {options.path} scores {out_size} ids, the stream's tokenizer has "
                              f"{self.vocab_size}")
        context = _context_length(self.model.config)
        self.window = options.window or context or 1024
        if context is not None and self.window > context:
            raise CtxmixError(f"spec {self.spec!r}: window {self.window} is longer than the model's context {context}")
        if options.stride > self.window:
            raise CtxmixError(f"spec {self.spec!r}: stride {options.stride} is larger than the window {self.window}")
        parameters = inspect.signature(self.model.forward).parameters
        self._keeps_rows = "logits_to_keep" in parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self.begin(np.zeros(1, dtype=np.int64))

    # -- model calls ----------------------------------------------------------------------------------

    def _logits(self, x, keep: int | None = None, cache=None):
        """Model output for input ids x (B, T): (logits (B, T or keep, V), the cache or None)."""
        kwargs = {"use_cache": cache is not None}
        if cache is not None and cache is not True:
            kwargs[self._cache_arg] = cache
        if keep is not None and self._keeps_rows:
            kwargs["logits_to_keep"] = keep
        out = self.model(input_ids=x.to(self.device), **kwargs)
        new_cache = getattr(out, "cache", None) if "cache" in out else getattr(out, "past_key_values", None)
        return out.logits, new_cache

    def _batch_logits(self, b: int):
        """float32 (or the model's dtype) logits (R, V) of every position batch b scores, in order."""
        torch = self._torch
        plan = self._plan
        starts, lengths, which, rows = plan.batch_layout(b)
        width = plan.padded_len
        offsets = np.arange(width)
        index = np.minimum(starts[:, None] + offsets[None, :], plan.n_tokens - 1)
        x = np.where(offsets[None, :] < lengths[:, None], self._tokens[index], 0)  # padding after the scored rows
        keep = width - int(rows.min())  # the scored rows all lie in the last ``keep`` rows
        with torch.inference_mode():
            logits, _ = self._logits(torch.from_numpy(x), keep=keep)
            if logits.shape[1] != width:  # logits_to_keep: row r is at r - (width - keep)
                rows = rows - (width - logits.shape[1])
            return logits[torch.as_tensor(which), torch.as_tensor(rows)]

    def _log_softmax_blocks(self, logits):
        """float64 log-probabilities (R, V) as numpy, computed ROW_BLOCK rows at a time."""
        torch = self._torch
        out = np.empty(tuple(logits.shape), np.float64)
        with torch.inference_mode():
            for lo in range(0, logits.shape[0], ROW_BLOCK):
                block = logits[lo : lo + ROW_BLOCK].double()
                out[lo : lo + ROW_BLOCK] = torch.log_softmax(block, dim=-1).cpu().numpy()
        return out

    def _fast_batch(self, b: int) -> None:
        """log p(target) and the entropy of every position batch b scores, ROW_BLOCK rows at a time."""
        torch = self._torch
        first = self._plan.batch_range(b)[0]
        logits = self._batch_logits(b)
        with torch.inference_mode():
            for lo in range(0, logits.shape[0], ROW_BLOCK):
                lp = torch.log_softmax(logits[lo : lo + ROW_BLOCK].double(), dim=-1).cpu().numpy()
                self._store(first + lo, lp)
        self._fast_until = max(self._fast_until, first + logits.shape[0])

    def _store(self, first: int, lp: np.ndarray) -> None:
        positions = np.arange(first, first + len(lp))
        self._logp[positions] = lp[np.arange(len(lp)), self._tokens[positions]]
        self._entropy[positions] = -(np.exp(lp) * lp).sum(axis=1)

    def _full_rows(self, b: int) -> tuple[int, np.ndarray]:
        if self._full_cache is None or self._full_cache[0] != b:
            first = self._plan.batch_range(b)[0]
            lp = self._log_softmax_blocks(self._batch_logits(b))
            for lo in range(0, len(lp), ROW_BLOCK):  # the same floats the fast path stores
                self._store(first + lo, lp[lo : lo + ROW_BLOCK])
            if first == self._fast_until:
                self._fast_until = first + len(lp)
            self._full_cache = (b, first, lp)
        return self._full_cache[1], self._full_cache[2]

    # -- Expert protocol -------------------------------------------------------------------------------

    def begin(self, tokens: np.ndarray) -> None:
        self._tokens = checked_stream(tokens, self.vocab_size, "hf expert")
        n = len(self._tokens)
        self._plan = WindowPlan(n, self.window, self.options.stride, self.options.batch_size)
        self._logp = np.zeros(n)
        self._entropy = np.zeros(n)
        if n:
            self._logp[0] = -math.log(self.vocab_size)  # position 0: context only, uniform
            self._entropy[0] = math.log(self.vocab_size)
        self._fast_until = 1
        self._full_cache: tuple[int, int, np.ndarray] | None = None
        self._pos = 0
        self._cache = None
        self._cache_start = -1
        self._cache_length = 0
        self._cache_logits = None
        self._step_memo: tuple[int, np.ndarray, float] | None = None

    def score_chunk(self, tokens, *, full=False, want=()):
        tokens = np.asarray(tokens, dtype=np.int64)
        start, end = chunk_span(tokens, self._tokens, self._pos, "hf expert")
        p = None
        if full:
            p = chunk_distributions(start, end, self.vocab_size, lambda position: self._full_rows(self._plan.batch_of(position)))
        else:
            while self._fast_until < end:
                self._fast_batch(self._plan.batch_of(self._fast_until))
        self._pos = end
        features = {FEATURE_ENTROPY: self._entropy[start:end].copy()} if FEATURE_ENTROPY in want else {}
        return ExpertOutput(self._logp[start:end].copy(), p, features)

    # -- stepwise protocol ----------------------------------------------------------------------------

    def _step_logits(self, position: int):
        """Logits (V,) for ``position`` from tokens < position, through the KV cache of its window."""
        torch = self._torch
        plan = self._plan
        k = plan.window_of(position)
        start = k * plan.stride
        with torch.inference_mode():
            if self._cache is None or self._cache_start != start or start + self._cache_length > position:
                prefill = 1 if k == 0 else self.window - plan.stride + 1  # canonical: what its first position sees
                x = torch.as_tensor(self._tokens[start : start + prefill])[None, :]
                logits, self._cache = self._logits(x, keep=1, cache=True)
                self._cache_start, self._cache_length = start, prefill
                self._cache_logits = logits[0, -1]
            while self._cache_start + self._cache_length < position:
                at = self._cache_start + self._cache_length
                x = torch.as_tensor(self._tokens[at : at + 1])[None, :]
                logits, self._cache = self._logits(x, keep=1, cache=self._cache)
                self._cache_length += 1
                self._cache_logits = logits[0, -1]
        return self._cache_logits

    def next_distribution(self, want=()):
        """float64[V] for the next position (tokens < it observed), and its features; no state change."""
        position = self._pos
        if self._step_memo is None or self._step_memo[0] != position:
            if position == 0:
                p = np.full(self.vocab_size, 1.0 / self.vocab_size)
                entropy = math.log(self.vocab_size)
            else:
                logits = self._step_logits(position)
                lp = self._torch.log_softmax(logits.double(), dim=-1).cpu().numpy()
                p, entropy = np.exp(lp), float(-(np.exp(lp) * lp).sum())
            self._step_memo = (position, p, entropy)
        _, p, entropy = self._step_memo
        features = {FEATURE_ENTROPY: entropy} if FEATURE_ENTROPY in want else {}
        return p.copy(), features

    def observe(self, token: int) -> None:
        observe_growing(self, token, "hf expert")

    def memory_bytes(self) -> int:
        params = sum(t.numel() * t.element_size() for t in self.model.parameters())
        return int(self._logp.nbytes + self._entropy.nbytes + self._tokens.nbytes + params)
