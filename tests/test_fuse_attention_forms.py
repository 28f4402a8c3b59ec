"""fuse-attention's ``form`` and ``qkv`` options: the same layer as Attention, MultiHeadAttention
(packed or split projections) or standard ops, each equal to the original in onnxruntime.

``--autotune`` measures these forms against each other; here they are checked to compute the
original (reference without onnxruntime's graph optimizations), to fall back where the layer or
the target does not allow the form asked for, and to be a fixed point on a second run.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ir
import targets
from conftest import ort_run
from passes import PassContext, PassError, PassManager
from test_fuse_attention import _LAYERS, _decoder_graph, _encoder_graph, _feeds, assert_real_outputs_equal
from test_fuse_attention_past import N as PAST_HEADS
from test_fuse_attention_past import _past_feeds, _past_layer, _visible_rows

CONTRIB = targets.get("x86-avx2")
ATTENTION_OPS = {"Attention", "MultiHeadAttention"}


def _run(model: ir.Model, pipeline: str, target=CONTRIB) -> tuple[bool, PassContext]:
    ctx = PassContext(target=target, explain=True)
    records = PassManager(pipeline, verify=True, check_modified=True).run(model, ctx)
    return any(r.modified for r in records), ctx


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _same(proto, model: ir.Model, batches=(1, 2)) -> None:
    fused = ir.to_onnx(model)
    for batch in batches:
        feeds = _feeds(batch)
        err = float(np.max(np.abs(ort_run(proto, feeds)["y"] - ort_run(fused, feeds)["y"])))
        assert err <= 1e-5, (batch, err)


#: (form, qkv) -> (the contrib attention op written, constant-weight MatMuls) for one encoder layer
EXPECTED = {
    ("auto", "packed"): ("Attention", 0),
    ("auto", "split"): ("Attention", 0),  # Attention takes packed weights: qkv applies to MultiHeadAttention
    ("mha", "packed"): ("MultiHeadAttention", 1),
    ("mha", "split"): ("MultiHeadAttention", 3),
    ("standard", "packed"): (None, 1),
    ("standard", "split"): (None, 1),  # the standard form packs
}


@settings(max_examples=20, deadline=None)
@given(form=st.sampled_from(sorted(EXPECTED)), causal=st.booleans(), onnx_target=st.booleans())
def test_every_form_computes_the_original(form: tuple[str, str], causal: bool, onnx_target: bool) -> None:
    """Any form on an encoder (padding) or decoder (causal + padding) layer, on a target with contrib
    attention or without (where every form falls back to the standard ops)."""
    proto = (_decoder_graph if causal else _encoder_graph)()
    model = ir.from_onnx(proto)
    pipeline = f"fuse-attention{{form={form[0]},qkv={form[1]}}},dead-flow"
    modified, ctx = _run(model, pipeline, targets.get("onnx") if onnx_target else CONTRIB)
    assert modified and [str(d) for d in ctx.diagnostics if d.pass_name == "fuse-attention"] == []
    ops = _ops(model)
    op, projections = (None, 1) if onnx_target else EXPECTED[form]
    assert [o for o in ops if o in ATTENTION_OPS] == ([op] if op else [])
    assert ("Softmax" in ops) == (op is None)
    weights = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    assert len(weights) == projections
    assert ("Split" in ops) == (projections == 1)
    if op == "MultiHeadAttention":
        mha = next(n for n in model.graph if n.op_type == op)
        assert mha.attr("unidirectional", 0) == int(causal) and mha.inputs[4].producer().inputs[0].name == "mask"
    _same(proto, model)
    assert not _run(model, pipeline, targets.get("onnx") if onnx_target else CONTRIB)[0]


def test_a_form_the_target_lacks_falls_back_to_what_it_has() -> None:
    attention_only = dataclasses.replace(CONTRIB, contrib_ops=[o for o in CONTRIB.contrib_ops
                                                               if o != "MultiHeadAttention"])
    proto = _encoder_graph()
    model = ir.from_onnx(proto)
    modified, ctx = _run(model, "fuse-attention{form=mha}", attention_only)
    assert modified and ctx.diagnostics == []
    assert [o for o in _ops(model) if o in ATTENTION_OPS] == ["Attention"]
    _same(proto, model)


def test_a_layer_the_standard_form_cannot_express_keeps_its_contrib_op() -> None:
    """A KV-cache layer asked for standard ops becomes MultiHeadAttention (as auto would make it)."""
    proto = _past_layer()
    model = ir.from_onnx(proto)
    modified, ctx = _run(model, "fuse-attention{form=standard},dead-flow")
    assert modified and ctx.diagnostics == []
    assert [o for o in _ops(model) if o in ATTENTION_OPS] == ["MultiHeadAttention"]
    fused = ir.to_onnx(model)
    for batch, seq, past in ((1, 5, 0), (2, 3, 5)):
        feeds = _past_feeds(PAST_HEADS, batch, seq, past)
        ref, got = ort_run(proto, feeds), ort_run(fused, feeds)
        seen = _visible_rows(feeds["mask"], seq)
        assert float(np.max(np.abs(ref["y"][seen] - got["y"][seen]))) <= 1e-5


@pytest.mark.parametrize("kv_heads", [PAST_HEADS, 2], ids=["mha", "gqa"])
def test_a_split_kv_cache_layer_decodes_as_the_packed_one(kv_heads: int) -> None:
    proto = _past_layer(kv_heads)
    outs = {}
    for qkv in ("packed", "split"):
        model = ir.from_onnx(proto)
        assert _run(model, f"fuse-attention{{qkv={qkv}}},dead-flow")[0]
        assert _ops(model).count("Split") == (qkv == "packed")
        outs[qkv] = ir.to_onnx(model)
    feeds = _past_feeds(kv_heads, 2, 3, 5)
    ref = ort_run(proto, feeds)
    seen = _visible_rows(feeds["mask"], 3)
    for qkv, fused in outs.items():
        got = ort_run(fused, feeds)
        for name in ref:
            a, b = (ref[name], got[name]) if name != "y" else (ref[name][seen], got[name][seen])
            assert float(np.max(np.abs(a - b))) <= 1e-5, (qkv, name)


@pytest.mark.parametrize("option", ["form=fast", "qkv=fused"])
def test_an_unknown_form_is_a_pass_error(option: str) -> None:
    model = ir.from_onnx(_encoder_graph())
    with pytest.raises(PassError, match=option.split("=")[0] + " must be"):
        _run(model, f"fuse-attention{{{option}}}")


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("form", ["form=mha", "form=mha,qkv=split", "form=standard"])
def test_real_exports_in_every_form(exported, arch: str, dynamo: bool, form: str) -> None:
    """Every layer of a real export in the form asked for, equal to the original (padded batch too)."""
    path = exported(arch, dynamo=dynamo)
    proto = onnx.load(str(path))
    model = ir.from_onnx(proto)
    _, ctx = _run(model, f"dead-flow,fold-constants,simplify,fuse-attention{{{form}}},dead-flow")
    ops = _ops(model)
    layers = _LAYERS[arch]
    if form == "form=standard":
        assert ops.count("Softmax") == layers and not ATTENTION_OPS & set(ops), [str(d) for d in ctx.diagnostics]
    else:
        assert ops.count("MultiHeadAttention") == layers and "Softmax" not in ops
        assert ops.count("Split") == (0 if "split" in form else layers)
    assert_real_outputs_equal(proto, model, arch, form)
