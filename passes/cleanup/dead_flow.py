"""Dead-flow elimination: drop nodes and initializers that no graph output depends on.

One reverse sweep per graph over use lists: walking nodes from last to first, a node is dead when
none of its outputs is used (read by a node or returned by a subgraph) or is a graph output. Erasing it drops its reads (including the reads
made by nodes inside its subgraphs), so its producers are seen as dead when the sweep reaches them.
A live node's subgraphs are swept when the node is reached, before the producers of the outer
values they capture, so an outer value read only by dead subgraph nodes dies in the same sweep.

Graph inputs and outputs are never removed. Model-local function bodies are left alone: what a
caller reads of them is decided at each call site, so treating their outputs as roots is the only
safe choice, and doing nothing inside them is the conservative version of that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import ir

from ..framework.base import Pass, PassContext, PassResult
from ..framework.registry import register_pass
from ..framework.rewriter import Rewriter

__all__ = ["DeadFlowPass"]


@register_pass
@dataclass(frozen=True)
class DeadFlowPass(Pass):
    """Remove nodes, subgraph nodes and initializers that no graph output depends on.

    Attributes:
        remove_initializers: also drop initializers nobody reads (in subgraphs too). Initializers
            that double as graph inputs (overridable defaults) are kept: they are interface.
    """

    name: ClassVar[str] = "dead-flow"
    summary: ClassVar[str] = "remove nodes and initializers no graph output depends on"

    remove_initializers: bool = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Sweep the main graph (and, through live nodes, every subgraph) once."""
        rw = Rewriter()
        self._sweep(model.graph, rw)
        return rw.result()

    def _sweep(self, graph: ir.Graph, rw: Rewriter) -> None:
        # Reverse iteration tolerates erasing the node just yielded: its back link stays valid.
        for node in reversed(graph):
            if _is_dead(node):
                rw.erase(node)
                rw.count("removed nodes")
                continue
            for sub in node.subgraphs():
                self._sweep(sub, rw)
        if self.remove_initializers:
            for name, value in list(graph.initializers.items()):
                if value.has_uses() or value.is_graph_output() or value.is_graph_input():
                    continue
                rw.remove_initializer(graph, name)
                rw.count("removed initializers")


def _is_dead(node: ir.Node) -> bool:
    """True when no output of ``node`` is used (a subgraph returning it uses it) or a graph output."""
    return all(o is None or not (o.has_uses() or o.is_graph_output()) for o in node.outputs)
