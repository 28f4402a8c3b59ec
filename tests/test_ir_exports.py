"""Round trips of real exports: all-MiniLM-L6-v2 (real weights), tiny BERT and tiny GPT-2.

Each model goes through both torch exporters (TorchScript ``dynamo=False`` and ``dynamo=True``),
inline and with external data. For every export, ``ir.load`` → ``ir.save``:

* gives identical onnxruntime outputs (bit for bit);
* keeps node, value and initializer names, opsets and metadata (compared on the ONNX protos);
* with external data: loading does not read tensors (they stay external, nothing is decoded), and
  saving an untouched model streams the bytes (no numpy, no memory map of large tensors).
"""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import ir
from ir import _tensor as tensor_mod

onnx = pytest.importorskip("onnx")

pytestmark = pytest.mark.slow

ARCHS = ("minilm", "bert", "gpt2")
EXPORTERS = (False, True)
VARIANTS = [
    pytest.param(arch, dynamo, ext, id=f"{arch}-{'dynamo' if dynamo else 'script'}{'-ext' if ext else ''}")
    for arch in ARCHS
    for dynamo in EXPORTERS
    for ext in (False, True)
]


# ------------------------------------------------------------------------------------------------ #
# Helpers
# ------------------------------------------------------------------------------------------------ #


def _external_count(path: pathlib.Path) -> int:
    proto = onnx.load(str(path), load_external_data=False)
    return sum(1 for t in _all_tensors(proto.graph) if t.data_location == onnx.TensorProto.EXTERNAL)


def _all_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _all_tensors(a.g)
            for g in a.graphs:
                yield from _all_tensors(g)


def _names(path: pathlib.Path) -> dict[str, Any]:
    """Names and interface facts of a saved model, read with onnx (data left on disk)."""
    p = onnx.load(str(path), load_external_data=False)
    g = p.graph
    values = {v for n in g.node for v in (*n.input, *n.output) if v}
    values |= {v.name for v in (*g.input, *g.output)}
    return {
        "nodes": sorted(n.name for n in g.node),
        "node_ops": [(n.name, n.domain, n.op_type) for n in g.node],
        "values": values,
        "initializers": {t.name for t in g.initializer},
        "inputs": [_canon(v) for v in g.input],
        "outputs": [_canon(v) for v in g.output],
        # value_info of initializers repeats the tensor's own type; the IR does not keep it.
        "value_info": {v.name: _canon(v) for v in g.value_info if v.name not in {t.name for t in g.initializer}},
        "opsets": sorted((o.domain, o.version) for o in p.opset_import),
        "functions": sorted((f.domain, f.name) for f in p.functions),
        "metadata": sorted((m.key, m.value) for m in p.metadata_props),
        "producer": (p.producer_name, p.producer_version, p.ir_version),
    }


def _canon(msg: Any) -> bytes:
    """Serialized ``msg`` with fields that hold their default value cleared (set-but-empty == unset)."""
    m = type(msg)()
    m.CopyFrom(msg)

    def clear(x: Any) -> None:
        for fd, val in list(x.ListFields()):
            if fd.message_type is not None:
                for sub in val if fd.is_repeated else [val]:
                    clear(sub)
            elif not fd.is_repeated and val == fd.default_value:
                x.ClearField(fd.name)

    clear(m)
    return m.SerializeToString(deterministic=True)


def _source(exported: Callable[..., pathlib.Path], arch: str, dynamo: bool, ext: bool, tmp: pathlib.Path
             ) -> pathlib.Path:
    """The export to round-trip; external-data variants always hold their weights externally.

    MiniLM uses the exporter's own external data. The TorchScript exporter ignores
    ``external_data`` (a dynamo-only option of ``torch.onnx.export``), and the tiny models would
    cost one more export each, so for those the inline export is re-saved with onnx's external-data
    helpers.
    """
    path = exported(arch, dynamo=dynamo, external_data=ext and arch == "minilm")
    if not ext or _external_count(path) > 0:
        return path
    proto = onnx.load(str(path))
    out = tmp / "src" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    assert _external_count(out) > 0
    return out


