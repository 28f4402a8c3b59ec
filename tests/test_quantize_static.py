"""``quantize{static=...}``: static activation scales from calibration, checked against the calibration data."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
import targets
from conftest import ort_session
from passes import PassContext, PassManager, parse_pipeline
from passes.framework.numerics import model_bytes_or_path
from passes.framework.pipeline import with_options
from passes.quantization.quant_math import cosine_rows
from passes.quantization.static_scales import ChannelRanges, channel_ranges, static_qparams


def _mlp(tmp_path: pathlib.Path, seed: int = 0) -> tuple[pathlib.Path, np.ndarray, dict[str, np.ndarray]]:
    """``x [b, 32] -> MatMul w1 + b1 -> Relu -> MatMul w2 -> y``, its calibration file and weights."""
    rng = np.random.default_rng(seed)
    w = {"w1": rng.standard_normal((32, 48)).astype(np.float32) * 0.3,
         "b1": rng.standard_normal(48).astype(np.float32) * 0.1,
         "w2": rng.standard_normal((48, 16)).astype(np.float32) * 0.3}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"], name="down")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])],
                          [numpy_helper.from_array(v, k) for k, v in w.items()])
    path = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = (rng.standard_normal((64, 32)) * rng.uniform(0.5, 2.0, (64, 1))).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    return path, x, w


def _quantize(path: pathlib.Path, target: str = "x86-avx2", **options: object):
    model = ir.load(str(path))
    ctx = PassContext(target=targets.get(target))
    rec = PassManager(with_options(parse_pipeline("quantize"), "quantize", dict(options)), check_modified=True).run(model, ctx)
    return model, ctx, rec[0]


def _quantizers(model: ir.Model) -> dict[str, tuple[float, int]]:
    """The static QuantizeLinear nodes: input value name -> (scale, zero point)."""
    out = {}
    for n in model.graph:
        if n.op_type == "QuantizeLinear":
            out[n.inputs[0].name] = (float(n.inputs[1].const_value.numpy()), int(n.inputs[2].const_value.numpy()))
    return out


def _expected(v: np.ndarray) -> tuple[float, int]:
    """DynamicQuantizeLinear's arithmetic on the whole calibration set at once."""
    lo, hi = min(0.0, float(v.min())), max(0.0, float(v.max()))
    scale = np.float32((hi - lo) / 255.0)
    return float(scale), int(np.clip(np.rint(-lo / scale), 0, 255))


def test_static_scales_match_the_calibration_data(tmp_path: pathlib.Path) -> None:
    """min/max scales (clip 100) are those of the whole calibration set, computed here in numpy from
    the npz (the input) and from the float model's own arithmetic (the hidden ReLU)."""
    path, x, w = _mlp(tmp_path)
    model, ctx, rec = _quantize(path, min_cosine=0.9, calibration=str(tmp_path / "c.npz"), static="on",
                                static_clips=(100.0,), smooth="off", outliers="off")
    q = _quantizers(model)
    relu = np.maximum(x @ w["w1"] + w["b1"], 0.0)
    assert set(q) == {"x", "r"} and "DynamicQuantizeLinear" not in {n.op_type for n in model.graph}
    for name, data in (("x", x), ("r", relu)):
        scale, zp = q[name]
        exp_scale, exp_zp = _expected(data)
        assert scale == pytest.approx(exp_scale, rel=1e-5) and zp == exp_zp, name
    assert q["r"][1] == 0, "a ReLU output has no negative values: zero point 0"
    assert {n.op_type for n in model.graph} >= {"QuantizeLinear", "MatMulIntegerToFloat"}
    assert rec.stats["static activation scales"] == 2
    assert any("static scales (clip 100)" in str(d) for d in ctx.diagnostics)


def test_static_int8_matches_the_integer_reference(tmp_path: pathlib.Path) -> None:
    """onnxruntime's QuantizeLinear + MatMulIntegerToFloat with constant scales is uint8(x) x int8(W) exactly."""
    path, x, w = _mlp(tmp_path)
    model, _, _ = _quantize(path, min_cosine=0.9, calibration=str(tmp_path / "c.npz"), static="on",
                            static_clips=(100.0,), smooth="off", outliers="off", exclude=("down",))
    scale, zp = _quantizers(model)["x"]
    mm = next(n for n in model.graph if n.op_type == "MatMulIntegerToFloat")
    wq, ws = mm.inputs[1].const_value.numpy(), mm.inputs[3].const_value.numpy()
    bias = mm.inputs[6].const_value.numpy()
    probe = x[:5] * 1.5  # beyond the calibration range: saturates, as static scales do
    xq = np.clip(np.rint(probe / scale) + zp, 0, 255)
    exact = np.maximum((xq - zp) @ wq.astype(np.float64) * scale * ws + bias, 0) @ w["w2"]
    got = ort_session(model_bytes_or_path(model)[0]).run(None, {"x": probe})[0]
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-3)


