"""Benchmark: ``--autotune`` on all-MiniLM-L6-v2 (or BERT-base) against onnxruntime's optimizer, fp32 and + quantize_dynamic.

    .venv/bin/python benchmarks/bench_autotune.py [--model minilm|bert-base] [--seqs 128 16]
        [--min-cosine 0.997] [--min-mean-cosine 0.999] [--rounds 10] [--runs 10]

``bert-base`` is the default ``transformers.BertConfig`` with random weights (seed 0), fed the same
real sentences through MiniLM's tokenizer (the same uncased vocabulary).

For each sequence length (batch 1, 2 intra-op threads, thread spinning off):

* ``ORT fp32``: ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert", opt_level=99)``;
* ``ORT-q``: that, then ``quantize_dynamic(per_channel=True, QInt8)``;
* every ``--autotune`` candidate (:func:`passes.tools.autotune.candidates` for ``--target native``),
  the winner marked ``*``: autotune times them on generated inputs of that length and checks them on
  the calibration half of ``benchmarks/data/sentences.txt`` (worst cosine >= ``--min-cosine`` and
  mean >= ``--min-mean-cosine``), one sentence a call (its timing batch).

All of them are then timed again in ONE interleaved run here (round robin, same real-sentence input)
and scored on the other, held-out half of the sentences: cosine of the mean-pooled sentence embedding
to the original fp32 model's (mean and worst), one sentence a call (as timed) and in padded batches of 16. Prints the CPU flags, a table per sequence with latency
ratios, and writes a latency-vs-worst-cosine scatter plot (``benchmarks/bench_autotune.png``).
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
from passes.framework.numerics import session  # noqa: E402
from passes.tools.autotune import KEY_FLAGS, autotune, candidates, host_cpu_flags  # noqa: E402
from passes.tools.export import export, load_model, minilm_dir  # noqa: E402

SENTENCES = ROOT / "benchmarks" / "data" / "sentences.txt"


def _tokenizer(max_length: int = 128):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding()
    return tok


def _feeds(names: set[str], enc) -> dict[str, np.ndarray]:
    cols = {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}
    return {k: v for k, v in cols.items() if k in names}


def embeddings(sess, texts: list[str], batch: int = 16) -> np.ndarray:
    tok, names = _tokenizer(), {i.name for i in sess.get_inputs()}
    out = []
    for i in range(0, len(texts), batch):
        feeds = _feeds(names, tok.encode_batch(texts[i : i + batch]))
        h = sess.run(None, feeds)[0].astype(np.float64)
        m = feeds["attention_mask"][..., None].astype(np.float64)
        out.append((h * m).sum(1) / m.sum(1))
    return np.concatenate(out)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def timing_feeds(names: set[str], lines: list[str], seq: int) -> dict[str, np.ndarray]:
    """One real input of exactly ``seq`` tokens (the sentences joined, truncated)."""
    tok = _tokenizer(seq)
    tok.no_padding()
    feeds = _feeds(names, [tok.encode(" ".join(lines))])
    assert feeds["input_ids"].shape == (1, seq), feeds["input_ids"].shape
    return feeds


#: issue #14's proof budget on the held-out sentences: (worst, mean) cosine
ISSUE_BUDGET = (0.997, 0.999)
#: ``--model``: (load_model name, heads, hidden size) for onnxruntime's optimizer
MODELS = {"minilm": ("minilm", 12, 384), "bert-base": ("bert-base", 12, 768)}


def ort_models(src: pathlib.Path, work: pathlib.Path, heads: int = 12, hidden: int = 384) -> tuple[str, str]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    opt, q = work / "ort-opt.onnx", work / "ort-opt-qdyn.onnx"
    if not q.exists():
        optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden,
                       opt_level=99).save_model_to_file(str(opt))
        quantize_dynamic(str(opt), str(q), per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return str(opt), str(q)


#: the speed bound row: every candidate op int8 with the target's policy, no accuracy budget
BOUND = "bound: every op int8, no budget"


def every_op_int8(src: pathlib.Path, work: pathlib.Path, target: targets.Target) -> str:
    """The target's pipeline with every quantize candidate int8 (``sensitivity=false``): how fast int8
    is on this host when accuracy is no object, beside what the budget lets autotune keep."""
    from passes import compile_model

    path = work / f"bound-{target.name}.onnx"
    if not path.exists():
        ir.save(compile_model(str(src), target, quantize="int8", verify=False,
                              options={"sensitivity": False}).model, str(path))
    return str(path)


def run_seq(seq: int, src: pathlib.Path, work: pathlib.Path, lines: list[str], held_out: list[str],
            args: argparse.Namespace, compiled: dict) -> list[dict]:
    target = targets.get("native")
    print(f"\n== seq {seq}: autotune on {target.name} ==", flush=True)
    t0 = time.perf_counter()
    cands = [c for c in candidates(target) if not args.only or any(o in c.name for o in args.only)]
    tuned = autotune(ir.load(str(src)), target, source=str(src), min_cosine=args.min_cosine, candidate_list=cands,
                     min_mean_cosine=args.min_mean_cosine, max_calibration=args.max_calibration,
                     options={"tokenizer": str(minilm_dir()), "texts": str(work / "calib.txt")},
                     batch=1, seq=seq, threads=2, budget_s=args.budget_s, use_cache=False, keep_models=True, compiled=compiled,
                     show_bar=True, progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    print(f"autotune in {time.perf_counter() - t0:.1f} s (its own timing on the sentence input at seq {seq}):")
    print(tuned.table())
    paths: dict[str, str] = {}
    _, heads, hidden = MODELS[args.model]
    paths["ORT fp32 (optimizer)"], paths["ORT-q (optimizer + quantize_dynamic)"] = ort_models(src, work, heads, hidden)
    if not args.no_bound:
        paths[BOUND] = every_op_int8(src, work, target)
    for name, m in tuned.models.items():
        p = work / f"s{seq}-{''.join(ch if ch.isalnum() else '_' for ch in name)}.onnx"
        ir.save(m, str(p))
        paths[("* " if name == tuned.winner["name"] else "") + "ours: " + name] = str(p)
    sessions = {name: session(p, 2, spinning=False) for name, p in paths.items()}
    # held-out accuracy at batch 1 (the timed shape: no padding in a call) and in padded batches of 16
    # (activation scales are per call, so padding shares each sentence's range)
    ref, ref16 = embeddings(session(str(src), 2), held_out, 1), embeddings(session(str(src), 2), held_out)
    acc = {name: cosines(ref, embeddings(s, held_out, 1)) for name, s in sessions.items()}
    acc16 = {name: cosines(ref16, embeddings(s, held_out)) for name, s in sessions.items()}
    names = {i.name for i in session(str(src), 1).get_inputs()}
    feeds = timing_feeds(names, lines, seq)
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feeds)
    for _ in range(args.rounds):  # one interleaved run over every variant
        for name, s in sessions.items():
            for _ in range(args.runs):
                t = time.perf_counter()
                s.run(None, feeds)
                times[name].append(time.perf_counter() - t)
    fp32 = statistics.median(times["ORT fp32 (optimizer)"])
    ortq = statistics.median(times["ORT-q (optimizer + quantize_dynamic)"])
    rows = []
    for name in sessions:
        med = statistics.median(times[name])
        nodes = sum(1 for _ in ir.load(paths[name]).graph.all_nodes())
        rows.append({"name": name, "seq": seq, "ms": med * 1e3, "vs_fp32": med / fp32, "vs_ortq": med / ortq,
                     "mean": float(acc[name].mean()), "worst": float(acc[name].min()), "nodes": nodes,
                     "mean16": float(acc16[name].mean()), "worst16": float(acc16[name].min())})
    print(f"\n{args.model}, batch 1, seq {seq}, 2 threads, one interleaved run: {args.rounds} rounds x {args.runs} runs; "
          f"cosines on {len(held_out)} held-out sentences (autotune calibrated on {len(lines) - len(held_out)} others, "
          f"budget worst >= {args.min_cosine}, mean >= {args.min_mean_cosine}; 'in' = held-out within issue #14's "
          f"worst >= {ISSUE_BUDGET[0]}, mean >= {ISSUE_BUDGET[1]})\n")
    print(f"| {'variant':<44} | {'nodes':>5} | {'median ms':>9} | {'vs ORT fp32':>11} | {'vs ORT-q':>8} | "
          f"{'mean cos':>8} | {'worst cos':>9} | in  | {'mean b16':>8} | {'worst b16':>9} |")
    print(f"|{'-' * 46}|{'-' * 7}|{'-' * 11}|{'-' * 13}|{'-' * 10}|{'-' * 10}|{'-' * 11}|-----|{'-' * 10}|{'-' * 11}|")
    for r in rows:
        inside = r["worst"] >= ISSUE_BUDGET[0] and r["mean"] >= ISSUE_BUDGET[1]
        print(f"| {r['name']:<44} | {r['nodes']:>5} | {r['ms']:9.2f} | {r['vs_fp32']:10.2f}x | {r['vs_ortq']:7.2f}x | "
              f"{r['mean']:8.5f} | {r['worst']:9.5f} | {'yes' if inside else 'no ':<3} | "
              f"{r['mean16']:8.5f} | {r['worst16']:9.5f} |")
    print(f"autotune winner: {tuned.winner['name']}: {tuned.reason}", flush=True)
    return rows


def plot(all_rows: list[dict], path: pathlib.Path, title: str = "all-MiniLM-L6-v2") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = sorted({r["seq"] for r in all_rows}, reverse=True)
    names = list(dict.fromkeys(r["name"].lstrip("* ") for r in all_rows))  # one number per variant, all plots
    fig, axes = plt.subplots(1, len(seqs), figsize=(6.5 * len(seqs), 5 + 0.16 * len(names)), squeeze=False)
    for ax, seq in zip(axes[0], seqs):
        for r in (r for r in all_rows if r["seq"] == seq):
            ours, win = r["name"].lstrip("* ").startswith("ours"), r["name"].startswith("*")
            bound = r["name"] == BOUND
            ax.scatter(r["ms"], 1 - r["worst"] + 1e-7, s=90 if win else 45,
                       marker="*" if win else ("o" if ours else ("x" if bound else "s")),
                       color="tab:green" if win else ("tab:blue" if ours else ("tab:red" if bound else "tab:gray")),
                       zorder=3)
            ax.annotate(str(names.index(r["name"].lstrip("* ")) + 1), (r["ms"], 1 - r["worst"] + 1e-7), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("median latency (ms), batch 1, 2 threads")
        ax.set_ylabel("1 - worst held-out sentence cosine (log; up is more accurate)")
        ax.set_title(f"{title}, seq {seq}")
        ax.grid(True, alpha=0.3)
    key = [f"{i + 1}: {n.replace('ours: ', '')}" for i, n in enumerate(names)]
    half = (len(key) + 1) // 2
    for col, part in enumerate((key[:half], key[half:])):
        fig.text(0.02 + 0.5 * col, 0.01, "\n".join(part), fontsize=7, va="bottom", family="monospace")
    fig.tight_layout(rect=(0, 0.16 * len(names) / 2 / (5 + 0.16 * len(names)) + 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="minilm")
    ap.add_argument("--source", default=None, help="an already exported ONNX file of --model (skips the export)")
    ap.add_argument("--seqs", type=int, nargs="+", default=[128, 16])
    ap.add_argument("--min-cosine", type=float, default=0.997,
                    help="autotune's budget: worst calibration cosine (the held-out proof's; the quantize pass "
                         "tightens it by the calibration-to-held-out gap it measures, margin=cv)")
    ap.add_argument("--min-mean-cosine", type=float, default=0.999, help="autotune's budget: mean calibration cosine")
    ap.add_argument("--max-calibration", type=int, default=128, help="calibration sentences autotune uses at most")
    ap.add_argument("--budget-s", type=float, default=600.0)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                    help="only the autotune candidates whose name contains one of these (the first must be "
                         "the default fp32: ratios are to it)")
    ap.add_argument("--no-bound", action="store_true", help=f"leave out the row {BOUND!r}")
    ap.add_argument("--work", default=None)
    ap.add_argument("--plot", default=None, help="default benchmarks/bench_autotune.png (minilm), "
                    "benchmarks/bench_autotune_MODEL.png (others)")
    args = ap.parse_args()
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="bench-autotune-"))
    work.mkdir(parents=True, exist_ok=True)
    flags = host_cpu_flags()
    print("CPU flags: " + ", ".join(f"{f}={'yes' if f in flags else 'no'}" for f in ("avx2", "avx512_vnni", "avx_vnni"))
          + f"; all relevant present: {sorted(f for f in flags if f in KEY_FLAGS)}; native target {targets.native_name()}")
    print(f"load average before: {os.getloadavg()}", flush=True)
    lines = [s.strip() for s in SENTENCES.read_text().splitlines() if s.strip()]
    calib, held_out = lines[1::2], lines[0::2]
    (work / "calib.txt").write_text("\n".join(calib))
    src = pathlib.Path(args.source) if args.source else work / f"{args.model}.onnx"
    if not src.exists():
        export(load_model(MODELS[args.model][0], attn_implementation="eager"), src)
    rows: list[dict] = []
    compiled: dict = {}  # compiles and accuracy checks do not depend on the timing length: one per candidate
    for seq in args.seqs:
        rows += run_seq(seq, src, work, lines, held_out, args, compiled)
    print(f"load average after: {os.getloadavg()}")
    suffix = "" if args.model == "minilm" else f"_{args.model}"
    plot(rows, pathlib.Path(args.plot or ROOT / "benchmarks" / f"bench_autotune{suffix}.png"),
         "all-MiniLM-L6-v2" if args.model == "minilm" else f"{args.model} (random weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
