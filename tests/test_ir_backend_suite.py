"""ONNX's backend node test suite as the round-trip oracle for lowering and emission.

``onnx.backend.test.case.node.collect_testcases(None)`` builds every node test case in memory
(about 1900 small models, each with input and expected output data). For every case:

* lowering succeeds, :func:`ir.verify` passes, the text form is deterministic (two independent
  lowerings print the same text) and survives the round trip;
* ``ir.to_onnx(ir.from_onnx(m))`` is the same model as ``m`` once both are canonicalized (typed
  tensor fields turned into ``raw_data``, fields holding their default value cleared);
* for every case onnxruntime can load and run, and whose outputs match the expected ones within
  the case's tolerances ("runnable"), the round-tripped model gives *exactly* the same outputs
  (bit for bit, NaN-aware, sequences and optionals included).

The cases run in chunks so pytest-xdist can spread them; each chunk records its
``passed / runnable / total`` and ``conftest.py`` prints the sum at the end of the session.
Run the whole suite standalone with ``python tests/test_ir_backend_suite.py``.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import ir

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from google.protobuf import text_format  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

N_CHUNKS = 6
#: Fraction of the suite onnxruntime must be able to run, so a broken harness cannot pass vacuously.
MIN_RUNNABLE = 0.7

_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


@functools.lru_cache(maxsize=1)
def all_cases() -> tuple[Any, ...]:
    """All node test cases, sorted by name (built once per process; takes ~10 s)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            cases = collect_testcases(None)
    return tuple(sorted(cases, key=lambda c: c.name))


# ------------------------------------------------------------------------------------------------ #
# Feeding onnxruntime and comparing results
# ------------------------------------------------------------------------------------------------ #


class NotRunnable(Exception):
    """onnxruntime cannot run this case as given (not an IR failure)."""


def _session(model_bytes: bytes) -> Any:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _to_numpy(x: Any) -> Any:
    """Case data (TensorProto, numpy scalars, lists for sequences, None for empty optionals) → numpy."""
    if isinstance(x, onnx.TensorProto):
        return numpy_helper.to_array(x)
    if isinstance(x, onnx.SequenceProto):
        return [_to_numpy(e) for e in numpy_helper.to_list(x)]
    if isinstance(x, (list, tuple)):
        return [_to_numpy(e) for e in x]
    if x is None or isinstance(x, dict):
        return x
    return np.asarray(x)


def _needs_ortvalue(a: Any) -> bool:
    """numpy arrays of ml_dtypes types (bfloat16, float8, int4...) that onnxruntime cannot take as is."""
    return isinstance(a, np.ndarray) and a.dtype.type.__module__.startswith("ml_dtypes")


def _feed(a: Any) -> Any:
    if a is None:
        raise NotRunnable("empty optional input")
    if _needs_ortvalue(a):
        onnx_type = helper.np_dtype_to_tensor_dtype(a.dtype)
        carrier = a.view(np.uint8 if a.dtype.itemsize == 1 else np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(carrier), onnx_type)
    return a


def _raw_output(ov: Any) -> np.ndarray:
    """The bytes of a tensor OrtValue onnxruntime cannot convert to numpy (bfloat16...)."""
    n = ov.tensor_size_in_bytes()
    data = ctypes.string_at(ov.data_ptr(), n) if n else b""
    return np.frombuffer(data, dtype=np.uint8).reshape(-1)