def test_clip_ranks_and_composition_with_smoothing_and_outliers() -> None:
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((50, 4)).astype(np.float32)} for _ in range(4)]
    batches[2]["x"][7, 1] = 40.0  # one rare large value
    allx = np.concatenate([b["x"] for b in batches])
    got = channel_ranges(batches, lambda names, feeds: [feeds[n] for n in names], ["x"], (100.0, 99.0))
    full, clipped = got[100.0]["x"], got[99.0]["x"]
    np.testing.assert_array_equal(full.hi, allx.max(0))
    np.testing.assert_array_equal(full.lo, allx.min(0))
    assert full.k == 1 and clipped.k == 2 and full.tokens == 200
    np.testing.assert_array_equal(clipped.hi, np.sort(allx, 0)[-2])
    np.testing.assert_array_equal(clipped.lo, np.sort(allx, 0)[1])
    assert clipped.hi[1] < 40.0 == full.hi[1]
    # smoothing divides each channel by s; outlier channels are left out of the envelope
    r = ChannelRanges(np.array([-1.0, -8.0, 0.5], np.float32), np.array([2.0, 8.0, 1.0], np.float32), 10, 1)
    assert float(static_qparams(r)[0]) == pytest.approx(16.0 / 255)
    assert float(static_qparams(r, smooth=np.array([1.0, 4.0, 1.0]))[0]) == pytest.approx(4.0 / 255)
    scale, zp = static_qparams(r, outliers=np.array([1]))
    assert float(scale) == pytest.approx(3.0 / 255) and int(zp) == 85


def test_switch_model_static_path_is_the_emitted_one(tmp_path: pathlib.Path) -> None:
    from passes.quantization._candidates import find_candidates
    from passes.quantization._emit import Plan, apply_plan
    from passes.quantization.forms import build_switch_model, flag_feeds, quantize_forms

    path, x, _ = _mlp(tmp_path)
    model = ir.load(str(path))
    cands = find_candidates(model, ("MatMul",))
    static = {c.activation: (np.array(0.05, np.float32), np.array(100, np.uint8)) for c in cands}
    plan = Plan(frozenset(c.index for c in cands), True, False, True, "integer-ops", static=static)
    switch, flags = build_switch_model(model, cands, quantize_forms(plan))
    via_switch = ort_session(model_bytes_or_path(switch)[0]).run(
        None, {"x": x[:8], **flag_feeds(flags, {c.index: "int8" for c in cands})})[0]
    apply_plan(model, cands, plan)
    got = ort_session(model_bytes_or_path(model)[0]).run(None, {"x": x[:8]})[0]
    np.testing.assert_allclose(via_switch, got, rtol=1e-5, atol=1e-5)
    ref = ort_session(str(path)).run(None, {"x": x[:8]})[0]
    assert float(cosine_rows(ref, got).min()) > 0.9


def test_auto_keeps_the_form_that_measures_better(tmp_path: pathlib.Path) -> None:
    """static=auto measures the static forms beside the dynamic one and the report names the one kept;
    what it keeps holds the budget on the calibration set."""
    path, x, _ = _mlp(tmp_path)
    model, ctx, rec = _quantize(path, min_cosine=0.99, calibration=str(tmp_path / "c.npz"), static="auto",
                                smooth="off", outliers="off")
    note = next(str(d) for d in ctx.diagnostics if "ops int8" in str(d))
    assert ("static scales" in note) == ("QuantizeLinear" in {n.op_type for n in model.graph}), note
    ref = ort_session(str(path)).run(None, {"x": x})[0]
    got = np.concatenate([ort_session(model_bytes_or_path(model)[0]).run(None, {"x": x[i:i + 8]})[0]
                          for i in range(0, 64, 8)])
    assert float(cosine_rows(ref, got).min()) >= 0.99
    with pytest.raises(Exception, match="static must be"):
        _quantize(path, static="maybe", calibration=str(tmp_path / "c.npz"))


def test_the_margin_fits_each_folds_static_scales_on_that_fold(tmp_path: pathlib.Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Static scales are fitted on calibration data, so the cross-validated margin fits them again on
    each fold's batches: activations of the other fold outside that range are then clipped, and the
    gap shows it. Here every odd batch runs at 6x the even ones' scale: the even fold's scales clip
    the odd batches, a gap scales fitted on all batches (both folds' activations seen) would not show."""
    from passes.quantization import quantize as quantize_mod

    path, x, _ = _mlp(tmp_path)
    x = np.abs(x) / np.abs(x).max(axis=1, keepdims=True) * np.sign(x)  # every row at the same range
    x[np.arange(64) // 4 % 2 == 1] *= 6.0  # batches of 4: the odd ones (fold 1) at 6x
    np.savez(tmp_path / "c.npz", x=x)
    seen = []
    real = quantize_mod.cross_validated_gap

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(quantize_mod, "cross_validated_gap", spy)
    _quantize(path, min_cosine=0.99, calibration=str(tmp_path / "c.npz"), calibration_batch=4, static="on",
              static_clips=(100.0,), smooth="off", outliers="off", margin="cv-max")
    (gap,) = seen
    (even_in_out, _), _ = gap.folds
    assert even_in_out > 0.05, gap.folds  # decided on the even fold, clipped on the odd one
    seen.clear()
    _quantize(path, min_cosine=0.99, calibration=str(tmp_path / "c.npz"), calibration_batch=4, static="off",
              smooth="off", outliers="off", margin="cv-max")
    assert abs(seen[0].folds[0][0]) < 0.01, seen[0].folds  # dynamic scales: no fold is clipped
