"""The benchmark matrix: all-MiniLM-L6-v2 (real weights), BERT-base, GPT-2 × batch {1, 8} × sequence
{32, 128} × {fp32, int8}, each case one interleaved ``passes.bench`` run (original, onnxruntime's
transformers optimizer [+ quantize_dynamic], onnxscript ORT fusions, OpenVINO when installed, ours).

Writes ``benchmarks/results.md`` (every table, rows where a peer tool crashed say so) and a PNG per
case. Long: about an hour on 2 cores; ``--quick`` runs batch 1, sequence 128 only.

    python benchmarks/run_all.py [--quick] [--target native] [--rounds 5]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from passes.bench import plot, run_bench  # noqa: E402
from passes.export import export, load_model, minilm_dir  # noqa: E402

MODELS = {"minilm": "all-MiniLM-L6-v2", "bert-base": "BERT-base (random init)", "gpt2-base": "GPT-2 (default config)"}


def _model_path(name: str, folder: Path) -> Path:
    path = folder / f"{name}.onnx"
    if not path.is_file():
        print(f"exporting {name}", file=sys.stderr, flush=True)
        if name == "gpt2-base":
            from transformers import GPT2Config, GPT2LMHeadModel

            import torch

            torch.manual_seed(0)
            model = GPT2LMHeadModel(GPT2Config()).eval()
        else:
            model = load_model(name)
        export(model, path)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks"))
    p.add_argument("--work", default=str(ROOT / "out" / "run_all"))
    p.add_argument("--target", default="native")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="batch 1, sequence 128 only")
    args = p.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    batches, seqs = ([1], [128]) if args.quick else ([1, 8], [32, 128])
    calib = {"tokenizer": str(minilm_dir()), "texts": str(ROOT / "benchmarks" / "data" / "sentences.txt")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    md = [
        "# Benchmark matrix\n",
        f"Machine: {platform.machine()} ({platform.processor() or 'cpu'}), {os.cpu_count()} cores; {args.threads} threads; "
        f"target `{args.target}`; commit {commit or '?'}; {time.strftime('%Y-%m-%d')}. Each table is one interleaved run "
        "(int8 rows calibrated on benchmarks/data/sentences.txt, GPT-2 on generated inputs). "
        "Regenerate: `python benchmarks/run_all.py`.\n",
    ]
    for name, batch, seq, quant in itertools.product(MODELS, batches, seqs, (None, "int8")):
        label = f"{MODELS[name]}, batch {batch}, seq {seq}, {quant or 'fp32'}"
        print(f"== {label}", file=sys.stderr, flush=True)
        try:
            res = run_bench(str(_model_path(name, work)), target=args.target, quantize=quant, batch=batch, seq=seq,
                            threads=args.threads, rounds=args.rounds,
                            compile_options=calib if quant and name != "gpt2-base" else None,
                            progress=lambda m: print(f"   {m}", file=sys.stderr, flush=True))
        except Exception as e:  # one broken case must not lose the others
            md.append(f"## {label}\n\nfailed: {type(e).__name__}: {e}\n")
            continue
        png = plot(res, str(out / f"bench_{name}_b{batch}_s{seq}_{quant or 'fp32'}.png"), label)
        md.append(f"## {label}\n\n```\n{res.table()}\n```\n" + (f"\n![{label}]({Path(png).name})\n" if png else ""))
        print(res.table(), flush=True)
        (out / "results.md").write_text("\n".join(md))
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
