"""Calibration inputs for the ``quantize`` pass.

Three sources, best first:

1. ``calibration``: an ``.npz`` of model inputs (one array per input name, batch first);
2. ``tokenizer`` + ``texts``: real text tokenized with the model's
   ``tokenizer.json`` (the ``tokenizers`` package, imported only here and only then), padded per
   batch;
3. generated inputs (:func:`passes.framework.numerics.make_feeds`), with a warning: quantization decisions
   made on random tokens are a guess.

The batches are a lazy sequence (:class:`Batches`): each one is made (generated, tokenized, cut from
the file's arrays and cast) when first read, and kept only while the kept batches stay under a
small byte budget, so token inputs are made once and large inputs (images, audio, long texts)
stream through one batch at a time. The same index always gives the same feeds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import numpy as np

import ir

from ..framework.base import PassError
from ..framework.numerics import _ORT_TYPES, make_feeds

__all__ = ["calibration_batches", "CalibrationSet", "Batches"]

Feeds = dict[str, np.ndarray]

#: Bytes of made batches that :class:`Batches` keeps (token inputs of a whole calibration set fit).
KEEP_BYTES = 64 << 20


class Batches(Sequence[Feeds]):
    """A lazy sequence of ``count`` feed dicts, batch ``i`` made by ``make(i)`` when first read.

    Made batches are kept while their total size stays under ``keep_bytes`` (later ones are made
    again on every read, so at most one of them is in memory at a time). Equality is that of the
    lists of feed dicts.
    """

    def __init__(self, count: int, make: Callable[[int], Feeds], *, keep_bytes: int = KEEP_BYTES) -> None:
        self._count = count
        self._make = make
        self._keep_bytes = keep_bytes
        self._kept: dict[int, Feeds] = {}
        self._kept_bytes = 0
        #: batches made so far, re-made ones included (tests: streaming makes a batch again)
        self.made = 0

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, i: int) -> Feeds: ...
    @overload
    def __getitem__(self, i: slice) -> list[Feeds]: ...
    def __getitem__(self, i: int | slice) -> Feeds | list[Feeds]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._count))]
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(f"calibration batch {i} of {self._count}")
        got = self._kept.get(i)
        if got is None:
            got = self._make(i)
            self.made += 1
            size = sum(v.nbytes for v in got.values())
            if self._kept_bytes + size <= self._keep_bytes:
                self._kept[i] = got
                self._kept_bytes += size
        return got

    def __iter__(self) -> Iterator[Feeds]:
        return (self[i] for i in range(self._count))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]


class CalibrationSet:
    """Batches of model inputs (a :class:`Batches`, or any sequence of feed dicts) and where they came from."""

    def __init__(self, batches: Sequence[Feeds], source: str, generated: bool) -> None:
        self.batches = batches
        self.source = source
        self.generated = generated

    @property
    def samples(self) -> int:
        """Number of samples over all batches."""
        return sum(len(next(iter(b.values()))) if b else 0 for b in self.batches)


def _split(arrays: dict[str, np.ndarray], batch: int, limit: int, dtypes: dict[str, Any]) -> Batches:
    n = min(len(next(iter(arrays.values()))), limit)
    starts = range(0, n, batch)
    # the cast is per batch: a file's arrays are read once, their converted copies only a batch at a time
    return Batches(len(starts), lambda i: {k: np.asarray(v[starts[i] : min(starts[i] + batch, n)], dtypes[k])
                                           for k, v in arrays.items()})


def _from_npz(path: str, input_meta: list[Any], batch: int, limit: int) -> Batches:
    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        raise PassError(f"quantize: cannot read calibration file {path}: {e}") from None
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, Any] = {}
    for meta in input_meta:
        if meta.name not in data:
            raise PassError(f"quantize: calibration file {path} has no array for model input {meta.name!r} "
                            f"(it has: {', '.join(data.files)})")
        arrays[meta.name] = data[meta.name]
        dtypes[meta.name] = _ORT_TYPES.get(meta.type, np.float32)
    sizes = {len(v) for v in arrays.values()}
    if len(sizes) != 1:
        raise PassError(f"quantize: calibration arrays in {path} disagree on the number of samples: {sorted(sizes)}")
    return _split(arrays, batch, limit, dtypes)


def read_texts(path: str) -> list[str]:
    """Non-empty lines of a text file."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise PassError(f"quantize: cannot read texts {path}: {e}") from None


def tokenize(
    tokenizer_dir: str, texts: list[str], input_meta: list[Any], batch: int, max_length: int = 128
) -> Batches:
    """Tokenize ``texts`` into batches of model inputs, padded to the longest text of each batch
    (each batch tokenized when read: see :class:`Batches`)."""
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
    for meta in input_meta:  # an input text cannot fill fails now, not at the first batch read
        lname = meta.name.lower()
        if not any(k in lname for k in ("mask", "type", "segment", "position", "id")):
            raise PassError(f"quantize: cannot fill model input {meta.name!r} from text")

    def make(k: int) -> Feeds:
        enc = tok.encode_batch(texts[k * batch : (k + 1) * batch])
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
            else:
                feeds[meta.name] = cols["ids"].astype(dtype)
        return feeds

    return Batches(-(-len(texts) // batch), make)


class InputMeta:
    """A plain copy of one onnxruntime input description (``name``, ``type``, ``shape``).

    onnxruntime's own ``NodeArg`` keeps its session alive (pybind11 ties it to the session), and the
    lazy batches keep the metadata: with a copy, the float model's session is freed when its user is
    done with it (1B Llama: 4.4 GB).
    """

    __slots__ = ("name", "type", "shape")

    def __init__(self, name: str, type: str, shape: list[Any]) -> None:  # noqa: A002 - onnxruntime's names
        self.name, self.type, self.shape = name, type, shape


def calibration_batches(
    model: ir.Model, input_meta: list[Any], *, calibration: str = "", tokenizer: str = "", texts: str | list[str] = "",
    limit: int, batch: int = 8,
) -> CalibrationSet:
    """The calibration inputs asked for (see the module docstring), at most ``limit`` samples."""
    input_meta = [InputMeta(m.name, m.type, list(getattr(m, "shape", None) or [])) for m in input_meta]
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
    batches = Batches(max(1, limit // batch),
                      lambda seed: make_feeds(model, input_meta, batch=min(batch, limit), seq=32, seed=seed))
    return CalibrationSet(batches, "generated inputs", True)
