"""An architecture zoo: tiny random-init ``transformers`` models of the families users deploy.

Each :class:`Arch` is data: how to build a tiny config (hidden 32-64, 2 layers, 2-4 heads,
vocabulary ≤ 1000; never a hub download), what the model takes (``text`` ids and a mask, or
``pixels``), and which fused blocks its architecture allows per layer (:class:`Blocks`). The
test matrix (``tests/test_arch_matrix.py``) and the benchmark (``benchmarks/bench_architectures.py``)
compare what the compiler reaches with that expectation.

Text models go through :func:`passes.tools.export.export` unchanged (decoders other than GPT-2 and
Llama are exported as their base model, output ``last_hidden_state``; the LM head is one MatMul
and fuses nothing). ``pixel_values`` models need a batch-only dynamic axis, which
``export.export`` does not offer; :func:`export_arch` exports them with the same quiet exporter
call.

Example::

    from passes.tools import zoo
    path = zoo.export_arch("qwen3", "/tmp/qwen3", dynamo=True)      # model.onnx + reference.npz
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

__all__ = [
    "ARCHS", "Arch", "Blocks", "FUSED_OPS", "build", "export_arch", "feeds", "fused_counts", "get", "names",
    "reference",
]

#: Op types counted as one fused block of each kind in a compiled model.
FUSED_OPS: dict[str, frozenset[str]] = {
    "attention": frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"}),
    "norm": frozenset({
        "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization", "RMSNormalization",
    }),
    "activation": frozenset({"Gelu", "BiasGelu", "FastGelu", "QuickGelu"}),
    "rotary": frozenset({"RotaryEmbedding"}),
}

_VOCAB = 1000
_POS = 256


@dataclass(frozen=True)
class Blocks:
    """The fused blocks an architecture allows: per layer, plus the ones outside the layers.

    Attributes:
        attention: fused attention ops per layer (0 where no exact fused op exists).
        norms: norm ops per layer (LayerNorm/RMSNorm, q/k norms included).
        activation: the MLP activation, as written (``"gelu"``, ``"gelu_tanh"``, ``"silu"``,
            ``"quick_gelu"``, ``"relu"``); ``None`` for none that fuses.
        activations: fused activation ops per layer (SwiGLU's SiLU counts one).
        rotary: RotaryEmbedding ops per layer (2: q and k).
        extra_norms: norms outside the layers (embedding LayerNorm, final norm).
        notes: what is special (partial rotary, ALiBi, sliding window, ...).
    """

    attention: int = 1
    norms: int = 2
    activation: str | None = "gelu"
    activations: int = 1
    rotary: int = 0
    extra_norms: int = 1
    notes: str = ""

    def total(self, layers: int) -> dict[str, int]:
        """The expected fused op counts of a whole model with ``layers`` layers."""
        return {
            "attention": self.attention * layers,
            "norm": self.norms * layers + self.extra_norms,
            "activation": self.activations * layers,
            "rotary": self.rotary * layers,
        }


@dataclass(frozen=True)
class Arch:
    """One zoo entry.

    Attributes:
        name: zoo name (kebab-case).
        config: builds the tiny ``transformers`` config.
        model: ``transformers`` class name to build from the config (``AutoModel`` by default).
        inputs: ``"text"`` (``input_ids``, ``attention_mask`` [, ``token_type_ids``]) or
            ``"pixels"`` (``pixel_values``).
        kind: ``"encoder"``, ``"decoder"`` or ``"vision"``.
        expect: the fused blocks the architecture allows.
        layers: number of layers (every config here has 2).
        ort_type: the closest ``model_type`` of onnxruntime's transformers optimizer.
    """

    name: str
    config: Callable[[], Any]
    inputs: str = "text"
    kind: str = "encoder"
    expect: Blocks = field(default_factory=Blocks)
    model: str = "AutoModel"
    layers: int = 2
    ort_type: str = "bert"


def _t() -> Any:
    import transformers

    return transformers


_TEXT = dict(vocab_size=_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=_POS)
_DEC = dict(_TEXT, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_VIS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
            patch_size=4, num_channels=3)

_RMS_DEC = Blocks(norms=2, activation="silu", rotary=2, extra_norms=1, notes="RMSNorm, SwiGLU, rotary")


def _arch(name: str, config: Callable[[], Any], **kw: Any) -> Arch:
    return Arch(name, config, **kw)


ARCHS: tuple[Arch, ...] = (
    # ----------------------------------------------------------------------------- encoders
    _arch("bert", lambda: _t().BertConfig(**_TEXT)),
    _arch("roberta", lambda: _t().RobertaConfig(**dict(_TEXT, max_position_embeddings=_POS + 2), type_vocab_size=1,
                                                pad_token_id=1)),
    _arch("distilbert", lambda: _t().DistilBertConfig(vocab_size=_VOCAB, dim=64, n_layers=2, n_heads=4,
                                                      hidden_dim=128, max_position_embeddings=_POS)),
    _arch("albert", lambda: _t().AlbertConfig(**_TEXT, embedding_size=32),
          expect=Blocks(activation="gelu_tanh", notes="gelu_new; shared layer weights")),
    _arch("electra", lambda: _t().ElectraConfig(**_TEXT, embedding_size=32)),
    _arch("deberta-v2", lambda: _t().DebertaV2Config(**_TEXT, relative_attention=True, position_buckets=32,
                                                     pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                                                     share_att_key=True, type_vocab_size=0),
          expect=Blocks(attention=0, extra_norms=2,
                        notes="disentangled c2p/p2c scores depend on q and k: no exact fused op")),
    _arch("xlm-roberta", lambda: _t().XLMRobertaConfig(**dict(_TEXT, max_position_embeddings=_POS + 2),
                                                       type_vocab_size=1, pad_token_id=1)),
    _arch("mpnet", lambda: _t().MPNetConfig(**dict(_TEXT, max_position_embeddings=_POS + 2), pad_token_id=1,
                                            relative_attention_num_buckets=32),
          expect=Blocks(notes="T5-style relative position bias (query/key independent: attention_bias)")),
    _arch("roformer", lambda: _t().RoFormerConfig(**_TEXT, embedding_size=64),
          expect=Blocks(rotary=2, notes="rotary encoder (interleaved sin/cos)")),
    _arch("esm", lambda: _t().EsmConfig(**dict(_TEXT, vocab_size=33), pad_token_id=1, mask_token_id=32,
                                        position_embedding_type="rotary", token_dropout=False,
                                        emb_layer_norm_before=False),
          expect=Blocks(rotary=2, notes="pre-LN rotary encoder")),
    _arch("modernbert", lambda: _t().ModernBertConfig(
              vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=_POS, global_attn_every_n_layers=2, local_attention=8, pad_token_id=0,
              eos_token_id=2, bos_token_id=1, cls_token_id=1, sep_token_id=2),
          expect=Blocks(norms=2, rotary=2, extra_norms=1,
                        notes="GeGLU, LayerNorm without bias, rotary, local (sliding-window ±4) layer 1; layer 0 "
                              "has no attention norm (one fewer), embedding and final norms")),
    _arch("nomic-bert", lambda: _t().NomicBertConfig(**_TEXT, type_vocab_size=2),
          expect=Blocks(activation="silu", rotary=2, notes="rotary encoder, SwiGLU")),
    # ----------------------------------------------------------------------------- decoders
    _arch("gpt2", lambda: _t().GPT2Config(vocab_size=_VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                                          n_positions=_POS, bos_token_id=999, eos_token_id=999),
          kind="decoder", model="AutoModelForCausalLM", ort_type="gpt2",
          expect=Blocks(activation="gelu_tanh", notes="gelu_new")),
    _arch("gpt-neo", lambda: _t().GPTNeoConfig(vocab_size=_VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                                               intermediate_size=128, max_position_embeddings=_POS, window_size=8,
                                               bos_token_id=1, eos_token_id=2,
                                               attention_types=[[["global", "local"], 1]]),
          kind="decoder", ort_type="gpt2",
          expect=Blocks(activation="gelu_tanh", notes="no score scaling; layer 1 local (window 8)")),
    _arch("gpt-j", lambda: _t().GPTJConfig(vocab_size=_VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                                           n_positions=_POS, rotary_dim=8, bos_token_id=1, eos_token_id=2),
          kind="decoder", ort_type="gpt2",
          expect=Blocks(norms=1, activation="gelu_tanh", rotary=2,
                        notes="parallel block, partial interleaved rotary (8 of 16)")),
    _arch("gpt-neox", lambda: _t().GPTNeoXConfig(**_TEXT, rotary_pct=0.25, use_parallel_residual=True,
                                                 bos_token_id=1, eos_token_id=2),
          kind="decoder", ort_type="gpt_neox",
          expect=Blocks(norms=2, rotary=2, notes="parallel block (two norms), partial rotary 25%")),
    _arch("llama", lambda: _t().LlamaConfig(**_DEC), kind="decoder", model="AutoModelForCausalLM", ort_type="gpt2",
          expect=_RMS_DEC),
    _arch("mistral", lambda: _t().MistralConfig(**_DEC, sliding_window=8), kind="decoder", ort_type="gpt2",
          expect=Blocks(norms=2, activation="silu", rotary=2, notes="sliding window 8 (GQA 4:2)")),
    _arch("qwen2", lambda: _t().Qwen2Config(**_DEC), kind="decoder", ort_type="gpt2",
          expect=Blocks(norms=2, activation="silu", rotary=2, notes="q/k/v biases, GQA")),
    _arch("qwen3", lambda: _t().Qwen3Config(**_DEC, head_dim=16), kind="decoder", ort_type="gpt2",
          expect=Blocks(norms=4, activation="silu", rotary=2, notes="per-head q/k RMSNorm before rotary")),
    _arch("phi", lambda: _t().PhiConfig(**dict(_TEXT, num_key_value_heads=4), partial_rotary_factor=0.5,
                                        bos_token_id=1, eos_token_id=2),
          kind="decoder", ort_type="phi",
          expect=Blocks(norms=1, activation="gelu_tanh", rotary=2, notes="parallel block, partial rotary 50%")),
    _arch("phi3", lambda: _t().Phi3Config(**_DEC), kind="decoder", ort_type="phi",
          expect=Blocks(norms=2, activation="silu", rotary=2, notes="packed qkv and gate_up")),
    _arch("gemma", lambda: _t().GemmaConfig(**_DEC, head_dim=16), kind="decoder", ort_type="gpt2",
          expect=Blocks(norms=2, activation="gelu_tanh", rotary=2,
                        notes="(1 + w) RMSNorm, GeGLU (tanh), embedding scaled by sqrt(hidden)")),
    _arch("gemma2", lambda: _t().Gemma2Config(**_DEC, head_dim=16, sliding_window=8, attn_logit_softcapping=50.0,
                                              final_logit_softcapping=None, query_pre_attn_scalar=16),
          kind="decoder", ort_type="gpt2",
          expect=Blocks(norms=4, activation="gelu_tanh", rotary=2,
                        notes="4 norms a layer, logit soft-capping, local layers (window 8)")),
    _arch("stablelm", lambda: _t().StableLmConfig(**_DEC, partial_rotary_factor=0.25), kind="decoder",
          ort_type="gpt2",
          expect=Blocks(norms=2, activation="silu", rotary=2, notes="LayerNorm, partial rotary 25%")),
    _arch("falcon", lambda: _t().FalconConfig(vocab_size=_VOCAB, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, multi_query=True, parallel_attn=True,
                                              new_decoder_architecture=False, alibi=False, bias=False,
                                              bos_token_id=1, eos_token_id=2),
          kind="decoder", ort_type="gpt2",
          expect=Blocks(norms=1, rotary=2, notes="multi-query (one K/V head), parallel block")),
    _arch("bloom", lambda: _t().BloomConfig(vocab_size=_VOCAB, hidden_size=64, n_layer=2, n_head=4,
                                            bos_token_id=1, eos_token_id=2, pad_token_id=0),
          kind="decoder", ort_type="gpt2",
          expect=Blocks(activation="gelu_tanh", extra_norms=2, notes="ALiBi, embedding LayerNorm, factored tanh GELU")),
    _arch("mpt", lambda: _t().MptConfig(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=_POS,
                                        vocab_size=_VOCAB, attn_config={"alibi": True}),
          kind="decoder", ort_type="gpt2",
          expect=Blocks(notes="ALiBi, LayerNorm without bias")),
    _arch("opt", lambda: _t().OPTConfig(vocab_size=_VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=_POS, word_embed_proj_dim=64,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0),
          kind="decoder", ort_type="gpt2",
          expect=Blocks(activation="relu", activations=0, notes="ReLU MLP (nothing to fuse)")),
    _arch("codegen", lambda: _t().CodeGenConfig(vocab_size=_VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                                                n_positions=_POS, n_ctx=_POS, rotary_dim=8, bos_token_id=1,
                                                eos_token_id=2),
          kind="decoder", ort_type="gpt2",
          expect=Blocks(norms=1, activation="gelu_tanh", rotary=2,
                        notes="parallel block, packed qkv (mp_num=4), partial interleaved rotary")),
    _arch("olmo2", lambda: _t().Olmo2Config(**_DEC), kind="decoder", ort_type="gpt2",
          expect=Blocks(norms=4, activation="silu", rotary=2, notes="post-norms, q/k RMSNorm over all heads")),
    # ----------------------------------------------------------------------------- vision
    _arch("vit", lambda: _t().ViTConfig(**_VIS), inputs="pixels", kind="vision", ort_type="vit",
          expect=Blocks(notes="no mask")),
    _arch("dinov2", lambda: _t().Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              mlp_ratio=2, image_size=32, patch_size=4, layerscale_value=0.5),
          inputs="pixels", kind="vision", ort_type="vit",
          expect=Blocks(notes="no mask, layer scale, position embedding interpolation")),
    _arch("clip-vision", lambda: _t().CLIPVisionConfig(**_VIS), model="CLIPVisionModel", inputs="pixels",
          kind="vision", ort_type="clip",
          expect=Blocks(activation="quick_gelu", extra_norms=1,
                        notes="pre-LN, quick_gelu (post_layernorm is on the pooled output, not exported)")),
    _arch("swin", lambda: _t().SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                          window_size=4),
          inputs="pixels", kind="vision", ort_type="swin",
          expect=Blocks(extra_norms=3, notes="window attention with relative position bias, patch merging")),
    _arch("clip-text", lambda: _t().CLIPTextConfig(**_TEXT, eos_token_id=2, bos_token_id=1, pad_token_id=0),
          model="CLIPTextModel", ort_type="clip",
          expect=Blocks(activation="quick_gelu", extra_norms=1, notes="causal mask in an encoder, quick_gelu")),
    _arch("t5-encoder", lambda: _t().T5Config(vocab_size=_VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                              num_heads=4, relative_attention_num_buckets=32,
                                              feed_forward_proj="relu"),
          model="T5EncoderModel", ort_type="t5",
          expect=Blocks(activation="relu", activations=0, notes="relative position bias, RMSNorm without mean, "
                                                                "unscaled scores")),
)

_BY_NAME = {a.name: a for a in ARCHS}


def names() -> list[str]:
    """Zoo names, in the zoo's order (encoders, decoders, vision)."""
    return [a.name for a in ARCHS]


def get(name: str) -> Arch:
    """The zoo entry ``name``.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown zoo architecture {name!r}; known: {', '.join(_BY_NAME)}") from None


def build(name: str, attn: str | None = "sdpa") -> Any:
    """The tiny model of ``name`` in eval mode, deterministic (seed 0, constant params perturbed)."""
    import torch
    import transformers

    from . import export as ex

    arch = get(name)
    config = arch.config()
    torch.manual_seed(0)
    cls = getattr(transformers, arch.model)
    make = cls.from_config if arch.model.startswith("Auto") else cls._from_config
    try:
        model = make(config, **({"attn_implementation": attn} if attn else {}))
    except ValueError:  # the family has no such attention implementation (sdpa): eager
        model = make(arch.config(), attn_implementation="eager")
    ex._perturb_constant_params(model)
    return model.eval()


def feeds(name: str, model: Any = None, *, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of ``name``'s export: ids and a mask whose last row is half padded, or pixel values."""
    arch = get(name)
    rng = np.random.default_rng(seed)
    if arch.inputs == "pixels":
        cfg = arch.config()
        size = int(getattr(cfg, "image_size", 32))
        return {"pixel_values": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}
    vocab = int(getattr(arch.config(), "vocab_size", _VOCAB))
    out = {
        "input_ids": rng.integers(3, min(vocab, _VOCAB), size=(batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
    }
    if batch > 1:
        out["attention_mask"][-1, seq // 2:] = 0
    if model is not None:
        from . import export as ex

        if ex._uses_token_type_ids(model) and not ex.is_decoder(model):
            out["token_type_ids"] = np.zeros((batch, seq), dtype=np.int64)
    return out


def _wrapper(name: str, model: Any) -> Any:
    from torch import nn

    from . import export as ex

    if get(name).inputs == "pixels":
        class PixelWrapper(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, pixel_values: Any) -> Any:
                return self.model(pixel_values=pixel_values, return_dict=True).last_hidden_state

        return PixelWrapper().eval()
    if ex.is_decoder(model):
        return ex.DecoderWrapper(model).eval()
    return ex.EncoderWrapper(model, token_type_ids=ex._uses_token_type_ids(model)).eval()


def reference(name: str, model: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Torch's output of ``model`` (built by :func:`build`) on ``inputs``."""
    import torch

    wrapper = _wrapper(name, model)
    args = [torch.from_numpy(inputs[k]) for k in ("pixel_values",) if k in inputs] or [
        torch.from_numpy(inputs[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in inputs
    ]
    with torch.no_grad():
        return wrapper(*args).numpy()


def export_arch(name: str, folder: str | os.PathLike[str], *, dynamo: bool = False, attn: str | None = "sdpa"
                ) -> pathlib.Path:
    """Export ``name`` into ``folder``: ``model.onnx`` and ``reference.npz`` (feeds and torch output).

    Returns:
        The path of ``model.onnx``.

    Raises:
        passes.tools.export.ExportError: the exporter failed (one line).
    """
    import torch

    from . import export as ex

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    model = build(name, attn)
    if get(name).inputs == "text":
        ex.export(model, path, dynamo=dynamo)
    else:
        inputs = feeds(name, model)
        wrapper = _wrapper(name, model)
        args = (torch.from_numpy(inputs["pixel_values"]),)
        try:
            with ex._quiet(), torch.no_grad():
                if dynamo:
                    from torch.export import Dim

                    program = torch.onnx.export(
                        wrapper, args, None, input_names=["pixel_values"], output_names=["last_hidden_state"],
                        opset_version=18, dynamo=True, optimize=True, report=False, verify=False,
                        dynamic_shapes={"pixel_values": {0: Dim("batch", min=1, max=1024)}},
                    )
                    program.save(str(path))
                else:
                    torch.onnx.export(
                        wrapper, args, str(path), input_names=["pixel_values"], output_names=["last_hidden_state"],
                        opset_version=17, dynamo=False, do_constant_folding=True,
                        dynamic_axes={"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"}},
                    )
        except Exception as exc:  # noqa: BLE001 - one line, as export.export does
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ex.ExportError(f"{'dynamo' if dynamo else 'TorchScript'} export failed: "
                                 f"{type(exc).__name__}: {first}") from exc
    inputs = feeds(name, model)
    np.savez(folder / "reference.npz", expected=reference(name, model, inputs), **inputs)
    return path


def fused_counts(model_or_ops: Any) -> dict[str, int]:
    """Fused op counts by kind (:data:`FUSED_OPS`) of an ``ir.Model`` or an op-type ``Counter``."""
    if isinstance(model_or_ops, dict):
        ops = model_or_ops
    else:
        from collections import Counter

        ops = Counter(n.op_type for n in model_or_ops.graph)
    return {kind: sum(ops.get(op, 0) for op in members) for kind, members in FUSED_OPS.items()}


@dataclass
class Measured:
    """What the compiler did with one zoo export (see :func:`measure`).

    Attributes:
        counts: fused op counts of the compiled model by kind.
        max_abs: max |ours - torch| over the non-padded positions of the padded batch.
        orig_max_abs: the same for the original export (the exporter's own error).
        scale: max |torch| over those positions.
        verified: the compiler's own verification verdict.
        explain: ``--explain`` lines of the fusions that did not fire.
        seconds: compile time.
        unexplained: Softmax nodes left unfused with no ``--explain`` line naming them.
    """

    counts: dict[str, int]
    max_abs: float
    orig_max_abs: float
    scale: float
    verified: bool | None
    explain: list[str]
    seconds: float
    unexplained: list[str] = field(default_factory=list)

    @property
    def numerics_ok(self) -> bool:
        """Within 1e-4 absolute, or 1e-6 relative to the outputs' magnitude when they are large."""
        return self.max_abs <= max(1e-4, 1e-6 * self.scale)


def measure(folder: str | os.PathLike[str], target: str = "x86", *, ort_run: Callable[..., Any] | None = None
            ) -> Measured:
    """Compile ``folder/model.onnx`` (from :func:`export_arch`) and compare it with torch.

    Args:
        folder: the export folder (``model.onnx`` and ``reference.npz``).
        target: the compile target.
        ort_run: ``(model_bytes_or_path, feeds) -> first output``; one-thread onnxruntime by default.
    """
    import time

    import ir
    from passes import compile_model

    folder = pathlib.Path(folder)
    ref = dict(np.load(folder / "reference.npz"))
    expected = ref.pop("expected")
    if ort_run is None:
        from passes.framework.numerics import session

        def ort_run(model: Any, inputs: dict[str, np.ndarray]) -> Any:
            sess = session(model)
            names = {i.name for i in sess.get_inputs()}
            return sess.run(None, {k: v for k, v in inputs.items() if k in names})[0]

    start = time.perf_counter()
    result = compile_model(str(folder / "model.onnx"), target, explain=True)
    seconds = time.perf_counter() - start
    ours = ort_run(ir.to_onnx(result.model).SerializeToString(), ref)
    orig = ort_run(str(folder / "model.onnx"), ref)
    keep = ref["attention_mask"].astype(bool) if "attention_mask" in ref else np.ones(expected.shape[:2], bool)
    diff = np.abs(ours - expected)[keep]
    odiff = np.abs(orig - expected)[keep]
    said = {d.node for d in result.report.diagnostics if d.pass_name == "fuse-attention"}
    # The original's Softmax nodes still there (a fused standard-op form makes Softmax nodes of its own).
    original = {n.name for n in ir.load(str(folder / "model.onnx")).graph if n.op_type == "Softmax"}
    unexplained = [n.name for n in result.model.graph if n.op_type == "Softmax" and n.name in original
                   and not any(n.name in node for node in said)]
    return Measured(
        counts=fused_counts(result.model), max_abs=float(diff.max()), orig_max_abs=float(odiff.max()),
        scale=float(np.abs(expected[keep]).max()), verified=result.report.verified_ok,
        explain=[str(d) for d in result.report.diagnostics], seconds=seconds, unexplained=unexplained,
    )
