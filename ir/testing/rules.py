"""Property-based tests for rewrite rules: models that contain a rule's pattern, and the properties to check.

::

    from hypothesis import given, settings
    from ir.testing import check_rule, rule_cases

    @settings(max_examples=30, deadline=None)
    @given(rule_cases(my_rule))
    def test_my_rule(case):
        check_rule(my_rule, case)

:func:`rule_cases` reads the rule's pattern and builds a model holding one instance of it: an
alternative chosen at random, commutative operands in random order, products in a random
association (the constants merged, split or written as a division), ``op.through`` chains of
random length and ``op.any_of`` nodes of a random one of their types, constants as initializers or
``Constant`` nodes, variables as graph inputs or the output of a random op, and a random op
reading the result. Now and then the value of a named interior node (``_name="sum"``) is read
outside the match too, by a model output placed right after it or at the end: a rule whose
replacement replaces that value must fire and rewire the reader, one that does not is refused.
:func:`check_rule` asserts that the rule fires on it, that numerics hold in onnxruntime (graph
optimizations off on both sides), and that a second run changes nothing.

Instances the rule refuses (a shape or data condition of its ``check`` the random instance does
not meet, an interior value read outside that the replacement does not replace, no place for the
replacement before that reader) are rejected with ``hypothesis.assume``, so the properties are
judged on accepted ones; a *structural* failure to match is a failure. Give ``attrs`` (per op
type) and ``values`` (per bound constant name) where the pattern leaves a choice the random
instance cannot make well, e.g. ``attrs={"ReduceMean": {"axes": [-1]}}``.

This module reads pattern rules of :mod:`passes.framework.pattern`; it imports ``passes`` only
when a strategy is drawn, so ``import ir.testing`` stays free of the compiler.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

import ir

__all__ = ["RuleCase", "rule_cases", "check_rule"]

_AROUND = ("Relu", "Tanh", "Abs", "Neg", "Sigmoid")
#: Default-domain ops that run with one input and no attribute; ``op.through`` chains are built of these
#: (and of the op types ``attrs`` gives).
_ONE_INPUT = frozenset({"Identity", "Relu", "Tanh", "Abs", "Neg", "Sigmoid", "Exp", "Erf", "Softmax", "Transpose",
                        "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Softplus", "Softsign", "Elu", "Selu",
                        "LeakyRelu", "HardSigmoid", "HardSwish", "Mish"})


@dataclass
class RuleCase:
    """One generated model holding an instance of a rule's pattern."""

    model: ir.Model
    feeds: dict[str, np.ndarray]
    root: ir.Node
    description: list[str] = field(default_factory=list)

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return f"RuleCase({'; '.join(self.description)})\n{ir.print_model(self.model)}"


