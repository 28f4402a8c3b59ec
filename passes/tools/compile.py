"""``python -m passes.compile``: compile an ONNX transformer for a hardware target.

    python -m passes.compile model.onnx --target x86 -o out.onnx

Loads the model into the IR, runs the target's pipeline (or ``--pipeline``), checks the result
against the original in onnxruntime, and writes it atomically. Prints a report of what changed.
Bad input gets one line on stderr and exit code 2: a malformed model (:func:`ir.validate` runs
before any pass), or one that onnxruntime cannot load or run. A result outside tolerance is not
written (exit code 1) unless ``--force``. A bug in the compiler is exit code 3, "internal error"
with the failing pass and its reproducer. Nothing is written unless the compilation succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import ir
import targets

from ._memory import PeakRSS
from ..quantization.sensitivity import release_memory
from ..framework.base import Diagnostic, PassContext, PassError
from ..framework.manager import PassManager, PassRecord
from ..framework.pipeline import Fixpoint, Pipeline, parse_pipeline, with_options
from ..framework.numerics import (
    Comparison, compare_outputs, describe_ort_error, make_feeds, model_bytes_or_path, session,
)

__all__ = ["compile_model", "CompileResult", "CompileReport", "InternalError", "PeakRSS", "tqdm_bars", "main"]


class InternalError(Exception):
    """A bug in the compiler, not in the model: a pass crashed or left a model that does not run.

    Attributes:
        pass_name: the pass that failed, or ``""`` when no single pass is to blame.
        reproducer: path of the reproducer (the IR before the failing pass), or ``""``.
    """

    def __init__(self, message: str, *, pass_name: str = "", reproducer: str = "") -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.reproducer = reproducer


def _user_error(e: BaseException | None) -> bool:
    """Whether a pass stopped for a reason the user can act on (a bad option, a missing file)."""
    return isinstance(e, (PassError, OSError, targets.TargetError))


def _internal(e: PassError) -> InternalError:
    """The InternalError for a pass that crashed (``e`` from the PassManager, the crash its cause)."""
    cause = e.__cause__
    if isinstance(cause, ir.VerificationError):
        what = f"left an invalid IR: {cause}"
    elif cause is not None:
        what = f"{type(cause).__name__}: {cause}"
    else:
        what = str(e)
    if not e.pass_name:
        return InternalError(what)
    return InternalError(what, pass_name=e.pass_name, reproducer=e.reproducer)


def known_domains(target: targets.Target, extra: tuple[str, ...] | list[str] = ()) -> set[str]:
    """Op domains besides ONNX's own that ``target``'s runtime provides, plus ``extra``."""
    known = set(extra)
    if target.runtime == "onnxruntime" or target.has_contrib_ops:
        known.add("com.microsoft")
    return known


#: Passes whose result rows are per-op quantization decisions (shown in the report).
_QUANTIZE_PASSES = ("quantize", "quantize-weights")

@dataclass
class CompileReport:
    """What a compilation did: op counts, passes, fusions, verification."""

    source: str
    target: str
    pipeline: str
    ops_before: Counter[str] = field(default_factory=Counter)
    ops_after: Counter[str] = field(default_factory=Counter)
    passes: list[PassRecord] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)
    verification: Comparison | None = None
    verified_ok: bool | None = None
    verify_setup: str = ""
    diagnostics: list[Diagnostic] = field(default_factory=list)
    #: Per-op quantization decisions (the ``rows`` of the quantize and quantize-weights passes).
    quantization: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    #: ``--autotune``: the candidates measured and the winner (:class:`passes.tools.autotune.AutotuneResult`).
    autotune: Any = None
    #: Peak resident memory (bytes) so far at the end of each phase (``load``, ``passes``, ``verify``;
    #: see :class:`PeakRSS`): the first phase at the maximum set it.
    peak_rss: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for ``--report``)."""
        v = self.verification
        return {
            "source": self.source,
            "target": self.target,
            "pipeline": self.pipeline,
            "seconds": round(self.seconds, 4),
            "phases": {k: round(v, 4) for k, v in self.phases.items()},
            "ops_before": dict(sorted(self.ops_before.items())),
            "ops_after": dict(sorted(self.ops_after.items())),
            "nodes_before": sum(self.ops_before.values()),
            "nodes_after": sum(self.ops_after.values()),
            "passes": [
                {"pass": r.spec, "seconds": round(r.seconds, 4), "modified": r.modified, "stats": r.stats}
                for r in self.passes
            ],
            "stats": dict(self.stats),
            "verification": None if v is None else {
                "ok": self.verified_ok, "max_abs": v.max_abs, "cosine": v.cosine, "setup": self.verify_setup,
                "outputs": [{"name": n, "max_abs": a, "cosine": c} for n, a, c in v.details],
            },
            "diagnostics": [str(d) for d in self.diagnostics],
            "quantization": self.quantization,
            "autotune": None if self.autotune is None else self.autotune.to_dict(),
            "peak_rss_mb": {k: round(v / 2**20, 1) for k, v in self.peak_rss.items()},
        }

    def memory_line(self) -> str:
        """``quantize: peak RSS 2.10 GB, during passes (after load 0.61 GB, ...)`` (GB = 2^30 bytes), or ""."""
        if not self.peak_rss:
            return ""
        quant = sorted({r.spec.split("{")[0] for r in self.passes if r.spec.split("{")[0] in _QUANTIZE_PASSES})
        label = f"{'/'.join(quant)}: " if quant else ""
        top = max(self.peak_rss.values())
        during = next(k for k, v in self.peak_rss.items() if v == top)
        phases = ", ".join(f"{k} {v / 2**30:.2f} GB" for k, v in self.peak_rss.items())
        return f"{label}peak RSS {top / 2**30:.2f} GB, during {during} (peak after each phase: {phases})"

    def format(self, *, timing: bool = False) -> str:
        """The human-readable report; ``timing`` adds the time of each phase (load, passes, verify)."""
        lines = [f"compiled {self.source} for {self.target} in {self.seconds:.2f} s"]
        if timing and self.phases:
            lines.append("  " + ", ".join(f"{k} {v:.2f} s" for k, v in self.phases.items()))
        lines += ["", f"{'pass':<44} {'time':>9}  changed  notes"]
        for r in self.passes:
            t = f"{r.seconds * 1000:8.1f}ms"
            notes = ", ".join(f"{k} {v}" for k, v in sorted(r.stats.items()))
            lines.append(f"{r.spec[:44]:<44} {t:>9}  {'yes' if r.modified else 'no':<7}  {notes}")
        lines.append("")
        ops = sorted(set(self.ops_before) | set(self.ops_after), key=lambda o: (-self.ops_after[o], o))
        lines.append(f"{'op type':<40} {'before':>7} {'after':>7}")
        for op in ops:
            b, a = self.ops_before[op], self.ops_after[op]
            if a != b:
                lines.append(f"{op:<40} {b:>7} {a:>7}")
        unchanged = [op for op in ops if self.ops_before[op] == self.ops_after[op]]
        if unchanged:
            lines.append(f"{'(unchanged: ' + str(len(unchanged)) + ' op types)':<40}")
        lines.append(f"{'nodes':<40} {sum(self.ops_before.values()):>7} {sum(self.ops_after.values()):>7}")
        if self.verification is not None:
            verdict = "OK" if self.verified_ok else "OUT OF TOLERANCE"
            lines += ["", f"verify ({self.verify_setup}): {self.verification} -> {verdict}"]
        elif self.verify_setup:
            lines += ["", f"verify: {self.verify_setup}"]
        if self.quantization:
            # quantize gives "error" ("local error" with ranking=local); quantize-weights "error int4"/"error int8"
            # (the first is its bits; "local error int4"...)
            key = "local error" if any(k.startswith("local error") for q in self.quantization for k in q) else "error"
            header = "local error" if key != "error" else "error alone"
            lines += ["", f"{'quantize: op':<72} {'decision':<10} {header:>11}"]
            for q in self.quantization:
                e = q.get(key, next((v for k, v in q.items() if k.startswith(key + " ")), None))
                err = "-" if e is None else f"{e:.2e}"
                lines.append(f"  {q['name'][:70]:<70} {q['decision']:<10} {err:>11}")
        if self.autotune is not None:
            lines += ["", "autotune:", self.autotune.table()]
        if self.peak_rss:
            lines += ["", self.memory_line()]
        if self.diagnostics:
            lines += ["", "notes:"] + [f"  {d}" for d in self.diagnostics]
        return "\n".join(lines)


