"""fuse-gelu: golden tests on hand-built graphs (every form) and numerics on real exports."""

from __future__ import annotations

import collections
import math

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

import ir
import targets
from conftest import encoder_feeds, ort_run, run_passes
from passes import PassContext, PassManager

H, F = 8, 16
SQRT2 = math.sqrt(2.0)
C = math.sqrt(2.0 / math.pi)


def _model(body: str, opset: int = 17, inits: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A model x[B,S,H] → MatMul(x, W[H,F]) → body → y; ``h`` is the MatMul output, ``b`` a bias."""
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
    g (float[B,S,{H}] x) => (float[B,S,{F}] y) {{
      h = MatMul(x, W)
      {body}
    }}"""
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    data = {"W": rng.standard_normal((H, F)).astype(np.float32), "b": rng.standard_normal(F).astype(np.float32)}
    data.update(inits or {})
    used = {i for n in proto.graph.node for i in n.input}
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in data.items() if k in used)
    return proto


def _consts(**values: float) -> str:
    return "\n".join(f"{k} = Constant <value = float {{{v!r}}}> ()" for k, v in values.items())


ERF_CONSTS = _consts(half=0.5, one=1.0, sq2=SQRT2, isq2=1 / SQRT2, two=2.0)
TANH_CONSTS = _consts(half=0.5, one=1.0, c=C, k=0.044715, three=3.0, ck=C * 0.044715)

# Each body computes y from z; z is h (no bias) or h + b (bias form).
ERF_BODIES = {
    "x*0.5 first": "xh = Mul(z, half)\n u = Div(z, sq2)\n e = Erf(u)\n t = Add(e, one)\n y = Mul(xh, t)",
    "(x*t)*0.5": "u = Div(z, sq2)\n e = Erf(u)\n t = Add(one, e)\n p = Mul(z, t)\n y = Mul(p, half)",
    "x*(0.5*t) (dynamo)": "u = Div(z, sq2)\n e = Erf(u)\n t = Add(e, one)\n q = Mul(half, t)\n y = Mul(z, q)",
    "mul by 0.7071": "u = Mul(isq2, z)\n e = Erf(u)\n t = Add(e, one)\n p = Mul(t, z)\n y = Mul(half, p)",
    "(x*t)/2": "u = Div(z, sq2)\n e = Erf(u)\n t = Add(e, one)\n p = Mul(z, t)\n y = Div(p, two)",
}
TANH_BODIES = {
    "pow, x*0.5 first": (
        "xh = Mul(z, half)\n p3 = Pow(z, three)\n kp = Mul(p3, k)\n w = Add(z, kp)\n u = Mul(w, c)\n"
        " th = Tanh(u)\n t = Add(th, one)\n y = Mul(xh, t)"
    ),
    "x*x*x, (x*t)*0.5": (
        "x2 = Mul(z, z)\n p3 = Mul(z, x2)\n kp = Mul(k, p3)\n w = Add(kp, z)\n u = Mul(c, w)\n"
        " th = Tanh(u)\n t = Add(one, th)\n p = Mul(z, t)\n y = Mul(p, half)"
    ),
    "distributed constants": (
        "p3 = Pow(z, three)\n a1 = Mul(z, c)\n a2 = Mul(ck, p3)\n u = Add(a1, a2)\n"
        " th = Tanh(u)\n t = Add(th, one)\n q = Mul(half, t)\n y = Mul(z, q)"
    ),
}


def _run(proto: onnx.ModelProto, target: str) -> tuple[ir.Model, bool, PassContext]:
    return run_passes(proto, "fuse-gelu", target)


def _rerun_unmodified(model: ir.Model, target: str) -> None:
    records = PassManager("fuse-gelu", verify=True, check_modified=True).run(model, PassContext(target=targets.get(target)))
    assert records[0].modified is False


def _check_numerics(original: onnx.ModelProto, model: ir.Model) -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, H)).astype(np.float32) * 3
    ref = ort_run(original.SerializeToString(), {"x": x})["y"]
    got = ort_run(ir.to_onnx(model).SerializeToString(), {"x": x})["y"]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def _ops(model: ir.Model) -> collections.Counter[tuple[str, str]]:
    return collections.Counter((n.domain, n.op_type) for n in model.graph)


