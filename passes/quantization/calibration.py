"""Calibration inputs for the ``quantize`` pass.

Three sources, best first:

1. ``calibration``: an ``.npz`` of model inputs (one array per input name, batch first);
2. ``tokenizer`` + ``texts``: real text tokenized with the model's
   ``tokenizer.json`` (the ``tokenizers`` package, imported only here and only then), padded per
   batch;
3. generated inputs (:func:`passes.framework.numerics.make_feeds`), with a warning: quantization decisions
   made on random tokens are a guess.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

import ir

from ..framework.base import PassError
from ..framework.numerics import _ORT_TYPES, make_feeds

__all__ = ["calibration_batches", "CalibrationSet"]


class CalibrationSet:
    """Batches of model inputs and where they came from."""

    def __init__(self, batches: list[dict[str, np.ndarray]], source: str, generated: bool) -> None:
        self.batches = batches
        self.source = source
        self.generated = generated

    @property
    def samples(self) -> int:
        """Number of samples over all batches."""
        return sum(len(next(iter(b.values()))) if b else 0 for b in self.batches)


def _split(arrays: dict[str, np.ndarray], batch: int, limit: int) -> list[dict[str, np.ndarray]]:
    n = min(len(next(iter(arrays.values()))), limit)
    return [{k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, n, batch)]


def _from_npz(path: str, input_meta: list[Any], batch: int, limit: int) -> list[dict[str, np.ndarray]]:
    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        raise PassError(f"quantize: cannot read calibration file {path}: {e}") from None
    arrays: dict[str, np.ndarray] = {}
    for meta in input_meta:
        if meta.name not in data:
            raise PassError(f"quantize: calibration file {path} has no array for model input {meta.name!r} "
                            f"(it has: {', '.join(data.files)})")
        arrays[meta.name] = np.asarray(data[meta.name], dtype=_ORT_TYPES.get(meta.type, np.float32))
    sizes = {len(v) for v in arrays.values()}
    if len(sizes) != 1:
        raise PassError(f"quantize: calibration arrays in {path} disagree on the number of samples: {sorted(sizes)}")
    return _split(arrays, batch, limit)


def read_texts(path: str) -> list[str]:
    """Non-empty lines of a text file."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise PassError(f"quantize: cannot read texts {path}: {e}") from None


def tokenize(
    tokenizer_dir: str, texts: list[str], input_meta: list[Any], batch: int, max_length: int = 128
) -> list[dict[str, np.ndarray]]:
    """Tokenize ``texts`` into batches of model inputs, padded to the longest text of each batch."""
    try:
        from tokenizers import Tokenizer  # optional dependency, only for text calibration
    except ImportError:
        raise PassError("quantize: --tokenizer needs the `tokenizers` package (pip install tokenizers)") from None
    path = os.path.join(tokenizer_dir, "tokenizer.json") if os.path.isdir(tokenizer_dir) else tokenizer_dir
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own exception types
        raise PassError(f"quantize: cannot load tokenizer {path}: {e}") from None
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding()
    out = []
    for i in range(0, len(texts), batch):
        enc = tok.encode_batch(texts[i : i + batch])
        cols = {
            "ids": np.array([e.ids for e in enc]),
            "mask": np.array([e.attention_mask for e in enc]),
            "type": np.array([e.type_ids for e in enc]),
        }
        feeds: dict[str, np.ndarray] = {}
        for meta in input_meta:
            lname = meta.name.lower()
            dtype = _ORT_TYPES.get(meta.type, np.int64)
            if "mask" in lname:
                feeds[meta.name] = cols["mask"].astype(dtype)
            elif "type" in lname or "segment" in lname:
                feeds[meta.name] = cols["type"].astype(dtype)
            elif "position" in lname:
                feeds[meta.name] = np.broadcast_to(np.arange(cols["ids"].shape[1]), cols["ids"].shape).astype(dtype)
            elif "id" in lname:
                feeds[meta.name] = cols["ids"].astype(dtype)
            else:
                raise PassError(f"quantize: cannot fill model input {meta.name!r} from text")
        out.append(feeds)
    return out


def calibration_batches(
    model: ir.Model, input_meta: list[Any], *, calibration: str = "", tokenizer: str = "", texts: str | list[str] = "",
    limit: int, batch: int = 8,
) -> CalibrationSet:
    """The calibration inputs asked for (see the module docstring), at most ``limit`` samples."""
    path = calibration
    if path:
        return CalibrationSet(_from_npz(str(path), input_meta, batch, limit), f"calibration file {path}", False)
    tok = tokenizer
    if tok and texts:
        lines = texts if isinstance(texts, list) else read_texts(str(texts))
        if not lines:
            raise PassError(f"quantize: no text in {texts}")
        lines = lines[:limit]
        return CalibrationSet(tokenize(str(tok), lines, input_meta, batch), f"{len(lines)} texts", False)
    if tok or texts:
        raise PassError("quantize: text calibration needs both --tokenizer and --texts")
    batches = [
        make_feeds(model, input_meta, batch=min(batch, limit), seq=32, seed=seed)
        for seed in range(max(1, limit // batch))
    ]
    return CalibrationSet(batches, "generated inputs", True)
