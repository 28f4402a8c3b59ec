"""fuse-layer-norm: golden tests on hand-built graphs (every variant) and numerics on real exports."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

import ir
import targets
from conftest import encoder_feeds, ort_run, run_passes
from passes import PassContext, PassManager

H = 8
EPS = 1e-5


def _model(body: str, opset: int = 17, *, outputs: str = f"float[B,S,{H}] y", shapes: bool = True) -> onnx.ModelProto:
    """A model of inputs x, r [B,S,H] running ``body``; weights W, gamma, beta, bias as initializers."""
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
    g (float[B,S,{H}] x, float[B,S,{H}] r) => ({outputs}) {{
      {body}
    }}"""
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    data = {
        "W": rng.standard_normal((H, H)).astype(np.float32),
        "gamma": (1 + 0.1 * rng.standard_normal(H)).astype(np.float32),
        "beta": rng.standard_normal(H).astype(np.float32),
        "bias": rng.standard_normal(H).astype(np.float32),
        "table": rng.standard_normal((32, H)).astype(np.float32),
        "axes": np.array([-1], np.int64),
    }
    used = {i for n in proto.graph.node for i in n.input}
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in data.items() if k in used)
    if shapes:  # dynamo-like: every value typed (TorchScript-like models rely on the pass inferring them)
        proto = onnx.shape_inference.infer_shapes(proto)
    return proto


def _consts(**values: float) -> str:
    return "\n".join(f"{k} = Constant <value = float {{{v!r}}}> ()" for k, v in values.items())


CONSTS = _consts(two=2.0, eps=EPS, one=1.0)


def _ln(x: str, out: str, *, square: str = "pow", div: str = "div", axes: str = "attr", gamma: bool = True,
        beta: bool = True) -> str:
    """Decomposed LayerNorm of ``x`` into ``out`` in the requested variant."""
    mean = "ReduceMean <axes = [-1]> ({})" if axes == "attr" else "ReduceMean ({}, axes)"
    lines = [f"m1 = {mean.format(x)}", f"d = Sub({x}, m1)"]
    lines.append("sq = Pow(d, two)" if square == "pow" else "sq = Mul(d, d)")
    lines += [f"v = {mean.format('sq')}", "ve = Add(v, eps)", "s = Sqrt(ve)"]
    lines += ["n = Div(d, s)"] if div == "div" else ["rs = Reciprocal(s)", "n = Mul(d, rs)"]
    cur = "n"
    if gamma:
        lines.append(f"ng = Mul({cur}, gamma)" if beta else f"{out} = Mul({cur}, gamma)")
        cur = "ng"
    if beta:
        lines.append(f"{out} = Add(beta, {cur})")
    elif not gamma:
        lines[-1] = lines[-1].replace("n = ", f"{out} = ")
    return "\n".join(lines)


def _rms(x: str, out: str, *, square: str = "pow", div: str = "reciprocal", cast: bool = False,
         axes: str = "attr") -> str:
    """Decomposed RMSNorm of ``x`` into ``out`` (Llama's forms)."""
    lines = [f"xc = Cast <to = 1> ({x})"] if cast else []
    xc = "xc" if cast else x
    lines.append(f"sq = Pow({xc}, two)" if square == "pow" else f"sq = Mul({xc}, {xc})")
    mean = "ReduceMean <axes = [-1]> (sq)" if axes == "attr" else "ReduceMean (sq, axes)"
    lines += [f"v = {mean}", "ve = Add(v, eps)", "s = Sqrt(ve)"]
    if div == "reciprocal":
        lines += ["rs = Reciprocal(s)", f"n = Mul({xc}, rs)"]
    elif div == "one-over":  # TorchScript: Div(1, Sqrt(..))
        lines += ["rs = Div(one, s)", f"n = Mul({xc}, rs)"]
    else:
        lines += [f"n = Div({xc}, s)"]
    if cast:
        lines += ["nc = Cast <to = 1> (n)", f"{out} = Mul(gamma, nc)"]
    else:
        lines += [f"{out} = Mul(gamma, n)"]
    return "\n".join(lines)


#: x86 as it would be if it folded residual Adds into SkipLayerNormalization (arm64/x86 pick "sum").
SKIP_X86 = dataclasses.replace(targets.get("x86"), name="x86-skip", residual_layer_norm="skip")