@dataclass
class CompileResult:
    """The compiled model and the report."""

    model: ir.Model
    report: CompileReport


def tqdm_bars(*, total: int, desc: str) -> Any:
    """The command line's progress bars: autotune's tqdm helper, on stderr."""
    from .autotune import _progress_bar

    return _progress_bar(total, desc, True)


def op_counts(model: ir.Model) -> Counter[str]:
    """Node counts by op type (``domain::op`` for non-ONNX domains), subgraphs included."""
    c: Counter[str] = Counter()
    for n in model.graph.all_nodes():
        c[f"{n.domain}::{n.op_type}" if n.domain else n.op_type] += 1
    return c


def default_pipeline(target: targets.Target, quantize: str | None) -> str:
    """The target's pipeline, with its quantization passes appended when ``quantize`` is set."""
    if quantize:
        return f"{target.pipeline},{target.quantize_pipeline}"
    return target.pipeline


def compile_model(
    model_or_path: ir.Model | str | os.PathLike[str],
    target: str | targets.Target = "x86",
    pipeline: str | None = None,
    verify: bool = True,
    *,
    quantize: str | None = None,
    static_shapes: dict[str, int] | None = None,
    explain: bool = False,
    options: dict[str, Any] | None = None,
    progress: Any = None,
    progress_bar: Any = None,
    check_modified: bool = False,
    print_ir_after_change: bool = False,
    verify_batch: int = 2,
    verify_seq: int = 16,
    allow_domains: tuple[str, ...] | list[str] = (),
    autotune: bool = False,
    autotune_options: dict[str, Any] | None = None,
) -> CompileResult:
    """Compile a model for a target.

    Args:
        model_or_path: an :class:`ir.Model` (compiled in place) or a path to an ONNX file.
        target: target name (``x86``, ``x86-avx2``, ``arm64``, ``onnx``, ``native``) or object.
        pipeline: a pipeline string overriding the target's default.
        verify: run the original and the compiled model in onnxruntime and compare.
        quantize: ``"int8"`` to append the target's quantization passes.
        static_shapes: bindings of symbolic dims, e.g. ``{"batch": 1, "seq": 128}``.
        explain: collect near misses (why a fusion did not fire) into the report.
        options: options of the quantize pass by field name (``min_cosine``, ``calibration``,
            ``tokenizer``, ``texts``, ``exclude``...), set on every ``quantize`` in the pipeline.
        progress: callback taking a message, for long work.
        progress_bar: factory of progress bars for long passes (:data:`passes.framework.base.BarFactory`,
            e.g. :func:`tqdm_bars`); ``None``: no bars.
        allow_domains: custom op domains to accept although the target does not provide them
            (its runtime has them from a custom op library).
        autotune: measure candidate programs on this host and keep the fastest within the budget
            (``options["min_cosine"]``, default 0.999) instead of running one pipeline
            (:mod:`passes.tools.autotune`; ``pipeline`` and ``quantize`` are then not used).
        autotune_options: keyword arguments of :func:`passes.tools.autotune.autotune`
            (``budget_s``, ``batch``, ``seq``, ``threads``, ``use_cache``, ``show_bar``...).

    Returns:
        The compiled model and a :class:`CompileReport`.

    Raises:
        ir.InvalidModelError: the model is malformed (:func:`ir.validate`), or onnxruntime cannot
            load or run the original model.
        ir.IRError: the model is unsupported.
        PassError: a bad pipeline or option, or a pass refused the model with a reason.
        targets.TargetError: an unknown target.
        InternalError: a bug in the compiler: a pass crashed (with its reproducer), or the
            compiled model does not run in onnxruntime while the original does.
    """
    start = time.perf_counter()
    memory = PeakRSS()
    tgt = target if isinstance(target, targets.Target) else targets.get(target)
    if quantize not in (None, "int8"):
        raise PassError(f"--quantize supports int8 only, not {quantize!r}")
    if autotune and pipeline:
        raise PassError("--autotune chooses the pipeline among its candidates; drop --pipeline")
    spec = pipeline or default_pipeline(tgt, quantize)
    items = with_options(parse_pipeline(spec), "quantize", dict(options or {}))
    manager = PassManager(items, verify=True, check_modified=check_modified, print_ir_after_change=print_ir_after_change)

    if isinstance(model_or_path, ir.Model):
        model, source_name, original = model_or_path, model_or_path.graph.name or "model", None
    else:
        source_name = os.fspath(model_or_path)
        if progress:
            size = os.path.getsize(source_name) if os.path.exists(source_name) else 0
            progress(f"loading {source_name} ({size / 1e6:.1f} MB)")
        model = ir.load(source_name)
        original = source_name
    phases: dict[str, float] = {"load": time.perf_counter() - start}
    ir.validate(model, known_domains=known_domains(tgt, allow_domains), max_opset=tgt.max_opset, target=tgt.name)
    phases["validate"] = time.perf_counter() - start - phases["load"]

    report = CompileReport(source_name, tgt.name, manager.spec, ops_before=op_counts(model), phases=phases)
    ref_session = feeds = None
    if verify:
        if original is None:
            original, _ = model_bytes_or_path(model)
        if progress:
            progress("running the original model in onnxruntime")
        try:
            ref_session = session(original, optimize=False)
        except Exception as e:  # onnxruntime raises its own classes, none a subclass of a common one
            raise ir.InvalidModelError(f"the original model does not load in onnxruntime: {describe_ort_error(e)}") from None
        feeds = make_feeds(model, ref_session.get_inputs(), batch=verify_batch, seq=verify_seq, bindings=static_shapes)
        names = [o.name for o in ref_session.get_outputs()]
        try:
            ref = ref_session.run(None, feeds)
        except Exception as e:
            shape = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
            raise ir.InvalidModelError(
                f"the original model does not run in onnxruntime (inputs {shape}): {describe_ort_error(e)}"
            ) from None
        # Its outputs are all verification needs: the session (the whole float model) goes before the passes run.
        ref_session = None
        release_memory()

    ctx = PassContext(target=tgt, static_shapes=dict(static_shapes or {}), explain=explain, progress=progress,
                      progress_bar=progress_bar)
    memory.end("load")
    t0 = time.perf_counter()
    try:
        if autotune:
            from .autotune import autotune as _autotune

            tuned = _autotune(model, tgt, source=source_name if original == source_name else None,
                              min_cosine=float((options or {}).get("min_cosine", 0.999)),
                              min_mean_cosine=float((options or {}).get("min_mean_cosine", 0.0)), options=options,
                              progress=progress, **(autotune_options or {}))
            model, report.passes, report.autotune = tuned.model, list(tuned.records), tuned
            report.pipeline = tuned.winner["pipeline"]
        else:
            report.passes = manager.run(model, ctx)
    except PassError as e:
        if _user_error(e.__cause__):
            raise
        raise _internal(e) from e
    phases["passes"] = time.perf_counter() - t0
    memory.end("passes")
    for r in report.passes:
        report.stats.update(r.stats)
    report.ops_after = op_counts(model)
    report.diagnostics = list(ctx.diagnostics)
    report.quantization = [row for r in report.passes if r.spec.split("{")[0] in _QUANTIZE_PASSES for row in r.rows]

    if verify and feeds is not None:
        if progress:
            progress("verifying the compiled model against the original in onnxruntime")
        compiled, _ = model_bytes_or_path(model)
        try:
            got = session(compiled, optimize=False).run(names, feeds)
        except Exception as e:  # the original ran on these inputs: the compiler broke the model
            raise InternalError(
                f"the compiled model does not run in onnxruntime, although the original does: {describe_ort_error(e)}"
            ) from None
        cmp = compare_outputs(names, ref, got)
        report.verification = cmp
        shape = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
        report.verify_setup = f"onnxruntime, inputs {shape}"
        # a pipeline that quantizes (--quantize, or in --pipeline) is held to its budget, not fp32's
        quantizing = [p for p in _passes(manager.pipeline) if p.name in ("quantize", "quantize-weights")]
        if report.autotune is not None:
            report.verified_ok = cmp.cosine >= report.autotune.setup["min_cosine"] - 1e-3
        elif quantizing:
            min_cos = float(min((p.min_cosine for p in quantizing if p.min_cosine > 0), default=0.999))
            report.verified_ok = cmp.cosine >= min_cos - 1e-3
        else:
            report.verified_ok = cmp.ok(atol=1e-4, rtol=1e-4, min_cosine=0.99999)
        phases["verify"] = time.perf_counter() - t0 - phases["passes"]
        memory.end("verify")
    elif not verify:
        report.verify_setup = "skipped (--no-verify)"
    report.peak_rss = dict(memory.phases)
    report.seconds = time.perf_counter() - start
    return CompileResult(model, report)


