"""``python -m passes.compile``: bad input gets one line and exit 2; good input a report and a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, parser

import ir
import passes

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "passes.compile", *args] if code is None else [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


SMALL = """
<ir_version: 8, opset_import: ["" : 17]>
small (float[N, 4] x) => (float[N, 4] y) {
  w = Constant <value = float[4] {1.0, 2.0, 3.0, 4.0}> ()
  i = Identity(x)
  s = Add(i, w)
  dead = Neg(s)
  y = Relu(s)
}
"""


def _write(tmp_path: Path, name: str, model: onnx.ModelProto) -> Path:
    p = tmp_path / name
    p.write_bytes(model.SerializeToString())
    return p


def _assert_bad(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("compile: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def _cyclic() -> onnx.ModelProto:
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["a"], name="first"), helper.make_node("Relu", ["a"], ["b"], name="second")],
        "cyc", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [2])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _undefined() -> onnx.ModelProto:
    g = helper.make_graph(
        [helper.make_node("Relu", ["ghost"], ["y"], name="reader")], "undef",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _unknown_op(domain: str) -> onnx.ModelProto:
    g = helper.make_graph(
        [helper.make_node("FrobnicateX", ["x"], ["y"], name="frob", domain=domain)], "unk",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(g, opset_imports=opsets)


def test_missing_file(tmp_path: Path) -> None:
    _assert_bad(_cli(str(tmp_path / "nope.onnx")), "no such file")


def test_truncated_and_foreign_files(tmp_path: Path) -> None:
    good = parser.parse_model(SMALL).SerializeToString()
    (tmp_path / "trunc.onnx").write_bytes(good[: len(good) // 2])
    _assert_bad(_cli(str(tmp_path / "trunc.onnx"), "-o", str(tmp_path / "o.onnx")), "trunc.onnx")
    (tmp_path / "text.onnx").write_text("this is not a model\n" * 10)
    _assert_bad(_cli(str(tmp_path / "text.onnx"), "-o", str(tmp_path / "o.onnx")), "text.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_cyclic_model_names_a_node(tmp_path: Path) -> None:
    p = _write(tmp_path, "cyc.onnx", _cyclic())
    _assert_bad(_cli(str(p)), "cycle", "'first'")
    assert not (tmp_path / "cyc.x86.onnx").exists()


def test_undefined_value_names_node_and_value(tmp_path: Path) -> None:
    _assert_bad(_cli(str(_write(tmp_path, "u.onnx", _undefined()))), "'reader'", "%ghost")


def test_op_missing_from_opset_and_unknown_domains_are_refused(tmp_path: Path) -> None:
    _assert_bad(_cli(str(_write(tmp_path, "std.onnx", _unknown_op("")))), "'frob'", "FrobnicateX", "opset 17")
    p = _write(tmp_path, "custom.onnx", _unknown_op("com.example"))
    out = tmp_path / "custom.out.onnx"
    _assert_bad(_cli(str(p), "--target", "x86", "--no-verify", "-o", str(out)),
                "'frob'", "domain 'com.example' is not provided by target x86", "--allow-domain com.example")
    assert not out.exists()
    # A runtime with a custom op library provides the domain: --allow-domain accepts it.
    proc = _cli(str(p), "--pipeline", "dead-flow,simplify", "--no-verify", "--allow-domain", "com.example", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    m = onnx.load(out)
    assert [(n.domain, n.op_type) for n in m.graph.node] == [("com.example", "FrobnicateX")]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--target", "tpu"], "unknown target 'tpu'"),
        (["--pipeline", "dead-flow,,"], "bad pipeline"),
        (["--pipeline", "no-such-pass"], "unknown pass 'no-such-pass'"),
        (["--static-shapes", "batch=one"], "must be an integer"),
    ],
)
def test_bad_options(tmp_path: Path, args: list[str], needle: str) -> None:
    p = _write(tmp_path, "small.onnx", parser.parse_model(SMALL))
    _assert_bad(_cli(str(p), *args), needle)
    assert not (tmp_path / "small.x86.onnx").exists()


def test_compiles_small_model_with_report(tmp_path: Path) -> None:
    p = _write(tmp_path, "small.onnx", parser.parse_model(SMALL))
    report = tmp_path / "r.json"
    proc = _cli(str(p), "--pipeline", "dead-flow,fold-constants,simplify,dead-flow", "--report", str(report), "--timing")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "small.x86.onnx"  # the default output path
    assert out.is_file() and f"wrote {out}" in proc.stdout
    assert "verify (onnxruntime" in proc.stdout and "-> OK" in proc.stdout
    data = json.loads(report.read_text())
    assert data["nodes_before"] == 5 and data["nodes_after"] < 5
    assert data["ops_after"].get("Neg", 0) == 0 and data["verification"]["ok"] is True
    assert [p["pass"] for p in data["passes"]] == ["dead-flow", "fold-constants", "simplify", "dead-flow"]
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    import onnxruntime as ort

    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, np.maximum(x + np.array([1, 2, 3, 4], np.float32), 0), rtol=1e-6)


def test_print_ir_after_change(tmp_path: Path) -> None:
    p = _write(tmp_path, "small.onnx", parser.parse_model(SMALL))
    proc = _cli(str(p), "--pipeline", "dead-flow,dead-flow", "--print-ir-after-change", "--quiet")
    assert proc.returncode == 0
    assert proc.stderr.count("IR after dead-flow") == 1


WRONG_PASS = """
import sys
from dataclasses import dataclass
from typing import ClassVar
import numpy as np
import ir
from passes import Pass, Rewriter, register_pass
from passes.tools.compile import main

