"""Mixers: combine experts into one distribution, looked up by spec string (``hedge:eta=2``)."""

from ..spec import Registry

registry = Registry("mixer")

# "none" is not a mixer: it asks the engine for one row per expert alone.
NONE = "none"

# Importing a module registers its mixer.
from . import adaptive, cm, fixed, fixedshare, geometric, hedge, pr909, tilt  # noqa: E402,F401

registry.freeze()
