"""Fusion benchmark (fp32): all-MiniLM-L6-v2 at sequence 16 and 128, BERT-base at 128.

For each model and sequence, in one interleaved run with 2 threads and batch 1: the original in
onnxruntime, onnxruntime's transformers optimizer (opt_level 99), the onnxscript ORT fusions (on
the dynamo export, where they work best) and ours for x86. Prints one table per case with each
row's fraction of the measured GEMM ceiling, and writes a markdown summary and bar charts.

    python benchmarks/bench_fusions.py [--out out/bench_fusions] [--rounds 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from passes.tools.bench import plot, run_bench  # noqa: E402
from passes.tools.export import export, load_model  # noqa: E402


def _export(name: str, folder: Path, dynamo: bool) -> Path:
    path = folder / f"{name}_{'dynamo' if dynamo else 'ts'}.onnx"
    if not path.is_file():
        print(f"exporting {name} ({'dynamo' if dynamo else 'torchscript'})", file=sys.stderr, flush=True)
        export(load_model(name), path, dynamo=dynamo)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "out" / "bench_fusions"))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = [("minilm", 16), ("minilm", 128), ("bert-base", 128)]
    md = ["# Fusion benchmark (fp32, batch 1, 2 threads)\n"]
    for name, seq in cases:
        for dynamo in (False, True):
            model = _export(name, out, dynamo)
            res = run_bench(str(model), target="x86", seq=seq, threads=args.threads, rounds=args.rounds,
                            progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
            title = f"{name} ({'dynamo' if dynamo else 'TorchScript'} export), seq {seq}"
            table = res.table()
            print(f"\n== {title} ==\n{table}\n", flush=True)
            png = plot(res, str(out / f"{name}_{'dynamo' if dynamo else 'ts'}_seq{seq}.png"), title)
            md.append(f"## {title}\n\n```\n{table}\n```\n" + (f"\n![{title}]({Path(png).name})\n" if png else ""))
    (out / "results.md").write_text("\n".join(md))
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