def _target(target: str | targets.Target) -> targets.Target:
    return targets.get(target) if isinstance(target, str) else target


def _run(proto: onnx.ModelProto, target: str | targets.Target) -> tuple[ir.Model, bool, PassContext]:
    return run_passes(proto, "fuse-layer-norm", target)


def _check(proto: onnx.ModelProto, model: ir.Model, target: str | targets.Target) -> None:
    """Numerics against onnxruntime on the original, then a second run changes nothing."""
    rng = np.random.default_rng(1)
    feeds = {k: (rng.standard_normal((2, 3, H)) * 2 + 0.5).astype(np.float32) for k in ("x", "r")}
    ref = ort_run(proto.SerializeToString(), feeds)
    got = ort_run(ir.to_onnx(model).SerializeToString(), feeds)
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=1e-5, err_msg=k)
    records = PassManager("fuse-layer-norm", verify=True, check_modified=True).run(model, PassContext(target=_target(target)))
    assert records[0].modified is False


def _only(model: ir.Model, op: str, domain: str = "") -> ir.Node:
    found = [n for n in model.graph if n.op_type == op and n.domain == domain]
    assert len(found) == 1, [n.op_type for n in model.graph]
    return found[0]


# ---------------------------------------------------------------------------------------------- #
# LayerNorm
# ---------------------------------------------------------------------------------------------- #

LN_VARIANTS = {
    "pow-div": {},
    "mul-reciprocal": {"square": "mul", "div": "reciprocal"},
    "axes-input": {"axes": "input"},
    "no-beta": {"beta": False},
    "no-gamma": {"gamma": False},
    "no-gamma-no-beta": {"gamma": False, "beta": False},
}


@pytest.mark.parametrize("variant", list(LN_VARIANTS))
def test_layer_norm_variants(variant: str) -> None:
    kw = LN_VARIANTS[variant]
    opset = 18 if kw.get("axes") == "input" else 17
    proto = _model(CONSTS + "\n h = MatMul(x, W)\n" + _ln("h", "y", **kw), opset)
    model, modified, _ = _run(proto, "onnx")
    assert modified
    ln = _only(model, "LayerNormalization")
    assert ln.attr("axis") == -1 and ln.attr("epsilon") == pytest.approx(EPS)
    assert len(ln.inputs) == (3 if kw.get("beta", True) else 2)
    assert not any(n.op_type in ("ReduceMean", "Sqrt", "Sub") for n in model.graph)
    _check(proto, model, "onnx")


def test_layer_norm_needs_opset_17() -> None:
    proto = _model(CONSTS + "\n h = MatMul(x, W)\n" + _ln("h", "y"), 13)
    model, modified, ctx = _run(proto, "onnx")
    assert not modified and not any(n.op_type == "LayerNormalization" for n in model.graph)
    assert any("opset 17" in d.message for d in ctx.diagnostics)


def test_layer_norm_not_over_last_axis() -> None:
    body = CONSTS + "\n h = MatMul(x, W)\n" + _ln("h", "y").replace("axes = [-1]", "axes = [1]")
    model, modified, ctx = _run(_model(body), "onnx")
    assert not modified
    assert any("last axis" in d.message for d in ctx.diagnostics)


def test_intermediate_read_elsewhere_is_not_fused() -> None:
    body = CONSTS + "\n h = MatMul(x, W)\n" + _ln("h", "y0") + "\n y = Add(y0, d)"
    model, modified, _ = _run(_model(body), "onnx")
    assert not modified


def test_nothing_to_fuse() -> None:
    model, modified, _ = _run(_model("h = MatMul(x, W)\n y = Add(h, r)"), "x86")
    assert not modified


# ---------------------------------------------------------------------------------------------- #
# RMSNorm
# ---------------------------------------------------------------------------------------------- #

RMS_VARIANTS = {
    "pow-reciprocal (dynamo)": {},
    "one-over-with-casts (ts)": {"div": "one-over", "cast": True},
    "mul-div": {"square": "mul", "div": "div"},
}


