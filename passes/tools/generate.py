"""Greedy generation with a KV cache in onnxruntime, for decoders exported ``with_past``.

    python -m passes.tools.generate model.onnx --tokens 64 [--prompt-ids 1,2,3 | --prompt-len 8] [--threads 2]

The model takes ``input_ids [B, S]``, ``attention_mask [B, P+S]`` and ``past_key_values.{i}.key``
/ ``.value`` ``[B, kv_heads, P, head_dim]``, and returns ``logits`` and ``present.{i}.key`` /
``.value`` (what :func:`passes.tools.export.export` writes with ``with_past=True``; a model compiled by
``python -m passes.compile`` keeps those names). Generation runs the prompt once with an empty
cache (prefill), then feeds one token a step with the presents as the next pasts.

Python API::

    from passes.tools.generate import generate, generate_with_stats
    ids = generate("llama_past.onnx", [1, 2, 3], max_new_tokens=16)       # -> [[...16 ids]]
    out = generate_with_stats(session, [[1, 2, 3]], 16, keep_logits=True)
    out.ids, out.logits, out.time_to_first_token, out.tokens_per_second
    ppl = perplexity(session, token_ids, window=128)                      # exp(mean next-token NLL)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["generate", "generate_with_stats", "perplexity", "Generation", "GenerateError", "make_session", "main"]

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


class GenerateError(Exception):
    """The model does not look like a decoder exported with a KV cache."""


@dataclass
class Generation:
    """The result of a greedy generation.

    Attributes:
        ids: generated token ids ``[B, max_new_tokens]`` (prompt excluded).
        logits: last-position logits ``[B, vocab]`` of every step (prefill first), when kept.
        time_to_first_token: seconds from the start to the first generated token (prefill).
        decode_seconds: seconds spent on the remaining tokens.
    """

    ids: np.ndarray
    logits: list[np.ndarray] = field(default_factory=list)
    time_to_first_token: float = 0.0
    decode_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput (tokens after the first, per second, per sequence)."""
        n = self.ids.shape[1] - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")


