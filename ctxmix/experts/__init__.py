"""Experts: online predictors over the vocabulary, looked up by spec string (``ngram:orders=2-6``)."""

from ..spec import Registry

registry = Registry("expert")

# Importing a module registers its expert. The neural expert is lazy so n-gram-only runs never import torch.
from . import ngram, uniform, unigram  # noqa: E402,F401

registry.register_lazy("neural", "ctxmix.experts.neural:NeuralExpert", "a trained Parameter Golf model (.ptz artifact)")
registry.freeze()
