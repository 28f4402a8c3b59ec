"""Compile time of one model across source trees: fresh processes, interleaved, CPU time, minima.

    python benchmarks/bench_compile_time.py MODEL.onnx --tree base=/tmp/base --tree now=. -n 5
    python benchmarks/bench_compile_time.py MODEL.onnx --tree ... --pipeline "quantize-weights{bits=4,min_cosine=0.999}"

Each run is a fresh process (a user's compile is one per process) that imports onnxruntime, loads
the model, then compiles it without verification; it reports the CPU time (``time.process_time``,
all threads) of ``compile_model`` and of each pass, which a loaded machine disturbs far less than
wall time. Trees take turns in a rotating order; the table shows each tree's minimum per pass and
the ratio of totals to the first tree. The pass modules are imported inside ``compile_model``:
with ``PYTHONDONTWRITEBYTECODE=1`` their sources are compiled in every run, which the total shows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, os, sys, time, types
tree, model, target, pipeline = sys.argv[1:5]
sys.path.insert(0, tree); os.chdir(tree)
from passes.framework import manager
manager.time = types.SimpleNamespace(perf_counter=time.process_time)  # per-pass CPU time
import onnxruntime  # noqa: F401  (its import is no pass's cost)
import ir
from passes.tools.compile import compile_model
m = ir.load(model)
t0 = time.process_time()
r = compile_model(m, target, pipeline or None, verify=False).report
print(json.dumps({"total": time.process_time() - t0, "passes": [[p.spec, p.seconds] for p in r.passes]}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--pipeline", default="", help="a pipeline instead of the target's own")
    ap.add_argument("-n", type=int, default=5, help="runs per tree")
    args = ap.parse_args(argv)
    trees = dict(t.split("=", 1) for t in args.tree)
    names = list(trees)
    best: dict[str, dict] = {}
    for i in range(args.n):
        for k in names[i % len(names):] + names[: i % len(names)]:
            out = subprocess.run([sys.executable, "-c", _CHILD, trees[k], args.model, args.target, args.pipeline],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            run = json.loads(out)
            b = best.setdefault(k, run)
            b["total"] = min(b["total"], run["total"])
            for row, (spec, s) in zip(b["passes"], run["passes"]):
                if row[0] == spec:
                    row[1] = min(row[1], s)
    first = best[names[0]]
    print(f"{args.model} --target {args.target}{' --pipeline ' + args.pipeline if args.pipeline else ''}: CPU ms, min of {args.n} fresh processes")
    print(f"{'':<32}" + "".join(f"{k:>10}" for k in names))
    for j, (spec, _) in enumerate(first["passes"]):
        row = [best[k]["passes"][j][1] if j < len(best[k]["passes"]) and best[k]["passes"][j][0] == spec
               else float("nan") for k in names]
        print(f"{spec[:32]:<32}" + "".join(f"{v * 1000:10.1f}" for v in row))
    print(f"{'compile_model total':<32}" + "".join(f"{best[k]['total'] * 1000:10.1f}" for k in names))
    print(f"{'ratio to ' + names[0]:<32}" + "".join(f"{best[k]['total'] / first['total']:10.3f}" for k in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
