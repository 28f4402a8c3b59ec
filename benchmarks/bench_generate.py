"""Benchmark: greedy generation with a KV cache — torch eager, the original ONNX, and ours.

    /work/venv/bin/python benchmarks/bench_generate.py [--tokens 64] [--prompt-len 32] [--reps 5]
                                                       [--threads 2] [--models llama,gpt2,llama-512]

For each model (random tiny Llama and GPT-2 of :func:`passes.tools.export.tiny_model`, and a bigger
Llama: hidden 512, 8 heads, 4 KV heads, 4 layers, FFN 1376), batch 1:

* ``torch``: transformers eager model, a manual greedy loop with its ``DynamicCache``;
* ``onnx``: the TorchScript export ``with_past`` in onnxruntime (its default graph optimizations);
* ``ours``: that export compiled by ``compile_model(target="x86")``.

Repetitions are interleaved across the three (the machine is shared); the table gives medians of
time to first token (prefill of the prompt + first token) and decode tokens/s (tokens after the
first), and whether the generated ids agree with torch.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import ir  # noqa: E402
from passes import compile_model  # noqa: E402
from passes.tools.export import _cache_kwarg, export, tiny_model  # noqa: E402
from passes.tools.generate import generate_with_stats, make_session  # noqa: E402

MODELS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "gpt2": ("gpt2", {}),
    "llama-512": ("llama", dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
                                num_hidden_layers=4, intermediate_size=1376, head_dim=64)),
}


def torch_generate(model: torch.nn.Module, prompt: np.ndarray, tokens: int) -> tuple[np.ndarray, float, float]:
    """Greedy decoding with the model's cache: ``(ids, time to first token, decode seconds)``."""
    from transformers import DynamicCache

    kw = _cache_kwarg(model)
    ids = torch.from_numpy(prompt)
    out_ids = []
    with torch.inference_mode():
        start = time.perf_counter()
        cache = DynamicCache()
        mask = torch.ones_like(ids)
        cur = ids
        ttft = 0.0
        for step in range(tokens):
            out = model(input_ids=cur, attention_mask=mask, use_cache=True, return_dict=True, **{kw: cache})
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            out_ids.append(nxt)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            cur = nxt
            if step == 0:
                ttft = time.perf_counter() - start
        total = time.perf_counter() - start
    return torch.cat(out_ids, dim=1).numpy(), ttft, total - ttft


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="llama,gpt2,llama-512")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-generate-"))
    print(f"load average before: {os.getloadavg()[0]:.2f}; {args.threads} threads, batch 1, "
          f"prompt {args.prompt_len}, {args.tokens} new tokens, {args.reps} interleaved reps")
    rows = []
    for key in args.models.split(","):
        arch, overrides = MODELS[key]
        model = tiny_model(arch, attn_implementation="sdpa", **overrides).eval()
        path = export(model, work / f"{key}.onnx", with_past=True)
        result = compile_model(str(path), "x86")
        if not result.report.verified_ok:
            print(f"{key}: compiled model outside tolerance: {result.report.verification}")
        compiled = work / f"{key}.x86.onnx"
        ir.save(result.model, str(compiled))
        fused = ", ".join(f"{k.split('::')[-1]} {v}" for k, v in sorted(result.report.ops_after.items())
                          if k.startswith("com.microsoft") or k.endswith("LayerNormalization"))
        # No spinning: the three take turns on the cores, an idle spinning pool would slow the next.
        sessions = {"onnx": make_session(str(path), args.threads, spinning=False),
                    "ours": make_session(str(compiled), args.threads, spinning=False)}
        vocab = int(model.config.vocab_size)
        prompt = np.random.default_rng(0).integers(3, vocab, size=(1, args.prompt_len)).astype(np.int64)
        runners: dict[str, Callable[[], tuple[np.ndarray, float, float]]] = {
            "torch": lambda: torch_generate(model, prompt, args.tokens),
        }
        for name, sess in sessions.items():
            def run(sess=sess):  # noqa: ANN202
                g = generate_with_stats(sess, prompt, args.tokens)
                return g.ids, g.time_to_first_token, g.decode_seconds
            runners[name] = run
        for r in runners.values():  # warm-up
            r()
        stats: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
        ids: dict[str, np.ndarray] = {}
        for _ in range(args.reps):
            for name, r in runners.items():
                got, ttft, dec = r()
                ids[name] = got
                stats[name].append((ttft, (args.tokens - 1) / dec))
        for name in runners:
            ttft = statistics.median(s[0] for s in stats[name]) * 1000
            tps = statistics.median(s[1] for s in stats[name])
            same = "yes" if np.array_equal(ids[name], ids["torch"]) else "NO"
            rows.append((key, name, ttft, tps, same))
        print(f"{key}: {sum(v for v in model.parameters() for v in [v.numel()]) / 1e6:.2f} M params; ours: {fused}")
    print(f"\n{'model':<10} {'impl':<6} {'TTFT ms':>9} {'tokens/s':>10} {'ids = torch':>12}")
    for key, name, ttft, tps, same in rows:
        print(f"{key:<10} {name:<6} {ttft:>9.2f} {tps:>10.1f} {same:>12}")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
