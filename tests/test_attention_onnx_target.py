"""fuse-attention on the ``onnx`` target: matched layers rewritten in the fewest standard ONNX ops.

What is checked:

* golden tests on hand-built layers (padding; causal+padding with ``-inf`` with and without a NaN
  guard): the exact op sequence (mask built once, 15 nodes a layer), the scale folded into the Q
  weights, no ``com.microsoft`` op or opset import, numerics against the original (rows with no
  visible key included: NaN where the original gives NaN, 0 where it guards), and ``modified``
  both ways under ``PassManager(check_modified=True)``;
* layers the form does not cover (a KV cache) and non-mask biases are left alone with a note;
* real exports (MiniLM with real weights, BERT, DistilBERT, GPT-2; both exporters; sdpa and eager)
  through the full ``onnx`` target pipeline: every layer rewritten, the mask shared, no contrib op,
  outputs within 1e-4 of the original at batch 1 and batch 2 (second row half padded, on the right
  and, for GPT-2, on the left).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

import ir
import targets
from conftest import ROOT, ort_run
from passes import PassContext, PassManager
from test_fuse_attention import D, H, N, _decoder_graph, _encoder_graph, _feeds
from test_fuse_attention_past import _past_layer

ONNX = targets.get("onnx")
LAYER_OPS = ["MatMul", "Add", "Split", "Reshape", "Transpose", "Reshape", "Transpose", "Reshape", "Transpose",
             "MatMul", "Add", "Softmax", "MatMul", "Transpose", "Reshape"]
PADDING_MASK_OPS = ["Cast", "Reshape", "Where"]
CAUSAL_MASK_OPS = ["Cast", "Reshape", "Shape", "Concat", "ConstantOfShape", "Trilu", "And", "Where"]


def _run(model: ir.Model, pipeline: str = "fuse-attention") -> tuple[bool, PassContext]:
    ctx = PassContext(target=ONNX, explain=True)
    records = PassManager(pipeline, verify=True, check_modified=True).run(model, ctx)
    return any(r.modified for r in records), ctx


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _no_contrib(model: ir.Model) -> None:
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.all_nodes())
    assert "com.microsoft" not in model.opset_imports


def _guarded(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The decoder layer with sdpa's NaN guard after the Softmax: rows with no key give 0."""
    g = proto.graph
    nodes = list(g.node)
    i = next(k for k, n in enumerate(nodes) if n.op_type == "Softmax")
    nodes[i] = helper.make_node("Softmax", ["logits"], ["probs_raw"], axis=-1)
    nodes[i + 1 : i + 1] = [
        helper.make_node("IsNaN", ["probs_raw"], ["isnan"]),
        helper.make_node("Where", ["isnan", "fzero", "probs_raw"], ["probs"]),
    ]
    inits = list(g.initializer) + [onnx.numpy_helper.from_array(np.array(0.0, np.float32), "fzero")]
    graph = helper.make_graph(nodes, g.name, list(g.input), list(g.output), inits)
    return helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)


def _left_padded(batch: int, seq: int = 6) -> dict[str, np.ndarray]:
    feeds = _feeds(batch, seq)
    feeds["mask"][:] = 1
    feeds["mask"][-1, : seq // 2] = 0  # causal rows 0..seq/2-1 of the last sequence see no key
    return feeds


def test_golden_encoder_layer_in_standard_ops():
    proto = _encoder_graph()
    model = ir.from_onnx(proto)
    modified, ctx = _run(model)
    assert modified and ctx.diagnostics == []
    assert _ops(model) == PADDING_MASK_OPS + LAYER_OPS
    _no_contrib(model)
    assert not any(n.op_type in ("Mul", "Div") for n in model.graph)  # the scale lives in the weights
    mm = next(n for n in model.graph if n.op_type == "MatMul")
    w = mm.inputs[1].const_value.numpy()
    wq = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "wq"))
    assert w.shape == (H, 3 * H)
    np.testing.assert_allclose(w[:, :H], wq / np.sqrt(D), rtol=1e-6)
    split = next(n for n in model.graph if n.op_type == "Split")
    assert split.inputs[1].const_value.numpy().tolist() == [H, H, H]
    heads = [n.inputs[1].const_value.numpy().tolist() for n in model.graph if n.op_type == "Reshape"]
    assert heads[1:] == [[0, 0, N, D]] * 3 + [[0, 0, H]]  # copy-dims, no Shape chains
    perms = [n.attr("perm") for n in model.graph if n.op_type == "Transpose"]
    assert perms == [[0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3], [0, 2, 1, 3]]
    fused = ir.to_onnx(model)
    for batch in (1, 2):
        feeds = _feeds(batch)
        err = float(np.max(np.abs(ort_run(proto, feeds)["y"] - ort_run(fused, feeds)["y"])))
        assert err <= 1e-5, (batch, err)
    modified, ctx = _run(model)
    assert not modified and ctx.diagnostics == []


@pytest.mark.parametrize("guard", [False, True], ids=["inf", "inf+nan-guard"])
def test_golden_causal_layer_in_standard_ops(guard: bool):
    proto = _decoder_graph()
    if guard:
        proto = _guarded(proto)
    model = ir.from_onnx(proto)
    modified, _ = _run(model)
    assert modified
    layer = LAYER_OPS[:12] + (["IsNaN", "Where"] if guard else []) + LAYER_OPS[12:]
    assert _ops(model) == CAUSAL_MASK_OPS + layer
    _no_contrib(model)
    fused = ir.to_onnx(model)
    for feeds in (_feeds(1), _feeds(2), _left_padded(2)):
        ref, got = ort_run(proto, feeds)["y"], ort_run(fused, feeds)["y"]
        # Every row, those that see no key included: NaN as the original (-inf, no guard), or 0.
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, equal_nan=True)
    assert np.isnan(ort_run(proto, _left_padded(2))["y"]).any() != guard
    modified, _ = _run(model)
    assert not modified


