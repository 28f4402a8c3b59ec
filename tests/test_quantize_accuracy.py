"""Accuracy mechanisms of ``quantize`` (issue #14): MSE-optimal weight clipping and the cross-validated margin."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import ir
import targets
from passes import PassContext, PassManager, parse_pipeline
from passes.framework.pipeline import with_options
from passes.quantization import quantize as quantize_mod
from passes.quantization.quant_math import MSE_RATIOS, clip_ratios, quantize_weight, weight_clipping
from passes.quantization.quantize import Budget, Gap, cross_validated_gap
from passes.quantization.sensitivity import Score

# --------------------------------------------------------------------------------------------- #
# Weight clipping
# --------------------------------------------------------------------------------------------- #


def _channel_error(w: np.ndarray, scale: float, qmax: int) -> float:
    """Squared error of one channel quantized symmetrically with ``scale`` (independent reference)."""
    q = np.clip(np.round(w.astype(np.float64) / scale), -qmax, qmax)
    return float(((q * scale - w) ** 2).sum())


def _heavy_tailed(seed: int, k: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, size=(k, n)) * 0.05).astype(np.float32)


@pytest.mark.parametrize("reduce_range", [False, True])
def test_mse_clip_ratio_is_the_grid_minimum_of_the_squared_error(reduce_range: bool) -> None:
    w = _heavy_tailed(0, 768, 12)
    qmax = 63 if reduce_range else 127
    got = clip_ratios(w, qmax, per_channel=True)
    for j in range(w.shape[1]):
        amax = float(np.abs(w[:, j]).max())
        errs = [_channel_error(w[:, j], r * amax / qmax, qmax) for r in MSE_RATIOS]
        assert got[j] == MSE_RATIOS[int(np.argmin(errs))]
    assert (got < 1).any(), "a heavy-tailed weight has channels where clipping lowers the error"


def test_clip_ratios_are_remembered_by_weight_content_not_identity() -> None:
    w = _heavy_tailed(1, 256, 16)
    first = clip_ratios(w, 127, per_channel=True)
    expect = first.copy()
    first[:] = 0  # the caller's copy: the memo keeps its own
    np.testing.assert_array_equal(clip_ratios(w.copy(), 127, per_channel=True), expect)
    j = int(np.argmin(expect))
    assert expect[j] < 1.0
    edited = w.copy()
    edited[:, j] = 0.01 * np.sign(edited[:, j])  # channel j without its tail: min/max is best there
    again = clip_ratios(edited, 127, per_channel=True)
    assert again[j] == 1.0
    np.testing.assert_array_equal(np.delete(again, j), np.delete(expect, j))
    # the other arguments are part of the key
    qmax63 = clip_ratios(w, 63, per_channel=True)
    for k in range(w.shape[1]):
        amax = float(np.abs(w[:, k]).max())
        errs = [_channel_error(w[:, k], r * amax / 63, 63) for r in MSE_RATIOS]
        assert qmax63[k] == MSE_RATIOS[int(np.argmin(errs))]
    assert clip_ratios(w, 127, per_channel=False).ndim == 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(2, 64), n=st.integers(1, 8), per_channel=st.booleans(),
       reduce_range=st.booleans(), signed=st.booleans())
def test_mse_weights_never_have_more_squared_error_than_minmax(seed: int, k: int, n: int, per_channel: bool,
                                                               reduce_range: bool, signed: bool) -> None:
    w = _heavy_tailed(seed, k, n)
    kw = {"per_channel": per_channel, "signed": signed, "reduce_range": reduce_range}
    mse, minmax = quantize_weight(w, clip="mse", **kw), quantize_weight(w, clip="minmax", **kw)
    axis = 0 if per_channel else None
    e_mse = ((mse.dequantize() - w).astype(np.float64) ** 2).sum(axis=axis)
    e_mm = ((minmax.dequantize() - w).astype(np.float64) ** 2).sum(axis=axis)
    assert np.all(e_mse <= e_mm * (1 + 1e-5) + 1e-12)
    # the levels stay in range and the scale is the chosen fraction of max|w|
    qmax = 63 if reduce_range else 127
    off = 0 if signed else (64 if reduce_range else 128)
    assert np.abs(mse.q.astype(np.int32) - off).max() <= qmax
    r = clip_ratios(w, qmax, per_channel=per_channel)
    amax = np.abs(w).max(axis=0) if per_channel else np.abs(w).max()
    np.testing.assert_allclose(mse.scale, np.where(amax > 0, (amax * r / qmax), 1.0), rtol=1e-6)


def test_weight_clipping_block_sets_the_default_and_resets_it() -> None:
    w = _heavy_tailed(3, 64, 8)
    minmax = quantize_weight(w, per_channel=True)
    with weight_clipping("mse"):
        inside = quantize_weight(w, per_channel=True)
        explicit = quantize_weight(w, per_channel=True, clip="minmax")
    after = quantize_weight(w, per_channel=True)
    np.testing.assert_array_equal(inside.scale, quantize_weight(w, per_channel=True, clip="mse").scale)
    np.testing.assert_array_equal(explicit.scale, minmax.scale)
    np.testing.assert_array_equal(after.scale, minmax.scale)
    with pytest.raises(ValueError, match="weight clip"):
        with weight_clipping("percentile"):
            pass


# --------------------------------------------------------------------------------------------- #
# The cross-validated margin
# --------------------------------------------------------------------------------------------- #


def _table_score(table: np.ndarray):
    """``score(forms, part)``: per-sample cosines are ``1 - sum of the chosen ops' errors`` (table[op, batch])."""

    def score(forms: dict[int, str], part: list[int]) -> Score:
        cos = 1.0 - table[sorted(forms)][:, part].sum(axis=0) if forms else np.ones(len(part))
        return Score(float(cos.min()), float(cos.mean()))

    return score


