"""The neural expert: a trained Parameter Golf model (``.ptz`` artifact) scored as the challenge scores it.

Windows (the challenge's sliding evaluation, each position scored exactly once)
    Window k starts at ``ws = k * stride`` and holds up to ``window`` tokens. Position j (predicting
    token j from tokens < j) is scored by window ``k(j) = max(0, ceil((j - window) / stride))``: window 0
    scores positions 1..window (all its positions), every later window the last ``stride`` positions of
    its span, so each scored token sees between ``window - stride + 1`` and ``window`` tokens of context.
    ``stride == window`` is the challenge's non-overlapping ``eval_val``. (The challenge's own sliding loop
    scores the last partial windows' tail several times; ctxmix scores every position once, which is the
    same everywhere but at the very end of the stream.)

Batched path (``score_chunk``)
    Windows are grouped into batches of ``batch_size`` in a fixed order (batch b = windows
    ``b * batch_size ..``), each batch padded to one shape (``min(window, N - 1)`` tokens per window; the
    padding sits after the scored positions and causal attention never reads it). A batch yields float64
    ``log_softmax`` rows for its scored positions; the fast path keeps log p(target) and the entropy, the
    full path also ``exp`` of the rows. Both paths recompute a batch by the same function on the same
    shapes, so log p(target) is the very same float either way (CPU matmul results may depend on the batch
    shape, which is why the partition never depends on chunking). Logits come out in the model's dtype
    (fp32 on CPU, bf16 autocast on CUDA); ``log_softmax`` runs in float64.

Stepwise path (``next_distribution`` / ``observe``, for the codec)
    Incremental decoding with a KV cache over the same windows: when position j enters window k the cache
    is rebuilt from that window's start with one canonical prefill (window 0: its first token; window
    k >= 1: the ``window - stride + 1`` tokens its first scored position sees), then extended one token at a
    time. The computation depends only on the tokens seen and the position, never on the call pattern, so
    an encoder and a decoder on the same machine get bit-identical distributions. It is not bit-identical
    to the batched path (different matmul shapes; about 1e-6 relative in p on CPU), only close.

Multi-process (``torchrun``): with ``WORLD_SIZE > 1`` ``begin`` splits the batches between the ranks
(contiguous ranges), each rank computes its own, and the results are summed into every rank (positions
are disjoint, so the sum is exact); rank 0 then scores the whole stream from them.
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import CtxmixError
from ..kernels.lane_step import softmax_rows, softmax_rows32
from .base import FEATURE_ENTROPY, Expert, ExpertOutput

DEFAULT_STRIDE = 64  # the challenge's sliding-window stride
DEFAULT_BATCH_SIZE = 8  # windows per forward pass (CPU: larger batches gain little and cost memory)
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
HEAD_ROWS = 64  # rows per call of the output head (head_in_blocks)
MODEL_CACHE_SIZE = 2  # loaded artifacts kept for the next stream (run_streams builds experts per file)
DEFAULT_MODEL = "default"  # model=default: the small model shipped in the package (docs/training.md)
# Test-time training (experts/ttt.py): the modes, and the defaults docs/ttt.md measured (first 4,096 targets of
# fineweb_val_000003, both shipped test artifacts; a full-weight lr of 5e-5 is the best for the two together).
TTT_MODES = ("none", "lora", "full")
TTT_DEFAULT_PARAMS = "all"
TTT_DEFAULT_RANK = 8
TTT_DEFAULT_OPT = "adam"
TTT_DEFAULT_LR = {"full": 5e-5, "lora": 3e-3}  # ttt_lr=-1
TTT_DEFAULT_MOMENTUM = 0.5
TTT_DEFAULT_CHUNK = 32
TTT_DEFAULT_RESET = "doc"
TTT_DEFAULT_CONTEXT = "doc"
# Lanes (the codec): positions of a lane's KV cache, its first and the latest LANE_CONTEXT - 1
# (``LaneCache``), at most the window. 128 coded lcet10.txt's first 100 kB (64 lanes) in 3.5870 bits a
# token against 3.5899 with 256 and 3.5955 with 64, and its attention reads half of 256's keys.
LANE_CONTEXT = 128


def resolve_model_path(model: str) -> str:
    """The artifact file a ``model=`` option names: ``default`` is the shipped model, anything else a path."""
    if model == DEFAULT_MODEL:
        from ..data.text import ASSETS_DIR

        return str(ASSETS_DIR / "default_model.ptz")
    return model


@dataclass(frozen=True)
class NeuralOptions:
    # path of the .ptz artifact; "default" = the small model shipped in the package
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Parameter Golf artifact (.ptz), or default (the shipped model)", "label": True})
    # scoring window in tokens: 0 = the artifact's training length (metadata), else the challenge's 1024
    window: int = field(default=0, metadata={"help": "context window in tokens (0: the artifact's training length)", "min": 0})
    # sliding-window stride: positions scored per window after the first
    stride: int = field(default=DEFAULT_STRIDE, metadata={"help": "sliding-window stride (= window: non-overlapping)", "min": 1})
    # windows per forward pass
    batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata={"help": "windows per forward pass", "min": 1})
    # where to run the model
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu, cuda or cuda:N"})
    # attention kernel
    attention: str = field(default="auto", metadata={"help": "auto (flash-attn on CUDA when installed), sdpa or flash", "choices": ("auto", "sdpa", "flash")})
    # RoPE base override: 0 = the artifact's (metadata, else 10000)
    rope_base: float = field(default=0.0, metadata={"help": "RoPE base (0: the artifact's)", "min": 0.0})
    # logit soft cap override: 0 = the artifact's (metadata, else 30)
    logit_softcap: float = field(default=0.0, metadata={"help": "logit soft cap (0: the artifact's)", "min": 0.0})
    # your own model class: a module whose load(state_dict, meta) builds it (models/adapter.py, docs/models.md)
    module: str = field(default="", metadata={"help": "adapter module building the model: file.py, a module or an entry point (docs/models.md)"})
    # Score-first test-time training (experts/ttt.py, docs/ttt.md); ttt=none is the static expert above.
    ttt: str = field(default="none", metadata={"help": "test-time training: none, lora (low-rank adapters) or full (the weights)", "choices": TTT_MODES})
    # which weights adapt, ";"-separated roles (models/lora.py ROLES)
    ttt_params: str = field(default=TTT_DEFAULT_PARAMS, metadata={"help": "TTT: what adapts, ';'-separated: q k v o fc proj head gains emb, or all"})
    # LoRA rank
    ttt_rank: int = field(default=TTT_DEFAULT_RANK, metadata={"help": "TTT lora: adapter rank", "min": 1, "max": 4096})
    # optimizer of the TTT steps
    ttt_opt: str = field(default=TTT_DEFAULT_OPT, metadata={"help": "TTT optimizer: adam or sgd", "choices": ("adam", "sgd")})
    # learning rate; -1: the mode's default (TTT_DEFAULT_LR); 0: TTT computes its steps but nothing moves
    ttt_lr: float = field(default=-1.0, metadata={"help": "TTT learning rate (-1: the mode's default, full 5e-5, lora 3e-3; 0: nothing moves)", "min": -1.0, "max": 10.0})
    # Adam's beta1, or SGD's momentum
    ttt_momentum: float = field(default=TTT_DEFAULT_MOMENTUM, metadata={"help": "TTT: Adam beta1 or SGD momentum", "min": 0.0, "max": 0.999})
    # optimizer steps on each chunk once it is scored
    ttt_steps: int = field(default=1, metadata={"help": "TTT: optimizer steps per chunk, after the chunk is scored", "min": 1, "max": 64})
    # positions scored between two updates
    ttt_chunk: int = field(default=TTT_DEFAULT_CHUNK, metadata={"help": "TTT: positions scored between updates (<= window)", "min": 1, "max": 1 << 20})
    # when the adapted weights go back to the artifact's
    ttt_reset: str = field(default=TTT_DEFAULT_RESET, metadata={"help": "TTT: reset the adaptation at each document (doc) or never", "choices": ("doc", "never")})
    # the context a chunk is scored (and trained) with
    ttt_context: str = field(default=TTT_DEFAULT_CONTEXT, metadata={"help": "TTT: score with the stream's sliding windows (window) or same-document context only (doc)", "choices": ("window", "doc")})
    # the token that opens a document (sp1024's BOS, as the challenge's shards mark documents)
    ttt_doc_token: int = field(default=1, metadata={"help": "TTT: token that starts a document (sp1024 BOS = 1)", "min": 0, "max": (1 << 20) - 1})
    # seed of the LoRA down-projections' initial values (the up-projections start at 0)
    ttt_seed: int = field(default=0, metadata={"help": "TTT lora: seed of the adapters' initial values", "min": 0})

    def __post_init__(self) -> None:
        if not self.model:
            raise CtxmixError("the neural expert needs model=PATH (a .ptz artifact) or model=default")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise CtxmixError(f"device={self.device} is not one of auto, cpu, cuda, cuda:N")
        if self.ttt_lr < 0 and self.ttt_lr != -1.0:
            raise CtxmixError(f"ttt_lr={self.ttt_lr!r} must be >= 0, or -1 for the mode's default")
        if self.ttt != "none":
            from ..models.lora import parse_roles

            parse_roles(self.ttt_params, self.ttt)  # a role the mode cannot adapt is refused here


_models: OrderedDict = OrderedDict()


def _load_cached(path: str, overrides: dict, device, backend: str, module: str = ""):
    """``models.load_model``, moved to ``device`` with ``backend`` attention, behind a small cache keyed by
    file identity and all of those.

    Sharing is safe: a loaded model is in eval mode with frozen weights; its only mutable parts are
    caches of pure functions of the weights (RoPE tables, fake-quantized weights).
    """
    from ..models import load_model

    try:
        st = os.stat(path)
    except OSError:
        return load_model(path, overrides, module)  # raises the one-line "no such file" error
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, tuple(sorted(overrides.items())), str(device), backend,
           module)
    if key in _models:
        _models.move_to_end(key)
        return _models[key]
    loaded = load_model(path, overrides, module)
    loaded.model.to(device)
    if hasattr(loaded.model, "set_attention_backend"):
        loaded.model.set_attention_backend(backend)
    _models[key] = loaded
    while len(_models) > MODEL_CACHE_SIZE:
        _models.popitem(last=False)
    return loaded


def with_neural_options(specs, model=None, options: dict | None = None) -> list[str]:
    """Expert spec strings with ``neural:model=PATH`` first when ``model`` is given (unless a neural spec is
    already there), and each of ``options`` (``None`` values skipped) added to every neural spec that does
    not set it itself. String work only: importing this never imports torch."""
    from ..spec import format_value, split_spec

    specs = list(specs)
    if model is not None:
        # --model fills a neural spec that names no model (the default experts' ``neural``), else comes first.
        # Beside neural specs that all name their own model it would be silently unused: refused.
        neural = [s for s in specs if split_spec(s)[0] == "neural"]
        bare = [i for i, s in enumerate(specs) if split_spec(s)[0] == "neural"
                and not any(item.partition("=")[0].strip() == "model" for item in split_spec(s)[1])]
        if neural and not bare:
            raise CtxmixError(f"--model {os.fspath(model)} is not used: expert {neural[0]!r} names its own model "
                              "(give the model in one place)")
        if bare:
            name, items = split_spec(specs[bare[0]])
            specs[bare[0]] = ",".join([f"neural:model={os.fspath(model)}", *items])
        elif not any(split_spec(s)[0] == "neural" for s in specs):
            specs.insert(0, f"neural:model={os.fspath(model)}")
    extra = {k: v for k, v in (options or {}).items() if v is not None}
    out = []
    for spec in specs:
        name, items = split_spec(spec)
        if name == "neural" and extra:
            given = {item.partition("=")[0].strip() for item in items}
            items = items + [f"{k}={format_value(v)}" for k, v in extra.items() if k not in given]
            spec = f"{name}:{','.join(items)}"
        out.append(spec)
    return out


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when not launched by it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def ensure_process_group(device_type: str) -> None:
    """Join the torchrun job's process group (gloo on CPU, nccl on CUDA) unless already joined."""
    import torch.distributed as dist

    if not dist.is_available():
        raise CtxmixError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")


