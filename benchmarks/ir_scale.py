"""Scale benchmark: ``ir.load`` + ``ir.save`` of multi-GB models with external data.

Builds random-init models (a chain of ``MatMul`` with square float32 weights) of a few sizes, each
saved with external data, then, in a fresh subprocess per size, times ``ir.load`` and
``ir.save(..., external_data=True)`` and reads the subprocess's peak RSS
(``resource.getrusage(...).ru_maxrss``). Tensors are lazy and saving an untouched model streams the
bytes, so time should grow linearly with size and peak RSS stay well under the model size
(requirement: < 1.5x).

The generator writes each weight in chunks with ``numpy`` into one data file and builds the small
``ModelProto`` with onnx's helpers, so it never holds a whole weight in memory either.

Usage::

    python benchmarks/ir_scale.py                 # sizes 0.6, 1.2, 2.5 GB
    python benchmarks/ir_scale.py --sizes 0.3 1   # custom sizes (GB)
    python benchmarks/ir_scale.py --keep DIR      # keep the files in DIR

Temporary files are deleted after each size (disk is limited).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
GB = 1024**3
_CHUNK_ROWS = 512  # rows of a weight generated at once (512 x 4096 float32 = 8 MB)


def build_model(folder: pathlib.Path, size_gb: float, *, dim: int = 4096, seed: int = 0) -> tuple[pathlib.Path, int]:
    """Write ``model.onnx`` + ``model.onnx.data`` of about ``size_gb`` GB of MatMul weights.

    Args:
        folder: output folder (created).
        size_gb: target size of the weights, in GiB.
        dim: weights are ``[dim, dim]`` float32.
        seed: random seed.

    Returns:
        The model path and the exact number of weight bytes.
    """
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    per_weight = dim * dim * 4
    layers = max(1, round(size_gb * GB / per_weight))
    rng = np.random.default_rng(seed)
    scale = np.float32(1.0 / np.sqrt(dim))
    data_path = folder / "model.onnx.data"
    initializers = []
    nodes = []
    with open(data_path, "wb") as f:
        for i in range(layers):
            offset = f.tell()
            for r in range(0, dim, _CHUNK_ROWS):
                block = rng.standard_normal((min(_CHUNK_ROWS, dim - r), dim), dtype=np.float32)
                block *= scale
                f.write(block.tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[dim, dim])
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_path.name), ("offset", str(offset)), ("length", str(per_weight))):
                e = t.external_data.add()
                e.key, e.value = k, v
            initializers.append(t)
            src = "x" if i == 0 else f"h{i - 1}"
            dst = "y" if i == layers - 1 else f"h{i}"
            nodes.append(helper.make_node("MatMul", [src, f"w{i}"], [dst], name=f"matmul_{i}"))
    graph = helper.make_graph(
        nodes, "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path, layers * per_weight


_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import ir
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
m = ir.load(sys.argv[2])
t1 = time.perf_counter()
ir.save(m, sys.argv[3], external_data=True)
t2 = time.perf_counter()
loaded = sum(1 for v in m.graph.initializers.values() if v.const_value.is_loaded)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"load": t1 - t0, "save": t2 - t1, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "hwm_kb": hwm, "rss_after_import_kb": rss0, "loaded_tensors": loaded}))
"""


