"""fuse-attention on Q/K/V packed *within* each head: GPT-NeoX's and CodeGen's fused projections.

GPT-NeoX views its ``query_key_value`` output as ``[B,S,N,3d]`` and splits the last axis;
CodeGen views ``qkv_proj`` as ``mp`` groups ``[B,S,mp,3L]``, splits (Q, V, K) and views each
part as ``[B,S,N,d]``. No role is a contiguous column block, so the fused op must get each
role's columns gathered from the packed weights (:mod:`passes.fusions._attention_columns`).
Hand-built graphs (with a partial ``RotaryEmbedding`` on Q and K, as ``fuse-rotary`` leaves
these models) are fused and checked against onnxruntime on the original; the column arithmetic
is checked against the layouts' closed forms; a view that mixes token and column axes stays as
it is with a reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
import targets
from conftest import ort_run
from passes import PassContext, PassManager
from passes.fusions._attention_columns import role_columns
from test_fuse_attention import causal_padding_where

N, D, ROT = 4, 8, 4  # heads, head size, rotary dims (partial)
H = N * D
MP = 2  # CodeGen's model-parallel groups: 2 heads each
L = H // MP
CONTRIB = targets.get("x86-avx2")


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _packed_graph(layout: str, rotary: bool = True) -> onnx.ModelProto:
    """One causal+padding attention layer whose Q/K/V come from one ``[H, 3H]`` projection.

    ``layout``: ``"neox"`` (``[B,S,N,3d]``, transpose, split), ``"codegen"`` (``[B,S,mp,3L]``,
    split in the order Q, V, K, each viewed as heads), ``"strided"`` (``[B,S,N,3d]``, Q and K
    the even and odd columns of each head's first ``2d``: exact, if odd) or ``"mixed"`` (the
    NeoX packing viewed as ``[B, S·N, 3d]``: the view mixes the sequence into the heads).
    """
    rng = np.random.default_rng(3)
    inits = [
        _init("w", rng.standard_normal((H, 3 * H)).astype(np.float32) * 0.3),
        _init("b", rng.standard_normal(3 * H).astype(np.float32) * 0.1),
        _init("heads_shape", np.array([0, 0, N, D], np.int64)),
        _init("merge_shape", np.array([0, 0, H], np.int64)),
        _init("neox_shape", np.array([0, 0, N, 3 * D], np.int64)),
        _init("mixed_shape", np.array([0, -1, 3 * D], np.int64)),
        _init("unmix_shape", np.array([0, -1, N, D], np.int64)),
        _init("group_shape", np.array([0, 0, MP, 3 * L], np.int64)),
        _init("sizes_d", np.array([D, D, D], np.int64)),
        _init("sizes_l", np.array([L, L, L], np.int64)),
        _init("s0", np.array([0], np.int64)), _init("s1", np.array([1], np.int64)),
        _init("s2d", np.array([2 * D], np.int64)), _init("s3d", np.array([3 * D], np.int64)),
        _init("last", np.array([-1], np.int64)), _init("two", np.array([2], np.int64)),
        _init("axes12", np.array([1, 2], np.int64)),
        _init("ax0", np.array([0], np.int64)), _init("ax1", np.array([1], np.int64)),
        _init("idx1", np.array(1, np.int64)), _init("zero", np.array(0, np.int64)),
        _init("step", np.array(1, np.int64)),
        _init("scale", np.array(1.0 / np.sqrt(D), np.float32)),
        _init("ninf", np.array(-np.inf, np.float32)),
        _init("pos0", np.array([0], np.int64)),
    ]
    angles = np.arange(64)[:, None] * (1.0 / 10000 ** (np.arange(0, ROT, 2) / ROT))[None, :]
    inits += [_init("cos", np.cos(angles).astype(np.float32)), _init("sin", np.sin(angles).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["qkv"])]
    if layout == "neox":
        nodes += [
            helper.make_node("Reshape", ["qkv", "neox_shape"], ["view"]),
            helper.make_node("Transpose", ["view"], ["view_t"], perm=[0, 2, 1, 3]),
            helper.make_node("Split", ["view_t", "sizes_d"], ["qh", "kh", "vh"], axis=-1),
        ]
    elif layout == "strided":
        nodes += [
            helper.make_node("Reshape", ["qkv", "neox_shape"], ["view"]),
            helper.make_node("Slice", ["view", "s0", "s2d", "last", "two"], ["q4"]),
            helper.make_node("Slice", ["view", "s1", "s2d", "last", "two"], ["k4"]),
            helper.make_node("Slice", ["view", "s2d", "s3d", "last"], ["v4"]),
        ]
        nodes += [helper.make_node("Transpose", [f"{c}4"], [f"{c}h"], perm=[0, 2, 1, 3]) for c in "qkv"]
    elif layout == "mixed":
        nodes += [
            helper.make_node("Reshape", ["qkv", "mixed_shape"], ["view"]),
            helper.make_node("Split", ["view", "sizes_d"], ["q3", "k3", "v3"], axis=-1),
        ]
        for c in "qkv":
            nodes += [helper.make_node("Reshape", [f"{c}3", "unmix_shape"], [f"{c}4"]),
                      helper.make_node("Transpose", [f"{c}4"], [f"{c}h"], perm=[0, 2, 1, 3])]
    else:
        assert layout == "codegen"
        nodes += [
            helper.make_node("Reshape", ["qkv", "group_shape"], ["view"]),
            helper.make_node("Split", ["view", "sizes_l"], ["qg", "vg", "kg"], axis=-1),
        ]
        for c in "qkv":
            nodes += [helper.make_node("Reshape", [f"{c}g", "heads_shape"], [f"{c}4"]),
                      helper.make_node("Transpose", [f"{c}4"], [f"{c}h"], perm=[0, 2, 1, 3])]
    q, k = "qh", "kh"
    if rotary:
        for c in "qk":
            nodes.append(helper.make_node(
                "RotaryEmbedding", [f"{c}h", "pos0", "cos", "sin"], [f"{c}r"], domain="com.microsoft",
                rotary_embedding_dim=ROT, num_heads=N, interleaved=int(layout == "codegen")))
        q, k = "qr", "kr"
    nodes += [
        helper.make_node("Transpose", [k], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("Mul", [q, "scale"], ["qs"]),
        helper.make_node("MatMul", ["qs", "kt"], ["scores"]),
        *causal_padding_where(),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "vh"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, f"packed_{layout}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", H]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", H])],
        inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(g, opset_imports=opsets, ir_version=8)


def _feeds(batch: int, seq: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    mask = np.ones((batch, seq), np.int64)
    if batch > 1:
        mask[1, seq - seq // 2:] = 0  # right padding: every query row sees a key
    return {"x": rng.standard_normal((batch, seq, H)).astype(np.float32), "mask": mask}


def _fuse(model: ir.Model, target=CONTRIB) -> tuple[bool, PassContext]:
    ctx = PassContext(target=target, explain=True)
    records = PassManager("fuse-attention", verify=True, check_modified=True).run(model, ctx)
    return any(r.modified for r in records), ctx


def _closed_form(layout: str) -> dict[str, np.ndarray]:
    """Each role's projection columns in head order, written out from the layout's definition."""
    h, j = np.meshgrid(np.arange(N), np.arange(D), indexing="ij")
    if layout == "neox":  # head h of role r: columns h·3d + r·d + j
        return {r: (h * 3 * D + i * D + j).reshape(-1) for i, r in enumerate("qkv")}
    if layout == "strided":
        return {"q": (h * 3 * D + 2 * j).reshape(-1), "k": (h * 3 * D + 2 * j + 1).reshape(-1),
                "v": (h * 3 * D + 2 * D + j).reshape(-1)}
    g, i = np.meshgrid(np.arange(MP), np.arange(L), indexing="ij")  # group g, entry i of its L
    return {r: (g * 3 * L + pos * L + i).reshape(-1) for pos, r in enumerate("qvk")}


@pytest.mark.parametrize("layout", ["neox", "codegen", "strided"])
def test_role_columns_follow_the_layouts_closed_form(layout):
    model = ir.from_onnx(_packed_graph(layout))
    values = {v.name: v for n in model.graph for v in n.outputs}
    nodes = {n.outputs[0].name: n for n in model.graph}
    want = _closed_form(layout)
    for role in "qkv":
        name = {"neox": f"{role}h", "codegen": f"{role}g", "strided": f"{role}4"}[layout]
        cut = values[name].producer()
        view = [nodes["view"]] + ([nodes["view_t"]] if layout == "neox" else [])
        got = role_columns(values[name], view + [cut], 3 * H)
        assert not isinstance(got, str), got
        np.testing.assert_array_equal(got, want[role])


@pytest.mark.parametrize("layout", ["neox", "codegen", "strided"])
@pytest.mark.parametrize("rotary", [True, False], ids=["rotary", "plain"])
def test_packed_layouts_fuse_with_the_roles_columns(layout, rotary):
    proto = _packed_graph(layout, rotary)
    model = ir.from_onnx(proto)
    modified, ctx = _fuse(model)
    assert modified and ctx.diagnostics == [], [str(d) for d in ctx.diagnostics]
    ops = [n.op_type for n in model.graph]
    assert "Softmax" not in ops
    op = "MultiHeadAttention" if rotary else "Attention"
    assert ops.count(op) == 1, ops
    fused = next(n for n in model.graph if n.op_type == op)
    assert fused.attr("num_heads") == N and fused.attr("unidirectional") == 1
    if rotary:  # the partial rotary goes into the op's Q and K, on the 3-D [B,S,N·d] form
        rots = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
        assert len(rots) == 2
        assert {r.outputs[0].name for r in rots} == {fused.inputs[0].name, fused.inputs[1].name}
        for r in rots:
            assert r.attr("rotary_embedding_dim") == ROT and r.attr("num_heads") == N
            assert r.attr("interleaved") == int(layout == "codegen")
    else:  # the packed weight is the roles' columns side by side
        w = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "w"))
        cols = _closed_form(layout)
        np.testing.assert_array_equal(fused.inputs[1].const_value.numpy(),
                                      np.concatenate([w[:, cols[r]] for r in "qkv"], axis=1))
    out = ir.to_onnx(model)
    for batch in (1, 2):
        feeds = _feeds(batch)
        ref, got = ort_run(proto, feeds)["y"], ort_run(out, feeds)["y"]
        assert np.max(np.abs(ref - got)) <= 1e-5
    modified, _ = _fuse(model)
    assert not modified


def test_onnx_target_writes_a_packed_layer_in_standard_ops():
    proto = _packed_graph("codegen", rotary=False)
    model = ir.from_onnx(proto)
    modified, ctx = _fuse(model, targets.get("onnx"))
    assert modified, [str(d) for d in ctx.diagnostics]
    assert all(n.domain in ("", "ai.onnx") for n in model.graph)
    out = ir.to_onnx(model)
    for batch in (1, 2):
        feeds = _feeds(batch)
        assert np.max(np.abs(ort_run(proto, feeds)["y"] - ort_run(out, feeds)["y"])) <= 1e-5


def test_a_view_mixing_tokens_into_heads_is_a_near_miss():
    proto = _packed_graph("mixed")
    model = ir.from_onnx(proto)
    before = ir.print_model(model)
    modified, ctx = _fuse(model)
    assert not modified
    assert ir.print_model(model) == before
    notes = [str(d) for d in ctx.diagnostics]
    assert len(notes) == 1, notes
    assert "Softmax" in notes[0] and "packed projection" in notes[0] and "mixes token and column axes" in notes[0]


@pytest.mark.parametrize("cut", ["Gather", "GatherND"])
def test_multi_query_heads_cut_by_gather(cut):
    # Falcon: qkv.view(B, S, N + 2, d); key = [..., [-2], :] (dynamo: GatherND on the head axis
    # moved to the front), query = [..., :-2, :].
    inits = [_init("w", np.zeros((H, (N + 2) * D), np.float32)),
             _init("view_shape", np.array([0, 0, N + 2, D], np.int64)),
             _init("s0", np.array([0], np.int64)), _init("m2", np.array([-2], np.int64)),
             _init("ax2", np.array([2], np.int64)),
             _init("key_at", np.array([[-2]] if cut == "GatherND" else [-2], np.int64))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["qkv"]),
             helper.make_node("Reshape", ["qkv", "view_shape"], ["view"]),
             helper.make_node("Slice", ["view", "s0", "m2", "ax2"], ["q"])]
    if cut == "GatherND":
        nodes += [helper.make_node("Transpose", ["view"], ["heads_first"], perm=[2, 0, 1, 3]),
                  helper.make_node("GatherND", ["heads_first", "key_at"], ["k"])]
    else:
        nodes += [helper.make_node("Gather", ["view", "key_at"], ["k"], axis=2)]
    g = helper.make_graph(nodes, "falcon_cut", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", H])],
                          [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in "qk"], inits)
    model = ir.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8))
    by_out = {n.outputs[0].name: n for n in model.graph}
    view = [by_out["view"]] + ([by_out["heads_first"]] if cut == "GatherND" else [])
    q = role_columns(by_out["q"].outputs[0], [by_out["view"], by_out["q"]], (N + 2) * D)
    k = role_columns(by_out["k"].outputs[0], view + [by_out["k"]], (N + 2) * D)
    np.testing.assert_array_equal(q, np.arange(N * D))
    np.testing.assert_array_equal(k, np.arange(N * D, (N + 1) * D))


def test_a_cut_of_the_batch_axis_is_no_column_set():
    # A static batch of 2 viewed as [2, S, N, 3d] and sliced to its first row: tokens of the
    # second row hold nothing, so the cut is no set of columns shared by every token.
    inits = [_init("w", np.zeros((H, 3 * H), np.float32)), _init("neox_shape", np.array([0, 0, N, 3 * D], np.int64)),
             _init("s0", np.array([0], np.int64)), _init("s1", np.array([1], np.int64))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["qkv"]),
             helper.make_node("Reshape", ["qkv", "neox_shape"], ["view"]),
             helper.make_node("Slice", ["view", "s0", "s1", "s0"], ["row0"])]
    g = helper.make_graph(nodes, "batch_cut", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, H])],
                          [helper.make_tensor_value_info("row0", TensorProto.FLOAT, None)], inits,
                          value_info=[helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [2, 5, 3 * H])])
    model = ir.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8))
    view, cut = list(model.graph)[1:]
    whole = role_columns(view.outputs[0], [view, cut], 3 * H)  # (not the cut's output)
    assert isinstance(whole, str) and "not cut" in whole
    got = role_columns(cut.outputs[0], [view, cut], 3 * H)
    assert isinstance(got, str) and "different columns" in got, got