def test_layer_with_a_past_is_left_with_a_note():
    model = ir.from_onnx(_past_layer())
    before = ir.print_model(model)
    modified, ctx = _run(model)
    assert not modified and ir.print_model(model) == before
    notes = [str(d) for d in ctx.diagnostics]
    assert len(notes) == 1 and "without a KV cache" in notes[0], notes


def test_unknown_mask_is_left_with_a_note():
    model = ir.from_onnx(_encoder_graph(mask_kind="bias"))
    before = ir.print_model(model)
    modified, ctx = _run(model)
    assert not modified and ir.print_model(model) == before
    assert any("not a padding or causal mask" in str(d) for d in ctx.diagnostics)


def test_contrib_target_still_fuses_to_attention():
    model = ir.from_onnx(_encoder_graph())
    ctx = PassContext(target=targets.get("x86-avx2"))
    PassManager("fuse-attention", verify=True, check_modified=True).run(model, ctx)
    assert "Attention" in _ops(model) and "Softmax" not in _ops(model)


# ------------------------------------------------------------------------------------------------
# Real exports through the full onnx-target pipeline
# ------------------------------------------------------------------------------------------------

_LAYERS = {"minilm": 6, "bert": 2, "distilbert": 2, "gpt2": 2}


def _real_feeds(batch: int, *, left: bool = False, seq: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    feeds = {
        "input_ids": rng.integers(3, 1000, size=(batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), np.int64),
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }
    if batch > 1:
        half = slice(None, seq // 2) if left else slice(seq // 2, None)
        feeds["attention_mask"][1, half] = 0
    return feeds


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["ts", "dynamo"])
@pytest.mark.parametrize("arch", list(_LAYERS))
def test_real_exports_on_the_onnx_target(exported, arch: str, dynamo: bool, attn: str):
    from passes.tools.compile import compile_model

    path = exported(arch, dynamo=dynamo, attn=attn)
    layers = _LAYERS[arch]
    result = compile_model(str(path), "onnx", explain=True)
    model = result.model
    assert result.report.stats.get("attention layers in standard ops") == layers
    _no_contrib(model)
    ops = _ops(model)
    assert ops.count("Softmax") == layers
    # One mask for the whole model, read by every layer's Add; no per-layer mask or shape arithmetic.
    softmax_in = [n.inputs[0].producer() for n in model.graph if n.op_type == "Softmax"]
    assert all(a.op_type == "Add" for a in softmax_in)
    assert len({id(a.inputs[1]) for a in softmax_in}) == 1
    assert ops.count("Trilu") == (1 if arch == "gpt2" else 0)
    fused = ir.to_onnx(model)
    cases = [_real_feeds(1), _real_feeds(2)] + ([_real_feeds(2, left=True)] if arch == "gpt2" else [])
    for feeds in cases:
        ref, got = ort_run(str(path), feeds), ort_run(fused, feeds)
        assert list(ref) == list(got)
        for name in ref:
            np.testing.assert_allclose(got[name], ref[name], atol=1e-4, rtol=0, equal_nan=True, err_msg=name)


@pytest.mark.slow
def test_compile_cli_onnx_target(exported, tmp_path):
    path = exported("minilm")
    out = tmp_path / "minilm.onnx.onnx"
    proc = subprocess.run([sys.executable, "-m", "passes.compile", str(path), "--target", "onnx", "-o", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    proto = onnx.load(str(out))
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert sum(n.op_type == "Softmax" for n in proto.graph.node) == 6
    for feeds in (_real_feeds(1), _real_feeds(2)):
        ref, got = ort_run(str(path), feeds), ort_run(proto, feeds)
        for name in ref:
            assert float(np.max(np.abs(ref[name] - got[name]))) <= 1e-4, name


def test_golden_causal_layer_without_mask_input():
    proto = _decoder_graph()
    nodes = [n for n in proto.graph.node if n.op_type != "And" and n.output[0] not in ("maskb", "pad")]
    for n in nodes:
        if n.op_type == "Where":
            n.input[0] = "causal"  # causal only: the 2-D mask input goes away
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    inputs = [i for i in proto.graph.input if i.name != "mask"]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    model = ir.from_onnx(proto)
    modified, ctx = _run(model, "fuse-attention,dead-flow")
    assert modified and ctx.diagnostics == []
    # T from the layer input's shape (no mask input to read it from), built where the layer needs it.
    assert _ops(model) == LAYER_OPS[:10] + ["Shape", "Concat", "ConstantOfShape", "Trilu", "Where"] + LAYER_OPS[10:]
    fused = ir.to_onnx(model)
    for batch in (1, 2):
        feeds = {"x": _feeds(batch)["x"]}
        err = float(np.max(np.abs(ort_run(proto, feeds)["y"] - ort_run(fused, feeds)["y"])))
        assert err <= 1e-5, (batch, err)
    modified, _ = _run(model)
    assert not modified


def test_zoo_measure_does_not_count_the_standard_forms_own_softmax_as_unexplained(zoo_exported) -> None:
    """On the onnx target the fused layer is a standard-op form with a Softmax of its own: only the
    original's Softmax nodes left in place need an --explain line."""
    from passes.tools import zoo

    m = zoo.measure(zoo_exported("bert"), "onnx")
    assert m.max_abs <= 1e-4 and m.unexplained == [], m.unexplained
