"""Score-first test-time training (TTT): the neural expert learns from what it has already scored.

``neural:model=A.ptz,ttt=lora`` (or ``ttt=full``) builds this subclass of ``NeuralExpert``: the same
artifact, windows and devices, but the model adapts as the stream goes on (docs/ttt.md has the measured
gains, the cost and the sources).

Chunks
    Positions 1..N-1 are cut into TTT chunks of ``ttt_chunk`` positions, in stream order. A chunk also ends
    after a document token (``ttt_doc_token``, the shards' BOS) when documents matter (``ttt_reset=doc``
    or ``ttt_context=doc``): the next document then starts a chunk of its own, and the BOS itself is the
    last position of the document before it (it is predicted from that document, as an end of text).
    Where a chunk ends is known once its last token is: rule 1 holds for the chunking itself.

One chunk, in this order (``_run_chunk``)
    1. Score: one forward pass gives the float64 log-softmax rows of all the chunk's positions, with the
       weights as they are after the chunks before it. The rows are stored; nothing changes them later.
    2. Learn: ``ttt_steps`` optimizer steps on the mean log loss (nats) of the chunk's tokens, the first
       from the very graph of step 1 (the loss is exactly what was scored), the others from new forwards.
       No step follows the stream's last chunk, nor the last chunk of a document when ``ttt_reset=doc``
       (the adaptation is reset before anything uses it). A reset puts the adapters or weights back where
       they started and drops the optimizer's state.
    So a chunk's distributions are fixed before the first update that uses any of its tokens (rule 3),
    and they depend on tokens before it only (rule 1): ``ctxmix check`` verifies both on real text, and
    rejects ``tests/fixtures/ttt.py``, which learns from a chunk before scoring it.

Context (``ttt_context``)
    ``window``: each position is scored by the static expert's sliding window (``window``, ``stride``),
    every window padded to the static shape, so with ``ttt_lr=0`` (nothing moves) the floats are the
    static expert's, bit for bit. A chunk's rows come from the one or two windows that hold its positions.
    ``doc``: same-document context only, as the Parameter Golf records score: the chunk starting at s in
    the document opened at position b is scored (and trained) on tokens ``a .. e - 2`` with
    ``a = max(b, s + ttt_chunk - 1 - window)``, so every position sees between ``window - ttt_chunk + 1``
    and ``window`` tokens of its own document (fewer at the document's start) and none of another.
    Input positions past the chunk's last needed token are zero (the padding), so a chunk's computation
    reads exactly the tokens its positions may see, in both paths below and whatever the future holds.

Paths
    Chunked (``score_chunk``): chunks are computed in order when the engine first needs one of their
    positions; the engine's chunk sizes cannot change anything (they only decide when, never how).
    Stepwise (``next_distribution`` / ``observe``, the codec): within a chunk the weights are fixed and
    each position is scored through a KV cache over its context (rebuilt whenever the weights change);
    after the chunk's last token is observed, the step is taken with the very function the chunked path
    uses, from the same tokens, so both paths hold the same weights bit for bit at every chunk. The
    stepwise distributions differ from the chunked ones only by the KV cache's float rounding (as the
    static expert's do), and an encoder and a decoder on one thread compute the same floats.

torchrun
    With ``ttt_reset=doc`` documents are independent: ``begin`` gives each rank the documents whose first
    position falls in its share of the stream, and the log-probabilities are summed into every rank
    (positions are disjoint); rank 0 then scores in order from them. With ``ttt_reset=never`` every
    position depends on all before it, so rank 0 computes the stream alone and the other ranks idle.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import CtxmixError
from .base import FEATURE_ENTROPY, ExpertOutput
from .neural import (TTT_DEFAULT_LR, NeuralExpert, NeuralOptions, WindowPlan, _entropy, distributed_rank_world,
                     ensure_process_group, chunk_distributions, rows_logits)

ADAM_BETA2 = 0.95  # PR #77's Adam (0.9, 0.95), the records' LoRA TTT lineage
ADAM_EPS = 1e-8


class TTTNeuralExpert(NeuralExpert):
    """The neural expert with score-first test-time training (module docstring)."""

    def __init__(self, options: NeuralOptions, *, vocab_size: int):
        from ..models.lora import parse_roles

        self._roles = parse_roles(options.ttt_params, options.ttt)
        self._adaptation = None  # built on the first ``begin`` (the parent's constructor calls it)
        super().__init__(options, vocab_size=vocab_size)
        if options.ttt_chunk > self.window:
            raise CtxmixError(f"spec {self.spec!r}: ttt_chunk {options.ttt_chunk} is larger than the window {self.window}")

    @property
    def _docs_matter(self) -> bool:
        return self.options.ttt_reset == "doc" or self.options.ttt_context == "doc"

    # -- the adaptation and its optimizer ---------------------------------------------------------------

    def _reset_adaptation(self) -> None:
        """Adapters or weights back to their start, a fresh optimizer, and every cache made stale."""
        torch = self._torch
        from ..models.lora import ALL, Adaptation

        options = self.options
        if self._adaptation is None:
            every_role = ALL in (item.strip() for item in options.ttt_params.split(";"))
            self._adaptation = Adaptation(self.model, options.ttt, self._roles, options.ttt_rank, options.ttt_seed,
                                          every_role=every_role)
        self._adaptation.reset()
        params = self._adaptation.params
        lr = options.ttt_lr if options.ttt_lr >= 0 else TTT_DEFAULT_LR[options.ttt]
        if options.ttt_opt == "adam":
            self._optimizer = torch.optim.Adam(params, lr=lr, betas=(options.ttt_momentum, ADAM_BETA2), eps=ADAM_EPS)
        else:
            self._optimizer = torch.optim.SGD(params, lr=lr, momentum=options.ttt_momentum)
        self._version = getattr(self, "_version", 0) + 1  # the weights' identity, for the stepwise KV cache

    # -- one chunk --------------------------------------------------------------------------------------

    def _chunk_end(self, start: int) -> int:
        """One past the last position of the chunk that starts at ``start`` (the stream's tokens known)."""
        stop = min(start + self.options.ttt_chunk, len(self._tokens))
        if self._docs_matter:
            hits = np.flatnonzero(self._tokens[start:stop] == self.options.ttt_doc_token)
            if len(hits):
                stop = start + int(hits[0]) + 1
        return stop

    def _ends_chunk(self, start: int, position: int) -> bool:
        """Does the chunk that starts at ``start`` end with ``position`` (its token known)? ``_chunk_end``,
        one position at a time."""
        if position + 1 >= min(start + self.options.ttt_chunk, len(self._tokens)):
            return True
        return self._docs_matter and int(self._tokens[position]) == self.options.ttt_doc_token

    def _will_learn(self, end: int) -> bool:
        """Whether the chunk ending at ``end`` is learned from (module docstring, step 2)."""
        if end >= len(self._tokens):
            return False
        return not (self.options.ttt_reset == "doc" and int(self._tokens[end - 1]) == self.options.ttt_doc_token)

    def _context_start(self, start: int, doc: int) -> int:
        """``ttt_context=doc``: first input position of the chunk starting at ``start`` in document ``doc``."""
        return max(doc, start + self.options.ttt_chunk - 1 - self.window)

    def _layout(self, start: int, end: int, doc: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Inputs int64[B, T] for positions ``start .. end - 1``, and per position (in order) its input
        row's index in the batch and the row (int64[R] each). Only tokens < end - 1 are read. The inputs'
        shape never depends on where a chunk ends, which the tokens after it decide (a document's first
        token); the head's rows do not either (``head_in_blocks``)."""
        n = len(self._tokens)
        positions = np.arange(start, end, dtype=np.int64)
        if self.options.ttt_context == "window":
            plan = self._plan
            nominal_end = min(start + self.options.ttt_chunk, n)
            first = plan.window_of(start)
            ks = np.arange(first, plan.window_of(nominal_end - 1) + 1, dtype=np.int64)
            starts = ks * plan.stride
            lengths = np.minimum(starts + plan.window, n - 1) - starts
            width = plan.padded_len
            k = np.maximum(0, -(-(positions - plan.window) // plan.stride))  # WindowPlan.window_of, vectorized
            which = k - first
        else:
            a = self._context_start(start, doc)
            width = start + self.options.ttt_chunk - 1 - a
            starts = np.array([a], dtype=np.int64)
            lengths = np.array([width], dtype=np.int64)
            which = np.zeros(len(positions), dtype=np.int64)
        offsets = np.arange(width, dtype=np.int64)
        index = starts[:, None] + offsets[None, :]
        known = (offsets[None, :] < lengths[:, None]) & (index < end - 1)
        x = np.where(known, self._tokens[np.minimum(index, n - 1)], 0)  # zero padding, as the static windows
        rows = positions - 1 - starts[which]
        return x, which, rows

    def _forward(self, start: int, end: int, doc: int, grad: bool):
        """float64 log-softmax rows (R, V) of positions ``start .. end - 1`` with the current weights, as a
        torch tensor on the model's device (with its autograd graph when ``grad``)."""
        torch = self._torch
        x, which, rows = self._layout(start, end, doc)
        with torch.set_grad_enabled(grad), self._autocast():
            logits = rows_logits(self._adaptation.model, torch.from_numpy(x).to(self.device), which, rows)
            return torch.log_softmax(logits.double(), dim=-1)

    def _learn(self, start: int, end: int, doc: int, lp=None) -> None:
        """``ttt_steps`` optimizer steps on the mean log loss of positions ``start .. end - 1``; ``lp``: the
        graph of the chunk's scoring forward, used by the first step (None: computed here)."""
        torch = self._torch
        targets = torch.as_tensor(self._tokens[start:end], device=self.device)
        for step in range(self.options.ttt_steps):
            if lp is None or step > 0:
                lp = self._forward(start, end, doc, grad=True)
            loss = -lp[torch.arange(end - start, device=self.device), targets].mean()
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._optimizer.step()
        self._version += 1

    def _run_chunk(self, start: int, end: int, doc: int) -> None:
        """Score positions ``start .. end - 1``, then learn from them (module docstring)."""
        learn = self._will_learn(end)
        lp = self._forward(start, end, doc, grad=learn)
        self._keep(start, lp.detach().cpu().numpy())  # fixed now, before any update that uses these tokens
        if learn:
            self._learn(start, end, doc, lp)

    def _finish_chunk(self, end: int, doc: int) -> None:
        """After the chunk ending at ``end``: reset at a document's end (``ttt_reset=doc``), move on."""
        ends_doc = self._docs_matter and int(self._tokens[end - 1]) == self.options.ttt_doc_token
        if ends_doc and self.options.ttt_reset == "doc":
            self._reset_adaptation()
        self._next = (end, end - 1 if ends_doc else doc)

    def _compute_next_chunk(self) -> None:
        start, doc = self._next
        end = self._chunk_end(start)
        self._run_chunk(start, end, doc)
        self._finish_chunk(end, doc)

    def _keep(self, first: int, lp: np.ndarray) -> None:
        """Store log p(target) and the entropy of rows for positions first .. first + R - 1, and keep the
        rows for the full path."""
        positions = np.arange(first, first + len(lp))
        self._logp[positions] = lp[np.arange(len(lp)), self._tokens[positions]]
        self._entropy[positions] = _entropy(lp)
        self._known_until = max(self._known_until, first + len(lp))
        self._rows = (first, lp)

    def _rows_holding(self, position: int) -> tuple[int, np.ndarray]:
        """(first position, lp rows) of the chunk holding ``position``: the last one computed, or the next."""
        while self._rows is None or not self._rows[0] <= position < self._rows[0] + len(self._rows[1]):
            if self._next[0] > position:
                raise CtxmixError(f"neural expert (ttt): the rows of position {position} were computed and dropped; "
                                  "score_chunk must be called in stream order")
            self._compute_next_chunk()
        return self._rows

    # -- Expert protocol ---------------------------------------------------------------------------------

    def begin(self, tokens: np.ndarray) -> None:
        self._set_stream(tokens)
        n = len(self._tokens)
        self._plan = WindowPlan(n, self.window, self.options.stride, 1)
        self._logp = np.zeros(n)  # float64[N]: log p(target), filled chunk by chunk
        self._entropy = np.zeros(n)  # float64[N]: entropy (nats) of each position's distribution
        if n:
            self._logp[0] = -math.log(self.vocab_size)  # position 0: context only, uniform
            self._entropy[0] = math.log(self.vocab_size)
        self._known_until = 1  # positions < this have logp/entropy
        self._rows: tuple[int, np.ndarray] | None = None
        self._next = (1, 0)  # the next chunk's first position, and the position of its document's first token
        self._reset_adaptation()
        self._path: str | None = None  # "chunked" or "stepwise": one stream is scored one way
        self._pos = 0
        self._cache = None  # stepwise KV cache, and (context start, weights version) it was built for
        self._cache_key: tuple[int, int] | None = None
        self._step_memo: tuple[int, np.ndarray, float] | None = None
        rank, world = distributed_rank_world()
        if world > 1 and n >= 2 and self.options.ttt_reset == "doc":
            self._begin_distributed(rank, world)

    def _claim(self, path: str) -> None:
        if self._path is None:
            self._path = path
        elif self._path != path:
            raise CtxmixError("neural expert (ttt): a stream is scored either by score_chunk or by "
                              "next_distribution/observe, not both (begin again to switch)")

    def _begin_distributed(self, rank: int, world: int) -> None:
        """Documents (independent with ``ttt_reset=doc``) split between the ranks by their first position;
        each rank computes its own, and the sums give every rank all positions."""
        import torch.distributed as dist

        torch = self._torch
        ensure_process_group(self.device.type)
        n = len(self._tokens)
        ends = np.flatnonzero(self._tokens[1 : n - 1] == self.options.ttt_doc_token) + 1  # positions of doc tokens
        firsts = np.concatenate([[1], ends + 1])  # each document's first scored position
        docs = np.concatenate([[0], ends])  # and the position of the token that opened it
        lo, hi = (n - 1) * rank // world, (n - 1) * (rank + 1) // world
        for i in np.flatnonzero((firsts - 1 >= lo) & (firsts - 1 < hi)):
            stop = int(firsts[i + 1]) if i + 1 < len(firsts) else n
            self._next = (int(firsts[i]), int(docs[i]))
            self._reset_adaptation()
            while self._next[0] < stop:
                self._compute_next_chunk()
        mine = torch.from_numpy(np.stack([self._logp, self._entropy]))  # float64[2, N]
        if rank != 0:
            mine[:, 0] = 0.0  # position 0's constants are counted once, from rank 0
        mine = mine.to(self.device) if self.device.type == "cuda" else mine
        dist.all_reduce(mine, op=dist.ReduceOp.SUM)
        both = mine.cpu().numpy()
        self._logp, self._entropy = both[0].copy(), both[1].copy()
        self._known_until = n
        self._rows = None  # a full path recomputes from the start, in order
        self._next = (1, 0)
        self._reset_adaptation()

    def score_chunk(self, tokens, *, full=False, want=()):
        self._claim("chunked")
        tokens = np.asarray(tokens, dtype=np.int64)
        start, end = self._chunk_span(tokens)
        p = None
        if full:
            p = chunk_distributions(start, end, self.vocab_size, self._rows_holding)
        else:
            while self._known_until < end:
                self._compute_next_chunk()
        self._pos = end
        features = {FEATURE_ENTROPY: self._entropy[start:end].copy()} if FEATURE_ENTROPY in want else {}
        return ExpertOutput(self._logp[start:end].copy(), p, features)

    # -- stepwise protocol ---------------------------------------------------------------------------------

    def _step_logits(self, position: int):
        """Logits (V,) for ``position`` from its context (tokens < position) with the current weights."""
        torch = self._torch
        model = self._adaptation.model
        chunk_start, doc = self._next
        if self.options.ttt_context == "window":
            context = self._plan.window_of(position) * self._plan.stride
        else:
            context = self._context_start(chunk_start, doc)
        with torch.no_grad(), self._autocast():
            if not getattr(model, "supports_kv_cache", False):
                x = torch.as_tensor(self._tokens[context:position], device=self.device)[None, :]
                return model(x)[0, -1]
            key = (context, self._version)
            if self._cache is None or self._cache_key != key or context + self._cache.length > position:
                # The weights or the context changed: one prefill of everything up to here.
                self._cache = model.new_cache()
                self._cache_key = key
                self._cache_logits = self._feed(model, self._tokens[context:position])
            while context + self._cache.length < position:
                at = context + self._cache.length
                self._cache_logits = self._feed(model, self._tokens[at : at + 1])
            return self._cache_logits

    def _feed(self, model, ids: np.ndarray):
        """Logits (V,) after ``ids`` continue the sequence the KV cache holds (the cache is extended)."""
        x = self._torch.as_tensor(ids, dtype=self._torch.int64, device=self.device)[None, :]
        if getattr(model, "supports_last_rows", False):
            return model.head(model.hidden(x, self._cache, last=1))[0, -1]
        return model(x, self._cache)[0, -1]

    def next_distribution(self, want=()):
        """float64[V] for the next position (tokens < it observed), and its features; no state change."""
        self._claim("stepwise")
        position = self._pos
        if self._step_memo is None or self._step_memo[0] != position:
            if position == 0:
                p = np.full(self.vocab_size, 1.0 / self.vocab_size)
                entropy = math.log(self.vocab_size)
            else:
                lp = self._torch.log_softmax(self._step_logits(position).double(), dim=-1).cpu().numpy()
                p, entropy = np.exp(lp), float(_entropy(lp[None, :])[0])
            self._step_memo = (position, p, entropy)
        _, p, entropy = self._step_memo
        features = {FEATURE_ENTROPY: entropy} if FEATURE_ENTROPY in want else {}
        return p.copy(), features

    def observe(self, token: int) -> None:
        self._claim("stepwise")
        position = self._pos
        if position >= len(self._tokens):
            raise CtxmixError(f"neural expert (ttt): observed past the {len(self._tokens)} tokens given to begin "
                              "(its windows are sized by the stream's length)")
        if not 0 <= int(token) < self.vocab_size:
            raise CtxmixError(f"neural expert: observed token {token} is outside the vocabulary 0..{self.vocab_size - 1}")
        self._tokens[position] = int(token)
        self._pos += 1
        if position == 0:
            return  # context only
        start, doc = self._next
        if self._ends_chunk(start, position):
            end = position + 1
            if self._will_learn(end):
                self._learn(start, end, doc)  # the chunked path's step, from the same tokens
            self._finish_chunk(end, doc)

    # -- the rest ------------------------------------------------------------------------------------------

    def coding_refusal(self) -> str | None:
        if self.device.type != "cpu":
            return (f"its test-time training on {self.device.type} is not bit-reproducible (GPU backward kernels "
                    "may sum in any order), so a decoder could not repeat its updates; use device=cpu")
        return None

    def memory_bytes(self) -> int:
        state = self._adaptation.state_bytes() if self._adaptation is not None else 0
        optimizer = sum(t.numel() * t.element_size() for s in self._optimizer.state.values()
                        for t in s.values() if hasattr(t, "numel"))
        return super().memory_bytes() + state + optimizer
