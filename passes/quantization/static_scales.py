"""Static activation scales for ``quantize``: ranges from calibration, as constants.

With dynamic activations every call runs a ``DynamicQuantizeLinear`` (a min/max pass over the
activation) and quantizes with that call's own range. A static scale is computed once, from the
calibration inputs, and written as a constant: ``QuantizeLinear(x, scale, zero_point)`` feeds
``MatMulIntegerToFloat`` / ``QAttention`` (or, in QDQ form, a ``DequantizeLinear`` with the same
constants), and no per-call range is taken. What it buys is mainly the choice of range: a clipped
range (``clip`` below 100) gives the bulk of the values more levels at the price of saturating
the rare largest ones.

The range of a quantizer's input is built from per-channel statistics of the activation (last axis,
padded positions left out), so that one calibration run serves every remedy: for each channel
``c`` the ``k``-th smallest and largest value over all calibration tokens (``k = 1``: min and max;
``clip = p``: ``k = max(1, round((1 - p/100) * tokens))``), then

* SmoothQuant's ``x / s`` (``s > 0``) divides each channel's range by ``s_c``;
* outlier channels computed in float are left out (the quantized path reads them as zeros);
* the tensor's range is the envelope over the channels, widened to include 0 (as
  ``DynamicQuantizeLinear``), mapped onto uint8: ``scale = (hi - lo) / 255``,
  ``zero_point = round(-lo / scale)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ChannelRanges", "channel_ranges", "static_qparams"]


@dataclass(frozen=True)
class ChannelRanges:
    """Per-channel low and high values of one activation over the calibration tokens.

    Attributes:
        lo: float32 ``[C]``: each channel's ``k``-th smallest value.
        hi: float32 ``[C]``: each channel's ``k``-th largest value.
        tokens: calibration tokens (rows) seen.
        k: the rank kept (1: min and max).
    """

    lo: np.ndarray
    hi: np.ndarray
    tokens: int
    k: int


class _Extremes:
    """The ``k`` smallest and ``k`` largest values per channel, over rows added batch by batch."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None
        self.rows = 0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
        self.rows += len(x)
        low = x if self.low is None else np.concatenate([self.low, x])
        high = x if self.high is None else np.concatenate([self.high, x])
        k = min(self.k, len(low))
        self.low = np.partition(low, k - 1, axis=0)[:k] if len(low) > k else low
        self.high = -np.partition(-high, k - 1, axis=0)[:k] if len(high) > k else high

    def ranks(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        assert self.low is not None and self.high is not None
        k = min(k, len(self.low))
        return np.sort(self.low, axis=0)[k - 1], -np.sort(-self.high, axis=0)[k - 1]


def _tokens(feeds: dict[str, np.ndarray], mask_name: str | None) -> int:
    """Rows (tokens) a batch gives each activation: the unmasked positions, else the first input's
    leading dims (all of an integer id tensor's, all but the last of a float one's)."""
    if mask_name and mask_name in feeds:
        return int(np.asarray(feeds[mask_name]).sum())
    if not feeds:
        return 0
    x = np.asarray(next(iter(feeds.values())))
    shape = x.shape if np.issubdtype(x.dtype, np.integer) else x.shape[:-1]
    return int(np.prod(shape)) if len(shape) else 1


def channel_ranges(batches: list[dict[str, np.ndarray]], run, names: list[str], clips: tuple[float, ...],
                   mask_name: str | None = None) -> dict[float, dict[str, ChannelRanges]]:
    """Per-channel ranges of the values ``names`` over the calibration ``batches``, for each clip.

    Args:
        batches: calibration feeds.
        run: ``run(names, feeds) -> list of arrays`` (an onnxruntime session's ``run``, on a model
            that has ``names`` among its outputs).
        names: the activations.
        clips: percentiles (100: min/max).
        mask_name: the attention-mask input: positions it masks out are left out of ``[batch, seq, C]``
            values.

    Returns:
        ``{clip: {name: ChannelRanges}}``.
    """
    tokens = sum(_tokens(feeds, mask_name) for feeds in batches)
    ks = {}
    for clip in clips:
        if not 0 < clip <= 100:
            raise ValueError(f"a clip percentile must be in (0, 100], not {clip}")
        ks[clip] = max(1, int(round((1.0 - clip / 100.0) * tokens)))
    keep = {n: _Extremes(max(ks.values())) for n in names}
    for feeds in batches:
        mask = feeds.get(mask_name) if mask_name else None
        for name, x in zip(names, run(names, feeds)):
            x = np.asarray(x, np.float32)
            if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
                x = x[mask.astype(bool)]
            keep[name].add(x)
    out: dict[float, dict[str, ChannelRanges]] = {}
    for clip, k in ks.items():
        out[clip] = {}
        for name, ex in keep.items():
            lo, hi = ex.ranks(k)
            out[clip][name] = ChannelRanges(lo.astype(np.float32), hi.astype(np.float32), ex.rows, k)
    return out


def static_qparams(r: ChannelRanges, smooth: np.ndarray | None = None, outliers: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 ``(scale, zero_point)`` (0-d arrays) of a quantizer reading this activation.

    Args:
        r: the activation's per-channel ranges.
        smooth: SmoothQuant factors the activation is divided by, or None.
        outliers: channels computed in float (read as zeros by the quantizer), or None.
    """
    lo, hi = r.lo.astype(np.float64), r.hi.astype(np.float64)
    if smooth is not None:
        lo, hi = lo / smooth, hi / smooth
    if outliers is not None and len(outliers):
        keep = np.ones(len(lo), bool)
        keep[outliers] = False
        lo, hi = lo[keep], hi[keep]
    low, high = min(0.0, float(lo.min(initial=0.0))), max(0.0, float(hi.max(initial=0.0)))
    scale = np.float32((high - low) / 255.0) if high > low else np.float32(1.0)
    zp = np.uint8(np.clip(np.rint(-low / float(scale)), 0, 255))
    return np.array(scale, np.float32), np.array(zp, np.uint8)