class _Builder:
    def __init__(self, draw: Any, shape: tuple[int, ...], attrs: Mapping[str, Mapping[str, Any]],
                 values: Mapping[str, Any], opset: int) -> None:
        self.draw = draw
        self.shape = shape
        self.attrs = attrs
        self.values = values
        self.graph = ir.Graph(name="rule_case")
        self.vars: dict[str, ir.Value] = {}
        self.nodes: dict[int, ir.Node] = {}
        self.named: dict[str, ir.Node] = {}  # nodes of named node patterns, by name
        self.choices: dict[int, int] = {}
        self.notes: list[str] = []
        self.rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        self.count = 0
        self.opset = opset
        self.domains: set[str] = set()

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def node(self, op: str, inputs: list[ir.Value | None], attrs: dict[str, Any] | None = None,
             domain: str = "", outputs: int = 1) -> ir.Node:
        n = ir.Node(op, inputs, attrs or {}, domain=domain, name=self.name(op.lower()),
                    outputs=[self.name("v") for _ in range(outputs)])
        if domain:
            self.domains.add(domain)
        self.graph.append(n)
        return n

    def constant(self, array: np.ndarray, prefix: str = "c") -> ir.Value:
        if self.draw(st.booleans()):
            return self.node("Constant", [], {"value": ir.Tensor(array)}).outputs[0]  # type: ignore[return-value]
        return self.graph.add_initializer(ir.Value(self.name(prefix), const_value=ir.Tensor(array)))

    def var(self, name: str) -> ir.Value:
        v = self.vars.get(name)
        if v is not None:
            return v
        if name in self.values:
            v = self.constant(_as_array(self.values[name]))
        else:
            x = self.graph.add_input(ir.Value(name, ir.TensorType(ir.DataType.FLOAT, self.shape)))
            v = x
            if self.draw(st.booleans()):
                op = self.draw(st.sampled_from(_AROUND))
                v = self.node(op, [x]).outputs[0]  # type: ignore[assignment]
                self.notes.append(f"{name} = {op}(input)")
        self.vars[name] = v  # type: ignore[assignment]
        return v  # type: ignore[return-value]

    def build(self, pat: Any) -> ir.Value | None:
        from passes.framework import pattern as P

        if pat is None:
            return None
        if isinstance(pat, P.Alternatives):
            # One choice per alternative: a shared ``x = Add(h, b) | h`` is the same value everywhere.
            i = self.choices.get(id(pat))
            if i is None:
                i = self.choices[id(pat)] = self.draw(st.integers(0, len(pat.options) - 1))
                self.notes.append(f"alternative {i + 1} of {len(pat.options)}")
            return self.build(pat.options[i])
        if isinstance(pat, P.Var):
            return self.var(pat.name)
        if isinstance(pat, P.Const):
            return self.const(pat)
        if isinstance(pat, P.NodeOutput):
            return self.node_output(pat)
        if isinstance(pat, P.Product):
            return self.product(pat)
        if isinstance(pat, P.Through):
            return self.through(pat)
        raise TypeError(f"cannot instantiate {pat!r}")

    def const(self, pat: Any) -> ir.Value:
        if pat.name and pat.name in self.vars:
            return self.vars[pat.name]
        if pat.name and pat.name in self.values:
            arr = _as_array(self.values[pat.name])
        elif pat.value is not None:
            arr = np.asarray(pat.value, dtype=np.float32)
        else:
            ndim = 0 if pat.ndim is None else pat.ndim
            shape = self.shape[len(self.shape) - ndim:] if ndim else ()
            arr = self.rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
        if pat.predicate is not None:
            assume(bool(pat.predicate(arr)))
        v = self.constant(arr)
        if pat.name:
            self.vars[pat.name] = v
        return v

    def node_output(self, pat: Any) -> ir.Value:
        from passes.framework.pattern import COMMUTATIVE, capture

        np_ = pat.node
        n = self.nodes.get(id(np_))
        if n is None:
            inputs = [self.build(i) for i in np_.inputs]
            if np_.op_type in COMMUTATIVE and len(inputs) == 2 and self.draw(st.booleans()):
                inputs.reverse()
                self.notes.append(f"{np_.op_type} operands swapped")
            attrs: dict[str, Any] = dict(self.attrs.get(np_.op_type, {}))
            for key, want in np_.attrs.items():
                if key in attrs:
                    continue
                if isinstance(want, capture) or callable(want):
                    if callable(want) and not want(None):
                        raise ValueError(f"rule_cases: give attrs={{{np_.op_type!r}: {{{key!r}: ...}}}}: the "
                                         "pattern constrains it by a predicate that an absent value fails")
                    continue  # absent
                attrs[key] = list(want) if isinstance(want, tuple) else want
            op_type = np_.op_type
            if np_.op_types is not None:  # op.any_of: one of its types, at random
                op_type = self.draw(st.sampled_from(sorted(np_.op_types)))
                self.notes.append(f"any_of as {op_type}")
                attrs = {**dict(self.attrs.get(op_type, {})), **attrs}
            n = self.node(op_type, inputs, attrs, np_.domain, np_.num_outputs)  # type: ignore[arg-type]
            self.nodes[id(np_)] = n
            if np_.name:
                self.named[np_.name] = n
        return n.outputs[pat.index]  # type: ignore[return-value]

    def through(self, pat: Any) -> ir.Value:
        """A chain of ``min`` to ``min + 2`` (at most ``max``) one-input nodes of the term's op types
        from the inner value: types from :data:`_ONE_INPUT` or given in ``attrs``, so that each node
        has the data input its walk follows (``follow`` is asked, and a node it will not pass ends
        the chain)."""
        v = self.build(pat.inner)
        assert v is not None
        ops = sorted(o for o in pat.ops if (o in _ONE_INPUT and not pat.domain) or o in self.attrs)
        top = pat.min + 2 if pat.max is None else min(pat.max, pat.min + 2)
        length = self.draw(st.integers(pat.min, top)) if ops else 0
        if length < pat.min:
            raise ValueError(f"rule_cases: through({'/'.join(sorted(pat.ops))}, min={pat.min}) needs one-input "
                             "op types; give attrs={op_type: {...}} for the ones to generate")
        chain = []
        for _ in range(length):
            op = self.draw(st.sampled_from(ops))
            n = self.node(op, [v], dict(self.attrs.get(op, {})), pat.domain)
            passed = pat.follow(n) if pat.follow is not None else n.inputs[0]
            if not (passed is v or (isinstance(passed, (list, tuple)) and any(p is v for p in passed))):
                self.graph.erase(n)
                break
            chain.append(op)
            v = n.outputs[0]  # type: ignore[assignment]
        assume(len(chain) >= pat.min)
        self.notes.append(f"through {'/'.join(sorted(pat.ops))} as [{', '.join(chain)}]")
        return v  # type: ignore[return-value]

    def product(self, pat: Any) -> ir.Value:
        leaves = [self.build(f) for f in pat.factors]
        scale = float(pat.scale)
        how = self.draw(st.sampled_from(["one", "split", "divide"])) if scale != 1.0 else "none"
        if how == "one":
            leaves.append(self.constant(np.array(scale, dtype=np.float32)))
        elif how == "split":
            leaves += [self.constant(np.array(0.5, dtype=np.float32)), self.constant(np.array(scale * 2, dtype=np.float32))]
        order = self.draw(st.permutations(range(len(leaves))))
        items: list[ir.Value] = [leaves[i] for i in order]  # type: ignore[misc]
        while len(items) > 1:
            i = self.draw(st.integers(0, len(items) - 2))
            a, b = items[i], items[i + 1]
            items[i:i + 2] = [self.node("Mul", [a, b]).outputs[0]]  # type: ignore[list-item]
        out = items[0]
        if how == "divide":
            out = self.node("Div", [out, self.constant(np.array(1.0 / scale, dtype=np.float32))]).outputs[0]
        self.notes.append(f"product as {how}, order {list(order)}")
        return out  # type: ignore[return-value]


