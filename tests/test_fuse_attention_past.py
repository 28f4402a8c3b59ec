"""fuse-attention on decoders: grouped-query attention with rotary (Llama) and KV-cache layers.

Such layers become ``com.microsoft::MultiHeadAttention`` on 3-D Q/K/V: ``Attention`` cannot
express a rotary, a past given as two tensors, or K/V with fewer heads than Q. What is
checked:

* golden tests on hand-built GPT-2-style layers with a KV cache (with and without GQA): the fused
  form, its numerics against the original for past lengths 0 and 5 with padded masks, that the
  present outputs keep their names and values, and near misses (past joined on the wrong side, a
  causal mask that ignores the past, a target without MultiHeadAttention);
* real exports (both exporters): Llama without past (sdpa and eager, batch 1 and batch 2 with
  the second row half padded) and GPT-2/Llama with past, compiled with the x86 pipeline, with
  every layer fused and greedy decoding (prefill + 31 steps) giving the same tokens as the
  original and logits within 1e-4 at every step.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
import targets
from conftest import ort_run
from passes import PassContext, PassManager
from passes.tools.generate import generate_with_stats, make_session

N, D = 4, 4  # query heads, head size
H = N * D
X86 = targets.get("x86")
STEPS = 32


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _past_layer(kv_heads: int = N, *, concat_order: str = "past_first", causal_offset: bool = True) -> onnx.ModelProto:
    """One GPT-2-style attention layer with a KV cache and a causal+padding mask over past+new.

    ``present_key = Concat(past_key, k_new)`` on the sequence axis (a graph output); with
    ``kv_heads < N`` the present keeps ``kv_heads`` heads and is repeated (Unsqueeze/Expand/
    Reshape, as transformers' ``repeat_kv``) before the scores. The causal mask compares key
    positions ``0..T-1`` with query positions ``P..T-1`` (``causal_offset``) or, wrongly,
    ``0..S-1``.
    """
    rng = np.random.default_rng(5)
    kvh = kv_heads * D
    rep = N // kv_heads
    inits = [
        _init("w", rng.standard_normal((H, H + 2 * kvh)).astype(np.float32) * 0.3),
        _init("b", rng.standard_normal(H + 2 * kvh).astype(np.float32) * 0.1),
        _init("split", np.array([H, kvh, kvh], np.int64)),
        _init("q_shape", np.array([0, 0, N, D], np.int64)),
        _init("kv_shape", np.array([0, 0, kv_heads, D], np.int64)),
        _init("merge_shape", np.array([0, 0, H], np.int64)),
        _init("axes12", np.array([1, 2], np.int64)),
        _init("ax0", np.array([0], np.int64)),
        _init("ax1", np.array([1], np.int64)),
        _init("ax2", np.array([2], np.int64)),
        _init("idx1", np.array(1, np.int64)),
        _init("idx2", np.array(2, np.int64)),
        _init("zero", np.array(0, np.int64)),
        _init("one", np.array(1, np.int64)),
        _init("scale", np.array(1.0 / np.sqrt(D), np.float32)),
        _init("ninf", np.array(-np.inf, np.float32)),
        _init("fzero", np.array(0.0, np.float32)),
        _init("expand_shape", np.array([1, 1, rep, 1, 1], np.int64)),
        _init("heads_shape", np.array([0, N, -1, D], np.int64)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["qkv"]),
        helper.make_node("Split", ["qkv", "split"], ["q", "k", "v"], axis=2),
        helper.make_node("Reshape", ["q", "q_shape"], ["q4"]),
        helper.make_node("Reshape", ["k", "kv_shape"], ["k4"]),
        helper.make_node("Reshape", ["v", "kv_shape"], ["v4"]),
        helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k4"], ["kh"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
    ]
    for c in "kv":
        pair = ["past_" + c, c + "h"] if concat_order == "past_first" else [c + "h", "past_" + c]
        nodes.append(helper.make_node("Concat", pair, ["present_" + c], axis=-2))
        full = "present_" + c
        if rep > 1:
            nodes += [
                helper.make_node("Unsqueeze", [full, "ax2"], [c + "_u"]),
                helper.make_node("Expand", [c + "_u", "expand_shape"], [c + "_e"]),
                helper.make_node("Reshape", [c + "_e", "heads_shape"], [c + "_rep"]),
            ]
            full = c + "_rep"
        nodes.append(helper.make_node("Identity", [full], [c + "_all"]))
    nodes += [
        helper.make_node("Transpose", ["k_all"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("Mul", ["qh", "scale"], ["qs"]),
        helper.make_node("MatMul", ["qs", "kt"], ["scores"]),
        # positions: keys 0..T-1, queries P..T-1 (P = past length, T = P + S)
        helper.make_node("Shape", ["present_k"], ["kshape"]),
        helper.make_node("Gather", ["kshape", "idx2"], ["total"], axis=0),
        helper.make_node("Shape", ["past_k"], ["pshape"]),
        helper.make_node("Gather", ["pshape", "idx2"], ["plen"], axis=0),
        helper.make_node("Shape", ["x"], ["xshape"]),
        helper.make_node("Gather", ["xshape", "idx1"], ["slen"], axis=0),
        helper.make_node("Range", ["zero", "total", "one"], ["kpos"]),
        helper.make_node("Range", ["plen" if causal_offset else "zero",
                                   "total" if causal_offset else "slen", "one"], ["qpos"]),
        helper.make_node("Unsqueeze", ["kpos", "ax0"], ["keys"]),
        helper.make_node("Unsqueeze", ["qpos", "ax1"], ["queries"]),
        helper.make_node("LessOrEqual", ["keys", "queries"], ["causal"]),
        helper.make_node("Cast", ["mask"], ["maskb"], to=TensorProto.BOOL),
        helper.make_node("Unsqueeze", ["maskb", "axes12"], ["pad"]),
        helper.make_node("And", ["causal", "pad"], ["allowed"]),
        helper.make_node("Where", ["allowed", "fzero", "ninf"], ["addmask"]),
        helper.make_node("Add", ["scores", "addmask"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        helper.make_node("IsNaN", ["probs"], ["nan"]),
        helper.make_node("Where", ["nan", "fzero", "probs"], ["probs0"]),
        helper.make_node("MatMul", ["probs0", "v_all"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["y"]),
    ]
    f = TensorProto.FLOAT
    g = helper.make_graph(
        nodes, "attention_past",
        [helper.make_tensor_value_info("x", f, ["batch", "sequence", H]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "total_sequence"]),
         helper.make_tensor_value_info("past_k", f, ["batch", kv_heads, "past_sequence", D]),
         helper.make_tensor_value_info("past_v", f, ["batch", kv_heads, "past_sequence", D])],
        [helper.make_tensor_value_info("y", f, ["batch", "sequence", H]),
         helper.make_tensor_value_info("present_k", f, ["batch", kv_heads, "total_sequence", D]),
         helper.make_tensor_value_info("present_v", f, ["batch", kv_heads, "total_sequence", D])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _past_feeds(kv_heads: int, batch: int, seq: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, past + seq), np.int64)
    if batch > 1:
        mask[1, : (past + seq) // 3] = 0  # left padding, reaching into the past
        mask[-1, -1] = 0
    return {
        "x": rng.standard_normal((batch, seq, H)).astype(np.float32),
        "mask": mask,
        "past_k": rng.standard_normal((batch, kv_heads, past, D)).astype(np.float32),
        "past_v": rng.standard_normal((batch, kv_heads, past, D)).astype(np.float32),
    }


def _visible_rows(mask: np.ndarray, seq: int) -> np.ndarray:
    """``[B, S]``: query rows that see at least one key (causal over past + new, and the padding).

    Rows that see none (left padding under a causal mask) are NaN-guarded to 0 in the original
    and a mean of masked values in the fused op: both are meaningless and are not compared.
    """
    total = mask.shape[1]
    causal = np.tril(np.ones((seq, total), bool), total - seq)
    return (causal[None] & (mask[:, None, :] != 0)).any(-1)


def _run(model: ir.Model, target=X86, pipeline: str = "fuse-attention,dead-flow") -> tuple[bool, PassContext]:
    ctx = PassContext(target=target, explain=True)
    records = PassManager(pipeline, verify=True, check_modified=True).run(model, ctx)
    return any(r.modified for r in records), ctx


def _notes(ctx: PassContext) -> list[str]:
    return [str(d) for d in ctx.diagnostics if d.pass_name == "fuse-attention"]


@pytest.mark.parametrize("kv_heads", [N, 2], ids=["mha", "gqa"])
def test_golden_past_layer_fuses_to_multi_head_attention(kv_heads: int) -> None:
    proto = _past_layer(kv_heads)
    model = ir.from_onnx(proto)
    modified, ctx = _run(model)
    assert modified and _notes(ctx) == []
    mha = [n for n in model.graph if n.op_type == "MultiHeadAttention"]
    assert len(mha) == 1 and mha[0].domain == "com.microsoft"
    assert "Softmax" not in [n.op_type for n in model.graph]
    att = mha[0]
    assert att.attr("num_heads") == N and att.attr("unidirectional") == 1 and "scale" not in att.attributes
    # past in, presents out: at N heads the op's own presents are the graph outputs
    assert len(att.inputs) == 8 and att.inputs[4].producer().inputs[0].name == "mask"
    outputs = [v.name for v in model.graph.outputs]
    assert outputs == ["y", "present_k", "present_v"]
    present_k = model.graph.outputs[1].producer()
    assert present_k.op_type == ("MultiHeadAttention" if kv_heads == N else "Concat")
    fused = ir.to_onnx(model)
    for batch, seq, past in ((1, 5, 0), (2, 5, 0), (2, 3, 5), (2, 1, 7)):
        feeds = _past_feeds(kv_heads, batch, seq, past)
        ref, got = ort_run(proto, feeds), ort_run(fused, feeds)
        assert list(got) == list(ref)
        seen = _visible_rows(feeds["mask"], seq)
        if (batch, past) == (2, 0):
            assert not seen.all()  # left padding without a past: some rows see no key at all
        for name in ref:
            assert ref[name].shape == got[name].shape, name
            a, b = (ref[name], got[name]) if name != "y" else (ref[name][seen], got[name][seen])
            err = float(np.max(np.abs(a - b)))
            assert err <= 1e-5, (batch, seq, past, name, err)
    modified, _ = _run(model)
    assert not modified


def test_past_joined_after_the_new_keys_is_a_near_miss() -> None:
    model = ir.from_onnx(_past_layer(concat_order="new_first"))
    before = ir.print_model(model)
    modified, ctx = _run(model, pipeline="fuse-attention")
    assert not modified and ir.print_model(model) == before
    notes = _notes(ctx)
    assert len(notes) == 1 and "%past_k is not computed by a projection" in notes[0], notes


def test_causal_mask_ignoring_the_past_is_a_near_miss() -> None:
    # Queries at positions 0..S-1 instead of P..T-1: not the causal mask MultiHeadAttention applies.
    model = ir.from_onnx(_past_layer(causal_offset=False))
    modified, ctx = _run(model, pipeline="fuse-attention")
    assert not modified
    notes = _notes(ctx)
    assert len(notes) == 1 and "not a padding or causal mask" in notes[0], notes


def test_target_without_multi_head_attention_is_a_near_miss() -> None:
    tgt = dataclasses.replace(X86, contrib_ops=X86.contrib_ops - {"MultiHeadAttention"})
    model = ir.from_onnx(_past_layer(2))
    modified, ctx = _run(model, target=tgt, pipeline="fuse-attention")
    assert not modified
    notes = _notes(ctx)
    assert len(notes) == 1 and "needs com.microsoft MultiHeadAttention" in notes[0], notes


# ------------------------------------------------------------------------------------------------
# Real exports
# ------------------------------------------------------------------------------------------------


def _compile(path: pathlib.Path) -> tuple[ir.Model, dict[str, int]]:
    from passes.tools.compile import compile_model

    result = compile_model(str(path), "x86", explain=True)
    assert result.report.verified_ok, result.report.verification
    return result.model, dict(result.report.stats)


def _assert_every_layer_fused(model: ir.Model, layers: int = 2) -> None:
    ops = [n.op_type for n in model.graph]
    assert ops.count("MultiHeadAttention") == layers, ops
    assert "Softmax" not in ops and "Attention" not in ops


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["ts", "dynamo"])
def test_llama_without_past_fuses_every_layer(exported, dynamo: bool, attn: str) -> None:
    path = exported("llama", dynamo=dynamo, attn=attn)
    model, stats = _compile(path)
    _assert_every_layer_fused(model)
    assert stats.get("fused RotaryEmbedding") == 4
    rots = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    assert len(rots) == 4 and all(len(n.inputs[0].shape or ()) != 4 for n in rots)  # 3-D [B,S,heads*d]
    fused = ir.to_onnx(model)
    for batch in (1, 2):
        rng = np.random.default_rng(batch)
        feeds = {"input_ids": rng.integers(3, 1000, (batch, 16)), "attention_mask": np.ones((batch, 16), np.int64)}
        if batch > 1:
            feeds["attention_mask"][1, 8:] = 0
        ref, got = ort_run(str(path), feeds), ort_run(fused, feeds)
        err = float(np.max(np.abs(ref["logits"] - got["logits"])))
        assert err <= 1e-4, (batch, err)


@pytest.fixture(scope="module")
def past_export(tmp_path_factory: pytest.TempPathFactory):
    """``past_export(arch, dynamo) -> Path``: a tiny decoder exported ``with_past`` (cached)."""
    cache: dict[tuple[str, bool], pathlib.Path] = {}
    folder = tmp_path_factory.mktemp("attention_past_exports")

    def get(arch: str, dynamo: bool) -> pathlib.Path:
        if (arch, dynamo) not in cache:
            from passes.tools import export as ex

            model = ex.tiny_model(arch, attn_implementation="sdpa")
            cache[arch, dynamo] = ex.export(model, folder / f"{arch}_{'dynamo' if dynamo else 'ts'}_past.onnx",
                                            dynamo=dynamo, with_past=True)
        return cache[arch, dynamo]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["ts", "dynamo"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_past_exports_fuse_every_layer_and_decode_identically(past_export, arch: str, dynamo: bool) -> None:
    path = past_export(arch, dynamo)
    model, _ = _compile(path)
    _assert_every_layer_fused(model)
    compiled = ir.to_onnx(model).SerializeToString()
    ref_sess, got_sess = make_session(str(path)), make_session(compiled)
    assert [o.name for o in ref_sess.get_outputs()] == [o.name for o in got_sess.get_outputs()]
    prompt = np.random.default_rng(3).integers(3, 1000, size=(2, 7))
    ref = generate_with_stats(ref_sess, prompt, STEPS, keep_logits=True)
    got = generate_with_stats(got_sess, prompt, STEPS, keep_logits=True)
    np.testing.assert_array_equal(got.ids, ref.ids)
    assert len(got.logits) == STEPS
    for step, (a, b) in enumerate(zip(ref.logits, got.logits)):
        err = float(np.max(np.abs(a - b)))
        assert err <= 1e-4, f"step {step}: max abs {err:.3g}"
    # A padded batch with a past: left padding reaching into the cache, every output compared.
    rng = np.random.default_rng(1)
    feeds = {"input_ids": rng.integers(3, 1000, (2, 3)), "attention_mask": np.ones((2, 8), np.int64)}
    feeds["attention_mask"][1, :3] = 0
    for i in ref_sess.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = rng.standard_normal((2, i.shape[1], 5, i.shape[3])).astype(np.float32)
    names = [o.name for o in ref_sess.get_outputs()]
    for name, a, b in zip(names, ref_sess.run(names, feeds), got_sess.run(names, feeds)):
        assert float(np.max(np.abs(a - b))) <= 1e-4, name
