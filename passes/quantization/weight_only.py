"""``quantize-weights``: block-wise weight-only int8/int4, as onnxruntime's ``com.microsoft::MatMulNBits``.

A ``MatMul`` (or ``Gemm``) with a constant 2-D float32 weight ``W [K, N]`` becomes::

    MatMulNBits(A, B, scales, zero_points[, bias]) {K, N, bits, block_size, accuracy_level}

with ``W`` quantized along ``K`` in blocks of ``block_size`` rows, each block of each output column
with its own scale (and zero point unless ``symmetric``). Only the weights are quantized: with
``accuracy_level=4`` onnxruntime's CPU kernel quantizes the activation to int8 *per block* as well
and runs an int8 dot product, which keeps accuracy where a per-tensor activation scale fails, and
the weights shrink 4x (int8) or 8x (int4), which is what matters when a model's weights do not fit
the cache (short sequences, decoding).

The layout (onnxruntime's ``MatMulNBits`` schema, ``weight_prepacked=0``):

* ``B``: uint8 ``[N, k_blocks, blob_size]``, ``k_blocks = ceil(K / block_size)``,
  ``blob_size = block_size * bits / 8``; row ``n`` is column ``n`` of ``W`` (``K`` padded with zeros
  to ``k_blocks * block_size``); 4-bit codes packed two a byte, the first in the low nibble;
* ``scales``: float32 ``[N, k_blocks]``;
* ``zero_points``: uint8 ``[N, ceil(k_blocks * bits / 8)]`` packed as ``B`` (absent when
  ``symmetric``: the kernel's default ``2^(bits-1)``);
* dequantized weight: ``(code - zero_point) * scale``.

A bias ``Add`` of a constant ``[N]`` vector that alone reads the product (or Gemm's ``C``) goes into
the op's ``bias`` input. The rewrite happens only where the target provides ``com.microsoft``
``MatMulNBits``. :func:`pack_weight` and :func:`dequantize_weight` are the math, public for tests.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

import ir

from ._candidates import MS, find_candidates, initializer_array, weight_of
from ._emit import _bias_add, _drop_unused
from ..framework.base import Pass, PassContext, PassError, PassResult
from ..framework.registry import register_pass
from ..framework.rewriter import Rewriter

__all__ = ["WeightOnlyQuantizePass", "PackedWeight", "pack_weight", "dequantize_weight"]


@dataclass(frozen=True)
class PackedWeight:
    """A ``[K, N]`` weight in ``MatMulNBits`` form.

    Attributes:
        b: uint8 ``[N, k_blocks, blob_size]``.
        scales: float32 ``[N, k_blocks]``.
        zero_points: uint8 ``[N, ceil(k_blocks * bits / 8)]``, or ``None`` (symmetric).
        k: rows of the logical weight.
        n: columns of the logical weight.
        bits: 4 or 8.
        block_size: rows per block.
    """

    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    n: int
    bits: int
    block_size: int


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes along the last axis, low bits first (8 bits: as they are)."""
    if bits == 8:
        return codes.astype(np.uint8)
    per = 8 // bits
    pad = (-codes.shape[-1]) % per
    if pad:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (pad,), codes.dtype)], axis=-1)
    c = codes.reshape(codes.shape[:-1] + (-1, per)).astype(np.uint8)
    out = np.zeros(c.shape[:-1], np.uint8)
    for j in range(per):
        out |= (c[..., j] << (bits * j)).astype(np.uint8)
    return out


def pack_weight(w: np.ndarray, *, bits: int = 4, block_size: int = 32, symmetric: bool = False) -> PackedWeight:
    """Quantize ``w [K, N]`` block-wise along ``K`` and pack it for ``MatMulNBits``.

    Asymmetric blocks map ``[min(x, 0), max(x, 0)]`` onto ``0 .. 2^bits - 1`` with a zero point;
    symmetric ones map ``[-max|x|, max|x|]`` onto codes around ``2^(bits-1)`` (the kernel's default
    zero point), with scale ``max|x| / (2^(bits-1) - 1)``.

    Raises:
        PassError: ``bits`` is not 4 or 8, or ``block_size`` is not a power of two >= 16.
    """
    if bits not in (4, 8):
        raise PassError(f"quantize-weights: bits must be 4 or 8, not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise PassError(f"quantize-weights: block_size must be a power of two >= 16, not {block_size}")
    k, n = w.shape
    k_blocks = -(-k // block_size)
    wt = np.zeros((n, k_blocks * block_size), np.float32)
    wt[:, :k] = np.asarray(w, np.float32).T
    blocks = wt.reshape(n, k_blocks, block_size).astype(np.float64)
    qmax = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        amax = np.abs(blocks).max(axis=-1)
        scale = amax / (mid - 1)
        scale[scale == 0] = 1.0
        codes = np.clip(np.rint(blocks / scale[..., None]) + mid, 0, qmax)
        zp = None
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0)
        hi = np.maximum(blocks.max(axis=-1), 0.0)
        scale = (hi - lo) / qmax
        scale[scale == 0] = 1.0
        zpf = np.clip(np.rint(-lo / scale), 0, qmax)
        codes = np.clip(np.rint(blocks / scale[..., None]) + zpf[..., None], 0, qmax)
        zp = _pack_codes(zpf.astype(np.uint8), bits)
    b = _pack_codes(codes.astype(np.uint8), bits)
    return PackedWeight(b, scale.astype(np.float32), zp, k, n, bits, block_size)


def _unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[..., :count].astype(np.int32)
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * j)) & mask for j in range(per)]
    return np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :count].astype(np.int32)


