"""Probe sessions take large initializers from memory (ir.to_onnx_sharing + numerics.session).

A probe model's weights used to be copied into its protobuf and parsed back by onnxruntime; now
the protobuf leaves them out and onnxruntime reads the arrays in place. These tests pin that the
bytes really leave the weights out, that what stays inline is exactly what must (small tensors,
attribute copies of a shared tensor), and that the session computes what the inline model does.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import ir
from passes.framework.numerics import session
from passes.fusions._attention_probe import Probe, _shareable


def _model() -> ir.Model:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)  # 16 KiB: shared
    b = rng.standard_normal(64).astype(np.float32)  # 256 B: inline
    k = rng.standard_normal((64, 64)).astype(np.float32)
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Constant", [], ["K"], value=numpy_helper.from_array(k, "K")),
            helper.make_node("MatMul", ["h", "K"], ["hk"]),
            helper.make_node("Add", ["hk", "b"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = ir.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    # The Constant's attribute holds the very tensor object of W: it must stay inline there.
    const = next(n for n in model.graph if n.op_type == "Constant")
    const.set_attr("value", model.graph.initializers["W"].const_value)
    const.outputs[0].type = ir.TensorType(ir.DataType.FLOAT, (64, 64))
    return model


def test_sharing_leaves_large_initializers_out_of_the_bytes() -> None:
    model = _model()
    w = model.graph.initializers["W"].const_value
    proto, shared = ir.to_onnx_sharing(model, _shareable)
    assert set(shared) == {"W"} and shared["W"] is w
    inits = {tp.name: tp for tp in proto.graph.initializer}
    assert inits["W"].data_location == TensorProto.EXTERNAL and not inits["W"].raw_data
    assert inits["b"].data_location == TensorProto.DEFAULT and len(inits["b"].raw_data) == 256
    const = next(n for n in proto.graph.node if n.op_type == "Constant")
    assert const.attribute[0].t.data_location == TensorProto.DEFAULT
    assert len(const.attribute[0].t.raw_data) == w.nbytes
    inline = ir.to_onnx(model).SerializeToString()
    # W's bytes left the initializer (a location record instead), and only there
    assert len(inline) - w.nbytes < len(proto.SerializeToString()) < len(inline) - w.nbytes + 100


def test_shared_session_computes_what_the_inline_model_does() -> None:
    model = _model()
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    proto, shared = ir.to_onnx_sharing(model, _shareable)
    arrays = {name: t.numpy() for name, t in shared.items()}
    (got,) = session(proto.SerializeToString(), initializers=arrays).run(None, {"x": x})
    (ref,) = session(ir.to_onnx(model).SerializeToString()).run(None, {"x": x})
    assert np.array_equal(got, ref)
    # Without the arrays, onnxruntime has no data for W: the bytes really left it out.
    try:
        session(proto.SerializeToString()).run(None, {"x": x})
    except Exception:
        pass
    else:
        raise AssertionError("the model's bytes still held W")


def test_probe_runs_on_shared_weights() -> None:
    model = _model()
    y = model.graph.outputs[0]
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    probe = Probe(model, [y])
    (got,) = probe.run({id(model.graph.inputs[0]): x})
    (ref,) = session(ir.to_onnx(model).SerializeToString()).run(None, {"x": x})
    assert np.array_equal(got, ref)
    # The weights were handed over as views of their bytes: no decoded copy stays on the model.
    assert not model.graph.initializers["W"].const_value.is_loaded
