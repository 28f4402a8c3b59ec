"""The graph IR: values with use lists, nodes in an ordered linked set, graphs, functions, models.

Invariants (checked by :func:`ir.verify`):

* a :class:`Value` has at most one producer and an ordered list of uses ``(node, input_index)``;
* a :class:`Node`'s inputs are an immutable tuple, rewired only through :meth:`Node.replace_input`
  and :meth:`Value.replace_all_uses_with`, which keep use lists exact;
* a :class:`Graph` keeps its nodes in topological order in a doubly linked list that tolerates
  insertion and erasure while it is being iterated.

``Value``, ``Node`` and ``Graph`` compare by identity; compare structure with
:func:`ir.structurally_equal` or the text form.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ._dtypes import DataType
from ._errors import IRError
from ._tensor import Tensor
from ._types import Shape, TensorType, Type

__all__ = ["AttrType", "Attr", "Value", "Node", "Graph", "Function", "Model"]


class AttrType(enum.IntEnum):
    """Attribute kinds, numbered as ONNX's ``AttributeProto.AttributeType``."""

    UNDEFINED = 0
    FLOAT = 1
    INT = 2
    STRING = 3
    TENSOR = 4
    GRAPH = 5
    FLOATS = 6
    INTS = 7
    STRINGS = 8
    TENSORS = 9
    GRAPHS = 10
    SPARSE_TENSOR = 11
    SPARSE_TENSORS = 12
    TYPE_PROTO = 13
    TYPE_PROTOS = 14


class Attr:
    """A node attribute: a name, a kind and a value.

    ``ref_attr_name`` is set inside function bodies for attributes that refer to an attribute of
    the calling node; ``value`` is then ``None``.
    """

    __slots__ = ("name", "type", "value", "ref_attr_name", "doc_string")

    def __init__(
        self, name: str, type: AttrType, value: Any, *, ref_attr_name: str = "", doc_string: str = ""
    ) -> None:
        self.name = name
        self.type = type
        self.value = value
        self.ref_attr_name = ref_attr_name
        self.doc_string = doc_string

    @classmethod
    def infer(cls, name: str, value: Any) -> Attr:
        """Build an attribute from a Python value, guessing the kind (int, float, str, lists, Tensor, Graph)."""
        if isinstance(value, Attr):
            return value
        if isinstance(value, bool):
            return cls(name, AttrType.INT, int(value))
        if isinstance(value, int):
            return cls(name, AttrType.INT, value)
        if isinstance(value, float):
            return cls(name, AttrType.FLOAT, value)
        if isinstance(value, (str, bytes)):
            return cls(name, AttrType.STRING, value)
        if isinstance(value, Tensor):
            return cls(name, AttrType.TENSOR, value)
        if isinstance(value, Graph):
            return cls(name, AttrType.GRAPH, value)
        if isinstance(value, (list, tuple)):
            items = list(value)
            if all(isinstance(v, (int, bool)) for v in items):
                return cls(name, AttrType.INTS, [int(v) for v in items])
            if all(isinstance(v, (int, float)) for v in items):
                return cls(name, AttrType.FLOATS, [float(v) for v in items])
            if all(isinstance(v, (str, bytes)) for v in items):
                return cls(name, AttrType.STRINGS, items)
            if all(isinstance(v, Tensor) for v in items):
                return cls(name, AttrType.TENSORS, items)
            if all(isinstance(v, Graph) for v in items):
                return cls(name, AttrType.GRAPHS, items)
        raise IRError(f"attribute {name!r}: cannot infer an ONNX attribute kind for {type(value).__name__}")

    def graphs(self) -> list[Graph]:
        """The subgraphs this attribute holds (empty for non-graph attributes)."""
        if self.type == AttrType.GRAPH:
            return [self.value]
        if self.type == AttrType.GRAPHS:
            return list(self.value)
        return []

    def __repr__(self) -> str:
        return f"Attr({self.name!r}, {self.type.name}, {self.value!r})"


