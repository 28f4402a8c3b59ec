"""Interleaved A/B of the quantize pass's switch model: an older ``_emit.py`` (default: the arithmetic
blend before the If switch) against this tree's, on MiniLM with the x86-avx2 fused graph.

    ROUNDS=6 OLD_REV=49f47f3 .venv/bin/python benchmarks/switch_ab.py

Times ``Evaluator.score_session`` over the calibration texts (batch 1) for flags all off, all int8,
all nbits and a mixture, alternating old and new each round; prints medians and per-round ratios,
and the scores (which must agree to rounding).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ir  # noqa: E402
import targets  # noqa: E402
from passes import compile_model  # noqa: E402
from passes.quantization import _emit as new  # noqa: E402
from passes.quantization.calibration import calibration_batches  # noqa: E402
from passes.quantization.quantize import NBITS, find_candidates  # noqa: E402
from passes.quantization.sensitivity import Evaluator  # noqa: E402
from passes.tools.export import minilm_dir  # noqa: E402

OLD = pathlib.Path(tempfile.mkdtemp()) / "_emit_old.py"
OLD.write_text(subprocess.run(["git", "show", os.environ.get("OLD_REV", "49f47f3") + ":passes/quantization/_emit.py"],
                              cwd=ROOT, check=True, capture_output=True, text=True).stdout)
spec = importlib.util.spec_from_file_location("passes.quantization._emit_old", OLD)
old = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = old
spec.loader.exec_module(old)

ROUNDS = int(os.environ.get("ROUNDS", "6"))
t0 = time.perf_counter()
cache = pathlib.Path(tempfile.gettempdir()) / "switch-ab-fused-x86-avx2.onnx"
if cache.exists():
    fused = ir.load(str(cache))
else:
    fused = compile_model(os.environ.get("MINILM", "/work/out/bat/minilm.onnx"), "x86-avx2", verify=False).model
    ir.save(fused, str(cache))
target = targets.get("x86-avx2")
pol = target.quantization
cands = find_candidates(fused, tuple(pol.ops))
plan = new.Plan(frozenset(c.index for c in cands), per_channel=pol.per_channel, reduce_range=pol.reduce_range,
                signed=pol.weight_signed, format=pol.format)
ev = Evaluator(fused, lambda meta: calibration_batches(fused, meta, tokenizer=str(minilm_dir()),
               texts=os.environ.get("TEXTS", "/work/out/bat/calib.txt"), limit=10000, batch=1).batches, threads=2)
print(f"{len(cands)} candidates ({sorted({c.op for c in cands})}), {len(ev.batches)} batches, "
      f"setup {time.perf_counter() - t0:.1f}s", flush=True)


def sess_of(mod, wo):
    m, flags = mod.build_switch_model(fused, cands, plan, weight_only=wo)
    with ev.saved(m) as src:
        del m
        return ev.session(src), flags


arms = {}
for label, mod, wo in [("old", old, None), ("new", new, None), ("old+nb", old, NBITS), ("new+nb", new, NBITS)]:
    arms[label] = sess_of(mod, wo)
with ev.saved(fused) as src:
    plain = ev.session(src)
off = {}
int8 = {c.index: "int8" for c in cands}
nb = {c.index: "nbits" for c in cands if c.op != "Attention"}
mixed = {c.index: ("int8" if k % 3 == 0 else "nbits" if (k % 3 == 1 and c.op != "Attention") else "float")
         for k, c in enumerate(cands)}
settings = [("off", off), ("int8", int8)]
settings_nb = settings + [("nbits", nb), ("mixed", mixed)]
times = {}
scores = {}
for r in range(ROUNDS):
    for fname, forms in settings_nb:
        for label in (["old", "new", "old+nb", "new+nb"] if fname in ("off", "int8") else ["old+nb", "new+nb"]):
            sess, flags = arms[label]
            feeds = (old if label.startswith("old") else new).flag_feeds(flags, forms)
            t = time.perf_counter()
            s = ev.score_session(sess, feeds)
            times.setdefault((label, fname), []).append(time.perf_counter() - t)
            scores[(label, fname)] = s
    t = time.perf_counter()
    s = ev.score_session(plain)
    times.setdefault(("float model", "-"), []).append(time.perf_counter() - t)
    scores[("float model", "-")] = s
    print(f"round {r} done {time.perf_counter()-t0:.0f}s", flush=True)

print("\n| switch | flags | median s | min s | rounds | worst cos | mean cos |")
print("|---|---|---|---|---|---|---|")
for (label, fname), ts in times.items():
    s = scores[(label, fname)]
    print(f"| {label} | {fname} | {statistics.median(ts):.2f} | {min(ts):.2f} | {len(ts)} | {s.worst:.7f} "
          f"| {s.mean:.7f} |")
print("\nmedian per-round ratio new/old:")
for o, n, fname in [("old", "new", "off"), ("old", "new", "int8"), ("old+nb", "new+nb", "off"),
                    ("old+nb", "new+nb", "int8"), ("old+nb", "new+nb", "nbits"), ("old+nb", "new+nb", "mixed")]:
    rs = [b / a for a, b in zip(times[(o, fname)], times[(n, fname)])]
    print(f"  {n}/{o} {fname}: {statistics.median(rs):.3f}  (per round {[round(x, 3) for x in rs]})")
for lab in ("old", "new", "new+nb"):
    rs = [b / a for a, b in zip(times[("float model", "-")], times[(lab, "off")])]
    print(f"  {lab} off / float model: {statistics.median(rs):.3f}")
for fname in ("off", "int8"):
    print(f"score diff old-new {fname}: worst {abs(scores[('old', fname)].worst - scores[('new', fname)].worst):.2e} "
          f"mean {abs(scores[('old', fname)].mean - scores[('new', fname)].mean):.2e}")
for fname in ("nbits", "mixed"):
    d = abs(scores[("old+nb", fname)].worst - scores[("new+nb", fname)].worst)
    print(f"score diff old+nb-new+nb {fname}: worst {d:.2e}")
