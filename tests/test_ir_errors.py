"""Malformed inputs raise a subclass of :class:`ir.IRError` that names the file, node or value.

Never a bare ``KeyError``, ``AttributeError``, ``ValueError`` or protobuf ``DecodeError``.
"""

from __future__ import annotations

import pathlib
import random
from typing import Any

import numpy as np
import pytest

import ir

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

F = TensorProto.FLOAT


def small_model() -> Any:
    """``y = Relu(x @ w + b)`` with a named node per op."""
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"], name="matmul"),
            helper.make_node("Add", ["xw", "b"], ["xwb"], name="add"),
            helper.make_node("Relu", ["xwb"], ["y"], name="relu"),
        ],
        "g",
        [helper.make_tensor_value_info("x", F, ["batch", 4])],
        [helper.make_tensor_value_info("y", F, ["batch", 3])],
        [
            numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w"),
            numpy_helper.from_array(np.ones(3, np.float32), "b"),
        ],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.fixture
def model_file(tmp_path: pathlib.Path) -> pathlib.Path:
    """A valid model file."""
    p = tmp_path / "ok.onnx"
    onnx.save_model(small_model(), str(p))
    ir.load(p)  # sanity: the untouched file loads
    return p


# ------------------------------------------------------------------------------------------------ #
# Files
# ------------------------------------------------------------------------------------------------ #


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.5, 0.9, 0.99])
def test_truncated_file(model_file: pathlib.Path, tmp_path: pathlib.Path, fraction: float) -> None:
    """A file cut short is a ModelLoadError naming the file."""
    data = model_file.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: max(1, int(len(data) * fraction))])
    with pytest.raises(ir.ModelLoadError, match="truncated.onnx"):
        ir.load(bad)


def test_empty_file(tmp_path: pathlib.Path) -> None:
    """An empty file is a ModelLoadError naming the file."""
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    with pytest.raises(ir.ModelLoadError, match="empty.onnx"):
        ir.load(p)


@pytest.mark.parametrize(
    "content",
    [
        b"hello, this is not a model\n",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(64)),
        b"PK\x03\x04" + b"\x00" * 100,  # a zip (e.g. a torch checkpoint)
        b'{"graph": {"node": []}}',
        bytes(random.Random(0).randrange(256) for _ in range(4096)),
    ],
    ids=["text", "png", "zip", "json", "random"],
)
def test_non_onnx_file(tmp_path: pathlib.Path, content: bytes) -> None:
    """Files of other formats are ModelLoadErrors naming the file."""
    p = tmp_path / "other.bin"
    p.write_bytes(content)
    with pytest.raises(ir.ModelLoadError, match="other.bin"):
        ir.load(p)


def test_missing_file_and_directory(tmp_path: pathlib.Path) -> None:
    """A missing path or a directory is a ModelLoadError, not an OSError."""
    with pytest.raises(ir.ModelLoadError, match="nope.onnx"):
        ir.load(tmp_path / "nope.onnx")
    with pytest.raises(ir.ModelLoadError):
        ir.load(tmp_path)


def test_not_a_model_proto() -> None:
    """from_onnx of something else than a ModelProto is a ModelLoadError."""
    with pytest.raises(ir.ModelLoadError, match="GraphProto"):
        ir.from_onnx(small_model().graph)  # type: ignore[arg-type]


