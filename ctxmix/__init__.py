"""ctxmix: honest eval-time compression with neural and n-gram experts.

    import ctxmix
    report = ctxmix.score(["alice29.txt"], experts=["ngram"], mixers=["none"])
    report.runs  # [{"label", "file", "tokens", "bytes", "bits", "bpb"}, ...]
"""

__version__ = "0.1.0"

from .errors import CtxmixError  # noqa: E402


def __getattr__(name):
    # The API imports numba kernels; keep ``import ctxmix`` itself light (``ctxmix --version`` is instant).
    if name in ("score", "evaluate", "mix", "Report"):
        from . import api

        return getattr(api, name)
    if name in ("compress", "decompress"):
        from . import codec

        return getattr(codec, name)
    raise AttributeError(f"module 'ctxmix' has no attribute {name!r}")


__all__ = ["CtxmixError", "score", "evaluate", "mix", "Report", "compress", "decompress", "__version__"]
