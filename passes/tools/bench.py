"""``python -m passes.tools.bench``: time our compiled model against the original and the peer tools.

    python -m passes.tools.bench model.onnx --target x86 [--quantize int8] [--batch 1] [--seq 128] [--threads 2]

In one run, with the same inputs and threads, it times: the original in onnxruntime,
onnxruntime's transformers optimizer (plus its ``quantize_dynamic`` with ``--quantize``), the
onnxscript ORT fusions, OpenVINO when installed, and ours. Repetitions are interleaved (round robin)
so machine drift hits every variant alike. Prints a table (median, p90, speedup, error, cosine,
GFLOP/s against a measured GEMM peak) and writes a PNG bar chart.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import ir

from ..framework.numerics import compare_outputs, make_feeds, session

__all__ = ["Variant", "BenchResult", "run_bench", "main"]


@dataclass
class Variant:
    """One contender: a name and a function that returns something to run, or an error."""

    name: str
    runner: Callable[[dict[str, np.ndarray]], list[np.ndarray]] | None = None
    error: str | None = None
    times: list[float] = field(default_factory=list)
    nodes: int | None = None


@dataclass
class BenchResult:
    """Timings and accuracy of every variant."""

    rows: list[dict[str, Any]]
    setup: dict[str, Any]

    def table(self) -> str:
        """The results as a fixed-width text table."""
        head = f"{'variant':<44} {'nodes':>6} {'median ms':>10} {'p90 ms':>8} {'speedup':>8} {'max abs':>9} {'cosine':>9} {'GFLOP/s':>8} {'of peak':>7}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            if r.get("error"):
                lines.append(f"{r['name']:<44} {'':>6} failed: {r['error'][:90]}")
                continue
            lines.append(
                f"{r['name']:<44} {r['nodes'] if r['nodes'] is not None else '':>6} {r['median_ms']:>10.2f} "
                f"{r['p90_ms']:>8.2f} {r['speedup']:>7.2f}x {r['max_abs']:>9.2e} {r['cosine']:>9.6f} "
                f"{r['gflops']:>8.1f} {r['of_peak']:>6.0%}"
            )
        s = self.setup
        lines.append(
            f"batch {s['batch']}, seq {s['seq']}, {s['threads']} threads, {s['rounds']} interleaved rounds x "
            f"{s['runs_per_round']} runs; MatMul work {s['gflop']:.3f} GFLOP; measured GEMM peak "
            f"fp32 {s['peak_fp32']:.0f} GFLOP/s, int8 {s['peak_int8']:.0f} GOP/s"
        )
        return "\n".join(lines)


def _ort_runner(source: bytes | str, threads: int) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    # No spinning: the variants take turns on the cores, and an idle spinning pool would slow the next.
    sess = session(source, threads, spinning=False)
    names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return sess.run(out_names, {k: feeds[k] for k in names if k in feeds})

    return run


def _count_nodes(path: str) -> int | None:
    try:
        return sum(1 for _ in ir.load(path).graph.all_nodes())
    except ir.IRError:  # a peer's output our IR cannot read is still timed
        return None


def _is_decoder(model: ir.Model) -> bool:
    return any("logits" in v.name for v in model.graph.outputs)


def _ort_optimizer(path: str, model: ir.Model, quantize: bool, folder: str) -> str:
    from onnxruntime.transformers.optimizer import optimize_model

    kind = "gpt2" if _is_decoder(model) else "bert"
    opt = optimize_model(path, model_type=kind, num_heads=0, hidden_size=0, opt_level=99)
    out = os.path.join(folder, "ort_optimizer.onnx")
    opt.save_model_to_file(out)
    if not quantize:
        return out
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q = os.path.join(folder, "ort_optimizer_int8.onnx")
    # DefaultTensorType=1 (float): the optimizer's output lacks some value types quantize_dynamic needs.
    quantize_dynamic(out, q, per_channel=True, weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": 1})
    return q


def _onnxscript_fusions(path: str, folder: str) -> str:
    import onnx_ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    m = onnx_ir.load(path)
    m, _ = optimize_for_ort(m)
    out = os.path.join(folder, "onnxscript_ort.onnx")
    onnx_ir.save(m, out)
    return out


def _openvino(path: str, threads: int) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads})
    req = compiled.create_infer_request()

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        res = req.infer(feeds)
        return [np.asarray(res[o]) for o in compiled.outputs]

    return run


def run_bench(
    model_path: str,
    *,
    target: str = "x86",
    quantize: str | None = None,
    batch: int = 1,
    seq: int = 128,
    threads: int = 2,
    rounds: int = 10,
    runs_per_round: int = 5,
    peers: tuple[str, ...] = ("ort-optimizer", "onnxscript", "openvino"),
    compile_options: dict[str, Any] | None = None,
    pipeline: str | None = None,
    progress: Callable[[str], None] | None = None,
    compiled: str | None = None,
) -> BenchResult:
    """Benchmark ``model_path``: the original, the peers and ours, interleaved, same feeds and threads.

    ``compiled``: a model already compiled from ``model_path`` for ``target`` (and ``quantize``),
    timed as ours instead of compiling again (the benchmark matrix reuses one across shapes).
    """
    from .compile import compile_model
    from .flops import matmul_flops, measure_gemm_peak

    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # peers' internal sessions warn about hardware-specific output
    say = progress or (lambda msg: None)
    folder = tempfile.mkdtemp(prefix="passes-bench-")
    model = ir.load(model_path)
    variants: list[Variant] = []

    def add(name: str, make: Callable[[], Callable[[dict[str, np.ndarray]], list[np.ndarray]]],
            source: str | None = None) -> None:
        say(f"preparing {name}")
        try:
            v = Variant(name, runner=make())
            v.nodes = _count_nodes(source) if source else None
        except Exception as e:  # a peer tool that crashes is a row that says so
            v = Variant(name, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        variants.append(v)

    add("onnxruntime (original)", lambda: _ort_runner(model_path, threads), model_path)
    if "ort-optimizer" in peers:
        label = "ORT transformers optimizer" + (" + quantize_dynamic" if quantize else "")
        holder: dict[str, str] = {}

        def make_ort() -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
            holder["p"] = _ort_optimizer(model_path, model, bool(quantize), folder)
            return _ort_runner(holder["p"], threads)

        add(label, make_ort)
        if "p" in holder:
            variants[-1].nodes = _count_nodes(holder["p"])
    if "onnxscript" in peers:
        holder2: dict[str, str] = {}

        def make_os() -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
            holder2["p"] = _onnxscript_fusions(model_path, folder)
            return _ort_runner(holder2["p"], threads)

        add("onnxscript ORT fusions", make_os)
        if "p" in holder2:
            variants[-1].nodes = _count_nodes(holder2["p"])
    if "openvino" in peers:
        try:
            import openvino  # noqa: F401

            add("OpenVINO (CPU default)", lambda: _openvino(model_path, threads))
        except ImportError:
            pass
    ours_path = compiled or os.path.join(folder, "ours.onnx")

    def make_ours() -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
        if compiled is not None:
            return _ort_runner(compiled, threads)
        res = compile_model(model_path, target, pipeline, quantize=quantize, options=compile_options,
                            static_shapes=None, progress=say)
        ir.save(res.model, ours_path)
        return _ort_runner(ours_path, threads)

    add(f"ours ({target}{', ' + quantize if quantize else ''})", make_ours)
    if os.path.exists(ours_path):
        variants[-1].nodes = _count_nodes(ours_path)

    ref_sess = session(model_path, threads)
    feeds = make_feeds(model, ref_sess.get_inputs(), batch=batch, seq=seq, bindings={})
    ref = ref_sess.run(None, feeds)
    out_names = [o.name for o in ref_sess.get_outputs()]
    live = [v for v in variants if v.runner is not None]
    accuracy: dict[str, Any] = {}
    for v in live:
        try:
            got = v.runner(feeds)  # type: ignore[misc]
            accuracy[v.name] = compare_outputs(out_names[:1], ref[:1], got[:1])
            for _ in range(3):
                v.runner(feeds)  # type: ignore[misc]
        except Exception as e:
            v.error, v.runner = f"{type(e).__name__}: {str(e).splitlines()[0]}", None
    live = [v for v in variants if v.runner is not None]
    for r in range(rounds):
        say(f"timing round {r + 1}/{rounds}")
        for v in live:
            for _ in range(runs_per_round):
                t = time.perf_counter()
                v.runner(feeds)  # type: ignore[misc]
                v.times.append(time.perf_counter() - t)
    say("measuring the GEMM peak")
    peak32 = measure_gemm_peak(threads)
    peak8 = measure_gemm_peak(threads, int8=True)
    flops = matmul_flops(model_path, feeds)
    base = float(np.median(variants[0].times)) if variants[0].times else float("nan")
    rows = []
    for v in variants:
        if v.runner is None:
            rows.append({"name": v.name, "error": v.error})
            continue
        med = float(np.median(v.times))
        gflops = flops / med / 1e9
        peak = peak8 if (quantize and v.name != "onnxruntime (original)") else peak32
        cmp = accuracy[v.name]
        rows.append({
            "name": v.name, "nodes": v.nodes, "median_ms": med * 1e3,
            "p90_ms": float(np.percentile(v.times, 90)) * 1e3, "speedup": base / med,
            "max_abs": cmp.max_abs, "cosine": cmp.cosine, "gflops": gflops, "of_peak": gflops / peak,
        })
    setup = {"batch": batch, "seq": seq, "threads": threads, "rounds": rounds, "runs_per_round": runs_per_round,
             "gflop": flops / 1e9, "peak_fp32": peak32, "peak_int8": peak8, "model": model_path,
             "target": target, "quantize": quantize}
    return BenchResult(rows, setup)


def plot(result: BenchResult, path: str, title: str = "") -> str | None:
    """Write a horizontal bar chart of median latency; returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in result.rows if not r.get("error")]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.2))
    names = [r["name"] for r in rows][::-1]
    vals = [r["median_ms"] for r in rows][::-1]
    colors = ["tab:green" if n.startswith("ours") else "tab:gray" for n in names]
    ax.barh(names, vals, color=colors)
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.2f} ms", va="center", fontsize=8)
    s = result.setup
    ax.set_xlabel("median latency (ms), lower is better")
    ax.set_title(title or f"{os.path.basename(s['model'])}: batch {s['batch']}, seq {s['seq']}, {s['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(prog="tfcompile bench", description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--target", default="x86")
    p.add_argument("--quantize", choices=["int8"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--runs", type=int, default=5, help="runs per variant per round")
    p.add_argument("--plot", help="PNG path for the bar chart (default: <model>.bench.png)")
    p.add_argument("--pipeline", help="pipeline string overriding the target's default")
    p.add_argument("--no-peers", action="store_true", help="time only the original and ours")
    args = p.parse_args(argv)
    if not os.path.isfile(args.model):
        print(f"error: {args.model}: no such file", file=sys.stderr)
        return 2
    try:
        res = run_bench(
            args.model, target=args.target, quantize=args.quantize, batch=args.batch, seq=args.seq,
            threads=args.threads, rounds=args.rounds, runs_per_round=args.runs, pipeline=args.pipeline,
            peers=() if args.no_peers else ("ort-optimizer", "onnxscript", "openvino"),
            progress=lambda m: print(f"bench: {m}", file=sys.stderr, flush=True),
        )
    except (ir.IRError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res.table())
    png = plot(res, args.plot or os.path.splitext(args.model)[0] + ".bench.png")
    if png:
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
