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

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..framework.numerics import session
from .quant_math import cosine_rows

__all__ = ["Score", "Evaluator"]


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

    Args:
        reference: the float model (bytes or path, as :func:`passes.framework.numerics.session` takes).
        batches: calibration inputs, one feed dict per batch.
        threads: onnxruntime intra-op threads.
    """

    def __init__(self, reference: bytes | str, batches: list[dict[str, np.ndarray]], *, threads: int = 2) -> None:
        self.threads = threads
        self.batches = batches
        self.stats = _Stats()
        sess = session(reference, threads)
        self.output_names = [o.name for o in sess.get_outputs()]
        self.mask_name = next((i.name for i in sess.get_inputs() if "mask" in i.name.lower()), None)
        self.reference = [sess.run(None, b) for b in batches]
        self.kinds = [self._kind(name, out) for name, out in zip(self.output_names, self.reference[0])]

    def subset(self, indices: list[int]) -> Evaluator:
        """An evaluator on the batches ``indices`` only, sharing this one's reference outputs and stats."""
        sub = object.__new__(Evaluator)
        sub.__dict__.update(self.__dict__)
        sub.batches = [self.batches[i] for i in indices]
        sub.reference = [self.reference[i] for i in indices]
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
            b = self.batches[0][self.mask_name]
            if b.ndim == 2 and out.shape[:2] == b.shape:
                return "encoder"
        return "generic"

    @property
    def kind(self) -> str:
        """``encoder``, ``decoder`` or ``generic``: how the first scored output is read."""
        return next((k for k in self.kinds if k != "skip"), "generic")

    def session(self, source: bytes | str) -> Any:
        """An onnxruntime session on ``source`` with the evaluator's thread count."""
        return session(source, self.threads)

    def score(self, source: bytes | str) -> Score:
        """Build a session on ``source`` and score it over every calibration batch."""
        return self.score_session(self.session(source))

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

    def activation_absmax(self, source: bytes | str, names: list[str]) -> dict[str, np.ndarray]:
        """Per-channel (last axis) max |x| of intermediate values over the calibration batches.

        ``source`` must expose ``names`` as graph outputs. Padded positions are left out when the
        value is ``[batch, seq, channels]`` and the model has a mask input.
        """
        if not names:
            return {}
        sess = session(source, self.threads)
        out: dict[str, np.ndarray] = {}
        for feeds in self.batches:
            mask = feeds.get(self.mask_name) if self.mask_name else None
            for name, x in zip(names, sess.run(names, feeds)):
                x = np.abs(np.asarray(x, np.float32))
                if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
                    x = x[mask.astype(bool)]
                amax = x.reshape(-1, x.shape[-1]).max(axis=0)
                out[name] = amax if name not in out else np.maximum(out[name], amax)
        return out
