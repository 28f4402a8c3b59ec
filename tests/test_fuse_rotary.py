"""fuse-rotary: golden tests on hand-built graphs (rotate-half, interleaved, lookup table, with a
past offset) and numerics on real Llama exports from both exporters."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

import ir
import targets
from conftest import decoder_feeds, ort_run, run_passes
from passes import PassContext, PassManager

N, H = 2, 8  # heads, head size
INV_FREQ = (1.0 / (10000 ** (np.arange(0, H, 2, dtype=np.float32) / H))).astype(np.float32)

_CONSTS = """
    zero = Constant <value = int64 {0}> ()
    one = Constant <value = int64 {1}> ()
    ax02 = Constant <value = int64[2] {0, 2}> ()
    ax1 = Constant <value = int64[1] {1}> ()
    axm1 = Constant <value = int64[1] {-1}> ()
    st0 = Constant <value = int64[1] {0}> ()
    st1 = Constant <value = int64[1] {1}> ()
    half = Constant <value = int64[1] {4}> ()
    big = Constant <value = int64[1] {9223372036854775807}> ()
    step1 = Constant <value = int64[1] {1}> ()
    step2 = Constant <value = int64[1] {2}> ()
"""

# positions p [S] (+ an optional past offset), then f = p * inv_freq as [1, S, H/2]
_POSITIONS = """
    shp = Shape <start = 2, end = 3> (x)
    s = Squeeze(shp)
    r = Range(zero, s, one)
    {offset}
    pu = Unsqueeze(p, ax02)
    pf = Cast <to = 1> (pu)
    f = Mul(pf, inv)
"""

_TABLE_HALF = """
    e = Concat <axis = -1> (f, f)
    c = Cos(e)
    sn = Sin(e)
"""
_TABLE_INTERLEAVED = """
    fu = Unsqueeze(f, axm1)
    fc = Concat <axis = -1> (fu, fu)
    e = Reshape(fc, eshape)
    c = Cos(e)
    sn = Sin(e)
"""
_ROT_HALF = """
    lo = Slice(x, st0, half, axm1, step1)
    hi = Slice(x, half, big, axm1, step1)
    ng = Neg(hi)
    rot = Concat <axis = -1> (ng, lo)
"""
_ROT_HALF_WRONG = """
    lo = Slice(x, st0, half, axm1, step1)
    hi = Slice(x, half, big, axm1, step1)
    ng = Neg(lo)
    rot = Concat <axis = -1> (hi, ng)
"""
_ROT_INTERLEAVED = """
    ev = Slice(x, st0, big, axm1, step2)
    od = Slice(x, st1, big, axm1, step2)
    ng = Neg(od)
    nu = Unsqueeze(ng, axm1)
    eu = Unsqueeze(ev, axm1)
    st = Concat <axis = -1> (nu, eu)
    rot = Reshape(st, rshape)
"""
_APPLY = """
    c4 = Unsqueeze(c, ax1)
    s4 = Unsqueeze(sn, ax1)
    xc = Mul({c_first})
    xs = Mul(rot, s4)
    y = Add({add_order})
