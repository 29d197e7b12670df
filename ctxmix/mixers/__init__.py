"""Mixers: combine experts into one distribution, looked up by spec string (``hedge:eta=2``).

The registry lives in ``ctxmix.components`` (with the experts' and the defaults); ``registry`` and
``NONE`` here are the same objects.
"""


def __getattr__(name: str):
    if name in ("registry", "NONE"):
        from .. import components

        return components.mixers if name == "registry" else components.NONE
    raise AttributeError(f"module 'ctxmix.mixers' has no attribute {name!r}")
