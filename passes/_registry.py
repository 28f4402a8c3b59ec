"""The pass registry: built-in passes and third-party ones (decorator or ``passes.plugins`` entry points)."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from ._base import Pass, PassError

__all__ = ["register_pass", "get_pass_class", "registered_passes"]

_REGISTRY: dict[str, type[Pass]] = {}
_LOADED = False

#: Modules holding the built-in passes; imported on first lookup so start-up stays cheap.
_BUILTIN_MODULES = (
    "passes.dead_flow",
    "passes.fold_constants",
    "passes.simplify",
    "passes.fuse_gelu",
    "passes.fuse_layer_norm",
    "passes.fuse_embed_layer_norm",
    "passes.fuse_attention",
    "passes.fuse_rotary",
    "passes.quantize",
)


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to pipeline strings under ``cls.name``."""
    name = getattr(cls, "name", "")
    if not name or name != name.lower() or " " in name:
        raise PassError(f"pass class {cls.__name__} needs a kebab-case `name`, got {name!r}")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise PassError(f"two passes are named {name!r}: {existing.__module__} and {cls.__module__}")
    _REGISTRY[name] = cls
    return cls


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a real import error inside an existing module
                raise
    for ep in entry_points(group="passes.plugins"):
        obj = ep.load()
        if isinstance(obj, type) and issubclass(obj, Pass):
            register_pass(obj)


def get_pass_class(name: str) -> type[Pass]:
    """The pass class registered as ``name``.

    Raises:
        PassError: with the list of known passes.
    """
    _load()
    cls = _REGISTRY.get(name)
    if cls is None:
        known = ", ".join(sorted(_REGISTRY))
        raise PassError(f"unknown pass {name!r} (known passes: {known})")
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """All registered passes by name."""
    _load()
    return dict(sorted(_REGISTRY.items()))