def make_session(path_or_bytes: str | bytes | os.PathLike[str], threads: int = 1, *, spinning: bool = True) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads (see :func:`passes.framework.numerics.session`)."""
    from ..framework.numerics import session

    return session(path_or_bytes, threads, spinning=spinning)


@dataclass
class _Signature:
    past: list[tuple[str, int, int]]  # (input name, kv heads, head dim), in input order
    present: list[str]  # output names matching ``past``
    dtype: Any


def _signature(sess: Any) -> _Signature:
    inputs = {i.name: i for i in sess.get_inputs()}
    for needed in ("input_ids", "attention_mask"):
        if needed not in inputs:
            raise GenerateError(f"the model has no {needed!r} input")
    past = []
    for name, meta in inputs.items():
        m = _PAST.match(name)
        if m is None:
            continue
        shape = meta.shape
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise GenerateError(f"{name} should be [batch, kv_heads, past, head_dim] with static heads, got {shape}")
        past.append((name, shape[1], shape[3]))
    if not past:
        raise GenerateError("the model has no past_key_values.{i}.key/value inputs: export it with with_past=True")
    outputs = {o.name for o in sess.get_outputs()}
    present = []
    for name, _, _ in past:
        layer, kind = _PAST.match(name).groups()  # type: ignore[union-attr]
        out = f"present.{layer}.{kind}"
        if out not in outputs:
            raise GenerateError(f"the model has no {out!r} output")
        present.append(out)
    if "logits" not in outputs:
        raise GenerateError("the model has no 'logits' output")
    dtype = np.float16 if inputs[past[0][0]].type == "tensor(float16)" else np.float32
    return _Signature(past, present, dtype)


def generate_with_stats(
    session_or_path: Any,
    prompt_ids: Any,
    max_new_tokens: int,
    *,
    threads: int = 1,
    keep_logits: bool = False,
) -> Generation:
    """Greedy-decode ``max_new_tokens`` tokens after ``prompt_ids`` with the KV cache.

    Args:
        session_or_path: an ``onnxruntime.InferenceSession`` or a model path.
        prompt_ids: one prompt (list of ids) or a batch of prompts of equal length.
        max_new_tokens: how many tokens to generate (at least 1).
        threads: intra-op threads when a path is given.
        keep_logits: keep the last-position logits of every step.

    Raises:
        GenerateError: the model is not a decoder with KV-cache inputs and outputs.
    """
    sess = session_or_path if hasattr(session_or_path, "run") else make_session(session_or_path, threads)
    sig = _signature(sess)
    ids = np.asarray(prompt_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise GenerateError("prompt_ids must be a non-empty list of ids (or a batch of equal-length lists)")
    if max_new_tokens < 1:
        raise GenerateError("max_new_tokens must be at least 1")
    batch = ids.shape[0]
    feeds: dict[str, np.ndarray] = {name: np.zeros((batch, kv, 0, hd), sig.dtype) for name, kv, hd in sig.past}
    out_names = ["logits", *sig.present]
    generated = np.zeros((batch, max_new_tokens), np.int64)
    result = Generation(generated)
    start = time.perf_counter()
    tokens = ids
    total = 0
    for step in range(max_new_tokens):
        total += tokens.shape[1]
        feeds["input_ids"] = tokens
        feeds["attention_mask"] = np.ones((batch, total), np.int64)
        outs = sess.run(out_names, feeds)
        last = outs[0][:, -1, :]
        nxt = np.argmax(last, axis=-1).astype(np.int64)
        generated[:, step] = nxt
        if keep_logits:
            result.logits.append(np.array(last, copy=True))
        for (name, _, _), present in zip(sig.past, outs[1:]):
            feeds[name] = present
        tokens = nxt[:, None]
        if step == 0:
            result.time_to_first_token = time.perf_counter() - start
    result.decode_seconds = time.perf_counter() - start - result.time_to_first_token
    return result


def generate(session_or_path: Any, prompt_ids: Any, max_new_tokens: int, **kwargs: Any) -> np.ndarray:
    """Greedy-decode with the KV cache and return the generated ids ``[B, max_new_tokens]``.

    See :func:`generate_with_stats` for the arguments.
    """
    return generate_with_stats(session_or_path, prompt_ids, max_new_tokens, **kwargs).ids


def perplexity(session_or_path: Any, token_ids: Any, *, window: int = 128, max_windows: int | None = None,
               threads: int = 1) -> float:
    """Perplexity of the model on a token stream: ``exp`` of the mean next-token negative log-likelihood.

    The stream is cut into windows of ``window`` tokens (a shorter last one is dropped unless it is
    the only one); each runs as one prefill with an empty cache, and predicts its own tokens 2..n.

    Args:
        session_or_path: an ``onnxruntime.InferenceSession`` or a model path (a decoder exported
            ``with_past``, as :func:`generate_with_stats` takes).
        token_ids: 1-D token ids.
        window: tokens per window (at least 2).
        max_windows: use at most this many windows.
        threads: intra-op threads when a path is given.

    Raises:
        GenerateError: the model is not a decoder with a KV cache, or fewer than 2 tokens.
    """
    sess = session_or_path if hasattr(session_or_path, "run") else make_session(session_or_path, threads)
    sig = _signature(sess)
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if window < 2 or ids.size < 2:
        raise GenerateError("perplexity needs a window of at least 2 tokens and at least 2 token ids")
    starts = list(range(0, ids.size - window + 1, window)) or [0]
    if max_windows is not None:
        starts = starts[: max(1, max_windows)]
    nll, count = 0.0, 0
    for start in starts:
        chunk = ids[start : start + window][None, :]
        feeds: dict[str, np.ndarray] = {name: np.zeros((1, kv, 0, hd), sig.dtype) for name, kv, hd in sig.past}
        feeds["input_ids"] = chunk
        feeds["attention_mask"] = np.ones_like(chunk)
        logits = sess.run(["logits"], feeds)[0][0, :-1].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll -= float(logp[np.arange(chunk.shape[1] - 1), chunk[0, 1:]].sum())
        count += chunk.shape[1] - 1
    return float(np.exp(nll / count))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tfcompile generate",
                                description="Greedy generation with a KV cache in onnxruntime.")
    p.add_argument("model", help="decoder .onnx exported with_past (original or compiled)")
    p.add_argument("--tokens", type=int, default=64, help="tokens to generate (default 64)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    group.add_argument("--prompt-len", type=int, default=8, help="random prompt of this length (default 8)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line: prints the ids, time to first token and tokens/s. Exit code 2 on bad input."""
    args = _parser().parse_args(argv)
    try:
        sess = make_session(args.model, args.threads)
        if args.prompt_ids:
            prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        else:
            vocab = next((o.shape[-1] for o in sess.get_outputs() if o.name == "logits"), 1000)
            vocab = vocab if isinstance(vocab, int) else 1000
            prompt = np.random.default_rng(args.seed).integers(3, vocab, args.prompt_len).tolist()
        out = generate_with_stats(sess, prompt, args.tokens)
    except (GenerateError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # onnxruntime load/run failures: one line
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print("prompt:", ",".join(map(str, prompt)))
    print("generated:", ",".join(map(str, out.ids[0].tolist())))
    print(f"time to first token: {out.time_to_first_token * 1000:.2f} ms")
    print(f"tokens/s: {out.tokens_per_second:.1f} ({args.tokens} tokens, {args.threads} thread(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
