# Local (per-op) relative output error of int8 on held-out activations, numpy only: plain / SmoothQuant / outlier channels / weight-only / activation-only. Needs benchmarks/int8_heldout.py run once (caches /tmp/int8-heldout/x86-avx2.onnx).
import sys, numpy as np
sys.path.insert(0, 'benchmarks')
from int8_heldout import *
import ir
from passes.quantization.quantize import find_candidates, _smooth_groups
from passes.quantization._candidates import weight_of
from passes.quantization.quant_math import quantize_weight, dynamic_quantize_linear, smooth_factors, outlier_channels
import targets
t = targets.get('x86-avx2')
m = ir.load('/tmp/int8-heldout/x86-avx2.onnx')
cands = find_candidates(m, tuple(t.quantization.ops))
nodes = list(m.graph)
acts = sorted({c.activation for c in cands}, key=lambda a: min(c.index for c in cands if c.activation == a))
smooth_acts = set(_smooth_groups(m, cands))
by = {o.name: o for n in m.graph for o in n.outputs if o is not None}
m2 = ir.from_onnx(ir.to_onnx(m))
by2 = {o.name: o for n in m2.graph for o in n.outputs if o is not None}
m2.graph.outputs.extend(by2[a] for a in acts)
sess = session(ir.to_onnx(m2).SerializeToString(), 2)
calib, held = split()
names = {i.name for i in sess.get_inputs()}
def collect(texts):
    out = {a: [] for a in acts}
    for f in feeds_of(texts, names):
        for a, x in zip(acts, sess.run(acts, f)):
            out[a].append(x[0])
    return out
C, H = collect(calib), collect(held)
def dq(x):
    q, s, z = dynamic_quantize_linear(x)
    return (q.astype(np.float32) - np.float32(z)) * s
for c in cands:
    w, b = weight_of(nodes[c.index])
    a = c.activation
    camax = np.max([np.abs(x).max(0) for x in C[a]], axis=0)
    res = {}
    for name in ("plain", "sq0.5", "sq0.7", "outl", "w-only", "a-only"):
        if name.startswith("sq") and a not in smooth_acts: continue
        if name == "outl" and (a in smooth_acts or c.op == "Attention"): continue
        s = None; idx = None
        if name.startswith("sq"):
            s = smooth_factors(camax, np.abs(w).max(1), float(name[2:]))
        if name == "outl":
            idx = outlier_channels(camax, 2.0, 0.02)
        ws = w * s[:, None] if s is not None else w
        wq = quantize_weight(ws, per_channel=True, reduce_range=True).dequantize()
        errs = []
        for x in H[a]:
            y = x @ w
            xs = x / s if s is not None else x
            if idx is not None:
                xm = xs.copy(); xm[:, idx] = 0
                yq = dq(xm) @ wq + xs[:, idx] @ w[idx]
            elif name == "w-only":
                yq = x @ wq
            elif name == "a-only":
                yq = dq(x) @ w
            else:
                yq = dq(xs) @ wq
            errs.append(np.linalg.norm(yq - y) / np.linalg.norm(y))
        errs = np.array(errs)
        res[name] = (errs.mean(), errs.max(), int(errs.argmax()))
    label = c.name.split("'")[1] if "'" in c.name else c.name
    print(f"{label[-38:]:38s} {c.weight_shape} " + " ".join(f"{k}:{v[0]:.4f}/{v[1]:.4f}@{v[2]}" for k, v in res.items()), flush=True)
