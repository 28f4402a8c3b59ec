"""Exceptions raised by the IR.

Every error the IR raises is an :class:`IRError`; its message names the node or value at fault so a
user can act on it without a traceback.
"""

from __future__ import annotations

__all__ = [
    "IRError",
    "InvalidModelError",
    "ModelLoadError",
    "UnknownDomainError",
    "CycleError",
    "UndefinedValueError",
    "DuplicateNameError",
    "UnknownDTypeError",
    "UnsupportedError",
    "VerificationError",
]


class IRError(Exception):
    """Base class of every error raised by the IR."""


class InvalidModelError(IRError):
    """The model is not valid ONNX: the message names the node, its op and the problem, in one line.

    Raised while lowering (structure, tensors) and by :func:`ir.validate` (op schemas, opsets,
    domains), before any pass runs. The errors below that describe a malformed model derive from it.
    """


class UnknownDomainError(InvalidModelError):
    """A node's op domain is neither ONNX's nor one the target provides (``domain`` names it)."""

    def __init__(self, message: str, domain: str) -> None:
        super().__init__(message)
        self.domain = domain


class ModelLoadError(InvalidModelError):
    """A file could not be read or parsed as an ONNX model."""


class CycleError(InvalidModelError):
    """The graph's nodes form a cycle, so no topological order exists."""


class UndefinedValueError(InvalidModelError):
    """A node reads a value that no graph input, initializer or node defines."""


class DuplicateNameError(InvalidModelError):
    """Two values (or two nodes) in one model share a name."""


class UnknownDTypeError(InvalidModelError):
    """A tensor or value uses an element type the IR does not know."""


class UnsupportedError(IRError):
    """The model uses a feature the IR cannot represent."""


class VerificationError(IRError):
    """An IR invariant does not hold; the message names the node or value."""
