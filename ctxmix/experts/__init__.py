"""Experts: online predictors over the vocabulary, looked up by spec string (``ngram:orders=2-6``).

The registry lives in ``ctxmix.components`` (with the mixers' and the defaults); ``registry`` here is the
same object, so that ``from ctxmix.experts import registry`` keeps working without this package importing
its modules (the neural expert's imports torch).
"""


def __getattr__(name: str):
    if name == "registry":
        from ..components import experts

        return experts
    raise AttributeError(f"module 'ctxmix.experts' has no attribute {name!r}")