@pytest.mark.parametrize("shapes", [True, False], ids=["typed", "untyped"])
@pytest.mark.parametrize("variant", list(RMS_VARIANTS))
def test_rms_norm_contrib(variant: str, shapes: bool) -> None:
    proto = _model(CONSTS + "\n h = MatMul(x, W)\n" + _rms("h", "y", **RMS_VARIANTS[variant]), shapes=shapes)
    model, modified, _ = _run(proto, "x86")
    assert modified
    sln = _only(model, "SimplifiedLayerNormalization")  # onnxruntime registers it in the ONNX domain
    assert sln.attr("epsilon") == pytest.approx(EPS) and sln.attr("axis") == -1
    assert sln.inputs[1].name == "gamma"
    assert not any(n.op_type in ("ReduceMean", "Sqrt", "Pow") for n in model.graph)
    # The no-op Cast after the normalization is absorbed; the one on the input stays (simplify's job).
    casts = [n for n in model.graph if n.op_type == "Cast"]
    assert len(casts) == (1 if RMS_VARIANTS[variant].get("cast") else 0)
    assert all(c.outputs[0] is sln.inputs[0] for c in casts)
    _check(proto, model, "x86")


def test_rms_norm_onnx_target_opset23() -> None:
    proto = _model(CONSTS + "\n h = MatMul(x, W)\n" + _rms("h", "y", axes="input"), 23)
    model, modified, _ = _run(proto, "onnx")
    assert modified
    rms = _only(model, "RMSNormalization")
    assert rms.attr("axis") == -1 and rms.attr("epsilon") == pytest.approx(EPS)
    assert "com.microsoft" not in model.opset_imports
    _check(proto, model, "onnx")


def test_rms_norm_onnx_target_old_opset_left() -> None:
    proto = _model(CONSTS + "\n h = MatMul(x, W)\n" + _rms("h", "y"), 17)
    model, modified, ctx = _run(proto, "onnx")
    assert not modified
    assert any("opset 23" in d.message for d in ctx.diagnostics)


# ---------------------------------------------------------------------------------------------- #
# Skip (residual) fusion
# ---------------------------------------------------------------------------------------------- #


#: (bias, decomposed, shapes): a bias Add under the residual one; the norm decomposed or a
#: LayerNormalization; value types present (dynamo) or not (TorchScript).
_CASES = [(b, d, t) for b in (False, True) for d in (True, False) for t in (True, False)]
_RESIDUAL_CASES = pytest.mark.parametrize(
    ("bias", "decomposed", "shapes"), _CASES,
    ids=[f"{'bias' if b else 'no-bias'}-{'decomposed' if d else 'LayerNormalization'}-{'typed' if t else 'untyped'}"
         for b, d, t in _CASES],
)


def _residual_ln(bias: bool, decomposed: bool, shapes: bool) -> onnx.ModelProto:
    """``y = LayerNorm(MatMul(x, W) [+ bias] + r)``."""
    pre = "h = MatMul(x, W)\n" + ("hb = Add(h, bias)\n s0 = Add(hb, r)" if bias else "s0 = Add(r, h)")
    norm = _ln("s0", "y") if decomposed else f"y = LayerNormalization <axis = -1, epsilon = {EPS!r}> (s0, gamma, beta)"
    return _model(CONSTS + "\n" + pre + "\n" + norm, shapes=shapes)


@_RESIDUAL_CASES
def test_skip_layer_norm(bias: bool, decomposed: bool, shapes: bool) -> None:
    proto = _residual_ln(bias, decomposed, shapes)
    model, modified, _ = _run(proto, SKIP_X86)
    assert modified
    sln = _only(model, "SkipLayerNormalization", "com.microsoft")
    assert sln.attr("epsilon") == pytest.approx(EPS)
    names = [v.name if v is not None else "" for v in sln.inputs]
    assert names[2:4] == ["gamma", "beta"]
    if bias:  # the bias belongs to the MatMul output, which must then be `input`
        assert names[1] == "r" and sln.inputs[0].producer().op_type == "MatMul"
    else:
        assert {names[0], names[1]} == {"h", "r"}
    assert names[4:] == (["bias"] if bias else [])
    assert len(sln.outputs) == 1  # the sum is read by nobody else
    assert not any(n.op_type in ("Add", "LayerNormalization") for n in model.graph)
    assert model.opset_imports.get("com.microsoft") == 1
    _check(proto, model, SKIP_X86)


