"""The benchmark matrix: all-MiniLM-L6-v2 (real weights), BERT-base, GPT-2 × batch {1, 8} × sequence
{32, 128} × {fp32, int8}, each case one interleaved ``passes.tools.bench`` run (original, onnxruntime's
transformers optimizer [+ quantize_dynamic], onnxscript ORT fusions, OpenVINO when installed, ours).

Writes ``benchmarks/results.md`` (every table, rows where a peer tool crashed say so) and a PNG per
case. Long: ours is compiled once per model and precision (the last full run, which still compiled once
per shape, took 84 minutes on 2 cores); ``--quick`` runs batch 1, sequence 128 only.

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

import targets  # noqa: E402
from passes.tools.bench import plot, run_bench  # noqa: E402
from passes.tools.export import export, load_model, minilm_dir  # noqa: E402

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


def _compiled(src: Path, target: str, quant: str | None, calib: dict | None, cache: dict) -> str:
    """Ours for ``src``, compiled (and calibrated) once per model and precision, reused for every shape."""
    key = (src, quant)
    if key not in cache:
        from passes import compile_model

        import ir

        print(f"   compiling {src.name} for {target}{' ' + quant if quant else ''}", file=sys.stderr, flush=True)
        res = compile_model(str(src), target, quantize=quant, options=dict(calib) if quant and calib else None,
                            progress=lambda m: print(f"   {m}", file=sys.stderr, flush=True))
        if res.report.verified_ok is False:
            raise RuntimeError(f"compiled {src.name} is out of tolerance: {res.report.verification}")
        path = src.with_name(f"{src.stem}.{target}.{quant or 'fp32'}.onnx")
        ir.save(res.model, path)
        cache[key] = str(path)
    return cache[key]


def summary_row(label: str, rows: list[dict]) -> str:
    """One markdown row: each variant's median (cosine for int8), ours against the best peer."""
    ok = {r["name"]: r for r in rows if "median_ms" in r}
    ours = next((r for n, r in ok.items() if n.startswith("ours")), None)
    ort = next((r for n, r in ok.items() if n.startswith("ORT transformers")), None)
    peers = [r["median_ms"] for n, r in ok.items() if not n.startswith("ours")]

    def cell(r: dict | None, cos: bool) -> str:
        return "failed" if r is None else f"{r['median_ms']:.1f}" + (f" ({r['cosine']:.4f})" if cos else "")

    quant = "int8" in label
    ratio = lambda ref: f"{ours['median_ms'] / ref:.2f}" if ours and ref else "-"  # noqa: E731
    return (f"| {label} | {cell(ok.get('onnxruntime (original)'), False)} | {cell(ort, quant)} | "
            f"{cell(ok.get('onnxscript ORT fusions'), False)} | {cell(ours, quant)} | "
            f"{ratio(ort['median_ms'] if ort else None)} | {ratio(min(peers) if peers else None)} |")


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
        f"target `{args.target}` (= `{targets.get(args.target).name}`); commit {commit or '?'}; {time.strftime('%Y-%m-%d')}. Each table is one interleaved run "
        "(int8 rows calibrated on benchmarks/data/sentences.txt, GPT-2 on generated inputs). "
        "Regenerate: `python benchmarks/run_all.py`.\n",
    ]
    summary = ["## Summary (median ms; int8 cells add the cosine to the original on generated inputs)\n",
               "| case | original | ORT optimizer (+ quantize_dynamic) | onnxscript | ours | ours / ORT | ours / best peer |",
               "|---|---|---|---|---|---|---|"]
    compiled: dict = {}
    for name, batch, seq, quant in itertools.product(MODELS, batches, seqs, (None, "int8")):
        label = f"{MODELS[name]}, batch {batch}, seq {seq}, {quant or 'fp32'}"
        print(f"== {label}", file=sys.stderr, flush=True)
        try:
            src = _model_path(name, work)
            res = run_bench(str(src), target=args.target, quantize=quant, batch=batch, seq=seq,
                            threads=args.threads, rounds=args.rounds,
                            compiled=_compiled(src, args.target, quant, calib if name != "gpt2-base" else None, compiled),
                            progress=lambda m: print(f"   {m}", file=sys.stderr, flush=True))
        except Exception as e:  # one broken case must not lose the others
            md.append(f"## {label}\n\nfailed: {type(e).__name__}: {e}\n")
            summary.append(f"| {label} | failed: {type(e).__name__} | | | | | |")
            continue
        summary.append(summary_row(label, res.rows))
        png = plot(res, str(out / f"bench_{name}_b{batch}_s{seq}_{quant or 'fp32'}.png"), label)
        md.append(f"## {label}\n\n```\n{res.table()}\n```\n" + (f"\n![{label}]({Path(png).name})\n" if png else ""))
        print(res.table(), flush=True)
        (out / "results.md").write_text("\n".join(md[:2] + summary + [""] + md[2:]))
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
