"""Memory benchmark: wall time and peak RSS of ``python -m passes.compile`` quantizing big models.

Each case runs the command line in a fresh interpreter, started by a small watcher process that
reads the compile's peak RSS (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` once it exited) and
polls its RSS (``/proc/PID/status``) meanwhile, killing it above ``--cap-gb`` (default 15 GiB: the
machine is shared, a runaway compile must fail rather than take it down). Models are random-init
and exported once into ``--cache`` (never downloaded):

* ``gpt2-base``: ``GPT2Config()`` (124 M parameters, vocab 50257), TorchScript export;
* ``llama-1b``: a Llama-style decoder of ~1.1 B parameters (TinyLlama's shape: hidden 2048,
  22 layers, intermediate 5632, 32 heads, 4 KV heads, vocab 32000), exported by the dynamo exporter
  (TorchScript needs ~4.6x the parameters' bytes: see :data:`MODELS`) with external data.

Cases (``--cases``): ``int8`` (``--quantize int8``: the target's dynamic int8 quantize pass with
its sensitivity analysis), ``w8`` / ``w4`` (weight-only ``quantize-weights{bits=B,min_cosine=...}``
with its per-op fallback measurements).

Usage::

    .venv/bin/python benchmarks/bench_quantize_memory.py                        # gpt2-base, all cases
    .venv/bin/python benchmarks/bench_quantize_memory.py --models llama-1b --cases w4,int8
    .venv/bin/python benchmarks/bench_quantize_memory.py --delete-exports       # remove the cache after

The export itself is measured the same way (its own peak RSS, under the same cap).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
GB = 1024**3

#: name -> (transformers class, config class, config kwargs, exporter). The 1B model goes through the
#: dynamo exporter: measured on the same Llama shape with 2 layers (0.82 GB of fp32 parameters),
#: TorchScript peaked at 3.73 GB of RSS (4.6x the parameters: ~19 GB at 1.1 B, over the cap) and
#: dynamo at 1.28 GB (1.07x the model held in torch).
MODELS: dict[str, tuple[str, str, dict, str]] = {
    "gpt2-base": ("GPT2LMHeadModel", "GPT2Config", {}, "torchscript"),
    "llama-1b": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False), "dynamo"),
}

_EXPORT = r"""
import sys, json, resource, time
sys.path.insert(0, sys.argv[1])
import torch, transformers
from passes.tools.export import export
cls, cfg_cls, kwargs, out, exporter = sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5], sys.argv[6]
torch.manual_seed(0)
model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**kwargs)).eval()
params = sum(p.numel() for p in model.parameters())
t = time.perf_counter()
export(model, out, dynamo=exporter == "dynamo", external_data=params * 4 > 1.5 * 1024**3)
print(json.dumps({"params": params, "export_s": time.perf_counter() - t}))
"""

# The watcher: runs the command, polls its RSS, kills it above the cap, reports peak RSS.
_WATCH = r"""
import json, os, resource, signal, subprocess, sys, threading, time
cap = int(sys.argv[1]); cmd = json.loads(sys.argv[2])
t0 = time.perf_counter()
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
killed = []
polled = [0, 0, 0]  # max VmRSS, and its anonymous and file-backed parts then
def watch():
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                st = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.startswith(("VmRSS:", "RssAnon:", "RssFile:"))}
            rss = st["VmRSS"]
        except (OSError, KeyError, ValueError):
            return
        if rss > polled[0]:
            polled[:] = [rss, st.get("RssAnon", 0), st.get("RssFile", 0)]
        if rss > cap:
            killed.append(rss)
            p.send_signal(signal.SIGKILL)
            return
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
out, err = p.communicate()
wall = time.perf_counter() - t0
print(json.dumps({"rc": p.returncode, "wall_s": wall, "peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "killed_at_kb": killed[0] // 1024 if killed else None, "polled_max_kb": polled[0] // 1024,
                  "polled_anon_kb": polled[1] // 1024, "polled_file_kb": polled[2] // 1024, "stdout": out[-6000:], "stderr": err[-3000:]}))
"""


def watched(cmd: list[str], cap_bytes: int) -> dict:
    """Run ``cmd`` under the RSS watcher; its exit code, wall time, peak RSS and output tails."""
    res = subprocess.run([sys.executable, "-c", _WATCH, str(cap_bytes), json.dumps(cmd)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(res.stdout)


def ensure_export(name: str, cache: pathlib.Path, cap_bytes: int) -> tuple[pathlib.Path, dict | None]:
    """The model's export in ``cache`` (made when missing, measured: returns its watcher record)."""
    path = cache / name / "model.onnx"
    if path.is_file():
        return path, None
    cls, cfg, kwargs, exporter = MODELS[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"exporting {name} to {path}", file=sys.stderr, flush=True)
    rec = watched([sys.executable, "-c", _EXPORT, str(ROOT), cls, cfg, json.dumps(kwargs), str(path), exporter], cap_bytes)
    if rec["rc"] != 0:
        raise SystemExit(f"export of {name} failed (rc {rec['rc']}, killed at {rec['killed_at_kb']} kB): "
                         f"{rec['stderr'][-1500:]}")
    rec.update(json.loads(rec["stdout"].strip().splitlines()[-1]))
    return path, rec


def case_pipeline(case: str, target_pipeline: str, min_cosine: float, max_calibration: int | None) -> list[str]:
    """The compile arguments of a case (the passes' own calibration size unless ``max_calibration``)."""
    calib = f",max_calibration={max_calibration}" if max_calibration else ""
    if case == "int8":
        if not calib:
            return ["--quantize", "int8"]
        return ["--pipeline", f"{target_pipeline},quantize{{min_cosine={min_cosine}{calib}}},dead-flow",
                "--quantize", "int8"]
    bits = {"w8": 8, "w4": 4}[case]
    return ["--pipeline", f"{target_pipeline},quantize-weights{{bits={bits},min_cosine={min_cosine}{calib}}},dead-flow"]


def cpu_flags() -> str:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    keep = [f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "f16c", "amx_int8")]
    return f"{model}; {' '.join(keep)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt2-base", help=f"comma separated, of {', '.join(MODELS)}")
    ap.add_argument("--cases", default="int8,w8,w4", help="comma separated, of int8, w8, w4")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--min-cosine", type=float, default=0.999, help="the accuracy budget of every case")
    ap.add_argument("--cache", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "tfcompile-quantize-memory")
    ap.add_argument("--max-calibration", type=int, default=None,
                    help="calibration samples (default: the passes' own, 128 for int8 and 32 for weight-only)")
    ap.add_argument("--cap-gb", type=float, default=15.0, help="kill a child whose RSS exceeds this (GiB)")
    ap.add_argument("--delete-exports", action="store_true", help="delete each model's export after its cases")
    ap.add_argument("--json", type=pathlib.Path, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import targets  # small: no torch, no onnxruntime

    cap = int(args.cap_gb * GB)
    tpipe = targets.get(args.target).pipeline
    print(f"host: {cpu_flags()}; {os.cpu_count()} cpus; load {os.getloadavg()[0]:.2f}; cap {args.cap_gb} GiB; "
          f"calibration {args.max_calibration or 'default'}, min_cosine {args.min_cosine}", flush=True)
    rows = []
    for name in args.models.split(","):
        path, exp = ensure_export(name, args.cache, cap)
        if exp is not None:
            rows.append({"model": name, "case": "export", "rc": 0, "wall_s": exp["wall_s"],
                         "peak_rss_kb": exp["peak_rss_kb"], "note": f"{exp['params'] / 1e6:.0f} M parameters"})
            print(f"  {name} export: {exp['wall_s']:.0f} s, peak RSS {exp['peak_rss_kb'] / 2**20:.2f} GiB", flush=True)
        size = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith("model.onnx"))
        for case in args.cases.split(","):
            with tempfile.TemporaryDirectory(prefix="bench-qmem-") as tmp:
                out = pathlib.Path(tmp) / "out.onnx"
                cmd = [sys.executable, "-m", "passes.compile", str(path), "--target", args.target,
                       *case_pipeline(case, tpipe, args.min_cosine, args.max_calibration), "-o", str(out), "--quiet", "--force",
                       "--min-cosine", str(args.min_cosine)]
                if size > 1.5 * GB:
                    cmd.append("--external-data")
                rec = watched(cmd, cap)
            report_rss = next((line.strip() for line in rec["stdout"].splitlines() if "peak RSS" in line), "")
            notes = [line.strip() for line in rec["stdout"].splitlines() if line.strip().startswith(("quantize", "memory"))
                     and ("ops" in line or "RSS" in line)]
            row = {"model": name, "case": case, "rc": rec["rc"], "wall_s": rec["wall_s"],
                   "peak_rss_kb": rec["peak_rss_kb"], "polled_max_kb": rec["polled_max_kb"],
                   "polled_anon_kb": rec.get("polled_anon_kb", 0), "polled_file_kb": rec.get("polled_file_kb", 0),
                   "killed_at_kb": rec["killed_at_kb"],
                   "report_rss": report_rss, "note": "; ".join(notes)[:300]}
            if rec["rc"] != 0:
                row["note"] = (rec["stderr"].strip().splitlines() or ["?"])[-1][:300]
            rows.append(row)
            print(f"  {name} {case}: rc {rec['rc']}, {rec['wall_s']:.0f} s, peak RSS "
                  f"{rec['peak_rss_kb'] / 2**20:.2f} GiB {row['note'][:200]}", flush=True)
        if args.delete_exports:
            shutil.rmtree(path.parent, ignore_errors=True)

    print(f"\n{'model':<10} {'case':<7} {'rc':>3} {'wall s':>7} {'peak RSS GiB':>12} {'polled GiB':>10} "
          f"{'(anon+file)':>12}  notes")
    for r in rows:
        split = f"{r.get('polled_anon_kb', 0) / 2**20:.2f}+{r.get('polled_file_kb', 0) / 2**20:.2f}"
        print(f"{r['model']:<10} {r['case']:<7} {r['rc']:>3} {r['wall_s']:7.0f} {r['peak_rss_kb'] / 2**20:12.2f} "
              f"{r.get('polled_max_kb', 0) / 2**20:10.2f} {split:>12}  {r.get('note', '')[:150]}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
