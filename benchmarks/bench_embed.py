"""End to end sentence embeddings: transformers + torch eager vs ``passes.tools.embed`` on a compiled model.

Same texts (benchmarks/data/sentences.txt), texts per second at batch 1 and batch 32, padded to the
longest text in each batch. The torch baseline is the usual recipe (tokenizer → model → mean
pool) with texts in file order; ours adds length bucketing and runs the model compiled for the
host. The LRU cache is disabled for the timing (``cache_size=0``) and measured separately.

    python benchmarks/bench_embed.py [--target native] [--quantize int8] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from passes.tools.embed import Embedder, compiled_model_for  # noqa: E402
from passes.tools.export import minilm_dir  # noqa: E402


def torch_embed(texts: list[str], batch: int, threads: int) -> tuple[np.ndarray, float]:
    """Embeddings and seconds for transformers + torch eager, batches in file order."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    model = AutoModel.from_pretrained(str(minilm_dir())).eval()
    out = []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
    return np.concatenate(out), time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="native")
    p.add_argument("--quantize", choices=["int8"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    texts = [t for t in (ROOT / "benchmarks" / "data" / "sentences.txt").read_text().splitlines() if t.strip()]
    compiled = compiled_model_for("minilm", target=args.target, quantize=args.quantize,
                                  progress=lambda m: print(m, file=sys.stderr))
    print(f"{len(texts)} texts; ours = {compiled.name} ({args.target}{', ' + args.quantize if args.quantize else ''})")
    print(f"{'pipeline':<40} {'batch':>5} {'texts/s':>9} {'speedup':>8} {'min cosine':>11}")
    for batch in (1, 32):
        ref, t_ref = torch_embed(texts, batch, args.threads)
        emb = Embedder(compiled, minilm_dir(), threads=args.threads, batch_size=batch, cache_size=0)
        emb.embed(texts[:4])  # warm-up
        t = time.perf_counter()
        ours = emb.embed(texts)
        t_ours = time.perf_counter() - t
        cos = float(np.min(np.sum(ref * ours, axis=1)))
        print(f"{'transformers + torch eager':<40} {batch:>5} {len(texts) / t_ref:>9.1f} {1.0:>7.2f}x {1.0:>11.6f}")
        print(f"{'passes.tools.embed (compiled, bucketed)':<40} {batch:>5} {len(texts) / t_ours:>9.1f} "
              f"{t_ref / t_ours:>7.2f}x {cos:>11.6f}")
    emb = Embedder(compiled, minilm_dir(), threads=args.threads, batch_size=32)
    emb.embed(texts)
    t = time.perf_counter()
    emb.embed(texts)
    print(f"repeated texts from the LRU cache: {len(texts) / (time.perf_counter() - t):.0f} texts/s "
          f"({emb.cache_hits} hits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