@pytest.mark.parametrize("graph_output", [False, True], ids=["read-downstream", "graph-output"])
def test_skip_layer_norm_sum_used_elsewhere(graph_output: bool) -> None:
    # Pre-LN (GPT-2): the residual sum goes on to the next residual Add (or out of the model).
    if graph_output:
        body = f"h = MatMul(x, W)\n s0 = Add(h, r)\n y = LayerNormalization <epsilon = {EPS!r}> (s0, gamma, beta)"
        outputs = f"float[B,S,{H}] y, float[B,S,{H}] s0"
    else:
        body = (f"h = MatMul(x, W)\n s0 = Add(h, r)\n n0 = LayerNormalization <epsilon = {EPS!r}> (s0, gamma, beta)\n"
                " f = MatMul(n0, W)\n y = Add(s0, f)")
        outputs = f"float[B,S,{H}] y"
    proto = _model(body, outputs=outputs)
    model, modified, _ = _run(proto, SKIP_X86)
    assert modified
    sln = _only(model, "SkipLayerNormalization", "com.microsoft")
    assert len(sln.outputs) == 4 and sln.outputs[1] is None and sln.outputs[2] is None
    total = sln.outputs[3]
    if graph_output:
        assert total.is_graph_output() and total.name == "s0"
    else:
        assert [u.op_type for u, _ in total.uses()] == ["Add"]
    _check(proto, model, SKIP_X86)


@pytest.mark.parametrize("cast", [False, True], ids=["dynamo", "ts-casts"])
def test_skip_simplified_layer_norm(cast: bool) -> None:
    body = CONSTS + "\n h = MatMul(x, W)\n s0 = Add(r, h)\n" + _rms("s0", "n0", cast=cast, div="one-over" if cast else "reciprocal")
    body += "\n f = MatMul(n0, W)\n y = Add(s0, f)"
    proto = _model(body)
    model, modified, _ = _run(proto, "x86")
    assert modified
    ssln = _only(model, "SkipSimplifiedLayerNormalization", "com.microsoft")
    assert {v.name for v in ssln.inputs[:2]} == {"r", "h"} and ssln.inputs[2].name == "gamma"
    assert len(ssln.outputs) == 4 and ssln.outputs[3] is not None
    assert not any(n.op_type == "SimplifiedLayerNormalization" for n in model.graph)
    _check(proto, model, "x86")


