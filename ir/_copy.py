"""Copying a model: new graphs and nodes over the same tensors."""

from __future__ import annotations

from ._model import Model
from .emit import to_onnx_referencing
from .lower import from_onnx

__all__ = ["copy_model"]


def copy_model(model: Model) -> Model:
    """A copy of ``model`` that shares its tensors and nothing else.

    Graphs, nodes, values, attributes and functions are new objects (the copy can be rewritten
    without touching the original), built by the same emit and lower that saving and loading use, so
    the copy is what a save and a load would give; but tensors are immutable (passes replace them,
    never edit them), so the copy holds the same :class:`~ir.Tensor` objects, and a multi-GB model
    is copied without copying, reading or mapping its weights.
    """
    proto, tensors = to_onnx_referencing(model)
    return from_onnx(proto, tensors=tensors)
