"""The rewriter: every mutation a pass makes goes through it, so "modified" is recorded, not claimed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

import ir

from .base import PassResult

__all__ = ["Rewriter"]


class Rewriter:
    """Applies IR mutations and counts them.

    ``result()`` turns the count into a :class:`PassResult`; ``count(stat)`` adds report counters
    such as ``"fused Attention"``. Inside :meth:`transaction` every mutation is journaled, so a
    rewrite that fails half-way is undone as a whole (the greedy driver wraps each rule's rewrite
    in one).
    """

    def __init__(self) -> None:
        self.changes = 0
        self.stats: Counter[str] = Counter()
        self._created: list[tuple[ir.Graph, ir.Value]] = []
        self._journal: list[Callable[[], None]] | None = None

    # -- transactions ---------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All-or-nothing: when the block raises, every mutation made through this rewriter in it
        is undone (in reverse order) and the exception propagates. Transactions nest."""
        if self._journal is not None:
            yield
            return
        self._journal = []
        changes, stats, created = self.changes, Counter(self.stats), list(self._created)
        try:
            yield
        except BaseException:
            for undo in reversed(self._journal):
                undo()
            self.changes, self.stats, self._created = changes, stats, created
            raise
        finally:
            self._journal = None

    def _log(self, undo: Callable[[], None]) -> None:
        if self._journal is not None:
            self._journal.append(undo)

    # -- bookkeeping ----------------------------------------------------------------------
    def count(self, stat: str, n: int = 1) -> None:
        """Add ``n`` to the report counter ``stat`` (does not by itself mark the model modified)."""
        self.stats[stat] += n

    def result(self) -> PassResult:
        """The pass result: modified when any mutation was made."""
        return PassResult(modified=self.changes > 0, stats=self.stats)

    def import_opset(self, model: ir.Model, domain: str, version: int = 1) -> None:
        """Import ``domain`` at ``version`` unless the model already imports it (contrib ops need it)."""
        if domain not in model.opset_imports:
            model.opset_imports[domain] = version
            self._log(lambda: model.opset_imports.pop(domain, None))
            self.changes += 1

    # -- rewiring -------------------------------------------------------------------------
    def replace_all_uses_with(self, old: ir.Value, new: ir.Value) -> None:
        """Make every user of ``old`` use ``new``: node inputs, subgraphs returning it, graph outputs.

        A graph output keeps its name (see :meth:`replace_graph_output`): this is the one place
        where a pass's rewiring renames values, so the model interface never changes.

        Raises:
            ir.IRError: ``old`` is a graph output and ``new`` cannot take its name.
        """
        if old is new or not (old.has_uses() or old.is_graph_output()):
            return
        self._log(_rewiring_undo(old, new))
        if old.is_graph_output():
            self.replace_graph_output(old, new)
        old.replace_all_uses_with(new)
        self.changes += 1

    def replace_graph_output(self, old: ir.Value, new: ir.Value) -> None:
        """Make ``old``'s graph output ``new`` instead, under ``old``'s name.

        ``new`` takes the name, and ``old`` takes ``new``'s former one so names stay unique. Only
        an internal value of the same graph, or a value not yet in any graph, can: a graph input,
        an initializer, another output or a value of an enclosing graph keeps its own name, so the
        rewrite is refused (a pass checks for it first, as ``simplify`` does).

        Raises:
            ir.IRError: ``new`` cannot take the output's name.
        """
        g = old.graph
        if old is new or g is None or not old.is_graph_output():
            return
        home = new.graph
        if home not in (g, None) or new.is_graph_input() or new.is_initializer() or new.is_graph_output():
            where = "model" if g.parent is None else f"subgraph {g.name!r}"
            raise ir.IRError(
                f"rewriter: {where} output %{old.name} cannot become %{new.name}, which keeps its own name "
                "(a graph input, initializer, output or outer value); the graph's interface would change"
            )
        self._log(_rewiring_undo(old, new))
        old.name, new.name = new.name, old.name
        if new.type is None:
            new.type = old.type
        g.outputs.replace(old, new)
        self.changes += 1

    def replace_input(self, node: ir.Node, index: int, value: ir.Value | None) -> None:
        """Make input ``index`` of ``node`` read ``value``."""
        if node.inputs[index] is value:
            return
        was = node.inputs[index]
        node.replace_input(index, value)
        self._log(lambda: node.replace_input(index, was))
        self.changes += 1

    # -- nodes ----------------------------------------------------------------------------
    def make(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: dict[str, Any] | None = None,
        *,
        before: ir.Node | None = None,
        after: ir.Node | None = None,
        graph: ir.Graph | None = None,
        domain: str = "",
        num_outputs: int = 1,
        name: str = "",
        output_names: Sequence[str | None] | None = None,
        types: Sequence[ir.Type | None] | None = None,
    ) -> ir.Node:
        """Create a node and insert it before ``before``, after ``after``, or at the end of ``graph``.

        Outputs get unique names (``output_names`` are used as prefixes; a ``None`` name omits
        that optional output, e.g. the unused middle outputs of ``SkipLayerNormalization``).
        """
        g = graph or (before.graph if before is not None else after.graph if after is not None else None)
        if g is None:
            raise ir.IRError(f"rewriter: nowhere to insert the new {op_type} node")
        names = output_names or [name or op_type] * num_outputs
        outs = [None if n is None else ir.Value(g.unique_name(n)) for n in names]
        if types is not None:
            for v, t in zip(outs, types):
                if v is None:
                    continue
                v.type = t
        node = ir.Node(
            op_type, inputs, attributes, domain=domain, outputs=outs,
            name=g.unique_name(name or op_type),
        )
        if before is not None:
            g.insert_before(before, node)
        elif after is not None:
            g.insert_after(after, node)
        else:
            g.append(node)
        self._log(lambda: g.erase(node))
        self.changes += 1
        return node

    def erase(self, nodes: ir.Node | Iterable[ir.Node]) -> None:
        """Erase nodes (refused while an output is still read outside the group)."""
        group = [nodes] if isinstance(nodes, ir.Node) else [n for n in nodes if n.graph is not None]
        if not group:
            return
        by_graph: dict[int, tuple[ir.Graph, list[ir.Node]]] = {}
        for n in group:
            assert n.graph is not None
            by_graph.setdefault(id(n.graph), (n.graph, []))[1].append(n)
        for g, ns in by_graph.values():
            self._log(_reinsert_undo(g, ns))
            g.erase(ns)
        self.changes += 1

    def erase_unused(self, nodes: Iterable[ir.Node]) -> int:
        """Erase those of ``nodes`` whose outputs nobody reads, repeatedly; returns how many went."""
        pending = [n for n in nodes if n.graph is not None]
        erased = 0
        progress = True
        while progress:
            progress = False
            for n in list(pending):
                if n.graph is None:
                    pending.remove(n)
                    continue
                if all(o is None or (not o.has_uses() and not o.is_graph_output()) for o in n.outputs):
                    self._log(_reinsert_undo(n.graph, [n]))
                    n.graph.erase(n)
                    pending.remove(n)
                    erased += 1
                    progress = True
        if erased:
            self.changes += 1
        return erased

    def move_before(self, ref: ir.Node, node: ir.Node) -> None:
        """Move ``node`` just before ``ref`` in the same graph."""
        g = ref.graph
        assert g is not None
        nxt = _next_live(g, node)
        g.move_before(ref, node)
        self._log(lambda: g.move_before(nxt, node) if nxt is not None else _move_last(g, node))
        self.changes += 1

    def move_into(self, node: ir.Node, graph: ir.Graph) -> None:
        """Move ``node`` to the end of ``graph`` (e.g. into an If branch), keeping its inputs.

        Its outputs must have no readers left where it was (rewire them first); values of the
        enclosing graphs that it reads become captures of ``graph``.
        """
        home = node.graph
        assert home is not None
        places = _reinsert_undo(home, [node])
        home.erase(node)
        graph.append(node)

        def undo() -> None:
            graph.erase(node)
            places()

        self._log(undo)
        self.changes += 1

    # -- attributes, constants, types ------------------------------------------------------
    def set_attr(self, node: ir.Node, name: str, value: Any) -> None:
        """Set an attribute from a Python value."""
        was = node.attributes.get(name)
        node.set_attr(name, value)
        self._log(lambda: node.attributes.__setitem__(name, was) if was is not None else node.attributes.pop(name, None))
        self.changes += 1

    def remove_attr(self, node: ir.Node, name: str) -> None:
        """Remove an attribute when present."""
        if name in node.attributes:
            was = node.attributes.pop(name)
            self._log(lambda: node.attributes.__setitem__(name, was))
            self.changes += 1

    def constant(self, graph: ir.Graph, array: Any, *, name: str = "const", dtype: ir.DataType | None = None) -> ir.Value:
        """Add an initializer holding ``array`` (a numpy array or :class:`ir.Tensor`)."""
        if not isinstance(array, (np.ndarray, ir.Tensor)):
            array = np.asarray(array)
        self.changes += 1
        value = graph.constant(array, name=name, dtype=dtype)
        self._created.append((graph, value))
        home = value.graph or graph
        self._log(lambda: home.remove_initializer(value.name))
        return value

    def remove_unused_constants(self) -> int:
        """Drop the initializers this rewriter created that nothing reads any more; returns how many."""
        dropped = 0
        for graph, value in self._created:
            g = value.graph or graph
            if g.initializers.get(value.name) is value and not value.has_uses() and not value.is_graph_output():
                g.remove_initializer(value.name)
                self._log(lambda g=g, value=value: g.add_initializer(value))
                dropped += 1
        self._created = [(g, v) for g, v in self._created if v.has_uses()]
        self.changes += dropped
        return dropped

    def remove_initializer(self, graph: ir.Graph, name: str) -> None:
        """Drop an initializer nobody reads."""
        value = graph.initializers[name]
        graph.remove_initializer(name)
        self._log(lambda: graph.add_initializer(value))
        self.changes += 1

    def set_outputs(self, graph: ir.Graph, values: Sequence[ir.Value]) -> None:
        """Make ``values`` the outputs of ``graph`` (a subgraph being built: the model's own outputs
        are interface, changed through :meth:`replace_graph_output` only)."""
        was = list(graph.outputs)
        graph.outputs = list(values)
        self._log(lambda: setattr(graph, "outputs", was))
        self.changes += 1

    def move_initializer(self, value: ir.Value, graph: ir.Graph) -> None:
        """Move initializer ``value`` into ``graph`` (a subgraph where all its readers are), keeping its name."""
        home = value.graph
        if home is graph:
            return
        graph.take_initializer(value)
        self._log(lambda: home.take_initializer(value) if home is not None else None)
        self.changes += 1

    def set_const_value(self, value: ir.Value, tensor: ir.Tensor) -> None:
        """Replace the data of an initializer (its type follows)."""
        was = (value.const_value, value.type)
        self._log(lambda: (setattr(value, "const_value", was[0]), setattr(value, "type", was[1])))
        value.const_value = tensor
        value.type = ir.TensorType(tensor.dtype, tensor.shape)
        self.changes += 1

    def set_type(self, value: ir.Value, type: ir.Type | None) -> None:
        """Change a value's type annotation."""
        if value.type != type:
            was = value.type
            value.type = type
            self._log(lambda: setattr(value, "type", was))
            self.changes += 1


