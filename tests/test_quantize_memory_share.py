"""Models that share their float weights: ``ir.copy_model``, saving with ``share_external_data``, and the
quantize passes' switch models built and saved over them.

A copy of a model loaded with external data holds the same tensors (nothing read, nothing mapped, a
few kB allocated for weights of MBs); a temporary save references the original data file instead of
copying it (a hard link, the same inode); the switch model and the quantized model computed from such
copies are the same models, with the same onnxruntime outputs, as those computed from the old deep copy
(emit with the data inline, lower again), and the copy still round-trips losslessly.
"""

from __future__ import annotations

import os
import pathlib
import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
from passes.quantization._candidates import find_candidates
from passes.quantization._emit import Plan, apply_plan
from passes.quantization.forms import build_switch_model, flag_feeds, quantize_forms
from passes.quantization.sensitivity import Evaluator
from tests.conftest import ort_session

VOCAB, HIDDEN = 64, 256


def _decoder(tmp_path: pathlib.Path) -> tuple[pathlib.Path, int]:
    """input_ids -> Gather -> MatMul -> Tanh -> MatMul -> ``logits``, every weight in ``model.onnx.data``.

    Returns the path and the bytes of the float weights (~0.6 MB).
    """
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    w1 = (rng.standard_normal((HIDDEN, HIDDEN)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((HIDDEN, VOCAB)) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("MatMul", ["e", "w1"], ["h"], name="mm1"),
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("MatMul", ["t", "w2"], ["logits"], name="mm2"),
    ]
    g = helper.make_graph(
        nodes, "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])],
        [numpy_helper.from_array(a, n) for a, n in ((emb, "emb"), (w1, "w1"), (w2, "w2"))])
    g.node.append(helper.make_node("Identity", ["attention_mask"], ["mask_out"]))
    g.output.append(helper.make_tensor_value_info("mask_out", TensorProto.INT64, ["batch", "sequence"]))
    path = tmp_path / "src" / "model.onnx"
    path.parent.mkdir()
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path,
              save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return path, emb.nbytes + w1.nbytes + w2.nbytes


def _feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, VOCAB, (2, 8)).astype(np.int64), "attention_mask": np.ones((2, 8), np.int64)}


def _old_copy(model: ir.Model) -> ir.Model:
    """The deep copy the quantize passes made before (every tensor's bytes inline, lowered again): the oracle."""
    return ir.from_onnx(ir.to_onnx(model))


def _initializer_files(path: pathlib.Path) -> dict[str, str]:
    """The data file of each initializer, by name, in the main graph and its subgraphs (If branches)."""
    proto = onnx.load(str(path), load_external_data=False)
    out: dict[str, str] = {}

    def walk(g: onnx.GraphProto) -> None:
        out.update({t.name: {e.key: e.value for e in t.external_data}.get("location", "") for t in g.initializer})
        for n in g.node:
            for a in n.attribute:
                for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    walk(sub)

    walk(proto.graph)
    return out


def test_copy_model_shares_the_tensors_and_nothing_else(tmp_path: pathlib.Path) -> None:
    """Same text form as the old deep copy; the same Tensor objects, none read; new graph, nodes and
    values (rewriting the copy leaves the original as it was)."""
    path, _ = _decoder(tmp_path)
    model = ir.load(str(path))
    copy = ir.copy_model(model)
    assert ir.structurally_equal(copy, model) and ir.structurally_equal(copy, _old_copy(model))
    for name, v in model.graph.initializers.items():
        assert copy.graph.initializers[name].const_value is v.const_value
        assert copy.graph.initializers[name] is not v and not v.const_value.is_loaded
        assert v.const_value.external is not None
    before = ir.print_model(model)
    mm1 = next(n for n in copy.graph if n.name == "mm1")
    copy.graph.insert_after(mm1, ir.Node("Relu", [mm1.outputs[0]], outputs=[ir.Value("r")]))
    assert ir.print_model(model) == before and ir.print_model(copy) != before