def test_skip_broadcast_skip_goes_second() -> None:
    # skip of shape [1,S,H] broadcasts over the batch: it must be SkipLayerNormalization's 2nd input.
    text = f"""<ir_version: 10, opset_import: ["" : 17]>
    g (float[B,S,{H}] x, float[1,S,{H}] r) => (float[B,S,{H}] y) {{
      h = MatMul(x, W)
      s0 = Add(r, h)
      y = LayerNormalization <epsilon = {EPS!r}> (s0, gamma, beta)
    }}"""
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for k, shape in (("W", (H, H)), ("gamma", (H,)), ("beta", (H,))):
        proto.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), k))
    proto = onnx.shape_inference.infer_shapes(proto)
    model, modified, _ = _run(proto, SKIP_X86)
    assert modified
    sln = _only(model, "SkipLayerNormalization", "com.microsoft")
    assert sln.inputs[0].producer().op_type == "MatMul" and sln.inputs[1].name == "r"
    feeds = {"x": rng.standard_normal((2, 3, H)).astype(np.float32), "r": rng.standard_normal((1, 3, H)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(ir.to_onnx(model).SerializeToString(), feeds)["y"],
                               ort_run(proto.SerializeToString(), feeds)["y"], atol=1e-5)


@_RESIDUAL_CASES
def test_residual_sum_norm(bias: bool, decomposed: bool, shapes: bool) -> None:
    # x86 (residual_layer_norm = "sum"): one Sum(input, bias, residual) before a kept LayerNormalization.
    proto = _residual_ln(bias, decomposed, shapes)
    model, modified, _ = _run(proto, "x86")
    assert modified
    total = _only(model, "Sum")
    names = [v.name for v in total.inputs]
    if bias:  # the bias goes with the MatMul output
        assert names == ["h", "bias", "r"]
    else:
        assert sorted(names) == ["h", "r"]
    ln = _only(model, "LayerNormalization")
    assert ln.inputs[0] is total.outputs[0] and [v.name for v in ln.inputs[1:]] == ["gamma", "beta"]
    assert not any(n.op_type == "Add" or n.domain == "com.microsoft" for n in model.graph)
    _check(proto, model, "x86")


def test_residual_sum_read_elsewhere() -> None:
    # Pre-LN (GPT-2): the Sum's output carries the residual stream on.
    body = (f"h = MatMul(x, W)\n hb = Add(h, bias)\n s0 = Add(hb, r)\n"
            f" n0 = LayerNormalization <epsilon = {EPS!r}> (s0, gamma, beta)\n f = MatMul(n0, W)\n y = Add(s0, f)")
    proto = _model(body)
    model, modified, _ = _run(proto, "x86")
    assert modified
    total = _only(model, "Sum")
    assert sorted(u.op_type for u, _ in total.outputs[0].uses()) == ["Add", "LayerNormalization"]
    _check(proto, model, "x86")


def test_onnxruntime_keeps_the_residual_sum_form() -> None:
    # The point of the Sum form: onnxruntime's session optimizer fuses Add + LayerNormalization into
    # SkipLayerNormalization (slower on CPU) but leaves Sum + LayerNormalization alone.
    import onnxruntime as ort

    def session_ops(proto: onnx.ModelProto, tmp: str) -> set[str]:
        so = ort.SessionOptions()
        so.optimized_model_filepath = tmp
        ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(tmp).graph.node}

    proto = _model(f"h = MatMul(x, W)\n hb = Add(h, bias)\n s0 = Add(hb, r)\n"
                   f" y = LayerNormalization <epsilon = {EPS!r}> (s0, gamma, beta)")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        assert "SkipLayerNormalization" in session_ops(proto, f"{d}/a.onnx")
        model, _, _ = _run(proto, "x86")
        ops = session_ops(ir.to_onnx(model), f"{d}/b.onnx")
    assert "SkipLayerNormalization" not in ops and {"Sum", "LayerNormalization"} <= ops


def test_position_embedding_sum_is_not_skip_fused() -> None:
    body = (f"zero = Constant <value = int64[1] {{0}}> ()\n shp = Shape(x)\n sl = Slice(shp, one_i, two_i)\n"
            "one_i = Constant <value = int64[1] {1}> ()\n two_i = Constant <value = int64[1] {2}> ()\n"
            "sc = Squeeze(sl)\n zs = Constant <value = int64 {0}> ()\n os = Constant <value = int64 {1}> ()\n"
            "pos = Range(zs, sc, os)\n p = Gather(table, pos)\n"
            f"s0 = Add(x, p)\n y = LayerNormalization <epsilon = {EPS!r}> (s0, gamma, beta)")
    # Node order must be topological for the parser's model; reorder the constants first.
    lines = [ln.strip() for ln in body.split("\n")]
    consts = [ln for ln in lines if "Constant" in ln]
    proto = _model("\n".join(consts + [ln for ln in lines if "Constant" not in ln]))
    model, modified, ctx = _run(proto, "x86")
    assert not modified
    assert any("position lookup" in d.message for d in ctx.diagnostics)


def test_onnx_target_has_no_skip_fusion() -> None:
    proto = _model(f"h = MatMul(x, W)\n s0 = Add(h, r)\n y = LayerNormalization <epsilon = {EPS!r}> (s0, gamma, beta)")
    model, modified, _ = _run(proto, "onnx")
    assert not modified


def test_residual_with_constant_is_not_skip() -> None:
    proto = _model(f"h = MatMul(x, W)\n s0 = Add(h, bias)\n y = LayerNormalization <epsilon = {EPS!r}> (s0, gamma, beta)")
    model, modified, _ = _run(proto, "x86")
    assert not modified


# ---------------------------------------------------------------------------------------------- #
# Real exports
# ---------------------------------------------------------------------------------------------- #

PIPELINE = "dead-flow,fold-constants,simplify,fuse-layer-norm,fuse-gelu,dead-flow"

