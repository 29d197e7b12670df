"""Experts: online predictors over the vocabulary, looked up by spec string (``ngram:orders=2-6``)."""

from ..spec import Registry

registry = Registry("expert")

# Importing a module registers its expert. The neural expert is lazy so n-gram-only runs never import torch.
from . import uniform  # noqa: E402,F401

for _module in ("unigram", "ngram"):
    try:
        __import__(f"{__name__}.{_module}")
    except ModuleNotFoundError as _exc:  # pragma: no cover - only while a module is being written
        if _exc.name != f"{__name__}.{_module}":
            raise

registry.register_lazy("neural", "ctxmix.experts.neural:NeuralExpert", "a trained Parameter Golf model (.ptz artifact)")
registry.freeze()
