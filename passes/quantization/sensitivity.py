"""Accuracy measurement for the ``quantize`` pass: how far a candidate model's outputs drift.

The reference (float) model runs once over the calibration batches; every candidate model is then
scored against it per sample:

* encoders (a 3-D float output and an attention-mask input): cosine of the mask-aware mean-pooled
  embedding (what sentence-embedding models serve), and cosine of the hidden states over the real
  (unpadded) tokens;
* decoders (an output called ``logits``): cosine of the logits over real positions, and argmax
  agreement;
* anything else: cosine of each sample's flattened outputs.

The budget is checked on :attr:`Score.worst`, the worst sample's primary cosine.

:meth:`Evaluator.subset` scores on a few of the batches (the hardest ones, for screening): the worst
cosine over a subset is never below the worst over all batches, so a subset that misses the budget
proves the full set misses it too, and only the subsets that pass need the full measurement.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

import ir

from ..framework.numerics import FILE_BYTES, model_bytes_or_path, session, tensor_bytes
from .quant_math import cosine_rows

__all__ = ["Score", "Evaluator", "release_memory", "RESIDENT_BYTES"]

#: Reference outputs an :class:`Evaluator` keeps in memory at most (the rest goes to disk).
RESIDENT_BYTES = 256 << 20


@dataclass(frozen=True)
class Score:
    """How close a model is to the float reference over the calibration samples.

    Attributes:
        worst: the worst sample's primary cosine (pooled embedding, logits, or outputs).
        mean: the mean primary cosine.
        hidden_worst: worst per-sample cosine of the full hidden states / logits over real tokens.
        agreement: argmax agreement over real positions (decoders; 1.0 otherwise).
        batch_worst: the worst primary cosine of each batch, in batch order.
    """

    worst: float
    mean: float
    hidden_worst: float = 1.0
    agreement: float = 1.0
    batch_worst: tuple[float, ...] = field(default=(), compare=False, repr=False)

    def __str__(self) -> str:
        s = f"worst cosine {self.worst:.5f}, mean {self.mean:.5f}, hidden-state worst {self.hidden_worst:.5f}"
        return s + (f", argmax agreement {self.agreement:.4f}" if self.agreement < 1.0 else "")


@dataclass
class _Stats:
    evaluations: int = 0
    #: batches run over all evaluations (a screening evaluation runs fewer than a full one)
    batches: int = 0
    seconds: float = 0.0
    per_batch: list[float] = field(default_factory=list)


def _pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float64)[..., None]
    return (h.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)


class Evaluator:
    """Scores candidate models against the float model on fixed inputs.

    The float model runs once over the batches; its session is released right after. Its outputs
    are kept, as the cosines need every element of them (the dot product with a candidate's), but
    only the scored ones (float outputs), and in memory only up to ``resident_bytes``: the rest is
    written to a temporary folder, one file per batch, and read back one batch at a time while
    scoring (GPT-2's logits over 128 samples of 32 tokens are 0.8 GB). Scores do not depend on where
    a reference is kept. :meth:`close` (or the garbage collector) removes the folder.

    Args:
        reference: the float model: bytes or path (as :func:`passes.framework.numerics.session` takes),
            or an IR model (loaded as :meth:`session_of` does).
        batches: calibration inputs, one feed dict per batch (a list, or a lazy
            :class:`~passes.quantization.calibration.Batches`), or a function of the float model's
            input metadata (onnxruntime's ``get_inputs()``) giving them: then one session serves both.
        threads: onnxruntime intra-op threads.
        resident_bytes: reference outputs kept in memory at most; the others are spilled to disk.
        bar: ``bar(total, desc)`` giving a progress bar for the reference run (:meth:`PassContext.bar`).
    """

    def __init__(self, reference: bytes | str | ir.Model,
                 batches: Sequence[dict[str, np.ndarray]] | Callable[[list[Any]], Sequence[dict[str, np.ndarray]]],
                 *, threads: int = 2, resident_bytes: int = RESIDENT_BYTES,
                 bar: Callable[[int, str], Any] | None = None) -> None:
        self.threads = threads
        self.stats = _Stats()
        sess = self.session_of(reference) if isinstance(reference, ir.Model) else session(reference, threads)
        if callable(batches):
            batches = batches(sess.get_inputs())
        self.batches: Sequence[dict[str, np.ndarray]] = batches
        self.output_names = [o.name for o in sess.get_outputs()]
        self.mask_name = next((i.name for i in sess.get_inputs() if "mask" in i.name.lower()), None)
        self._store = _ReferenceStore(resident_bytes)
        self.kinds: list[str] = []
        with bar(len(batches), "calibrating (float model)") if bar is not None else _nothing() as b:
            for feeds in batches:
                outs = sess.run(None, feeds)
                if not self.kinds:
                    self.kinds = [self._kind(name, out) for name, out in zip(self.output_names, outs)]
                self._store.append([None if k == "skip" else o for k, o in zip(self.kinds, outs)])
                del outs
                if b is not None:
                    b.update(1)
        del sess
        release_memory()
        self.reference: Sequence[list[np.ndarray | None]] = self._store

    def close(self) -> None:
        """Remove the spilled reference outputs (this evaluator and its subsets cannot score after)."""
        self._store.close()

    def subset(self, indices: list[int]) -> Evaluator:
        """An evaluator on the batches ``indices`` only, sharing this one's reference outputs and stats."""
        sub = object.__new__(Evaluator)
        sub.__dict__.update(self.__dict__)
        sub.batches = _Take(self.batches, indices)
        sub.reference = _Take(self.reference, indices)
        return sub

    def hardest(self, score: Score, n: int) -> Evaluator | None:
        """:meth:`subset` on the ``n`` batches with the lowest worst cosine in ``score``, or None when
        that would be all of them (nothing to save)."""
        if n <= 0 or len(score.batch_worst) != len(self.batches) or n >= len(self.batches):
            return None
        return self.subset(sorted(np.argsort(score.batch_worst, kind="stable")[:n].tolist()))

    def _kind(self, name: str, out: np.ndarray) -> str:
        if not np.issubdtype(out.dtype, np.floating):
            return "skip"
        if "logits" in name.lower() and out.ndim == 3:
            return "decoder"
        if self.mask_name is not None and out.ndim == 3:
            b = self.batches[0][self.mask_name]  # made already: the batch being run
            if b.ndim == 2 and out.shape[:2] == b.shape:
                return "encoder"
        return "generic"

    @property
    def kind(self) -> str:
        """``encoder``, ``decoder`` or ``generic``: how the first scored output is read."""
        return next((k for k in self.kinds if k != "skip"), "generic")

    def session(self, source: bytes | str, *, prepack: bool = True) -> Any:
        """An onnxruntime session on ``source`` with the evaluator's thread count (``prepack``: see
        :func:`passes.framework.numerics.session`)."""
        return session(source, self.threads, prepack=prepack)

    def session_of(self, model: ir.Model) -> Any:
        """An onnxruntime session on an IR model.

        Models with over :data:`FILE_BYTES` of tensors go through a temporary file with external data
        (removed once the session is built): onnxruntime then reads the tensors from the file, where
        from serialized bytes the bytes and the parsed protobuf are two more copies of the weights
        while the session is built (measured on GPT-2 base: peak 1.3 GB instead of 2.5 GB).
        """
        with self.saved(model) as source:
            return self.session(source)

    @contextlib.contextmanager
    def saved(self, model: ir.Model) -> Iterator[bytes | str]:
        """``model`` in the form :meth:`session` loads: bytes, or above :data:`FILE_BYTES` of tensors
        the path of a temporary file with external data, removed on exit. The caller may drop the
        model inside the block, before the session is built."""
        if tensor_bytes(model) <= FILE_BYTES:
            source, folder = model_bytes_or_path(model)
        else:
            # Weights still in the original model's data file are referenced there, not copied.
            folder = tempfile.mkdtemp(prefix="tfcompile-session-")
            source = os.path.join(folder, "model.onnx")
            ir.save(model, source, external_data=True, share_external_data=True)
        del model
        ir.release_mapped_pages()  # the weights read to build the model: onnxruntime maps its own
        try:
            yield source
        finally:
            del source
            if folder:
                shutil.rmtree(folder, ignore_errors=True)

    def score(self, source: bytes | str) -> Score:
        """Build a session on ``source`` and score it over every calibration batch."""
        sess = self.session(source)
        try:
            return self.score_session(sess)
        finally:
            del sess
            release_memory()

    def score_model(self, model: ir.Model) -> Score:
        """:meth:`score` for an IR model (its session built by :meth:`session_of`, released after)."""
        sess = self.session_of(model)
        try:
            return self.score_session(sess)
        finally:
            del sess
            release_memory()

    def score_session(self, sess: Any, extra: dict[str, np.ndarray] | None = None) -> Score:
        """Score an open session (``extra`` feeds are added to every batch, e.g. switch flags)."""
        t0 = time.perf_counter()
        primary: list[np.ndarray] = []
        hidden: list[np.ndarray] = []
        agree_num = agree_den = 0
        for feeds, refs in zip(self.batches, self.reference):
            outs = sess.run(self.output_names, {**feeds, **extra} if extra else feeds)
            mask = feeds.get(self.mask_name) if self.mask_name else None
            p_rows, h_rows = [], []
            for kind, ref, got in zip(self.kinds, refs, outs):
                if kind == "skip":
                    continue
                n = ref.shape[0] if ref.ndim else 1
                if kind in ("encoder", "decoder") and mask is not None and mask.shape == ref.shape[:2]:
                    m = mask.astype(bool)
                    hid = np.array([
                        cosine_rows(ref[i][m[i]].reshape(1, -1), got[i][m[i]].reshape(1, -1))[0] for i in range(n)
                    ])
                else:
                    m = None
                    hid = cosine_rows(ref.reshape(n, -1), got.reshape(n, -1))
                if kind == "encoder" and m is not None:
                    p_rows.append(cosine_rows(_pool(ref, m), _pool(got, m)))
                else:
                    p_rows.append(hid)
                h_rows.append(hid)
                if kind == "decoder":
                    sel = m if m is not None else np.ones(ref.shape[:2], bool)
                    agree_num += int((ref.argmax(-1) == got.argmax(-1))[sel].sum())
                    agree_den += int(sel.sum())
            primary.append(np.min(np.stack(p_rows), axis=0))
            hidden.append(np.min(np.stack(h_rows), axis=0))
        p, h = np.concatenate(primary), np.concatenate(hidden)
        self.stats.evaluations += 1
        self.stats.batches += len(self.batches)
        self.stats.seconds += time.perf_counter() - t0
        return Score(
            worst=float(p.min()), mean=float(p.mean()), hidden_worst=float(h.min()),
            agreement=agree_num / agree_den if agree_den else 1.0,
            batch_worst=tuple(float(b.min()) for b in primary),
        )

    def activation_absmax(self, source: bytes | str | ir.Model, names: list[str]) -> dict[str, np.ndarray]:
        """Per-channel (last axis) max |x| of intermediate values over the calibration batches.

        ``source`` must expose ``names`` as graph outputs. Padded positions are left out when the
        value is ``[batch, seq, channels]`` and the model has a mask input.
        """
        if not names:
            return {}
        sess = self.session_of(source) if isinstance(source, ir.Model) else session(source, self.threads)
        out: dict[str, np.ndarray] = {}
        for feeds in self.batches:
            mask = feeds.get(self.mask_name) if self.mask_name else None
            for name, x in zip(names, sess.run(names, feeds)):
                x = np.abs(np.asarray(x, np.float32))
                if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
                    x = x[mask.astype(bool)]
                amax = x.reshape(-1, x.shape[-1]).max(axis=0)
                out[name] = amax if name not in out else np.maximum(out[name], amax)
        del sess
        release_memory()
        return out


class _ReferenceStore(Sequence[list[Optional[np.ndarray]]]):
    """Reference outputs per batch: in memory while under ``resident_bytes``, else one ``.npy`` a batch on disk."""

    def __init__(self, resident_bytes: int) -> None:
        self._resident_bytes = resident_bytes
        self._kept = 0
        self._items: list[list[np.ndarray | None] | tuple[str, int]] = []
        self._folder: str | None = None
        self._finalizer: weakref.finalize | None = None

    def append(self, outs: list[np.ndarray | None]) -> None:
        size = sum(o.nbytes for o in outs if o is not None)
        if self._kept + size <= self._resident_bytes:
            self._items.append(outs)
            self._kept += size
            return
        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="tfcompile-reference-")
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._folder, True)
        path = os.path.join(self._folder, f"batch{len(self._items)}.npz")
        np.savez(path, **{f"o{j}": o for j, o in enumerate(outs) if o is not None})
        self._items.append((path, len(outs)))

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    @property
    def spilled(self) -> int:
        """Batches kept on disk."""
        return sum(isinstance(it, tuple) for it in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> list[np.ndarray | None]:  # type: ignore[override]
        it = self._items[i]
        if not isinstance(it, tuple):
            return it
        path, n = it
        with np.load(path) as data:
            return [data[f"o{j}"] if f"o{j}" in data.files else None for j in range(n)]


class _Take(Sequence[Any]):
    """The items ``indices`` of a sequence, read through (a lazy subset)."""

    def __init__(self, items: Sequence[Any], indices: list[int]) -> None:
        self._items, self._indices = items, list(indices)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        return self._items[self._indices[i]]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield None


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system (glibc's ``malloc_trim``).

    A released onnxruntime session frees its weights, but glibc keeps the freed pages of the heap
    for later allocations; on a machine with little memory the next session should get them.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    ir.release_mapped_pages()