def _as_array(x: Any) -> np.ndarray:
    """A user's value as a tensor: floats as float32, other dtypes (bool, int64) as given."""
    arr = np.asarray(x)
    return arr.astype(np.float32) if arr.dtype.kind == "f" else arr


@st.composite
def _cases(draw: Any, rule: Any, shape: tuple[int, ...], attrs: Mapping[str, Mapping[str, Any]],
           values: Mapping[str, Any], opset: int) -> RuleCase:
    b = _Builder(draw, shape, attrs, values, opset)
    outs = [b.build(p) for p in rule.outputs]
    root = next(n for n in reversed(b.graph) if any(o is outs[0] for o in n.outputs))
    _read_outside(draw, b, root)
    for i, out in enumerate(outs):
        assert out is not None
        if draw(st.booleans()):
            op = draw(st.sampled_from(_AROUND))
            out = b.node(op, [out]).outputs[0]
            b.notes.append(f"output read by {op}")
        else:
            out = b.node("Identity", [out]).outputs[0]  # a model output is never the pattern's root
        assert out is not None
        out.type = None
        b.graph.outputs.append(out)
    opsets = {"": opset, **{d: 1 for d in b.domains}}
    model = ir.Model(b.graph, ir_version=10, opset_imports=opsets)
    # Through the file format, as a user's model arrives: float attributes become float32, etc.
    model = ir.from_onnx(ir.to_onnx(model))
    root = next(n for n in model.graph if n.name == root.name)
    ir.infer_shapes(model)
    rng = np.random.default_rng(0)
    feeds = {v.name: rng.standard_normal(shape).astype(np.float32) for v in b.graph.inputs}
    return RuleCase(model, feeds, root, b.notes)


