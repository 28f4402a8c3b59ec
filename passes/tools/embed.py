"""``python -m passes.tools.embed``: sentence embeddings with a compiled model, end to end.

    python -m passes.tools.embed minilm --texts sentences.txt -o embeddings.npy
    python -m passes.tools.embed path/to/model_dir --texts sentences.txt --onnx compiled.onnx

Tokenizes with the fast Rust tokenizer (``tokenizers``), runs the compiled model in onnxruntime
and mean-pools over the attention mask. Texts are sorted by token count and batched so each batch
pads only to its own longest text (length bucketing), and an LRU cache answers repeated texts
without running the model. Without ``--onnx``, the model directory is exported and compiled for
the host once and cached.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._fingerprint import compiler_fingerprint

__all__ = ["Embedder", "compiled_model_for", "main"]


class Embedder:
    """Mean-pooled sentence embeddings from an ONNX encoder in onnxruntime.

    Args:
        onnx_path: the (compiled) encoder, with inputs ``input_ids``, ``attention_mask`` and
            optionally ``token_type_ids``; its first output is the last hidden state.
        tokenizer_dir: folder with ``tokenizer.json``.
        threads: onnxruntime intra-op threads.
        max_length: truncation length in tokens.
        batch_size: texts per model run.
        cache_size: LRU cache entries (0 disables the cache).
        normalize: L2-normalize embeddings (as sentence-transformers models do).
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike[str],
        tokenizer_dir: str | os.PathLike[str],
        *,
        threads: int = 2,
        max_length: int = 128,
        batch_size: int = 32,
        cache_size: int = 10_000,
        normalize: bool = True,
    ) -> None:
        from tokenizers import Tokenizer

        from ..framework.numerics import session

        tok_file = Path(tokenizer_dir) / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: no tokenizer.json (a fast tokenizer) in {tokenizer_dir}")
        self.tokenizer = Tokenizer.from_file(str(tok_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.session = session(os.fspath(onnx_path), threads)
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.batch_size = batch_size
        self.normalize = normalize
        self.cache_size = cache_size
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.runs = 0
        self.cache_hits = 0

    def _encode_batch(self, ids: list[list[int]]) -> np.ndarray:
        longest = max(len(x) for x in ids)
        input_ids = np.zeros((len(ids), longest), np.int64)
        mask = np.zeros((len(ids), longest), np.int64)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        feeds: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        hidden = self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})[0]
        self.runs += 1
        m = mask[..., None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        if self.normalize:
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled.astype(np.float32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` in their order, shape ``[len(texts), hidden]``."""
        out: list[np.ndarray | None] = [None] * len(texts)
        todo: dict[str, list[int]] = {}
        for i, t in enumerate(texts):
            hit = self.cache.get(t) if self.cache_size else None
            if hit is not None:
                self.cache.move_to_end(t)
                self.cache_hits += 1
                out[i] = hit
            else:
                todo.setdefault(t, []).append(i)
        if todo:
            unique = list(todo)
            encodings = self.tokenizer.encode_batch(unique)
            order = sorted(range(len(unique)), key=lambda k: len(encodings[k].ids))  # length bucketing
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                vecs = self._encode_batch([encodings[k].ids for k in chunk])
                for k, vec in zip(chunk, vecs):
                    text = unique[k]
                    for i in todo[text]:
                        out[i] = vec
                    if self.cache_size:
                        self.cache[text] = vec
                        if len(self.cache) > self.cache_size:
                            self.cache.popitem(last=False)
        return np.stack(out) if out else np.zeros((0, 0), np.float32)  # type: ignore[arg-type]


def compiled_model_for(model_dir: str, *, target: str = "native", cache_dir: str | None = None,
                       quantize: str | None = None, progress: Any = None) -> Path:
    """Export ``model_dir`` (or ``minilm``) and compile it for ``target``, once; returns the cached path."""
    from .export import export, load_model, minilm_dir

    import ir

    from .compile import compile_model

    src = str(minilm_dir()) if model_dir == "minilm" else os.path.abspath(model_dir)
    key = hashlib.sha256(f"{src}|{target}|{quantize}|{compiler_fingerprint()}".encode()).hexdigest()[:12]
    folder = Path(cache_dir or Path.home() / ".cache" / "tfcompile") / key
    compiled = folder / "model.compiled.onnx"
    if compiled.is_file():
        return compiled
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "model.onnx"
    if not raw.is_file():
        if progress:
            progress(f"exporting {src}")
        export(load_model(model_dir if model_dir == "minilm" else src), raw)
    if progress:
        progress(f"compiling for {target}")
    result = compile_model(str(raw), target, quantize=quantize, progress=progress)
    if result.report.verified_ok is False:
        raise RuntimeError(f"compiled model out of tolerance: {result.report.verification}")
    ir.save(result.model, compiled)
    return compiled


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(prog="tfcompile embed", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="transformers model folder (config, weights, tokenizer), or 'minilm'")
    p.add_argument("--texts", required=True, help="text file, one text per line")
    p.add_argument("--onnx", help="an already compiled model (skips export and compile)")
    p.add_argument("--target", default="native")
    p.add_argument("--quantize", choices=["int8"])
    p.add_argument("-o", "--output", help=".npy file for the embeddings")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    def say(msg: str) -> None:
        print(f"embed: {msg}", file=sys.stderr, flush=True)

    try:
        texts = [line.rstrip("\n") for line in open(args.texts, encoding="utf-8") if line.strip()]
        tok_dir = args.model_dir
        if args.model_dir == "minilm":
            from .export import minilm_dir

            tok_dir = str(minilm_dir())
        onnx_path = args.onnx or compiled_model_for(args.model_dir, target=args.target, quantize=args.quantize,
                                                    progress=say)
        emb = Embedder(onnx_path, tok_dir, threads=args.threads, batch_size=args.batch_size)
        import time

        t = time.perf_counter()
        vecs = emb.embed(texts)
        dt = time.perf_counter() - t
    except (OSError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    say(f"{len(texts)} texts in {dt:.2f} s ({len(texts) / dt:.1f} texts/s, {emb.runs} model runs)")
    if args.output:
        np.save(args.output, vecs)
        print(f"wrote {args.output} {list(vecs.shape)}")
    else:
        print(f"embeddings {list(vecs.shape)}; first: {np.array2string(vecs[0][:6], precision=4)} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