class Value:
    """A value of the graph: a graph input, an initializer, or one output of one node."""

    __slots__ = (
        "name", "type", "doc_string", "metadata_props", "const_value",
        "_producer", "_index", "_uses", "_graph", "__weakref__",
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

    # -- structure ------------------------------------------------------------------------
    def producer(self) -> Node | None:
        """The node whose output this is, or ``None`` for graph inputs and initializers."""
        return self._producer

    def index(self) -> int | None:
        """The output index in :meth:`producer`, or ``None``."""
        return self._index

    def uses(self) -> list[tuple[Node, int]]:
        """The ``(node, input_index)`` pairs that read this value, in the order they were added."""
        return list(self._uses)

    def consumers(self) -> list[Node]:
        """The distinct nodes that read this value."""
        return list(dict.fromkeys(n for n, _ in self._uses))

    def has_uses(self) -> bool:
        """True when any node reads this value."""
        return bool(self._uses)

    @property
    def graph(self) -> Graph | None:
        """The graph in which this value is defined."""
        if self._producer is not None:
            return self._producer._graph
        return self._graph

    def is_graph_input(self) -> bool:
        """True when this value is an input of the graph that defines it."""
        g = self._graph
        return g is not None and any(v is self for v in g.inputs)

    def is_initializer(self) -> bool:
        """True when this value is registered as an initializer of its graph."""
        g = self._graph
        return g is not None and g.initializers.get(self.name) is self

    def is_graph_output(self) -> bool:
        """True when this value is an output of the graph that defines it."""
        g = self.graph
        return g is not None and any(v is self for v in g.outputs)

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
    def replace_all_uses_with(self, other: Value, *, include_graph_outputs: bool = True) -> None:
        """Make every reader of this value read ``other`` instead.

        When this value is a graph output and ``include_graph_outputs`` is set, the output is
        rewired too and ``other`` takes over this value's name (the model's interface keeps its
        names), unless ``other`` is itself a graph input, initializer or output.
        """
        if other is self:
            return
        for node, i in list(self._uses):
            node.replace_input(i, other)
        g = self.graph
        if g is not None:
            for sub in g.subgraphs_returning(self):
                sub.outputs[:] = [other if v is self else v for v in sub.outputs]
        if include_graph_outputs:
            if g is not None and any(v is self for v in g.outputs):
                interface = other.is_graph_input() or other.is_initializer() or other.is_graph_output()
                g.outputs[:] = [other if v is self else v for v in g.outputs]
                if not interface:
                    self.name, other.name = other.name, self.name
                    if other.type is None:
                        other.type = self.type

    def __repr__(self) -> str:
        t = f": {self.type}" if self.type is not None else ""
        return f"Value(%{self.name}{t})"


class Node:
    """One operator application.

    Args:
        op_type: the operator, e.g. ``"MatMul"``.
        inputs: input values; ``None`` marks an omitted optional input.
        attributes: attributes, as :class:`Attr` objects or a ``{name: python value}`` mapping.
        domain: operator domain (``""`` is the default ONNX domain).
        name: node name.
        num_outputs: number of fresh output values to create when ``outputs`` is not given.
        outputs: output values (fresh, producer-less) or names for them; ``None`` marks an omitted one.
    """

    __slots__ = (
        "op_type", "domain", "name", "overload", "attributes", "doc_string", "metadata_props",
        "_inputs", "_outputs", "_graph", "_prev", "_next", "__weakref__",
    )

    def __init__(
        self,
        op_type: str,
        inputs: Sequence[Value | None] = (),
        attributes: Iterable[Attr] | dict[str, Any] | None = None,
        *,
        domain: str = "",
        name: str = "",
        num_outputs: int = 1,
        outputs: Sequence[Value | str | None] | None = None,
        overload: str = "",
        doc_string: str = "",
    ) -> None:
        self.op_type = op_type
        self.domain = domain
        self.name = name
        self.overload = overload
        self.doc_string = doc_string
        self.metadata_props: dict[str, str] = {}
        self.attributes: dict[str, Attr] = {}
        if isinstance(attributes, dict):
            attributes = [Attr.infer(k, v) for k, v in attributes.items()]
        for a in attributes or ():
            self.attributes[a.name] = a
            for g in a.graphs():
                g.parent = self
        self._graph: Graph | None = None
        self._prev: Node | _Anchor | None = None
        self._next: Node | _Anchor | None = None
        self._inputs: tuple[Value | None, ...] = tuple(inputs)
        for i, v in enumerate(self._inputs):
            if v is not None:
                if not isinstance(v, Value):
                    raise IRError(f"node {self.label()}: input {i} is a {type(v).__name__}, not a Value")
                v._uses[(self, i)] = None
        if outputs is None:
            outputs = [Value() for _ in range(num_outputs)]
        outs: list[Value | None] = []
        for i, o in enumerate(outputs):
            if isinstance(o, str):
                o = Value(o)
            if o is not None:
                if o._producer is not None or o._graph is not None:
                    raise IRError(f"node {self.label()}: output value %{o.name} is already defined elsewhere")
                o._producer, o._index = self, i
            outs.append(o)
        self._outputs: tuple[Value | None, ...] = tuple(outs)

    # -- structure ------------------------------------------------------------------------
    @property
    def inputs(self) -> tuple[Value | None, ...]:
        """Input values (``None`` for an omitted optional input)."""
        return self._inputs

    @property
    def outputs(self) -> tuple[Value | None, ...]:
        """Output values (``None`` for an omitted optional output)."""
        return self._outputs

    @property
    def graph(self) -> Graph | None:
        """The graph this node is in, or ``None`` once erased (or before insertion)."""
        return self._graph

    def label(self) -> str:
        """A short human name for messages: ``Add 'node_name'`` or ``Add -> %out``."""
        op = f"{self.domain}::{self.op_type}" if self.domain not in ("", "ai.onnx") else self.op_type
        if self.name:
            return f"{op} {self.name!r}"
        first = next((o for o in self._outputs if o is not None), None)
        return f"{op} -> %{first.name}" if first is not None else op

    def replace_input(self, index: int, value: Value | None) -> None:
        """Make input ``index`` read ``value``; use lists of the old and new value are updated."""
        n = len(self._inputs)
        if not -n <= index < n:
            raise IRError(f"node {self.label()} has {n} inputs; cannot replace input {index}")
        index %= n  # uses are keyed by the non-negative index
        old = self._inputs[index]
        if old is value:
            return
        if old is not None:
            old._uses.pop((self, index), None)
        if value is not None:
            value._uses[(self, index)] = None
        self._inputs = self._inputs[:index] + (value,) + self._inputs[index + 1 :]

    def _detach_inputs(self) -> None:
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses.pop((self, i), None)
        # Nodes inside this node's subgraphs read outer values too; once this node is erased those
        # reads are gone, or the outer values would look used forever. Reads of values defined
        # inside the subgraphs stay, so an erased node's body keeps exact use lists of its own.
        for sub in self.subgraphs():
            captured = {id(v) for v in sub.captured_values()}
            for g in sub.all_graphs():
                for n in g:
                    for i, v in enumerate(n._inputs):
                        if v is not None and id(v) in captured:
                            v._uses.pop((n, i), None)

    def _attach_inputs(self) -> None:
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses[(self, i)] = None
        for sub in self.subgraphs():
            for g in sub.all_graphs():
                for n in g:
                    for i, v in enumerate(n._inputs):
                        if v is not None:
                            v._uses[(n, i)] = None

    def attr(self, name: str, default: Any = None) -> Any:
        """The value of attribute ``name``, or ``default`` when absent."""
        a = self.attributes.get(name)
        return default if a is None else a.value

    def set_attr(self, name: str, value: Any) -> None:
        """Set (or replace) an attribute from a Python value."""
        a = Attr.infer(name, value)
        for g in a.graphs():
            g.parent = self
        self.attributes[name] = a
        if self._graph is not None and a.graphs():
            self._graph._register_holders(self)

    def subgraphs(self) -> list[Graph]:
        """Graphs held by this node's attributes (If branches, Loop and Scan bodies)."""
        return [g for a in self.attributes.values() for g in a.graphs()]

    def predecessors(self) -> list[Node]:
        """Distinct producers of this node's inputs."""
        return list(dict.fromkeys(p for v in self._inputs if v is not None and (p := v._producer) is not None))

    def successors(self) -> list[Node]:
        """Distinct readers of this node's outputs."""
        return list(dict.fromkeys(n for o in self._outputs if o is not None for n, _ in o._uses))

    def __repr__(self) -> str:
        return f"Node({self.label()})"


class _Anchor:
    """Sentinel of a graph's circular node list."""

    __slots__ = ("_prev", "_next")

    def __init__(self) -> None:
        self._prev: Any = self
        self._next: Any = self


class Graph:
    """A graph: inputs, outputs, initializers and nodes in topological order.

    Nodes are held in a doubly linked list: insertion and erasure are O(1) and safe while the
    graph is being iterated (erased nodes are skipped; nodes inserted after the cursor are visited).
    """

    __slots__ = (
        "name", "inputs", "outputs", "initializers", "doc_string", "metadata_props",
        "parent", "extra", "_anchor", "_len", "_names", "_counter", "_holders", "__weakref__",
    )

    def __init__(
        self,
        inputs: Sequence[Value] = (),
        outputs: Sequence[Value] = (),
        nodes: Iterable[Node] = (),
        initializers: Iterable[Value] = (),
        *,
        name: str = "",
        doc_string: str = "",
    ) -> None:
        self.name = name
        self.doc_string = doc_string
        self.metadata_props: dict[str, str] = {}
        #: The node whose attribute holds this graph, for subgraphs.
        self.parent: Node | None = None
        #: Opaque fields carried through unchanged (e.g. sparse initializers, quantization annotations).
        self.extra: dict[str, Any] = {}
        self.inputs: list[Value] = []
        self.outputs: list[Value] = list(outputs)
        self.initializers: dict[str, Value] = {}
        self._anchor = _Anchor()
        self._len = 0
        self._names: set[str] | None = None
        self._counter = itertools.count()
        # On the root graph: every node (at any depth) that holds subgraphs, so that subgraph
        # outputs naming outer values are found without scanning the whole model.
        self._holders: set[Node] = set()
        for v in inputs:
            self.add_input(v)
        for v in initializers:
            self.add_initializer(v)
        for n in nodes:
            self.append(n)

    # -- values ----------------------------------------------------------------------------
    def add_input(self, value: Value) -> Value:
        """Append a graph input."""
        value._graph = self
        self.inputs.append(value)
        self._note_name(value.name)
        return value

    def _note_name(self, name: str) -> None:
        # Keep unique_name's cache (built lazily on the root graph) in step with new values.
        names = self.root()._names
        if names is not None:
            names.add(name)

    def add_initializer(self, value: Value) -> Value:
        """Register ``value`` (whose ``const_value`` is set) as an initializer."""
        if value.const_value is None:
            raise IRError(f"initializer %{value.name} has no constant value")
        if value._producer is not None:
            raise IRError(f"initializer %{value.name} is produced by node {value._producer.label()}")
        if not value.name:
            value.name = self.unique_name("const")
        existing = self.initializers.get(value.name)
        if existing is not None and existing is not value:
            raise IRError(f"initializer name %{value.name} is already used")
        value._graph = self
        if value.type is None:
            value.type = TensorType(value.const_value.dtype, value.const_value.shape)
        self.initializers[value.name] = value
        self._note_name(value.name)
        return value

    def constant(self, array: Any, *, name: str = "", dtype: DataType | None = None) -> Value:
        """Add a new initializer holding ``array`` and return its value."""
        t = array if isinstance(array, Tensor) else Tensor(array, dtype=dtype)
        v = Value(self.unique_name(name or "const"), TensorType(t.dtype, t.shape), const_value=t)
        return self.root().add_initializer(v) if self.parent is None else self.add_initializer(v)

    def remove_initializer(self, name: str) -> None:
        """Drop an initializer; refuses while nodes still read it."""
        v = self.initializers[name]
        if v._uses or v.is_graph_output():
            raise IRError(f"initializer %{name} is still used; cannot remove it")
        del self.initializers[name]
        if not any(x is v for x in self.inputs):
            v._graph = None

    # -- naming ----------------------------------------------------------------------------
    def root(self) -> Graph:
        """The outermost graph (follows subgraph parents)."""
        g = self
        while g.parent is not None and g.parent._graph is not None:
            g = g.parent._graph
        return g

    def unique_name(self, prefix: str) -> str:
        """A value or node name not used anywhere in this model's graph and its subgraphs."""
        root = self.root()
        if root is not self:
            return root.unique_name(prefix)
        if self._names is None:
            names: set[str] = set()
            for g in self.all_graphs():
                names.update(v.name for v in g.inputs)
                names.update(g.initializers)
                for n in g:
                    names.add(n.name)
                    names.update(o.name for o in n.outputs if o is not None)
            self._names = names
        name = prefix
        while name in self._names or not name:
            name = f"{prefix}__{next(self._counter)}"
        self._names.add(name)
        return name

    # -- nodes -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        anchor = self._anchor
        node = anchor._next
        while node is not anchor:
            if node._graph is self:
                yield node
            node = node._next

    def __reversed__(self) -> Iterator[Node]:
        anchor = self._anchor
        node = anchor._prev
        while node is not anchor:
            if node._graph is self:
                yield node
            node = node._prev

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return True

    @property
    def nodes(self) -> list[Node]:
        """A snapshot list of the nodes, in order."""
        return list(self)

    def _link(self, node: Node, after: Node | _Anchor) -> None:
        if node._graph is not None:
            raise IRError(f"node {node.label()} is already in a graph; erase it first")
        node._prev, node._next = after, after._next
        after._next._prev = node
        after._next = node
        node._graph = self
        self._len += 1
        names = self.root()._names
        if names is not None:
            names.add(node.name)
            names.update(o.name for o in node.outputs if o is not None)
        node._attach_inputs()  # idempotent; re-attaches the uses of a node that was erased
        self._register_holders(node)

    def _register_holders(self, node: Node) -> None:
        root = self.root()
        stack = [node]
        while stack:
            n = stack.pop()
            subs = n.subgraphs()
            if subs:
                root._holders.add(n)
                for sub in subs:
                    stack.extend(sub)

    def subgraphs_returning(self, value: Value) -> list[Graph]:
        """Subgraphs (at any depth below this graph's root) that list ``value`` among their outputs.

        A subgraph may return an outer value directly (an If branch yielding ``%x``); that is a
        use of ``value`` that no node input records, so erasure and rewiring consult this.
        """
        root = self.root()
        found = []
        for holder in list(root._holders):
            g = holder._graph
            if g is None or g.root() is not root:
                continue
            for sub in holder.subgraphs():
                if any(o is value for o in sub.outputs):
                    found.append(sub)
        return found

    def append(self, node: Node) -> Node:
        """Add ``node`` at the end."""
        self._link(node, self._anchor._prev)
        return node

    def insert_before(self, ref: Node, nodes: Node | Iterable[Node]) -> None:
        """Insert ``nodes`` (in order) just before ``ref``."""
        if ref._graph is not self:
            raise IRError(f"node {ref.label()} is not in graph {self.name!r}")
        after = ref._prev
        for n in [nodes] if isinstance(nodes, Node) else list(nodes):
            self._link(n, after)
            after = n

    def insert_after(self, ref: Node, nodes: Node | Iterable[Node]) -> None:
        """Insert ``nodes`` (in order) just after ``ref``."""
        if ref._graph is not self:
            raise IRError(f"node {ref.label()} is not in graph {self.name!r}")
        after: Node = ref
        for n in [nodes] if isinstance(nodes, Node) else list(nodes):
            self._link(n, after)
            after = n

    def erase(self, nodes: Node | Iterable[Node]) -> None:
        """Remove nodes; refuses while an output is still read outside ``nodes`` or is a graph output."""
        group = [nodes] if isinstance(nodes, Node) else list(nodes)
        members = set(group)
        for n in group:
            if n._graph is not self:
                raise IRError(f"node {n.label()} is not in graph {self.name!r}")
            for o in n._outputs:
                if o is None:
                    continue
                for user, _ in o._uses:
                    if user not in members:
                        raise IRError(
                            f"cannot erase node {n.label()}: its output %{o.name} is still used by {user.label()}"
                        )
                if o.is_graph_output():
                    raise IRError(f"cannot erase node {n.label()}: its output %{o.name} is a graph output")
                for sub in self.subgraphs_returning(o):
                    if sub.parent not in members:
                        raise IRError(
                            f"cannot erase node {n.label()}: its output %{o.name} is returned by subgraph "
                            f"{sub.name!r} of {sub.parent.label() if sub.parent else 'a node'}"
                        )
        for n in group:
            n._detach_inputs()
            n._prev._next = n._next
            n._next._prev = n._prev
            n._graph = None
            self._len -= 1

    def move_before(self, ref: Node, node: Node) -> None:
        """Move ``node`` (already in this graph) to just before ``ref``, keeping its uses."""
        for n in (ref, node):
            if n._graph is not self:
                raise IRError(f"node {n.label()} is not in graph {self.name!r}")
        if node is ref:
            return
        node._prev._next = node._next
        node._next._prev = node._prev
        node._graph = None
        self._len -= 1
        after = ref._prev
        node._prev, node._next = after, ref
        after._next = node
        ref._prev = node
        node._graph = self
        self._len += 1

    # -- traversal -------------------------------------------------------------------------
    def all_graphs(self) -> Iterator[Graph]:
        """This graph and every subgraph nested in it, outer first."""
        yield self
        for n in self:
            for sub in n.subgraphs():
                yield from sub.all_graphs()

    def all_nodes(self) -> Iterator[Node]:
        """Every node of this graph and its subgraphs, outer nodes before the subgraphs' nodes."""
        for g in self.all_graphs():
            yield from g

    def captured_values(self) -> list[Value]:
        """Values defined outside this graph (and its subgraphs) that its nodes read."""
        inner: set[int] = set()
        for g in self.all_graphs():
            inner.update(id(v) for v in g.inputs)
            inner.update(id(v) for v in g.initializers.values())
            for n in g:
                inner.update(id(o) for o in n.outputs if o is not None)
        seen: dict[int, Value] = {}
        for g in self.all_graphs():
            for n in g:
                for v in n.inputs:
                    if v is not None and id(v) not in inner:
                        seen.setdefault(id(v), v)
            for v in g.outputs:
                if id(v) not in inner:
                    seen.setdefault(id(v), v)
        return list(seen.values())

    def sort(self) -> None:
        """Reorder the nodes topologically, keeping the current order where it is already valid.

        Raises:
            CycleError: naming a node on a cycle.
        """
        from ._toposort import toposort

        order = toposort(self)
        anchor = self._anchor
        anchor._next = anchor._prev = anchor
        prev: Any = anchor
        for n in order:
            n._prev, n._next = prev, anchor
            prev._next = n
            anchor._prev = n
            prev = n

    def __str__(self) -> str:
        from ._printer import print_graph

        return print_graph(self)

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {len(self)} nodes)"