def helper_rank_begin(specs, streams) -> bool:
    """Under torchrun, a rank other than 0 only computes its share of the neural windows (inside each
    neural expert's ``begin``, in the order rank 0 calls them: spec order, stream by stream) and reports
    nothing. Returns True on such a rank (the caller then returns an empty report), False otherwise."""
    from ..components import experts as registry
    from ..spec import split_spec

    rank, world = distributed_rank_world()
    if world <= 1 or rank == 0:
        return False
    neural = [s for s in specs if split_spec(s)[0] == "neural"]
    try:
        for stream in streams:
            for spec in neural:
                registry.build(spec, vocab_size=stream.vocab_size).begin(stream.tokens)
    finally:
        leave_process_group()
    return True


def leave_process_group() -> None:
    """Tear down the torchrun process group a neural expert joined (no-op otherwise; never imports torch)."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CtxmixError(f"device={name}, but torch sees no CUDA device")
    if ":" in name:
        index = int(name.split(":", 1)[1])
        if index >= torch.cuda.device_count():
            raise CtxmixError(f"device={name}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    _, world = distributed_rank_world()  # under torchrun each rank takes its own GPU
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else torch.cuda.current_device())


@dataclass(frozen=True)
class WindowPlan:
    """Which window scores which position, and how windows are batched (pure arithmetic, no tokens)."""

    n_tokens: int  # N: positions 0..N-1, of which 1..N-1 are scored
    window: int
    stride: int
    batch_size: int

    def window_of(self, position: int) -> int:
        """Index of the window that scores ``position`` (>= 1)."""
        return max(0, -(-(position - self.window) // self.stride))

    @property
    def n_windows(self) -> int:
        return self.window_of(self.n_tokens - 1) + 1 if self.n_tokens >= 2 else 0

    @property
    def n_batches(self) -> int:
        return -(-self.n_windows // self.batch_size)

    @property
    def padded_len(self) -> int:
        """Tokens per window in a batch: every window is padded to this one shape."""
        return min(self.window, self.n_tokens - 1)

    def scored_range(self, k: int) -> tuple[int, int]:
        """Positions ``[lo, hi)`` scored by window k."""
        start = k * self.stride
        lo = 1 if k == 0 else start + self.window - self.stride + 1
        return lo, min(start + self.window, self.n_tokens - 1) + 1

    def batch_of(self, position: int) -> int:
        return self.window_of(position) // self.batch_size

    def batch_range(self, b: int) -> tuple[int, int]:
        """Positions ``[lo, hi)`` scored by batch b (contiguous)."""
        first = b * self.batch_size
        last = min(first + self.batch_size, self.n_windows) - 1
        return self.scored_range(first)[0], self.scored_range(last)[1]

    def batch_layout(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For batch b: window starts int64[B], input lengths int64[B], and per scored position (in
        order) the window's index in the batch and the row within it (int64[R] each)."""
        ks = np.arange(b * self.batch_size, min((b + 1) * self.batch_size, self.n_windows), dtype=np.int64)
        starts = ks * self.stride
        lo = np.where(ks == 0, 1, starts + self.window - self.stride + 1)
        hi = np.minimum(starts + self.window, self.n_tokens - 1) + 1
        lengths = hi - 1 - starts  # tokens[start .. hi - 2] feed positions lo .. hi - 1
        counts = hi - lo
        which = np.repeat(np.arange(len(ks)), counts)
        positions = np.concatenate([np.arange(a, z) for a, z in zip(lo, hi)]) if len(ks) else np.zeros(0, np.int64)
        rows = positions - 1 - starts[which]  # the row of the last context token of each position
        return starts, lengths, which, rows


