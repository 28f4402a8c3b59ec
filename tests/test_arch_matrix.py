"""The architecture matrix: every zoo family × both exporters, compiled for x86.

For each export (:mod:`passes.tools.zoo`, built once per session by the ``zoo_exported`` fixture)
the compiled model must match torch on the non-padded positions of a padded batch of 2 (max abs
≤ 1e-4, or 1e-6 relative to the outputs' magnitude when that is larger), pass the compiler's own
verification, give every Softmax left unfused an ``--explain`` line, and reach exactly the fused
op counts recorded in :data:`TODAY` — a regression fails, and so does an improvement until the
table is updated. The architecture's full expectation (:class:`passes.tools.zoo.Blocks`) is
printed next to the recorded counts, so the gap is visible in every failure and in
``python tests/test_arch_matrix.py`` (a table of both).

TorchScript exports take ~2 s each and run by default (the 37 cases: 2 min 10 s with ``-n 2`` on
2 shared cores); the dynamo half (~25 s an export: 12 min 17 s with ``-n 2``) is ``slow``.
"""

from __future__ import annotations

import pytest

from passes.tools import zoo

KINDS = tuple(zoo.FUSED_OPS)  # attention, norm, activation, rotary

#: Fused op counts (attention, norm, activation, rotary) of the whole 2-layer model that the
#: compiler reaches today, per exporter. A string: the export itself fails (xfail, with why).
TODAY: dict[str, dict[str, tuple[int, int, int, int] | str]] = {
    "bert": {"script": (2, 5, 2, 0), "dynamo": (2, 5, 2, 0)},  # allows (2, 5, 2, 0)
    "roberta": {"script": (2, 5, 2, 0), "dynamo": (2, 5, 2, 0)},  # allows (2, 5, 2, 0)
    "distilbert": {"script": (2, 5, 2, 0), "dynamo": (2, 5, 2, 0)},  # allows (2, 5, 2, 0)
    "albert": {"script": (2, 5, 2, 0), "dynamo": (2, 5, 2, 0)},  # allows (2, 5, 2, 0)
    "electra": {"script": (2, 5, 2, 0), "dynamo": (2, 5, 2, 0)},  # allows (2, 5, 2, 0)
    "deberta-v2": {"script": (0, 5, 2, 0), "dynamo": (0, 5, 2, 0)},  # allows (0, 6, 2, 0)
    "xlm-roberta": {"script": (2, 5, 2, 0), "dynamo": (2, 5, 2, 0)},  # allows (2, 5, 2, 0)
    "mpnet": {"script": (2, 5, 2, 0), "dynamo": (2, 5, 2, 0)},  # allows (2, 5, 2, 0)
    "roformer": {"script": (2, 5, 2, 4), "dynamo": (2, 5, 2, 4)},  # allows (2, 5, 2, 4)
    "esm": {"script": (2, 5, 2, 4), "dynamo": (2, 5, 2, 4)},  # allows (2, 5, 2, 4)
    "modernbert": {"script": (2, 5, 2, 4), "dynamo": (2, 5, 2, 4)},  # allows (2, 5, 2, 4)
    "nomic-bert": {"script": (2, 5, 2, 4), "dynamo": (2, 5, 2, 4)},  # allows (2, 5, 2, 4)
    "gpt2": {"script": (2, 5, 2, 0), "dynamo": (2, 5, 2, 0)},  # allows (2, 5, 2, 0)
    "gpt-neo": {"script": (2, 5, 2, 0), "dynamo": (2, 5, 2, 0)},  # allows (2, 5, 2, 0)
    "gpt-j": {"script": (2, 3, 2, 4), "dynamo": (2, 3, 2, 4)},  # allows (2, 3, 2, 4)
    "gpt-neox": {"script": (2, 5, 2, 4), "dynamo": (2, 5, 2, 4)},  # allows (2, 5, 2, 4)
    "llama": {"script": (2, 5, 2, 4), "dynamo": (2, 5, 2, 4)},  # allows (2, 5, 2, 4)
    "mistral": {"script": (2, 5, 2, 4), "dynamo": (2, 5, 2, 4)},  # allows (2, 5, 2, 4)
    "qwen2": {"script": (2, 5, 2, 4), "dynamo": (2, 5, 2, 4)},  # allows (2, 5, 2, 4)
    "qwen3": {"script": (2, 9, 2, 4), "dynamo": (2, 9, 2, 4)},  # allows (2, 9, 2, 4)
    "phi": {"script": (2, 3, 2, 4), "dynamo": (2, 3, 2, 4)},  # allows (2, 3, 2, 4)
    "phi3": {"script": (2, 5, 2, 4), "dynamo": (2, 5, 2, 4)},  # allows (2, 5, 2, 4)
    "gemma": {"script": (2, 5, 2, 4), "dynamo": (2, 5, 2, 4)},  # allows (2, 5, 2, 4)
    "gemma2": {"script": (0, 9, 2, 4), "dynamo": (0, 9, 2, 4)},  # allows (2, 9, 2, 4)
    "stablelm": {"script": (2, 5, 2, 4), "dynamo": (2, 5, 2, 4)},  # allows (2, 5, 2, 4)
    "falcon": {"script": (2, 3, 2, 4), "dynamo": (2, 3, 2, 4)},  # allows (2, 3, 2, 4)
    "bloom": {"script": (2, 6, 2, 0), "dynamo": (2, 6, 2, 0)},  # allows (2, 6, 2, 0)
    "mpt": {"script": (2, 5, 2, 0), "dynamo": (2, 5, 2, 0)},  # allows (2, 5, 2, 0)
    "opt": {"script": (2, 5, 0, 0), "dynamo": (2, 5, 0, 0)},  # allows (2, 5, 0, 0)
    "codegen": {"script": (2, 3, 2, 4), "dynamo": (2, 3, 2, 4)},  # allows (2, 3, 2, 4)
    "olmo2": {"script": (2, 9, 2, 4), "dynamo": (2, 9, 2, 4)},  # allows (2, 9, 2, 4)
    "vit": {"script": (2, 5, 2, 0), "dynamo": (2, 5, 2, 0)},  # allows (2, 5, 2, 0)
    "dinov2": {"script": (2, 5, 2, 0), "dynamo": (2, 5, 2, 0)},  # allows (2, 5, 2, 0)
    "clip-vision": {"script": (2, 5, 2, 0), "dynamo": (2, 5, 2, 0)},  # allows (2, 5, 2, 0)
    "swin": {"script": (2, 7, 2, 0), "dynamo": (2, 7, 2, 0)},  # allows (2, 7, 2, 0)
    "clip-text": {"script": (2, 5, 2, 0), "dynamo": (2, 5, 2, 0)},  # allows (2, 5, 2, 0)
    "t5-encoder": {"script": (2, 5, 0, 0), "dynamo": (2, 5, 0, 0)},  # allows (2, 5, 0, 0)
}

