"""FLOP counts of a model at given input shapes, and a measured GEMM peak of this machine."""

from __future__ import annotations

import time

import numpy as np

import ir

__all__ = ["matmul_flops", "measure_gemm_peak"]


def matmul_flops(model_path: str, feeds: dict[str, np.ndarray]) -> float:
    """Multiply-add FLOPs (2 per MAC) of the MatMul/Gemm nodes when run on ``feeds``.

    Exact: the operand shapes are read off one onnxruntime run with them exposed as outputs.
    """
    from ..framework.numerics import model_bytes_or_path, session

    model = ir.load(model_path)
    gemms = [n for n in model.graph if n.op_type in ("MatMul", "Gemm") and None not in n.inputs[:2]]
    exposed: dict[str, ir.Value] = {}
    for n in gemms:
        for v in n.inputs[:2]:
            if v.const_value is None and not v.is_graph_output():
                exposed[v.name] = v
    model.graph.outputs.extend(exposed.values())
    source, _ = model_bytes_or_path(model)
    sess = session(source)
    names = [o.name for o in sess.get_outputs()]
    shapes = {name: out.shape for name, out in zip(names, sess.run(None, feeds))}
    total = 0.0
    for n in gemms:
        a, b = (shapes.get(v.name) if v.const_value is None else v.const_value.shape for v in n.inputs[:2])
        if a is None or b is None:
            continue
        if n.op_type == "Gemm":
            m, k = (a[1], a[0]) if n.attr("transA", 0) else (a[0], a[1])
            cols = b[0] if n.attr("transB", 0) else b[1]
            total += 2.0 * m * k * cols
        else:
            batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])) if len(a) > 2 or len(b) > 2 else ()
            m = a[-2] if len(a) > 1 else 1
            total += 2.0 * float(np.prod(batch)) * m * a[-1] * b[-1]
    return total


def _gemm_model(m: int, k: int, n: int, int8: bool) -> bytes:
    g = ir.Graph(name="gemm")
    if int8:
        a = g.add_input(ir.Value("a", ir.TensorType(ir.DataType.UINT8, (m, k))))
        rng = np.random.default_rng(0)
        w = g.constant(rng.integers(-127, 127, (k, n), dtype=np.int8), name="w")
        az = g.constant(np.array(128, np.uint8), name="az")
        wz = g.constant(np.array(0, np.int8), name="wz")
        node = ir.Node("MatMulInteger", [a, w, az, wz], name="mm", outputs=["y"])
    else:
        a = g.add_input(ir.Value("a", ir.TensorType(ir.DataType.FLOAT, (m, k))))
        w = g.constant(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), name="w")
        node = ir.Node("MatMul", [a, w], name="mm", outputs=["y"])
    g.append(node)
    g.outputs.append(node.outputs[0])
    return ir.to_onnx(ir.Model(g, opset_imports={"": 17})).SerializeToString()


def measure_gemm_peak(threads: int = 2, *, int8: bool = False, size: tuple[int, int, int] = (512, 1024, 1024),
                      seconds: float = 1.0) -> float:
    """GFLOP/s (GOP/s for int8) of onnxruntime's MatMul (MatMulInteger for int8) at ``size``."""
    import onnxruntime as ort

    m, k, n = size
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(_gemm_model(m, k, n, int8), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    a = rng.integers(0, 255, (m, k), dtype=np.uint8) if int8 else rng.standard_normal((m, k)).astype(np.float32)
    for _ in range(3):
        sess.run(None, {"a": a})
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t = time.perf_counter()
        sess.run(None, {"a": a})
        times.append(time.perf_counter() - t)
    return 2.0 * m * k * n / float(np.median(times)) / 1e9
