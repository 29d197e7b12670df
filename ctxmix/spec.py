"""Spec strings and registries: ``name:key=value,key=value`` -> a configured expert or mixer.

One grammar serves the CLI, the Python API and the JSON report, so a row label can always be fed back
to rebuild the run. Options live in frozen dataclasses; every field has a type, a default and a one-line
``help`` in its metadata. Parsing refuses unknown keys and values that do not parse to the field's type.

Field metadata understood here:
  help        one line for ``--help`` style listings
  label       True: always printed in the canonical spec (e.g. ngram's ``orders`` and ``table``)
  positional  True: items without ``=`` collect into this field (``fixed:0.7,0.3``)
  choices     allowed values for a str field
  min, max    inclusive numeric bounds (for ranges and tuples: every element)

Numbers are checked in one place, ``check_number``, for every source of them: spec options here, model
hyperparameters from an artifact's metadata (``ctxmix.models``), training configs (``ctxmix_train.config``)
and the sizes in a ``.cmx`` header (``ctxmix.codec``). A float must be finite; a number must lie within its
field's bounds, and a field that states none is still held to ``FLOAT_LIMIT`` / ``INT_LIMIT``, so no
value can overflow the arithmetic it feeds (``hedge:eta=1e308`` made every weight NaN).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import typing
from collections.abc import Mapping
from typing import Any

from .errors import CtxmixError

IntRange = tuple[int, int]  # written "2-11" (or a single "5" meaning 5-5)

# Bounds of a number whose field states none. 1e9 times any loss a model can report (at most 745 nats:
# -log of the smallest positive float64) stays far from overflow over any stream; 2**31 - 1 fits every
# int32 index and count the kernels use.
FLOAT_LIMIT = 1e9
INT_LIMIT = (1 << 31) - 1


def split_spec(spec: str) -> tuple[str, list[str]]:
    """``"ngram:orders=2-6,table=hashed"`` -> ``("ngram", ["orders=2-6", "table=hashed"])``."""
    spec = spec.strip()
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise CtxmixError(f"empty spec {spec!r}: expected name or name:key=value,...")
    items = [item.strip() for item in rest.split(",")] if rest.strip() else []
    if any(not item for item in items):
        raise CtxmixError(f"spec {spec!r}: empty item between commas")
    return name, items


def _field_types(options_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(options_cls)


def _parse_scalar(kind: Any, text: str) -> Any:
    if kind is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if kind is int:
        return int(text.replace("_", ""))
    if kind is float:
        return float(text)
    if kind is str:
        return text
    raise TypeError(f"unsupported option type {kind!r}")


def _parse_value(kind: Any, text: str) -> Any:
    if kind == IntRange:
        lo, sep, hi = text.partition("-")
        lo_value = int(lo)
        return (lo_value, int(hi) if sep else lo_value)
    origin = typing.get_origin(kind)
    if origin is tuple:  # tuple[float, ...] written "a;b;c" as a keyed option
        (elem, _ellipsis) = typing.get_args(kind)
        return tuple(_parse_scalar(elem, part) for part in text.split(";") if part)
    return _parse_scalar(kind, text)


SHOWN_INT_BITS = 256  # a larger int (from a pickle or JSON) is shown by its size: str() of it may refuse


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value.bit_length() > SHOWN_INT_BITS:
        return f"{'-' if value < 0 else ''}(an integer of {value.bit_length()} bits)"
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value) or abs(value) >= 1e16:
            return repr(value)
        return f"{value:g}"
    if isinstance(value, tuple):
        if len(value) == 2 and all(isinstance(v, int) for v in value):
            return f"{value[0]}-{value[1]}"
        return ";".join(format_value(v) for v in value)
    return str(value)


def check_number(name: str, value: Any, where: str, lo: float | None = None, hi: float | None = None) -> None:
    """Refuse (one CtxmixError line naming ``where``) a number that is not finite or not within [lo, hi].

    Without ``lo``/``hi`` the bounds are +-FLOAT_LIMIT for floats and +-INT_LIMIT for ints. Booleans
    and non-numbers pass: their type is checked where they are parsed.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise CtxmixError(f"{where}: {name}={format_value(value)} is not a finite number")
    limit = FLOAT_LIMIT if isinstance(value, float) else INT_LIMIT
    low = -limit if lo is None else lo
    high = limit if hi is None else hi
    if value < low:
        raise CtxmixError(f"{where}: {name}={format_value(value)} is out of range (minimum {format_value(low)})")
    if value > high:
        raise CtxmixError(f"{where}: {name}={format_value(value)} is out of range (maximum {format_value(high)})")


