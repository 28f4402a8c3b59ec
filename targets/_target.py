"""The :class:`Target` data class and its loader. Targets are data: one TOML file each."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Target", "QuantPolicy", "PolicyVariant", "TargetError", "load_target_file"]


class TargetError(Exception):
    """An unknown target name or a malformed target file."""


#: The policy fields a :class:`PolicyVariant` may change (the weight and activation encodings).
VARIANT_FIELDS = ("weight_signed", "per_channel", "reduce_range")


@dataclass(frozen=True)
class PolicyVariant:
    """Another encoding the runtime's int8 kernels take, for ``--autotune`` to measure beside the policy's.

    The policy is the profile's guess; where the kernels have more than one int8 form whose speed
    and accuracy trade differently on a CPU (x86 without VNNI: u8 x s8 with 7-bit weights against
    saturation, u8 x s8 with full 8-bit weights, u8 x u8 with 8-bit weights), a variant lists the
    fields that differ and autotune tries each as one more candidate.

    Attributes:
        name: a short label for reports (``"u8 weights, 8-bit"``).
        changes: ``(field, value)`` pairs over :data:`VARIANT_FIELDS`.
    """

    name: str
    changes: tuple[tuple[str, Any], ...]

    def apply(self, policy: QuantPolicy) -> QuantPolicy:
        """``policy`` with this variant's changes (and no variants of its own)."""
        return dataclasses.replace(policy, variants=(), **dict(self.changes))


@dataclass(frozen=True)
class QuantPolicy:
    """How a target wants int8 done.

    Attributes:
        ops: op types that may be quantized.
        weight_signed: int8 (True) or uint8 (False) weights.
        activation_signed: int8 (True) or uint8 (False) activations.
        per_channel: per-output-channel weight scales.
        reduce_range: quantize weights to 7 bits (CPUs whose int8 dot product can saturate).
        activations: ``"dynamic"`` (scales computed at run time) or ``"static"`` (calibrated).
        format: ``"integer-ops"`` (MatMulIntegerToFloat and friends) or ``"qdq"`` (standard Q/DQ pairs).
        variants: other encodings the kernels take (:class:`PolicyVariant`), measured by ``--autotune``.
    """

    ops: tuple[str, ...] = ("MatMul",)
    weight_signed: bool = True
    activation_signed: bool = False
    per_channel: bool = True
    reduce_range: bool = False
    activations: str = "dynamic"
    format: str = "integer-ops"
    variants: tuple[PolicyVariant, ...] = ()


@dataclass(frozen=True)
class Target:
    """A hardware target profile: what its runtime provides and how to compile for it.

    Passes read capabilities (:meth:`supports`, :attr:`quantization`, :attr:`max_opset`); they
    never branch on :attr:`name`.
    """

    name: str
    description: str
    runtime: str = "onnxruntime"
    aliases: tuple[str, ...] = ()
    cpu_flags: tuple[str, ...] = ()
    machine: tuple[str, ...] = ()
    #: When several targets fit the host, ``native`` picks the highest; 0 with no CPU flags = fallback.
    native_priority: int = 0
    dtypes: tuple[str, ...] = ("float32",)
    max_opset: int = 23
    contrib_ops: frozenset[str] = field(default_factory=frozenset)
    #: How a residual ``Add`` before a ``LayerNormalization`` is emitted on contrib targets:
    #: ``"skip"`` folds it (and the bias Add before it) into ``SkipLayerNormalization``; ``"sum"``
    #: emits one ``Sum(input, bias, residual)`` before the norm, for runtimes whose
    #: SkipLayerNormalization kernel is slower than their LayerNormalization and that would re-fuse
    #: a plain ``Add`` into it.
    residual_layer_norm: str = "skip"
    pipeline: str = "dead-flow"
    quantize_pipeline: str = "quantize,dead-flow"
    quantization: QuantPolicy = field(default_factory=QuantPolicy)

    def supports(self, op_type: str, domain: str = "") -> bool:
        """True when the target's runtime provides ``domain::op_type``.

        Standard ONNX ops are always provided (check the model's opset for new ones); contrib
        ops of ``com.microsoft`` only when listed.
        """
        if domain in ("", "ai.onnx"):
            return True
        if domain == "com.microsoft":
            return op_type in self.contrib_ops
        return False

    @property
    def has_contrib_ops(self) -> bool:
        """True when the runtime provides onnxruntime's ``com.microsoft`` ops."""
        return bool(self.contrib_ops)


def load_target_file(path: Path) -> Target:
    """Read one target TOML file.

    Raises:
        TargetError: naming the file and the problem.
    """
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TargetError(f"target file {path}: {e}") from None
    try:
        q = data.pop("quantization", {})
        q["ops"] = tuple(q.get("ops", ("MatMul",)))
        q["variants"] = tuple(_variant(path, v) for v in q.get("variants", ()))
        policy = QuantPolicy(**q)
        for key in ("aliases", "cpu_flags", "machine", "dtypes"):
            if key in data:
                data[key] = tuple(data[key])
        data["contrib_ops"] = frozenset(data.get("contrib_ops", ()))
        if data.get("residual_layer_norm", "skip") not in ("skip", "sum"):
            raise TargetError(f"target file {path}: residual_layer_norm must be \"skip\" or \"sum\", "
                              f"not {data['residual_layer_norm']!r}")
        return Target(quantization=policy, **data)
    except TypeError as e:
        raise TargetError(f"target file {path}: {e}") from None


def _variant(path: Path, table: dict[str, Any]) -> PolicyVariant:
    """One ``[[quantization.variants]]`` table: a ``name`` and the policy fields it changes."""
    table = dict(table)
    name = table.pop("name", None)
    bad = sorted(set(table) - set(VARIANT_FIELDS))
    if not isinstance(name, str) or not name or bad or not table:
        raise TargetError(f"target file {path}: a quantization variant needs a name and changes to "
                          f"{', '.join(VARIANT_FIELDS)}" + (f" (unknown: {', '.join(bad)})" if bad else ""))
    if not all(isinstance(v, bool) for v in table.values()):
        raise TargetError(f"target file {path}: quantization variant {name!r}: values must be true or false")
    return PolicyVariant(name, tuple(sorted(table.items())))