# -- undo records -------------------------------------------------------------------------------


def _rewiring_undo(old: ir.Value, new: ir.Value) -> Callable[[], None]:
    """Restore ``old``'s readers, the output lists that name it, and both names after a rewiring."""
    uses = old.uses()
    names = (old.name, new.name)
    new_type = new.type
    g = old.graph
    graphs = ([g] if g is not None else []) + [sub for sub in old.returned_by() if sub is not g]
    outputs = [(graph, list(graph.outputs)) for graph in graphs]

    def undo() -> None:
        for node, i in uses:
            node.replace_input(i, old)
        for graph, saved in outputs:
            graph.outputs[:] = saved
        old.name, new.name = names
        new.type = new_type

    return undo


def _reinsert_undo(graph: ir.Graph, nodes: list[ir.Node]) -> Callable[[], None]:
    """Put erased ``nodes`` back where they were, each after its nearest predecessor outside the group."""
    members = set(nodes)
    places = [(n, _prev_outside(n, members)) for n in nodes]

    def undo() -> None:
        # Reverse order: a node whose predecessor is another group member is placed after it.
        for n, after in reversed(places):
            if n.graph is not None:
                continue
            if after is not None:
                graph.insert_after(after, n)
            else:
                first = next(iter(graph), None)
                graph.append(n) if first is None else graph.insert_before(first, n)

    return undo


def _prev_outside(node: ir.Node, members: set[ir.Node]) -> ir.Node | None:
    # The IR's node list is doubly linked; walking the back links costs the group's size, not the
    # graph's (an erase inside a transaction stays O(1) per node).
    p = node._prev
    while isinstance(p, ir.Node) and p in members:
        p = p._prev
    return p if isinstance(p, ir.Node) else None


def _next_live(graph: ir.Graph, node: ir.Node) -> ir.Node | None:
    n = node._next
    return n if isinstance(n, ir.Node) else None


def _move_last(graph: ir.Graph, node: ir.Node) -> None:
    last = next(reversed(graph))
    if last is not node:
        graph.move_before(last, node)
        graph.move_before(node, last)