def _field_bounds(f: dataclasses.Field, bounds: Mapping[str, tuple] | None) -> tuple[Any, Any]:
    if bounds is not None and f.name in bounds:
        return bounds[f.name]
    return f.metadata.get("min"), f.metadata.get("max")


def check_fields(obj: Any, where: str, bounds: Mapping[str, tuple] | None = None) -> None:
    """``check_number`` on every numeric field of the dataclass ``obj`` (every element of a tuple field).

    A field's bounds are ``bounds[name]`` (``(lo, hi)``, either may be None) when given, else its
    metadata's ``min`` / ``max``.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        lo, hi = _field_bounds(f, bounds)
        for v in value if isinstance(value, tuple) else (value,):
            check_number(f.name, v, where, lo, hi)


def _check_bounds(name: str, spec: str, meta: dict, value: Any) -> None:
    for v in value if isinstance(value, tuple) else (value,):
        check_number(name, v, f"spec {spec!r}", meta.get("min"), meta.get("max"))
    if "choices" in meta and value not in meta["choices"]:
        raise CtxmixError(f"spec {spec!r}: {name}={value} is not one of {', '.join(meta['choices'])}")


def parse_options(options_cls: type, items: list[str], spec: str) -> Any:
    """Fill ``options_cls`` from ``key=value`` items (and positional items, if a field takes them)."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    types = _field_types(options_cls)
    positional = [f for f in fields.values() if f.metadata.get("positional")]
    values: dict[str, Any] = {}
    loose: list[str] = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            loose.append(item)
            continue
        key = key.strip()
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise CtxmixError(f"spec {spec!r}: unknown option {key!r} (options: {known})")
        if key in values:
            raise CtxmixError(f"spec {spec!r}: option {key!r} given twice")
        try:
            values[key] = _parse_value(types[key], text.strip())
        except (ValueError, TypeError):
            raise CtxmixError(f"spec {spec!r}: bad value {key}={text!r} ({_type_name(types[key])} expected)") from None
    if loose:
        if not positional:
            raise CtxmixError(f"spec {spec!r}: {loose[0]!r} is not key=value")
        target = positional[0]
        (elem, _ellipsis) = typing.get_args(types[target.name])
        try:
            values[target.name] = tuple(_parse_scalar(elem, text) for text in loose)
        except ValueError:
            raise CtxmixError(f"spec {spec!r}: bad value in {','.join(loose)!r} ({_type_name(elem)} expected)") from None
    for key, value in values.items():  # given values only: defaults are in range by construction
        _check_bounds(key, spec, fields[key].metadata, value)
    try:
        return options_cls(**values)
    except CtxmixError as exc:
        raise CtxmixError(f"spec {spec!r}: {exc}") from None


def _type_name(kind: Any) -> str:
    if kind == IntRange:
        return "range like 2-11"
    if typing.get_origin(kind) is tuple:
        return "list of numbers"
    return getattr(kind, "__name__", str(kind))


def _load(target: str, what: str) -> Any:
    """The object ``"module:attr"`` names; a module that fails to import is one CtxmixError line."""
    module_name, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except CtxmixError:
        raise
    except Exception as exc:  # the plugin's own failure, reported at the boundary
        raise CtxmixError(f"cannot load {what} from {target}: {type(exc).__name__}: {exc}") from None


def canonical_spec(name: str, options: Any) -> str:
    """The spec string that rebuilds ``options``: label fields always, others only when not default."""
    if options is None:
        return name
    parts: list[str] = []
    positional = ""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if f.metadata.get("positional"):
            positional = ",".join(format_value(v) for v in value)
            continue
        if f.metadata.get("label") or value != default:
            parts.append(f"{f.name}={format_value(value)}")
    body = ",".join(p for p in [positional, *parts] if p)
    return f"{name}:{body}" if body else name