def test_corrupted_bytes_never_escape_as_other_errors(model_file: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """Random byte corruption either loads or raises an IRError (never KeyError, DecodeError...)."""
    data = bytearray(model_file.read_bytes())
    rng = random.Random(1234)
    bad = tmp_path / "corrupt.onnx"
    escaped: list[str] = []
    for trial in range(300):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        bad.write_bytes(bytes(mutated))
        try:
            m = ir.load(bad)
            ir.print_model(m)
            ir.to_onnx(m)
        except ir.IRError:
            pass
        except Exception as e:  # noqa: BLE001 - this is what the test looks for
            escaped.append(f"trial {trial}: {type(e).__name__}: {e}")
    assert not escaped, "\n".join(escaped[:10])


# ------------------------------------------------------------------------------------------------ #
# Graph structure
# ------------------------------------------------------------------------------------------------ #


def test_cyclic_graph() -> None:
    """Two nodes reading each other's outputs form a cycle: CycleError naming a node on it."""
    m = small_model()
    g = m.graph
    del g.node[:]
    g.node.extend([
        helper.make_node("Add", ["x", "b_out"], ["a_out"], name="node_a"),
        helper.make_node("Relu", ["a_out"], ["b_out"], name="node_b"),
        helper.make_node("Identity", ["b_out"], ["y"], name="out"),
    ])
    with pytest.raises(ir.CycleError, match="node_a|node_b"):
        ir.from_onnx(m)


def test_self_loop() -> None:
    """A node reading its own output is a CycleError naming it."""
    m = small_model()
    m.graph.node[2].input[0] = "y"
    with pytest.raises(ir.CycleError, match="relu"):
        ir.from_onnx(m)


def test_undefined_value() -> None:
    """A node reading a name nothing defines: UndefinedValueError naming node and value."""
    m = small_model()
    m.graph.node[1].input[1] = "ghost"
    with pytest.raises(ir.UndefinedValueError, match=r"add.*ghost"):
        ir.from_onnx(m)


def test_undefined_graph_output() -> None:
    """A graph output nothing defines: UndefinedValueError naming the output."""
    m = small_model()
    m.graph.output[0].name = "phantom"
    with pytest.raises(ir.UndefinedValueError, match="phantom"):
        ir.from_onnx(m)


def test_duplicate_node_outputs() -> None:
    """Two nodes defining the same value: DuplicateNameError naming the value and the second node."""
    m = small_model()
    m.graph.node[1].output[0] = "xw"
    with pytest.raises(ir.DuplicateNameError, match=r"%xw.*add"):
        ir.from_onnx(m)


def test_duplicate_initializer_and_node_output() -> None:
    """A node output shadowing an initializer: DuplicateNameError naming the value."""
    m = small_model()
    m.graph.node[0].output[0] = "b"
    m.graph.node[1].input[0] = "b"
    with pytest.raises(ir.DuplicateNameError, match="%b"):
        ir.from_onnx(m)


def test_duplicate_graph_inputs() -> None:
    """The same graph input declared twice: DuplicateNameError naming it."""
    m = small_model()
    m.graph.input.append(helper.make_tensor_value_info("x", F, ["batch", 4]))
    with pytest.raises(ir.DuplicateNameError, match="%x"):
        ir.from_onnx(m)


def test_duplicate_initializers() -> None:
    """Two initializers with one name: DuplicateNameError naming it."""
    m = small_model()
    m.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "b"))
    with pytest.raises(ir.DuplicateNameError, match="%b"):
        ir.from_onnx(m)


# ------------------------------------------------------------------------------------------------ #
# Types and tensors
# ------------------------------------------------------------------------------------------------ #


def test_unknown_dtype_initializer() -> None:
    """An initializer with data_type 999: UnknownDTypeError naming the initializer."""
    m = small_model()
    m.graph.initializer[1].data_type = 999
    with pytest.raises(ir.UnknownDTypeError, match=r"999.*%b|%b.*999"):
        ir.from_onnx(m)


def test_unknown_dtype_graph_input() -> None:
    """A graph input of element type 999: UnknownDTypeError naming the input."""
    m = small_model()
    m.graph.input[0].type.tensor_type.elem_type = 999
    with pytest.raises(ir.UnknownDTypeError, match="%x"):
        ir.from_onnx(m)


