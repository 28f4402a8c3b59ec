"""Held-out accuracy of int8 MiniLM, op by op (issue #14's measurement, for investigation).

    .venv/bin/python benchmarks/int8_heldout.py [--target x86-avx2] [--study ops|acts|remedies]

Split as ``bench_autotune``: held-out = sentences ``0::2`` (110), calibration = ``1::2`` (109); one
sentence a call (batch 1, as tokenized, at most 128 tokens); cosine of the mean-pooled embedding to
the float model's. The float reference is the original export in onnxruntime with graph
optimizations off. Quantized variants are measured through the quantize pass's switch model (one
session, any subset of ops int8 by flags) built on the target's fused float graph.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ir  # noqa: E402
import targets  # noqa: E402
from passes import compile_model  # noqa: E402
from passes.framework.numerics import session  # noqa: E402
from passes.quantization._emit import Plan  # noqa: E402
from passes.quantization.forms import build_switch_model, flag_feeds, quantize_forms  # noqa: E402
from passes.quantization.quantize import find_candidates  # noqa: E402
from passes.tools.export import minilm_dir  # noqa: E402

SENTENCES = ROOT / "benchmarks" / "data" / "sentences.txt"
SOURCE = pathlib.Path(os.environ.get("TFCOMPILE_TEST_EXPORTS", "/work/exports")) / "minilm-script-sdpa" / "model.onnx"


def split() -> tuple[list[str], list[str]]:
    """(calibration, held-out) sentences."""
    lines = [s.strip() for s in SENTENCES.read_text().splitlines() if s.strip()]
    return lines[1::2], lines[0::2]


def feeds_of(texts: list[str], names: set[str]) -> list[dict[str, np.ndarray]]:
    """One feed dict per sentence (batch 1, no padding, truncated to 128 tokens)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=128)
    tok.no_padding()  # tokenizer.json pads to 128: one sentence a call is its own length (as calibration)
    out = []
    for t in texts:
        e = tok.encode(t)
        cols = {"input_ids": np.array([e.ids], np.int64), "attention_mask": np.array([e.attention_mask], np.int64),
                "token_type_ids": np.array([e.type_ids], np.int64)}
        out.append({k: v for k, v in cols.items() if k in names})
    return out