def dequantize_weight(p: PackedWeight) -> np.ndarray:
    """The float32 ``[K, N]`` weight that ``MatMulNBits`` computes with."""
    n, k_blocks, _ = p.b.shape
    codes = _unpack_codes(p.b, p.bits, p.block_size)  # [N, k_blocks, block_size]
    if p.zero_points is None:
        zp = np.full((n, k_blocks), 1 << (p.bits - 1), np.int32)
    else:
        zp = _unpack_codes(p.zero_points.reshape(n, -1), p.bits, k_blocks)
    w = (codes - zp[..., None]).astype(np.float32) * p.scales.reshape(n, k_blocks)[..., None]
    return np.ascontiguousarray(w.reshape(n, -1)[:, : p.k].T)


@register_pass
@dataclass(frozen=True)
class WeightOnlyQuantizePass(Pass):
    """Quantize constant MatMul/Gemm weights block-wise to int4/int8 as ``com.microsoft::MatMulNBits``.

    Attributes:
        bits: 4 or 8.
        block_size: weight rows per block (a power of two >= 16).
        accuracy_level: ``MatMulNBits``'s ``accuracy_level``: 4 quantizes activations per block to
            int8 inside the kernel (the fast path on x86 and Arm), 0/1 computes in float.
        symmetric: no zero points (codes centred on ``2^(bits-1)``).
        exclude: node names or op types never to quantize.
        min_weight: weights with fewer elements stay float (tiny projections gain nothing).
    """

    name: ClassVar[str] = "quantize-weights"
    summary: ClassVar[str] = "block-wise weight-only int4/int8 MatMul/Gemm -> com.microsoft MatMulNBits"

    bits: int = 4
    block_size: int = 32
    accuracy_level: int = 4
    symmetric: bool = False
    exclude: tuple[str, ...] = ()
    min_weight: int = 0

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Rewrite every eligible MatMul/Gemm (see the module docstring)."""
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise PassError(f"quantize-weights: accuracy_level must be 0-4, not {self.accuracy_level}")
        pack_weight(np.zeros((16, 1), np.float32), bits=self.bits, block_size=self.block_size)  # validates options
        rw = Rewriter()
        if ctx.target is None or not ctx.target.supports("MatMulNBits", MS):
            return rw.result()
        nodes = list(model.graph)
        todo = [c for c in find_candidates(model, ("MatMul", "Gemm"), set(self.exclude))
                if c.weight_shape[0] * c.weight_shape[1] >= self.min_weight]
        todo_nodes = [nodes[c.index] for c in todo]  # indices shift as nodes are inserted
        stats: Counter[str] = Counter()
        for c, node in zip(todo, todo_nodes):
            self._rewrite(model.graph, rw, node, c.op)
            stats[f"{c.op} -> MatMulNBits ({self.bits}-bit)"] += 1
        if todo:
            rw.import_opset(model, MS)
            rw.stats.update(stats)
        return rw.result()

    def _rewrite(self, graph: ir.Graph, rw: Rewriter, node: ir.Node, op: str) -> None:
        w, bias = weight_of(node)  # type: ignore[misc]
        k, n = w.shape
        replaced, erase = node.outputs[0], [node]
        old = [v for v in node.inputs[1:] if v is not None]
        if bias is None and op == "MatMul":
            add = _bias_add(node, n)
            if add is not None:
                other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
                bias = initializer_array(other).reshape(-1)  # type: ignore[union-attr]
                replaced, erase = add.outputs[0], [add, node]
                old.append(other)  # type: ignore[arg-type]
        assert replaced is not None
        p = pack_weight(w, bits=self.bits, block_size=self.block_size, symmetric=self.symmetric)
        base = node.name or replaced.name
        inputs: list[ir.Value | None] = [
            node.inputs[0],
            rw.constant(graph, p.b, name=f"{base}_w_q{self.bits}"),
            rw.constant(graph, p.scales, name=f"{base}_w_scales"),
            None if p.zero_points is None else rw.constant(graph, p.zero_points, name=f"{base}_w_zero_points"),
        ]
        if bias is not None:
            inputs += [None, rw.constant(graph, np.ascontiguousarray(bias, np.float32), name=f"{base}_bias")]
        while inputs[-1] is None:
            inputs.pop()
        attrs = {"K": k, "N": n, "bits": self.bits, "block_size": self.block_size,
                 "accuracy_level": self.accuracy_level}
        new = rw.make("MatMulNBits", inputs, attrs, before=node, domain=MS, name=f"{base}_nbits",
                      output_names=[f"{base}_out"], types=[replaced.type])
        rw.replace_all_uses_with(replaced, new.outputs[0])
        rw.erase(erase)
        for v in old:
            _drop_unused(graph, rw, v)