def checked_stream(tokens, vocab_size: int, label: str) -> np.ndarray:
    """An int64 copy of a windowed expert's (neural, hf) stream, refused in one line unless it is
    one-dimensional with every token in 0..vocab_size-1."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise CtxmixError(f"{label}: tokens must be one-dimensional, got shape {tokens.shape}")
    tokens = tokens.astype(np.int64, copy=True)
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = int(np.flatnonzero((tokens < 0) | (tokens >= vocab_size))[0])
        raise CtxmixError(f"token {int(tokens[bad])} at position {bad} is outside the model's vocabulary "
                          f"0..{vocab_size - 1}")
    return tokens


def chunk_span(tokens: np.ndarray, stream: np.ndarray, position: int, label: str) -> tuple[int, int]:
    """Positions ``[start, end)`` of a chunk given to a windowed expert's ``score_chunk`` at ``position``,
    refused in one line unless it is the stream's next tokens (the ones ``begin`` was given)."""
    start, end = position, position + len(tokens)
    if end > len(stream):
        raise CtxmixError(f"{label}: chunk ends at position {end}, past the {len(stream)} tokens given to begin")
    if not np.array_equal(tokens, stream[start:end]):
        bad = start + int(np.flatnonzero(tokens != stream[start:end])[0])
        raise CtxmixError(f"{label}: the chunk's token at position {bad} differs from the stream given to begin")
    return start, end


