"""The pass registry: built-in passes and third-party ones (decorator or ``passes.plugins`` entry points)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points

from .base import Pass, PassError
from .rules import Rule, RulesPass

__all__ = ["register_pass", "register_rules", "get_pass_class", "registered_passes", "builtin_pass_modules",
           "PASS_PACKAGES"]

_REGISTRY: dict[str, type[Pass]] = {}
_LOADED = False

#: Packages whose public modules hold the built-in passes; discovered on first lookup so start-up
#: stays cheap. A pass module is any module not starting with ``_``.
PASS_PACKAGES = ("passes.cleanup", "passes.fusions", "passes.quantization")


def builtin_pass_modules() -> list[str]:
    """The modules discovered in :data:`PASS_PACKAGES`, in a stable order."""
    found = []
    for pkg_name in PASS_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                found.append(f"{pkg_name}.{info.name}")
    return found


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
    for mod in builtin_pass_modules():
        try:
            importlib.import_module(mod)
        except Exception as e:
            _LOADED = False
            raise PassError(f"pass module {mod} does not import: {type(e).__name__}: {e}") from e
    for ep in entry_points(group="passes.plugins"):
        try:
            obj = ep.load()
        except Exception as e:
            _LOADED = False
            raise PassError(f"plugin {ep.name} ({ep.value}) does not import: {type(e).__name__}: {e}") from e
        if isinstance(obj, type) and issubclass(obj, Pass):
            register_pass(obj)
        elif hasattr(obj, "check") and hasattr(obj, "rewrite") and getattr(obj, "name", ""):
            register_rules(obj.name, [obj], f"plugin rule {obj.name} ({ep.value})")
        else:
            _LOADED = False
            raise PassError(f"plugin {ep.name} ({ep.value}) is neither a Pass class nor a rule")


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


def register_rules(name: str, rules: Sequence[Rule], summary: str = "") -> type[RulesPass]:
    """Make and register a pass named ``name`` that applies ``rules``; returns the pass class.

    Example::

        register_rules("fuse-silu", [silu_rule], "x * Sigmoid(x) -> QuickGelu")
        PassManager("fuse-silu,dead-flow").run(model, ctx)
    """
    cls_name = "".join(part.title() for part in name.replace("_", "-").split("-")) + "Pass"
    caller = sys._getframe(1).f_globals.get("__name__", __name__)
    cls = type(cls_name, (RulesPass,), {
        "__module__": caller, "__qualname__": cls_name, "__doc__": summary or f"Apply the {name} rules.",
        "__annotations__": {}, "name": name, "summary": summary, "rules": tuple(rules),
    })
    return register_pass(dataclass(frozen=True)(cls))  # type: ignore[return-value]
