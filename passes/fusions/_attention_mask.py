"""Semantic classification of attention masks.

An exporter can build the same key-padding or causal mask in dozens of ways (vmap-style index
chains, ``finfo.min`` additive masks, boolean ``Where`` masks, ``-inf`` with a NaN guard...).
Instead of matching them, the attention fusion *evaluates* the piece of graph between the raw
scores ``Q·Kᵀ`` and the Softmax input on probe inputs (see :mod:`passes.fusions._attention_probe`), with
the raw scores replaced by random numbers ``R``, and reads off what it does:

* where the result is ``c·R`` (one constant ``c`` for all positions), the key is *allowed* and
  ``c`` is a post-MatMul scale;
* where it is ``-1e4`` or lower (``-inf``, ``finfo.min``), the key is *blocked*;
* anything else (a bias such as ALiBi, a value depending on the scores) is *unknown*.

A layer whose scores get a bias ``B`` that does not depend on the scores or the hidden states
(ALiBi, T5's relative position buckets, a sliding-window mask) is read by
:func:`classify_biased`: the graph values added to the scores (the *terms*, which stay in the
model) are subtracted first, and what remains must be one of the kinds above; the fused op then
gets ``B`` as ``attention_bias``. A term is a :class:`BiasTerm`: a value added to the scores,
or a boolean condition under which a ``Where`` replaces the scores by a blocking constant (a
banded mask buffer: GPT-Neo's local layers), which adds ``Where(cond, fill, 0)``.

The allowed pattern is then compared, run by run, with the patterns the fused operator can
express from the raw 2-D ``attention_mask``: key padding ``allowed[b,i,j] = mask[b,j]``, causal
``j <= i``, both, or none. Query rows with no allowed key at all (left padding under a causal
mask) are ignored: their outputs are meaningless and exporters differ there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

import ir

__all__ = ["MaskVerdict", "MaskRun", "padding_patterns", "allowed_keys", "expected_allowed", "classify_mask",
           "classify_biased", "BiasTerm", "KINDS"]

#: Mask kinds the fused Attention expresses (``unidirectional`` and/or a raw ``mask_index``).
KINDS = ("none", "causal", "padding", "causal+padding")

#: An additive value at or below this blocks a key.
BLOCKED = -1e4 * 0.999


@dataclass(frozen=True)
class BiasTerm:
    """One part of a score bias: ``value`` itself, or with ``fill`` set, ``fill`` where ``value == blocked_when``.

    ``heads`` > 0: the term is added to scores viewed as ``[B·heads, S, T]`` (Bloom's ALiBi, see
    :mod:`passes.fusions._attention_heads3d`) and is read as ``[B, heads, S, T]``.
    """

    value: ir.Value
    fill: float | None = None
    blocked_when: bool = True
    heads: int = 0

    def evaluate(self, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """The term's values, given the probe's value of :attr:`value`."""
        if self.heads and arr.ndim == 3 and arr.shape[0] % self.heads == 0:
            arr = arr.reshape(arr.shape[0] // self.heads, self.heads, *arr.shape[1:])
        if self.fill is None:
            return arr
        return np.where(arr.astype(bool) == self.blocked_when, np.array(self.fill, dtype), np.array(0, dtype))


@dataclass(frozen=True)
class MaskVerdict:
    """What a mask does.

    Attributes:
        kind: one of :data:`KINDS`.
        mask_input: the graph input holding the 2-D ``[batch, keys]`` 0/1 mask (padding kinds).
        post_scale: the constant the raw scores are multiplied by before the Softmax.
        blocks_with_inf: every blocked logit seen was ``-inf`` (not a finite ``finfo.min`` or
            ``-10000``). Only rows with no allowed key tell the two apart: ``-inf`` gives NaN
            (or 0 behind a NaN guard), a finite value gives a mean.
        bias: the terms whose (broadcast) sum is added to the scaled scores, independent of the
            scores and of the hidden states: the fused op's ``attention_bias``.
        bias_rank: the rank of that sum (the op reads it as 4-D ``[1|B, 1|N, S, T]``).
        bias_inf: a query row of the sum is ``-inf`` at every key in some probe run (such a
            row would be NaN in the op, see :func:`passes.fusions._attention_contrib.empty_rows`).
        bias_heads: the sum has a head axis (a bias per head: ALiBi, relative position biases).
        bias_rows: the sum is the same for every query row (``[.., 1, T]``, ALiBi): the op needs
            it expanded over the query axis.
        shape_reads: ``Shape`` outputs of the layer's own heads that the bias is sized by (T5,
            MPT), each with its elements as ``"b"``/``"s"`` (batch, sequence of the layer input) or
            a constant: the emitters rebuild them from the input, so the projections can go.
    """

    kind: str
    mask_input: ir.Value | None
    post_scale: float
    blocks_with_inf: bool = False
    bias: tuple[BiasTerm, ...] = ()
    bias_rank: int = 4
    bias_inf: bool = False
    bias_heads: bool = False
    bias_rows: bool = False
    shape_reads: tuple[tuple[ir.Value, tuple[str | int, ...]], ...] = ()

    @property
    def causal(self) -> bool:
        """True when each query only sees keys at or before its position."""
        return self.kind.startswith("causal")


@dataclass
class MaskRun:
    """One probe evaluation: the graph-input feeds (by ``id``), the raw scores fed, the Softmax input."""

    feeds: dict[int, np.ndarray]
    scores: np.ndarray
    logits: np.ndarray
    #: The values of the bias terms (see :func:`classify_biased`) in this run.
    terms: list[np.ndarray] = field(default_factory=list)
    #: The same terms with other hidden states and scores (same graph inputs), when evaluated.
    terms_other: list[np.ndarray] | None = None


def padding_patterns(batch: int, seq: int, rng: np.random.Generator) -> np.ndarray:
    """A ``[batch, seq]`` 0/1 mask with right, left and random padding, a one in every row and a zero somewhere."""
    m = np.ones((batch, seq), np.int64)
    for b in range(batch):
        kind = b % 3
        keep = int(rng.integers(1, seq + 1)) if seq > 1 else 1
        if kind == 0:  # right padding
            m[b, keep:] = 0
        elif kind == 1:  # left padding
            m[b, : seq - keep] = 0
        else:  # holes anywhere
            m[b] = rng.integers(0, 2, size=seq)
            m[b, int(rng.integers(0, seq))] = 1
    if seq > 1 and m.all():
        m[0, -1] = 0
    return m


def allowed_keys(logits: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray | None, float, str]:
    """Read a mask off ``logits = f(scores)``.

    Returns:
        ``(allowed, c, "")`` with ``allowed`` a boolean array broadcast to the scores' shape and
        ``c`` the scale applied to the allowed scores, or ``(None, 0, reason)``.
    """
    try:
        t = np.broadcast_to(logits.astype(np.float64), scores.shape)
    except ValueError:
        return None, 0.0, f"its shape {list(logits.shape)} does not broadcast to the scores' {list(scores.shape)}"
    r = scores.astype(np.float64)
    if np.isnan(t).any():
        return None, 0.0, "it produces NaN"
    live = np.isfinite(t) & (t > -1e3)
    if not live.any():
        return None, 0.0, "it blocks every key"
    c = float((t[live] * r[live]).sum() / max((r[live] ** 2).sum(), 1e-30))
    dev = t - c * r
    allowed = np.abs(dev) <= 1e-4 * (1.0 + np.abs(c * r))
    blocked = dev <= BLOCKED
    unknown = ~(allowed | blocked)
    if unknown.any():
        idx = tuple(int(i) for i in np.argwhere(unknown)[0])
        return None, 0.0, (
            f"at index {list(idx)} it adds {float(dev[idx]):.4g} to the scaled scores "
            "(neither 0 nor a blocking value <= -1e4)"
        )
    return allowed, c, ""


def expected_allowed(kind: str, mask: np.ndarray | None, batch: int, q: int, k: int) -> np.ndarray:
    """The ``[batch, 1, q, k]`` allowed pattern of a mask ``kind`` for a 2-D 0/1 ``mask``."""
    e = np.ones((batch, 1, q, k), bool)
    if kind in ("padding", "causal+padding"):
        assert mask is not None
        e &= (mask != 0)[:, None, None, :]
    if kind in ("causal", "causal+padding"):
        e &= np.tril(np.ones((q, k), bool), k - q)[None, None]
    return e


def _agrees(allowed: np.ndarray, expected: np.ndarray) -> tuple[bool, str]:
    rows = expected.any(axis=-1, keepdims=True)  # query rows with at least one allowed key
    diff = (allowed != expected) & rows
    if not diff.any():
        return True, ""
    b, h, i, j = (int(x) for x in np.argwhere(diff)[0])
    return False, f"batch {b} head {h} query {i} key {j} is {'allowed' if allowed[b, h, i, j] else 'blocked'}"


def classify_mask(runs: list[MaskRun], candidates: list[ir.Value]) -> MaskVerdict | str:
    """Find the mask kind (and 2-D mask input) that explains every run, or say why none does.

    Args:
        runs: probe evaluations; for each candidate input, the runs feed 0/1 patterns to it.
        candidates: graph inputs that may hold the 2-D attention mask.
    """
    readings = []
    scale = None
    blocked_inf = True
    for run in runs:
        allowed, c, why = allowed_keys(run.logits, run.scores)
        if allowed is None:
            return f"the mask is not a padding or causal mask: {why}"
        blocked = np.broadcast_to(run.logits, run.scores.shape)[~allowed]
        blocked_inf = blocked_inf and bool(np.all(np.isneginf(blocked)))
        if scale is not None and abs(c - scale) > 1e-4 * max(abs(scale), 1e-12):
            return f"the score scale differs between probe inputs ({scale:.6g} vs {c:.6g})"
        scale = c
        readings.append(allowed)
    assert scale is not None
    hypotheses: list[tuple[str, ir.Value | None]] = [("none", None), ("causal", None)]
    hypotheses += [(kind, m) for m in candidates for kind in ("padding", "causal+padding")]
    first_miss = ""
    for kind, m in hypotheses:
        ok = True
        for run, allowed in zip(runs, readings):
            b, _, q, k = allowed.shape
            mask = None
            if m is not None:
                mask = run.feeds.get(id(m))
                if mask is None or mask.shape != (b, k):
                    ok = False
                    break
            good, why = _agrees(allowed, expected_allowed(kind, mask, b, q, k))
            if not good:
                ok = False
                if not first_miss and kind in ("padding", "causal+padding"):
                    first_miss = f"as a {kind} mask of %{m.name if m is not None else '?'}: {why}"
                break
        if ok:
            return MaskVerdict(kind, m, scale, blocked_inf and kind != "none")
    detail = f" ({first_miss})" if first_miss else ""
    return f"the mask is not a padding or causal mask of a 2-D mask input{detail}"


def _remove_bias(logits: np.ndarray, scores: np.ndarray, bias: np.ndarray) -> np.ndarray | str:
    """``logits - bias``, with the keys the bias blocks read as allowed (the bias keeps blocking them)."""
    try:
        t = np.broadcast_to(logits.astype(np.float64), scores.shape)
        p = np.broadcast_to(bias.astype(np.float64), scores.shape)
    except ValueError:
        return f"the bias of shape {list(bias.shape)} does not broadcast to the scores' {list(scores.shape)}"
    r = scores.astype(np.float64)
    blocked_by_bias = p <= BLOCKED
    if (blocked_by_bias & (t > BLOCKED)).any():
        return "the bias blocks a key that the Softmax input keeps"
    with np.errstate(invalid="ignore"):
        rest = np.where(blocked_by_bias, 0.0, t - p)
    live = ~blocked_by_bias & np.isfinite(rest) & (rest > -1e3)
    if not live.any():
        return "the bias blocks every key"
    c = float((rest[live] * r[live]).sum() / max((r[live] ** 2).sum(), 1e-30))
    return np.where(blocked_by_bias, c * r, rest)


def classify_biased(runs: list[MaskRun], candidates: list[ir.Value], terms: tuple[BiasTerm, ...]) -> MaskVerdict | str:
    """Like :func:`classify_mask`, once the sum of the bias ``terms`` is taken off the Softmax input.

    The sum (in the scores' dtype, as the fused model computes it) must broadcast as
    ``[1|B, 1|N, S, T]`` (the ``attention_bias`` contract of onnxruntime's MultiHeadAttention),
    hold no NaN, and be the same for other hidden states and scores: a bias read from the query
    or key values is not an ``attention_bias`` of fixed inputs.
    """
    rest_runs: list[MaskRun] = []
    rank, inf, rows, heads = 0, False, False, False
    for run in runs:
        if len(run.terms) != len(terms) or not terms:
            return "the score bias was not evaluated"
        total = _sum(run.terms, terms, run.scores.dtype)
        if total.dtype != run.scores.dtype:
            return f"the score bias is {total.dtype}, the scores {run.scores.dtype}"
        if run.terms_other is not None:
            other = _sum(run.terms_other, terms, run.scores.dtype)
            if other.shape != total.shape or not np.allclose(other, total, rtol=1e-5, atol=1e-6, equal_nan=True):
                return "the score bias changes with the hidden states: it depends on the query or key values"
        if total.ndim > 4 or np.isnan(total).any():
            return f"the score bias has shape {list(total.shape)} or holds NaN"
        shape = (1,) * (4 - total.ndim) + total.shape
        b, n, q, k = run.scores.shape
        if shape[0] not in (1, b) or shape[1] not in (1, n) or shape[2] not in (1, q) or shape[3] != k:
            return (f"the score bias has shape {list(total.shape)}, not [1|batch, 1|heads, 1|{q}, {k}] "
                    "(MultiHeadAttention's attention_bias, expanded over the query rows if need be)")
        rank, inf = max(rank, total.ndim), inf or bool(np.isneginf(total).all(axis=-1).any())
        rows = rows or (shape[2] == 1 and q > 1)
        heads = heads or shape[1] > 1
        rest = _remove_bias(run.logits, run.scores, total)
        if isinstance(rest, str):
            return rest
        rest_runs.append(MaskRun(run.feeds, run.scores, rest))
    verdict = classify_mask(rest_runs, candidates)
    if isinstance(verdict, str):
        return verdict.replace("the mask is not", "besides the score bias, the mask is not", 1)
    return replace(verdict, blocks_with_inf=False, bias=terms, bias_rank=rank, bias_inf=inf,
                   bias_heads=heads, bias_rows=rows)


def _sum(arrays: list[np.ndarray], terms: tuple[BiasTerm, ...], dtype: np.dtype) -> np.ndarray:
    parts = [t.evaluate(a, dtype) for t, a in zip(terms, arrays)]
    total = parts[0]
    with np.errstate(over="ignore"):  # finfo.min + finfo.min is -inf in the dtype, as the fused model computes it
        for a in parts[1:]:
            total = total + a
    return np.asarray(total)