def measure(model_path: pathlib.Path, out_path: pathlib.Path) -> dict[str, float]:
    """Run load + save in a fresh interpreter; return its timings and peak RSS."""
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ROOT), str(model_path), str(out_path)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def same_data(a: pathlib.Path, b: pathlib.Path, names: int) -> bool:
    """Compare the tensor bytes of two external-data models (region by region, in chunks)."""
    import onnx

    def regions(path: pathlib.Path) -> dict[str, tuple[str, int, int]]:
        p = onnx.load(str(path), load_external_data=False)
        out = {}
        for t in p.graph.initializer:
            info = {e.key: e.value for e in t.external_data}
            out[t.name] = (str(path.parent / info["location"]), int(info.get("offset", 0)), int(info["length"]))
        return out

    ra, rb = regions(a), regions(b)
    if ra.keys() != rb.keys() or len(ra) != names:
        return False

    def digest(loc: tuple[str, int, int]) -> bytes:
        h = hashlib.sha256()
        with open(loc[0], "rb") as f:
            f.seek(loc[1])
            left = loc[2]
            while left:
                chunk = f.read(min(left, 64 * 2**20))
                h.update(chunk)
                left -= len(chunk)
        return h.digest()

    return all(ra[k][2] == rb[k][2] and digest(ra[k]) == digest(rb[k]) for k in ra)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table; exit 1 when peak RSS reaches 1.5x the model size."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.6, 1.2, 2.5], help="model sizes in GiB")
    ap.add_argument("--dim", type=int, default=4096, help="weights are [dim, dim] float32")
    ap.add_argument("--keep", type=pathlib.Path, default=None, help="keep files in this folder")
    ap.add_argument("--check-data", action="store_true", help="byte-compare the saved tensors for every size")
    ap.add_argument("--build", nargs=2, metavar=("DIR", "GB"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build:
        print(build_model(pathlib.Path(args.build[0]), float(args.build[1]), dim=args.dim)[1])
        return 0

    rows = []
    ok = True
    for k, size in enumerate(args.sizes):
        base = args.keep if args.keep is not None else pathlib.Path(tempfile.mkdtemp(prefix="ir_scale_"))
        folder = base / f"{size:g}gb"
        try:
            t = time.perf_counter()
            # A subprocess generates the model: ru_maxrss is inherited through fork + exec, so the
            # measuring child must be forked from a small parent.
            built = subprocess.run(
                [sys.executable, __file__, "--build", str(folder / "src"), str(size), "--dim", str(args.dim)],
                check=True, capture_output=True, text=True,
            )
            src, nbytes = folder / "src" / "model.onnx", int(built.stdout.split()[-1])
            gen = time.perf_counter() - t
            (folder / "out").mkdir(parents=True, exist_ok=True)
            out = folder / "out" / "model.onnx"
            r = measure(src, out)
            layers = nbytes // (args.dim * args.dim * 4)
            checked = same_data(src, out, layers) if (k == 0 or args.check_data) else None
            ratio = r["rss_kb"] * 1024 / nbytes
            ok &= ratio < 1.5 and checked is not False and r["loaded_tensors"] == 0
            rows.append((nbytes / GB, layers, gen, r["load"], r["save"], (r["load"] + r["save"]) / (nbytes / GB),
                         r["rss_after_import_kb"] / 1024, r["rss_kb"] / 1024, r["hwm_kb"] / 1024, ratio, checked))
            print(f"  {size:g} GB done", file=sys.stderr, flush=True)
        finally:
            if args.keep is None:
                shutil.rmtree(base, ignore_errors=True)

    head = (f"{'size GB':>8} {'MatMuls':>7} {'gen s':>6} {'load s':>7} {'save s':>7} {'s/GB':>6} "
            f"{'RSS import MB':>13} {'peak RSS MB':>11} {'VmHWM MB':>8} {'RSS/size':>8} {'data equal':>10}")
    print(head)
    print("-" * len(head))
    for size, layers, gen, load, save, per_gb, rss0, rss, hwm, ratio, checked in rows:
        eq = "-" if checked is None else ("yes" if checked else "NO")
        print(f"{size:8.2f} {layers:7d} {gen:6.1f} {load:7.3f} {save:7.2f} {per_gb:6.2f} {rss0:13.0f} {rss:11.0f} {hwm:8.0f} "
              f"{ratio:8.3f} {eq:>10}")
    print(f"requirement peak RSS < 1.5x model size: {'met' if ok else 'NOT MET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