def chunk_distributions(start: int, end: int, vocab_size: int, rows_holding) -> np.ndarray:
    """float64[end - start, V]: the distributions of positions ``start .. end - 1``, uniform at position 0
    (context only), else from ``rows_holding(position)`` = (first position, log-softmax rows) of the
    computed block that holds ``position``."""
    p = np.empty((end - start, vocab_size))
    position = start
    if position == 0 and end > 0:
        p[0] = 1.0 / vocab_size
        position = 1
    while position < end:
        first, lp = rows_holding(position)
        stop = min(end, first + len(lp))
        p[position - start : stop - start] = np.exp(lp[position - first : stop - first])
        position = stop
    return p


def observe_growing(expert, token: int, label: str) -> None:
    """``observe`` of a windowed expert (neural, hf) whose stepwise stream grows as tokens arrive: the token
    array doubles when full, and the window plan follows its length."""
    if expert._pos >= len(expert._tokens):
        expert._tokens = np.concatenate([expert._tokens, np.zeros(max(len(expert._tokens), 1024), np.int64)])
        options = expert.options
        expert._plan = WindowPlan(len(expert._tokens), expert.window, options.stride, options.batch_size)
    if not 0 <= int(token) < expert.vocab_size:
        raise CtxmixError(f"{label}: observed token {token} is outside the vocabulary 0..{expert.vocab_size - 1}")
    expert._tokens[expert._pos] = int(token)
    expert._pos += 1


