"""Every zoo architecture (``passes.tools.zoo``) × both exporters: ours against the original and both peers.

One interleaved run per export (round robin over the variants, same feeds and threads, thread
spinning off): the original in onnxruntime, onnxruntime's transformers optimizer with the closest
model type, onnxscript's ``optimize_for_ort``, and ours (``x86``). Latency at batch 1, sequence
128 (vision models: their patch count), 2 threads. Numerics of every variant are judged against
torch on the padded batch of 2 of the zoo's reference (non-padded positions; max abs ≤ 1e-4, or
1e-6 relative to the outputs' magnitude when larger). Prints a table, the CPU flags that matter
and a summary line: on how many exports each tool fused attention in every layer with numerics
intact.

    python benchmarks/bench_architectures.py [--archs bert,llama] [--exporters script,dynamo]
        [--exports DIR] [--rounds 10] [--runs 5] [--out results.md]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

import ir  # noqa: E402
from passes.framework.numerics import make_feeds, session  # noqa: E402
from passes.tools import zoo  # noqa: E402
from passes.tools.bench import _onnxscript_fusions, _ort_runner  # noqa: E402

#: Attention ops of any tool (the peers also emit packed and sparse forms).
ATTENTION_OPS = zoo.FUSED_OPS["attention"] | {"PackedAttention", "PackedMultiHeadAttention", "SparseAttention",
                                              "DecoderMaskedMultiHeadAttention", "DecoderMaskedSelfAttention"}
TOOLS = ("original", "ort-optimizer", "onnxscript", "ours")


def cpu_flags() -> dict[str, bool]:
    """The CPU flags that decide kernels (from /proc/cpuinfo; all False elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    return {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")}


def _ops(path: str) -> Counter[str]:
    try:
        return Counter(n.op_type for n in ir.load(path).graph.all_nodes())
    except Exception:  # a peer's output our IR cannot read: count with onnx
        import onnx  # noqa: TID251 - counting a peer's output only

        return Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)


def _ort_optimizer(path: str, arch: zoo.Arch, folder: str) -> str:
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = arch.config()
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or getattr(cfg, "n_heads", 0)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", 0)
    if isinstance(heads, list):  # swin: per stage
        heads, hidden = 0, 0
    opt = optimize_model(path, model_type=arch.ort_type, num_heads=int(heads), hidden_size=int(hidden), opt_level=99)
    out = os.path.join(folder, "ort_optimizer.onnx")
    opt.save_model_to_file(out)
    return out


def _ours(path: str, folder: str) -> str:
    from passes import compile_model

    res = compile_model(path, "x86")
    out = os.path.join(folder, "ours.onnx")
    ir.save(res.model, out)
    return out


def bench_export(name: str, exporter: str, export_dir: Path, *, rounds: int, runs: int, threads: int, seq: int
                 ) -> dict[str, Any]:
    """Prepare every variant of one export, check numerics, then time them interleaved."""
    arch = zoo.get(name)
    folder = export_dir / f"{name}-{exporter}"
    if not (folder / "reference.npz").is_file():
        zoo.export_arch(name, folder, dynamo=exporter == "dynamo")
    src = str(folder / "model.onnx")
    work = tempfile.mkdtemp(prefix=f"bench-arch-{name}-")
    ref = dict(np.load(folder / "reference.npz"))
    expected = ref.pop("expected")
    keep = ref["attention_mask"].astype(bool) if "attention_mask" in ref else np.ones(expected.shape[:2], bool)
    scale = float(np.abs(expected[keep]).max())

    makers = {"original": lambda: src, "ort-optimizer": lambda: _ort_optimizer(src, arch, work),
              "onnxscript": lambda: _onnxscript_fusions(src, work), "ours": lambda: _ours(src, work)}
    rows: dict[str, dict[str, Any]] = {}
    runners = {}
    model = ir.load(src)
    sess = session(src, threads)
    feeds = make_feeds(model, sess.get_inputs(), batch=1, seq=seq)
    for tool in TOOLS:
        row: dict[str, Any] = {}
        try:
            path = makers[tool]()
            run = _ort_runner(path, threads)
            got = run(ref)[0]
            err = float(np.abs(got - expected)[keep].max())
            row.update(max_abs=err, ok=err <= max(1e-4, 1e-6 * scale),
                       attention=sum(_ops(path)[op] for op in ATTENTION_OPS))
            for _ in range(3):
                run(feeds)
            runners[tool] = run
        except Exception as e:  # a tool that crashes or whose output does not run is a row saying so
            row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"
        row["times"] = []
        rows[tool] = row
    for _ in range(rounds):
        for tool, run in runners.items():
            for _ in range(runs):
                t = time.perf_counter()
                run(feeds)
                rows[tool]["times"].append(time.perf_counter() - t)
    for row in rows.values():
        row["ms"] = float(np.median(row["times"])) * 1e3 if row["times"] else None
        row["all_layers"] = bool(row.get("ok")) and row.get("attention", 0) >= arch.layers
        del row["times"]
    tokens = next(iter(feeds.values())).shape[1] if arch.inputs == "text" else expected.shape[1]
    return {"name": name, "exporter": exporter, "tools": rows, "tokens": int(tokens)}


def _cell(row: dict[str, Any], base: float | None) -> str:
    if "error" in row:
        return "crash"
    speed = f" ({base / row['ms']:.2f}x)" if base and row["ms"] else ""
    bad = "" if row["ok"] else " BAD"
    return f"{row['ms']:.2f}{speed}{bad}"


def table(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table and the summary line."""
    head = ("| architecture | exporter | tokens | original ms | ORT optimizer ms | onnxscript ms | ours ms "
            "| attention fused (ORT/onnxscript/ours) |")
    lines = [head, "|" + "---|" * 8]
    for r in results:
        t = r["tools"]
        base = t["original"].get("ms")
        att = "/".join(("crash" if "error" in t[k] else str(t[k]["attention"])) for k in ("ort-optimizer", "onnxscript", "ours"))
        lines.append(f"| {r['name']} | {r['exporter']} | {r['tokens']} | {_cell(t['original'], None)} | "
                     f"{_cell(t['ort-optimizer'], base)} | {_cell(t['onnxscript'], base)} | {_cell(t['ours'], base)} "
                     f"| {att} |")
    n = len(results)
    summary = [f"attention fused in every layer with numerics intact, of {n} exports:"]
    for tool in ("ort-optimizer", "onnxscript", "ours"):
        count = sum(r["tools"][tool].get("all_layers", False) for r in results)
        crashes = sum("error" in r["tools"][tool] for r in results)
        ratios = [r["tools"]["original"]["ms"] / r["tools"][tool]["ms"] for r in results
                  if r["tools"][tool].get("ms") and r["tools"]["original"].get("ms")]
        geo = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else float("nan")
        summary.append(f"{tool} {count}/{n} (crashes {crashes}, geomean speedup {geo:.2f}x)")
    return "\n".join(lines) + "\n\n" + " ".join(summary[:1]) + " " + "; ".join(summary[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default=",".join(zoo.names()))
    p.add_argument("--exporters", default="script,dynamo")
    p.add_argument("--exports", default=None, help="folder of zoo exports to reuse (NAME-EXPORTER/ subfolders)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    flags = cpu_flags()
    print("CPU flags: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()), flush=True)
    export_dir = Path(args.exports or tempfile.mkdtemp(prefix="zoo-exports-"))
    results = []
    start = time.perf_counter()
    for name in args.archs.split(","):
        for exporter in args.exporters.split(","):
            try:
                r = bench_export(name, exporter, export_dir, rounds=args.rounds, runs=args.runs,
                                 threads=args.threads, seq=args.seq)
            except Exception as e:  # an export that fails is reported, the run goes on
                print(f"{name} {exporter}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
                continue
            results.append(r)
            print(table([r]).splitlines()[2], file=sys.stderr, flush=True)
    text = (f"batch 1, sequence {args.seq} (vision: patch count), {args.threads} threads, spinning off, "
            f"{args.rounds} interleaved rounds x {args.runs} runs, medians; "
            f"CPU flags: {', '.join(k for k, v in flags.items() if v) or 'none'}; "
            f"{time.perf_counter() - start:.0f} s\n\n" + table(results))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
