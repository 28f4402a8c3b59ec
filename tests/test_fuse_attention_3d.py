"""fuse-attention on batched heads: Bloom's ``baddbmm``/``bmm`` form on ``[B·N, S, ·]`` tensors.

A hand-built Bloom layer: one packed QKV projection laid out per head as ``[N, 3, d]`` (picked by
``Gather`` on axis 3 of the ``[B, S, N, 3, d]`` view), Q/K/V flattened to ``[B·N, S, d]``, the
scores scaled and given an ALiBi term ``[B·N, 1, T]`` in 3-D, viewed as ``[B, N, S, T]`` for the
additive padding mask and the Softmax, the probabilities viewed back as ``[B·N, S, T]`` for the
MatMul with V, then the head merge. Checked against onnxruntime on the original (optimizations
off) on the contrib and the ``onnx`` target; and the near misses, which must stay exactly as they
were with a reason: a 3-D bias read from the query values, and the same layer with the batch and
head axes merged head-major (``[N·B, …]``), which the check must not read as batch-major. The
zoo exports (bloom from both exporters) are in tests/test_arch_matrix.py.
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

H, N, D = 8, 2, 4
CONTRIB = targets.get("x86")
STANDARD = targets.get("onnx")


def _init(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _layer(order: str = "batch", bias: str = "alibi") -> onnx.ModelProto:
    """One Bloom-style layer; ``order``: how B and N merge ("batch": [B·N], "head": [N·B])."""
    rng = np.random.default_rng(5)
    batch_major = order == "batch"
    inits = [_init("w", rng.standard_normal((H, 3 * H)).astype(np.float32) * 0.5),
             _init("b", rng.standard_normal(3 * H).astype(np.float32) * 0.1),
             _init("view5", np.array([0, 0, N, 3, D], np.int64)), _init("merge", np.array([0, 0, H], np.int64)),
             _init("i0", np.array(0, np.int64)), _init("i1", np.array(1, np.int64)), _init("i2", np.array(2, np.int64)),
             _init("ax0", np.array([0], np.int64)), _init("ax1", np.array([1], np.int64)),
             _init("ax02", np.array([0, 2], np.int64)), _init("ax12", np.array([1, 2], np.int64)),
             _init("n1", np.array([N], np.int64)), _init("d1", np.array([D], np.int64)),
             _init("one1", np.array([1], np.int64)), _init("last", np.array([-1], np.int64)),
             _init("alpha", np.array(1 / np.sqrt(D), np.float32)), _init("onef", np.array(1.0, np.float32)),
             _init("neg", np.array(-10000.0, np.float32)), _init("cs_axis", np.array(1, np.int64)),
             _init("slopes", np.array([0.5, 0.25], np.float32).reshape((N, 1) if batch_major else (N, 1, 1)))]
    mk = helper.make_node
    nodes = [
        mk("Shape", ["x"], ["xs"]),
        mk("Gather", ["xs", "i0"], ["bsz"], axis=0), mk("Gather", ["xs", "i1"], ["seq"], axis=0),
        mk("Unsqueeze", ["bsz", "ax0"], ["b1"]), mk("Unsqueeze", ["seq", "ax0"], ["s1"]),
        mk("Mul", ["b1", "n1"], ["bn1"]),
        mk("Concat", ["bn1", "s1", "d1"], ["flat_qkv"], axis=0),
        mk("Concat", ["bn1", "s1", "s1"], ["flat_scores"], axis=0),
        mk("Concat", ["bn1", "one1", "s1"], ["flat_alibi"], axis=0),
        mk("Concat", ["b1", "n1", "s1", "s1"] if batch_major else ["n1", "b1", "s1", "s1"], ["heads_scores"], axis=0),
        mk("Concat", ["b1", "n1", "s1", "d1"] if batch_major else ["n1", "b1", "s1", "d1"], ["heads_ctx"], axis=0),
        mk("MatMul", ["x", "w"], ["qkv_mm"]), mk("Add", ["b", "qkv_mm"], ["qkv"]),
        mk("Reshape", ["qkv", "view5"], ["qkv5"]),
    ]
    for i, r in enumerate("qkv"):  # [B, S, N, d] -> [B, N, S, d] (or [N, B, S, d]) -> [B·N, S, d]
        nodes += [mk("Gather", ["qkv5", f"i{i}"], [f"{r}4"], axis=3),
                  mk("Transpose", [f"{r}4"], [f"{r}h"], perm=[0, 2, 1, 3] if batch_major else [2, 0, 1, 3]),
                  mk("Reshape", [f"{r}h", "flat_qkv"], [f"{r}3"])]
    # ALiBi as Bloom builds it: slopes × ((cumsum(mask) - 1) · mask), flattened to [B·N, 1, T]
    nodes += [mk("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT), mk("CumSum", ["maskf", "cs_axis"], ["cs"]),
              mk("Sub", ["cs", "onef"], ["cs1"]), mk("Mul", ["cs1", "maskf"], ["pos"]),
              mk("Unsqueeze", ["pos", "ax1" if batch_major else "ax0"], ["pos3"]),
              mk("Mul", ["pos3", "slopes"], ["alibi_bn"]), mk("Reshape", ["alibi_bn", "flat_alibi"], ["alibi"]),
              mk("Transpose", ["k3"], ["kt"], perm=[0, 2, 1]),
              mk("MatMul", ["q3", "kt"], ["scores"]), mk("Mul", ["scores", "alpha"], ["scaled"])]
    if bias == "alibi":
        nodes.append(mk("Add", ["scaled", "alibi"], ["biased"]))
    else:  # "query": the ALiBi term times the sum of each query: depends on the query values
        nodes += [mk("ReduceSum", ["q3", "last"], ["qsum"], keepdims=1), mk("Mul", ["qsum", "alibi"], ["qbias"]),
                  mk("Add", ["scaled", "qbias"], ["biased"])]
    nodes += [mk("Reshape", ["biased", "heads_scores"], ["scores4"]),
              mk("Sub", ["onef", "maskf"], ["inv"]), mk("Mul", ["inv", "neg"], ["addmask2"]),
              mk("Unsqueeze", ["addmask2", "ax12" if batch_major else "ax02"], ["addmask"]),
              mk("Add", ["scores4", "addmask"], ["logits"]), mk("Softmax", ["logits"], ["probs"], axis=-1),
              mk("Reshape", ["probs", "flat_scores"], ["probs3"]), mk("MatMul", ["probs3", "v3"], ["ctx3"]),
              mk("Reshape", ["ctx3", "heads_ctx"], ["ctx4"]),
              mk("Transpose", ["ctx4"], ["ctx_t"], perm=[0, 2, 1, 3] if batch_major else [1, 2, 0, 3]),
              mk("Reshape", ["ctx_t", "merge"], ["y"]), mk("Add", ["x", "y"], ["out"])]
    g = helper.make_graph(
        nodes, "bloom_attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", H]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", H])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _feeds(batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    mask = np.ones((batch, seq), np.int64)
    if batch > 1:
        mask[1, seq - seq // 2:] = 0  # right padding
    if batch > 2:
        mask[2, :2] = 0  # left padding: ALiBi's cumsum positions start later
    return {"x": rng.standard_normal((batch, seq, H)).astype(np.float32), "mask": mask}


def _run(model: ir.Model, target) -> tuple[bool, PassContext]:
    ctx = PassContext(target=target, explain=True)
    records = PassManager("fuse-attention", verify=True, check_modified=True).run(model, ctx)
    return any(r.modified for r in records), ctx


def _same_outputs(proto: onnx.ModelProto, model: ir.Model) -> None:
    fused = ir.to_onnx(model)
    for batch, seq in ((1, 9), (2, 16), (3, 5)):
        feeds = _feeds(batch, seq)
        ref, got = ort_run(proto, feeds)["out"], ort_run(fused, feeds)["out"]
        keep = feeds["mask"].astype(bool)  # padded query rows too: the additive mask keeps them finite
        assert np.max(np.abs(ref - got)) <= 1e-5 and keep.any(), (batch, seq, np.max(np.abs(ref - got)))


def test_bloom_layer_becomes_one_multi_head_attention():
    proto = _layer()
    model = ir.from_onnx(proto)
    modified, ctx = _run(model, CONTRIB)
    assert modified, [str(d) for d in ctx.diagnostics]
    ops = [n.op_type for n in model.graph]
    assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops, ops
    mha = next(n for n in model.graph if n.op_type == "MultiHeadAttention")
    assert mha.attr("num_heads") == N
    assert len(mha.inputs) > 5 and mha.inputs[5] is not None, "the ALiBi term is not the attention_bias"
    # One MatMul reads the query/key/value columns picked from the interleaved weight; the view is gone.
    assert ops.count("MatMul") == 1 and "CumSum" in ops, ops
    assert not any(n.op_type == "Gather" and n.attr("axis") == 3 for n in model.graph)
    assert not _run(model, CONTRIB)[0]  # a second run changes nothing
    _same_outputs(proto, model)


def test_bloom_layer_in_standard_ops():
    proto = _layer()
    model = ir.from_onnx(proto)
    modified, ctx = _run(model, STANDARD)
    assert modified, [str(d) for d in ctx.diagnostics]
    assert all(n.domain in ("", "ai.onnx") for n in model.graph)
    ops = [n.op_type for n in model.graph]
    assert ops.count("Softmax") == 1 and ops.count("Split") == 1, ops
    sm = next(n for n in model.graph if n.op_type == "Softmax")
    add = sm.inputs[0].producer()  # one Add of the mask and the ALiBi term, straight on the 4-D scores
    assert add.op_type == "Add" and add.inputs[0].producer().op_type == "MatMul", add
    assert not _run(model, STANDARD)[0]
    _same_outputs(proto, model)


@pytest.mark.parametrize(("order", "bias", "why"), [
    ("batch", "query", "changes with the hidden states: it depends on the query or key values"),
    ("head", "alibi", "query heads are not a scaled [B,N,S,d] view of the query projection"),
])
def test_near_misses_stay_as_they_are(order, bias, why):
    proto = _layer(order, bias)
    model = ir.from_onnx(proto)
    before = ir.print_model(model)
    modified, ctx = _run(model, CONTRIB)
    assert not modified and ir.print_model(model) == before
    notes = [str(d) for d in ctx.diagnostics]
    assert len(notes) == 1 and why in notes[0], notes
    feeds = _feeds(2, 6)  # the near misses are attention layers all the same: the original runs
    assert np.isfinite(ort_run(proto, feeds)["out"]).all()


def test_role_columns_of_bloom_packing():
    """[N, 3, d] per head: the query of head h is columns h·3d .. h·3d + d (index arithmetic on the view)."""
    model = ir.from_onnx(_layer())
    ir.infer_shapes(model)
    nodes = {n.outputs[0].name: n for n in model.graph}
    view = nodes["qkv5"]
    q = role_columns(nodes["q4"].outputs[0], [view, nodes["q4"]], 3 * H)
    k = role_columns(nodes["k4"].outputs[0], [view, nodes["k4"]], 3 * H)
    assert list(q) == [h * 3 * D + j for h in range(N) for j in range(D)]
    assert list(k) == [h * 3 * D + D + j for h in range(N) for j in range(D)]
