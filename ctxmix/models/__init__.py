"""Neural model families and artifact loading.

A family is a module with:
  ``NAME``                          its name (``baseline``, ``repeat``, ``record``)
  ``Config``                        a frozen dataclass of hyperparameters
  ``detect(state_dict) -> bool``    do these keys look like this family?
  ``infer_config(state_dict)``      Config from key names and shapes; CtxmixError naming the key or shape
                                    that does not fit
  ``Model(config)``                 a torch module: ``forward(idx LongTensor[B, T]) -> logits [B, T, V]``.
                                    Optional, used by the neural expert when present: ``hidden(idx, cache=None)``
                                    + ``head(h)`` (so only scored rows go through the head), and
                                    ``supports_kv_cache`` + ``new_cache()`` + ``forward(idx, cache)`` for
                                    incremental decoding; ``set_attention_backend("sdpa" | "flash")``.

  ``BOUNDS``                        {Config field: (lo, hi)} for values from outside the weights
  ``SHAPE_FIELDS``                  Config fields the weights' shapes decide

Families are tried in ``FAMILY_MODULES`` order, most specific first. Hyperparameters the weights do not
show (``train_seq_len``, ``rope_base``, ``logit_softcap``, ...) come from the artifact's metadata
(``artifact.META_KEY``, written by ctxmix_train) when present, else the Config defaults (the challenge's),
and can be overridden by the caller (the neural expert's spec options).

Metadata is untrusted like the rest of the file. Every value from it or from the caller must have its
field's type, be finite and lie within the family's ``BOUNDS`` (``spec.check_fields``, the check spec
options use); a shape field must equal what the weights give; and the model the final config describes
must hold exactly the weights' keys and shapes (checked on the meta device, so nothing is allocated).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from ..errors import CtxmixError
from ..spec import check_fields, format_value
from .artifact import ARTIFACT_CAP_BYTES, Artifact, read_artifact
from .keys import check_keys

FAMILY_MODULES = ("record", "repeat", "baseline")  # detection order: most specific first
META_FAMILY = "family"  # metadata key naming the family the writer used
INFO_META_KEYS = frozenset({META_FAMILY})  # metadata keys that are not Config fields but are understood


def families() -> list[ModuleType]:
    """The family modules that exist (``record`` is written separately and may be absent)."""
    found = []
    for name in FAMILY_MODULES:
        try:
            found.append(importlib.import_module(f"{__name__}.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    return found


def get_family(name: str) -> ModuleType:
    for module in families():
        if module.NAME == name:
            return module
    known = ", ".join(m.NAME for m in families())
    raise CtxmixError(f"unknown model family {name!r} (known: {known})")


def detect_family(state_dict: dict) -> ModuleType:
    """The first family whose ``detect`` accepts these keys."""
    for module in families():
        if module.detect(state_dict):
            return module
    keys = ", ".join(sorted(state_dict)[:4])
    names = ", ".join(m.NAME for m in families())
    raise CtxmixError(f"unknown architecture: no family ({names}) recognizes keys {keys}, ...")


def apply_overrides(config, values: dict, source: str):
    """``config`` with the fields named in ``values`` replaced; a value of the wrong type raises."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    updates = {}
    for key, value in values.items():
        if key not in fields:
            continue
        current = getattr(config, key)
        if isinstance(current, bool):
            ok = isinstance(value, bool)
        elif isinstance(current, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(current, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            try:
                value = float(value) if ok else value
            except OverflowError:  # an int beyond any float
                raise CtxmixError(f"{source}: {key}={format_value(value)} is out of range") from None
        else:
            ok = isinstance(value, type(current))
        if not ok:
            raise CtxmixError(f"{source}: {key}={value!r} is not a {type(current).__name__}")
        updates[key] = value
    return dataclasses.replace(config, **updates)


@dataclass
class LoadedModel:
    """A model built from an artifact, in eval mode with float32 parameters on the CPU."""

    family: str
    config: object  # the family's Config
    model: nn.Module
    artifact: Artifact


def configure(family: ModuleType, state_dict: dict, config, values: dict, source: str):
    """``config`` (inferred from ``state_dict``'s shapes) with ``values`` applied, each checked: its type,
    finite and within ``family.BOUNDS``, equal to the weights for a shape field; then the whole config
    against the weights' keys and shapes. ``source`` names where the values came from."""
    updated = apply_overrides(config, values, source)
    check_fields(updated, source, family.BOUNDS)
    for name in family.SHAPE_FIELDS:
        if getattr(updated, name) != getattr(config, name):
            raise CtxmixError(f"{source}: {name}={getattr(updated, name)!r} contradicts the weights, which give "
                              f"{name}={getattr(config, name)!r}")
    try:
        with torch.device("meta"):  # shapes only: no memory for the weights
            expected = {key: tuple(t.shape) for key, t in family.Model(updated).state_dict().items()}
    except (ValueError, RuntimeError) as exc:  # a constructor's own check, or torch's
        raise CtxmixError(f"{source}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    check_keys(state_dict, expected, family.NAME)
    return updated


def _infer(artifact: Artifact) -> tuple[ModuleType, object]:
    # Our own artifacts name their family; a record-stack model with its optional parts off has the keys of
    # the baseline, so the name decides. Foreign artifacts are recognised by their keys.
    named = artifact.meta.get(META_FAMILY)
    family = get_family(str(named)) if named is not None else detect_family(artifact.state_dict)
    config = family.infer_config(artifact.state_dict)
    return family, configure(family, artifact.state_dict, config, artifact.meta, "artifact metadata")


def load_model(path: str | os.PathLike, overrides: dict | None = None, module: str = "") -> LoadedModel:
    """Read ``path``, infer its family and config, build the model and load the weights (strict); or,
    with ``module``, let that adapter build it (``models/adapter.py``)."""
    if module:
        from .adapter import load_adapted

        if overrides:
            raise CtxmixError(f"{', '.join(sorted(overrides))}: an option of the built-in families; a model from "
                              f"module {module!r} reads its own from the artifact's metadata")
        return load_adapted(path, module)
    artifact = read_artifact(path)
    try:
        family, config = _infer(artifact)
        if overrides:
            config = configure(family, artifact.state_dict, config, overrides, "options")
        model = family.Model(config)
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in artifact.state_dict.items()}
        model.load_state_dict(state, strict=True)
    except CtxmixError as exc:
        raise CtxmixError(f"artifact {artifact.path}: {exc}") from None
    except (RuntimeError, ValueError) as exc:  # load_state_dict / constructor checks: keys or shapes
        raise CtxmixError(f"artifact {artifact.path}: {str(exc).splitlines()[0]}") from None
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(family.NAME, config, model, artifact)


def describe(path: str | os.PathLike) -> dict:
    """What ``ctxmix info`` prints: family, shape, parameter count, format and size against the cap."""
    artifact = read_artifact(path)
    try:
        family, config = _infer(artifact)
    except CtxmixError as exc:
        raise CtxmixError(f"artifact {artifact.path}: {exc}") from None
    with torch.device("meta"):
        model = family.Model(config)
    effective = len(getattr(model, "schedule", range(config.num_layers)))
    params = sum(int(t.numel()) for t in artifact.state_dict.values())
    return {
        "path": artifact.path,
        "family": family.NAME,
        "layers": config.num_layers,
        "effective_layers": effective,
        "dim": config.model_dim,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "vocab": config.vocab_size,
        "params": params,
        "format": artifact.format,
        "value_bits": artifact.value_bits,
        "compression": artifact.compression,
        "compressed_bytes": artifact.compressed_bytes,
        "raw_bytes": artifact.raw_bytes,
        "cap_bytes": ARTIFACT_CAP_BYTES,
        "fits_cap": artifact.compressed_bytes <= ARTIFACT_CAP_BYTES,
        "train_seq_len": config.train_seq_len,
        "train_seq_len_from": "metadata" if "train_seq_len" in artifact.meta else "default",
        "meta": dict(artifact.meta),
    }


__all__ = ["FAMILY_MODULES", "LoadedModel", "apply_overrides", "configure", "describe", "detect_family", "families",
           "get_family", "load_model"]