def pooled(sess, feeds: list[dict[str, np.ndarray]], extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
    out = []
    for f in feeds:
        h = sess.run(None, {**f, **(extra or {})})[0].astype(np.float64)
        m = f["attention_mask"][..., None].astype(np.float64)
        out.append(((h * m).sum(1) / m.sum(1))[0])
    return np.array(out)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


class Bench:
    """The fused float model, its candidates, and held-out / calibration references."""

    def __init__(self, target: str, pipeline: str | None = None, variant: str | None = None) -> None:
        t0 = time.perf_counter()
        self.target = targets.get(target)
        if variant:  # one of the target's policy variants (x86-avx2: "u8 weights, 8-bit", "s8 weights, 8-bit")
            v = next(v for v in self.target.quantization.variants if v.name == variant)
            self.target = dataclasses.replace(self.target, quantization=v.apply(self.target.quantization))
        ref_sess = session(str(SOURCE), 2, optimize=False)
        names = {i.name for i in ref_sess.get_inputs()}
        self.calib_texts, self.held_texts = split()
        self.calib, self.held = feeds_of(self.calib_texts, names), feeds_of(self.held_texts, names)
        self.ref_calib, self.ref_held = pooled(ref_sess, self.calib), pooled(ref_sess, self.held)
        del ref_sess
        print(f"references done ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        key = hashlib.sha256(pipeline.encode()).hexdigest()[:8] if pipeline else "default"
        folder = pathlib.Path(os.environ.get("INT8_HELDOUT_CACHE", "/tmp/int8-heldout"))
        cache = folder / f"{self.target.name}-{key}.onnx"
        if cache.exists():
            self.fused = ir.load(str(cache))
        else:
            self.fused = compile_model(str(SOURCE), self.target, pipeline, verify=False).model
            cache.parent.mkdir(parents=True, exist_ok=True)
            ir.save(self.fused, str(cache))
        print(f"fused model ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        pol = self.target.quantization
        self.candidates = find_candidates(self.fused, tuple(pol.ops))
        self.base = Plan(frozenset(c.index for c in self.candidates), per_channel=pol.per_channel,
                         reduce_range=pol.reduce_range, signed=pol.weight_signed, format=pol.format)

    def switch(self, plan: Plan):
        m, flags = build_switch_model(self.fused, self.candidates, quantize_forms(plan))
        return session(ir.to_onnx(m).SerializeToString(), 2), flags

    def score(self, sess, flags, forms: dict[int, str], which: str = "held") -> np.ndarray:
        feeds, ref = (self.held, self.ref_held) if which == "held" else (self.calib, self.ref_calib)
        return cosines(ref, pooled(sess, feeds, flag_feeds(flags, forms)))


def fmt(c: np.ndarray) -> str:
    return f"mean {c.mean():.5f} worst {c.min():.5f}"


def study_ops(b: Bench, plan: Plan, label: str) -> None:
    sess, flags = b.switch(plan)
    all_on = {c.index: "int8" for c in b.candidates}
    h, c = b.score(sess, flags, all_on), b.score(sess, flags, all_on, "calib")
    print(f"[{label}] all {len(all_on)} int8: held {fmt(h)} | calib {fmt(c)}; worst held sentences "
          f"{np.argsort(h)[:5].tolist()}", flush=True)
    print(f"{'op':40s} {'K x N':>10s} {'held 1-mean':>12s} {'held 1-worst':>12s} {'cal 1-worst':>12s} {'all-but 1-worst':>15s}")
    for cand in b.candidates:
        one = {cand.index: "int8"}
        hh, cc = b.score(sess, flags, one), b.score(sess, flags, one, "calib")
        rest = {k: v for k, v in all_on.items() if k != cand.index}
        hr = b.score(sess, flags, rest)
        print(f"{cand.name[:40]:40s} {cand.weight_shape[0]:>4d}x{cand.weight_shape[1]:<5d} {1 - hh.mean():12.2e} "
              f"{1 - hh.min():12.2e} {1 - cc.min():12.2e} {1 - hr.min():15.2e}", flush=True)


def study_e2e(b: Bench, options: dict, label: str) -> None:
    """The quantize pass end to end on the fused model (calibrated on the calibration half, batch 1)."""
    import copy
    import tempfile

    from passes.tools.compile import compile_model as compile_

    work = pathlib.Path(tempfile.mkdtemp(prefix="int8-heldout-"))
    (work / "calib.txt").write_text("\n".join(b.calib_texts))
    opts = {"tokenizer": str(minilm_dir()), "texts": str(work / "calib.txt"), "calibration_batch": 1,
            "max_calibration": 128, **options}
    t0 = time.perf_counter()
    res = compile_(ir.from_onnx(ir.to_onnx(b.fused)), b.target, pipeline="quantize,dead-flow", verify=False,
                   options=opts)
    secs = time.perf_counter() - t0
    notes = [str(n) for n in res.report.diagnostics]
    out = os.environ.get("INT8_HELDOUT_SAVE")
    if out:
        ir.save(res.model, out)
    sess = session(ir.to_onnx(res.model).SerializeToString(), 2)
    h = cosines(b.ref_held, pooled(sess, b.held))
    rows = [r for rows in getattr(res.report, "rows", {}).values() for r in rows] if isinstance(
        getattr(res.report, "rows", None), dict) else []
    ops = {}
    for n in res.model.graph:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    n_int8 = sum(v for k, v in ops.items() if k in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention"))
    print(f"[{label}] {options}: int8 ops {n_int8}, nbits {ops.get('MatMulNBits', 0)}; held-out {fmt(h)}; "
          f"worst sentences {np.argsort(h)[:5].tolist()} ({secs:.0f} s)", flush=True)
    for n in notes:
        print("   ", n, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="x86-avx2")
    ap.add_argument("--study", default="ops")
    ap.add_argument("-O", action="append", default=[], help="quantize option key=value (e2e)")
    ap.add_argument("--pipeline", help="the fused float model's pipeline (default: the target's), "
                    "e.g. with fuse-attention{form=mha,qkv=split}")
    ap.add_argument("--variant", help="a policy variant of the target, by name (e.g. 'u8 weights, 8-bit')")
    args = ap.parse_args()
    t0 = time.perf_counter()
    b = Bench(args.target, args.pipeline, args.variant)
    print(f"{len(b.candidates)} candidates on {b.target.name}; {len(b.held)} held-out, {len(b.calib)} calibration "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    if args.study == "ops":
        study_ops(b, b.base, "per-channel")
    elif args.study == "e2e":
        import ast
        opts = {}
        for kv in args.O:
            k, v = kv.split("=", 1)
            try:
                opts[k] = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                opts[k] = v
        study_e2e(b, opts, "e2e")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