def test_copy_model_keeps_subgraphs_functions_and_attribute_tensors() -> None:
    """An If whose branches hold Constant tensors, and a model-local function: the copy prints as the
    original, shares the attribute tensors, and its subgraphs are new objects."""
    big = numpy_helper.from_array(np.arange(512, dtype=np.float32), "c")
    then_g = helper.make_graph([helper.make_node("Constant", [], ["a"], value=big)], "then", [],
                               [helper.make_tensor_value_info("a", TensorProto.FLOAT, [512])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["b"])], "else", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [512])])
    fn = helper.make_function("local", "Twice", ["u"], ["v"], [helper.make_node("Add", ["u", "u"], ["v"])],
                              [helper.make_opsetid("", 17)])
    g = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
         helper.make_node("Twice", ["y"], ["z"], domain="local")], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [512])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [512])])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[fn])
    model = ir.from_onnx(proto)
    copy = ir.copy_model(model)
    assert ir.print_model(copy) == ir.print_model(model) == ir.print_model(_old_copy(model))
    sub, copied = (next(b for b in next(iter(m.graph)).subgraphs() if b.name == "then") for m in (model, copy))
    assert copied is not sub
    const, const_copy = next(iter(sub)), next(iter(copied))
    assert const_copy is not const and const_copy.attributes["value"].value is const.attributes["value"].value
    assert copy.functions[0] is not model.functions[0] and copy.functions[0].graph is not model.functions[0].graph
    feeds = {"cond": np.array(True), "x": np.ones(512, np.float32)}
    want = ort_session(proto.SerializeToString()).run(None, feeds)[0]
    assert np.array_equal(ort_session(ir.to_onnx(copy).SerializeToString()).run(None, feeds)[0], want)