@register_pass
@dataclass(frozen=True)
class Wrong(Pass):
    name: ClassVar[str] = "make-it-wrong"
    def run(self, model, ctx):
        rw = Rewriter()
        relu = next(n for n in model.graph if n.op_type == "Relu")
        rw.replace_input(relu, 0, rw.constant(model.graph, np.zeros(4, np.float32), name="zeros"))
        return rw.result()

sys.exit(main(sys.argv[1:]))
"""


def test_out_of_tolerance_is_not_written_unless_forced(tmp_path: Path) -> None:
    p = _write(tmp_path, "small.onnx", parser.parse_model(SMALL))
    out = tmp_path / "wrong.onnx"
    proc = _cli(str(p), "--pipeline", "make-it-wrong", "-o", str(out), code=WRONG_PASS)
    assert proc.returncode == 1 and "outside tolerance" in proc.stderr
    assert not out.exists()
    proc = _cli(str(p), "--pipeline", "make-it-wrong", "-o", str(out), "--force", code=WRONG_PASS)
    assert proc.returncode == 0 and out.is_file()


def test_a_pipeline_that_quantizes_is_verified_against_its_budget(tmp_path: Path) -> None:
    """``--pipeline`` with a quantize pass (no ``--quantize``) is held to that pass's budget, as
    ``--quantize int8`` is, not to fp32's 1e-4: int8 weights move outputs by ~1%."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "mm",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 32])], [w])
    p = _write(tmp_path, "mm.onnx", helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    out = tmp_path / "mm.int8.onnx"
    proc = _cli(str(p), "--target", "x86-avx2", "--pipeline", "quantize{sensitivity=false,min_cosine=0.99},dead-flow",
                "-o", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verify" in proc.stdout and "OK" in proc.stdout and out.is_file()
    assert "DynamicQuantizeMatMul" in {n.op_type for n in onnx.load(str(out)).graph.node}


def test_list_targets_and_passes() -> None:
    proc = _cli("--list-targets")
    assert proc.returncode == 0 and "x86-avx512vnni" in proc.stdout and "pipeline:" in proc.stdout
    proc = _cli("--list-passes")
    assert proc.returncode == 0 and "dead-flow" in proc.stdout


def test_compile_model_api_on_ir_model() -> None:
    m = ir.from_onnx(parser.parse_model(SMALL))
    res = passes.compile_model(m, "onnx", pipeline="dead-flow")
    assert res.model is m and res.report.verified_ok
    assert res.report.ops_before["Neg"] == 1 and res.report.ops_after["Neg"] == 0
    assert "nodes" in res.report.format()


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_minilm_end_to_end(exported, tmp_path: Path, dynamo: bool) -> None:
    src = exported("minilm", dynamo=dynamo)
    out = tmp_path / "minilm.x86.onnx"
    report = tmp_path / "r.json"
    proc = _cli(str(src), "--target", "x86", "-o", str(out), "--report", str(report))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(report.read_text())
    assert data["verification"]["ok"] and data["verification"]["max_abs"] <= 1e-4
    assert data["nodes_after"] < data["nodes_before"] / 2
    assert out.is_file()


# --------------------------------------------------------------------------------------------- #
# Exit codes beyond bad input: onnxruntime failures (2), internal errors (3), file modes
# --------------------------------------------------------------------------------------------- #

FAILING_PASSES = """
import sys
from dataclasses import dataclass
from typing import ClassVar
from passes import Pass, PassError, Rewriter, register_pass
from passes.tools.compile import main

@register_pass
@dataclass(frozen=True)
class Crash(Pass):
    name: ClassVar[str] = "crash-it"
    def run(self, model, ctx):
        return {}["boom"]

@register_pass
@dataclass(frozen=True)
class Refuse(Pass):
    name: ClassVar[str] = "refuse-it"
    def run(self, model, ctx):
        raise PassError("refuse-it needs a calibration file")

@register_pass
@dataclass(frozen=True)
class Unrunnable(Pass):
    name: ClassVar[str] = "unrunnable"
    def run(self, model, ctx):
        next(n for n in model.graph if n.op_type == "Relu").op_type = "Frobnicate"
        return Rewriter().result()

sys.exit(main(sys.argv[1:]))
"""


def _assert_internal(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("compile: ")]
    assert len(lines) == 1 and lines[0].startswith("internal error"), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_a_crashing_pass_is_an_internal_error_with_a_reproducer(tmp_path: Path) -> None:
    p = _write(tmp_path, "small.onnx", parser.parse_model(SMALL))
    out = tmp_path / "out.onnx"
    line = _assert_internal(_cli(str(p), "--pipeline", "dead-flow,crash-it", "-o", str(out), code=FAILING_PASSES),
                            "internal error in pass crash-it: KeyError", "; reproducer: ")
    assert not out.exists()
    repro = Path(line.rsplit("; reproducer: ", 1)[1])
    assert repro.is_file() and repro.with_name(repro.name + ".traceback").is_file()
    ir.load(repro)


def test_a_pass_refusing_with_a_reason_is_bad_input(tmp_path: Path) -> None:
    p = _write(tmp_path, "small.onnx", parser.parse_model(SMALL))
    _assert_bad(_cli(str(p), "--pipeline", "refuse-it", code=FAILING_PASSES), "refuse-it needs a calibration file")


def test_a_compiled_model_that_does_not_run_is_an_internal_error(tmp_path: Path) -> None:
    p = _write(tmp_path, "small.onnx", parser.parse_model(SMALL))
    out = tmp_path / "out.onnx"
    _assert_internal(_cli(str(p), "--pipeline", "unrunnable", "-o", str(out), code=FAILING_PASSES),
                     "the compiled model does not run in onnxruntime, although the original does", "Frobnicate")
    assert not out.exists()


def _in_process(*args: str) -> tuple[int, str, str]:
    import contextlib
    import io

    from passes.tools.compile import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_an_unexpected_error_outside_passes_is_an_internal_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from passes.tools import compile as compile_tool

    def boom(model: ir.Model) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(compile_tool, "op_counts", boom)
    p = _write(tmp_path, "small.onnx", parser.parse_model(SMALL))
    code, _, err = _in_process(str(p), "-o", str(tmp_path / "out.onnx"), "--quiet")
    assert code == 3 and not (tmp_path / "out.onnx").exists()
    [line] = err.splitlines()
    assert line.startswith("internal error: RuntimeError: boom; second line; traceback: ")
    trace = Path(line.rsplit("; traceback: ", 1)[1])
    assert "RuntimeError: boom" in trace.read_text()
    trace.unlink()


def test_original_model_that_onnxruntime_cannot_load(tmp_path: Path) -> None:
    # Valid ONNX (Relu exists in opset 1), but onnxruntime has no kernel for it.
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="old_relu")], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 1)])
    m.ir_version = 3
    p = _write(tmp_path, "old.onnx", m)
    code, _, err = _in_process(str(p), "-o", str(tmp_path / "out.onnx"), "--quiet", "--target", "onnx")
    assert code == 2 and not (tmp_path / "out.onnx").exists()
    [line] = err.splitlines()
    assert line.startswith("error: the original model does not load in onnxruntime: ") and "Relu" in line, line


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_umask_mode(tmp_path: Path, umask: int) -> None:
    p = _write(tmp_path, "small.onnx", parser.parse_model(SMALL))
    old = os.umask(umask)
    try:
        code, _, err = _in_process(str(p), "--pipeline", "dead-flow", "-o", str(tmp_path / "out.onnx"), "--quiet",
                                   "--external-data")
        m = ir.from_onnx(parser.parse_model(SMALL))
        ir.save(m, tmp_path / "direct.onnx")
    finally:
        os.umask(old)
    assert code == 0, err
    for name in ("out.onnx", "out.onnx.data", "direct.onnx"):
        if (tmp_path / name).exists() or name != "out.onnx.data":
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_unwritable_report_is_bad_input(tmp_path: Path) -> None:
    p = _write(tmp_path, "small.onnx", parser.parse_model(SMALL))
    code, _, err = _in_process(str(p), "--pipeline", "dead-flow", "-o", str(tmp_path / "out.onnx"), "--quiet",
                               "--report", str(tmp_path / "no" / "such" / "r.json"))
    assert code == 2 and err.startswith("error: cannot write the report") and len(err.splitlines()) == 1


