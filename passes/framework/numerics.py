"""Numerical verification in onnxruntime: generated inputs, running, comparing.

Inputs are generated to look like real ones: token ids inside the vocabulary (read off the
embedding table the ids index), attention masks of ones with the second row half padded,
token types of zeros, position ids counting up.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

import ir

from .base import PassError

__all__ = [
    "Comparison", "make_feeds", "run_onnxruntime", "compare_outputs", "model_bytes_or_path", "tensor_bytes",
    "describe_ort_error",
]

#: Generated verification inputs larger than this (elements per input) are refused, not allocated.
MAX_FEED_ELEMENTS = 1 << 28

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


@dataclass
class Comparison:
    """How close two sets of outputs are (worst over outputs)."""

    max_abs: float
    cosine: float
    ref_absmax: float
    details: list[tuple[str, float, float]]

    def ok(self, *, atol: float = 1e-4, rtol: float = 1e-4, min_cosine: float = 0.9999) -> bool:
        """Within tolerance: ``max_abs <= atol + rtol * max|ref|`` and cosine at least ``min_cosine``."""
        return self.max_abs <= atol + rtol * self.ref_absmax and self.cosine >= min_cosine

    def __str__(self) -> str:
        return f"max abs {self.max_abs:.3g}, cosine {self.cosine:.6f}"


def index_rows(value: ir.Value) -> int | None:
    """Rows of the smallest table that ``value`` indexes (through casts and reshapes), if any.

    Generated token ids stay below it, so they are valid for every embedding they select from.
    """
    best: int | None = None
    stack, seen = [value], 0
    while stack and seen < 16:
        v = stack.pop()
        seen += 1
        for node, idx in v.uses():
            if node.op_type == "Gather" and idx == 1 and node.inputs[0] is not None:
                shape = node.inputs[0].shape
                axis = int(node.attr("axis", 0))
                if shape and isinstance(shape[axis], int):
                    best = shape[axis] if best is None else min(best, shape[axis])
            elif node.op_type in ("Cast", "Reshape", "Unsqueeze", "Flatten", "Identity", "Squeeze"):
                stack.extend(o for o in node.outputs if o is not None)
    return best


def _embedding_rows(model: ir.Model, input_name: str) -> int | None:
    return next((index_rows(v) for v in model.graph.inputs if v.name == input_name), None)


def _dim(d: Any, axis: int, name: str, batch: int, seq: int, past: int, bindings: dict[str, int]) -> int:
    if isinstance(d, int) and d > 0:
        return d
    if isinstance(d, str) and d in bindings:
        return bindings[d]
    # A named dim speaks for itself (``past_key_values.0.key`` has a ``batch`` dim 0, and the
    # attention mask of a decoder with past spans ``total_sequence`` = past + sequence).
    own = d.lower() if isinstance(d, str) else ""
    if "+" in own or "total" in own:
        return past + seq
    if "past" in own or "cache" in own:
        return past
    if "batch" in own:
        return batch
    label = own + " " + name.lower()
    if "past" in label or "cache" in label:
        return past
    if "batch" in label:
        return batch
    if any(k in label for k in ("seq", "len", "token")):
        return seq if "past" not in label else past
    return batch if axis == 0 else seq


def make_feeds(
    model: ir.Model,
    input_meta: list[Any],
    *,
    batch: int = 2,
    seq: int = 16,
    past: int = 8,
    seed: int = 0,
    bindings: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Generate inputs for a model from onnxruntime's input metadata.

    ``bindings`` fixes named symbolic dims (``{"batch": 1}``); other dims are guessed from their
    names and positions (batch first, then sequence; ``past`` for cache lengths).
    """
    bindings = bindings or {}
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for meta in input_meta:
        name, lname = meta.name, meta.name.lower()
        dtype = _ORT_TYPES.get(meta.type, np.float32)
        shape = [_dim(d, i, name, batch, seq, past, bindings) for i, d in enumerate(meta.shape or [])]
        if int(np.prod(shape, dtype=object)) > MAX_FEED_ELEMENTS:
            raise PassError(
                f"cannot generate verification inputs: input {name!r} would have shape {shape}; "
                "bind its dims with --static-shapes or skip verification with --no-verify"
            )
        if np.issubdtype(dtype, np.integer):
            if "mask" in lname:
                arr = np.ones(shape, dtype)
                if len(shape) == 2 and shape[0] > 1 and shape[1] > 1:
                    arr[1, shape[1] // 2 :] = 0
            elif "position" in lname:
                arr = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy() if shape else np.zeros(shape, dtype)
            elif "type" in lname or "segment" in lname:
                arr = np.zeros(shape, dtype)
            else:
                high = _embedding_rows(model, name) or 100
                arr = rng.integers(0, high, size=shape).astype(dtype)
        elif dtype == np.bool_:
            arr = np.ones(shape, np.bool_)
        else:
            arr = rng.standard_normal(shape).astype(dtype)
        feeds[name] = arr
    return feeds


#: Models with more tensor bytes reach onnxruntime through a file, not serialized bytes.
FILE_BYTES = 256 << 20


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of the model's tensors: initializers of every graph and subgraph, and constant attributes."""
    from ir.emit import _tensor_bytes

    return _tensor_bytes(model)


def model_bytes_or_path(model: ir.Model, folder: str | None = None) -> tuple[bytes | str, str | None]:
    """An onnxruntime-loadable form of the model: bytes, or a saved file over :data:`FILE_BYTES` of tensors.

    Serialized bytes cost the weights three more times while onnxruntime loads them (the protobuf,
    its bytes, onnxruntime's parse); from a file with external data onnxruntime maps the weights,
    and those still in the original model's data file are referenced there, not copied
    (:func:`ir.save`'s ``share_external_data``). A folder made here is removed at exit.
    """
    if tensor_bytes(model) <= FILE_BYTES:
        return ir.to_onnx(model).SerializeToString(), None
    if folder is None:
        folder = tempfile.mkdtemp(prefix="passes-verify-")
        atexit.register(shutil.rmtree, folder, True)
    path = os.path.join(folder, "model.onnx")
    ir.save(model, path, external_data=True, share_external_data=True)
    ir.release_mapped_pages()
    return path, folder


def session(source: bytes | str | os.PathLike[str], threads: int = 1, *, spinning: bool = True,
            optimize: bool = True, initializers: Mapping[str, np.ndarray] | None = None, prepack: bool = True) -> Any:
    """An onnxruntime CPU session on ``source`` (bytes or a path).

    ``initializers`` supplies initializers of ``source`` from memory by name (the model marks
    them external, :func:`ir.to_onnx_sharing`): onnxruntime reads the arrays in place, which
    the session keeps alive, instead of parsing copies out of the model's bytes.

    ``spinning=False`` stops idle worker threads from spinning, which matters when several
    sessions take turns on few cores (interleaved benchmarks): a spinning pool steals the next
    session's CPU. ``optimize=False`` turns onnxruntime's graph optimizations off: verification
    runs both models as written, so a wrong fusion of ours cannot agree with one of onnxruntime's.
    ``prepack=False`` keeps the kernels from making packed copies of constant weights (a float
    ``MatMul``'s weight is then held once instead of twice). Other kernels run then: the int8 ones'
    results move a little (MiniLM's int8 output errors by up to 0.2% of themselves), ``MatMulNBits``'
    a lot (its ``accuracy_level`` applies to pre-packed weights only).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Errors reach the caller as exceptions; onnxruntime's logger would print them to stderr as well.
    so.log_severity_level = 4
    ort.set_default_logger_severity(4)  # allocation failures are logged by the process-wide logger
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in (initializers or {}).values()]
    if values:
        so.add_external_initializers(list(initializers or {}), values)
    src = os.fspath(source) if isinstance(source, os.PathLike) else source
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    if values:
        sess._tfcompile_initializers = (so, values)  # onnxruntime reads them in place: keep them alive
    return sess


# "Load model from PATH failed:", "This is an invalid model.", "[ONNXRuntimeError] : 10 : INVALID_GRAPH :"...
_ORT_NOISE = re.compile(
    r"\[ONNXRuntimeError\] : \d+ : \w+ : |Load model from .*? failed: ?|This is an invalid model\. ?|"
    r"Exception during initialization: |Non-zero status code returned while running "
)
_ORT_SOURCE = re.compile(r"(?:/\S+/)?[\w.]+\.(?:cc|h|cpp):\d+ ")
_ORT_NODES = [
    # In Node, ("name", Op, "domain", -1) : (...) -> (...) , Error <message>
    re.compile(r'In Node, \("(?P<name>[^"]*)", (?P<op>[\w.]+), "[^"]*", -?\d+\) : .*? , Error (?P<msg>.*)', re.S),
    # <Op> node. Name:'<name>' Status Message: <message>
    re.compile(r"(?P<op>[\w.]+) node\. Name:'(?P<name>[^']*)' Status Message: (?P<msg>.*)", re.S),
    # Node (<name>) Op (<Op>) [ShapeInferenceError] <message>
    re.compile(r"Node \((?P<name>[^)]*)\) Op \((?P<op>[\w.]+)\) (?P<msg>.*)", re.S),
    # Type Error: ... of operator (<Op>) in node (<name>) is invalid.
    re.compile(r"(?P<msg>Type Error: .*? of operator \((?P<op>[\w.]+)\) in node \((?P<name>[^)]*)\).*)", re.S),
]


def describe_ort_error(exc: BaseException) -> str:
    """One line for an onnxruntime exception: ``node 'X' (Op): what went wrong``.

    Drops onnxruntime's status prefixes, file paths and C++ signatures, and names the node and
    its op when the message does.
    """
    text = _ORT_NOISE.sub("", str(exc))
    text = _strip_cpp(text)
    node = ""
    for pattern in _ORT_NODES:
        m = pattern.search(text)
        if m is not None:
            node = f"node {m['name']!r} ({m['op']}): " if m["name"] else f"node ({m['op']}): "
            text = m["msg"]
            break
    text = "; ".join(part.strip() for part in text.splitlines() if part.strip())
    return node + (text or type(exc).__name__)


def _strip_cpp(text: str) -> str:
    """Remove ``/path/file.cc:123 [return type] ns::Class::fn(args) `` prefixes (parentheses may nest)."""
    out = []
    while (m := _ORT_SOURCE.search(text)) is not None:
        out.append(text[: m.start()])
        text = text[m.end():]
        sig = _CPP_SIGNATURE.match(text)
        if sig is not None:
            depth, i = 1, sig.end()
            while i < len(text) and depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            if depth == 0:
                text = re.sub(r"^(?: const)? ?", "", text[i:])
    return "".join(out) + text


_CPP_SIGNATURE = re.compile(r"(?:[\w:<>*&]+ ){0,3}[\w:~<>]+\(")


def run_onnxruntime(source: bytes | str, feeds: dict[str, np.ndarray], threads: int = 1) -> list[np.ndarray]:
    """Run a model once in onnxruntime and return its outputs."""
    return session(source, threads).run(None, feeds)


def compare_outputs(names: list[str], ref: list[np.ndarray], got: list[np.ndarray]) -> Comparison:
    """Worst max-abs error and worst cosine over all outputs."""
    worst_abs, worst_cos, absmax = 0.0, 1.0, 0.0
    details = []
    for name, a, b in zip(names, ref, got):
        a64 = np.asarray(a, dtype=np.float64).reshape(-1)
        b64 = np.asarray(b, dtype=np.float64).reshape(-1)
        if a64.shape != b64.shape:
            details.append((name, float("inf"), 0.0))
            worst_abs, worst_cos = float("inf"), 0.0
            continue
        err = float(np.max(np.abs(a64 - b64))) if a64.size else 0.0
        na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
        cos = 1.0 if na == 0 and nb == 0 else float(a64 @ b64 / (na * nb)) if na and nb else 0.0
        details.append((name, err, cos))
        worst_abs = max(worst_abs, err)
        worst_cos = min(worst_cos, cos)
        absmax = max(absmax, float(np.max(np.abs(a64))) if a64.size else 0.0)
    return Comparison(worst_abs, worst_cos, absmax, details)
