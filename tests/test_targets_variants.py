"""Quantization policy variants: other int8 weight encodings a target's kernels take, measured by ``--autotune``.

On x86 without VNNI onnxruntime's u8 x s8 kernel multiplies with ``vpmaddubsw``, whose int16 pair
sums saturate for full 8-bit weights; the x86-avx2 profile therefore keeps s8 weights in 7 bits and
lists u8 8-bit weights (MLAS's u8 x u8 kernel: 16-bit products, no saturation) and s8 8-bit weights
as variants for autotune to measure.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
import targets
from passes.framework.base import PassContext
from passes.framework.manager import PassManager
from passes.framework.numerics import model_bytes_or_path, session
from passes.framework.pipeline import parse_pipeline
from passes.quantization.quant_math import dynamic_quantize_linear
from passes.tools.autotune import Candidate, autotune, candidates

U8 = "u8 weights, 8-bit"


def _variant(target: targets.Target, name: str) -> targets.PolicyVariant:
    return next(v for v in target.quantization.variants if v.name == name)


def test_x86_avx2_lists_the_unsaturated_8_bit_encodings_and_vnni_none() -> None:
    avx2 = targets.get("x86-avx2")
    assert avx2.quantization.reduce_range and avx2.quantization.weight_signed
    u8 = _variant(avx2, U8).apply(avx2.quantization)
    assert not u8.weight_signed and not u8.reduce_range and u8.variants == ()
    assert u8.per_channel == avx2.quantization.per_channel and u8.ops == avx2.quantization.ops
    s8 = _variant(avx2, "s8 weights, 8-bit").apply(avx2.quantization)
    assert s8.weight_signed and not s8.reduce_range
    assert targets.get("x86").quantization.variants == ()  # VNNI: u8 x s8 at full rate, nothing to try


def test_variants_load_from_the_profile_and_bad_ones_are_refused(tmp_path: pathlib.Path) -> None:
    head = 'name = "t"\ndescription = "test"\n[quantization]\nreduce_range = true\n'
    good = tmp_path / "good.toml"
    good.write_text(head + '[[quantization.variants]]\nname = "wide"\nreduce_range = false\n')
    (v,) = targets.load_target_file(good).quantization.variants
    assert v == targets.PolicyVariant("wide", (("reduce_range", False),))
    for body, match in (('reduce_range = false\n', "needs a name"),
                        ('name = "x"\n', "needs a name"),
                        ('name = "x"\nformat = "qdq"\n', "unknown: format"),
                        ('name = "x"\nreduce_range = 1\n', "true or false")):
        bad = tmp_path / "bad.toml"
        bad.write_text(head + "[[quantization.variants]]\n" + body)
        with pytest.raises(targets.TargetError, match=match):
            targets.load_target_file(bad)


def test_autotune_measures_one_int8_candidate_per_variant() -> None:
    avx2 = targets.get("x86-avx2")
    cands = candidates(avx2)
    base = next(c for c in cands if c.name == "int8 dynamic (quantize)")
    per_variant = [c for c in cands if c.variant is not None]
    assert [c.variant for c in per_variant] == list(avx2.quantization.variants)
    for c in per_variant:
        assert c.quantized and c.pipeline == base.pipeline and c.variant.name in c.name
        assert c.spec() != base.spec() and "[policy: " in c.spec()  # the cache key and the report tell them apart
        assert c.target_for(avx2).quantization == c.variant.apply(avx2.quantization)
        assert c.target_for(avx2).contrib_ops == avx2.contrib_ops
    assert base.target_for(avx2) is avx2
    assert not any(c.variant for c in candidates(targets.get("x86")))
    # a profile without the variants (as on a VNNI host): the same candidates minus those
    bare = dataclasses.replace(avx2, quantization=dataclasses.replace(avx2.quantization, variants=()))
    assert [c.name for c in candidates(bare)] == [c.name for c in cands if c.variant is None]


# -- the u8 x u8 form's numerics ------------------------------------------------------------------


def _mlp(tmp_path: pathlib.Path, k: int = 64, n: int = 48, consumers: int = 1) -> pathlib.Path:
    """``x [b, s, k]`` read by ``consumers`` MatMul + bias Add with weights at +-1 in adjacent pairs of rows
    (the worst case for ``vpmaddubsw``: two 255 activations times two 127 weights of one sign)."""
    rng = np.random.default_rng(1)
    nodes, inits, outs = [], [], []
    for i in range(consumers):
        w = rng.standard_normal((k, n)).astype(np.float32) * 0.2
        w[0:2, :] = np.where(rng.random(n) < 0.5, -1.0, 1.0)  # rows 0-1: the largest weight of every column, one sign
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"], name=f"add{i}")]
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["b", "s", n]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])], outs, inits)
    path = tmp_path / f"mlp{consumers}.onnx"
    path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10).SerializeToString())
    return path


def _x(k: int = 64) -> np.ndarray:
    x = np.random.default_rng(2).standard_normal((2, 5, k)).astype(np.float32)
    x[..., 0:2] = 4.0  # quantize to 255 (the range is about [-3, 4]): the pair sums a vpmaddubsw kernel saturates
    return x


def _quantized(path: pathlib.Path, variant: str | None) -> ir.Model:
    avx2 = targets.get("x86-avx2")
    cand = Candidate("int8", "quantize{sensitivity=false,smooth=off,outliers=off}", True,
                     None if variant is None else _variant(avx2, variant))
    model = ir.load(str(path))
    PassManager(parse_pipeline(cand.pipeline), verify=True).run(model, PassContext(target=cand.target_for(avx2)))
    return model


@pytest.mark.parametrize("consumers", [1, 3])  # DynamicQuantizeMatMul; one DynamicQuantizeLinear + MatMulIntegerToFloat
def test_u8_weights_are_full_8_bit_and_exact_where_s8_pairs_would_saturate(tmp_path: pathlib.Path, consumers: int) -> None:
    path = _mlp(tmp_path, consumers=consumers)
    model = _quantized(path, U8)
    ops = sorted({n.op_type for n in model.graph})
    assert ops == (["DynamicQuantizeMatMul"] if consumers == 1 else ["DynamicQuantizeLinear", "MatMulIntegerToFloat"])
    x = _x()
    xq, xs, xz = dynamic_quantize_linear(x)
    assert (xq[..., 0:2] == 255).all()
    got = session(model_bytes_or_path(model)[0], 1).run(None, {"x": x})
    ref = session(str(path), 1).run(None, {"x": x})
    for node, g, r in zip([n for n in model.graph if n.op_type != "DynamicQuantizeLinear"], got, ref):
        if node.op_type == "DynamicQuantizeMatMul":
            wq, ws, wz, b = (node.inputs[i].const_value.numpy() for i in (1, 2, 3, 4))
        else:
            wq, ws, wz, b = (node.inputs[i].const_value.numpy() for i in (1, 3, 5, 6))
        assert wq.dtype == np.uint8 and (wz == 128).all(), "u8 weights, zero point 128"
        assert (np.abs(wq[0:2].astype(np.int16) - 128) == 127).all(), "full 8-bit range (no reduce_range)"
        exact = (xq.astype(np.float64) - xz) @ (wq.astype(np.float64) - wz) * xs * ws + b
        np.testing.assert_allclose(g, exact, rtol=1e-5, atol=1e-4)
        cos = float((g * r).sum() / np.linalg.norm(g) / np.linalg.norm(r))
        assert cos > 0.9999


def test_the_policy_default_stays_7_bit_s8(tmp_path: pathlib.Path) -> None:
    """The variant changes only the candidate that carries it: the default policy's weights are s8 in 7 bits."""
    model = _quantized(_mlp(tmp_path), None)
    (node,) = [n for n in model.graph if n.op_type == "DynamicQuantizeMatMul"]
    wq = node.inputs[1].const_value.numpy()
    assert wq.dtype == np.int8 and np.abs(wq).max() == 63


def test_autotune_compiles_a_variant_candidate_with_its_policy(tmp_path: pathlib.Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    path = _mlp(tmp_path)
    avx2 = targets.get("x86-avx2")
    u8 = Candidate("u8", "quantize{sensitivity=false},dead-flow", True, _variant(avx2, U8))
    res = autotune(ir.load(str(path)), avx2, source=str(path), candidate_list=[u8], min_cosine=0.99, seq=8,
                   rounds=2, runs=2, use_cache=False)
    (node,) = [n for n in res.model.graph if n.op_type == "DynamicQuantizeMatMul"]
    assert node.inputs[1].const_value.numpy().dtype == np.uint8
    assert "[policy: reduce_range=false, weight_signed=false]" in res.winner["pipeline"]