def test_onnxruntime_logs_nothing_of_its_own(tmp_path: Path) -> None:
    """An allocation overflow in onnxruntime: one line from us, nothing from its process-wide logger."""
    g = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["z"], name="fill"),
         helper.make_node("ReduceSum", ["z"], ["s"], name="sum", keepdims=0),
         helper.make_node("Add", ["x", "s"], ["y"], name="add")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array([2**62], np.int64), "shape")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    p = _write(tmp_path, "huge.onnx", m)
    _assert_bad(_cli(str(p), "-o", str(tmp_path / "o.onnx")),
                "the original model does not run in onnxruntime", "node 'fill' (ConstantOfShape)", "overflow")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("message, expected", [
    ("[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model from /tmp/m.onnx failed:This is an invalid model. "
     'In Node, ("node_Shape_2", Shape, "", -1) : ("x": tensor(int64),) -> ("v": tensor(int64),) , '
     "Error Unrecognized attribute: axis for operator Shape",
     "node 'node_Shape_2' (Shape): Unrecognized attribute: axis for operator Shape"),
    ("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Reshape node. Name:'r' "
     "Status Message: /onnxruntime_src/onnxruntime/core/providers/cpu/tensor/reshape_helper.h:91 "
     "onnxruntime::ReshapeHelper::ReshapeHelper(const onnxruntime::TensorShape&, onnxruntime::TensorShapeVector&, "
     "bool) input_shape_size == requested_shape_size was false. The input tensor cannot be reshaped",
     "node 'r' (Reshape): input_shape_size == requested_shape_size was false. The input tensor cannot be reshaped"),
    ("[ONNXRuntimeError] : 1 : FAIL : Load model from m.onnx failed:Node (g) Op (Gather) [ShapeInferenceError] "
     "axis must be in [-r, r-1]", "node 'g' (Gather): [ShapeInferenceError] axis must be in [-r, r-1]"),
    ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: ids for the following indices\n"
     " index: 0 Got: 2 Expected: 1\n Please fix either the inputs/outputs or the model.",
     "Got invalid dimensions for input: ids for the following indices; index: 0 Got: 2 Expected: 1; "
     "Please fix either the inputs/outputs or the model."),
])
def test_onnxruntime_errors_in_one_line(message: str, expected: str) -> None:
    from passes.framework.numerics import describe_ort_error

    assert describe_ort_error(RuntimeError(message)) == expected
