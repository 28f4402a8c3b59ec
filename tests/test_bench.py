"""passes.bench: every contender gets a row, peers that crash say so, the chart is written."""

from __future__ import annotations

import pytest

from passes.bench import plot, run_bench


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