def test_copy_model_allocates_no_weight_bytes(tmp_path: pathlib.Path) -> None:
    """Copying a model with 0.6 MB of weights allocates less than a tenth of them (the old copy's
    lowered bytes alone were all of them, the protobuf's copy besides, which tracemalloc does not see)."""
    path, weight_bytes = _decoder(tmp_path)
    model = ir.load(str(path))
    for copier, bound in ((_old_copy, weight_bytes), (ir.copy_model, weight_bytes // 10)):
        tracemalloc.start()
        copy = copier(model)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert (peak >= bound) if copier is _old_copy else (peak < bound), (copier.__name__, peak, weight_bytes)
        del copy


def test_numpy_keeps_a_tensor_backed_by_its_file(tmp_path: pathlib.Path) -> None:
    """A mapped tensor read as numpy still reports its location and gives its raw bytes from the map
    (not an encoded copy); dropping the mapped pages leaves the arrays' values intact."""
    path, _ = _decoder(tmp_path)
    model = ir.load(str(path))
    t = model.graph.initializers["w1"].const_value
    arr = t.numpy()
    want = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[1])
    assert t.is_loaded and t.external is not None and t.external.path == str(path) + ".data"
    raw = t.raw_bytes()
    assert isinstance(raw, memoryview) and raw.obj is not None and bytes(raw) == want.tobytes()
    assert ir.release_mapped_pages() >= os.path.getsize(t.external.path)
    assert np.array_equal(arr, want) and bytes(t.raw_bytes()) == want.tobytes()


@pytest.mark.parametrize("share", [False, True])
def test_save_shares_external_data_only_when_asked(tmp_path: pathlib.Path, share: bool) -> None:
    """``share_external_data``: the saved model's weights are in a hard link to the source file (same
    inode) and its own data file holds only the new tensors; without it every weight is copied. Both run
    in onnxruntime with the original's outputs exactly, and lower back to the same model."""
    path, weight_bytes = _decoder(tmp_path)
    model = ir.load(str(path))
    extra = np.arange(1024, dtype=np.float32)  # a new in-memory tensor: always written to the data file
    g = model.graph
    add = ir.Node("Add", [g.outputs[0], g.constant(extra[:VOCAB], name="extra")], outputs=[ir.Value("shifted")])
    g.append(add)
    g.outputs.append(add.outputs[0])
    out = tmp_path / "dst" / "model.onnx"
    out.parent.mkdir()
    ir.save(model, out, external_data=True, share_external_data=share, size_threshold=0)
    files = _initializer_files(out)
    own = str(out) + ".data"
    assert files["extra"] == "model.onnx.data"
    if share:
        assert {files[n] for n in ("emb", "w1", "w2")} == {"model.onnx.shared0.data"}
        assert os.path.samefile(out.parent / "model.onnx.shared0.data", str(path) + ".data")
        assert os.path.getsize(own) < 4096 + VOCAB * 4 + 1
    else:
        assert {files[n] for n in ("emb", "w1", "w2")} == {"model.onnx.data"}
        assert os.path.getsize(own) >= weight_bytes
    feeds = _feeds()
    want = ort_session(path).run(None, feeds)[0]
    got = ort_session(out).run(None, feeds)
    assert np.array_equal(got[0], want) and np.array_equal(got[2], want + extra[:VOCAB])
    assert ir.structurally_equal(ir.load(str(out)), model)


def test_the_switch_model_shares_the_float_weights_and_saves_without_them(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The int8 switch model holds the original's float tensors; its session file references them
    through a link (its own data file holds the int8 weights only, and saving it allocates about
    their size, not the float bytes on top); it is the same model, with the same outputs at every
    flag setting, as the one built on the old deep copy."""
    path, weight_bytes = _decoder(tmp_path)
    model = ir.load(str(path))
    cands = find_candidates(model, ("MatMul",))
    plan = Plan(frozenset(c.index for c in cands), True, False, True, "integer-ops")
    switch, flags = build_switch_model(model, cands, quantize_forms(plan), local_weights=False)  # as for a big model
    for name, v in model.graph.initializers.items():
        assert switch.graph.initializers[name].const_value is v.const_value
    from passes.quantization import sensitivity

    monkeypatch.setattr(sensitivity, "FILE_BYTES", 0)  # through a file, as a big model's
    ev = Evaluator.__new__(Evaluator)  # only its saving: no calibration needed
    tracemalloc.start()
    with ev.saved(switch) as source:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert isinstance(source, str)
        files = _initializer_files(pathlib.Path(source))
        assert {files[n] for n in ("emb", "w1", "w2")} == {"model.onnx.shared0.data"}
        assert os.path.samefile(os.path.join(os.path.dirname(source), files["w1"]), str(path) + ".data")
        int8_bytes = sum(c.weight_shape[0] * c.weight_shape[1] for c in cands)
        assert int8_bytes <= os.path.getsize(source + ".data") < int8_bytes + 16 * 4096
        assert peak < int8_bytes + weight_bytes // 4, (peak, int8_bytes, weight_bytes)
        new = ort_session(source)
    old_switch, old_flags = build_switch_model(_old_copy(model), cands, quantize_forms(plan), local_weights=False)
    assert old_flags == flags and ir.structurally_equal(old_switch, switch)
    old = ort_session(ir.to_onnx(old_switch).SerializeToString())
    feeds = _feeds(1)
    float_out = ort_session(path).run(None, feeds)[0]
    for forms in ({}, {cands[0].index: "int8"}, {c.index: "int8" for c in cands}):
        f = {**feeds, **flag_feeds(flags, forms)}
        got = new.run(None, f)[0]
        assert np.array_equal(got, old.run(None, f)[0])
        assert (not forms) == np.array_equal(got, float_out)  # all flags 0: the float model exactly


def test_the_quantized_copy_is_the_model_of_the_old_copy(tmp_path: pathlib.Path) -> None:
    """apply_plan on ir.copy_model gives the model (text form and outputs, bit for bit) it gave on the old
    deep copy, close to the original in onnxruntime, and leaves the original untouched."""
    path, _ = _decoder(tmp_path)
    model = ir.load(str(path))
    before = ir.print_model(model)
    cands = find_candidates(model, ("MatMul",))
    plan = Plan(frozenset(c.index for c in cands), True, False, True, "integer-ops")
    outs = []
    for copier in (ir.copy_model, _old_copy):
        trial = copier(model)
        apply_plan(trial, cands, plan)
        outs.append((ir.print_model(trial), ort_session(ir.to_onnx(trial).SerializeToString()).run(None, _feeds(2))[0]))
    assert outs[0][0] == outs[1][0] and np.array_equal(outs[0][1], outs[1][1])
    assert ir.print_model(model) == before
    want = ort_session(path).run(None, _feeds(2))[0]
    cos = float(np.dot(want.ravel(), outs[0][1].ravel()) / np.linalg.norm(want) / np.linalg.norm(outs[0][1]))
    assert 0.99 < cos < 1.0 and not np.array_equal(want, outs[0][1])
