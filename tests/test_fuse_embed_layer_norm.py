"""fuse-embed-layer-norm: golden tests on hand-built embedding blocks, numerics on real exports."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

import ir
import targets
from conftest import encoder_feeds, ort_run, run_passes
from passes import PassContext, PassManager

H, V, P, T = 8, 50, 24, 2
EPS = 1e-12

# Position-index computations: each defines ``pid`` (indices into the position table).
POSITIONS = {
    # TorchScript: the sequence length from Shape(input_ids), a slice of the position_ids buffer.
    "ts": """shp = Shape(ids)
             one = Constant <value = int64 {1}> ()
             zero1 = Constant <value = int64[1] {0}> ()
             one1 = Constant <value = int64[1] {1}> ()
             s0 = Gather <axis = 0> (shp, one)
             s = Unsqueeze(s0, zero1)
             pid = Slice(pos_buf, zero1, s, one1)""",
    # dynamo: Shape with start/end on another input of the same dims, 5-input Slice.
    "dynamo": """s = Shape <start = 1, end = 2> (tt)
                 zero1 = Constant <value = int64[1] {0}> ()
                 one1 = Constant <value = int64[1] {1}> ()
                 pid = Slice(pos_buf, zero1, s, one1, one1)""",
    # Range, unsqueezed to [1, S].
    "range": """shp = Shape(ids)
                one = Constant <value = int64 {1}> ()
                zero = Constant <value = int64 {0}> ()
                zero1 = Constant <value = int64[1] {0}> ()
                s = Gather <axis = 0> (shp, one)
                r = Range(zero, s, one)
                pid = Unsqueeze(r, zero1)""",
    # Not positions: arange(S) + 2 (RoBERTa-like offset) must not fuse.
    "offset": """shp = Shape(ids)
                 one = Constant <value = int64 {1}> ()
                 two = Constant <value = int64 {2}> ()
                 zero = Constant <value = int64 {0}> ()
                 s = Gather <axis = 0> (shp, one)
                 r = Range(zero, s, one)
                 pid = Add(r, two)""",
    # Not positions: reversed, arange(S) read backwards.
    "reversed": """shp = Shape(ids)
                   one = Constant <value = int64 {1}> ()
                   m1 = Constant <value = int64 {-1}> ()
                   s = Gather <axis = 0> (shp, one)
                   sm1 = Sub(s, one)
                   pid = Range(sm1, m1, m1)""",
}

# The embedding sum, in several orders; ``w``, ``p``, ``t`` are the three lookups.
SUMS = {
    "w+t+p": "a = Add(w, t)\n e = Add(a, p)",
    "w+p+t": "a = Add(w, p)\n e = Add(a, t)",
    "p+(t+w)": "a = Add(t, w)\n e = Add(p, a)",
    "w+p": "e = Add(w, p)",  # DistilBERT: no token types
    "p+w": "e = Add(p, w)",
}


def _model(positions: str = "ts", order: str = "w+t+p", *, beta: bool = True, ids_type: str = "int64",
           tt_shape: str = "B,S", extra_output: str = "") -> onnx.ModelProto:
    segment = "t" in order
    norm_in = "e, gamma, beta" if beta else "e, gamma"
    outs = f"float[B,S,{H}] y" + (f", {extra_output}" if extra_output else "")
    text = f"""<ir_version: 10, opset_import: ["" : 17]>
    g ({ids_type}[B,S] ids, int64[{tt_shape}] tt) => ({outs}) {{
      {POSITIONS[positions]}
      w = Gather(word, ids)
      p = Gather(pos, pid)
      {"t = Gather(seg, tt)" if segment else ""}
      {SUMS[order]}
      y = LayerNormalization <axis = -1, epsilon = {EPS}> ({norm_in})
    }}"""
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    data = {
        "word": rng.standard_normal((V, H)).astype(np.float32),
        "pos": rng.standard_normal((P, H)).astype(np.float32),
        "seg": rng.standard_normal((T, H)).astype(np.float32),
        "gamma": (1 + 0.1 * rng.standard_normal(H)).astype(np.float32),
        "beta": rng.standard_normal(H).astype(np.float32),
        "pos_buf": np.arange(P, dtype=np.int64)[None, :],
    }
    used = {i for n in proto.graph.node for i in n.input}
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in data.items() if k in used)
    return proto


def _run(proto: onnx.ModelProto, target: str = "x86") -> tuple[ir.Model, bool, PassContext]:
    return run_passes(proto, "fuse-embed-layer-norm", target)


def _feeds(b: int, s: int, seed: int, ids_type: type = np.int64, tt_batch: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"ids": rng.integers(0, V, (b, s)).astype(ids_type),
            "tt": rng.integers(0, T, (tt_batch or b, s)).astype(np.int64)}


def _assert_same(proto: onnx.ModelProto, model: ir.Model, ids_type: type = np.int64) -> None:
    fused = ir.to_onnx(model).SerializeToString()
    for seed, (b, s) in enumerate([(1, 1), (1, 16), (2, 7), (3, 24)]):
        feeds = _feeds(b, s, seed, ids_type)
        ref = ort_run(proto.SerializeToString(), feeds)
        got = ort_run(fused, feeds)
        for k in ref:
            assert got[k].shape == ref[k].shape
            assert np.max(np.abs(got[k] - ref[k])) <= 1e-5, (k, b, s)


def _ops(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph)


def _notes(ctx: PassContext) -> str:
    return "\n".join(str(d) for d in ctx.diagnostics if d.pass_name == "fuse-embed-layer-norm")


# ------------------------------------------------------------------------------------------------
# Golden tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", list(SUMS))
@pytest.mark.parametrize("positions", ["ts", "dynamo", "range"])
def test_fuses(positions: str, order: str) -> None:
    proto = _model(positions, order)
    model, modified, ctx = _run(proto)
    assert modified, _notes(ctx)
    ops = _ops(model)
    # The lookups, the sum, the norm and the whole position computation are gone.
    assert ops == collections.Counter({"EmbedLayerNormalization": 1, "Cast": 1 + ("t" in order)}), ops
    eln = next(n for n in model.graph if n.op_type == "EmbedLayerNormalization")
    assert eln.domain == "com.microsoft" and model.opset_imports["com.microsoft"] == 1
    assert eln.attr("epsilon") == pytest.approx(EPS) and eln.attr("mask_index_type") == 0
    assert len(eln.outputs) == 1 and eln.outputs[0].name == "y"
    names = [v.name if v is not None else "" for v in eln.inputs]
    assert names[2:4] == ["word", "pos"] and names[5:] == ["gamma", "beta"]
    assert names[4] == ("seg" if "t" in order else "")
    for i, graph_input in ((0, "ids"), (1, "tt")):
        if eln.inputs[i] is None:
            continue
        cast = eln.inputs[i].producer()
        assert cast.op_type == "Cast" and cast.attr("to") == int(ir.DataType.INT32)
        assert cast.inputs[0].name == graph_input
    _assert_same(proto, model)
    again = PassManager("fuse-embed-layer-norm", verify=True, check_modified=True).run(
        model, PassContext(target=targets.get("x86")))
    assert again[0].modified is False


def test_int32_ids_need_no_cast_and_beta_is_optional() -> None:
    proto = _model("range", "w+p", beta=False, ids_type="int32")
    model, modified, _ = _run(proto)
    assert modified
    assert _ops(model) == collections.Counter({"EmbedLayerNormalization": 1})
    eln = next(iter(model.graph))
    assert eln.inputs[0].name == "ids"
    assert not np.any(eln.inputs[6].const_value.numpy())  # zeros for the missing β
    _assert_same(proto, model, np.int32)


@pytest.mark.parametrize("positions", ["offset", "reversed"])
def test_positions_other_than_arange_are_not_fused(positions: str) -> None:
    model, modified, ctx = _run(_model(positions, "w+t+p"))
    assert not modified
    assert _ops(model)["LayerNormalization"] == 1
    assert "not arange(S)" in _notes(ctx), ctx.diagnostics


def test_no_fusion_on_targets_without_the_op() -> None:
    model, modified, _ = _run(_model("ts", "w+t+p"), target="onnx")
    assert not modified and "EmbedLayerNormalization" not in _ops(model)


def test_lookup_read_elsewhere_is_a_near_miss() -> None:
    model, modified, ctx = _run(_model("ts", "w+t+p", extra_output=f"float[B,S,{H}] w"))
    assert not modified
    assert "read elsewhere" in _notes(ctx)


def test_segment_ids_of_another_shape_are_a_near_miss() -> None:
    # token types broadcast over the batch: the fused op needs them shaped like input_ids.
    proto = _model("ts", "w+t+p", tt_shape="1,S")
    model, modified, ctx = _run(proto)
    assert not modified
    assert "differ in shape" in _notes(ctx)


# ------------------------------------------------------------------------------------------------
# Real exports through the full target pipeline
# ------------------------------------------------------------------------------------------------


def _pipeline(with_pass: bool = True) -> str:
    """The x86 pipeline with (or without) fuse-embed-layer-norm right after fuse-layer-norm."""
    items = [p for p in targets.get("x86").pipeline.split(",") if p != "fuse-embed-layer-norm"]
    if with_pass:
        items.insert(items.index("fuse-layer-norm") + 1, "fuse-embed-layer-norm")
    return ",".join(items)


def _compile(path, with_pass: bool = True) -> tuple[ir.Model, PassContext]:
    model = ir.load(str(path))
    ctx = PassContext(target=targets.get("x86"), explain=True)
    PassManager(_pipeline(with_pass), verify=True, check_modified=True).run(model, ctx)
    return model, ctx


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["ts", "dynamo"])
@pytest.mark.parametrize("arch", ["minilm", "bert", "distilbert"])
def test_real_exports_fuse(exported, arch: str, dynamo: bool) -> None:
    path = exported(arch, dynamo=dynamo)
    model, ctx = _compile(path)
    ops = _ops(model)
    assert ops["EmbedLayerNormalization"] == 1, _notes(ctx)
    # Every LayerNormalization left reads a residual Sum (x86 keeps LN over Sum): the embedding one went.
    assert ops["Gather"] == 0 and ops["LayerNormalization"] == ops["Sum"], ops
    eln = next(n for n in model.graph if n.op_type == "EmbedLayerNormalization")
    assert (eln.inputs[1] is None) == (arch == "distilbert")
    fused = ir.to_onnx(model).SerializeToString()
    vocab = 30522 if arch == "minilm" else 1000
    for batch, seed in ((1, 0), (2, 1)):  # batch 2: the second row is half padding
        feeds = encoder_feeds(batch, 16, vocab, seed=seed)
        if batch == 2:
            feeds["token_type_ids"][:, 9:] = 1  # a second segment
        ref = ort_run(str(path), feeds)
        got = ort_run(fused, feeds)
        for name, r in ref.items():
            assert np.max(np.abs(got[name] - r)) <= 1e-5, (name, batch)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["ts", "dynamo"])
def test_roberta_offset_positions_are_a_near_miss(exported, dynamo: bool) -> None:
    model, ctx = _compile(exported("roberta", dynamo=dynamo))
    ops = _ops(model)
    assert ops["EmbedLayerNormalization"] == 0 and ops["LayerNormalization"] - ops["Sum"] == 1
    notes = _notes(ctx)
    assert "no lookup is at arange(S) positions" in notes and "RoBERTa" in notes, notes


@pytest.mark.slow
def test_minilm_node_count_goes_down(exported) -> None:
    path = exported("minilm")
    without, _ = _compile(path, with_pass=False)
    with_, _ = _compile(path, with_pass=True)
    n_without, n_with = len(list(without.graph)), len(list(with_.graph))
    # Gathers (3), Adds (2), LayerNorm and the position Shape/Gather/Unsqueeze/Slice go; two Casts come.
    assert n_with <= n_without - 6, (n_without, n_with)