CASES = [
    pytest.param(name, exporter, id=f"{name}-{exporter}", marks=[pytest.mark.slow] if exporter == "dynamo" else [])
    for name in zoo.names() for exporter in ("script", "dynamo")
]


def _gap(name: str, got: tuple[int, ...]) -> str:
    arch = zoo.get(name)
    full = arch.expect.total(arch.layers)
    return (f"{name}: fused {dict(zip(KINDS, got))}; the architecture allows {full} "
            f"({arch.expect.notes or 'standard blocks'})")


def test_zoo_covers_the_families():
    kinds = {a.kind for a in zoo.ARCHS}
    assert len(zoo.ARCHS) >= 25 and kinds == {"encoder", "decoder", "vision"}
    assert {a.inputs for a in zoo.ARCHS} == {"text", "pixels"}
    assert set(TODAY) == set(zoo.names())
    for a in zoo.ARCHS:
        assert a.layers == 2 and a.expect.attention in (0, 1), a.name


@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_arch(zoo_exported, name: str, exporter: str):
    today = TODAY[name][exporter]
    if isinstance(today, str):
        pytest.xfail(today)
    m = zoo.measure(zoo_exported(name, dynamo=exporter == "dynamo"))
    assert m.verified is not False, f"{name}: the compiler's verification failed"
    assert m.numerics_ok, f"{name}: max abs {m.max_abs:.3g} against torch (outputs up to {m.scale:.3g})"
    assert not m.unexplained, f"{name}: Softmax left unfused without an --explain line: {m.unexplained}"
    got = tuple(m.counts[k] for k in KINDS)
    assert got == today, f"recorded {dict(zip(KINDS, today))}; now {_gap(name, got)}"