class _NoNumpy:
    """Forbid decoding tensors to numpy, and record which external tensors get memory-mapped."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mapped: list[tuple[str, int]] = []
        real_raw = tensor_mod.Tensor.raw_bytes

        def forbidden(self_: Any, *a: Any, **k: Any) -> Any:
            raise AssertionError(f"tensor {self_.name!r} was decoded through numpy")

        def raw_bytes(t: Any) -> Any:
            if t.external is not None:
                self.mapped.append((t.name, t.nbytes))
            return real_raw(t)

        monkeypatch.setattr(tensor_mod.Tensor, "numpy", forbidden)
        monkeypatch.setattr(tensor_mod.Tensor, "_decode", forbidden)
        monkeypatch.setattr(tensor_mod.Tensor, "_encode", forbidden)
        monkeypatch.setattr(tensor_mod.Tensor, "raw_bytes", raw_bytes)


def _external_tensors(model: ir.Model) -> dict[str, ir.Tensor]:
    return {
        name: v.const_value
        for g in model.graph.all_graphs()
        for name, v in g.initializers.items()
        if v.const_value is not None and v.const_value.external is not None
    }


# ------------------------------------------------------------------------------------------------ #
# Tests
# ------------------------------------------------------------------------------------------------ #


@pytest.mark.parametrize(("arch", "dynamo", "ext"), VARIANTS)
def test_load_save_round_trip(
    arch: str, dynamo: bool, ext: bool, exported: Callable[..., pathlib.Path], ort_session: Callable[..., Any],
    feeds_for: Callable[..., dict[str, np.ndarray]], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """load → save keeps outputs bit-identical and every name; external data is never decoded."""
    src = _source(exported, arch, dynamo, ext, tmp_path)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()

    guard = _NoNumpy(monkeypatch)
    model = ir.load(src)
    ir.verify(model)
    external = _external_tensors(model)
    if ext:
        assert external, "an external-data export lowered with no external tensor"
        assert not guard.mapped, f"ir.load read external tensors: {guard.mapped[:5]}"
        assert all(not t.is_loaded for t in external.values())
    ir.save(model, out, external_data=ext)
    if ext:
        # Only tensors under save's size threshold are read (to be inlined); the rest is streamed.
        assert all(nbytes < 1024 for _, nbytes in guard.mapped), f"large tensors were read: {guard.mapped[:5]}"
        assert all(t.external is not None and not t.is_loaded for t in external.values())
        assert (out.parent / "model.onnx.data").is_file()
        assert _external_count(out) > 0
    else:
        assert _external_count(out) == 0
    monkeypatch.undo()

    assert _names(out) == _names(src)

    feeds = feeds_for(arch)
    a, b = ort_session(src), ort_session(out)
    in_names = [i.name for i in a.get_inputs()]
    assert in_names == [i.name for i in b.get_inputs()]
    used = {k: v for k, v in feeds.items() if k in in_names}
    ref, got = a.run(None, used), b.run(None, used)
    assert len(ref) == len(got)
    for r, g in zip(ref, got):
        assert r.dtype == g.dtype and r.shape == g.shape
        assert np.array_equal(r, g), "outputs differ after ir.load → ir.save"
    assert np.isfinite(ref[0]).all()


@pytest.mark.parametrize(("arch", "dynamo"), [(a, d) for a in ARCHS for d in EXPORTERS])
def test_text_form_is_stable(arch: str, dynamo: bool, exported: Callable[..., pathlib.Path],
                             tmp_path: pathlib.Path) -> None:
    """The text form of a real export is deterministic and survives save → load (with external data)."""
    src = exported(arch, dynamo=dynamo)
    text = ir.print_model(ir.load(src))
    assert "0x" not in text.split("\n", 1)[0]
    assert text == ir.print_model(ir.load(src))
    out = tmp_path / "m.onnx"
    ir.save(ir.load(src), out, external_data=True)
    assert text == ir.print_model(ir.load(out))


def test_external_save_of_modified_model(exported: Callable[..., pathlib.Path], ort_run: Callable[..., Any],
                                         feeds_for: Callable[..., dict[str, np.ndarray]],
                                         tmp_path: pathlib.Path) -> None:
    """A tensor replaced by numpy data is written from numpy; untouched ones are still streamed."""
    src = exported("bert", dynamo=True, external_data=True)
    model = ir.load(src)
    ext = _external_tensors(model)
    assert ext
    name, t = max(ext.items(), key=lambda kv: kv[1].nbytes)
    value = model.graph.initializers[name]
    value.const_value = ir.Tensor(np.zeros(t.shape, t.dtype.numpy()), dtype=t.dtype, name=name)
    out = tmp_path / "zeroed.onnx"
    ir.save(model, out, external_data=True)
    reloaded = ir.load(out)
    assert not np.any(reloaded.graph.initializers[name].const_value.numpy())
    others = [n for n in ext if n != name]
    for n in others[:5]:
        assert np.array_equal(reloaded.graph.initializers[n].const_value.numpy(), ext[n].numpy())
    feeds = feeds_for("bert")
    assert ort_run(out, feeds)  # still a valid model


def test_dynamo_exporter_writes_external_data(exported: Callable[..., pathlib.Path]) -> None:
    """The dynamo exporter honours ``external_data=True`` (the layout the tests above rely on)."""
    path = exported("minilm", dynamo=True, external_data=True)
    assert _external_count(path) > 0
    assert (path.parent / "model.onnx.data").is_file()


def test_torchscript_exporter_writes_external_data(exported: Callable[..., pathlib.Path]) -> None:
    """``export(..., dynamo=False, external_data=True)`` should store the weights in ``model.onnx.data``."""
    path = exported("bert", dynamo=False, external_data=True)
    assert _external_count(path) > 0


def test_save_is_atomic_on_failure(exported: Callable[..., pathlib.Path], tmp_path: pathlib.Path) -> None:
    """A save that fails half-way leaves the previous file intact and no temporary files behind."""
    src = exported("bert", dynamo=True, external_data=True)
    work = tmp_path / "w"
    work.mkdir()
    for f in src.parent.iterdir():
        shutil.copy(f, work / f.name)
    model = ir.load(work / "model.onnx")
    out = tmp_path / "o" / "model.onnx"
    out.parent.mkdir()
    ir.save(model, out, external_data=True)
    before = out.read_bytes()
    # Truncate the source data file: streaming it must fail, and the earlier save must survive.
    data = work / "model.onnx.data"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with pytest.raises(ir.IRError):
        ir.save(model, out, external_data=True)
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
