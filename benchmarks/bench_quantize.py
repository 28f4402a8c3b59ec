"""Benchmark: int8 all-MiniLM-L6-v2 (or BERT-base), ours against onnxruntime's optimizer + quantize_dynamic.

    /work/venv/bin/python benchmarks/bench_quantize.py [--model minilm|bert-base] [--reps 7] [--runs 20]
        [--min-cosine 0.999 0.998] [--targets x86-avx2] [--fused-input]

Models (all from the same TorchScript export of the shipped all-MiniLM-L6-v2 weights, or of BERT-base
from the default BertConfig with random init, which shares MiniLM's uncased 30522-token vocabulary and
so its tokenizer):

* ``fp32``: the export as is;
* ``ort-opt+qdyn``: ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert",
  opt_level=99)`` then ``onnxruntime.quantization.quantize_dynamic(per_channel=True)``;
* ``ours <target> @<min_cosine>``: ``compile_model(target, quantize="int8")`` calibrated on half of
  ``benchmarks/data/sentences.txt`` (the target pipeline; passes not registered yet are left out),
  one model per ``--min-cosine`` budget;
* ``ours <target> (ort-fused input)`` (``--fused-input``): the same quantize pass on the graph fused by onnxruntime's
  python optimizer at ``opt_level=0`` (Attention/SkipLayerNormalization/BiasGelu, no runtime-specific
  rewrites), showing what the pass does on a fused graph.

Latency: batch 1, sequence 128, 2 intra-op threads, repetitions interleaved across models (the
machine is shared: the load average is printed before and after). Accuracy: mean-pooled sentence
embeddings of the other half of the sentences, cosine to fp32 (mean and worst).
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ir  # noqa: E402
import targets  # noqa: E402
from passes import compile_model, registered_passes  # noqa: E402
from passes.tools.export import export, load_model, minilm_dir  # noqa: E402

SENTENCES = ROOT / "benchmarks" / "data" / "sentences.txt"
#: model name → (heads, hidden) for onnxruntime's optimizer.
SHAPES = {"minilm": (12, 384), "bert-base": (12, 768)}


def _session(path: str, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _tokenizer():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=128)
    tok.enable_padding()
    return tok


def _feeds(sess, enc) -> dict[str, np.ndarray]:
    cols = {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}
    names = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in cols.items() if k in names}


def embeddings(path: str, texts: list[str]) -> np.ndarray:
    sess, tok = _session(path), _tokenizer()
    out = []
    for i in range(0, len(texts), 16):
        enc = tok.encode_batch(texts[i : i + 16])
        feeds = _feeds(sess, enc)
        h = sess.run(None, feeds)[0].astype(np.float64)
        m = feeds["attention_mask"][..., None].astype(np.float64)
        out.append((h * m).sum(1) / m.sum(1))
    return np.concatenate(out)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def pipeline_for(target: str) -> str:
    """The target's pipeline plus quantization, without passes that are not registered yet."""
    t = targets.get(target)
    known = set(registered_passes())
    parts = [p for p in f"{t.pipeline},{t.quantize_pipeline}".split(",") if p.split("{")[0].strip() in known]
    return ",".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(SHAPES), default="minilm")
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions")
    ap.add_argument("--runs", type=int, default=20, help="runs per model per repetition")
    ap.add_argument("--min-cosine", type=float, nargs="+", default=[0.999])
    ap.add_argument("--targets", nargs="+", default=["x86-avx2"])
    ap.add_argument("--fused-input", action="store_true", help="also quantize onnxruntime's fused graph")
    ap.add_argument("--work", default=None, help="folder for the models (default: a temp folder)")
    args = ap.parse_args()

    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="bench-quantize-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    lines = [s.strip() for s in SENTENCES.read_text().splitlines() if s.strip()]
    calib, held_out = lines[1::2], lines[0::2]
    (work / "calib.txt").write_text("\n".join(calib))

    src = work / f"{args.model}.onnx"
    if not src.exists():
        export(load_model(args.model, attn_implementation="eager"), src)
    heads, hidden = SHAPES[args.model]
    models: dict[str, str] = {"fp32": str(src)}

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    ort_opt, ort_q = work / f"{args.model}-ort-opt.onnx", work / f"{args.model}-ort-opt-qdyn.onnx"
    optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=99).save_model_to_file(str(ort_opt))
    import onnx

    quantize_dynamic(str(ort_opt), str(ort_q), per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    models["ort-opt+qdyn(per-channel)"] = str(ort_q)

    fused = work / "ort-fused-opt0.onnx"
    if args.fused_input:
        optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0).save_model_to_file(str(fused))

    compile_times: dict[str, float] = {}
    runs = [(f"ours {t} @{mc}", src, pipeline_for(t), t, mc) for t in args.targets for mc in args.min_cosine]
    if args.fused_input:
        runs += [(f"ours {t} (ort-fused) @{mc}", fused, "quantize,dead-flow", t, mc)
                 for t in args.targets for mc in args.min_cosine]
    for label, source, pipe, target, mc in runs:
        options = {"tokenizer": str(minilm_dir()), "texts": str(work / "calib.txt"), "min_cosine": mc}
        t0 = time.perf_counter()
        res = compile_model(str(source), target, pipe, quantize="int8", options=dict(options),
                            progress=lambda m: print(f"  [{label}] {m}", file=sys.stderr, flush=True))
        compile_times[label] = time.perf_counter() - t0
        out = work / f"{args.model}-{label.replace(' ', '_').replace('(', '').replace(')', '').replace('@', '')}.onnx"
        ir.save(res.model, out)
        models[label] = str(out)
        for d in res.report.diagnostics:
            if d.pass_name == "quantize":
                print(f"  [{label}] {d}")
        print(f"  [{label}] pipeline {pipe}; compiled in {compile_times[label]:.1f} s; "
              f"stats {dict(res.report.stats)}", flush=True)

    ref = embeddings(str(src), held_out)
    acc = {name: cosines(ref, embeddings(path, held_out)) for name, path in models.items()}

    tok = _tokenizer()
    tok.no_padding()
    long_text = " ".join(lines)
    sessions = {name: _session(path) for name, path in models.items()}
    feeds = {name: _feeds(s, [tok.encode(long_text)]) for name, s in sessions.items()}
    assert all(f["input_ids"].shape == (1, 128) for f in feeds.values())
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, s in sessions.items():  # warm up
        for _ in range(3):
            s.run(None, feeds[name])
    for _ in range(args.reps):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(args.runs):
                s.run(None, feeds[name])
            times[name].append((time.perf_counter() - t0) / args.runs * 1000)
    print(f"load average after: {os.getloadavg()}")

    base = statistics.median(times["ort-opt+qdyn(per-channel)"])
    fp32 = statistics.median(times["fp32"])
    print(f"\n{args.model}, batch 1, seq 128, 2 threads, {args.reps} interleaved reps x {args.runs} runs; "
          f"accuracy on {len(held_out)} held-out sentences (calibrated on {len(calib)} others)\n")
    print(f"| {'model':<38} | {'median ms':>9} | {'vs fp32':>7} | {'vs ort-q':>8} | {'mean cos':>8} | {'worst cos':>9} |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 9}|{'-' * 10}|{'-' * 10}|{'-' * 11}|")
    for name in models:
        med = statistics.median(times[name])
        c = acc[name]
        print(f"| {name:<38} | {med:9.2f} | {med / fp32:6.2f}x | {med / base:7.2f}x | {c.mean():8.5f} | {c.min():9.5f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
