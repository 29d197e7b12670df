"""Mixers: combine experts into one distribution, looked up by spec string (``hedge:eta=2``)."""

from ..spec import Registry

registry = Registry("mixer")

# "none" is not a mixer: it asks the engine for one row per expert alone.
NONE = "none"

for _module in ("fixed", "hedge", "fixedshare", "adaptive", "pr909", "geometric"):
    try:
        __import__(f"{__name__}.{_module}")
    except ModuleNotFoundError as _exc:  # pragma: no cover - only while a module is being written
        if _exc.name != f"{__name__}.{_module}":
            raise
registry.freeze()