#: arch → (layers, expected norm ops on contrib targets). Every layer has two norms, each over a
#: residual Add → 2N Skip ops. The one plain norm left is:
#: * BERT/DistilBERT/MiniLM: the embedding LayerNorm (word + position lookup: not a residual);
#: * GPT-2 (pre-LN): layer 0's ln_1 over the embedding sum; ln_2 of each layer, ln_1 of layers ≥ 1
#:   and ln_f all read residual Adds → 2N Skip ops (4), and ln_f's sum is the only one not read on;
#: * Llama (pre-RMSNorm): layer 0's input norm reads the embedding Gather directly → 1
#:   SimplifiedLayerNormalization, the other 2N (post-attention norms, input norms of layers ≥ 1,
#:   the final norm) → SkipSimplifiedLayerNormalization.
NORM_ARCHS = {
    "minilm": (6, "LayerNormalization", "SkipLayerNormalization"),
    "bert": (2, "LayerNormalization", "SkipLayerNormalization"),
    "distilbert": (2, "LayerNormalization", "SkipLayerNormalization"),
    "gpt2": (2, "LayerNormalization", "SkipLayerNormalization"),
    "llama": (2, "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"),
}


def _pipeline() -> str:
    from passes import registered_passes

    have = registered_passes()
    return ",".join(p for p in PIPELINE.split(",") if p in have)


def _compare(path, model: ir.Model, arch: str) -> None:
    feeds = encoder_feeds(2, 16, 30522 if arch == "minilm" else 1000)  # second row half padded
    ref = ort_run(str(path), feeds)
    got = ort_run(ir.to_onnx(model).SerializeToString(), feeds)
    for name, r in ref.items():
        assert np.max(np.abs(got[name] - r)) <= 1e-4, name


@pytest.mark.slow
@pytest.mark.parametrize("form", ["skip", "sum"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["ts", "dynamo"])
@pytest.mark.parametrize("arch", list(NORM_ARCHS))
def test_real_exports_contrib(exported, arch: str, dynamo: bool, form: str) -> None:
    path = exported(arch, dynamo=dynamo)
    model = ir.load(str(path))
    target = dataclasses.replace(targets.get("x86"), residual_layer_norm=form)
    records = PassManager(_pipeline(), verify=True, check_modified=True).run(model, PassContext(target=target))
    layers, plain, skip = NORM_ARCHS[arch]
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["ReduceMean"] == 0
    # Pre-norm decoders read every residual sum on except the last one (before the final norm).
    read_on = 2 * layers - 1 if arch in ("gpt2", "llama") else 0
    if form == "sum" and plain == "LayerNormalization":
        assert ops[plain] == 2 * layers + 1 and ops["Sum"] == 2 * layers and ops[skip] == 0, ops
        sums = [n for n in model.graph if n.op_type == "Sum"]
        assert sum(1 for n in sums if len(n.outputs[0].uses()) > 1) == read_on
    else:  # RMSNorm keeps SkipSimplifiedLayerNormalization in both forms
        assert ops[plain] == 1 and ops[skip] == 2 * layers, ops
        skips = [n for n in model.graph if n.op_type == skip]
        assert sum(1 for n in skips if len(n.outputs) == 4) == read_on
    _compare(path, model, arch)
    # A second run of the fusion changes nothing.
    again = PassManager("fuse-layer-norm", verify=True, check_modified=True).run(model, PassContext(target=target))
    assert again[0].modified is False and records


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["ts", "dynamo"])
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_real_exports_onnx_target(exported, arch: str, dynamo: bool) -> None:
    path = exported(arch, dynamo=dynamo)
    model = ir.load(str(path))
    PassManager(_pipeline(), verify=True, check_modified=True).run(model, PassContext(target=targets.get("onnx")))
    ops = collections.Counter((n.domain, n.op_type) for n in model.graph)
    assert not any(d == "com.microsoft" for d, _ in ops)
    if arch == "llama":  # opset 17/18 < 23: RMSNorm stays decomposed on the standard-ops target
        assert ops[("", "ReduceMean")] == 2 * 2 + 1
    else:
        assert ops[("", "LayerNormalization")] == 2 * 2 + 1
    _compare(path, model, arch)