def test_unknown_dtype_in_constant_attribute() -> None:
    """A Constant node whose tensor has data_type 999: UnknownDTypeError naming the node."""
    m = small_model()
    t = numpy_helper.from_array(np.ones(3, np.float32), "c")
    t.data_type = 999
    m.graph.node.insert(0, helper.make_node("Constant", [], ["c"], name="const_node", value=t))
    with pytest.raises(ir.UnknownDTypeError, match="const_node"):
        ir.from_onnx(m)


def test_unknown_dtype_in_value_info() -> None:
    """A value_info of element type 999: UnknownDTypeError naming the value."""
    m = small_model()
    m.graph.value_info.append(helper.make_tensor_value_info("xw", 999, None))
    with pytest.raises(ir.UnknownDTypeError, match="%xw"):
        ir.from_onnx(m)


def test_raw_data_of_wrong_size() -> None:
    """raw_data too short for the tensor's shape: IRError naming the initializer."""
    m = small_model()
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-4]
    with pytest.raises(ir.IRError, match="w"):
        ir.from_onnx(m)


def test_missing_external_data_file(tmp_path: pathlib.Path) -> None:
    """An initializer pointing at a missing data file: IRError naming the tensor and the file."""
    m = small_model()
    p = tmp_path / "ext.onnx"
    onnx.save_model(m, str(p), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    (tmp_path / "ext.data").unlink()
    with pytest.raises(ir.IRError, match=r"ext.data"):
        ir.load(p)


def test_external_data_file_too_short(tmp_path: pathlib.Path) -> None:
    """A data file shorter than the offsets it should hold: IRError naming the tensor."""
    m = small_model()
    p = tmp_path / "ext.onnx"
    onnx.save_model(m, str(p), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    data = tmp_path / "ext.data"
    data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(ir.IRError, match="'w'|'b'"):
        ir.load(p)


def test_external_data_outside_model_folder(tmp_path: pathlib.Path) -> None:
    """External data whose location escapes the model folder is refused (path traversal)."""
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"\0" * 64)
    folder = tmp_path / "model"
    folder.mkdir()
    m = small_model()
    t = m.graph.initializer[1]
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "12")):
        e = t.external_data.add()
        e.key, e.value = k, v
    p = folder / "m.onnx"
    p.write_bytes(m.SerializeToString())
    with pytest.raises(ir.IRError, match="secret.bin"):
        ir.load(p)


def test_error_classes_share_a_base() -> None:
    """Every error class is an IRError, so callers can catch one type."""
    for cls in (ir.ModelLoadError, ir.CycleError, ir.UndefinedValueError, ir.DuplicateNameError,
                ir.UnknownDTypeError, ir.UnsupportedError, ir.VerificationError):
        assert issubclass(cls, ir.IRError)


@pytest.mark.parametrize(("good", "bad"), [(b"Relu", b"Rel\xa2"), (b"matmul", b"matm\xffl")])
def test_invalid_utf8_strings(tmp_path: pathlib.Path, good: bytes, bad: bytes) -> None:
    """A name that is not UTF-8 (protobuf hands it out as bytes) is a ModelLoadError naming the field."""
    data = small_model().SerializeToString()
    assert data.count(good) == 1
    p = tmp_path / "bad_utf8.onnx"
    p.write_bytes(data.replace(good, bad))
    with pytest.raises(ir.ModelLoadError, match=r"graph\.node\[\d\].*not valid UTF-8"):
        ir.load(p)


def test_external_data_shrinking_after_load(tmp_path: pathlib.Path) -> None:
    """A data file truncated after loading: reading the tensor is an IRError, not short data."""
    p = tmp_path / "ext.onnx"
    onnx.save_model(small_model(), str(p), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    m = ir.load(p)
    data = tmp_path / "ext.data"
    data.write_bytes(data.read_bytes()[:8])
    with pytest.raises(ir.IRError, match="too short"):
        m.graph.initializers["b"].const_value.numpy()
    with pytest.raises(ir.IRError):
        ir.save(m, tmp_path / "out.onnx")