def _greedy(score):
    """A search that adds ops in index order while the budget holds on the part it decides on."""

    def decide(part: list[int], budget: Budget) -> dict[int, str]:
        forms: dict[int, str] = {}
        for op in range(4):
            if budget.holds(score({**forms, op: "int8"}, part)):
                forms[op] = "int8"
        return forms

    return decide


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(4, 24))
def test_cross_validated_gap_is_the_mean_in_fold_optimism(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    table = rng.exponential(5e-4, size=(4, n))
    score, budget = _table_score(table), Budget(0.998, 0.999)
    decide = _greedy(score)
    calls = []

    def recording(part: list[int], b: Budget) -> dict[int, str]:
        calls.append(list(part))
        return decide(part, b)

    batches = list(range(n))
    gap = cross_validated_gap(batches, recording, score, budget)
    assert calls == [batches[0::2], batches[1::2]]
    diffs = []
    for inside in calls:  # the reference: each half's decision scored inside and outside
        outside = [b for b in batches if b not in inside]
        forms = decide(inside, budget)
        s_in, s_out = score(forms, inside), score(forms, outside)
        diffs.append((s_in.worst - s_out.worst, s_in.mean - s_out.mean))
    for got, want in zip(gap.folds, diffs, strict=True):
        assert got == pytest.approx(want)
    assert gap.worst == pytest.approx(max(0.0, np.mean([d[0] for d in diffs])))
    assert gap.mean == pytest.approx(max(0.0, np.mean([d[1] for d in diffs])))
    tight = budget.tightened(gap)
    assert tight.worst == pytest.approx(min(0.998 + gap.worst, 1 - 1e-7))
    assert tight.mean == pytest.approx(min(0.999 + gap.mean, 1 - 1e-7))
    # margin=cv-max: the larger fold's difference, never below the mean's
    largest = cross_validated_gap(batches, decide, score, budget, reduce="max")
    assert np.allclose(largest.folds, gap.folds)
    assert largest.worst == pytest.approx(max(0.0, max(d[0] for d in diffs)))
    assert largest.mean == pytest.approx(max(0.0, max(d[1] for d in diffs)))
    assert largest.worst >= gap.worst and largest.mean >= gap.mean
    with pytest.raises(ValueError, match="reduce"):
        cross_validated_gap(batches, decide, score, budget, reduce="median")


def test_a_decision_independent_of_the_samples_has_no_gap() -> None:
    table = np.random.default_rng(0).exponential(5e-4, size=(4, 10))
    score = _table_score(table)
    gap = cross_validated_gap(list(range(10)), lambda part, b: {0: "int8", 2: "int8"}, score, Budget(0.9))
    assert gap.worst == pytest.approx(0.0, abs=1e-15) and gap.mean == pytest.approx(0.0, abs=1e-15)
    assert gap.folds[0][0] == pytest.approx(-gap.folds[1][0])


def test_selection_on_calibration_is_optimistic_and_the_margin_corrects_it() -> None:
    """Ops whose error shows on rare samples: a greedy search on few samples takes them (they look
    free there), and scores worse on the others; the cross-validated gap is positive, and the
    tightened budget, decided on all samples, holds the nominal budget on fresh samples more often."""
    rng = np.random.default_rng(7)
    n_ops, budget = 4, Budget(0.998)

    def draw(n: int) -> np.ndarray:  # rare large errors: each op ruins ~1 sample in 12
        return rng.exponential(2e-4, size=(n_ops, n)) + (rng.random((n_ops, n)) < 1 / 12) * 1.5e-3

    held_ok = {"off": 0, "cv": 0}
    gaps = []
    for _ in range(40):
        calib, fresh = draw(16), draw(400)
        score = _table_score(calib)
        decide = _greedy(score)
        gap = cross_validated_gap(list(range(16)), decide, score, budget)
        gaps.append(gap.worst)
        for name, b in (("off", budget), ("cv", budget.tightened(gap))):
            forms = decide(list(range(16)), b)
            s = _table_score(fresh)(forms, list(range(400)))
            held_ok[name] += s.worst >= budget.worst
    assert np.mean(gaps) > 0
    assert held_ok["cv"] > held_ok["off"], held_ok


# --------------------------------------------------------------------------------------------- #
# In the pass
# --------------------------------------------------------------------------------------------- #


def _model_and_calibration(tmp_path: pathlib.Path) -> tuple[pathlib.Path, str]:
    """MatMuls on one input whose outlier channel is large in a few calibration samples only: some
    ops (those that do not read it) lose accuracy on exactly those samples."""
    rng = np.random.default_rng(5)
    k, n = 32, 16
    nodes, inits, outs = [], [], []
    for i in range(6):
        w = rng.standard_normal((k, n)).astype(np.float32) * 0.2
        if i % 2:
            w[0, :] = 0.0
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"m{i}"))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["b", n]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])], outs, inits)
    path = tmp_path / "m.onnx"
    path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    x = rng.standard_normal((64, k)).astype(np.float32)
    x[:, 0] *= np.where(rng.random(64) < 0.2, 40.0, 1.0)
    np.savez(tmp_path / "c.npz", x=x)
    return path, str(tmp_path / "c.npz")


