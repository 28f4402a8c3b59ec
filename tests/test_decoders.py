"""Decoders with a KV cache: compiled for x86, greedy decoding must match the original at every
step (prefill and 32 decoding steps), and the ``passes.tools.generate`` API and CLI."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnx.parser
import pytest

import ir
from conftest import ROOT
from passes.tools.generate import GenerateError, generate, generate_with_stats, make_session

STEPS = 32


@pytest.fixture(scope="session")
def past_export(tmp_path_factory: pytest.TempPathFactory):
    """``past_export(arch, dynamo) -> Path``: a tiny decoder exported ``with_past`` (cached)."""
    cache: dict[tuple[str, bool], pathlib.Path] = {}
    folder = tmp_path_factory.mktemp("past_exports")

    def get(arch: str, dynamo: bool) -> pathlib.Path:
        key = (arch, dynamo)
        if key not in cache:
            from passes.tools import export as ex

            model = ex.tiny_model(arch, attn_implementation="sdpa")
            cache[key] = ex.export(model, folder / f"{arch}_{'dynamo' if dynamo else 'ts'}_past.onnx",
                                   dynamo=dynamo, with_past=True)
        return cache[key]

    return get


def _compiled(path: pathlib.Path) -> tuple[bytes, dict[str, int]]:
    from passes.tools.compile import compile_model

    result = compile_model(str(path), "x86")
    assert result.report.verified_ok, result.report.verification
    return ir.to_onnx(result.model).SerializeToString(), dict(result.report.stats)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["ts", "dynamo"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_decoding_matches_original(past_export, arch: str, dynamo: bool) -> None:
    path = past_export(arch, dynamo)
    compiled, stats = _compiled(path)
    if arch == "llama":
        assert stats.get("fused RotaryEmbedding") == 4
    # Names of inputs and outputs are kept: the same driver runs both models.
    ref_sess, got_sess = make_session(str(path)), make_session(compiled)
    assert [i.name for i in ref_sess.get_inputs()] == [i.name for i in got_sess.get_inputs()]
    assert [o.name for o in ref_sess.get_outputs()] == [o.name for o in got_sess.get_outputs()]
    prompt = np.random.default_rng(3).integers(3, 1000, size=(2, 7))
    ref = generate_with_stats(ref_sess, prompt, STEPS, keep_logits=True)
    got = generate_with_stats(got_sess, prompt, STEPS, keep_logits=True)
    np.testing.assert_array_equal(got.ids, ref.ids)
    assert len(got.logits) == len(ref.logits) == STEPS
    for step, (a, b) in enumerate(zip(ref.logits, got.logits)):
        err = float(np.max(np.abs(a - b)))
        assert err <= 1e-4, f"step {step}: max abs {err:.3g}"


@pytest.mark.slow
def test_presents_keep_names_and_values(past_export) -> None:
    path = past_export("llama", True)
    compiled, _ = _compiled(path)
    ref_sess, got_sess = make_session(str(path)), make_session(compiled)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(3, 1000, (2, 3)), "attention_mask": np.ones((2, 8), np.int64)}
    for i in ref_sess.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = rng.standard_normal((2, i.shape[1], 5, i.shape[3])).astype(np.float32)
    names = [o.name for o in ref_sess.get_outputs()]
    assert any(n.startswith("present.") for n in names)
    for name, a, b in zip(names, ref_sess.run(names, feeds), got_sess.run(names, feeds)):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.slow
def test_generate_cli(past_export) -> None:
    path = past_export("llama", False)
    run = subprocess.run(
        [sys.executable, "-m", "passes.tools.generate", str(path), "--tokens", "5", "--prompt-ids", "5,6,7"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines() if ": " in line)
    assert lines["prompt"] == "5,6,7"
    ids = [int(t) for t in lines["generated"].split(",")]
    assert ids == generate(str(path), [5, 6, 7], 5)[0].tolist()
    assert "tokens/s" in lines and "time to first token" in lines


def _no_past_model(tmp_path: pathlib.Path) -> pathlib.Path:
    proto = onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 18]>
    g (int64[B,S] input_ids, int64[B,S] attention_mask) => (float[B,S] logits) {
      logits = Cast <to = 1> (input_ids)
    }""")
    path = tmp_path / "nopast.onnx"
    onnx.save(proto, str(path))
    return path


def test_generate_rejects_models_without_cache(tmp_path: pathlib.Path) -> None:
    path = _no_past_model(tmp_path)
    with pytest.raises(GenerateError, match="with_past"):
        generate(str(path), [1, 2], 3)
    run = subprocess.run([sys.executable, "-m", "passes.tools.generate", str(path), "--tokens", "3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.startswith("error:") and len(run.stderr.splitlines()) == 1


def _echo_decoder(tmp_path: pathlib.Path) -> pathlib.Path:
    """A fake 1-layer decoder: logits favour token (last id + 1) % 10; presents concat the past."""
    proto = onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 18]>
    g (int64[B,S] input_ids, int64[B,T] attention_mask, float[B,1,P,2] pk, float[B,1,P,2] pv)
      => (float[B,S,10] logits, float[B,1,T,2] pkey, float[B,1,T,2] pval) {
      one = Constant <value = int64 {1}> ()
      ten = Constant <value = int64 {10}> ()
      nxt0 = Add(input_ids, one)
      nxt = Mod(nxt0, ten)
      oh = OneHot(nxt, ten, vals)
      logits = Cast <to = 1> (oh)
      f = Cast <to = 1> (input_ids)
      f1 = Unsqueeze(f, ax)
      f2 = Concat <axis = -1> (f1, f1)
      kv = Unsqueeze(f2, ax1)
      pkey = Concat <axis = 2> (pk, kv)
      pval = Concat <axis = 2> (pv, kv)
    }""")
    from onnx import numpy_helper

    proto.graph.initializer.extend([
        numpy_helper.from_array(np.array([0, 1], np.int64), "vals"),
        numpy_helper.from_array(np.array([-1], np.int64), "ax"),
        numpy_helper.from_array(np.array([1], np.int64), "ax1"),
    ])
    # Rename to the exporter's names.
    for vi in proto.graph.input:
        vi.name = {"pk": "past_key_values.0.key", "pv": "past_key_values.0.value"}.get(vi.name, vi.name)
    for vi in proto.graph.output:
        vi.name = {"pkey": "present.0.key", "pval": "present.0.value"}.get(vi.name, vi.name)
    for n in proto.graph.node:
        n.input[:] = [{"pk": "past_key_values.0.key", "pv": "past_key_values.0.value"}.get(i, i) for i in n.input]
        n.output[:] = [{"pkey": "present.0.key", "pval": "present.0.value"}.get(o, o) for o in n.output]
    path = tmp_path / "echo.onnx"
    onnx.save(proto, str(path))
    return path


def test_generate_feeds_the_cache(tmp_path: pathlib.Path) -> None:
    path = _echo_decoder(tmp_path)
    out = generate_with_stats(str(path), [[3, 4], [8, 8]], 4, keep_logits=True)
    assert out.ids.tolist() == [[5, 6, 7, 8], [9, 0, 1, 2]]
    assert len(out.logits) == 4 and out.logits[0].shape == (2, 10)
    assert out.time_to_first_token > 0
