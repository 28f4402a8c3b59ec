"""Stable topological sort of a graph's nodes (subgraph captures count as dependencies)."""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from ._errors import CycleError

if TYPE_CHECKING:
    from ._core import Graph, Node, Value


def node_dependencies(node: Node) -> list[Value]:
    """Values a node needs before it can run: its inputs and what its subgraphs capture."""
    deps = [v for v in node.inputs if v is not None]
    for g in node.subgraphs():
        deps.extend(g.captured_values())
    return deps


def toposort(graph: Graph) -> list[Node]:
    """Return the nodes in a topological order, as close to the current order as possible.

    Raises:
        CycleError: naming a node that lies on a cycle.
    """
    nodes = list(graph)
    position = {n: i for i, n in enumerate(nodes)}
    pending: dict[Node, int] = {}
    users: dict[Node, list[Node]] = {n: [] for n in nodes}
    for n in nodes:
        preds = {v.producer() for v in node_dependencies(n)}
        preds = {p for p in preds if p is not None and p in position and p is not n}
        if any(v.producer() is n for v in node_dependencies(n)):
            raise CycleError(f"node {n.label()} reads its own output")
        pending[n] = len(preds)
        for p in preds:
            users[p].append(n)
    ready = [position[n] for n in nodes if pending[n] == 0]
    heapq.heapify(ready)
    order: list[Node] = []
    while ready:
        n = nodes[heapq.heappop(ready)]
        order.append(n)
        for u in users[n]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, position[u])
    if len(order) != len(nodes):
        stuck = next(n for n in nodes if pending[n] > 0)
        raise CycleError(f"the graph has a cycle through node {stuck.label()}")
    return order
