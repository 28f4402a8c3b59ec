"""The pass machinery: pipeline strings, the registry, the manager's instrumentation."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

import ir
from passes import (
    Fixpoint, Pass, PassContext, PassError, PassManager, PassResult, Rewriter, format_pipeline,
    get_pass_class, parse_pipeline, register_pass, registered_passes,
)


def _model() -> ir.Model:
    g = ir.Graph(name="g")
    x = g.add_input(ir.Value("x", ir.TensorType(ir.DataType.FLOAT, (2, 3))))
    a = g.append(ir.Node("Identity", [x], name="id", outputs=["a"]))
    b = g.append(ir.Node("Relu", [a.outputs[0]], name="relu", outputs=["b"]))
    g.append(ir.Node("Neg", [x], name="dead", outputs=["unused"]))
    g.outputs.append(b.outputs[0])
    return ir.Model(g, opset_imports={"": 17})


@register_pass
@dataclass(frozen=True)
class _LyingPass(Pass):
    """Changes the IR but says it did not."""

    name: ClassVar[str] = "test-lying"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        for n in model.graph:
            n.name = n.name + "_x"
        return PassResult(modified=False)


@register_pass
@dataclass(frozen=True)
class _CrashingPass(Pass):
    name: ClassVar[str] = "test-crash"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        raise RuntimeError("boom")


@register_pass
@dataclass(frozen=True)
class _BreakingPass(Pass):
    """Leaves a node reading a value that is defined after it."""

    name: ClassVar[str] = "test-break-order"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        rw = Rewriter()
        nodes = list(model.graph)
        rw.move_before(nodes[0], nodes[1])
        return rw.result()


@register_pass
@dataclass(frozen=True)
class _OptionsPass(Pass):
    name: ClassVar[str] = "test-options"
    flag: bool = False
    count: int = 3
    ratio: float = 0.5
    label: str = "x"
    axes: tuple[int, ...] = ()

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return PassResult(modified=False)


def test_pipeline_parses_options_with_types() -> None:
    (p,) = parse_pipeline("test-options{flag=true, count=7,ratio=0.25,label=hello,axes=1:2}")
    assert p == _OptionsPass(flag=True, count=7, ratio=0.25, label="hello", axes=(1, 2))
    assert format_pipeline([p]) == "test-options{flag=true,count=7,ratio=0.25,label=hello,axes=1:2}"
    assert parse_pipeline(format_pipeline([p])) == [p]


def test_pipeline_fixpoint_nests_and_round_trips() -> None:
    items = parse_pipeline("dead-flow, fixpoint{max=3}(dead-flow,test-options),dead-flow")
    assert isinstance(items[1], Fixpoint) and items[1].max_iterations == 3
    assert format_pipeline(items) == "dead-flow,fixpoint{max=3}(dead-flow,test-options),dead-flow"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-such-pass", "unknown pass 'no-such-pass'"),
        ("dead-flow,", "expected a pass name"),
        ("test-options{nope=1}", "has no option 'nope'"),
        ("test-options{count=abc}", "option 'count'"),
        ("test-options{flag=maybe}", "expected true or false"),
        ("test-options{count=1,count=2}", "given twice"),
        ("fixpoint(dead-flow", "expected ')'"),
        ("dead-flow dead-flow", "expected ',' or the end"),
    ],
)
def test_bad_pipelines_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(PassError, match="bad pipeline") as e:
        parse_pipeline(spec)
    assert message in str(e.value)


def test_registry_lists_builtins_and_rejects_bad_names() -> None:
    names = registered_passes()
    assert "dead-flow" in names
    assert get_pass_class("dead-flow") is names["dead-flow"]

    with pytest.raises(PassError, match="kebab-case"):

        @register_pass
        @dataclass(frozen=True)
        class Bad(Pass):
            name: ClassVar[str] = "Bad Name"


def test_manager_records_and_check_modified_catches_a_lie() -> None:
    m = _model()
    records = PassManager("dead-flow,dead-flow", check_modified=True).run(m)
    assert [r.modified for r in records] == [True, False]
    assert [n.op_type for n in m.graph] == ["Identity", "Relu"]
    with pytest.raises(PassError, match="reported modified=False but the IR changed"):
        PassManager("test-lying", check_modified=True).run(_model())


def test_manager_crash_writes_a_reproducer_and_names_passes_that_ran(tmp_path) -> None:
    with pytest.raises(PassError) as e:
        PassManager("dead-flow,test-crash", reproducer_dir=str(tmp_path)).run(_model())
    msg = str(e.value)
    assert "pass 'test-crash' failed: boom" in msg
    assert "passes already run: dead-flow" in msg
    repro = tmp_path / "reproducer-test-crash.onnx"
    assert str(repro) in msg and repro.is_file()
    # The reproducer is the IR before the failing pass: the dead node is already gone.
    again = ir.load(repro)
    assert [n.op_type for n in again.graph] == ["Identity", "Relu"]
    assert (tmp_path / "reproducer-test-crash.onnx.pipeline").read_text().strip() == "test-crash"


def test_manager_reuses_the_snapshot_while_passes_change_nothing(tmp_path, monkeypatch) -> None:
    taken = []
    real = ir.Snapshot

    def counting(model):
        taken.append(1)
        return real(model)

    monkeypatch.setattr(ir, "Snapshot", counting)
    with pytest.raises(PassError):
        # dead-flow changes the model, the second finds nothing: its snapshot serves the crash.
        PassManager("dead-flow,dead-flow,test-crash", reproducer_dir=str(tmp_path)).run(_model())
    assert len(taken) == 2
    # ... and it is the model the failing pass saw, the dead node gone.
    assert [n.op_type for n in ir.load(tmp_path / "reproducer-test-crash.onnx").graph] == ["Identity", "Relu"]


def test_manager_verifies_after_each_pass() -> None:
    with pytest.raises(PassError, match="left an invalid IR.*topological order"):
        PassManager("test-break-order").run(_model())
    # Without verification the broken IR goes unnoticed by the manager.
    PassManager("test-break-order", verify=False).run(_model())


def test_manager_verifies_only_what_a_pass_changed(monkeypatch) -> None:
    seen = []
    real = ir.verify
    monkeypatch.setattr(ir, "verify", lambda m: (seen.append(1), real(m)))
    # The first pass's output is verified although unchanged (the input never was); then only changes.
    PassManager("fuse-gelu,dead-flow,dead-flow,fuse-gelu").run(_model())
    assert len(seen) == 2


def test_print_ir_after_change_prints_only_changes() -> None:
    out = io.StringIO()
    PassManager("dead-flow,dead-flow", print_ir_after_change=True, out=out).run(_model())
    text = out.getvalue()
    assert text.count("IR after dead-flow") == 1
    assert "Relu" in text and "Neg" not in text


def test_fixpoint_stops_when_nothing_changes() -> None:
    m = _model()
    records = PassManager("fixpoint(dead-flow)").run(m)
    assert [r.modified for r in records] == [True, False]


def test_rewriter_counts_changes() -> None:
    m = _model()
    rw = Rewriter()
    assert not rw.result().modified
    ident = next(n for n in m.graph if n.op_type == "Identity")
    rw.replace_all_uses_with(ident.outputs[0], ident.inputs[0])
    assert rw.result().modified
    rw2 = Rewriter()
    unused = ir.Value("nobody")
    rw2.replace_all_uses_with(unused, ident.inputs[0])  # nothing reads it: no change
    assert not rw2.result().modified
    c = rw2.constant(m.graph, np.zeros(3, np.float32), name="z")
    assert c.is_initializer() and rw2.result().modified


def test_reproducer_carries_large_tensors_taken_by_reference(tmp_path) -> None:
    m = _model()
    w = np.arange(32 * 32, dtype=np.float32).reshape(32, 32)  # 4 KiB: kept by reference in the snapshot
    m.graph.constant(w, name="big")
    with pytest.raises(PassError):
        PassManager("test-crash", reproducer_dir=str(tmp_path)).run(m)
    again = ir.load(tmp_path / "reproducer-test-crash.onnx")
    np.testing.assert_array_equal(again.graph.initializers["big"].const_value.numpy(), w)


def test_with_options_sets_typed_pass_fields_and_refuses_unknown_ones() -> None:
    from passes.framework.pipeline import with_options

    items = with_options(parse_pipeline("dead-flow,fixpoint(quantize),quantize"), "quantize",
                         {"min_cosine": "0.99", "exclude": ["a", "b"]})
    quantizes = [items[1].items[0], items[2]]
    assert all(q.min_cosine == 0.99 and q.exclude == ("a", "b") for q in quantizes)
    with pytest.raises(PassError, match="has no option 'budget'"):
        with_options(parse_pipeline("quantize"), "quantize", {"budget": 1})
    with pytest.raises(PassError, match="option 'min_cosine'"):
        with_options(parse_pipeline("quantize"), "quantize", {"min_cosine": "high"})
