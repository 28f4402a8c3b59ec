"""fuse-rotary: golden tests on hand-built graphs and numerics on real exports.

* hand-built: rotate-half, interleaved, a lookup table, a past offset; partial rotary of the
  GPT-NeoX/Phi/StableLM form (rotate-half on x[..., :r]) and of the GPT-J/CodeGen form
  (interleaved, before the heads transpose, a [sin | cos] table split and tiled); RoFormer's
  chunked sinusoidal table. Numerics against onnxruntime with optimizations off.
* near misses that must not fuse: a table repeated for the other rotation, a table whose halves
  differ by 0.1 %, a table that depends on the sequence length, a partial rotary with a gap.
* real exports: Llama (both exporters, sdpa and eager), and the zoo's rotary families (GPT-NeoX,
  Phi, StableLM, GPT-J, CodeGen, RoFormer) from both exporters through the pipeline up to
  fuse-rotary, against the original model; Phi and GPT-J through fuse-attention too.
"""

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
from passes.fusions._rotary_layout import value_rank

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


def _lookup_model(skew: float = 1.0) -> onnx.ModelProto:
    """cos/sin looked up in constant [64, H] tables at positions Range(0, S) (the second half of
    the cos table computed at positions scaled by ``skew``)."""
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
    cos = np.cos(np.concatenate([f, f * skew], axis=-1))
    proto.graph.initializer.extend([numpy_helper.from_array(cos.astype(np.float32), "ctab"),
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


# ------------------------------------------------------------------------------------------------
# Partial rotary and the table forms of GPT-J, CodeGen and RoFormer (hand-built)
# ------------------------------------------------------------------------------------------------

R = 4  # rotary dims of the partial forms (of H = 8)


def _inits(proto: onnx.ModelProto, **arrays: np.ndarray) -> onnx.ModelProto:
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in arrays.items())
    onnx.checker.check_model(proto)
    return proto


def _neox_model(rest_start: int = R) -> onnx.ModelProto:
    """GPT-NeoX / Phi / StableLM: rotate-half on x[..., :R] of [B, N, S, H], the rest concatenated."""
    text = f"""<ir_version: 10, opset_import: ["" : 18]>
    g (float[B,{N},S,{H}] x) => (float[B,{N},S,{H - rest_start + R}] y) {{
    {_CONSTS}
    rdim = Constant <value = int64[1] {{{R}}}> ()
    rest = Constant <value = int64[1] {{{rest_start}}}> ()
    rhalf = Constant <value = int64[1] {{{R // 2}}}> ()
    xr = Slice(x, st0, rdim, axm1, step1)
    xp = Slice(x, rest, big, axm1, step1)
    shp = Shape <start = 2, end = 3> (x)
    s = Squeeze(shp)
    r = Range(zero, s, one)
    pu = Unsqueeze(r, ax02)
    pf = Cast <to = 1> (pu)
    f = Mul(pf, inv)
    e = Concat <axis = -1> (f, f)
    c = Cos(e)
    sn = Sin(e)
    lo = Slice(xr, st0, rhalf, axm1, step1)
    hi = Slice(xr, rhalf, big, axm1, step1)
    ng = Neg(hi)
    rot = Concat <axis = -1> (ng, lo)
    c4 = Unsqueeze(c, ax1)
    s4 = Unsqueeze(sn, ax1)
    xc = Mul(xr, c4)
    xs = Mul(rot, s4)
    yr = Add(xc, xs)
    y = Concat <axis = -1> (yr, xp)
    }}"""
    inv = (1.0 / (10000 ** (np.arange(0, R, 2, dtype=np.float32) / R))).astype(np.float32)
    return _inits(onnx.parser.parse_model(text), inv=inv)


def _sincos_table(rows: int, width: int) -> np.ndarray:
    """GPT-J's ``embed_positions``: ``[sin | cos]`` of ``p * inv_freq``, ``[rows, width]``."""
    inv = (1.0 / (10000 ** (np.arange(0, width, 2, dtype=np.float32) / width))).astype(np.float32)
    f = np.arange(rows, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(f), np.cos(f)], axis=-1).astype(np.float32)


