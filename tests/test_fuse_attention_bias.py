"""fuse-attention with an additive score bias: ``scale·Q·Kᵀ + B`` (+ mask) → ``attention_bias``.

Hand-built layers whose bias does not depend on the query/key values (ALiBi slopes times
positions, a relative-position table gathered by clipped offsets and shared by two layers, a
banded sliding-window ``Where``, the latter behind sdpa's NaN guard with rows that see no key),
each checked against onnxruntime on the original (optimizations off) on both the contrib and the
``onnx`` target; and the near misses: a bias read from the query values, and Gemma-2's logit
soft-capping. The zoo exports (bloom, mpt, t5, mpnet, swin, mistral, gpt-neo, modernbert) are in
tests/test_arch_matrix.py.
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

H, N, D = 8, 2, 4
CONTRIB = targets.get("x86-avx2")
STANDARD = targets.get("onnx")
LOW = float(np.finfo(np.float32).min)


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _positions(nodes: list, inits: list) -> None:
    """``pos`` [T] int64, ``posf`` [T] float, ``rel`` [S, T] = j - i, from the input's sequence length."""
    inits += [_init("zero", np.array(0, np.int64)), _init("step", np.array(1, np.int64)),
              _init("idx1", np.array(1, np.int64)), _init("ax0", np.array([0], np.int64)),
              _init("ax1", np.array([1], np.int64))]
    nodes += [
        helper.make_node("Shape", ["x"], ["xshape"]),
        helper.make_node("Gather", ["xshape", "idx1"], ["seqlen"], axis=0),
        helper.make_node("Range", ["zero", "seqlen", "step"], ["pos"]),
        helper.make_node("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pos", "ax0"], ["keys"]),
        helper.make_node("Unsqueeze", ["pos", "ax1"], ["queries"]),
        helper.make_node("Sub", ["keys", "queries"], ["rel"]),
    ]