# The fixes found with the matrix, each pinned on the export that showed it.

def test_vision_probe_uses_the_models_own_shapes(zoo_exported):
    """A ``pixel_values`` encoder: the probe feeds the patch count, not a text sequence length."""
    m = zoo.measure(zoo_exported("vit"))
    assert m.counts["attention"] == 2, m.explain
    assert not any("probe failed" in line for line in m.explain)


def test_one_input_concat_of_an_empty_cache(zoo_exported):
    """A base decoder exported with ``use_cache`` on: K/V pass through a one-input Concat."""
    assert zoo.measure(zoo_exported("qwen2")).counts["attention"] == 2


def _fused_layers(folder):
    from passes import compile_model

    result = compile_model(str(folder / "model.onnx"), "x86", verify=False)
    return [n for n in result.model.graph if n.op_type in ("Attention", "MultiHeadAttention")]


def test_sliding_window_is_fused_as_a_bias_not_as_causal(zoo_exported):
    """Mistral with a window of 8: the probe's sequences (≤ 7) hide it; a longer probe finds it,
    and the window mask becomes the op's attention_bias (not ``unidirectional``)."""
    folder = zoo_exported("mistral")
    m = zoo.measure(folder)
    assert m.numerics_ok and m.counts["attention"] == 2, m.explain
    for node in _fused_layers(folder):
        assert len(node.inputs) > 5 and node.inputs[5] is not None and not node.attr("unidirectional"), node


def test_banded_mask_buffer_is_probed_to_its_length(zoo_exported):
    """GPT-Neo: layer 0 is global (causal), layer 1 slices a banded buffer (window 8): its Where on
    the buffer becomes an attention_bias, checked at a length past the window."""
    folder = zoo_exported("gpt-neo")
    m = zoo.measure(folder)
    assert m.numerics_ok and m.counts["attention"] == 2, m.explain
    ops = sorted((n.op_type, bool(n.attr("unidirectional"))) for n in _fused_layers(folder))
    assert ops == [("Attention", True), ("MultiHeadAttention", False)], ops


def _window_model(with_band: bool):
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    import ir

    inits = [numpy_helper.from_array(np.zeros((1000, 64), np.float32), "table"),
             numpy_helper.from_array(np.array(8, np.int64), "eight")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("Sub", ["i", "eight"], ["w"])]
    outs = [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, [2, 4, 64]),
            helper.make_tensor_value_info("w", onnx.TensorProto.INT64, [1])]
    if with_band:
        inits += [numpy_helper.from_array(np.zeros((1, 1, 16, 16), bool), "band")]
        inits += [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("zero", 0), ("four", 4), ("ax", 2))]
        nodes.append(helper.make_node("Slice", ["band", "zero", "four", "ax"], ["b"]))
        outs.append(helper.make_tensor_value_info("b", onnx.TensorProto.BOOL, [1, 1, 4, 16]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 4]),
                                           helper.make_tensor_value_info("i", onnx.TensorProto.INT64, [1])],
                              outs, inits)
    return ir.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_window_length_reads_offsets_and_square_buffers_not_embeddings():
    """What the long probe's length is read from: an offset constant or a square mask buffer, not a
    [vocab, hidden] table (a real Llama's 4096 would refuse every layer)."""
    from passes.fusions._attention_check import _window_length

    assert _window_length(_window_model(with_band=True)) == 16
    assert _window_length(_window_model(with_band=False)) == 8


if __name__ == "__main__":  # the gap table, from a fresh set of exports
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for name in zoo.names():
            for exporter in ("script", "dynamo"):
                folder = zoo.export_arch(name, f"{d}/{name}-{exporter}", dynamo=exporter == "dynamo").parent
                m = zoo.measure(folder)
                print(_gap(name, tuple(m.counts[k] for k in KINDS)), f"[{exporter}, max abs {m.max_abs:.1e}]")
                sys.stdout.flush()
