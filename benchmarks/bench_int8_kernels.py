"""Micro-benchmark: one projection in each of the kernels the quantize passes can write, on this host.

    .venv/bin/python benchmarks/bench_int8_kernels.py [--m 16 128] [--rounds 15] [--runs 20]

Each model is a single ``x [M, K] @ W [K, N] (+ bias)`` with MiniLM's projection shapes (QKV
packed 384x1152, attention output 384x384, FFN up 384x1536, FFN down 1536x384), compiled from the
same float model by the compiler's own passes:

* ``fp32``: the MatMul as it is;
* ``int8 dynamic``: ``quantize{sensitivity=false}`` (``DynamicQuantizeMatMul``: a per-call
  activation scale, per-channel int8 weights of the target's policy);
* ``MatMulNBits <bits>-bit acc<level>``: ``quantize-weights{bits,block_size=32,accuracy_level}``
  (``accuracy_level=4``: activations quantized to int8 per block of 32; ``0``: float activations).

All variants of one shape are timed in one interleaved run (round robin, 2 intra-op threads,
spinning off); the table gives each one's median and its ratio to fp32, and the weight bytes it
streams. Prints the CPU flags that decide which int8 kernels onnxruntime runs.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import ir  # noqa: E402
import targets  # noqa: E402
from passes import compile_model  # noqa: E402
from passes.framework.numerics import session  # noqa: E402
from passes.tools.autotune import KEY_FLAGS, host_cpu_flags  # noqa: E402

SHAPES = {"qkv 384x1152": (384, 1152), "attn out 384x384": (384, 384), "ffn up 384x1536": (384, 1536),
          "ffn down 1536x384": (1536, 384)}
VARIANTS = {
    "fp32": None,
    "int8 dynamic": "quantize{sensitivity=false},dead-flow",
    "MatMulNBits 8-bit acc4": "quantize-weights{bits=8,block_size=32,accuracy_level=4},dead-flow",
    "MatMulNBits 4-bit acc4": "quantize-weights{bits=4,block_size=32,accuracy_level=4},dead-flow",
    "MatMulNBits 4-bit acc0": "quantize-weights{bits=4,block_size=32,accuracy_level=0},dead-flow",
}


def projection(path: pathlib.Path, k: int, n: int, seed: int = 0) -> None:
    """A float ``MatMul + bias`` model with a symbolic row count."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), "w")
    b = numpy_helper.from_array((0.1 * rng.standard_normal(n)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])], "projection",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], [w, b])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def weight_bytes(path: str) -> int:
    m = onnx.load(path)
    return sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[16, 128], help="rows (tokens) of x")
    ap.add_argument("--target", default="native")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)
    target = targets.get(args.target)
    flags = host_cpu_flags()
    shown = ", ".join(f"{f}={'yes' if f in flags else 'no'}" for f in KEY_FLAGS)
    print(f"CPU flags: {shown}; target {target.name}")
    work = pathlib.Path(tempfile.mkdtemp(prefix="int8-kernels-"))
    rows = []
    for shape, (k, n) in SHAPES.items():
        src = work / f"{k}x{n}.onnx"
        projection(src, k, n)
        paths = {}
        for name, pipeline in VARIANTS.items():
            if pipeline is None:
                paths[name] = str(src)
                continue
            out = work / f"{k}x{n}-{name.replace(' ', '_')}.onnx"
            ir.save(compile_model(str(src), target, f"{target.pipeline},{pipeline}", verify=False).model, str(out))
            paths[name] = str(out)
        sessions = {name: session(p, threads=2, spinning=False) for name, p in paths.items()}
        nbytes = {name: weight_bytes(p) for name, p in paths.items()}
        for m in args.m:
            x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
            ref = sessions["fp32"].run(None, {"x": x})[0]
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for s in sessions.values():
                s.run(None, {"x": x})
            for _ in range(args.rounds):
                for name, s in sessions.items():
                    t0 = time.perf_counter()
                    for _ in range(args.runs):
                        s.run(None, {"x": x})
                    times[name].append((time.perf_counter() - t0) / args.runs * 1e6)
            base = statistics.median(times["fp32"])
            for name, s in sessions.items():
                y = s.run(None, {"x": x})[0]
                rel = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                med = statistics.median(times[name])
                rows.append((shape, m, name, med, med / base, nbytes[name], rel))
    print(f"\none interleaved run per shape and M: {args.rounds} rounds x {args.runs} runs, 2 threads, spinning off\n")
    print("| projection | M | kernel | median us | vs fp32 | weight bytes | rel. error |")
    print("|---|---|---|---|---|---|---|")
    for shape, m, name, med, ratio, size, rel in rows:
        print(f"| {shape} | {m} | {name} | {med:.1f} | {ratio:.2f}x | {size / 1e6:.2f} MB | {rel:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