def run_model(sess: Any, graph_inputs: Sequence[str], inputs: Sequence[Any]) -> list[Any]:
    """Run ``sess`` on the case's inputs (matched positionally to the non-initializer graph inputs)."""
    if len(inputs) > len(graph_inputs):
        raise NotRunnable("more data than inputs")
    values = [_to_numpy(x) for x in inputs]
    feeds = {name: _feed(v) for name, v in zip(graph_inputs, values)}
    try:
        return list(sess.run(None, feeds))
    except Exception as e:
        if "No corresponding Numpy type" not in str(e):
            raise NotRunnable(f"{type(e).__name__}: {str(e)[:200]}") from None
    if any(not isinstance(v, np.ndarray) and not hasattr(v, "is_tensor") for v in feeds.values()):
        raise NotRunnable("a sequence input alongside a type numpy cannot hold")
    ort_feeds = {k: v if hasattr(v, "is_tensor") else ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
    outs = sess.run_with_ort_values(None, ort_feeds)
    result = []
    for ov in outs:
        if not ov.is_tensor():
            raise NotRunnable("non-tensor output of a type numpy cannot hold")
        try:
            result.append(ov.numpy())
        except Exception:
            result.append(_raw_output(ov))
    return result


def _as_comparable(out: Any, exp: Any) -> tuple[Any, Any]:
    """Give ``out`` the ml_dtypes type of ``exp`` when onnxruntime returned the raw carrier type."""
    if isinstance(out, np.ndarray) and isinstance(exp, np.ndarray) and out.dtype != exp.dtype:
        if _needs_ortvalue(exp) and out.nbytes == exp.nbytes:
            try:
                out = out.reshape(-1).view(np.uint8).view(exp.dtype).reshape(exp.shape)
            except ValueError:
                pass
    return out, exp


def close(exp: Any, out: Any, rtol: float, atol: float) -> bool:
    """Whether onnxruntime's output matches the expected one within the case's tolerances."""
    if isinstance(exp, list):
        return isinstance(out, list) and len(exp) == len(out) and all(close(e, o, rtol, atol) for e, o in zip(exp, out))
    if exp is None or out is None:
        return exp is None and out is None
    out, exp = _as_comparable(np.asarray(out) if not isinstance(out, np.ndarray) else out, np.asarray(exp))
    if out.shape != exp.shape:
        return False
    if exp.dtype == object or exp.dtype.kind in "SU" or out.dtype == object:
        return [_s(x) for x in exp.ravel()] == [_s(x) for x in np.asarray(out).ravel()]
    try:
        if exp.dtype.kind == "c" or out.dtype.kind == "c":
            return bool(np.allclose(out, exp, rtol=rtol, atol=atol, equal_nan=True))
        return bool(np.allclose(out.astype(np.float64), exp.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True))
    except (TypeError, ValueError):
        return bool(np.array_equal(out, exp))


def _s(x: Any) -> Any:
    return x.decode() if isinstance(x, bytes) else x


def identical(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of two onnxruntime results (NaN-aware; lists for sequences)."""
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(
            identical(x, y) for x, y in zip(a, b)
        )
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == object:
        return a.tolist() == b.tolist()
    # Compare bytes: exact, and NaNs with the same payload compare equal.
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


# ------------------------------------------------------------------------------------------------ #
# Canonical form of a ModelProto
# ------------------------------------------------------------------------------------------------ #


def _canonicalize(msg: Any) -> None:
    if isinstance(msg, onnx.TensorProto) and msg.data_type != onnx.TensorProto.STRING and any(
        len(getattr(msg, f)) for f in _TYPED_FIELDS
    ):
        arr = numpy_helper.to_array(msg)
        raw = ir.Tensor(arr, dtype=ir.DataType(msg.data_type)).raw_bytes()
        for f in _TYPED_FIELDS:
            msg.ClearField(f)
        msg.raw_data = bytes(raw)
    for fd, val in list(msg.ListFields()):
        if fd.message_type is not None:
            for m in val if fd.is_repeated else [val]:
                _canonicalize(m)
        elif not fd.is_repeated and val == fd.default_value:
            msg.ClearField(fd.name)


def canonical_text(model: Any) -> str:
    """Text of ``model`` with typed tensor data as ``raw_data`` and default-valued fields cleared."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _canonicalize(m)
    return text_format.MessageToString(m)


# ------------------------------------------------------------------------------------------------ #
# One case
# ------------------------------------------------------------------------------------------------ #


@dataclass
class Tally:
    """Outcome of a batch of cases."""

    total: int = 0
    runnable: int = 0
    passed: int = 0
    failures: list[str] = field(default_factory=list)


def check_case(case: Any, tally: Tally) -> None:
    """Check one case; record whether it is runnable and each failure with its reason."""
    tally.total += 1
    model = case.model
    # 1. Structure: lower, verify, print deterministically, emit, compare canonical protos.
    try:
        m = ir.from_onnx(model)
        ir.verify(m)
        text = ir.print_model(m)
        if text != ir.print_model(ir.from_onnx(model)):
            raise AssertionError("two lowerings of the same model print differently")
        emitted = ir.to_onnx(m)
        if ir.print_model(ir.from_onnx(emitted)) != text:
            raise AssertionError("the text form changed through emit + lower")
        if canonical_text(emitted) != canonical_text(model):
            raise AssertionError("the emitted ModelProto differs from the original")
    except Exception as e:  # noqa: BLE001 - every failure is reported, all at once
        tally.failures.append(f"{case.name}: {type(e).__name__}: {str(e)[:300]}")
        return

    # 2. Numerics: only cases onnxruntime runs correctly count.
    try:
        sess = _session(model.SerializeToString())
        inits = {t.name for t in model.graph.initializer}
        names = [i.name for i in model.graph.input if i.name not in inits]
        reference = []
        for inputs, expected in case.data_sets:
            outs = run_model(sess, names, inputs)
            exp = [_to_numpy(e) for e in expected]
            if len(outs) != len(exp) or not all(close(e, o, case.rtol, case.atol) for e, o in zip(exp, outs)):
                raise NotRunnable("onnxruntime disagrees with the expected outputs")
            reference.append((inputs, outs))
    except NotRunnable:
        return
    except Exception:  # noqa: BLE001 - onnxruntime cannot load the original: not runnable
        return
    tally.runnable += 1
    try:
        sess2 = _session(emitted.SerializeToString())
        names2 = [i.name for i in emitted.graph.input if i.name not in inits]
        if names2 != names:
            raise AssertionError(f"graph inputs changed: {names} -> {names2}")
        for inputs, outs in reference:
            outs2 = run_model(sess2, names2, inputs)
            if len(outs2) != len(outs):
                raise AssertionError(f"{len(outs)} outputs became {len(outs2)}")
            for k, (a, b) in enumerate(zip(outs, outs2)):
                if not identical(a, b):
                    raise AssertionError(f"output {k} differs after the round trip")
    except Exception as e:  # noqa: BLE001
        tally.failures.append(f"{case.name} (numerics): {type(e).__name__}: {str(e)[:300]}")
        return
    tally.passed += 1


def run_cases(cases: Sequence[Any]) -> Tally:
    """Check ``cases`` and return the tally."""
    tally = Tally()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for case in cases:
            check_case(case, tally)
    return tally


# ------------------------------------------------------------------------------------------------ #
# Tests
# ------------------------------------------------------------------------------------------------ #


@pytest.mark.parametrize("chunk", range(N_CHUNKS))
def test_backend_node_suite_round_trip(chunk: int, record_property: Any) -> None:
    """Every case of a chunk round-trips structurally; every runnable one numerically exactly."""
    cases = all_cases()[chunk::N_CHUNKS]
    tally = run_cases(cases)
    record_property("backend_suite", (tally.passed, tally.runnable, tally.total))
    print(f"chunk {chunk}: {tally.passed} passed / {tally.runnable} runnable / {tally.total} total")
    assert not tally.failures, f"{len(tally.failures)} cases fail:\n" + "\n".join(tally.failures)
    assert tally.runnable >= MIN_RUNNABLE * tally.total, (
        f"only {tally.runnable} of {tally.total} cases run in onnxruntime: is the harness broken?"
    )
    assert tally.passed == tally.runnable


def test_suite_is_large() -> None:
    """The collector still returns the full suite (guards against a silently empty oracle)."""
    assert len(all_cases()) > 1000


def test_harness_detects_a_changed_output() -> None:
    """The oracle fails when emission changes numerics: a broken round trip is caught."""
    case = next(c for c in all_cases() if c.name == "test_add")
    m = ir.from_onnx(case.model)
    (node,) = list(m.graph)
    node.op_type = "Sub"
    broken = ir.to_onnx(m)
    inputs, _ = case.data_sets[0]
    names = [i.name for i in case.model.graph.input]
    a = run_model(_session(case.model.SerializeToString()), names, inputs)
    b = run_model(_session(broken.SerializeToString()), names, inputs)
    assert not identical(a, b)
    assert canonical_text(broken) != canonical_text(case.model)


def test_identical_is_nan_aware_and_exact() -> None:
    """``identical`` treats equal NaNs as equal but a one-ulp change as a difference."""
    x = np.array([1.0, np.nan], np.float32)
    assert identical([x], [x.copy()])
    y = x.copy()
    y[0] = np.nextafter(np.float32(1.0), np.float32(2.0))
    assert not identical(x, y)
    assert not identical(x, x.astype(np.float64))
    assert identical([[x], None], [[x.copy()], None])


if __name__ == "__main__":
    t = run_cases(all_cases())
    print("\n".join(t.failures))
    print(f"ONNX backend node suite round trip: {t.passed} passed / {t.runnable} runnable / {t.total} total")
    sys.exit(1 if t.failures else 0)