def option_help(options_cls: type | None) -> list[tuple[str, str, str]]:
    """``[(name, default, help)]`` for listings."""
    if options_cls is None:
        return []
    rows = []
    for f in dataclasses.fields(options_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f.name, format_value(default), f.metadata.get("help", "")))
    return rows


@dataclasses.dataclass
class _Entry:
    target: Any  # the class, or a "module:attr" string until first use
    summary: str  # one line for listings ("" for an entry point: its class docstring, once loaded)
    origin: str = "ctxmix"  # who registered it: ctxmix, or the distribution of an entry point


class Registry:
    """Maps names to expert or mixer classes. Each class has ``Options`` (a dataclass or None) and is
    constructed as ``cls(options, **context)``; ``build(spec, **context)`` does the parsing.

    Entries are ``"module:attr"`` strings imported on first use (so n-gram-only runs never import torch).
    ``entry_points``: the group of installed packages' entry points (``name = "module:attr"``) added to the
    registry the first time it is read, after which it is frozen. ``base``: ``"module:attr"`` of the class
    every entry must subclass (checked when an entry is loaded: a plugin's class is the user's code).
    """

    def __init__(self, kind: str, *, entry_points: str | None = None, base: str | None = None):
        self.kind = kind
        self.entry_points = entry_points
        self._base = base
        self._entries: dict[str, _Entry] = {}
        self._frozen = False

    def register_lazy(self, name: str, target: str, summary: str, origin: str = "ctxmix") -> None:
        """Register ``"module:attr"``, imported on first use."""
        if self._frozen:
            raise RuntimeError(f"{self.kind} registry is frozen; cannot add {name!r}")
        if name in self._entries:
            raise CtxmixError(f"{self.kind} {name!r} is registered twice ({self._entries[name].origin} and {origin})")
        self._entries[name] = _Entry(target, summary, origin)

    def _ready(self) -> dict[str, _Entry]:
        """The entries, with the installed entry points added on first use (then frozen)."""
        if not self._frozen:
            self._frozen = True
            if self.entry_points:
                from importlib.metadata import entry_points

                self._frozen = False
                for point in entry_points(group=self.entry_points):
                    origin = f"entry point {point.name} = {point.value} ({point.dist.name if point.dist else '?'})"
                    self.register_lazy(point.name, point.value, "", origin)
                self._frozen = True
        return self._entries

    def names(self) -> list[str]:
        return sorted(self._ready())

    def origin(self, name: str) -> str:
        """Who registered ``name``: ``ctxmix``, or an installed package's entry point."""
        return self._ready()[name].origin

    def summary(self, name: str) -> str:
        """One line for listings, loading nothing: an entry point's is "" until its class is loaded, then
        its docstring's first line."""
        entry = self._ready()[name]
        if entry.summary or isinstance(entry.target, str):
            return entry.summary
        return (entry.target.__doc__ or "").strip().partition("\n")[0]

    def get(self, name: str) -> type:
        entry = self._ready().get(name)
        if entry is None:
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise CtxmixError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())})")
        if isinstance(entry.target, str):
            cls = _load(entry.target, f"{self.kind} {name!r} ({entry.origin})")
            if self._base is not None:
                base = _load(self._base, f"the {self.kind} base class")
                if not (isinstance(cls, type) and issubclass(cls, base)):
                    raise CtxmixError(f"{self.kind} {name!r} ({entry.origin}): {entry.target} is not a subclass of "
                                      f"{base.__module__}.{base.__name__}")
            cls.registry_name = name
            entry.target = cls
        return entry.target

    def parse(self, spec: str) -> tuple[type, Any]:
        """Resolve ``spec`` to ``(cls, options)`` without building anything."""
        name, items = split_spec(spec)
        cls = self.get(name)
        options_cls = getattr(cls, "Options", None)
        if options_cls is None:
            if items:
                raise CtxmixError(f"spec {spec!r}: {self.kind} {name!r} takes no options")
            return cls, None
        return cls, parse_options(options_cls, items, spec)

    def build(self, spec: str, **context: Any) -> Any:
        cls, options = self.parse(spec)
        return cls(options, **context)
