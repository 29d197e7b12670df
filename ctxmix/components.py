"""The registries of experts and mixers, the defaults of a run, and the builders every entry point shares.

Everything that turns spec strings into objects lives here, so the library's entry points (``api``,
``check``, ``codec``, ``trace``) import this module and never each other. Built-in classes are registered
by ``"module:attr"`` and imported on first use: a run without the neural expert never imports torch.
Installed packages add their own through the entry-point groups ``ctxmix.experts`` and ``ctxmix.mixers``
(``name = "package.module:Class"``); they use the same spec grammar and show in ``ctxmix list``.
"""

from __future__ import annotations

import itertools
import os
from typing import Sequence

from .errors import CtxmixError
from .spec import Registry

experts = Registry("expert", entry_points="ctxmix.experts", base="ctxmix.experts.base:Expert")
mixers = Registry("mixer", entry_points="ctxmix.mixers", base="ctxmix.mixers.base:Mixer")

for _name, _target, _summary in [
    ("uniform", "ctxmix.experts.uniform:UniformExpert", "1/V for every token (log2 V bits per token)"),
    ("unigram", "ctxmix.experts.unigram:UnigramExpert", "adaptive add-alpha token frequencies"),
    ("ngram", "ctxmix.experts.ngram:NgramExpert", "interpolated n-gram counts, orders 2..11 (exact or hashed tables)"),
    ("neural", "ctxmix.experts.neural:NeuralExpert", "a trained Parameter Golf model (.ptz artifact)"),
    ("hf", "ctxmix.experts.hf:HFExpert", "a local Hugging Face causal LM with its own tokenizer (extra [hf])"),
]:
    experts.register_lazy(_name, _target, _summary)

for _name, _target, _summary in [
    ("cm", "ctxmix.mixers.cm:CMMixer",
     "context-mixing network: selected linear and geometric mixers, a final mix, SSE (default)"),
    ("fixed", "ctxmix.mixers.fixed:FixedMixer", "constant weights, one per expert (fixed:0.7,0.3), normalized to sum 1"),
    ("hedge", "ctxmix.mixers.hedge:HedgeMixer", "multiplicative weights over the experts (eta=1: Bayesian mixture)"),
    ("fixedshare", "ctxmix.mixers.fixedshare:FixedShareMixer",
     "Hedge with fixed share alpha (tracks a switching best expert)"),
    ("adaptive", "ctxmix.mixers.adaptive:AdaptiveMixer",
     "entropy-adaptive base/n-gram interpolation (Parameter Golf PR #909 form)"),
    ("pr909", "ctxmix.mixers.pr909:PR909Mixer",
     "PR #909: Hedge over the base expert and its adaptive mix with the n-gram expert"),
    ("geometric", "ctxmix.mixers.geometric:GeometricMixer",
     "PAQ-style geometric mixing, weights trained online on log loss (full path)"),
    ("tilt", "ctxmix.mixers.tilt:TiltMixer",
     "PR #2135's n-gram tilt: boost the n-gram's confident top token in the base expert"),
]:
    mixers.register_lazy(_name, _target, _summary)

# "none" is not a mixer: it asks the engine for one row per expert alone.
NONE = "none"
DEFAULT_EXPERTS = ("neural", "ngram")  # neural = the small model shipped in the package
DEFAULT_MIXER = "cm"  # the context-mixing network: the mix of score, eval and compress (docs/mixing.md)
DEFAULT_MIXERS = (NONE, DEFAULT_MIXER)  # each expert alone, then the mix


def build_experts(specs: Sequence[str], vocab_size: int, model: str | os.PathLike | None = None,
                  neural: dict | None = None) -> list:
    """Experts from spec strings; ``model`` puts ``neural:model=PATH`` first (unless a neural spec is given);
    ``neural``: options (``stride``, ``batch_size``, ``device``, ``window``; ``None`` = default) added to
    every neural spec that does not set them."""
    from .experts.neural import with_neural_options

    specs = with_neural_options(specs, model, neural)
    return [experts.build(spec, vocab_size=vocab_size) for spec in specs]


def build_mixers(specs: Sequence[str], built_experts: Sequence) -> tuple[bool, list]:
    """``(expert_rows, mixers)``: ``none`` asks for one row per expert; the rest are built."""
    expert_specs = [e.spec for e in built_experts]
    expert_rows = NONE in specs
    return expert_rows, [mixers.build(s, experts=expert_specs) for s in specs if s.strip() != NONE]


def check_specs(expert_specs: Sequence[str] | None, mixer_specs: Sequence[str] | None) -> None:
    """Parse every spec before any input is read, so a typo fails at once (one line, close matches)."""
    for spec in expert_specs or DEFAULT_EXPERTS:
        experts.parse(spec)
    for spec in mixer_specs or DEFAULT_MIXERS:
        if spec.strip() != NONE:
            mixers.parse(spec)


def run_tokenizer(expert_specs: Sequence[str] | None, tokenizer=None):
    """The one tokenizer a run's streams are made with: ``tokenizer`` (a ``.model`` file, a Hugging Face
    model directory or a tokenizer object; default: the shipped sp1024), or the one an expert brings
    (``Expert.stream_tokenizer``: ``hf:path=DIR`` brings its model's). Every expert then scores that
    vocabulary; two different tokenizers in one run are refused in one line, before any input is read."""
    from .data.tokenizer import resolve_tokenizer

    found = [("--tokenizer", resolve_tokenizer(tokenizer))] if tokenizer is not None else []
    for spec in expert_specs or DEFAULT_EXPERTS:
        cls, options = experts.parse(spec)
        own = cls.stream_tokenizer(options) if hasattr(cls, "stream_tokenizer") else None
        if own is not None:
            found.append((spec, own))
    for (first, a), (second, b) in itertools.pairwise(found):
        if a.sha256 != b.sha256:
            raise CtxmixError(f"one run, one tokenizer: {first} uses {a.name} (vocabulary {a.vocab_size}), "
                              f"{second} uses {b.name} (vocabulary {b.vocab_size})")
    return found[0][1] if found else resolve_tokenizer(None)


def run_text_options(expert_specs: Sequence[str] | None) -> dict:
    """Text-mode options of a run's streams (``data.encode_text``): a run with a pretrained model
    (``Expert.pretrained``: neural, hf) gets no space-run tokens, whose ids such a model never saw in that
    role (docs/tokenizers.md has the measurement); the others keep the default."""
    pretrained = any(getattr(experts.parse(spec)[0], "pretrained", False) for spec in expert_specs or DEFAULT_EXPERTS)
    return {"space_runs": False} if pretrained else {}