def _parse_bindings(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise PassError(f"--static-shapes expects name=value pairs, got {part!r}")
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = int(v)
        except ValueError:
            raise PassError(f"--static-shapes: {k.strip()!r} must be an integer, got {v!r}") from None
    return out


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m passes.compile",
        description="Compile an ONNX transformer model for a hardware target.",
    )
    p.add_argument("model", nargs="?", help="input .onnx file")
    p.add_argument("--target", default="x86", help="target profile (see --list-targets); default x86")
    p.add_argument("-o", "--output", help="output path (default: <model>.<target>.onnx beside the input)")
    p.add_argument("--pipeline", help="pipeline string overriding the target's default")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--force", action="store_true", help="write the output even when verification fails")
    p.add_argument("--print-ir-after-change", action="store_true", help="print the IR after each pass that changed it")
    p.add_argument("--timing", action="store_true", help="show per-pass times in the report")
    p.add_argument("--report", help="also write the report as JSON to this file")
    p.add_argument("--static-shapes", default="", help="bind symbolic dims, e.g. batch=1,seq=128")
    p.add_argument("--explain", action="store_true", help="report why fusions did not fire")
    p.add_argument("--quantize", choices=["int8"], help="quantize under the accuracy budget")
    p.add_argument("--min-cosine", type=float, help="accuracy budget for --quantize (cosine to fp32 outputs)")
    p.add_argument("--min-mean-cosine", type=float,
                   help="a second budget beside --min-cosine: the mean calibration cosine (default: none)")
    p.add_argument("--calibration", help=".npz of model inputs for calibration")
    p.add_argument("--tokenizer", help="tokenizer folder for --texts calibration")
    p.add_argument("--texts", help="text file, one sample per line, for calibration")
    p.add_argument("--exclude", default="", help="node names or op types never to quantize (comma separated)")
    p.add_argument("--autotune", action="store_true",
                   help="measure candidate programs (fusion forms, int8, weight-only int8/int4) on this host and "
                        "keep the fastest within --min-cosine (cached per model, host and compiler)")
    p.add_argument("--budget-s", type=float, default=300.0, help="time allowed for --autotune trials (default 300)")
    p.add_argument("--tune-seq", type=int, default=128, help="sequence length of the --autotune timing input")
    p.add_argument("--tune-batch", type=int, default=1, help="batch size of the --autotune timing input")
    p.add_argument("--external-data", action="store_true", help="write tensors to a data file beside the model")
    p.add_argument("--allow-domain", action="append", default=[], metavar="DOMAIN",
                   help="accept ops of a custom domain the target does not provide (its runtime loads them "
                        "from a custom op library); repeatable")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--list-targets", action="store_true", help="list targets with their pipelines and exit")
    p.add_argument("--list-passes", action="store_true", help="list registered passes and exit")
    p.add_argument("--load", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="import a Python file or module that registers passes or rules first (repeatable)")
    return p