def _body(body: str, bias: bool, consts: str) -> str:
    return consts + ("\n z = Add(h, b)\n" if bias else "\n z = Identity(h)\n") + body


@pytest.mark.parametrize("bias", [False, True], ids=["plain", "bias"])
@pytest.mark.parametrize("form", list(ERF_BODIES))
def test_erf_gelu_contrib(form: str, bias: bool) -> None:
    proto = _model(_body(ERF_BODIES[form], bias, ERF_CONSTS))
    model, modified, _ = _run(proto, "x86")
    assert modified
    ops = _ops(model)
    if bias:
        assert ops[("com.microsoft", "BiasGelu")] == 1 and ops[("", "Add")] == 0
        biasgelu = next(n for n in model.graph if n.op_type == "BiasGelu")
        assert biasgelu.inputs[0].producer().op_type == "MatMul"
    else:
        assert ops[("com.microsoft", "Gelu")] == 1
    assert ops[("", "Erf")] == 0 and ops[("", "Mul")] == 0 and ops[("", "Div")] == 0
    assert model.opset_imports.get("com.microsoft") == 1
    _check_numerics(proto, model)
    _rerun_unmodified(model, "x86")


@pytest.mark.parametrize("bias", [False, True], ids=["plain", "bias"])
@pytest.mark.parametrize("form", list(TANH_BODIES))
def test_tanh_gelu_contrib(form: str, bias: bool) -> None:
    proto = _model(_body(TANH_BODIES[form], bias, TANH_CONSTS))
    model, modified, _ = _run(proto, "x86")
    assert modified
    fast = [n for n in model.graph if n.op_type == "FastGelu"]
    assert len(fast) == 1 and fast[0].domain == "com.microsoft"
    assert len(fast[0].inputs) == (2 if bias else 1)
    assert not any(n.op_type in ("Tanh", "Pow", "Gelu", "BiasGelu") for n in model.graph)
    _check_numerics(proto, model)
    _rerun_unmodified(model, "x86")


@pytest.mark.parametrize("approx,bodies,consts", [("none", ERF_BODIES, ERF_CONSTS), ("tanh", TANH_BODIES, TANH_CONSTS)])
def test_onnx_target_opset20_standard_gelu(approx: str, bodies: dict[str, str], consts: str) -> None:
    for body in bodies.values():
        proto = _model(_body(body, True, consts), opset=20)
        model, modified, _ = _run(proto, "onnx")
        assert modified
        gelus = [n for n in model.graph if n.op_type == "Gelu"]
        assert len(gelus) == 1 and gelus[0].domain == "" and gelus[0].attr("approximate") == approx
        assert "com.microsoft" not in model.opset_imports
        # No contrib ops: the bias Add stays in front of the standard op.
        assert gelus[0].inputs[0].producer().op_type == "Add"
        _check_numerics(proto, model)
        _rerun_unmodified(model, "onnx")


def test_onnx_target_old_opset_keeps_pattern_and_explains() -> None:
    proto = _model(_body(ERF_BODIES["x*0.5 first"], False, ERF_CONSTS), opset=17)
    model, modified, ctx = _run(proto, "onnx")
    assert not modified
    assert any("opset 20" in d.message for d in ctx.diagnostics)


@pytest.mark.parametrize("approx,op", [("none", "Gelu"), ("tanh", "FastGelu")])
@pytest.mark.parametrize("bias", [False, True], ids=["plain", "bias"])
def test_standard_gelu_to_contrib(approx: str, op: str, bias: bool) -> None:
    proto = _model(("z = Add(h, b)" if bias else "z = Identity(h)") + f'\n y = Gelu <approximate = "{approx}"> (z)', opset=20)
    model, modified, _ = _run(proto, "x86")
    assert modified
    expected = "BiasGelu" if bias and op == "Gelu" else op
    fused = [n for n in model.graph if n.op_type == expected and n.domain == "com.microsoft"]
    assert len(fused) == 1 and len(fused[0].inputs) == (2 if bias else 1)
    assert not any(n.domain == "" and n.op_type in ("Gelu", "Add") for n in model.graph)
    _check_numerics(proto, model)
    _rerun_unmodified(model, "x86")


