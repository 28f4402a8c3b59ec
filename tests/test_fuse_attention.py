"""fuse-attention: golden tests on hand-built graphs, and numerics on exports of real models.

The exports cover BERT-style encoders (MiniLM, BERT, DistilBERT, RoBERTa) and GPT-2 (causal,
packed QKV), each from both torch exporters and with both ``sdpa`` and ``eager`` attention.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
import targets
from conftest import ort_run
from passes import PassContext, PassManager, registered_passes

H, N, D = 8, 2, 4
CONTRIB = targets.get("x86-avx2")


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _encoder_graph(mask_kind: str = "padding") -> onnx.ModelProto:
    """BERT-style attention: three projections, Div scale, (1 - mask) * -10000 additive mask."""
    rng = np.random.default_rng(0)
    inits = [_init(f"w{c}", rng.standard_normal((H, H)).astype(np.float32) * 0.5) for c in "qkv"]
    inits += [_init(f"b{c}", rng.standard_normal(H).astype(np.float32) * 0.1) for c in "qkv"]
    inits += [
        _init("heads_shape", np.array([0, 0, N, D], np.int64)),
        _init("merge_shape", np.array([0, 0, H], np.int64)),
        _init("axes12", np.array([1, 2], np.int64)),
        _init("one", np.array(1.0, np.float32)),
        _init("neg", np.array(-10000.0, np.float32)),
        _init("three", np.array(3.0, np.float32)),
        _init("sqrt_d", np.array(np.sqrt(D), np.float32)),
    ]
    nodes = []
    for c in "qkv":
        nodes += [
            helper.make_node("MatMul", ["x", f"w{c}"], [f"{c}_mm"]),
            helper.make_node("Add", [f"{c}_mm", f"b{c}"], [f"{c}_proj"]),
            helper.make_node("Reshape", [f"{c}_proj", "heads_shape"], [f"{c}_4d"]),
        ]
    nodes += [
        helper.make_node("Transpose", ["q_4d"], ["qh"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k_4d"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v_4d"], ["vh"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qh", "kt"], ["scores"]),
        helper.make_node("Div", ["scores", "sqrt_d"], ["scaled"]),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes12"], ["mask4"]),
    ]
    if mask_kind == "padding":
        nodes += [
            helper.make_node("Sub", ["one", "mask4"], ["inv"]),
            helper.make_node("Mul", ["inv", "neg"], ["addmask"]),
        ]
    else:  # kept keys' scores times 3, padded ones times 0: neither a mask nor a bias, must not be fused
        nodes += [helper.make_node("Mul", ["mask4", "three"], ["addmask"])]
    nodes += [
        helper.make_node("Add" if mask_kind == "padding" else "Mul", ["scaled", "addmask"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "vh"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", H]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", H])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def causal_padding_where() -> list[onnx.NodeProto]:
    """``logits = Where(causal & padding, scores, ninf)``: key j <= query i from Range(0, seq), and the
    [B, T] ``mask``; reads ``x``, ``scores`` and the initializers idx1, zero, step, ax0, ax1, axes12, ninf."""
    return [
        helper.make_node("Shape", ["x"], ["xshape"]),
        helper.make_node("Gather", ["xshape", "idx1"], ["seqlen"], axis=0),
        helper.make_node("Range", ["zero", "seqlen", "step"], ["pos"]),
        helper.make_node("Unsqueeze", ["pos", "ax0"], ["keys"]),
        helper.make_node("Unsqueeze", ["pos", "ax1"], ["queries"]),
        helper.make_node("LessOrEqual", ["keys", "queries"], ["causal"]),
        helper.make_node("Cast", ["mask"], ["maskb"], to=TensorProto.BOOL),
        helper.make_node("Unsqueeze", ["maskb", "axes12"], ["pad"]),
        helper.make_node("And", ["causal", "pad"], ["allowed"]),
        helper.make_node("Where", ["allowed", "scores", "ninf"], ["logits"]),
    ]


def _decoder_graph() -> onnx.ModelProto:
    """GPT-2-style attention: one packed projection split in three, a boolean causal+padding Where mask."""
    rng = np.random.default_rng(1)
    inits = [
        _init("w", rng.standard_normal((H, 3 * H)).astype(np.float32) * 0.5),
        _init("b", rng.standard_normal(3 * H).astype(np.float32) * 0.1),
        _init("heads_shape", np.array([0, 0, N, D], np.int64)),
        _init("merge_shape", np.array([0, 0, H], np.int64)),
        _init("axes12", np.array([1, 2], np.int64)),
        _init("ax0", np.array([0], np.int64)),
        _init("ax1", np.array([1], np.int64)),
        _init("idx1", np.array(1, np.int64)),
        _init("zero", np.array(0, np.int64)),
        _init("step", np.array(1, np.int64)),
        _init("scale", np.array(1.0 / np.sqrt(D), np.float32)),
        _init("ninf", np.array(-np.inf, np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("Add", ["b", "mm"], ["qkv"]),
        helper.make_node("Split", ["qkv"], ["q", "k", "v"], axis=2, num_outputs=3),
        helper.make_node("Reshape", ["q", "heads_shape"], ["q4"]),
        helper.make_node("Reshape", ["k", "heads_shape"], ["k4"]),
        helper.make_node("Reshape", ["v", "heads_shape"], ["v4"]),
        helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k4"], ["kh"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["qh", "scale"], ["qs"]),
        helper.make_node("MatMul", ["qs", "kt"], ["scores"]),
        *causal_padding_where(),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "vh"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", H]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", H])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def _feeds(batch: int, seq: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    mask = np.ones((batch, seq), np.int64)
    if batch > 1:
        mask[1, seq - seq // 2 :] = 0
    return {"x": rng.standard_normal((batch, seq, H)).astype(np.float32), "mask": mask}


def _run_pass(model: ir.Model, target=CONTRIB, pipeline: str = "fuse-attention") -> tuple[bool, PassContext]:
    ctx = PassContext(target=target, explain=True)
    records = PassManager(pipeline, verify=True, check_modified=True).run(model, ctx)
    return any(r.modified for r in records), ctx


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


@pytest.mark.parametrize("build, causal", [(_encoder_graph, False), (_decoder_graph, True)], ids=["encoder", "decoder"])
def test_golden_fuses_to_one_attention(build, causal):
    proto = build()
    model = ir.from_onnx(proto)
    modified, ctx = _run_pass(model)
    assert modified
    assert ctx.diagnostics == []
    assert _ops(model) == ["Cast", "Attention"]
    att = next(n for n in model.graph if n.op_type == "Attention")
    assert att.domain == "com.microsoft"
    assert att.attr("num_heads") == N
    assert att.attr("unidirectional", 0) == int(causal)
    assert "scale" not in att.attributes  # 1/sqrt(head_dim) is the default
    assert att.inputs[0].name == "x" and att.inputs[3].producer().inputs[0].name == "mask"
    assert att.inputs[1].const_value.shape == (H, 3 * H)
    assert model.opset_imports.get("com.microsoft") == 1
    # Nothing left to fuse: a second run reports no change.
    modified, _ = _run_pass(model)
    assert not modified
    fused = ir.to_onnx(model)
    for batch in (1, 2):
        feeds = _feeds(batch)
        ref, got = ort_run(proto, feeds)["y"], ort_run(fused, feeds)["y"]
        assert np.max(np.abs(ref - got)) <= 1e-5


def test_unknown_mask_is_a_near_miss_and_not_fused():
    model = ir.from_onnx(_encoder_graph(mask_kind="bias"))
    before = ir.print_model(model)
    modified, ctx = _run_pass(model)
    assert not modified
    assert ir.print_model(model) == before
    notes = [str(d) for d in ctx.diagnostics]
    assert len(notes) == 1, notes
    assert "Softmax" in notes[0] and "mask at Mul" in notes[0] and "not a padding or causal mask" in notes[0]


def test_onnx_target_gets_the_standard_form_without_contrib_ops():
    model = ir.from_onnx(_encoder_graph())
    modified, _ = _run_pass(model, target=targets.get("onnx"))
    assert modified
    ops = _ops(model)
    assert "Softmax" in ops and "Attention" not in ops
    assert all(n.domain in ("", "ai.onnx") for n in model.graph)


def test_non_attention_softmax_is_left_alone():
    g = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "sm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = ir.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    modified, ctx = _run_pass(model)
    assert not modified
    assert len(ctx.diagnostics) == 1 and "graph output" in str(ctx.diagnostics[0])


# ------------------------------------------------------------------------------------------------
# Real exports
# ------------------------------------------------------------------------------------------------

_LAYERS = {"minilm": 6, "bert": 2, "distilbert": 2, "roberta": 2, "gpt2": 2}
_PRE = "dead-flow,fold-constants,simplify"


def _real_feeds(arch: str, batch: int, seq: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    vocab = 1000
    feeds = {
        "input_ids": rng.integers(3, vocab, size=(batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), np.int64),
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }
    if batch > 1:
        feeds["attention_mask"][1, seq // 2 :] = 0  # second row half padding
    return feeds


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("arch", ["minilm", "bert", "distilbert", "roberta", "gpt2"])
def test_real_exports_fuse_every_layer(exported, arch, dynamo, attn):
    path = exported(arch, dynamo=dynamo, attn=attn)
    proto = onnx.load(str(path))
    pipelines = ["fuse-attention"]
    if all(p in registered_passes() for p in _PRE.split(",")):
        pipelines.append(_PRE + ",fuse-attention,dead-flow")
    for pipeline in pipelines:
        model = ir.from_onnx(proto)
        _, ctx = _run_pass(model, pipeline=pipeline)
        ops = _ops(model)
        assert ops.count("Attention") == _LAYERS[arch], (pipeline, [str(d) for d in ctx.diagnostics])
        assert "Softmax" not in ops
        assert all(n.domain == "com.microsoft" for n in model.graph if n.op_type == "Attention")
        if arch == "gpt2":
            assert all(n.attr("unidirectional") == 1 for n in model.graph if n.op_type == "Attention")
        assert_real_outputs_equal(proto, model, arch, pipeline)


def assert_real_outputs_equal(proto: onnx.ModelProto, model: ir.Model, arch: str, label: str) -> None:
    """``model`` computes ``proto``'s outputs (1e-4) at batch 1 and on a half-padded batch of 2."""
    fused = ir.to_onnx(model)
    for batch in (1, 2):
        feeds = _real_feeds(arch, batch)
        ref, got = ort_run(proto, feeds), ort_run(fused, feeds)
        for name in ref:
            err = float(np.max(np.abs(ref[name] - got[name])))
            assert err <= 1e-4, (label, batch, name, err)
