"""Fuzzing real exports: a damaged model ends in one clear line, never a traceback.

Each case takes a real small export (a decoder and an encoder, from both torch exporters), damages
it at the protobuf level the way files get damaged or hand-edited (:data:`MUTATIONS`: a rewired
input, a deleted node, a changed op type, a bad or unknown attribute, a cycle, an initializer of
the wrong dims or dtype, two producers of one value, a dropped input, truncated files,
protobuf-valid garbage, huge dims, negative axes, an empty graph, NaN weights, zero-size tensors,
duplicate names, a > 2 GB model whose external data file is missing...) and runs the CLI's
``main`` in process. Every case must end in one of three ways (:func:`check_outcome`):

* exit 0, the verified model written;
* exit 1, "outside tolerance" on stderr, nothing written;
* exit 2, exactly one line on stderr, nothing written.

Never a traceback, never exit 3 (an internal error), never a half-written file.

The fixed-seed set below runs in the normal suite (it needs the exports, so it is ``slow``);
``benchmarks/fuzz_models.py`` runs the same cases for longer with fresh seeds and prints the
outcome breakdown.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import AttributeProto, TensorProto, helper, numpy_helper

ROOT = pathlib.Path(__file__).resolve().parents[1]

Draw = Callable[[st.SearchStrategy[Any]], Any]

#: The exports every case starts from: ``(arch, dynamo)``.
BASES = [("gpt2", False), ("gpt2", True), ("bert", False), ("bert", True)]


@dataclass
class Case:
    """A damaged model: the bytes of ``model.onnx`` and other files to put beside it."""

    data: bytes
    files: dict[str, bytes] = field(default_factory=dict)
    what: str = ""


# --------------------------------------------------------------------------------------------- #
# Mutations. Each takes a copy of the model and a hypothesis ``draw``, damages the model in place
# and returns a description, or returns a whole Case (for byte-level damage and extra files).
# --------------------------------------------------------------------------------------------- #

Mutation = Callable[[onnx.ModelProto, Draw], "str | Case"]
MUTATIONS: dict[str, Mutation] = {}


def mutation(fn: Mutation) -> Mutation:
    MUTATIONS[fn.__name__.removeprefix("m_").replace("_", "-")] = fn
    return fn


def _node(m: onnx.ModelProto, draw: Draw, pred: Callable[[onnx.NodeProto], bool] = lambda n: True) -> int:
    idx = [i for i, n in enumerate(m.graph.node) if pred(n)]
    if not idx:
        idx = list(range(len(m.graph.node)))
    return draw(st.sampled_from(idx))


def _defined(m: onnx.ModelProto) -> list[str]:
    names = [v.name for v in m.graph.input] + [t.name for t in m.graph.initializer]
    names += [o for n in m.graph.node for o in n.output if o]
    return names


def _label(n: onnx.NodeProto) -> str:
    return f"{n.op_type} {n.name or (n.output[0] if n.output else '?')!r}"


def _descendants(m: onnx.ModelProto, i: int) -> list[int]:
    """Indices of the nodes that (transitively) read an output of node ``i``, ``i`` included."""
    readers: dict[str, list[int]] = {}
    for k, n in enumerate(m.graph.node):
        for name in n.input:
            readers.setdefault(name, []).append(k)
    out, stack = {i}, [i]
    while stack:
        for name in m.graph.node[stack.pop()].output:
            for k in readers.get(name, ()):
                if k not in out:
                    out.add(k)
                    stack.append(k)
    return sorted(out)


def _initializer(m: onnx.ModelProto, draw: Draw, pred: Callable[[TensorProto], bool] = lambda t: True) -> TensorProto:
    ts = [t for t in m.graph.initializer if pred(t)] or list(m.graph.initializer)
    return draw(st.sampled_from(ts))


def _is_float(t: TensorProto) -> bool:
    return t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


@mutation
def m_untouched(m: onnx.ModelProto, draw: Draw) -> str:
    """No damage: the base itself must compile (exit 0) through the same harness."""
    return "as exported"


@mutation
def m_rewire_input(m: onnx.ModelProto, draw: Draw) -> str:
    i = _node(m, draw, lambda n: any(n.input))
    n = m.graph.node[i]
    k = draw(st.sampled_from([k for k, x in enumerate(n.input) if x] or [0]))
    new = draw(st.sampled_from(_defined(m)))
    if not n.input:
        n.input.append(new)
    else:
        n.input[k] = new
    return f"{_label(n)} input {k} -> {new}"


@mutation
def m_delete_node(m: onnx.ModelProto, draw: Draw) -> str:
    i = _node(m, draw)
    n = m.graph.node[i]
    del m.graph.node[i]
    return f"deleted {_label(n)}"


OP_TYPES = ["Relu", "Add", "MatMul", "Softmax", "Concat", "Reshape", "Gather", "Conv", "Loop", "If", "Identity",
            "Transpose", "Cast", "LayerNormalization", "Expand", "Split", "NoSuchOp", "Attention", "Einsum"]


@mutation
def m_change_op_type(m: onnx.ModelProto, draw: Draw) -> str:
    n = m.graph.node[_node(m, draw)]
    old = n.op_type
    n.op_type = draw(st.sampled_from(sorted({*OP_TYPES, *(x.op_type for x in m.graph.node)})))
    return f"{_label(n)} was {old}"


@mutation
def m_invalid_attribute(m: onnx.ModelProto, draw: Draw) -> str:
    n = m.graph.node[_node(m, draw, lambda n: len(n.attribute) > 0)]
    if not n.attribute:
        return "no attribute"
    a = draw(st.sampled_from(list(n.attribute)))
    how = draw(st.sampled_from(["type", "value", "drop", "empty"]))
    if how == "type":  # the same name, another kind
        kind = draw(st.sampled_from(["s", "f", "ints", "t"]))
        new = {"s": lambda: helper.make_attribute(a.name, "bad"), "f": lambda: helper.make_attribute(a.name, 0.5),
               "ints": lambda: helper.make_attribute(a.name, [1, 2]),
               "t": lambda: helper.make_attribute(a.name, numpy_helper.from_array(np.zeros(2, np.float32)))}[kind]()
        a.CopyFrom(new)
    elif how == "value":
        if a.type == AttributeProto.INT:
            a.i = draw(st.sampled_from([99, -99, 2**40, 10_000]))
        elif a.type == AttributeProto.INTS:
            a.ints[:] = draw(st.sampled_from([[99], [-99, 0], [], [2**40]]))
        elif a.type == AttributeProto.FLOAT:
            a.f = draw(st.sampled_from([float("nan"), float("inf"), -1e38]))
        elif a.type == AttributeProto.STRING:
            a.s = b"no-such-mode"
        elif a.type == AttributeProto.TENSOR:
            a.t.dims[:] = [*a.t.dims, 3]
    elif how == "drop":
        n.attribute.remove(a)
    else:  # a declared kind with no value
        a.Clear()
        a.name = n.attribute[0].name if n.attribute else "axis"
        a.type = AttributeProto.INT if draw(st.booleans()) else AttributeProto.UNDEFINED
    return f"{_label(n)} attribute {a.name!r}: {how}"


@mutation
def m_add_attribute(m: onnx.ModelProto, draw: Draw) -> str:
    n = m.graph.node[_node(m, draw)]
    name = draw(st.sampled_from(["axis", "bogus", "alpha", "perm", "to", "keepdims", "value"]))
    if any(a.name == name for a in n.attribute):
        name += "_x"
    n.attribute.append(helper.make_attribute(name, draw(st.sampled_from([1, 0.5, "s", [0, 1]]))))
    return f"{_label(n)} +{name}"


@mutation
def m_cycle(m: onnx.ModelProto, draw: Draw) -> str:
    i = _node(m, draw, lambda n: any(n.input) and len(n.output) > 0)
    n = m.graph.node[i]
    j = draw(st.sampled_from(_descendants(m, i)))
    later = m.graph.node[j]
    k = draw(st.sampled_from([k for k, x in enumerate(n.input) if x] or [0]))
    if not n.input or not later.output:
        return "no input"
    n.input[k] = later.output[0]
    return f"{_label(n)} input {k} reads {later.output[0]} of {_label(later)}"


@mutation
def m_initializer_dims(m: onnx.ModelProto, draw: Draw) -> str:
    t = _initializer(m, draw)
    dims = list(t.dims)
    how = draw(st.sampled_from(["reverse", "append", "grow", "shrink", "drop"]))
    if how == "reverse":
        dims.reverse()
    elif how == "append":
        dims.append(1)
    elif how == "grow":
        dims = [*dims[:-1], (dims[-1] if dims else 1) + 1]
    elif how == "shrink":
        dims = [*dims[:-1], max(0, (dims[-1] if dims else 1) - 1)]
    else:
        dims = dims[1:]
    t.dims[:] = dims
    return f"initializer {t.name} dims {how} -> {dims}"


DTYPES = [TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.FLOAT16, TensorProto.BOOL,
          TensorProto.UINT8, TensorProto.DOUBLE, TensorProto.STRING, 0, 99]


@mutation
def m_initializer_dtype(m: onnx.ModelProto, draw: Draw) -> str:
    t = _initializer(m, draw)
    t.data_type = draw(st.sampled_from([d for d in DTYPES if d != t.data_type]))
    return f"initializer {t.name} dtype -> {t.data_type}"


@mutation
def m_two_producers(m: onnx.ModelProto, draw: Draw) -> str:
    i = _node(m, draw, lambda n: len(n.output) > 0)
    j = _node(m, draw, lambda n: len(n.output) > 0)
    a, b = m.graph.node[i], m.graph.node[j]
    if i == j:
        b.output.append(a.output[0])
    else:
        b.output[0] = a.output[0]
    return f"{_label(b)} also writes {a.output[0]}"


@mutation
def m_drop_input(m: onnx.ModelProto, draw: Draw) -> str:
    n = m.graph.node[_node(m, draw, lambda n: len(n.input) > 0)]
    if draw(st.booleans()) and len(n.input):
        del n.input[-1]
        return f"{_label(n)} lost its last input"
    if len(n.input):
        n.input[0] = ""  # an omitted (optional-style) input where a required one goes
    return f"{_label(n)} input 0 omitted"


@mutation
def m_drop_graph_input(m: onnx.ModelProto, draw: Draw) -> str:
    k = draw(st.integers(0, len(m.graph.input) - 1))
    name = m.graph.input[k].name
    del m.graph.input[k]
    return f"graph input {name} dropped"


@mutation
def m_truncate(m: onnx.ModelProto, draw: Draw) -> Case:
    data = m.SerializeToString()
    k = draw(st.integers(0, len(data) - 1))
    return Case(data[:k], what=f"truncated to {k} of {len(data)} bytes")


@mutation
def m_garbage(m: onnx.ModelProto, draw: Draw) -> Case:
    how = draw(st.sampled_from(["other-message", "random-model", "random-bytes", "flipped-bytes", "empty-file"]))
    if how == "other-message":  # valid protobuf of another message type
        which = draw(st.sampled_from(["graph", "node", "tensor"]))
        msg = {"graph": m.graph, "node": m.graph.node[0], "tensor": m.graph.initializer[0]}[which]
        return Case(msg.SerializeToString(), what=f"a {which} message")
    if how == "random-model":
        names = st.text("abcxyz_", min_size=0, max_size=3)
        nodes = []
        for _ in range(draw(st.integers(0, 5))):
            nodes.append(helper.make_node(
                draw(st.sampled_from([*OP_TYPES, ""])), draw(st.lists(names, max_size=3)),
                draw(st.lists(names, max_size=2)), name=draw(names),
                domain=draw(st.sampled_from(["", "", "com.microsoft", "x.y"])),
            ))
        g = helper.make_graph(
            nodes, draw(names),
            [helper.make_tensor_value_info(x, draw(st.sampled_from([1, 7, 0, 99])), draw(st.sampled_from([None, [2], ["n", 0]])))
             for x in draw(st.lists(names, max_size=3))],
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in draw(st.lists(names, max_size=2))],
        )
        opsets = [helper.make_opsetid(d, v) for d, v in draw(st.lists(
            st.tuples(st.sampled_from(["", "ai.onnx", "com.microsoft", "x.y"]), st.integers(-1, 30)), max_size=3))]
        model = helper.make_model(g, opset_imports=opsets)
        model.ir_version = draw(st.integers(-1, 12))
        return Case(model.SerializeToString(), what="a random model")
    if how == "random-bytes":
        return Case(draw(st.binary(min_size=1, max_size=256)), what="random bytes")
    if how == "flipped-bytes":
        data = bytearray(m.SerializeToString())
        for _ in range(draw(st.integers(1, 20))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return Case(bytes(data), what="flipped bits")
    return Case(b"", what="an empty file")


@mutation
def m_huge_dims(m: onnx.ModelProto, draw: Draw) -> str:
    how = draw(st.sampled_from(["input", "initializer", "shape-constant"]))
    huge = draw(st.sampled_from([2**40, 2**62, 10**15]))
    if how == "input":
        vi = draw(st.sampled_from(list(m.graph.input)))
        d = vi.type.tensor_type.shape.dim[draw(st.integers(0, len(vi.type.tensor_type.shape.dim) - 1))]
        d.dim_value = huge
        return f"input {vi.name} dim {huge}"
    if how == "initializer":
        t = _initializer(m, draw)
        t.dims[:] = [huge, *t.dims[1:]]
        return f"initializer {t.name} dims {list(t.dims)}"
    ints = [t for t in m.graph.initializer if t.data_type == TensorProto.INT64 and len(t.dims) == 1]
    consts = [n for n in m.graph.node if n.op_type == "Constant" and n.attribute
              and n.attribute[0].t.data_type == TensorProto.INT64 and len(n.attribute[0].t.dims) == 1]
    targets = [("init", t) for t in ints] + [("const", n) for n in consts]
    if not targets:
        return "no int64 vector"
    kind, obj = draw(st.sampled_from(targets))
    t = obj if kind == "init" else obj.attribute[0].t
    arr = numpy_helper.to_array(t).copy()
    if arr.size:
        arr[draw(st.integers(0, arr.size - 1))] = huge
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return f"int64 vector {t.name or obj.name} -> {arr.tolist()}"


@mutation
def m_negative_axes(m: onnx.ModelProto, draw: Draw) -> str:
    n = m.graph.node[_node(m, draw, lambda n: any(a.name in ("axis", "axes", "perm") for a in n.attribute))]
    a = next((a for a in n.attribute if a.name in ("axis", "axes", "perm")), None)
    if a is None:
        return "no axis"
    v = draw(st.sampled_from([-1, -2, -5, -100]))
    if a.type == AttributeProto.INT:
        a.i = v
    else:
        a.ints[:] = [v] * max(1, len(a.ints))
    return f"{_label(n)} {a.name} = {v}"


@mutation
def m_empty_graph(m: onnx.ModelProto, draw: Draw) -> str:
    how = draw(st.sampled_from(["no-nodes", "no-outputs", "nothing"]))
    del m.graph.node[:]
    if how != "no-nodes":
        del m.graph.output[:]
    if how == "nothing":
        del m.graph.input[:]
        del m.graph.initializer[:]
    return how


@mutation
def m_nan_weights(m: onnx.ModelProto, draw: Draw) -> str:
    t = _initializer(m, draw, _is_float)
    if not _is_float(t):
        return "no float initializer"
    arr = numpy_helper.to_array(t).copy()
    bad = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if draw(st.booleans()) or arr.size < 2:
        arr[...] = bad
    else:
        arr.reshape(-1)[draw(st.integers(0, arr.size - 1))] = bad
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return f"initializer {t.name} holds {bad}"


@mutation
def m_zero_size(m: onnx.ModelProto, draw: Draw) -> str:
    if draw(st.booleans()):
        t = _initializer(m, draw)
        arr = numpy_helper.to_array(t)
        shape = list(arr.shape) or [1]
        shape[draw(st.integers(0, len(shape) - 1))] = 0
        t.CopyFrom(numpy_helper.from_array(np.zeros(shape, arr.dtype), t.name))
        return f"initializer {t.name} shape {shape}"
    vi = draw(st.sampled_from(list(m.graph.input)))
    dims = vi.type.tensor_type.shape.dim
    dims[draw(st.integers(0, len(dims) - 1))].dim_value = 0
    return f"input {vi.name} has a zero dim"


@mutation
def m_duplicate_names(m: onnx.ModelProto, draw: Draw) -> str:
    how = draw(st.sampled_from(["node-name", "initializer", "input", "output", "init-vs-output", "input-vs-output"]))
    g = m.graph
    if how == "node-name":
        a, b = draw(st.sampled_from(list(g.node))), draw(st.sampled_from(list(g.node)))
        b.name = a.name or "n"
        a.name = b.name
    elif how == "initializer":
        g.initializer.append(draw(st.sampled_from(list(g.initializer))))
    elif how == "input":
        g.input.append(draw(st.sampled_from(list(g.input))))
    elif how == "output":
        g.output.append(g.output[0])
    elif how == "init-vs-output":
        n = draw(st.sampled_from([n for n in g.node if n.output]))
        draw(st.sampled_from(list(g.initializer))).name = n.output[0]
    else:
        n = draw(st.sampled_from([n for n in g.node if n.output]))
        n.output[0] = draw(st.sampled_from(list(g.input))).name
    return how


@mutation
def m_missing_external_data(m: onnx.ModelProto, draw: Draw) -> Case:
    """A > 2 GB model whose weights live in external files: missing, too short, or outside the folder."""
    how = draw(st.sampled_from(["missing", "short", "outside", "bad-length", "no-location", "length-vs-dims"]))
    files: dict[str, bytes] = {}
    big = [t for t in m.graph.initializer if len(t.raw_data) >= 1024] or list(m.graph.initializer)
    for k, t in enumerate(big[: draw(st.integers(1, 3))]):
        for f in ("raw_data", "float_data", "int64_data", "int32_data", "double_data"):
            t.ClearField(f)
        t.data_location = TensorProto.EXTERNAL
        length = 3 * 2**30 if how != "bad-length" else -5
        if how != "length-vs-dims":  # 3 GB of float32 each, as a large model's weights would be
            t.data_type = TensorProto.FLOAT
            t.dims[:] = [3 * 2**28]
        loc = {"missing": "weights.bin", "short": "weights.bin", "outside": "../weights.bin",
               "bad-length": "weights.bin", "no-location": None, "length-vs-dims": "weights.bin"}[how]
        entries = {"offset": str(k * length), "length": str(length)}
        if loc is not None:
            entries["location"] = loc
        del t.external_data[:]
        for key, value in entries.items():
            t.external_data.add(key=key, value=value)
    if how in ("short", "bad-length"):
        files["weights.bin"] = b"\0" * 4096
    return Case(m.SerializeToString(), files, what=f"external data: {how}")


@mutation
def m_opset(m: onnx.ModelProto, draw: Draw) -> str:
    how = draw(st.sampled_from(["old", "future", "none", "custom-domain", "ir-version"]))
    if how == "old":
        m.opset_import[0].version = draw(st.sampled_from([1, 6, 9, 11]))
    elif how == "future":
        m.opset_import[0].version = draw(st.sampled_from([30, 99]))
    elif how == "none":
        del m.opset_import[:]
    elif how == "custom-domain":
        n = m.graph.node[_node(m, draw)]
        n.domain = draw(st.sampled_from(["com.example", "com.microsoft", "ai.onnx.ml"]))
    else:
        m.ir_version = draw(st.sampled_from([0, 2, 99]))
    return how


@mutation
def m_input_dtype(m: onnx.ModelProto, draw: Draw) -> str:
    vi = draw(st.sampled_from(list(m.graph.input) + list(m.graph.output)))
    vi.type.tensor_type.elem_type = draw(st.sampled_from([TensorProto.FLOAT, TensorProto.INT32, TensorProto.STRING,
                                                          TensorProto.BOOL, 99]))
    return f"{vi.name} dtype -> {vi.type.tensor_type.elem_type}"


# --------------------------------------------------------------------------------------------- #
# Running a case and checking its outcome
# --------------------------------------------------------------------------------------------- #


@dataclass
class Outcome:
    """How the CLI ended on one case."""

    code: int
    stdout: str
    stderr: str
    wrote: bool
    leftovers: list[str]

    @property
    def kind(self) -> str:
        return {0: "compiled", 1: "outside tolerance", 2: "refused"}.get(self.code, f"exit {self.code}")


@contextlib.contextmanager
def _native_stderr() -> Any:
    """Capture what native code writes to file descriptor 2; the text is in the yielded list afterwards."""
    sys.stderr.flush()
    saved, text = os.dup(2), []
    with tempfile.TemporaryFile(mode="w+") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            text.append(f.read())


def run_case(case: Case, folder: pathlib.Path, *, subprocess_: bool = False) -> Outcome:
    """Write ``case`` into ``folder`` and run ``main([...])`` on it (in process, or as a subprocess)."""
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "model.onnx"
    src.write_bytes(case.data)
    for name, data in case.files.items():
        (folder / name).write_bytes(data)
    out_dir = folder / "out"
    out_dir.mkdir()
    out = out_dir / "compiled.onnx"
    args = [str(src), "-o", str(out), "--quiet"]
    if subprocess_:
        proc = subprocess.run([sys.executable, "-m", "passes.compile", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    else:
        from passes.tools.compile import main

        so, se = io.StringIO(), io.StringIO()
        with _native_stderr() as native:  # what onnxruntime's C++ logger would print
            try:
                with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
                    code = main(args)
            except BaseException:  # noqa: BLE001 - an escaping exception is exactly what we look for
                code, se = 99, io.StringIO(se.getvalue() + traceback.format_exc())
        stdout, stderr = so.getvalue(), "".join(native) + se.getvalue()
    files = sorted(p.name for p in out_dir.iterdir())
    wrote = out.name in files
    leftovers = [f for f in files if f not in (out.name, out.name + ".data")]
    return Outcome(code, stdout, stderr, wrote, leftovers)


def check_outcome(o: Outcome, what: str) -> None:
    """Assert that ``o`` is one of the three allowed endings."""
    ctx = f"{what}\nexit {o.code}\nstderr:\n{o.stderr[-4000:]}\nstdout:\n{o.stdout[-1000:]}"
    assert "Traceback" not in o.stderr and "Traceback" not in o.stdout, ctx
    assert not o.leftovers, f"left files behind: {o.leftovers}\n{ctx}"
    if o.code == 0:
        assert o.wrote and "-> OK" in o.stdout, ctx
        assert not o.stderr.strip(), ctx
    elif o.code == 1:
        assert "outside tolerance" in o.stderr and not o.wrote, ctx
    elif o.code == 2:
        lines = o.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and not o.wrote, ctx
    else:
        raise AssertionError(f"exit {o.code} is not allowed on a damaged model\n{ctx}")


def make_case(base: bytes, kind: str, draw: Draw) -> Case:
    """Damage the model ``base`` (serialized) with the mutation ``kind``."""
    m = onnx.ModelProto()
    m.ParseFromString(base)
    got = MUTATIONS[kind](m, draw)
    if isinstance(got, Case):
        got.what = f"{kind}: {got.what}"
        return got
    return Case(m.SerializeToString(), what=f"{kind}: {got}")


# --------------------------------------------------------------------------------------------- #
# The fixed-seed set
# --------------------------------------------------------------------------------------------- #

#: Examples per mutation in the fixed set (the first is hypothesis' simplest, on the first base).
CI_EXAMPLES = 4


def base_name(arch: str, dynamo: bool) -> str:
    return f"{arch}-{'dynamo' if dynamo else 'script'}"


@pytest.fixture(scope="session")
def bases(exported: Callable[..., pathlib.Path]) -> dict[str, bytes]:
    """The serialized base exports, by ``arch-exporter`` (exported once per session)."""
    return {base_name(a, d): exported(a, dynamo=d).read_bytes() for a, d in BASES}


def fuzz(bases: dict[str, bytes], kind: str, examples: int, *, derandomize: bool = True,
         seed: int | None = None, record: Callable[[str, Case, Outcome], None] | None = None) -> None:
    """Run ``examples`` cases of mutation ``kind`` (base export drawn too), checking each outcome.

    ``record`` sees every case and its outcome (the benchmark counts them); with ``record`` given,
    a bad outcome is recorded as such and does not stop the run.
    """
    names = sorted(bases)

    @settings(max_examples=examples, derandomize=derandomize, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(data: st.DataObject) -> None:
        base = data.draw(st.sampled_from(names))
        case = make_case(bases[base], kind, data.draw)
        case.what = f"{base} {case.what}"
        with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
            outcome = run_case(case, pathlib.Path(tmp))
        if record is not None:
            record(kind, case, outcome)
            return
        check_outcome(outcome, case.what)

    if seed is not None:
        from hypothesis import seed as with_seed

        one = with_seed(seed)(one)
    one()


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MUTATIONS))
def test_damaged_export_ends_cleanly(bases: dict[str, bytes], kind: str) -> None:
    fuzz(bases, kind, CI_EXAMPLES)


# A few cases as a real process: onnxruntime's own logger must not print to stderr either.
SUBPROCESS_CASES = [("gpt2-script", "add-attribute"), ("gpt2-dynamo", "huge-dims"), ("bert-script", "truncate"),
                    ("bert-dynamo", "none")]


@pytest.mark.slow
@pytest.mark.parametrize("base, kind", SUBPROCESS_CASES)
def test_damaged_export_in_a_subprocess(bases: dict[str, bytes], base: str, kind: str, tmp_path: pathlib.Path) -> None:
    m = onnx.ModelProto()
    m.ParseFromString(bases[base])
    if kind == "add-attribute":  # validation refuses it
        m.graph.node[3].attribute.append(helper.make_attribute("bogus", 1))
        case = Case(m.SerializeToString())
        validated = True
    elif kind == "huge-dims":  # valid, fails at run time in onnxruntime
        reshape = next(n for n in m.graph.node if n.op_type == "Reshape" and n.input[1] in
                       {t.name for t in m.graph.initializer})
        init = next(t for t in m.graph.initializer if t.name == reshape.input[1])
        arr = numpy_helper.to_array(init).copy()
        arr[-1] = 2**40
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        case, validated = Case(m.SerializeToString()), False
    elif kind == "truncate":
        case, validated = Case(bases[base][: len(bases[base]) // 3]), True
    else:
        case, validated = Case(bases[base]), False
    o = run_case(case, tmp_path, subprocess_=True)
    check_outcome(o, f"{base} {kind}")
    if kind == "none":
        assert o.code == 0
    else:
        assert o.code == 2
        assert ("onnxruntime" in o.stderr) != validated, o.stderr


# --------------------------------------------------------------------------------------------- #
# A fast tier on a small hand-built model, so the fuzzing machinery runs in the quick suite too
# --------------------------------------------------------------------------------------------- #

SMALL = """
<ir_version: 8, opset_import: ["" : 17]>
tiny (int64[batch, seq] input_ids, int64[batch, seq] attention_mask) => (float[batch, seq, 8] hidden) {
  e = Gather <axis = 0> (table, input_ids)
  m = Cast <to = 1> (attention_mask)
  mu = Unsqueeze (m, minus_one)
  x = Mul (e, mu)
  xw = MatMul (x, w)
  xb = Add (xw, b)
  t = Transpose <perm = [0, 2, 1]> (xb)
  tt = Transpose <perm = [0, 2, 1]> (t)
  s = Softmax <axis = -1> (tt)
  shape = Shape (s)
  r = Reshape (s, shape)
  hidden = LayerNormalization <axis = -1, epsilon = 0.00001> (r, gamma, beta)
}
"""


def small_model() -> bytes:
    rng = np.random.default_rng(0)
    m = onnx.parser.parse_model(SMALL)
    m.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((50, 8)).astype(np.float32), "table"),
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(8, np.float32), "beta"),
    ])
    return m.SerializeToString()


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
def test_damaged_small_model_ends_cleanly(kind: str) -> None:
    fuzz({"small": small_model()}, kind, 2)