@pytest.mark.parametrize(
    "body",
    [
        # 0.6 instead of 0.5: not GELU.
        _consts(half=0.6, one=1.0, sq2=SQRT2) + "\n u = Div(h, sq2)\n e = Erf(u)\n t = Add(e, one)\n xh = Mul(h, half)\n y = Mul(xh, t)",
        # Erf of x/2, not x/√2.
        _consts(half=0.5, one=1.0, sq2=2.0) + "\n u = Div(h, sq2)\n e = Erf(u)\n t = Add(e, one)\n xh = Mul(h, half)\n y = Mul(xh, t)",
        # The erf term is read elsewhere: fusing would lose it.
        _consts(half=0.5, one=1.0, sq2=SQRT2) + "\n u = Div(h, sq2)\n e = Erf(u)\n t = Add(e, one)\n xh = Mul(h, half)\n"
        " g = Mul(xh, t)\n y = Add(g, e)",
        # tanh form with the wrong cubic coefficient.
        _consts(half=0.5, one=1.0, c=C, k=0.05, three=3.0) + "\n p3 = Pow(h, three)\n kp = Mul(p3, k)\n w = Add(h, kp)\n"
        " u = Mul(w, c)\n th = Tanh(u)\n t = Add(th, one)\n xh = Mul(h, half)\n y = Mul(xh, t)",
        # Nothing GELU-like at all.
        "y = Relu(h)",
    ],
    ids=["scale-0.6", "erf-of-x/2", "erf-read-elsewhere", "wrong-cubic", "relu"],
)
def test_not_gelu_is_left_alone(body: str) -> None:
    proto = _model(body, opset=20)
    for target in ("x86", "onnx"):
        model, modified, _ = _run(proto, target)
        assert not modified
        assert not any("Gelu" in n.op_type for n in model.graph)


def test_near_miss_is_explained() -> None:
    body = _consts(half=0.5, one=1.0, sq2=2.0) + "\n u = Div(h, sq2)\n e = Erf(u)\n t = Add(e, one)\n xh = Mul(h, half)\n y = Mul(xh, t)"
    _, _, ctx = _run(_model(body), "x86")
    # The Erf argument is x/2, not x/√2: the near miss names the rule and the constant it wanted.
    assert any("gelu-erf" in d.message and "0.707107" in d.message for d in ctx.diagnostics)


# ---------------------------------------------------------------------------------------------- #
# Real exports
# ---------------------------------------------------------------------------------------------- #

PIPELINE = "dead-flow,fold-constants,simplify,fuse-layer-norm,fuse-gelu,dead-flow"
#: arch → (layers, contrib op the GELU becomes). GPT-2's c_fc is a Gemm with its bias inside, so
#: its FastGelu has no bias input; BERT-like FFNs are MatMul + Add(bias) → BiasGelu.
GELU_ARCHS = {"minilm": (6, "BiasGelu"), "bert": (2, "BiasGelu"), "distilbert": (2, "BiasGelu"), "gpt2": (2, "FastGelu")}


def _pipeline() -> str:
    from passes import registered_passes

    have = registered_passes()
    return ",".join(p for p in PIPELINE.split(",") if p in have)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["ts", "dynamo"])
@pytest.mark.parametrize("arch", list(GELU_ARCHS))
def test_real_exports(exported, arch: str, dynamo: bool) -> None:
    path = exported(arch, dynamo=dynamo)
    model = ir.load(str(path))
    PassManager(_pipeline(), verify=True, check_modified=True).run(model, PassContext(target=targets.get("x86")))
    layers, op = GELU_ARCHS[arch]
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops[op] == layers, ops
    assert ops["Erf"] == ops["Tanh"] == 0
    feeds = encoder_feeds(2, 16, 30522 if arch == "minilm" else 1000)
    ref = ort_run(str(path), feeds)
    got = ort_run(ir.to_onnx(model).SerializeToString(), feeds)
    for name, r in ref.items():
        assert np.max(np.abs(got[name] - r)) <= 1e-4, name