def _gptj_model(table: np.ndarray | None = None) -> onnx.ModelProto:
    """GPT-J / CodeGen: interleaved rotary of x[..., :R] before the heads transpose ([B, S, N, H],
    N only known from the Reshape), cos/sin split off a ``[sin | cos]`` lookup and repeated
    element-wise with Tile, the pairs flattened to ``Shape(pairs)[:-2] + [-1]``."""
    text = f"""<ir_version: 10, opset_import: ["" : 18]>
    g (float[B,S,{N * H}] h) => (float[B,{N},S,{H}] y) {{
    {_CONSTS}
    rdim = Constant <value = int64[1] {{{R}}}> ()
    two1 = Constant <value = int64[1] {{2}}> ()
    ax2 = Constant <value = int64[1] {{2}}> ()
    hd = Constant <value = int64[1] {{{H}}}> ()
    mtwo = Constant <value = int64[1] {{-2}}> ()
    reps = Constant <value = int64[4] {{1, 1, 1, 2}}> ()
    tshape = Constant <value = int64[3] {{1, -1, {R}}}> ()
    hs = Shape(h)
    bs = Slice(hs, st0, two1)
    xshape = Concat <axis = 0> (bs, axm1, hd)
    x = Reshape(h, xshape)
    xr = Slice(x, st0, rdim, axm1, step1)
    xp = Slice(x, rdim, big, axm1, step1)
    sl = Shape <start = 1, end = 2> (h)
    s = Squeeze(sl)
    r = Range(zero, s, one)
    pu = Unsqueeze(r, st0)
    sc = Gather(sincos, pu)
    sn, cs = Split <axis = -1, num_outputs = 2> (sc)
    cu = Unsqueeze(cs, axm1)
    ct = Tile(cu, reps)
    cr = Reshape(ct, tshape)
    c4 = Unsqueeze(cr, ax2)
    su = Unsqueeze(sn, axm1)
    stt = Tile(su, reps)
    sr = Reshape(stt, tshape)
    s4 = Unsqueeze(sr, ax2)
    ev = Slice(xr, st0, big, axm1, step2)
    od = Slice(xr, st1, big, axm1, step2)
    ng = Neg(od)
    nu = Unsqueeze(ng, axm1)
    eu = Unsqueeze(ev, axm1)
    pairs = Concat <axis = -1> (nu, eu)
    ps = Shape(pairs)
    lead = Slice(ps, st0, mtwo)
    fshape = Concat <axis = 0> (lead, axm1)
    rot = Reshape(pairs, fshape)
    xc = Mul(xr, c4)
    xs = Mul(rot, s4)
    yr = Add(xc, xs)
    yc = Concat <axis = -1> (yr, xp)
    y = Transpose <perm = [0, 2, 1, 3]> (yc)
    }}"""
    return _inits(onnx.parser.parse_model(text), sincos=_sincos_table(64, R) if table is None else table)


def _roformer_model(repeat: str = "interleaved", scale_by_length: bool = False) -> onnx.ModelProto:
    """RoFormer: ``[sin | cos]`` sinusoidal table looked up at Range(S), unsqueezed to [1, 1, S, H],
    chunked, each half repeated element-wise (stack + reshape_as), interleaved rotation of the whole
    head. ``repeat="halves"`` repeats by Concat instead (a table for rotate-half: wrong here);
    ``scale_by_length`` multiplies cos by S (not a function of the position alone)."""
    dup = {
        "interleaved": """
    cu = Unsqueeze(cs, axm1)
    cst = Concat <axis = -1> (cu, cu)
    cpos = Reshape(cst, tsh)
    su = Unsqueeze(sn, axm1)
    sst = Concat <axis = -1> (su, su)
    spos = Reshape(sst, tsh)""",
        "halves": """
    cpos = Concat <axis = -1> (cs, cs)
    spos = Concat <axis = -1> (sn, sn)""",
    }[repeat]
    scaled = ("sl = Shape(p)\n    sf = Cast <to = 1> (sl)\n    cfin = Mul(cpos, sf)" if scale_by_length
              else "cfin = Identity(cpos)")
    text = f"""<ir_version: 10, opset_import: ["" : 18]>
    g (float[B,{N},S,{H}] x) => (float[B,{N},S,{H}] y) {{
    {_CONSTS}
    ax01 = Constant <value = int64[2] {{0, 1}}> ()
    hd = Constant <value = int64[1] {{{H}}}> ()
    shp = Shape <start = 2, end = 3> (x)
    s = Squeeze(shp)
    p = Range(zero, s, one)
    t = Gather(table, p)
    t4 = Unsqueeze(t, ax01)
    sn = Slice(t4, st0, half, axm1)
    cs = Slice(t4, half, hd, axm1)
    tsh = Shape(t4)
    {dup}
    {scaled}
    ev = Slice(x, st0, big, axm1, step2)
    od = Slice(x, st1, big, axm1, step2)
    ng = Neg(od)
    nu = Unsqueeze(ng, axm1)
    eu = Unsqueeze(ev, axm1)
    pairs = Concat <axis = -1> (nu, eu)
    xsh = Shape(x)
    rot = Reshape(pairs, xsh)
    xc = Mul(x, cfin)
    xs = Mul(rot, spos)
    y = Add(xc, xs)
    }}"""
    return _inits(onnx.parser.parse_model(text), table=_sincos_table(64, H))