class Function:
    """A model-local function: a graph body plus domain, name, attribute names and opset imports."""

    __slots__ = (
        "domain", "name", "overload", "graph", "attributes", "attribute_defaults",
        "opset_imports", "doc_string", "metadata_props",
    )

    def __init__(
        self,
        domain: str,
        name: str,
        graph: Graph,
        *,
        attributes: Sequence[str] = (),
        attribute_defaults: Sequence[Attr] = (),
        opset_imports: dict[str, int] | None = None,
        overload: str = "",
        doc_string: str = "",
    ) -> None:
        self.domain = domain
        self.name = name
        self.overload = overload
        self.graph = graph
        self.attributes = list(attributes)
        self.attribute_defaults = list(attribute_defaults)
        self.opset_imports = dict(opset_imports or {})
        self.doc_string = doc_string
        self.metadata_props: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"Function({self.domain}::{self.name})"


class Model:
    """A model: its main graph, opset imports, metadata and local functions."""

    __slots__ = (
        "graph", "ir_version", "opset_imports", "producer_name", "producer_version", "domain",
        "model_version", "doc_string", "metadata_props", "functions", "extra",
    )

    def __init__(
        self,
        graph: Graph,
        *,
        ir_version: int = 10,
        opset_imports: dict[str, int] | None = None,
        producer_name: str = "",
        producer_version: str = "",
        domain: str = "",
        model_version: int = 0,
        doc_string: str = "",
        functions: Sequence[Function] = (),
    ) -> None:
        self.graph = graph
        self.ir_version = ir_version
        self.opset_imports: dict[str, int] = dict(opset_imports if opset_imports is not None else {"": 17})
        self.producer_name = producer_name
        self.producer_version = producer_version
        self.domain = domain
        self.model_version = model_version
        self.doc_string = doc_string
        self.metadata_props: dict[str, str] = {}
        self.functions: list[Function] = list(functions)
        #: Opaque fields carried through unchanged (e.g. training info).
        self.extra: dict[str, Any] = {}

    def opset(self, domain: str = "") -> int | None:
        """The imported opset version of ``domain`` (``"ai.onnx"`` and ``""`` are the same)."""
        if domain == "ai.onnx":
            domain = ""
        v = self.opset_imports.get(domain)
        if v is None and domain == "":
            v = self.opset_imports.get("ai.onnx")
        return v

    def __str__(self) -> str:
        from ._printer import print_model

        return print_model(self)

    def __repr__(self) -> str:
        return f"Model({self.graph.name!r}, opsets={self.opset_imports})"
