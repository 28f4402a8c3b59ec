"""Optional bridges from the IR to other graph libraries: networkx and onnx-graphsurgeon.

Neither library is needed by the compiler; each is imported only when its function is called and a
missing one raises an :class:`ImportError` that says what to install. This module never imports
``onnx`` itself: the graphsurgeon bridge goes through :func:`ir.to_onnx` / :func:`ir.from_onnx`.

Example::

    import ir
    from ir.interop import to_networkx

    g = to_networkx(ir.load("model.onnx"))
    import networkx as nx
    print(nx.dag_longest_path_length(g))          # depth of the graph in values + nodes
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._core import Graph, Model, Node, Value
from ._printer import format_type

if TYPE_CHECKING:  # pragma: no cover - typing only
    import networkx
    import onnx_graphsurgeon

__all__ = ["to_networkx", "to_graphsurgeon", "from_graphsurgeon", "node_key", "value_key"]

_INSTALL_HINT = "pip install 'tfcompile[interop]'"


def _require(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the optional package {module!r}, which is not installed ({_INSTALL_HINT})") from e


def value_key(value: Value) -> str:
    """The networkx key of a value: ``"%name"`` (value names are unique in a verified model)."""
    return f"%{value.name}"


def node_key(node: Node, index: int, prefix: str = "") -> str:
    """The networkx key of a node: ``"[prefix/]index:op_type[:name]"``, unique within one conversion."""
    return f"{prefix}{index}:{node.op_type}" + (f":{node.name}" if node.name else "")


def to_networkx(graph: Graph | Model, *, subgraphs: bool = True) -> networkx.DiGraph:
    """Convert a graph to a ``networkx.DiGraph`` whose vertices are the IR's nodes *and* values.

    Vertices:
        * one per value (key :func:`value_key`), with attributes ``kind="value"``, ``name``,
          ``type`` (its text form), ``role`` (``"input"``, ``"initializer"``, ``"output"`` or
          ``"intermediate"``), ``label`` and ``ir`` (the :class:`Value`);
        * one per node (key :func:`node_key`), with ``kind="node"``, ``op_type``, ``domain``,
          ``name``, ``graph`` (the name of the graph it is in), ``parent`` (the key of the node
          holding its subgraph, or ``None``), ``label`` and ``ir`` (the :class:`Node`).

    Edges go value → node (attribute ``index``: the input position) and node → value
    (``index``: the output position). With ``subgraphs`` set, the nodes of If/Loop/Scan bodies are
    included and an outer value read inside a body gets an edge to the inner node that reads it,
    so the digraph stays acyclic and reachability follows real data flow.

    Args:
        graph: a graph, or a model (its main graph).
        subgraphs: include the nodes of nested subgraphs.

    Returns:
        The digraph; ``G.graph["name"]`` is the graph's name.

    Raises:
        ImportError: networkx is not installed.
    """
    nx = _require("networkx", "ir.interop.to_networkx")
    if isinstance(graph, Model):
        graph = graph.graph
    g = nx.DiGraph(name=graph.name)

    def add_value(v: Value, role: str) -> str:
        key = value_key(v)
        if key not in g:
            g.add_node(key, kind="value", name=v.name, type=format_type(v.type), role=role,
                       label=f"%{v.name}", ir=v)
        elif role != "intermediate":
            g.nodes[key]["role"] = role
        return key

    def walk(sub: Graph, prefix: str, parent: str | None) -> None:
        for v in sub.inputs:
            add_value(v, "input")
        for v in sub.initializers.values():
            add_value(v, "initializer")
        for i, n in enumerate(sub):
            nk = node_key(n, i, prefix)
            g.add_node(nk, kind="node", op_type=n.op_type, domain=n.domain, name=n.name, graph=sub.name,
                       parent=parent, label=n.name or n.op_type, ir=n)
            for k, v in enumerate(n.inputs):
                if v is not None:
                    g.add_edge(add_value(v, "intermediate"), nk, index=k)
            for k, v in enumerate(n.outputs):
                if v is not None:
                    g.add_edge(nk, add_value(v, "intermediate"), index=k)
            if subgraphs:
                for attr in n.attributes.values():
                    for j, body in enumerate(attr.graphs()):
                        walk(body, f"{nk}/{attr.name}{j if len(attr.graphs()) > 1 else ''}/", nk)
        for v in sub.outputs:
            if sub is graph:
                add_value(v, "output")

    walk(graph, "", None)
    return g


def to_graphsurgeon(model: Model) -> onnx_graphsurgeon.Graph:
    """Convert a model to an ``onnx_graphsurgeon.Graph`` (through an in-memory ONNX proto).

    Tensor data is copied inline, so this suits models below 2 GB.

    Raises:
        ImportError: onnx-graphsurgeon is not installed.
    """
    gs = _require("onnx_graphsurgeon", "ir.interop.to_graphsurgeon")
    from .emit import to_onnx

    return gs.import_onnx(to_onnx(model))


def from_graphsurgeon(gs_graph: onnx_graphsurgeon.Graph, *, do_type_check: bool = True) -> Model:
    """Convert an ``onnx_graphsurgeon.Graph`` back to an IR model.

    Args:
        gs_graph: the graphsurgeon graph (its opset and ``import_domains`` become the model's
            opset imports).
        do_type_check: passed to ``gs.export_onnx`` (checks that graph inputs and outputs are typed).

    Raises:
        ImportError: onnx-graphsurgeon is not installed.
        IRError: the exported model is malformed.
    """
    gs = _require("onnx_graphsurgeon", "ir.interop.from_graphsurgeon")
    from .lower import from_onnx

    return from_onnx(gs.export_onnx(gs_graph, do_type_check=do_type_check))
