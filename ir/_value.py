"""Values, and the input/output lists of graphs that keep each value's membership exact.

A :class:`Value` knows, in O(1), the graphs whose ``inputs`` and ``outputs`` list it: a graph's
inputs and outputs are :class:`GraphValues`, a list that updates those counts on every change
(``append``, ``g.outputs[:] = ...``, ``del``, ...). That makes :meth:`Value.is_graph_output`,
:meth:`Value.is_graph_input` and :meth:`Value.returned_by` constant time, with no registry to keep
in step by hand.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, SupportsIndex

from ._dtypes import DataType
from ._errors import IRError
from ._tensor import Tensor
from ._types import Shape, TensorType, Type

if TYPE_CHECKING:
    from ._graph import Graph
    from ._node import Node

__all__ = ["Value", "GraphValues"]


class Value:
    """A value of the graph: a graph input, an initializer, or one output of one node.

    Who uses a value: the node inputs that read it (:meth:`uses`, at any depth: a node inside an
    If branch reading an outer value is a use of it) and the subgraphs that return it directly
    (:meth:`returned_by`: an If branch yielding an outer ``%x``). Both keep it alive
    (:meth:`has_uses`), both block erasing its producer, and :meth:`replace_all_uses_with` rewires
    both. An output of the value's own graph is not a use but interface (:meth:`is_graph_output`).
    """

    __slots__ = (
        "name", "type", "doc_string", "metadata_props", "const_value",
        "_producer", "_index", "_uses", "_graph", "_input_of", "_output_of", "__weakref__",
    )

    def __init__(
        self,
        name: str = "",
        type: Type | None = None,
        *,
        const_value: Tensor | None = None,
        doc_string: str = "",
    ) -> None:
        self.name = name
        self.type = type
        self.doc_string = doc_string
        self.metadata_props: dict[str, str] = {}
        #: The constant data when this value is an initializer.
        self.const_value = const_value
        self._producer: Node | None = None
        self._index: int | None = None
        # dict as an ordered set: O(1) removal, insertion order kept.
        self._uses: dict[tuple[Node, int], None] = {}
        # Graph that owns this value when it is a graph input or an initializer.
        self._graph: Graph | None = None
        # Graphs whose inputs / outputs list this value, with multiplicity (kept by GraphValues).
        self._input_of: dict[Graph, int] | None = None
        self._output_of: dict[Graph, int] | None = None

    # -- structure ------------------------------------------------------------------------
    def producer(self) -> Node | None:
        """The node whose output this is, or ``None`` for graph inputs and initializers."""
        return self._producer

    def index(self) -> int | None:
        """The output index in :meth:`producer`, or ``None``."""
        return self._index

    def uses(self) -> list[tuple[Node, int]]:
        """The ``(node, input_index)`` pairs that read this value, in the order they were added.

        These are the reads :meth:`Node.replace_input` rewires. Subgraphs returning the value
        directly use it too; they are listed by :meth:`returned_by`.
        """
        return list(self._uses)

    def consumers(self) -> list[Node]:
        """The distinct nodes that read this value (as :meth:`uses`, without input indices)."""
        return list(dict.fromkeys(n for n, _ in self._uses))

    def has_uses(self) -> bool:
        """True when a node reads this value or a subgraph returns it (graph outputs aside)."""
        return bool(self._uses) or (bool(self._output_of) and self.is_returned_by_subgraph())

    @property
    def graph(self) -> Graph | None:
        """The graph in which this value is defined."""
        if self._producer is not None:
            return self._producer._graph
        return self._graph

    def is_graph_input(self) -> bool:
        """True when this value is an input of the graph that defines it (O(1))."""
        d = self._input_of
        return bool(d) and self._graph in d  # type: ignore[operator]

    def is_initializer(self) -> bool:
        """True when this value is registered as an initializer of its graph."""
        g = self._graph
        return g is not None and g.initializers.get(self.name) is self

    def is_graph_output(self) -> bool:
        """True when this value is an output of the graph that defines it (O(1))."""
        d = self._output_of
        return bool(d) and self.graph in d  # type: ignore[operator]

    def returned_by(self) -> list[Graph]:
        """Subgraphs that list this value, defined in an enclosing graph, among their outputs.

        Only subgraphs still in the model count (held, at any depth, by nodes of this value's
        graph); a subgraph of an erased node uses nothing.
        """
        d = self._output_of
        if not d:
            return []
        own = self.graph
        return [g for g in d if _encloses(own, g)]

    def is_returned_by_subgraph(self) -> bool:
        """True when some subgraph returns this value directly (see :meth:`returned_by`)."""
        d = self._output_of
        if not d:
            return False
        own = self.graph
        return any(_encloses(own, g) for g in d)

    # -- types -----------------------------------------------------------------------------
    @property
    def dtype(self) -> DataType | None:
        """Element type when the value is a tensor of known type."""
        t = self.type
        return t.dtype if isinstance(t, TensorType) else None

    @property
    def shape(self) -> Shape:
        """Shape when known (dims may be symbolic strings or ``None``)."""
        t = self.type
        return t.shape if isinstance(t, TensorType) else None

    # -- rewiring --------------------------------------------------------------------------
    def replace_all_uses_with(self, other: Value, *, replace_graph_outputs: bool = False) -> None:
        """Make every user of this value use ``other``: node inputs and subgraphs returning it.

        No value is ever renamed. The outputs of this value's own graph are interface, not uses:
        they are rewired only with ``replace_graph_outputs``, and then the graph's output carries
        ``other``'s name. To keep a model's output names, rewire through
        ``passes.Rewriter.replace_all_uses_with``, which hands the name over as a recorded change.
        """
        if other is self:
            return
        if not isinstance(other, Value):
            raise IRError(f"cannot replace %{self.name} with a {type(other).__name__}, not a Value")
        for node, i in list(self._uses):
            node.replace_input(i, other)
        d = self._output_of
        if d:
            own = self.graph
            for g in list(d):
                if (g is own and replace_graph_outputs) or _encloses(own, g):
                    g.outputs.replace(self, other)

    def __repr__(self) -> str:
        t = f": {self.type}" if self.type is not None else ""
        return f"Value(%{self.name}{t})"


def _encloses(outer: Graph | None, g: Graph) -> bool:
    """True when ``g`` is nested in ``outer`` through nodes that are still in their graphs."""
    if outer is None or g is outer:
        return False
    holder = g.parent
    while holder is not None:
        h = holder._graph
        if h is None:
            return False
        if h is outer:
            return True
        holder = h.parent
    return False


class GraphValues(list):  # type: ignore[type-arg]
    """A graph's ``inputs`` or ``outputs``: a list of values that keeps their membership counts.

    Every mutating list method is supported; each keeps ``Value.is_graph_input`` /
    ``is_graph_output`` / ``returned_by`` exact. Items must be :class:`Value`\\ s. Adding a value
    to a graph's inputs makes that graph its owner (as :meth:`Graph.add_input` does); a graph
    input cannot have a producer.
    """

    __slots__ = ("_owner", "_is_inputs")

    def __init__(self, owner: Graph, is_inputs: bool, values: Iterable[Value] = ()) -> None:
        super().__init__()
        self._owner = owner
        self._is_inputs = is_inputs
        self.extend(values)

    # -- bookkeeping ----------------------------------------------------------------------
    def _checked(self, values: Iterable[Any]) -> list[Value]:
        items = list(values)
        for v in items:
            if not isinstance(v, Value):
                what = "inputs" if self._is_inputs else "outputs"
                raise IRError(f"graph {self._owner.name!r}: {what} must be Values, not {type(v).__name__}")
            if self._is_inputs and v._producer is not None:
                raise IRError(
                    f"graph {self._owner.name!r}: %{v.name} is produced by node {v._producer.label()}; "
                    "it cannot be a graph input"
                )
        return items

    def _count(self, values: list[Value], delta: int) -> None:
        g = self._owner
        for v in values:
            if self._is_inputs:
                d = v._input_of
                if d is None:
                    d = v._input_of = {}
                if delta > 0:
                    v._graph = g
            else:
                d = v._output_of
                if d is None:
                    d = v._output_of = {}
            n = d.get(g, 0) + delta
            if n > 0:
                d[g] = n
            else:
                d.pop(g, None)
                if self._is_inputs and v._graph is g and g.initializers.get(v.name) is not v:
                    v._graph = None

    def _swap(self, added: list[Value], removed: list[Value]) -> None:
        # Count additions first: a value moved within the list never looks detached.
        self._count(added, +1)
        self._count(removed, -1)

    # -- list API -------------------------------------------------------------------------
    def append(self, value: Value) -> None:
        """Append ``value``."""
        items = self._checked([value])
        super().append(value)
        self._swap(items, [])

    def extend(self, values: Iterable[Value]) -> None:
        """Append each of ``values``."""
        items = self._checked(values)
        super().extend(items)
        self._swap(items, [])

    def __iadd__(self, values: Iterable[Value]) -> GraphValues:  # type: ignore[override,misc]
        self.extend(values)
        return self

    def __imul__(self, n: SupportsIndex) -> GraphValues:  # type: ignore[override,misc]
        old = list(self)
        super().__imul__(n)
        self._swap(list(self), old)
        return self

    def insert(self, index: SupportsIndex, value: Value) -> None:
        """Insert ``value`` before ``index``."""
        items = self._checked([value])
        super().insert(index, value)
        self._swap(items, [])

    def pop(self, index: SupportsIndex = -1) -> Value:
        """Remove and return the value at ``index``."""
        v = super().pop(index)
        self._swap([], [v])
        return v

    def remove(self, value: Value) -> None:
        """Remove the first occurrence of ``value``."""
        super().remove(value)
        self._swap([], [value])

    def clear(self) -> None:
        """Remove every value."""
        old = list(self)
        super().clear()
        self._swap([], old)

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, slice):
            items = self._checked(value)
            old = super().__getitem__(key)
            super().__setitem__(key, items)
        else:
            items = self._checked([value])
            old = [super().__getitem__(key)]
            super().__setitem__(key, value)
        self._swap(items, old)

    def __delitem__(self, key: Any) -> None:
        old = super().__getitem__(key)
        super().__delitem__(key)
        self._swap([], old if isinstance(key, slice) else [old])

    def replace(self, old: Value, new: Value) -> None:
        """Put ``new`` in every position that holds ``old``."""
        for i, v in enumerate(self):
            if v is old:
                self[i] = new