def _check_against(proto: onnx.ModelProto, model: ir.Model, feeds_of) -> None:
    for seq in (5, 1, 13):
        feeds = feeds_of(seq)
        ref = ort_run(proto.SerializeToString(), feeds)["y"]
        got = ort_run(ir.to_onnx(model).SerializeToString(), feeds)["y"]
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def _x_feeds(seq: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seq).standard_normal((2, N, seq, H)).astype(np.float32)}


def _h_feeds(seq: int) -> dict[str, np.ndarray]:
    return {"h": np.random.default_rng(seq).standard_normal((2, seq, N * H)).astype(np.float32)}


def _ropes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "RotaryEmbedding"]


def test_partial_rotate_half() -> None:
    proto = _neox_model()
    model, modified, _ = _run(proto)
    assert modified
    (rope,) = _ropes(model)
    assert {k: a.value for k, a in rope.attributes.items()} == {"interleaved": 0, "rotary_embedding_dim": R,
                                                               "num_heads": N}
    assert rope.inputs[0] is model.graph.inputs[0]  # the whole head, not its slice
    assert rope.inputs[2].const_value.numpy().shape == (4096, R // 2)
    assert not any(n.op_type in ("Concat", "Slice", "Neg") for n in model.graph)
    _check_against(proto, model, _x_feeds)
    _rerun_unmodified(model)


def test_partial_interleaved_before_the_heads_transpose() -> None:
    proto = _gptj_model()
    model, modified, _ = _run(proto)
    assert modified
    (rope,) = _ropes(model)
    assert {k: a.value for k, a in rope.attributes.items()} == {"interleaved": 1, "rotary_embedding_dim": R,
                                                               "num_heads": N}  # N read off the Reshape
    assert rope.inputs[2].const_value.numpy().shape == (64, R // 2)  # the lookup table's rows
    np.testing.assert_array_equal(rope.inputs[2].const_value.numpy(), _sincos_table(64, R)[:, R // 2:])
    assert rope.inputs[0].producer().op_type == "Transpose"  # [B, S, N, H] -> [B, N, S, H]
    assert not any(n.op_type in ("Tile", "Split", "Neg", "Gather") for n in model.graph)
    _check_against(proto, model, _h_feeds)
    _rerun_unmodified(model)


def test_roformer_sinusoidal_table() -> None:
    proto = _roformer_model()
    model, modified, _ = _run(proto)
    assert modified
    (rope,) = _ropes(model)
    assert rope.attr("interleaved") == 1 and rope.attr("rotary_embedding_dim") is None
    np.testing.assert_array_equal(rope.inputs[3].const_value.numpy(), _sincos_table(64, H)[:, : H // 2])
    _check_against(proto, model, _x_feeds)
    _rerun_unmodified(model)


def test_partial_rotary_through_the_x86_pipeline() -> None:
    # The transpose back to [B, S, N, H] cancels against the model's own heads transpose.
    proto = _gptj_model()
    model, _, _ = run_passes(proto, targets.get("x86").pipeline)
    assert [n.op_type for n in model.graph] == ["Shape", "Slice", "Concat", "Reshape", "Transpose", "RotaryEmbedding"]
    assert _ropes(model)[0].attr("rotary_embedding_dim") == R
    _check_against(proto, model, _h_feeds)


def _ort_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rank: int, **attrs: int) -> np.ndarray:
    """onnxruntime's RotaryEmbedding of ``x`` [B, N, S, H] at positions 0..S-1, fed 4-D or as [B, S, N*H]."""
    b, n, s, h = x.shape
    node = onnx.helper.make_node("RotaryEmbedding", ["x", "p", "c", "s"], ["y"], domain="com.microsoft", **attrs)
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([0], np.int64), "p"), numpy_helper.from_array(cos, "c"),
         numpy_helper.from_array(sin, "s")])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)])
    fed = x if rank == 4 else x.transpose(0, 2, 1, 3).reshape(b, s, n * h)
    y = ort_run(proto.SerializeToString(), {"x": fed})["y"]
    return y if rank == 4 else y.reshape(b, s, n, h).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("rank", [4, 3])
