"""``quantize-weights``: MatMulNBits packing against a numpy reference, onnxruntime's kernel, real exports."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
import targets
from conftest import feeds_for, ort_session
from passes import PassContext, PassManager
from passes.framework.base import PassError
from passes.framework.numerics import model_bytes_or_path
from passes.quantization.quant_math import cosine_rows
from passes.quantization.weight_only import PackedWeight, dequantize_weight, pack_weight


def _reference_dequantize(p: PackedWeight) -> np.ndarray:
    """Element by element, straight from onnxruntime's schema (independent of the module's vector code)."""
    n, k_blocks, blob = p.b.shape
    assert blob == p.block_size * p.bits // 8
    w = np.zeros((n, k_blocks * p.block_size), np.float32)
    zp_bytes = None if p.zero_points is None else p.zero_points.reshape(n, -1)
    for col in range(n):
        for blk in range(k_blocks):
            if zp_bytes is None:
                zp = 1 << (p.bits - 1)
            elif p.bits == 8:
                zp = int(zp_bytes[col, blk])
            else:  # 4-bit zero points: two a byte, the first in the low nibble
                byte = int(zp_bytes[col, blk // 2])
                zp = (byte >> 4) if blk % 2 else (byte & 0xF)
            scale = float(p.scales.reshape(n, k_blocks)[col, blk])
            for i in range(p.block_size):
                if p.bits == 8:
                    code = int(p.b[col, blk, i])
                else:
                    byte = int(p.b[col, blk, i // 2])
                    code = (byte >> 4) if i % 2 else (byte & 0xF)
                w[col, blk * p.block_size + i] = (code - zp) * scale
    return w[:, : p.k].T


def _matmul_model(w: np.ndarray, bias: np.ndarray | None = None, *, gemm: bool = False) -> object:
    k, n = w.shape
    inits = [numpy_helper.from_array(w.T.copy() if gemm else w, "W")]
    if gemm:
        nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1, alpha=0.5)]
        inits.append(numpy_helper.from_array(bias, "b"))
        x_shape = [6, k]
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["m" if bias is not None else "y"])]
        if bias is not None:
            nodes.append(helper.make_node("Add", ["m", "b"], ["y"]))
            inits.append(numpy_helper.from_array(bias, "b"))
        x_shape = [2, 3, k]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _run(model: ir.Model | object, x: np.ndarray) -> np.ndarray:
    src = model_bytes_or_path(model)[0] if isinstance(model, ir.Model) else model.SerializeToString()  # type: ignore[attr-defined]
    return ort_session(src).run(None, {"x": x})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k", [64, 100])  # 100: the last block is padded
def test_packing_matches_numpy_reference(bits: int, symmetric: bool, k: int) -> None:
    w = np.random.default_rng(bits + k).standard_normal((k, 24)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column: scale 1, every code the zero point
    p = pack_weight(w, bits=bits, block_size=32, symmetric=symmetric)
    k_blocks = -(-k // 32)
    assert p.b.shape == (24, k_blocks, 32 * bits // 8) and p.b.dtype == np.uint8
    assert p.scales.shape == (24, k_blocks) and p.scales.dtype == np.float32
    if symmetric:
        assert p.zero_points is None
    else:
        assert p.zero_points is not None and p.zero_points.shape == (24, -(-k_blocks * bits // 8))
    ref = _reference_dequantize(p)
    np.testing.assert_array_equal(dequantize_weight(p), ref)
    # round to nearest: each weight within half a step of its block's scale
    step = np.repeat(p.scales, 32, axis=1)[:, :k].T
    assert np.all(np.abs(ref - w) <= step * 0.5 + 1e-6)
    assert np.all(ref[:, 3] == 0.0)


def test_bad_options_raise() -> None:
    w = np.ones((32, 4), np.float32)
    with pytest.raises(PassError, match="bits"):
        pack_weight(w, bits=3)
    with pytest.raises(PassError, match="block_size"):
        pack_weight(w, block_size=24)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k", [64, 100])
def test_onnxruntime_kernel_computes_with_the_dequantized_weight(bits: int, symmetric: bool, k: int) -> None:
    rng = np.random.default_rng(7)
    w = rng.standard_normal((k, 48)).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    sym = "true" if symmetric else "false"
    exact = x @ dequantize_weight(pack_weight(w, bits=bits, symmetric=symmetric)) + b
    for level in (0, 4):
        model = ir.from_onnx(_matmul_model(w, b))
        records = PassManager(f"quantize-weights{{bits={bits},symmetric={sym},accuracy_level={level}}}",
                              check_modified=True).run(model, PassContext(target=targets.get("x86")))
        assert records[0].modified
        assert [n.op_type for n in model.graph] == ["MatMulNBits"]  # the bias Add is folded in
        node = next(iter(model.graph))
        assert {k_: node.attr(k_) for k_ in ("K", "N", "bits", "block_size", "accuracy_level")} == {
            "K": k, "N": 48, "bits": bits, "block_size": 32, "accuracy_level": level}
        got = _run(model, x)
        if level == 0:  # float compute: exactly the dequantized weight's product
            np.testing.assert_allclose(got, exact, atol=1e-4, rtol=1e-5)
        else:  # int8 activations per block: close to it
            assert cosine_rows(got.reshape(6, -1), exact.reshape(6, -1)).min() > 0.999


def test_gemm_with_trans_b_alpha_and_bias() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    proto = _matmul_model(w, b, gemm=True)
    model = ir.from_onnx(proto)
    PassManager("quantize-weights{bits=8,accuracy_level=0}").run(model, PassContext(target=targets.get("x86")))
    assert [n.op_type for n in model.graph] == ["MatMulNBits"]
    x = rng.standard_normal((6, 64)).astype(np.float32)
    exact = x @ dequantize_weight(pack_weight(w * 0.5, bits=8)) + b
    np.testing.assert_allclose(_run(model, x), exact, atol=1e-4, rtol=1e-5)


def test_not_modified_without_matmul_nbits_or_a_constant_weight() -> None:
    w = np.ones((32, 8), np.float32)
    model = ir.from_onnx(_matmul_model(w))
    records = PassManager("quantize-weights", check_modified=True).run(model, PassContext(target=targets.get("onnx")))
    assert not records[0].modified and [n.op_type for n in model.graph] == ["MatMul"]
    model = ir.from_onnx(_matmul_model(w))
    records = PassManager("quantize-weights{min_weight=1000}", check_modified=True).run(
        model, PassContext(target=targets.get("x86")))
    assert not records[0].modified
    model = ir.from_onnx(_matmul_model(w))
    PassManager("quantize-weights", check_modified=True).run(model, PassContext(target=targets.get("x86")))
    records = PassManager("quantize-weights", check_modified=True).run(model, PassContext(target=targets.get("x86")))
    assert not records[0].modified  # idempotent: nothing left to quantize


@pytest.mark.parametrize("bits,min_cos", [(8, 0.999), (4, 0.98)])
def test_real_export_numerics(exported, bits: int, min_cos: float) -> None:
    """Tiny BERT from the TorchScript exporter, through the target pipeline then weight-only quantization."""
    from passes import compile_model

    path = exported("bert")
    tgt = targets.get("x86")
    res = compile_model(str(path), tgt, f"{tgt.pipeline},quantize-weights{{bits={bits}}},dead-flow", verify=False)
    assert res.report.stats[f"MatMul -> MatMulNBits ({bits}-bit)"] > 0
    feeds = feeds_for("bert", batch=2, seq=16)
    ref_sess = ort_session(str(path))
    names = {i.name for i in ref_sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    ref = ref_sess.run(None, feeds)[0]
    got = ort_session(model_bytes_or_path(res.model)[0]).run(None, feeds)[0]
    cos = cosine_rows(ref.reshape(2, -1).astype(np.float64), got.reshape(2, -1).astype(np.float64))
    assert cos.min() > min_cos