def _list_targets() -> str:
    lines = []
    for name, t in targets.all_targets().items():
        alias = f" (aliases: {', '.join(t.aliases)})" if t.aliases else ""
        lines.append(f"{name}{alias}\n  {t.description}\n  pipeline: {t.pipeline}\n  quantize: {t.quantize_pipeline}"
                     f" ({t.quantization.format}, per_channel={t.quantization.per_channel},"
                     f" reduce_range={t.quantization.reduce_range})")
    lines.append(f"native -> {targets.native_name()} on this machine")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The command line. Returns the exit code.

    0: compiled and written; 1: outside tolerance (not written unless ``--force``); 2: bad input
    (a malformed model, one onnxruntime cannot run, bad options), one line on stderr; 3: an
    internal error (a bug: the line names the pass and its reproducer).
    """
    args = _build_parser().parse_args(argv)
    try:
        return _main(args)
    except Exception as e:  # a bug outside any pass: one line, the traceback kept in a file
        print(f"internal error: {_one_line(f'{type(e).__name__}: {e}')}; traceback: {_save_traceback(e)}",
              file=sys.stderr)
        return 3


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _save_traceback(e: BaseException) -> str:
    fd, path = tempfile.mkstemp(prefix="tfcompile-internal-error-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("".join(traceback.format_exception(e)))
    return path


def _load_plugins(items: list[str]) -> None:
    """Import each ``--load`` item (a ``.py`` file or a module name): its ``register_*`` calls run."""
    import importlib
    import importlib.util

    for item in items:
        try:
            if item.endswith(".py"):
                spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(item))[0], item)
                if spec is None or spec.loader is None or not os.path.isfile(item):
                    raise FileNotFoundError(f"no such file {item!r}")
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            else:
                importlib.import_module(item)
        except Exception as e:
            raise PassError(f"--load {item}: {type(e).__name__}: {_one_line(str(e))}") from None


def _main(args: argparse.Namespace) -> int:
    try:
        _load_plugins(args.load)
    except PassError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list_targets:
        print(_list_targets())
        return 0
    if args.list_passes:
        from ..framework.registry import registered_passes

        for name, cls in registered_passes().items():
            print(f"{name:<20} {cls.summary or (cls.__doc__ or '').strip().splitlines()[0]}")
        return 0
    if not args.model:
        print("error: no model given (python -m passes.compile model.onnx --target x86)", file=sys.stderr)
        return 2

    # Bars only on a terminal: redirected stderr (logs, CI, tests) gets the progress lines alone.
    bars = not args.quiet and sys.stderr.isatty()

    def progress(msg: str) -> None:
        if args.quiet:
            return
        if bars:
            from tqdm import tqdm

            tqdm.write(f"compile: {msg}", file=sys.stderr)  # above any open bar, not through it
        else:
            print(f"compile: {msg}", file=sys.stderr, flush=True)

    try:
        tgt = targets.get(args.target)
        out = args.output or _default_output(args.model, tgt.name if args.target == "native" else args.target)
        options: dict[str, Any] = {}
        if args.min_cosine is not None:
            options["min_cosine"] = args.min_cosine
        if args.min_mean_cosine is not None:
            options["min_mean_cosine"] = args.min_mean_cosine
        for key in ("calibration", "tokenizer", "texts"):
            if getattr(args, key):
                options[key] = getattr(args, key)
        if args.exclude:
            options["exclude"] = [x.strip() for x in args.exclude.split(",") if x.strip()]
        result = compile_model(
            args.model, tgt, args.pipeline, verify=not args.no_verify, quantize=args.quantize,
            static_shapes=_parse_bindings(args.static_shapes), explain=args.explain, options=options,
            progress=progress, progress_bar=tqdm_bars if bars else None,
            print_ir_after_change=args.print_ir_after_change, allow_domains=args.allow_domain,
            autotune=args.autotune,
            autotune_options={"budget_s": args.budget_s, "seq": args.tune_seq, "batch": args.tune_batch,
                              "show_bar": bars},
        )
    except InternalError as e:
        where = f" in pass {e.pass_name}" if e.pass_name else ""
        repro = f"; reproducer: {e.reproducer}" if e.reproducer else ""
        print(f"internal error{where}: {_one_line(str(e))}{repro}", file=sys.stderr)
        return 3
    except (ir.IRError, PassError, targets.TargetError, OSError) as e:
        hint = f" (--allow-domain {e.domain} if its runtime provides it)" if isinstance(e, ir.UnknownDomainError) else ""
        print(f"error: {_one_line(str(e))}{hint}", file=sys.stderr)
        return 2
    report = result.report
    print(report.format(timing=args.timing))
    if args.report:
        try:
            with open(args.report, "w") as f:
                json.dump(report.to_dict(), f, indent=2)
        except OSError as e:
            print(f"error: cannot write the report {args.report}: {e}", file=sys.stderr)
            return 2
    if report.verified_ok is False and not args.force:
        print(f"error: the compiled model is outside tolerance ({report.verification}); not written "
              "(use --force to write it anyway)", file=sys.stderr)
        return 1
    try:
        ir.save(result.model, out, external_data=True if args.external_data else None)
    except (ir.IRError, OSError) as e:
        print(f"error: cannot write {out}: {_one_line(str(e))}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _passes(items: Pipeline) -> list[Any]:
    """Every pass of a pipeline, fixpoints flattened."""
    out: list[Any] = []
    for it in items:
        out.extend(_passes(list(it.items)) if isinstance(it, Fixpoint) else [it])
    return out


def _default_output(model_path: str, target_name: str) -> str:
    root, ext = os.path.splitext(model_path)
    return f"{root}.{target_name}{ext or '.onnx'}"


if __name__ == "__main__":
    sys.exit(main())