def test_onnxruntime_partial_rotary_contract(rank: int) -> None:
    # What the partial rewrite relies on: rotary_embedding_dim with num_heads rotates the first r
    # dims of every head and copies the rest, in both layouts; without them a 3-D input with a
    # narrow cache is silently wrong (so it is never emitted).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, N, 5, H)).astype(np.float32)
    cos, sin = (rng.standard_normal((16, R // 2)).astype(np.float32) for _ in range(2))
    c, s_ = cos[:5][None, None], sin[:5][None, None]
    x1, x2 = x[..., : R // 2], x[..., R // 2: R]
    want = np.concatenate([x1 * c - x2 * s_, x2 * c + x1 * s_, x[..., R:]], axis=-1)
    got = _ort_rope(x, cos, sin, rank, interleaved=0, rotary_embedding_dim=R, num_heads=N)
    np.testing.assert_allclose(got, want, atol=1e-5)
    if rank == 3:
        assert not np.allclose(_ort_rope(x, cos, sin, rank, interleaved=0), want, atol=1e-3)


# -- near misses: a subtly wrong rotary must not fuse -----------------------------------------------


def test_table_repeated_for_the_other_rotation_is_not_fused() -> None:
    # RoFormer's rotation with each half repeated by Concat (rotate-half's table): even and odd
    # columns of the table differ, so RotaryEmbedding(interleaved) would compute something else.
    proto = _roformer_model(repeat="halves")
    model, modified, ctx = _run(proto)
    assert not modified and not _ropes(model)
    assert any("rotary" in d.message and "even and odd columns differ" in d.message for d in ctx.diagnostics), \
        [d.message for d in ctx.diagnostics]


def test_table_with_unequal_halves_is_not_fused() -> None:
    # A looked-up cos table whose second half is off by 0.1 %: x*cos + rotate_half(x)*sin is then
    # no RotaryEmbedding (its cache holds one half for both), however close it looks.
    proto = _lookup_model(skew=1.001)
    model, modified, ctx = _run(proto)
    assert not modified and not _ropes(model)
    assert any("the cos table's two halves differ" in d.message for d in ctx.diagnostics), \
        [d.message for d in ctx.diagnostics]


def test_table_that_depends_on_the_sequence_length_is_not_fused() -> None:
    proto = _roformer_model(scale_by_length=True)
    model, modified, ctx = _run(proto)
    assert not modified and not _ropes(model)
    assert any("not a function of each position alone" in d.message for d in ctx.diagnostics), \
        [d.message for d in ctx.diagnostics]


def test_partial_rotary_with_a_gap_keeps_the_slice_rotary() -> None:
    # x[..., :4] rotated, x[..., 5:] passed: not a partial RotaryEmbedding (dim 4 would vanish).
    proto = _neox_model(rest_start=R + 1)
    model, modified, ctx = _run(proto)
    assert modified
    (rope,) = _ropes(model)
    assert rope.attr("rotary_embedding_dim") is None and rope.inputs[0].producer().op_type == "Slice"
    assert any("do not split the head in two" in d.message for d in ctx.diagnostics)
    for seq in (5, 1):
        feeds = _x_feeds(seq)
        np.testing.assert_allclose(ort_run(ir.to_onnx(model).SerializeToString(), feeds)["y"],
                                   ort_run(proto.SerializeToString(), feeds)["y"], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The zoo's rotary families, both exporters
# ------------------------------------------------------------------------------------------------

#: The x86 pipeline up to fuse-rotary, then the cleanup that follows it.
_UP_TO_ROTARY = ("dead-flow,fold-constants,simplify,fuse-layer-norm,fuse-embed-layer-norm,fuse-gelu,fuse-activations,"
                 "fuse-rotary,simplify,dead-flow")
#: family -> (interleaved, rotary_embedding_dim of a 16-wide head or None for all of it, K heads).
ZOO_FORMS = {
    "gpt-neox": (0, 4, 4),  # rotary_pct 0.25, rotate-half
    "phi": (0, 8, 4),  # partial_rotary_factor 0.5
    "stablelm": (0, 4, 2),  # partial_rotary_factor 0.25, GQA 4:2
    "gpt-j": (1, 8, 4),  # rotary_dim 8, interleaved, [sin | cos] table split and tiled, before the heads transpose
    "codegen": (1, 8, 4),  # the same on CodeGen's packed qkv
    "roformer": (1, None, 4),  # sinusoidal [sin | cos] table, chunked and stacked
}
ZOO_CASES = [pytest.param(name, exporter, id=f"{name}-{exporter}",
                          marks=[pytest.mark.slow] if exporter == "dynamo" else [])
             for name in ZOO_FORMS for exporter in ("script", "dynamo")]


def _zoo_feeds(folder) -> dict[str, np.ndarray]:
    ref = dict(np.load(folder / "reference.npz"))
    ref.pop("expected")
    return ref


@pytest.mark.parametrize(("name", "exporter"), ZOO_CASES)
def test_zoo_rotary_forms(zoo_exported, name: str, exporter: str) -> None:
    folder = zoo_exported(name, dynamo=exporter == "dynamo")
    proto = onnx.load(str(folder / "model.onnx"))
    model, _, ctx = run_passes(proto, _UP_TO_ROTARY)
    interleaved, dim, kv_heads = ZOO_FORMS[name]
    ropes = _ropes(model)
    notes = [d.message for d in ctx.diagnostics if d.pass_name == "fuse-rotary"]
    assert len(ropes) == 4, notes  # Q and K of 2 layers
    for n in ropes:
        assert n.attr("interleaved") == interleaved and n.attr("rotary_embedding_dim") == dim, n.attributes
        if dim:  # onnxruntime wants the head count with a partial rotary: the Q's, or the K's
            assert n.attr("num_heads") in (4, kv_heads) and value_rank(n.inputs[0]) == 4, n.attributes
    if dim:
        assert sorted(n.attr("num_heads") for n in ropes) == sorted([4, kv_heads] * 2)
    assert not notes, notes
    assert not any(n.op_type in ("Sin", "Cos", "Neg") for n in model.graph)
    feeds = _zoo_feeds(folder)
    ref = ort_run(str(folder / "model.onnx"), feeds)
    got = ort_run(ir.to_onnx(model).SerializeToString(), feeds)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["phi", "gpt-j"])
def test_attention_takes_the_partial_rotary(zoo_exported, name: str) -> None:
    # fuse-attention re-emits the partial rotary on its 3-D [B, S, N*h] projection, num_heads kept.
    from passes.tools.compile import compile_model

    folder = zoo_exported(name)
    result = compile_model(str(folder / "model.onnx"), "x86", verify=False)
    ops = collections.Counter(n.op_type for n in result.model.graph)
    assert ops["MultiHeadAttention"] == 2 and ops["RotaryEmbedding"] == 4, ops
    for n in _ropes(result.model):
        assert n.attr("rotary_embedding_dim") == ZOO_FORMS[name][1] and n.attr("num_heads") == 4
        assert len(n.inputs[0].shape or ()) != 4
    feeds = _zoo_feeds(folder)
    ref = ort_run(str(folder / "model.onnx"), feeds)
    got = ort_run(ir.to_onnx(result.model).SerializeToString(), feeds)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-4, rtol=1e-4)
