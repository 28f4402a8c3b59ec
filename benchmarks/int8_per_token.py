"""Per-token activation scales for int8 MatMuls, as onnxruntime's standard ops can run them (issue #14's study).

    .venv/bin/python benchmarks/int8_per_token.py [--rounds 30]

Where the quantize pass's budget keeps MiniLM's ops float, the error is the activation's one scale a
call (``DynamicQuantizeLinear``): a few tokens' huge channels set it for all. onnxruntime's CPU
int8 kernels take one activation scale (``DynamicQuantizeMatMul``, ``MatMulIntegerToFloat``);
``MatMulNBits`` quantizes per block but is slower than fp32 on AVX2. This measures the remaining
route, a scale per token from standard ops around ``MatMulInteger``::

    s = max(|x|, last axis) / 127;  x_q = uint8(round(x / s) + 128)
    y = float(MatMulInteger(x_q, W_q, 128)) * s * w_scale       (W_q: per-column 7-bit, as reduce_range)

against per-tensor dynamic int8 (``DynamicQuantizeMatMul``, the same weights) on the original
export's constant-weight MatMuls (every one int8, no smoothing, no fallback), with onnxruntime's
optimizations on: held-out accuracy as ``int8_heldout.py`` measures it (the mean-pooled embedding's
cosine to the float model's, one sentence a call), then, per op type kept float, which ops the error
comes from; and latency at sequence 16 and 128, batch 1, the variants interleaved, 2 threads,
spinning off.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ir  # noqa: E402
from int8_heldout import SOURCE, cosines, feeds_of, pooled, split  # noqa: E402
from passes.framework.numerics import model_bytes_or_path, session  # noqa: E402
from passes.framework.rewriter import Rewriter  # noqa: E402
from passes.quantization._candidates import MS, find_candidates, weight_of  # noqa: E402

F32, U8 = ir.DataType.FLOAT, ir.DataType.UINT8


def quantized(kind: str, keep_float: str = "") -> ir.Model:
    """The original export with every constant-weight MatMul int8 (``dynamic`` or ``per-token``), but
    those whose name contains ``keep_float``."""
    model = ir.load(str(SOURCE))
    graph, rw = model.graph, Rewriter()
    rw.import_opset(model, MS)
    const = {k: rw.constant(graph, np.asarray(v, dt), name=k) for k, v, dt in
             [("inv127", 1 / 127, np.float32), ("eps", 1e-12, np.float32), ("c128", 128, np.float32),
              ("zp128", 128, np.uint8), ("zero_i8", 0, np.int8)]}
    axes_input = (model.opset("") or 0) >= 18  # ReduceMax takes its axes as an input from opset 18
    axes = rw.constant(graph, np.array([-1], np.int64), name="last_axis")
    nodes = list(graph)
    for c, node in [(c, nodes[c.index]) for c in find_candidates(model, ("MatMul",))]:
        if keep_float and keep_float in node.name:
            continue
        w, _ = weight_of(node)  # type: ignore[misc]
        ws = np.abs(w).max(0) / 63
        ws[ws == 0] = 1
        wq = rw.constant(graph, np.clip(np.round(w / ws), -63, 63).astype(np.int8), name=f"{node.name}_wq")
        wsc = rw.constant(graph, ws.astype(np.float32), name=f"{node.name}_ws")
        x, y = node.inputs[0], node.outputs[0]

        def op(name: str, ins: list, attrs: dict | None = None, dtype: ir.DataType = F32, **kw) -> ir.Value:
            return rw.make(name, ins, attrs or {}, before=node, types=[ir.TensorType(dtype, None)], **kw).outputs[0]

        if kind == "dynamic":
            out = op("DynamicQuantizeMatMul", [x, wq, wsc, const["zero_i8"]], domain=MS)
        else:
            amax = op("ReduceMax", [op("Abs", [x]), axes] if axes_input else [op("Abs", [x])],
                      {"keepdims": 1} if axes_input else {"keepdims": 1, "axes": [-1]})
            s = op("Max", [op("Mul", [amax, const["inv127"]]), const["eps"]])
            xq = op("Cast", [op("Add", [op("Round", [op("Div", [x, s])]), const["c128"]])], {"to": int(U8)}, U8)
            acc = op("MatMulInteger", [xq, wq, const["zp128"]], dtype=ir.DataType.INT32)
            out = op("Mul", [op("Mul", [op("Cast", [acc], {"to": int(F32)}), s]), wsc])
        rw.replace_all_uses_with(y, out)
        rw.erase([node])
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split() if sys.platform == "linux" else []
    print("cpu flags:", " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags))
    ref = session(str(SOURCE), 2, optimize=False)
    names = {i.name for i in ref.get_inputs()}
    _, held = split()
    held_feeds = feeds_of(held, names)
    r = pooled(ref, held_feeds)
    sessions = {"fp32": session(str(SOURCE), 2, spinning=False)}
    print("| variant | ops kept float | held-out mean | held-out worst |\n|---|---|---|---|")
    for kind in ("dynamic", "per-token"):
        for keep in ("", "attention/self/", "attention/output/", "intermediate/", "/output/dense"):
            sess = session(model_bytes_or_path(quantized(kind, keep))[0], 2, spinning=False)
            cs = cosines(pooled(sess, held_feeds), r)
            print(f"| {kind} | {keep or 'none'} | {cs.mean():.5f} | {cs.min():.5f} |", flush=True)
            if not keep:
                sessions[kind] = sess
    for seq in (16, 128):
        feeds = {k: v for k, v in {"input_ids": np.full((1, seq), 1000, np.int64),
                                   "attention_mask": np.ones((1, seq), np.int64),
                                   "token_type_ids": np.zeros((1, seq), np.int64)}.items() if k in names}
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for s in sessions.values():
            for _ in range(20):
                s.run(None, feeds)
        for _ in range(args.rounds):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                for _ in range(10):
                    s.run(None, feeds)
                times[k].append((time.perf_counter() - t0) / 10)
        base = statistics.median(times["fp32"])
        print(f"seq {seq}: " + ", ".join(f"{k} {statistics.median(v) * 1e3:.2f} ms ({statistics.median(v) / base:.2f}x)"
                                         for k, v in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