def _read_outside(draw: Any, b: _Builder, root: ir.Node) -> None:
    """Sometimes (one case in four) a named interior node's first output is read outside the match
    too, by a model output right after the node or at the end of the graph."""
    named = sorted((name, n) for name, n in b.named.items() if n is not root)
    if not named or draw(st.integers(0, 3)) != 0:
        return
    name, n = draw(st.sampled_from(named))
    op, right_after = draw(st.sampled_from(_AROUND)), draw(st.booleans())
    reader = ir.Node(op, [n.outputs[0]], {}, name=b.name(op.lower()), outputs=[b.name("v")])
    if right_after:
        b.graph.insert_after(n, reader)
    else:
        b.graph.append(reader)
    b.graph.outputs.append(reader.outputs[0])  # type: ignore[arg-type]
    b.notes.append(f"{name} also read by {op} {'right after it' if right_after else 'at the end'}")


def rule_cases(rule: Any, *, shape: tuple[int, ...] = (2, 3, 8), attrs: Mapping[str, Mapping[str, Any]] | None = None,
               values: Mapping[str, Any] | None = None, opset: int = 17) -> st.SearchStrategy[RuleCase]:
    """A strategy of :class:`RuleCase` models holding one instance of ``rule``'s pattern.

    Args:
        rule: a :class:`passes.framework.pattern.PatternRule`.
        shape: the shape of every variable (float32 graph inputs); 1-D constants get the last dim.
        attrs: attributes to set per op type where the pattern constrains them by a predicate.
        values: arrays for bound constants by name (``{"alpha": 1.702}``).
        opset: the default-domain opset the model imports.
    """
    return _cases(rule, tuple(shape), dict(attrs or {}), dict(values or {}), opset)


def _run(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(ir.to_onnx(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, dict(feeds))


def check_rule(rule: Any, case: RuleCase, *, target: Any = "x86", rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Assert that ``rule`` fires on ``case``, keeps numerics in onnxruntime, and is idempotent.

    Instances the rule's ``check`` (or its replacement) refuses are rejected
    (``hypothesis.assume``); a structural failure to match raises ``AssertionError`` with the
    matcher's reason.
    """
    import targets
    from passes.framework.base import PassContext
    from passes.framework.rewriter import Rewriter
    from passes.framework.rules import NoMatch, apply_rules

    tgt = targets.get(target) if isinstance(target, str) else target
    ctx = PassContext(target=tgt, explain=True)
    m = rule.prepare(case.model).match(case.root, ctx)
    # Refused by a check, the target or the replacement: not this property's concern.
    assume(not isinstance(m, NoMatch) or m.score < 1.0)
    try:
        expected = _run(case.model, case.feeds)
    except Exception:  # an instance onnxruntime cannot run (say, an axes input it rejects)
        assume(False)
        raise
    if isinstance(m, NoMatch):
        raise AssertionError(f"rule {rule.name!r} does not match its own pattern: {m.reason}")
    fired = apply_rules(case.model, [rule], ctx, Rewriter(), pass_name=f"check_rule({rule.name})")
    assert fired >= 1, f"rule {rule.name!r} matched but did not fire"
    ir.verify(case.model)
    got = _run(case.model, case.feeds)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, equal_nan=True,
                                   err_msg=f"rule {rule.name!r} changed the numerics")
    again = apply_rules(case.model, [rule], ctx, Rewriter(), pass_name=f"check_rule({rule.name})")
    assert again == 0, f"rule {rule.name!r} fired again on its own output ({again} times)"
