"""Quantization arithmetic for the ``quantize`` pass: weight scales and zero points, the
run-time activation quantizer's reference, SmoothQuant factors and output metrics.

Everything here is numpy on plain arrays, so tests can check it against an independent reference.

Conventions (those of onnxruntime's integer kernels):

* weights ``W`` are ``[K, N]`` (MatMul's B); per-channel means one scale per output column ``N``;
* symmetric weights: ``W ≈ scale * (q - zero_point)``, zero point 0 for int8 and 128 (64 with
  reduce-range) for uint8;
* ``reduce_range`` keeps weights in 7 bits (``[-63, 63]``): on x86 without VNNI, onnxruntime's
  u8s8 kernel multiplies with ``vpmaddubsw``, whose int16 pair sums saturate once
  ``255 * 127 * 2 > 32767`` (measured on an AVX2 machine: 8-bit weights deviate from the exact
  integer product, 7-bit ones match it to float rounding).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "QuantizedWeight",
    "quantize_weight",
    "clip_ratios",
    "weight_clipping",
    "WEIGHT_CLIPS",
    "dynamic_quantize_linear",
    "smooth_factors",
    "outlier_channels",
    "cosine_rows",
]


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized constant weight.

    Attributes:
        q: the integer weight, same shape as the float one (int8 or uint8).
        scale: float32, ``[N]`` per channel or a scalar (0-d) per tensor.
        zero_point: same shape as ``scale``, same dtype as ``q``.
        axis: the axis ``scale`` runs along (for DequantizeLinear), or ``None`` per tensor.
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None

    def dequantize(self) -> np.ndarray:
        """``scale * (q - zero_point)`` as float32, broadcast along :attr:`axis`."""
        q = self.q.astype(np.float32)
        s, z = self.scale.astype(np.float32), self.zero_point.astype(np.float32)
        if self.axis is not None:
            shape = [1] * q.ndim
            shape[self.axis] = -1
            s, z = s.reshape(shape), z.reshape(shape)
        return (q - z) * s


#: Weight scale choices: ``minmax`` (the scale maps ``max|w|`` to the top level) and ``mse`` (each
#: scale's range is ``max|w|`` times the ratio of :data:`MSE_RATIOS` that minimizes the squared
#: error of the dequantized weight, see :func:`clip_ratios`).
WEIGHT_CLIPS = ("minmax", "mse")
#: Ratios of ``max|w|`` :func:`clip_ratios` tries (1 first: ties keep the unclipped range).
MSE_RATIOS = np.round(np.arange(1.0, 0.595, -0.01), 2)

_WEIGHT_CLIP: contextvars.ContextVar[str] = contextvars.ContextVar("weight_clip", default="minmax")


@contextlib.contextmanager
def weight_clipping(method: str) -> Iterator[None]:
    """Within the block, :func:`quantize_weight` calls that do not name a ``clip`` use ``method``.

    The emitters (:mod:`passes.quantization._emit`) quantize weights with the policy's arguments
    only; the pass chooses the scale method around them this way (a context variable: scoped to
    the block and the thread, never left set).
    """
    if method not in WEIGHT_CLIPS:
        raise ValueError(f"weight clip must be one of {', '.join(WEIGHT_CLIPS)}, not {method!r}")
    token = _WEIGHT_CLIP.set(method)
    try:
        yield
    finally:
        _WEIGHT_CLIP.reset(token)


def clip_ratios(w: np.ndarray, qmax: int, *, per_channel: bool, axis: int = 1,
                ratios: np.ndarray = MSE_RATIOS) -> np.ndarray:
    """For each output channel (or the whole tensor), the ratio ``r`` of ``ratios`` whose symmetric
    scale ``r * max|w| / qmax`` minimizes ``sum((scale * q - w)^2)`` with
    ``q = clip(round(w / scale), -qmax, qmax)``; the first one on ties.

    A smaller range rounds the bulk of the weights more finely at the price of saturating the
    largest: on a heavy-tailed channel the squared error falls below min/max's.

    Returns:
        float64 ratios, ``[N]`` along ``axis`` per channel, else 0-d.
    """
    key = _clip_key(w, qmax, per_channel, axis, ratios)
    if key in _CLIP_MEMO:
        return _CLIP_MEMO[key].copy()
    out = _clip_ratios(np.asarray(w, np.float64), qmax, per_channel, axis, np.asarray(ratios, np.float64))
    if len(_CLIP_MEMO) >= _CLIP_MEMO_SIZE:
        del _CLIP_MEMO[next(iter(_CLIP_MEMO))]
    _CLIP_MEMO[key] = out
    return out.copy()


#: :func:`clip_ratios` results by weight content and arguments (the quantize pass quantizes the same
#: weights once per remedy tried and again in the rewrite; the ratios are a few floats per channel).
_CLIP_MEMO: dict[tuple[Any, ...], np.ndarray] = {}
_CLIP_MEMO_SIZE = 4096


def _clip_key(w: np.ndarray, qmax: int, per_channel: bool, axis: int, ratios: np.ndarray) -> tuple[Any, ...]:
    a = np.ascontiguousarray(w)
    r = np.ascontiguousarray(ratios, np.float64)
    return (hashlib.blake2b(memoryview(a).cast("B"), digest_size=16).digest(), a.dtype.str, a.shape, int(qmax),
            bool(per_channel), int(axis), r.tobytes())


def _clip_ratios(w: np.ndarray, qmax: int, per_channel: bool, axis: int, ratios: np.ndarray) -> np.ndarray:
    if not per_channel:
        return np.asarray(_channel_ratios(w.reshape(-1, 1), qmax, ratios)[0])
    w = np.moveaxis(w, axis % w.ndim, -1).reshape(-1, w.shape[axis % w.ndim])
    # Blocks of channels on the machine's cores (numpy releases the GIL): a channel's error is summed
    # over its own column in the same order as in one piece, so the ratios are the same bit for bit.
    n = w.shape[1]
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    step = max(64, -(-n // (4 * workers)))
    if workers == 1 or n <= step or w.size < (1 << 20):
        return _channel_ratios(w, qmax, ratios)
    with ThreadPoolExecutor(workers) as pool:
        parts = pool.map(lambda j: _channel_ratios(w[:, j:j + step], qmax, ratios), range(0, n, step))
        return np.concatenate(list(parts))


def _channel_ratios(w: np.ndarray, qmax: int, ratios: np.ndarray) -> np.ndarray:
    """:func:`clip_ratios` of each column of a 2-D float64 ``w``.

    Rows go in chunks that stay in cache, every ratio tried on a chunk before the next (the weight
    is read once, not once a ratio); ``err[r, j]`` accumulates ``(clip(rint(w / s), -qmax, qmax) * s - w)^2``.
    """
    absmax = np.abs(w).max(axis=0)
    scales = np.where(absmax > 0, ratios[:, None] * absmax / qmax, 1.0)  # [ratios, N]
    err = np.zeros(scales.shape)
    rows = max(1, (1 << 15) // max(1, w.shape[1]))  # ~256 KB of float64 a chunk
    buf = np.empty((min(rows, w.shape[0]), w.shape[1]))
    for i in range(0, w.shape[0], rows):
        chunk = w[i:i + rows]
        b = buf[: len(chunk)]
        for k, scale in enumerate(scales):
            np.divide(chunk, scale, out=b)
            np.rint(b, out=b)
            np.clip(b, -qmax, qmax, out=b)
            b *= scale
            b -= chunk
            np.multiply(b, b, out=b)
            err[k] += b.sum(axis=0)
    return ratios[np.argmin(err, axis=0)]  # the first ratio on ties


def quantize_weight(
    w: np.ndarray, *, per_channel: bool, signed: bool = True, reduce_range: bool = False, axis: int = 1,
    clip: str | None = None,
) -> QuantizedWeight:
    """Symmetric linear quantization of a constant weight.

    Args:
        w: the float weight (any rank; ``axis`` is the output-channel axis).
        per_channel: one scale per index of ``axis`` (else one for the whole tensor).
        signed: int8 (zero point 0) or uint8 (zero point 128, or 64 with ``reduce_range``).
        reduce_range: 7-bit levels ``[-63, 63]`` instead of ``[-127, 127]``.
        axis: output-channel axis (1 for MatMul's ``[K, N]`` weight).
        clip: ``minmax`` or ``mse`` (:data:`WEIGHT_CLIPS`); ``None``: the method of the enclosing
            :func:`weight_clipping` block, else ``minmax``.

    Returns:
        The quantized weight; an all-zero channel gets scale 1 so nothing divides by zero.
    """
    w = np.asarray(w, dtype=np.float32)
    qmax = 63 if reduce_range else 127
    clip = _WEIGHT_CLIP.get() if clip is None else clip
    if clip not in WEIGHT_CLIPS:
        raise ValueError(f"weight clip must be one of {', '.join(WEIGHT_CLIPS)}, not {clip!r}")
    if per_channel:
        axes = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        absmax = np.max(np.abs(w), axis=axes)
    else:
        absmax = np.asarray(np.max(np.abs(w)))
    if clip == "mse":
        absmax = absmax * clip_ratios(w, qmax, per_channel=per_channel, axis=axis)
    scale = (absmax / qmax).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    if per_channel:
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.rint(w / scale.reshape(shape))
    else:
        q = np.rint(w / scale)
    q = np.clip(q, -qmax, qmax)
    if signed:
        zp = np.zeros(scale.shape, np.int8)
        return QuantizedWeight(q.astype(np.int8), scale, zp, axis % w.ndim if per_channel else None)
    offset = 64 if reduce_range else 128
    zp = np.full(scale.shape, offset, np.uint8)
    return QuantizedWeight((q + offset).astype(np.uint8), scale, zp, axis % w.ndim if per_channel else None)


def dynamic_quantize_linear(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """Reference of ONNX ``DynamicQuantizeLinear``: uint8, range widened to include 0."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((hi - lo) / 255.0) if hi > lo else np.float32(1.0)
    zp = np.uint8(np.clip(np.rint(-lo / scale), 0, 255))
    q = np.clip(np.rint(x / scale) + zp, 0, 255).astype(np.uint8)
    return q, scale, zp


def smooth_factors(act_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel factors ``s = max|x|^a / max|w|^(1-a)``.

    The activation is divided by ``s`` and the weight rows multiplied by it, moving outliers from
    the activation (quantized per tensor at run time) into the weight (quantized per channel).
    Factors are clipped to ``[1e-2, 1e2]`` and normalized to geometric mean 1, so the weight's
    overall magnitude stays put.
    """
    a = np.maximum(np.asarray(act_absmax, np.float64), 1e-5)
    w = np.maximum(np.asarray(w_absmax, np.float64), 1e-5)
    s = a**alpha / w ** (1.0 - alpha)
    s = s / np.exp(np.mean(np.log(s)))
    return np.clip(s, 1e-2, 1e2).astype(np.float32)


def outlier_channels(act_absmax: np.ndarray, threshold: float, max_fraction: float) -> np.ndarray:
    """Input channels to compute in float (LLM.int8()-style decomposition), sorted ascending.

    Activations are quantized per tensor at run time, so one channel far above the others sets
    the scale for all of them. A channel is an outlier when its calibration ``max|x|`` exceeds
    ``threshold`` times the reference level, the ``max|x|`` of the channel ranked just past the
    allowed budget (``max_fraction`` of the channels, at least one). At most that many channels
    are returned; none when ``threshold <= 0``.
    """
    a = np.asarray(act_absmax, np.float64).reshape(-1)
    k_max = max(1, int(round(len(a) * max_fraction)))
    if threshold <= 0 or len(a) <= k_max:
        return np.zeros(0, np.int64)
    order = np.argsort(-a, kind="stable")
    reference = a[order[k_max]]
    picked = [int(i) for i in order[:k_max] if a[i] > threshold * reference]
    return np.array(sorted(picked), np.int64)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of corresponding rows of two ``[n, d]`` arrays (1 when both are zero)."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (na * nb)
    cos = np.where((na == 0) & (nb == 0), 1.0, cos)
    return np.nan_to_num(cos, nan=0.0)