class _LaneGroup:
    """Lanes lo..hi-1 of the neural expert's lane step: their KV cache, the tokens they take at the next step
    and, once computed, the step's logits and (p, entropy) rows."""

    def __init__(self, cache, lo: int, hi: int, first_token: int):
        self.cache, self.lo, self.hi = cache, lo, hi
        self.tokens = np.full(hi - lo, int(first_token), np.int64)
        self.logits = None
        self.rows: tuple[np.ndarray, np.ndarray] | None = None


class NeuralExpert(Expert):
    """A Parameter Golf artifact scored with the challenge's sliding window.

    Registered lazily in ``experts/__init__.py`` (``ctxmix.experts.neural:NeuralExpert``) so that runs
    without it never import torch.
    """

    Options = NeuralOptions
    registry_name = "neural"
    pretrained = True  # trained on its tokenizer's ids: text mode gives it those (no space-run tokens)
    provides = (FEATURE_ENTROPY,)

    def __new__(cls, options: NeuralOptions, **context):
        # ttt=lora|full builds the test-time-training expert (experts/ttt.py), a subclass that keeps this
        # class's loading and windows and replaces how positions are scored; ttt=none is this class alone.
        if cls is NeuralExpert and options.ttt != "none":
            from .ttt import TTTNeuralExpert

            cls = TTTNeuralExpert
        return super().__new__(cls)

    def __init__(self, options: NeuralOptions, *, vocab_size: int):
        super().__init__(options, vocab_size=vocab_size)
        import torch

        from ..models.layers import resolve_backend

        self._torch = torch
        overrides = {}
        if options.rope_base:
            overrides["rope_base"] = float(options.rope_base)
        if options.logit_softcap:
            overrides["logit_softcap"] = float(options.logit_softcap)
        self.device = resolve_device(options.device)
        backend = resolve_backend(options.attention, self.device)
        if backend == "flash" and self.device.type != "cuda":
            raise CtxmixError("attention=flash needs device=cuda (flash-attn has no CPU kernel)")
        self.artifact_path = resolve_model_path(options.model)  # the codec hashes this file
        loaded = _load_cached(self.artifact_path, overrides, self.device, backend, options.module)
        self.family = loaded.family
        self.config = loaded.config
        self.model = loaded.model
        if self.config.vocab_size != self.vocab_size:
            raise CtxmixError(
                f"artifact {options.model} has vocabulary {self.config.vocab_size}, the stream's tokenizer has {self.vocab_size}"
            )
        self.window = options.window or int(self.config.train_seq_len)
        if options.stride > self.window:
            raise CtxmixError(f"spec {self.spec!r}: stride {options.stride} is larger than the window {self.window}")
        self.begin(np.zeros(1, dtype=np.int64))

    # -- model calls ----------------------------------------------------------------------------------

    def _autocast(self):
        torch = self._torch
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _logits_rows(self, x, which, rows):
        """float64 log-probabilities (R, V) of the given (window, row) pairs of a batch of inputs x (B, T)."""
        torch = self._torch
        with torch.inference_mode(), self._autocast():
            logits = rows_logits(self.model, x.to(self.device), which, rows)
            return torch.log_softmax(logits.double(), dim=-1)  # float64 (R, V), on the model's device

    def _compute_batch(self, b: int) -> tuple[int, np.ndarray]:
        """float64 log-probability rows of every position batch b scores: (first position, lp[R, V])."""
        torch = self._torch
        plan = self._plan
        starts, lengths, which, rows = plan.batch_layout(b)
        width = plan.padded_len
        offsets = np.arange(width)
        index = np.minimum(starts[:, None] + offsets[None, :], plan.n_tokens - 1)
        x = np.where(offsets[None, :] < lengths[:, None], self._tokens[index], 0)  # zero padding, as the challenge
        lp = self._logits_rows(torch.from_numpy(x), which, rows)
        return plan.batch_range(b)[0], lp.cpu().numpy()

    def _store(self, first: int, lp: np.ndarray) -> None:
        """Keep log p(target) and the entropy of rows for positions first .. first + R - 1."""
        positions = np.arange(first, first + len(lp))
        self._logp[positions] = lp[np.arange(len(lp)), self._tokens[positions]]
        self._entropy[positions] = _entropy(lp)

    def _ensure_fast(self, end: int) -> None:
        """Compute batches in order until positions < ``end`` are known."""
        while self._fast_until < end:
            b = self._plan.batch_of(self._fast_until)
            first, lp = self._compute_batch(b)
            self._store(first, lp)
            self._fast_until = first + len(lp)

    def _full_rows(self, b: int) -> tuple[int, np.ndarray]:
        if self._full_cache is None or self._full_cache[0] != b:
            first, lp = self._compute_batch(b)
            self._store(first, lp)  # the same floats the fast path stores
            if first == self._fast_until:
                self._fast_until = first + len(lp)
            self._full_cache = (b, first, lp)
        return self._full_cache[1], self._full_cache[2]

    # -- Expert protocol -------------------------------------------------------------------------------

    def _set_stream(self, tokens: np.ndarray) -> None:
        """Keep a checked int64 copy of the stream ``begin`` is given."""
        self._tokens = checked_stream(tokens, self.vocab_size, "neural expert")

    def begin(self, tokens: np.ndarray) -> None:
        self._set_stream(tokens)
        n = len(self._tokens)
        self._plan = WindowPlan(n, self.window, self.options.stride, self.options.batch_size)
        self._logp = np.zeros(n)  # float64[N]: log p(target), filled as batches are computed
        self._entropy = np.zeros(n)  # float64[N]: entropy (nats) of each position's distribution
        if n:
            self._logp[0] = -math.log(self.vocab_size)  # position 0: context only, uniform
            self._entropy[0] = math.log(self.vocab_size)
        self._fast_until = 1  # positions < this have logp/entropy
        self._full_cache: tuple[int, int, np.ndarray] | None = None
        self._pos = 0
        self._cache = None  # stepwise KV cache, its window start, and the last logits it produced
        self._cache_start = -1
        self._cache_logits = None
        self._step_memo: tuple[int, np.ndarray, float] | None = None
        rank, world = distributed_rank_world()
        if world > 1 and n >= 2:
            self._begin_distributed(rank, world)

    def _begin_distributed(self, rank: int, world: int) -> None:
        """Each rank computes its share of the batches; the sums give every rank all positions."""
        import torch.distributed as dist

        torch = self._torch
        ensure_process_group(self.device.type)
        n_batches = self._plan.n_batches
        for b in range(n_batches * rank // world, n_batches * (rank + 1) // world):
            self._store(*self._compute_batch(b))
        mine = torch.from_numpy(np.stack([self._logp, self._entropy]))  # float64[2, N]
        if rank != 0 and len(self._logp):
            mine[:, 0] = 0.0  # position 0's constants are counted once, from rank 0
        mine = mine.to(self.device) if self.device.type == "cuda" else mine
        dist.all_reduce(mine, op=dist.ReduceOp.SUM)
        both = mine.cpu().numpy()
        self._logp, self._entropy = both[0].copy(), both[1].copy()
        self._fast_until = self._plan.n_tokens

    def _chunk_span(self, tokens: np.ndarray) -> tuple[int, int]:
        """Positions ``[start, end)`` of the chunk ``score_chunk`` is given, checked against the stream."""
        return chunk_span(tokens, self._tokens, self._pos, "neural expert")

    def score_chunk(self, tokens, *, full=False, want=()):
        tokens = np.asarray(tokens, dtype=np.int64)
        start, end = self._chunk_span(tokens)
        p = None
        if full:
            p = chunk_distributions(start, end, self.vocab_size, lambda position: self._full_rows(self._plan.batch_of(position)))
        else:
            self._ensure_fast(end)
        self._pos = end
        features = {FEATURE_ENTROPY: self._entropy[start:end].copy()} if FEATURE_ENTROPY in want else {}
        return ExpertOutput(self._logp[start:end].copy(), p, features)

    # -- stepwise protocol ----------------------------------------------------------------------------

    def _feed(self, ids: np.ndarray):
        torch = self._torch
        with torch.inference_mode(), self._autocast():
            x = torch.as_tensor(ids, dtype=torch.int64, device=self.device)[None, :]
            if getattr(self.model, "supports_last_rows", False):  # a prefill needs the last row only
                return self.model.head(self.model.hidden(x, self._cache, last=1))[0, -1]
            return self.model(x, self._cache)[0, -1]  # logits (V,) after the last token fed

    def _step(self, token: int):
        """Logits (V,) after one more token through the KV cache (the family's one-position path if it has one)."""
        if not hasattr(self.model, "decode_step"):
            return self._feed(np.array([token], dtype=np.int64))
        with self._torch.inference_mode(), self._autocast():
            return self.model.decode_step(token, self._cache)

    def _step_logits(self, position: int):
        """Logits for ``position`` from tokens < position, through the KV cache of its window."""
        torch = self._torch
        plan = self._plan
        k = plan.window_of(position)
        start = k * plan.stride
        if not getattr(self.model, "supports_kv_cache", False):
            with torch.inference_mode(), self._autocast():
                x = torch.as_tensor(self._tokens[start:position], device=self.device)[None, :]
                return self.model(x)[0, -1]
        held = self._cache.length if self._cache is not None else 0
        if self._cache is None or self._cache_start != start or start + held > position:
            # Canonical prefill: what the window's first scored position sees (window 0: its first token).
            prefill = 1 if k == 0 else self.window - plan.stride + 1
            self._cache = self.model.new_cache()
            self._cache_start = start
            self._cache_logits = self._feed(self._tokens[start : start + prefill])
        while self._cache_start + self._cache.length < position:
            at = self._cache_start + self._cache.length
            self._cache_logits = self._step(int(self._tokens[at]))
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
                p, entropy = np.exp(lp), float(_entropy(lp[None, :])[0])
            self._step_memo = (position, p, entropy)
        _, p, entropy = self._step_memo
        features = {FEATURE_ENTROPY: entropy} if FEATURE_ENTROPY in want else {}
        return p.copy(), features

    def observe(self, token: int) -> None:
        observe_growing(self, token, "neural expert")

    # -- lanes (the codec's lockstep streams, ``ctxmix/lanes.py``) --------------------------------------

    def supports_lanes(self) -> bool:
        """The static expert of a family with a batched step; a subclass that scores its own way (test-time
        training) codes on one lane."""
        return (type(self).next_distribution is NeuralExpert.next_distribution
                and hasattr(self.model, "decode_lanes") and hasattr(self.model, "new_lane_cache"))

    def lanes_begin(self, n_lanes: int, n_tokens: int, first_token: int, integer: bool = True, threads: int = 1,
                    groups: Sequence[tuple[int, int]] | None = None, version: int | None = None) -> None:
        """Reset for ``n_lanes`` lanes, each a sequence of its own that starts with ``first_token``. Every
        step runs one ``decode_lanes`` call per group of lanes (``groups``: the lane engine's contiguous (lo,
        hi) ranges that cover 0..n_lanes-1, each with its own cache; one group by default); a lane's context is
        its own tokens only: its first and the latest ``LANE_CONTEXT - 1`` (``LaneCache``), at most the
        window's. ``integer``: the step's linear layers as exact integer matmuls (``models/integer.py``), each
        call's lanes split among ``threads`` threads. Only the integer step may be cut into groups: its rows
        do not depend on the batch. ``version``: the file's lane version (``lanes.LANE_VERSION`` when None);
        from ``lanes.INT8_KV_FROM`` on, the integer step's cache holds int8 keys and values, and from
        ``lanes.ATTENTION_FLOOR_FROM`` on its attention drops weights below ``integer.ATTENTION_FLOOR``."""
        from ..lanes import ATTENTION_FLOOR_FROM, FLOAT32_SOFTMAX_FROM, INT8_KV_FROM, LANE_VERSION
        from ..models.integer import ATTENTION_FLOOR

        self.begin(np.zeros(1, dtype=np.int64))
        if not 0 <= int(first_token) < self.vocab_size:
            raise CtxmixError(f"neural expert: token {first_token} is outside the vocabulary 0..{self.vocab_size - 1}")
        groups = list(groups or [(0, n_lanes)])
        if len(groups) > 1 and not integer:
            raise CtxmixError("neural expert: only the integer lane step can run in groups of lanes")
        capacity = max(min(self.window, LANE_CONTEXT), 2)
        version = LANE_VERSION if version is None else version
        int8 = integer and version >= INT8_KV_FROM
        floor = ATTENTION_FLOOR if integer and version >= ATTENTION_FLOOR_FROM else 0.0
        float32_softmax = integer and version >= FLOAT32_SOFTMAX_FROM
        self._lane_groups = []
        for lo, hi in groups:  # (the groups' caches share the first's integer step: one copy of its weights)
            shared = self._lane_groups[0].cache.integer_step if self._lane_groups else None
            cache = self.model.new_lane_cache(capacity, integer, threads, int8, step=shared, attention_floor=floor,
                                              float32_softmax=float32_softmax)
            self._lane_groups.append(_LaneGroup(cache, lo, hi, first_token))

    def _lane_logits(self, group: _LaneGroup):
        """The current step's logits of a group's lanes, (lanes, V): the model's step, once per step."""
        if group.logits is None:
            torch = self._torch
            # float32 on a CUDA device too (no autocast): a lane step is launch-bound, and bf16's casts made it
            # slower (docs/benchmarks.md, "Lanes on a GPU")
            with torch.inference_mode():
                x = torch.as_tensor(group.tokens, dtype=torch.int64, device=self.device)
                group.logits = self.model.decode_lanes(x, group.cache)
        return group.logits

    def _lane_rows(self, group: _LaneGroup) -> tuple[np.ndarray, np.ndarray]:
        """The current step's (p, entropy) of a group's lanes: the float32 engine's through torch's log_softmax
        (as its files were written), the integer engine's through one kernel."""
        if group.rows is None:
            logits = self._lane_logits(group)
            if group.cache.integer_step is not None:
                p, entropy = np.empty(tuple(logits.shape)), np.empty(logits.size(0))
                # (float32 logits from lane version 7 on: ``IntegerLaneStep.float32_softmax``)
                (softmax_rows32 if logits.dtype == self._torch.float32 else softmax_rows)(logits.numpy(), p, entropy)
            else:
                with self._torch.inference_mode():
                    lp = self._torch.log_softmax(logits.double(), dim=-1).cpu().numpy()
                p, entropy = np.exp(lp), _entropy(lp)
            group.rows = (p, entropy)
        return group.rows

    def lanes_prepare(self, group: int = 0) -> None:
        """Run a group's model step now: the lane engine calls this ahead of time, mostly on its second thread
        while the other components work (``lanes.py``, working ahead); the rows are the same either way, and
        the groups are independent, so two threads may step two of them at once. The rows' softmax runs here
        too: since the integer step's matmuls moved to AMX tiles the coding thread is the busier one
        (docs/benchmarks.md, "AMX tiles from numba")."""
        self._lane_rows(self._lane_groups[group])

    def lanes_distributions(self, n_active: int, want=(), group: int | None = None):
        """(float64[n, V], {feature: float64[n]}) of lanes 0..n_active-1, or of a group's lanes among them
        (``group``: its index in ``lanes_begin``'s groups); no state change."""
        chosen = self._lane_groups if group is None else [self._lane_groups[group]]
        parts = [(p[: n_active - g.lo], entropy[: n_active - g.lo])
                 for g in chosen if g.lo < n_active for p, entropy in [self._lane_rows(g)]]
        p, entropy = parts[0] if len(parts) == 1 else (np.concatenate([a for a, _ in parts]),
                                                        np.concatenate([b for _, b in parts]))
        return p, ({FEATURE_ENTROPY: entropy} if FEATURE_ENTROPY in want else {})

    def lanes_observe(self, tokens, group: int | None = None) -> None:
        """Lanes 0..len(tokens)-1 (or a group's first len(tokens) lanes) advance past their token. Lanes past
        the end of their segment (the last step only) feed token 0: the rows they get are never read, and the
        batch keeps its shape."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise CtxmixError(f"neural expert: observed token outside the vocabulary 0..{self.vocab_size - 1}")
        chosen = self._lane_groups if group is None else [self._lane_groups[group]]
        offset = 0 if group is None else chosen[0].lo
        for g in chosen:
            self._lane_logits(g)  # the step of the tokens fed before these (never skipped)
            mine = tokens[max(g.lo - offset, 0): max(g.hi - offset, 0)]
            g.tokens[:] = 0
            g.tokens[: len(mine)] = mine
            g.logits = g.rows = None

    def memory_bytes(self) -> int:
        params = sum(t.numel() * t.element_size() for t in self.model.parameters())
        return int(self._logp.nbytes + self._entropy.nbytes + self._tokens.nbytes + params)


def rows_logits(model, x, which: np.ndarray, rows: np.ndarray):
    """Logits (R, V) of the given (window, row) pairs of a batch of inputs x (B, T) on the model's device,
    in the autograd and autocast modes the caller set (the static expert: inference; TTT: with grad).

    Only the rows scored go through the head; families that can also run their last layer on the scored
    suffix alone (``hidden(idx, last=Q)``) do so.
    """
    import torch

    if hasattr(model, "hidden") and hasattr(model, "head"):
        last = None
        if getattr(model, "supports_last_rows", False):
            last = int(x.size(1) - rows.min())
            rows = rows - (x.size(1) - last)
        h = model.hidden(x) if last is None else model.hidden(x, last=last)  # (B, Q, d)
        return head_in_blocks(model.head, h[torch.as_tensor(which), torch.as_tensor(rows)])  # (R, V)
    return model(x)[torch.as_tensor(which), torch.as_tensor(rows)]


def head_in_blocks(head, h):
    """``head`` of the rows h (R, d), run on blocks of exactly HEAD_ROWS rows (the last block padded with
    copies of the last row, dropped after).

    A row's floats then do not depend on how many rows a batch happens to score. The row count follows the
    batch's windows (the stream's last window scores fewer rows; TTT scores a chunk), and a BLAS may run a
    few rows through another kernel: with oneDNN on an Intel Xeon, a head of 15 rows rounds them
    differently than the same rows inside a head of 143.
    """
    import torch

    n = h.size(0)
    pad = -n % HEAD_ROWS
    if pad:
        h = torch.cat([h, h[-1:].expand(pad, -1)])
    return torch.cat([head(block) for block in h.split(HEAD_ROWS)])[:n]


def _entropy(lp: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row of float64 log-probabilities lp[R, V]."""
    return -(np.exp(lp) * lp).sum(axis=1)
