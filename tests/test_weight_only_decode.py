"""``quantize-weights`` on decoders with a KV cache (projections and LM head), and its per-op fallback.

* a tiny Llama and GPT-2 exported ``with_past``, compiled for x86 (MultiHeadAttention with past and
  present) then weight-only int8: every projection *and the LM head* is ``MatMulNBits``, and greedy
  decoding gives the original's tokens for 32 steps; int4 keeps the logits close;
* the fallback picks by measurement: in a chain of MatMuls the one made sensitive on purpose
  (one large weight per block, so that int4's step rounds the others to zero) is the one kept at
  int8 (or float), wherever it sits, and the budget then holds on the real rewrite.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import ir
import targets
from conftest import ort_session
from passes import PassContext, PassManager
from passes.framework.base import PassError
from passes.framework.numerics import model_bytes_or_path
from passes.quantization.quant_math import cosine_rows
from passes.tools.generate import GenerateError, generate_with_stats, make_session, perplexity

STEPS = 32


@pytest.fixture(scope="module")
def past_export(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, pathlib.Path] = {}
    folder = tmp_path_factory.mktemp("wo_past")

    def get(arch: str) -> pathlib.Path:
        if arch not in cache:
            from passes.tools import export as ex

            model = ex.tiny_model(arch, attn_implementation="sdpa")
            cache[arch] = ex.export(model, folder / f"{arch}_past.onnx", with_past=True)
        return cache[arch]

    return get


@functools.lru_cache(maxsize=8)  # the same compile serves several tests (per worker)
def _compile(path: pathlib.Path, bits: int | None) -> tuple[bytes, dict[str, int], ir.Model]:
    from passes.tools.compile import compile_model

    tgt = targets.get("x86")
    pipe = tgt.pipeline if bits is None else f"{tgt.pipeline},quantize-weights{{bits={bits}}},dead-flow"
    result = compile_model(str(path), tgt, pipe, verify=False)
    return ir.to_onnx(result.model).SerializeToString(), dict(result.report.stats), result.model


def _lm_head(model: ir.Model) -> ir.Node:
    """The node producing ``logits``."""
    out = next(v for v in model.graph.outputs if v.name == "logits")
    node = out.producer()
    assert node is not None
    return node


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_int8_weights_keep_greedy_tokens_with_the_lm_head_quantized(past_export, arch: str) -> None:
    path = past_export(arch)
    ref_sess = make_session(str(path))
    fp32, _, fp32_model = _compile(path, None)
    q8, stats, q8_model = _compile(path, 8)
    assert _lm_head(fp32_model).op_type in ("MatMul", "Gemm")
    head = _lm_head(q8_model)
    assert (head.domain, head.op_type, head.attr("bits")) == ("com.microsoft", "MatMulNBits", 8)
    # every float projection became MatMulNBits, and the KV-cache attention is the fused one
    assert not any(n.op_type in ("MatMul", "Gemm") and n.inputs[1] is not None and n.inputs[1].is_initializer()
                   for n in q8_model.graph)
    ops = {(n.domain, n.op_type) for n in q8_model.graph}
    assert ("com.microsoft", "MultiHeadAttention") in ops
    nbits = sum(v for k, v in stats.items() if "MatMulNBits (8-bit)" in k)
    assert nbits == sum(1 for n in fp32_model.graph if n.op_type in ("MatMul", "Gemm")
                        and n.inputs[1] is not None and n.inputs[1].is_initializer())
    prompt = np.random.default_rng(3).integers(3, 1000, size=(1, 16))
    ref = generate_with_stats(ref_sess, prompt, STEPS, keep_logits=True)
    base = generate_with_stats(make_session(fp32), prompt, STEPS)
    got = generate_with_stats(make_session(q8), prompt, STEPS, keep_logits=True)
    np.testing.assert_array_equal(base.ids, ref.ids)
    np.testing.assert_array_equal(got.ids, ref.ids)
    cos = cosine_rows(np.concatenate(ref.logits).astype(np.float64), np.concatenate(got.logits).astype(np.float64))
    assert cos.min() > 0.999


def test_int4_weights_keep_the_logits_close(past_export) -> None:
    path = past_export("gpt2")
    q4, stats, _ = _compile(path, 4)
    assert stats.get("Gemm -> MatMulNBits (4-bit)", 0) + stats.get("MatMul -> MatMulNBits (4-bit)", 0) > 0
    prompt = np.random.default_rng(3).integers(3, 1000, size=(1, 16))
    ref = generate_with_stats(make_session(str(path)), prompt, 1, keep_logits=True)
    got = generate_with_stats(make_session(q4), prompt, 1, keep_logits=True)
    cos = cosine_rows(ref.logits[0].astype(np.float64), got.logits[0].astype(np.float64))
    assert 0.98 < cos.min() < 1.0 - 1e-7  # close, and really quantized


def test_perplexity_matches_torch_and_int8_barely_moves_it(past_export) -> None:
    import torch

    from passes.tools import export as ex

    path = past_export("llama")
    ids = np.random.default_rng(5).integers(3, 1000, size=80)
    model = ex.tiny_model("llama", attn_implementation="sdpa")  # the exported weights (seeded)
    with torch.inference_mode():  # two windows of 40 tokens, 39 predictions each: the mean of the means
        chunks = [torch.from_numpy(ids[None, i : i + 40]) for i in (0, 40)]
        loss = torch.stack([model(input_ids=c, labels=c).loss for c in chunks]).mean()
    ref = float(torch.exp(loss))
    ppl = perplexity(str(path), ids, window=40)
    np.testing.assert_allclose(ppl, ref, rtol=1e-4)
    assert perplexity(str(path), ids, window=40, max_windows=1) != ppl  # the second window counts
    q8, _, _ = _compile(path, 8)
    assert abs(perplexity(make_session(q8), ids, window=40) / ppl - 1) < 0.01
    with pytest.raises(GenerateError, match="window"):
        perplexity(str(path), ids, window=1)


# -- per-op fallback -------------------------------------------------------------------------------


def _chain(sensitive: int, n: int = 4, k: int = 128, large: float = 2.0) -> object:
    """``x -> MatMul W0 -> ... -> MatMul W{n-1}``, Gaussian weights; ``W{sensitive}`` made sensitive (>= 1):
    ``large`` 2 breaks int4, 2000 int8 too (its step per block rounds the others to 0 at 8 bits)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for i in range(n):
        w = (rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32)
        if i == sensitive - 1:
            w[:, ::32] = 0.0  # channels 0, 32, ... of the next op's input are always 0
        if i == sensitive:  # ... and read with large weights: no effect in float, but int4's step per
            w[::32, :] = large * np.sign(rng.standard_normal((k // 32, k)))  # block rounds the others to 0
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}" if i else "x", f"W{i}"], [f"h{i + 1}" if i < n - 1 else "y"],
                                      name=f"mm{i}"))
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", k])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return ort_session(model_bytes_or_path(model)[0]).run(None, {"x": x})[0]