def _run(path: pathlib.Path, **options: object):
    model = ir.load(str(path))
    ctx = PassContext(target=targets.get("x86-avx2"))
    rec = PassManager(with_options(parse_pipeline("quantize"), "quantize", dict(options))).run(model, ctx)[0]
    return model, ctx, rec


@pytest.mark.parametrize("margin", ["cv", "cv-max"])
def test_the_pass_decides_as_with_the_budget_raised_by_the_measured_gap(tmp_path: pathlib.Path, margin: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path, npz = _model_and_calibration(tmp_path)
    seen: list[Gap] = []
    real = quantize_mod.cross_validated_gap

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(quantize_mod, "cross_validated_gap", spy)
    opts = {"calibration": npz, "calibration_batch": 4, "outliers": "off", "smooth": "off", "outlier_threshold": 0.0}
    cv_model, ctx, rec = _run(path, min_cosine=0.999, margin=margin, **opts)
    assert len(seen) == 1
    gap = seen[0]
    assert gap.worst == pytest.approx(max(0.0, (max if margin == "cv-max" else np.mean)([d[0] for d in gap.folds])))
    note = next(str(d) for d in ctx.diagnostics if "ops int8" in str(d) or "cannot be met" in str(d))
    tight = Budget(0.999).tightened(gap)
    assert f"tightened by the cross-validated gap {gap}" in note or gap.worst == 0, note
    off_model, _, rec_off = _run(path, min_cosine=tight.worst, margin="off", **opts)
    assert [r["decision"] for r in rec.rows] == [r["decision"] for r in rec_off.rows]
    assert ir.structurally_equal(cv_model, off_model)


def test_margin_and_weight_clip_options_are_checked(tmp_path: pathlib.Path) -> None:
    path, npz = _model_and_calibration(tmp_path)
    from passes.framework.base import PassError

    with pytest.raises(PassError, match="margin"):
        _run(path, calibration=npz, margin="bootstrap")
    with pytest.raises(PassError, match="weight_clip"):
        _run(path, calibration=npz, weight_clip="p99")
