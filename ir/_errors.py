"""Exceptions raised by the IR.

Every error the IR raises is an :class:`IRError`; its message names the node or value at fault so a
user can act on it without a traceback.
"""

from __future__ import annotations

__all__ = [
    "IRError",
    "ModelLoadError",
    "CycleError",
    "UndefinedValueError",
    "DuplicateNameError",
    "UnknownDTypeError",
    "UnsupportedError",
    "VerificationError",
]


class IRError(Exception):
    """Base class of every error raised by the IR."""


class ModelLoadError(IRError):
    """A file could not be read or parsed as an ONNX model."""


class CycleError(IRError):
    """The graph's nodes form a cycle, so no topological order exists."""


class UndefinedValueError(IRError):
    """A node reads a value that no graph input, initializer or node defines."""


class DuplicateNameError(IRError):
    """Two values (or two nodes) in one model share a name."""


class UnknownDTypeError(IRError):
    """A tensor or value uses an element type the IR does not know."""


class UnsupportedError(IRError):
    """The model uses a feature the IR cannot represent."""


class VerificationError(IRError):
    """An IR invariant does not hold; the message names the node or value."""
