"""Attention computed on batched heads: 3-D ``[B·N, S, ·]`` operands, scores and context.

Bloom (``baddbmm``/``bmm``) and OPT-style exports merge the batch and head axes: the scores
MatMul reads ``Q [B·N, S, d]`` and ``Kᵀ [B·N, d, T]``, the context MatMul reads probabilities
``[B·N, S, T]`` and ``V [B·N, T, d]``, and the scores are viewed as ``[B, N, S, T]`` only for
the mask and the Softmax (Bloom adds its ALiBi term before that view). The attention check
(:mod:`passes.fusions._attention_check`) reads such a layer in the 4-D form it checks every
other layer in, with these helpers: the probed operands are viewed as ``[B, N, ·, ·]``
(batch-major, as ``reshape(B·N, …)`` of ``[B, N, …]`` lays them out); the scores and context it
feeds are the ``[B·N, …]`` views of its 4-D random data; and a bias term added in the 3-D view
(:attr:`~passes.fusions._attention_mask.BiasTerm.heads`) is read as ``[B, N, ·, T]``. Nothing is
assumed from the syntax: if the merged axis is not batch-major, or a Reshape between the
scores and the Softmax is not that view, the probe comparisons fail and the layer stays as it
is with the reason.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ._attention_mask import BiasTerm, MaskRun

__all__ = ["split_heads", "merge_heads", "flat_head_terms"]


def split_heads(ops: tuple[np.ndarray, ...], batch: int) -> tuple[tuple[np.ndarray, ...], bool] | str:
    """The probed Q', K', V' operands as ``[B, N, ·, ·]``, and whether they were batched heads.

    4-D operands come back as they are; 3-D ``[B·N, ·, ·]`` ones as their batch-major
    ``[B, N, ·, ·]`` view. Returns why not when the operands mix ranks or a leading axis is not a
    multiple of the batch.
    """
    ranks = {a.ndim for a in ops}
    if ranks != {3}:
        return ops, False
    if any(a.shape[0] % batch for a in ops):
        shapes = ", ".join(str(list(a.shape)) for a in ops)
        return f"3-D attention operands {shapes} do not merge the batch of {batch} with the heads"
    return tuple(a.reshape(batch, a.shape[0] // batch, *a.shape[1:]) for a in ops), True


def merge_heads(a: np.ndarray) -> np.ndarray:
    """``[B, N, ·, ·]`` → the ``[B·N, ·, ·]`` view a batched-heads MatMul output has."""
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def flat_head_terms(terms: tuple[BiasTerm, ...], runs: list[MaskRun], heads: int) -> tuple[BiasTerm, ...]:
    """The bias ``terms`` of a batched-heads layer, those added in the 3-D view marked as such.

    A term is in the 3-D view when its probed value is ``[B·N, ·, T]`` with ``B > 1`` in some run
    (in the 4-D view a 3-D term broadcasts as ``[1, X, ·, T]`` with ``X`` 1 or ``N``, and ``B·N`` is
    neither); a ``[1, ·, T]`` or lower-rank term means the same in both views and stays unmarked.
    Whether the marked sum is the layer's bias is then checked like any other.
    """
    out = []
    for i, t in enumerate(terms):
        flat = False
        for run in runs:
            if i >= len(run.terms):
                continue
            arr, b = run.terms[i], run.scores.shape[0]
            if b > 1 and arr.ndim == 3 and arr.shape[0] == b * heads:
                flat = True
        out.append(dataclasses.replace(t, heads=heads) if flat else t)
    return tuple(out)
