"""The graph IR: values with use lists, nodes in an ordered linked set, graphs, functions, models.

The classes live in one module each (:mod:`ir._attr`, :mod:`ir._value`, :mod:`ir._node`,
:mod:`ir._graph`, :mod:`ir._model`); this module gathers them and states the rules they share.

Invariants (checked by :func:`ir.verify`):

* a :class:`Value` has at most one producer and an ordered list of uses ``(node, input_index)``;
* a :class:`Node`'s inputs are an immutable tuple, rewired only through :meth:`Node.replace_input`
  and :meth:`Value.replace_all_uses_with`, which keep use lists exact;
* a :class:`Graph` keeps its nodes in topological order in a doubly linked list that tolerates
  insertion and erasure while it is being iterated.

Semantics decided once, here, so that no pass works around them:

* **One spelling of the default domain.** Inside the IR the default ONNX domain is ``""``:
  ``Node.domain``, ``Function.domain`` and the keys of ``opset_imports`` store ``"ai.onnx"`` as
  ``""``. Passes compare with ``""`` only. Emitted models write ``""``, which ONNX defines as the
  same domain.
* **Graph inputs and outputs are tracked.** ``Graph.inputs`` / ``Graph.outputs`` are lists that
  record on each value which graphs list it, on every change (append, slice assignment, ``del``,
  assignment of a new list). ``Value.is_graph_input()`` and ``is_graph_output()`` are O(1).
* **A subgraph returning an outer value uses it.** An If branch (or Loop/Scan body) that lists an
  outer value among its outputs uses that value: ``Value.has_uses()`` is true, erasing its producer
  is refused, ``replace_all_uses_with`` rewires the subgraph's output, and ``returned_by()`` lists
  those subgraphs (O(1) for values no subgraph returns). ``Value.uses()`` stays the list of
  ``(node, input_index)`` reads, the ones ``Node.replace_input`` can rewire.
* **Rewiring never renames.** ``Value.replace_all_uses_with`` moves uses only; an output of the
  value's own graph is interface, rewired only when asked (``replace_graph_outputs=True``) and then
  under the replacement's name. Keeping a model's output names while replacing the value that
  produces one is the pass framework's job, in one place: ``passes.Rewriter.replace_all_uses_with``
  hands the name over as a recorded change.

``Value``, ``Node`` and ``Graph`` compare by identity; compare structure with
:func:`ir.structurally_equal` or the text form.
"""

from __future__ import annotations

from ._attr import Attr, AttrType
from ._graph import Graph
from ._model import Function, Model, OpsetImports
from ._node import Node, normalize_domain
from ._value import GraphValues, Value

__all__ = [
    "AttrType", "Attr", "Value", "Node", "Graph", "Function", "Model", "GraphValues", "OpsetImports",
    "normalize_domain",
]
