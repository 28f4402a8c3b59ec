"""passes.tools.bench: every contender gets a row, peers that crash say so, the chart is written."""

from __future__ import annotations

import pytest

from passes.tools.bench import plot, run_bench


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int8"], ids=["fp32", "int8"])
def test_bench_rows_and_plot(exported, tmp_path, quantize) -> None:
    res = run_bench(str(exported("bert")), target="x86-avx2", quantize=quantize, seq=16, rounds=1,
                    runs_per_round=2, peers=("ort-optimizer", "onnxscript"))
    names = [r["name"] for r in res.rows]
    assert names[0] == "onnxruntime (original)" and names[-1].startswith("ours (x86-avx2")
    assert any(n.startswith("ORT transformers optimizer") for n in names)
    by_name = {r["name"]: r for r in res.rows}
    ours = by_name[names[-1]]
    assert not ours.get("error") and ours["median_ms"] > 0 and ours["nodes"] < by_name[names[0]]["nodes"]
    ort_peer = next(r for r in res.rows if r["name"].startswith("ORT transformers optimizer"))
    assert not ort_peer.get("error"), ort_peer
    if quantize is None:
        assert ours["max_abs"] < 1e-4
    else:
        assert ours["cosine"] > 0.99
    assert res.setup["gflop"] > 0 and res.setup["peak_fp32"] > 0
    assert "median ms" in res.table()
    png = plot(res, str(tmp_path / "b.png"))
    assert png is None or (tmp_path / "b.png").stat().st_size > 1000


def test_run_all_summary_row_compares_ours_with_the_best_peer() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"
    spec = importlib.util.spec_from_file_location("run_all", path)
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    rows = [{"name": "onnxruntime (original)", "median_ms": 8.0, "cosine": 1.0},
            {"name": "ORT transformers optimizer + quantize_dynamic", "median_ms": 5.0, "cosine": 0.985},
            {"name": "onnxscript ORT fusions", "error": "crashed"},
            {"name": "ours (x86-avx2, int8)", "median_ms": 4.0, "cosine": 0.9991}]
    row = run_all.summary_row("m, batch 1, seq 32, int8", rows)
    assert row == "| m, batch 1, seq 32, int8 | 8.0 | 5.0 (0.9850) | failed | 4.0 (0.9991) | 0.80 | 0.80 |"
    fp32 = run_all.summary_row("m, fp32", [dict(r, name=r["name"].replace(" + quantize_dynamic", "")) for r in rows[:2]]
                               + [{"name": "ours (x86)", "median_ms": 7.0, "cosine": 1.0}])
    assert fp32.endswith("| 7.0 | 1.40 | 1.40 |") and "(" not in fp32


@pytest.mark.slow
def test_bench_times_a_precompiled_model_without_compiling(exported, tmp_path, monkeypatch) -> None:
    import ir
    import passes.tools.compile
    from passes import compile_model

    src = str(exported("bert"))
    path = tmp_path / "ours.onnx"
    ir.save(compile_model(src, "x86-avx2").model, path)

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(passes.tools.compile, "compile_model", no_compile)
    res = run_bench(src, target="x86-avx2", seq=16, rounds=1, runs_per_round=1, peers=(), compiled=str(path))
    ours = res.rows[-1]
    assert ours["name"].startswith("ours") and not ours.get("error") and ours["max_abs"] < 1e-4
    assert ours["nodes"] < res.rows[0]["nodes"]