"""


def _model(table: str, rot: str, *, past: bool = False, swap: bool = False) -> onnx.ModelProto:
    offset = "pl = Shape <start = 2, end = 3> (pk)\n    po = Squeeze(pl)\n    p = Add(r, po)" if past else "p = Identity(r)"
    inputs = f"float[B,{N},S,{H}] x" + (f", float[B,{N},P,{H}] pk" if past else "")
    body = _CONSTS + _POSITIONS.format(offset=offset) + table + rot + _APPLY.format(
        c_first="c4, x" if swap else "x, c4", add_order="xs, xc" if swap else "xc, xs")
    text = f"""<ir_version: 10, opset_import: ["" : 18]>
    g ({inputs}) => (float[B,{N},S,{H}] y) {{
    {body}
    }}"""
    proto = onnx.parser.parse_model(text)
    inits = {
        "inv": INV_FREQ,
        "eshape": np.array([1, -1, H], np.int64),
        "rshape": np.array([0, 0, -1, H], np.int64),
    }
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    onnx.checker.check_model(proto)
    return proto


def _lookup_model() -> onnx.ModelProto:
    """cos/sin looked up in constant [64, H] tables at positions Range(0, S)."""
    text = f"""<ir_version: 10, opset_import: ["" : 18]>
    g (float[B,{N},S,{H}] x) => (float[B,{N},S,{H}] y) {{
    {_CONSTS}
    shp = Shape <start = 2, end = 3> (x)
    s = Squeeze(shp)
    p = Range(zero, s, one)
    pu = Unsqueeze(p, st0)
    c = Gather(ctab, pu)
    sn = Gather(stab, pu)
    {_ROT_HALF}
    {_APPLY.format(c_first="x, c4", add_order="xc, xs")}
    }}"""
    proto = onnx.parser.parse_model(text)
    f = np.arange(64, dtype=np.float32)[:, None] * INV_FREQ[None, :]
    emb = np.concatenate([f, f], axis=-1)
    proto.graph.initializer.extend([numpy_helper.from_array(np.cos(emb).astype(np.float32), "ctab"),
                                    numpy_helper.from_array(np.sin(emb).astype(np.float32), "stab")])
    onnx.checker.check_model(proto)
    return proto


def _run(proto: onnx.ModelProto, target: str = "x86") -> tuple[ir.Model, bool, PassContext]:
    return run_passes(proto, "fuse-rotary,dead-flow", target)


def _ops(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph)


def _feeds(past: bool, seq: int = 5, past_len: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, N, seq, H)).astype(np.float32)}
    if past:
        feeds["pk"] = rng.standard_normal((2, N, past_len, H)).astype(np.float32)
    return feeds


def _check_numerics(proto: onnx.ModelProto, model: ir.Model, past: bool = False) -> None:
    for seq, past_len in ((5, 3), (1, 11)):
        feeds = _feeds(past, seq, past_len)
        ref = ort_run(proto.SerializeToString(), feeds)["y"]
        got = ort_run(ir.to_onnx(model).SerializeToString(), feeds)["y"]
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def _rerun_unmodified(model: ir.Model) -> None:
    records = PassManager("fuse-rotary", check_modified=True).run(model, PassContext(target=targets.get("x86")))
    assert records[0].modified is False


@pytest.mark.parametrize("swap", [False, True], ids=["x*cos first", "operands swapped"])
@pytest.mark.parametrize("past", [False, True], ids=["no-past", "past"])
def test_rotate_half(past: bool, swap: bool) -> None:
    proto = _model(_TABLE_HALF, _ROT_HALF, past=past, swap=swap)
    model, modified, _ = _run(proto)
    assert modified
    ops = _ops(model)
    assert ops["RotaryEmbedding"] == 1
    for gone in ("Cos", "Sin", "Neg", "Slice", "Mul", "Concat"):
        assert ops[gone] == 0, gone
    rope = next(n for n in model.graph if n.op_type == "RotaryEmbedding")
    assert rope.domain == "com.microsoft" and rope.attr("interleaved") == 0
    cos_cache = rope.inputs[2].const_value.numpy()
    assert cos_cache.shape == (4096, H // 2)
    if past:  # position ids = the past length read off pk, not a constant
        assert rope.inputs[1].const_value is None
    else:
        assert rope.inputs[1].const_value.numpy().tolist() == [0]
    assert model.opset_imports.get("com.microsoft") == 1
    _check_numerics(proto, model, past)
    _rerun_unmodified(model)


def test_interleaved() -> None:
    proto = _model(_TABLE_INTERLEAVED, _ROT_INTERLEAVED)
    model, modified, _ = _run(proto)
    assert modified
    rope = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    assert len(rope) == 1 and rope[0].attr("interleaved") == 1
    assert _ops(model)["Neg"] == 0
    _check_numerics(proto, model)
    _rerun_unmodified(model)


def test_lookup_table() -> None:
    proto = _lookup_model()
    model, modified, _ = _run(proto)
    assert modified
    rope = next(n for n in model.graph if n.op_type == "RotaryEmbedding")
    assert rope.inputs[2].const_value.numpy().shape == (64, H // 2)
    _check_numerics(proto, model)


def test_interleaved_rotation_with_half_table_is_not_fused() -> None:
    # A rotate-every-two rotation with a Concat(f, f) table is a different function: keep it.
    proto = _model(_TABLE_HALF, _ROT_INTERLEAVED)
    model, modified, ctx = _run(proto)
    assert not modified and _ops(model)["RotaryEmbedding"] == 0
    assert any("rotary" in d.message for d in ctx.diagnostics)


def test_wrong_rotation_is_not_fused() -> None:
    proto = _model(_TABLE_HALF, _ROT_HALF_WRONG)
    model, modified, _ = _run(proto)
    assert not modified and _ops(model)["RotaryEmbedding"] == 0


def test_target_without_rotary_explains() -> None:
    proto = _model(_TABLE_HALF, _ROT_HALF)
    model, modified, ctx = _run(proto, "onnx")
    assert not modified
    assert any("RotaryEmbedding" in d.message for d in ctx.diagnostics)


def test_small_max_positions_option() -> None:
    model = ir.from_onnx(_model(_TABLE_HALF, _ROT_HALF))
    PassManager("fuse-rotary{max_positions=128}", check_modified=True).run(model, PassContext(target=targets.get("x86")))
    rope = next(n for n in model.graph if n.op_type == "RotaryEmbedding")
    assert rope.inputs[2].const_value.numpy().shape == (128, H // 2)


# ------------------------------------------------------------------------------------------------
# Real exports
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["ts", "dynamo"])
def test_llama_exports(exported, dynamo: bool, attn: str) -> None:
    from passes.tools.compile import compile_model

    path = exported("llama", dynamo=dynamo, attn=attn)
    result = compile_model(str(path), "x86", verify=False)
    model = result.model
    ropes = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    assert len(ropes) == 2 * 2  # Q and K in each of the 2 layers
    assert len({id(n.inputs[2]) for n in ropes}) == 1  # one shared cos cache
    assert not any(n.op_type in ("Cos", "Sin", "Neg") for n in model.graph)
    feeds = decoder_feeds(batch=2, seq=16)
    feeds["attention_mask"][1, 8:] = 0  # padding on the second row
    ref = ort_run(str(path), feeds)["logits"]
    got = ort_run(ir.to_onnx(model).SerializeToString(), feeds)["logits"]
    assert float(np.max(np.abs(ref - got))) <= 1e-4