def _graph(bias: str, layers: int = 1) -> onnx.ModelProto:
    """``layers`` attention layers whose scores get the bias ``bias`` and a key padding mask."""
    rng = np.random.default_rng(3)
    inits = [_init("heads_shape", np.array([0, 0, N, D], np.int64)),
             _init("merge_shape", np.array([0, 0, H], np.int64)),
             _init("axes12", np.array([1, 2], np.int64)), _init("one", np.array(1.0, np.float32)),
             _init("neg", np.array(-10000.0, np.float32)), _init("sqrt_d", np.array(np.sqrt(D), np.float32)),
             _init("low", np.array(LOW, np.float32)), _init("ninf", np.array(-np.inf, np.float32)),
             _init("fzero", np.array(0.0, np.float32)), _init("lastaxis", np.array([-1], np.int64))]
    nodes: list = []
    _positions(nodes, inits)
    nodes += [helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
              helper.make_node("Unsqueeze", ["maskf", "axes12"], ["mask4"]),
              helper.make_node("Sub", ["one", "mask4"], ["inv"]),
              helper.make_node("Mul", ["inv", "neg"], ["addmask"]),  # [B,1,1,T]
              helper.make_node("Cast", ["mask4"], ["keep4"], to=TensorProto.BOOL)]
    if bias == "alibi":  # slopes [N,1,1] * key positions [T] -> [N,1,T]
        inits.append(_init("slopes", np.array([0.5, 0.25], np.float32).reshape(N, 1, 1)))
        nodes.append(helper.make_node("Mul", ["slopes", "posf"], ["bias"]))
    elif bias == "relative":  # table[clip(j - i, -4, 4) + 4] -> [1, N, S, T], computed once for all layers
        inits += [_init("table", rng.standard_normal((9, N)).astype(np.float32)),
                  _init("lo", np.array(-4, np.int64)), _init("hi", np.array(4, np.int64)),
                  _init("four", np.array(4, np.int64))]
        nodes += [helper.make_node("Clip", ["rel", "lo", "hi"], ["relc"]),
                  helper.make_node("Add", ["relc", "four"], ["bucket"]),
                  helper.make_node("Gather", ["table", "bucket"], ["emb"], axis=0),
                  helper.make_node("Transpose", ["emb"], ["embt"], perm=[2, 0, 1]),
                  helper.make_node("Unsqueeze", ["embt", "ax0"], ["bias"])]
    elif bias in ("window", "window_inf"):  # |j - i| <= 2
        inits.append(_init("two", np.array(2, np.int64)))
        nodes += [helper.make_node("Abs", ["rel"], ["dist"]),
                  helper.make_node("LessOrEqual", ["dist", "two"], ["band"])]
    for layer in range(layers):
        p = f"l{layer}_"
        x = "x" if layer == 0 else f"l{layer - 1}_res"
        inits += [_init(f"{p}w{c}", rng.standard_normal((H, H)).astype(np.float32) * 0.5) for c in "qkv"]
        inits += [_init(f"{p}b{c}", rng.standard_normal(H).astype(np.float32) * 0.1) for c in "qkv"]
        for c in "qkv":
            nodes += [helper.make_node("MatMul", [x, f"{p}w{c}"], [f"{p}{c}_mm"]),
                      helper.make_node("Add", [f"{p}{c}_mm", f"{p}b{c}"], [f"{p}{c}_proj"]),
                      helper.make_node("Reshape", [f"{p}{c}_proj", "heads_shape"], [f"{p}{c}_4d"])]
        nodes += [helper.make_node("Transpose", [f"{p}q_4d"], [f"{p}qh"], perm=[0, 2, 1, 3]),
                  helper.make_node("Transpose", [f"{p}k_4d"], [f"{p}kt"], perm=[0, 2, 3, 1]),
                  helper.make_node("Transpose", [f"{p}v_4d"], [f"{p}vh"], perm=[0, 2, 1, 3]),
                  helper.make_node("MatMul", [f"{p}qh", f"{p}kt"], [f"{p}scores"]),
                  helper.make_node("Div", [f"{p}scores", "sqrt_d"], [f"{p}scaled"])]
        probs = f"{p}probs"
        if bias == "alibi_k":  # MPT/T5: sized by the key heads' Shape, not the input's
            inits.append(_init(f"{p}slopes", np.array([0.5, 0.25], np.float32).reshape(N, 1, 1)))
            inits.append(_init(f"{p}three", np.array(3, np.int64)))
            nodes += [helper.make_node("Shape", [f"{p}kt"], [f"{p}kshape"]),
                      helper.make_node("Gather", [f"{p}kshape", f"{p}three"], [f"{p}klen"], axis=0),
                      helper.make_node("Range", ["zero", f"{p}klen", "step"], [f"{p}kpos"]),
                      helper.make_node("Cast", [f"{p}kpos"], [f"{p}kposf"], to=TensorProto.FLOAT),
                      helper.make_node("Mul", [f"{p}slopes", f"{p}kposf"], [f"{p}kbias"]),
                      helper.make_node("Add", [f"{p}scaled", f"{p}kbias"], [f"{p}biased"]),
                      helper.make_node("Add", [f"{p}biased", "addmask"], [f"{p}logits"])]
        elif bias in ("alibi", "relative"):
            nodes += [helper.make_node("Add", [f"{p}scaled", "bias"], [f"{p}biased"]),
                      helper.make_node("Add", [f"{p}biased", "addmask"], [f"{p}logits"])]
        elif bias == "hidden":  # from the layer input by a projection of its own: depends on the hidden states
            inits.append(_init(f"{p}wb", rng.standard_normal((H, 1)).astype(np.float32)))
            nodes += [helper.make_node("MatMul", [x, f"{p}wb"], [f"{p}xb"]),  # [B, S, 1]
                      helper.make_node("Unsqueeze", [f"{p}xb", "ax1"], [f"{p}xb4"]),  # [B, 1, S, 1]
                      helper.make_node("Mul", [f"{p}xb4", "posf"], [f"{p}qbias"]),  # [B, 1, S, T]
                      helper.make_node("Add", [f"{p}scaled", f"{p}qbias"], [f"{p}biased"]),
                      helper.make_node("Add", [f"{p}biased", "addmask"], [f"{p}logits"])]
        elif bias == "query":  # sum over the query head dim times key positions: depends on Q
            nodes += [helper.make_node("ReduceSum", [f"{p}qh", "lastaxis"], [f"{p}qsum"], keepdims=1),
                      helper.make_node("Mul", [f"{p}qsum", "posf"], [f"{p}qbias"]),
                      helper.make_node("Add", [f"{p}scaled", f"{p}qbias"], [f"{p}biased"]),
                      helper.make_node("Add", [f"{p}biased", "addmask"], [f"{p}logits"])]
        elif bias == "softcap":  # Gemma-2: 5·tanh(s/5) before the mask
            inits.append(_init(f"{p}cap", np.array(5.0, np.float32)))
            nodes += [helper.make_node("Div", [f"{p}scaled", f"{p}cap"], [f"{p}s1"]),
                      helper.make_node("Tanh", [f"{p}s1"], [f"{p}s2"]),
                      helper.make_node("Mul", [f"{p}s2", f"{p}cap"], [f"{p}capped"]),
                      helper.make_node("Add", [f"{p}capped", "addmask"], [f"{p}logits"])]
        elif bias == "window":  # finfo.min outside the band, then the additive padding mask
            nodes += [helper.make_node("Where", ["band", f"{p}scaled", "low"], [f"{p}windowed"]),
                      helper.make_node("Add", [f"{p}windowed", "addmask"], [f"{p}logits"])]
        else:  # window_inf: -inf outside the band and on padded keys, sdpa's NaN guard after the Softmax
            nodes += [helper.make_node("Where", ["band", f"{p}scaled", "ninf"], [f"{p}windowed"]),
                      helper.make_node("Where", ["keep4", f"{p}windowed", "ninf"], [f"{p}logits"])]
            probs = f"{p}raw_probs"
        nodes.append(helper.make_node("Softmax", [f"{p}logits"], [probs], axis=-1))
        if probs != f"{p}probs":
            nodes += [helper.make_node("IsNaN", [probs], [f"{p}isnan"]),
                      helper.make_node("Where", [f"{p}isnan", "fzero", probs], [f"{p}probs"])]
        nodes += [
                  helper.make_node("MatMul", [f"{p}probs", f"{p}vh"], [f"{p}ctx"]),
                  helper.make_node("Transpose", [f"{p}ctx"], [f"{p}ctx_t"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [f"{p}ctx_t", "merge_shape"], [f"{p}y"]),
                  helper.make_node("Add", [x, f"{p}y"], [f"{p}res"])]  # the residual
    g = helper.make_graph(
        nodes, "biased_attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", H]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info(f"l{layers - 1}_res", TensorProto.FLOAT, ["batch", "seq", H])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _feeds(batch: int, seq: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    mask = np.ones((batch, seq), np.int64)
    if batch > 1:
        mask[1, seq - seq // 2:] = 0  # right padding: with a window of 2, the last queries see no key
    return {"x": rng.standard_normal((batch, seq, H)).astype(np.float32), "mask": mask}


def _run(model: ir.Model, target) -> tuple[bool, PassContext]:
    ctx = PassContext(target=target, explain=True)
    records = PassManager("fuse-attention", verify=True, check_modified=True).run(model, ctx)
    return any(r.modified for r in records), ctx


def _same_outputs(proto: onnx.ModelProto, model: ir.Model, tol: float = 1e-5) -> None:
    fused = ir.to_onnx(model)
    for batch, seq in ((1, 16), (2, 16), (2, 5)):
        feeds = _feeds(batch, seq)
        ref, got = ort_run(proto, feeds), ort_run(fused, feeds)
        for name in ref:  # every position, padded rows included
            assert np.max(np.abs(ref[name] - got[name])) <= tol, (name, batch, seq)


@pytest.mark.parametrize("bias", ["alibi", "alibi_k", "relative", "window", "window_inf"])
def test_bias_becomes_attention_bias(bias):
    proto = _graph(bias)
    model = ir.from_onnx(proto)
    modified, ctx = _run(model, CONTRIB)
    assert modified, [str(d) for d in ctx.diagnostics]
    ops = [n.op_type for n in model.graph]
    assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops, ops
    mha = next(n for n in model.graph if n.op_type == "MultiHeadAttention")
    assert len(mha.inputs) > 5 and mha.inputs[5] is not None, "no attention_bias"
    assert not mha.attr("unidirectional")
    # The bias is sized by the layer input, not by the key heads: the projections are gone.
    assert ops.count("MatMul") == 1, ops
    modified, _ = _run(model, CONTRIB)
    assert not modified
    _same_outputs(proto, model)


def test_window_rows_with_no_key_give_the_guards_zero():
    """Right padding under a window of 2: the last padded queries see no key; sdpa's guard gives 0
    there, and so must the fused layer (the op alone gives NaN, which would spread)."""
    proto = _graph("window_inf")
    feeds = _feeds(2)
    ref = ort_run(proto, feeds)["l0_res"]
    assert np.all(ref[1, -1] == feeds["x"][1, -1])  # the case is exercised: attention gives 0 there
    model = ir.from_onnx(proto)
    assert _run(model, CONTRIB)[0]
    got = ort_run(ir.to_onnx(model), feeds)["l0_res"]
    assert not np.isnan(got).any() and np.max(np.abs(ref - got)) <= 1e-5


def test_layers_share_one_bias():
    """T5: the position bias is computed once and read by every layer; the fused layers read it too."""
    proto = _graph("relative", layers=2)
    model = ir.from_onnx(proto)
    modified, ctx = _run(model, CONTRIB)
    assert modified
    mhas = [n for n in model.graph if n.op_type == "MultiHeadAttention"]
    assert len(mhas) == 2, [str(d) for d in ctx.diagnostics]
    assert mhas[0].inputs[5] is mhas[1].inputs[5]
    assert sum(n.op_type == "Gather" and n.inputs[0].name == "table" for n in model.graph) == 1
    _same_outputs(proto, model)


@pytest.mark.parametrize("bias", ["alibi", "alibi_k", "relative", "window", "window_inf"])
def test_onnx_target_adds_the_bias_in_standard_ops(bias):
    proto = _graph(bias, layers=2)
    model = ir.from_onnx(proto)
    modified, ctx = _run(model, STANDARD)
    assert modified, [str(d) for d in ctx.diagnostics]
    assert all(n.domain in ("", "ai.onnx") for n in model.graph)
    assert [n.op_type for n in model.graph].count("Softmax") == 2
    for sm in (n for n in model.graph if n.op_type == "Softmax"):
        add = sm.inputs[0].producer()
        assert add.op_type == "Add" and add.inputs[0].producer().op_type == "MatMul"  # one Add per layer
    modified, _ = _run(model, STANDARD)
    assert not modified
    _same_outputs(proto, model)


@pytest.mark.parametrize("bias", ["query", "hidden"])  # from the query heads; from the layer input
def test_bias_that_depends_on_the_query_is_not_fused(bias):
    """Seen by evaluation: the bias changes when only the hidden states (so Q and K) change."""
    why = "changes with the hidden states: it depends on the query or key values"
    model = ir.from_onnx(_graph(bias))
    before = ir.print_model(model)
    modified, ctx = _run(model, CONTRIB)
    assert not modified and ir.print_model(model) == before
    notes = [str(d) for d in ctx.diagnostics]
    assert len(notes) == 1 and why in notes[0], notes


def test_soft_capping_is_explained_and_kept():
    model = ir.from_onnx(_graph("softcap"))
    before = ir.print_model(model)
    modified, ctx = _run(model, CONTRIB)
    assert not modified and ir.print_model(model) == before
    notes = [str(d) for d in ctx.diagnostics]
    assert len(notes) == 1 and "soft-capping" in notes[0] and "kept decomposed" in notes[0], notes


@pytest.mark.parametrize(("name", "phrase"), [("deberta-v2", "disentangled attention"), ("gemma2", "soft-capping")])
def test_zoo_near_misses_say_why(zoo_exported, name, phrase):
    """DeBERTa's c2p/p2c scores read the query/key values; Gemma-2 soft-caps its logits: both stay
    as they are, each Softmax with a line that names the reason."""
    from passes.tools import zoo

    m = zoo.measure(zoo_exported(name))
    assert m.numerics_ok and m.counts["attention"] == 0
    lines = [line for line in m.explain if "Softmax" in line]
    assert len(lines) == 2 and all(phrase in line for line in lines), lines
