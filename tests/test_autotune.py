"""``--autotune``: picks by measurement, never outside the budget, caches per model, host and compiler."""

from __future__ import annotations

import dataclasses

import pathlib
import time

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
import targets
from passes.framework.base import PassError
from passes.tools.autotune import Candidate, autotune, cache_key, candidates

FP32 = Candidate("fp32", "dead-flow")
FP32_COPY = Candidate("fp32 again", "dead-flow,fold-constants")
INT4 = Candidate("int4", "quantize-weights{bits=4,block_size=32},dead-flow", quantized=True)


@pytest.fixture
def tiny(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A two-layer MLP ``[1, seq, 64] -> 256 -> 64`` saved to a file; the decision cache in ``tmp_path``."""
    monkeypatch.setenv("TFCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 256)).astype(np.float32) * 0.1, "w1"),
             numpy_helper.from_array(rng.standard_normal(256).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((256, 64)).astype(np.float32) * 0.1, "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", 64])], inits)
    path = tmp_path / "mlp.onnx"
    path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10).SerializeToString())
    return path


def _slow(name: str, seconds: float = 0.003):
    def hook(c: Candidate, run):
        if c.name != name:
            return run

        def slower(feeds):
            time.sleep(seconds)
            return run(feeds)

        return slower

    return hook


def _tune(path: pathlib.Path, cands: list[Candidate], **kw):
    kw.setdefault("use_cache", False)
    return autotune(ir.load(str(path)), targets.get("x86"), source=str(path), candidate_list=cands, seq=16,
                    rounds=3, runs=3, **kw)


def test_a_candidate_made_slower_is_not_picked(tiny: pathlib.Path) -> None:
    assert _tune(tiny, [FP32, FP32_COPY], runner_hook=_slow("fp32")).winner["name"] == "fp32 again"
    res = _tune(tiny, [FP32, FP32_COPY], runner_hook=_slow("fp32 again"))
    assert res.winner["name"] == "fp32"
    rows = {r["name"]: r for r in res.rows}
    assert rows["fp32 again"]["ratio"] > 1.0 and rows["fp32"]["ratio"] == 1.0
    assert "fastest within the budget" in res.reason and "fp32 |" not in res.table()


def test_the_playoff_decides_between_close_candidates(tiny: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate ahead in the run over all but behind when the close ones meet again loses; one
    far behind (outside PLAYOFF_WITHIN) does not play off. Timed on a clock the runs advance by set
    amounts, so that a loaded host cannot reorder them."""
    import types

    from passes.tools import autotune as autotune_module

    clock = [0.0]
    monkeypatch.setattr(autotune_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    calls: dict[str, int] = {}
    main_calls = 3 * 3  # rounds x runs of _tune's run over all

    def hook(c: Candidate, run):
        # "fp32" 10 ms in the run over all, 25 ms after it; "fp32 again" 11.5 ms; "far" 40 ms
        def timed(feeds):
            calls[c.name] = calls.get(c.name, 0) + 1
            late = calls[c.name] > main_calls
            clock[0] += {"fp32": 0.025 if late else 0.010, "fp32 again": 0.0115}.get(c.name, 0.040)
            return run(feeds)

        return timed

    far = Candidate("far", "dead-flow")
    res = _tune(tiny, [FP32, FP32_COPY, far], runner_hook=hook)
    rows = {r["name"]: r for r in res.rows}
    assert rows["fp32"]["median_ms"] < rows["fp32 again"]["median_ms"]  # ahead in the run over all
    assert rows["fp32"]["playoff_ms"] > rows["fp32 again"]["playoff_ms"] and rows["far"]["playoff_ms"] is None
    assert res.winner["name"] == "fp32 again" and calls["far"] == main_calls
    assert "playoff of the 2 within 1.2x" in res.reason and "next: fp32 at" in res.reason
    assert "faster in 3/3 rounds" in res.reason
    # without the late slowdown the run over all and the playoff agree
    calls.clear()
    main_calls = 10 ** 6
    assert _tune(tiny, [FP32, FP32_COPY, far], runner_hook=hook).winner["name"] == "fp32"


def test_a_candidate_outside_the_budget_is_never_picked(tiny: pathlib.Path) -> None:
    # int4 is the fastest here (fp32 is slowed), but its worst cosine is below a budget this tight
    res = _tune(tiny, [FP32, INT4], min_cosine=0.99999, runner_hook=_slow("fp32"))
    rows = {r["name"]: r for r in res.rows}
    assert not rows["int4"]["within_budget"] and rows["int4"]["worst_cosine"] < 0.99999
    assert rows["int4"]["median_ms"] < rows["fp32"]["median_ms"]
    assert res.winner["name"] == "fp32"
    assert "outside the budget: int4" in res.reason
    # with a looser budget the same measurement picks int4
    assert _tune(tiny, [FP32, INT4], min_cosine=0.9, runner_hook=_slow("fp32")).winner["name"] == "int4"
    with pytest.raises(PassError, match="no candidate holds the budget"):
        _tune(tiny, [INT4], min_cosine=0.99999)


def test_cache_key_changes_with_compiler_version_and_cpu_flags() -> None:
    flags = {"avx2", "avx512f", "avx512_vnni"}
    key = cache_key("model", flags, "compiler-a", {"seq": 128})
    assert key == cache_key("model", set(flags), "compiler-a", {"seq": 128})
    assert key != cache_key("model", flags, "compiler-b", {"seq": 128})
    assert key != cache_key("model", flags - {"avx512_vnni"}, "compiler-a", {"seq": 128})
    assert key != cache_key("other model", flags, "compiler-a", {"seq": 128})
    assert key != cache_key("model", flags, "compiler-a", {"seq": 16})


def test_second_run_hits_the_cache(tiny: pathlib.Path) -> None:
    first = _tune(tiny, [FP32, INT4], use_cache=True, min_cosine=0.9, fingerprint="v1", cpu_flags={"avx2"})
    assert not first.cached

    def never(c: Candidate, run):
        raise AssertionError("a cached decision runs no trial")

    t0 = time.perf_counter()
    second = _tune(tiny, [FP32, INT4], use_cache=True, min_cosine=0.9, fingerprint="v1", cpu_flags={"avx2"},
                   runner_hook=never)
    assert second.cached and second.key == first.key and second.winner == first.winner
    assert time.perf_counter() - t0 < 2.0
    assert ir.structurally_equal(second.model.graph, first.model.graph) or \
        [n.op_type for n in second.model.graph] == [n.op_type for n in first.model.graph]
    # a new compiler or other CPU flags: measured again
    for kw in ({"fingerprint": "v2", "cpu_flags": {"avx2"}}, {"fingerprint": "v1", "cpu_flags": {"avx2", "avx512_vnni"}}):
        again = _tune(tiny, [FP32, INT4], use_cache=True, min_cosine=0.9, **kw)
        assert not again.cached and again.key != first.key


def test_compiled_candidates_are_reused_across_timing_lengths(tiny: pathlib.Path) -> None:
    compiled: dict = {}
    lines: list[str] = []
    first = _tune(tiny, [FP32, INT4], min_cosine=0.9, compiled=compiled, progress=lines.append)
    assert len(compiled) == 2 and any("compiling int4" in m for m in lines)
    lines.clear()
    again = autotune(ir.load(str(tiny)), targets.get("x86"), source=str(tiny), candidate_list=[FP32, INT4], seq=32,
                     rounds=3, runs=3, min_cosine=0.9, use_cache=False, compiled=compiled, progress=lines.append)
    assert not any("compiling" in m for m in lines) and any("int4 compiled by an earlier call" in m for m in lines)
    assert again.setup["seq"] == 32
    assert [(r["name"], r["worst_cosine"]) for r in again.rows] == [(r["name"], r["worst_cosine"]) for r in first.rows]
    # a different budget is a different compile (the quantize pass decides under it)
    lines.clear()
    _tune(tiny, [FP32, INT4], min_cosine=0.95, compiled=compiled, progress=lines.append)
    assert sum("compiling" in m for m in lines) == 2 and len(compiled) == 4


def test_candidates_follow_target_capabilities() -> None:
    x86 = [c.name for c in candidates(targets.get("x86"))]
    assert len(x86) == 11 and any("residual skip" in n for n in x86) and any("int4" in n for n in x86)
    forms = {c.name: c.pipeline for c in candidates(targets.get("x86")) if "fuse-attention{" in c.pipeline}
    assert sorted(p.split("fuse-attention")[1].split("}")[0] + "}" for p in forms.values()) == [
        "{form=mha,qkv=split}", "{form=mha,qkv=split}", "{form=mha}", "{form=standard}"], forms
    assert [n for n, p in forms.items() if p.endswith(",quantize,dead-flow")] == [
        "int8 dynamic, MultiHeadAttention split QKV"]
    no_mha = dataclasses.replace(targets.get("x86"), contrib_ops=[o for o in targets.get("x86").contrib_ops
                                                                  if o != "MultiHeadAttention"])
    assert [c.name for c in candidates(no_mha) if "fuse-attention{" in c.pipeline] == [
        "fp32, attention in standard ops"]
    pipes = [c.pipeline for c in candidates(targets.get("x86"))]
    assert any(p.endswith("quantize{fallback=nbits},dead-flow") for p in pipes)
    assert any("quantize{fallback=nbits,static=on}" in p for p in pipes), pipes
    assert "fuse-layer-norm{residual=skip}" in candidates(targets.get("x86"))[1].pipeline
    generic = [c.name for c in candidates(targets.get("onnx"))]  # no contrib ops: no SkipLayerNorm, no MatMulNBits
    assert len(generic) == 2 and not any("MatMulNBits" in n or "residual" in n.split("(")[-1] for n in generic[1:])


def test_cli_autotune_then_cached(tiny: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    from passes.tools.compile import main

    out = tiny.with_suffix(".tuned.onnx")
    argv = [str(tiny), "--target", "x86", "--autotune", "--tune-seq", "8", "--min-cosine", "0.99",
            "--min-mean-cosine", "0.995", "--quiet", "-o", str(out)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "autotune:" in first and "winner:" in first and out.is_file()
    assert "worst cosine >= 0.99, mean >= 0.995" in first
    assert main(argv) == 0
    assert "(cached decision)" in capsys.readouterr().out
    assert main([*argv, "--pipeline", "dead-flow"]) == 2  # autotune chooses the pipeline


def test_quantize_calibrates_at_the_timing_batch(tiny: pathlib.Path) -> None:
    """Activation scales are per call, so the int8 candidate is calibrated (and checked) in batches
    of the batch being tuned for; an explicit calibration_batch option wins."""
    int8 = Candidate("int8", "quantize{sensitivity=false},dead-flow", quantized=True)
    for options, expected in (({}, 1), ({"calibration_batch": 4}, 4)):
        res = _tune(tiny, [int8], min_cosine=0.9, options=options)
        spec = next(r.spec for r in res.records if r.spec.startswith("quantize"))
        assert f"calibration_batch={expected}" in spec, spec


def test_quantize_in_autotune_takes_the_larger_folds_margin(tiny: pathlib.Path) -> None:
    """Keeping the fastest of several forms that pass on calibration favours an underestimated gap:
    autotune's quantize passes use margin=cv-max unless told otherwise; the cache key follows it."""
    int8 = Candidate("int8", "quantize,dead-flow", quantized=True)
    specs = []
    for options in ({}, {"margin": "cv"}):
        res = _tune(tiny, [int8], min_cosine=0.9, options=options)
        specs.append(next(r.spec for r in res.records if r.spec.startswith("quantize")))
    assert "margin=cv-max" in specs[0], specs
    assert "margin" not in specs[1], specs  # the pass's own default, cv (a spec lists what differs from it)
    keys = {_tune(tiny, [int8], min_cosine=0.9, options=o).key for o in ({}, {"margin": "cv"})}
    assert len(keys) == 2


def test_the_mean_budget_is_held_beside_the_worst(tiny: pathlib.Path) -> None:
    """int4 meets a loose worst bound; a mean bound above its mean keeps it out, and the table says both."""
    loose = _tune(tiny, [FP32, INT4], min_cosine=0.9, runner_hook=_slow("fp32"))
    int4 = next(r for r in loose.rows if r["name"] == "int4")
    assert loose.winner["name"] == "int4" and int4["mean_cosine"] < 0.99999
    res = _tune(tiny, [FP32, INT4], min_cosine=0.9, min_mean_cosine=0.99999, runner_hook=_slow("fp32"))
    rows = {r["name"]: r for r in res.rows}
    assert res.winner["name"] == "fp32" and not rows["int4"]["within_budget"]
    assert rows["int4"]["worst_cosine"] >= 0.9, "out on the mean alone"
    assert "mean >= 0.99999" in res.table() and res.setup["min_mean_cosine"] == 0.99999
    # the quantize pass inside a candidate gets the mean bound too
    int8 = Candidate("int8", "quantize,dead-flow", quantized=True)
    spec = next(r.spec for r in _tune(tiny, [int8], min_cosine=0.5, min_mean_cosine=0.9).records
                if r.spec.startswith("quantize"))
    assert "min_mean_cosine=0.9" in spec, spec