def _bits_by_name(model: ir.Model) -> dict[str, int]:
    """``mmI -> bits`` (0: float MatMul)."""
    out = {}
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            out[node.name.removesuffix("_nbits")] = int(node.attr("bits"))
        elif node.op_type == "MatMul":
            out[node.name] = 0
    return out


def _quantize(proto: object, options: str) -> tuple[ir.Model, object]:
    model = ir.from_onnx(proto)
    ctx = PassContext(target=targets.get("x86"))
    records = PassManager(f"quantize-weights{{{options}}}", check_modified=True).run(model, ctx)
    return model, records[0]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from([0, 4, 8]), min_size=4, max_size=4))
def test_the_fallback_switch_computes_what_the_rewrite_writes(levels: list[int]) -> None:
    """The fallback's switch model (each op's int4 / int8 forms behind If nodes), fed the flags of
    an assignment of bits, computes what the rewrite of that assignment computes."""
    from passes.quantization._candidates import find_candidates
    from passes.quantization.forms import build_switch_model, flag_feeds
    from passes.quantization.weight_only import WeightOnlyQuantizePass

    proto = _chain(sensitive=2)
    x = np.random.default_rng(3).standard_normal((8, 128)).astype(np.float32)
    wo = WeightOnlyQuantizePass()
    base = ir.from_onnx(proto)
    cands = find_candidates(base, ("MatMul",))
    switch, flags = build_switch_model(base, cands, wo._forms([4, 8]))
    assert len(flags) == 2 * len(cands)
    got = ort_session(model_bytes_or_path(switch)[0]).run(None, {
        "x": x, **flag_feeds(flags, {c.index: f"int{b}" for c, b in zip(cands, levels) if b})})[0]
    rewritten = ir.from_onnx(proto)
    wo.apply_levels(rewritten, cands, {c.index: b for c, b in zip(cands, levels)})
    assert _bits_by_name(rewritten) == {f"mm{i}": b for i, b in enumerate(levels)}
    np.testing.assert_allclose(got, _run(rewritten, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ranking", ["alone", "local"])
@pytest.mark.parametrize("sensitive", [1, 3])
def test_fallback_keeps_the_op_made_sensitive(sensitive: int, ranking: str) -> None:
    proto = _chain(sensitive)
    x = np.random.default_rng(1).standard_normal((16, 128)).astype(np.float32)
    ref = ort_session(proto.SerializeToString()).run(None, {"x": x})[0]  # type: ignore[attr-defined]

    def worst(model: ir.Model) -> float:
        return float(cosine_rows(ref.astype(np.float64), _run(model, x).astype(np.float64)).min())

    plain, _ = _quantize(proto, "bits=4")
    assert set(_bits_by_name(plain).values()) == {4}
    budget = 0.97
    assert worst(plain) < budget  # the premise: int4 everywhere breaks the budget
    model, rec = _quantize(proto, f"bits=4,min_cosine={budget},ranking={ranking}")
    bits = _bits_by_name(model)
    assert bits == {f"mm{i}": 8 if i == sensitive else 4 for i in range(4)}
    assert worst(model) >= budget
    rows = {r["name"]: r for r in rec.rows}  # type: ignore[attr-defined]
    errors = {name: r["local error int4" if ranking == "local" else "error int4"] for name, r in rows.items()}
    label = f"MatMul 'mm{sensitive}'"
    assert max(errors, key=errors.get) == label  # measured, not guessed
    assert rows[label]["decision"] == "int8"
    # float fallback: the same op, kept as a float MatMul
    model, _ = _quantize(proto, f"bits=4,min_cosine={budget},fallback=float,ranking={ranking}")
    assert _bits_by_name(model) == {f"mm{i}": 0 if i == sensitive else 4 for i in range(4)}


@pytest.mark.parametrize("ranking", ["alone", "local"])
def test_an_op_only_float_holds_goes_float_and_the_rest_stays_int4(ranking: str) -> None:
    """int8 everywhere misses the budget (one op needs float): that op goes float, and the others,
    moved to int8 on the way, go back to int4 where the budget allows (here all of them)."""
    proto = _chain(sensitive=2, large=2000.0)
    x = np.random.default_rng(1).standard_normal((16, 128)).astype(np.float32)
    ref = ort_session(proto.SerializeToString()).run(None, {"x": x})[0]  # type: ignore[attr-defined]
    budget = 0.97
    for premise in ("bits=8", "bits=4"):  # neither precision everywhere holds it
        plain, _ = _quantize(proto, premise)
        assert float(cosine_rows(ref.astype(np.float64), _run(plain, x).astype(np.float64)).min()) < budget
    model, _ = _quantize(proto, f"bits=4,min_cosine={budget},ranking={ranking}")
    assert _bits_by_name(model) == {"mm0": 4, "mm1": 4, "mm2": 0, "mm3": 4}
    assert float(cosine_rows(ref.astype(np.float64), _run(model, x).astype(np.float64)).min()) >= budget


def test_fallback_leaves_the_model_alone_when_it_already_holds() -> None:
    proto = _chain(sensitive=-1)
    model, rec = _quantize(proto, "bits=4,min_cosine=0.9")
    assert set(_bits_by_name(model).values()) == {4}
    assert [r["decision"] for r in rec.rows] == ["int4"] * 4  # type: ignore[attr-defined]


def test_an_impossible_budget_keeps_the_model_float() -> None:
    proto = _chain(sensitive=2)
    model, rec = _quantize(proto, "bits=4,min_cosine=0.9999999")
    assert not rec.modified  # type: ignore[attr-defined]
    assert set(_bits_by_name(model).values()) == {0}


def test_bad_fallback_raises() -> None:
    with pytest.raises(PassError, match="fallback"):
        _quantize(_chain(sensitive=0), "fallback=int2")


def test_compile_report_shows_the_fallback_decisions() -> None:
    """The compile report lists quantize-weights' per-op rows as it does the quantize pass's."""
    from passes.tools.compile import compile_model

    result = compile_model(ir.from_onnx(_chain(sensitive=3)), "x86", verify=False,
                           pipeline="quantize-weights{bits=4,min_cosine=0.97}")
    decisions = {q["name"]: q["decision"] for q in result.report.quantization}
    assert decisions == {f"MatMul 'mm{i}'": "int8" if i == 3 else "int4" for i in range(4)}
    text = result.report.format()
    assert "MatMul 'mm3'" in text and "int8" in text
