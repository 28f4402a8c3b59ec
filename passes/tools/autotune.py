"""``--autotune``: build candidate programs from one model, measure them on this host, keep the fastest accurate one.

    python -m passes.compile model.onnx --target native --autotune [--min-cosine 0.999] [--min-mean-cosine 0.999]
        [--budget-s 300]

The best program differs per CPU (VNNI or not, cache size, memory bandwidth) and per shape, so
the profile's fixed rules are a guess; here they are measured:

1. **Candidates** (:func:`candidates`), each a pipeline string from the target's capabilities
   (never its name): the target's default fp32 pipeline; the other residual form before each
   LayerNorm (``fuse-layer-norm{residual=skip|sum}``: SkipLayerNormalization vs Sum +
   LayerNormalization) where the target provides SkipLayerNormalization; the other attention
   forms where it provides contrib attention (``fuse-attention{form=mha}``: MultiHeadAttention
   after one packed QKV MatMul instead of Attention, ``{form=mha,qkv=split}``: after three
   projections, ``{form=standard}``: standard ops); int8 with dynamic
   activations (the ``quantize`` pass, its own per-op budget), the same on the split-QKV form (each
   projection int8 or float on its own: on MiniLM 26 of 36 ops int8 within the budget where the
   packed form's budget keeps 12 of 24), the same once per other weight
   encoding the target's kernels take (its policy's :attr:`~targets.QuantPolicy.variants`, e.g. u8
   8-bit weights beside s8 7-bit ones on x86 without VNNI: the quantize pass then sees the target's
   policy with the variant's changes), and where the target provides
   ``MatMulNBits`` the same with the ops that budget keeps float as 8-bit block-wise weight-only
   ``MatMulNBits`` (``quantize{fallback=nbits}``), that with static activation scales from
   calibration (``static=on``: constant-scale ``QuantizeLinear``, no per-call
   ``DynamicQuantizeLinear``), and block-wise weight-only int8 and int4 for
   every op (``quantize-weights``).
2. **Compile** each from a copy of the same IR.
3. **Accuracy** on the calibration inputs (the quantize pass's: ``--calibration``, or
   ``--tokenizer`` + ``--texts``, else generated ones), in batches of the timing batch size (so
   are the quantize pass's decisions): the worst sample's cosine to the original
   (mask-aware mean pooling for encoders, :class:`passes.quantization.sensitivity.Evaluator`), and
   their mean. A candidate below ``min_cosine`` (or with a mean below ``min_mean_cosine``) is never
   picked.
4. **Latency** of all of them in one interleaved run (the bench module's sessions: same feeds,
   ``threads`` intra-op threads, thread spinning off, round robin so drift hits every candidate
   alike), as the median.
5. The candidates within the budget whose median is within :data:`PLAYOFF_WITHIN` (1.2x) of the
   fastest one's (at most :data:`PLAYOFF_SIZE`) play off: the same rounds again over them alone,
   closer together in time, so that a drift of the host hits them alike. The fastest there (else
   the fastest within the budget) wins; the table and the reason go to the report.

Decisions are cached in ``$TFCOMPILE_CACHE_DIR/autotune`` (default ``~/.cache/tfcompile/autotune``)
under a key of the model's content, the host (machine, CPU flags, onnxruntime version), the
compiler's fingerprint (a hash of its sources) and the settings: a second compile loads the winner
without trials.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._fingerprint import compiler_fingerprint

import ir
import targets

from ..framework.base import PassContext, PassError
from ..framework.manager import PassManager
from ..framework.numerics import make_feeds, model_bytes_or_path, session
from ..framework.pipeline import format_pipeline, parse_pipeline, with_options

__all__ = ["Candidate", "Trial", "AutotuneResult", "autotune", "candidates", "cache_key", "cache_dir",
           "compiler_fingerprint", "host_cpu_flags", "model_digest"]

MS = "com.microsoft"
#: The CPU flags that decide onnxruntime's kernels (shown in reports; the cache key hashes all flags).
KEY_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimddp", "sve")
Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
#: Candidates within the budget whose median is within this factor of the fastest one's meet again
#: in a playoff: rounds over them alone, closer together in time than in the run over every
#: candidate (a drift of the host then hits them alike), whose medians decide.
PLAYOFF_WITHIN = 1.2
#: at most this many candidates (the fastest) play off
PLAYOFF_SIZE = 4


@dataclass(frozen=True)
class Candidate:
    """One program to try.

    Attributes:
        name: a short label for the table.
        pipeline: the pipeline string that builds it.
        quantized: whether it changes numerics on purpose (held to the budget; the others are too).
        variant: a quantization policy variant of the target (:class:`targets.PolicyVariant`) its
            passes see instead of the target's own policy, or None.
    """

    name: str
    pipeline: str
    quantized: bool = False
    variant: targets.PolicyVariant | None = None

    def target_for(self, target: targets.Target) -> targets.Target:
        """``target`` as this candidate's passes see it (its policy with :attr:`variant` applied)."""
        if self.variant is None:
            return target
        return dataclasses.replace(target, quantization=self.variant.apply(target.quantization))

    def spec(self) -> str:
        """The pipeline, with the policy variant's changes when there is one (the cache key, the report)."""
        if self.variant is None:
            return self.pipeline
        return self.pipeline + " [policy: " + ", ".join(f"{k}={str(v).lower()}" for k, v in self.variant.changes) + "]"


@dataclass
class Trial:
    """What one candidate measured."""

    candidate: Candidate
    nodes: int | None = None
    median_ms: float | None = None
    ratio: float | None = None
    worst: float | None = None
    mean: float | None = None
    ok: bool = False
    error: str = ""
    compile_s: float = 0.0
    times: list[float] = field(default_factory=list)
    runs_per_round: int = 1
    #: the playoff's times and median (:data:`PLAYOFF_WITHIN`), when this candidate was in it
    playoff_times: list[float] = field(default_factory=list)
    playoff_ms: float | None = None

    def row(self) -> dict[str, Any]:
        """A JSON-ready row."""
        return {"name": self.candidate.name, "pipeline": self.candidate.spec(), "nodes": self.nodes,
                "median_ms": self.median_ms, "ratio": self.ratio, "worst_cosine": self.worst,
                "mean_cosine": self.mean, "within_budget": self.ok, "error": self.error,
                "compile_s": round(self.compile_s, 3), "playoff_ms": self.playoff_ms}


@dataclass
class AutotuneResult:
    """The chosen program and the measurements behind the choice.

    Attributes:
        model: the winner, compiled.
        winner: the winner's row.
        rows: every candidate's row (:meth:`Trial.row`), in candidate order.
        reason: why the winner won, one sentence.
        key: the cache key.
        cached: the decision came from the cache (no trials ran).
        setup: host and timing settings.
        records: the winner's pass records (empty on a cache hit).
        models: every candidate that compiled, by name (``keep_models=True``; empty on a cache hit).
    """

    model: ir.Model
    winner: dict[str, Any]
    rows: list[dict[str, Any]]
    reason: str
    key: str
    cached: bool
    setup: dict[str, Any]
    records: list[Any] = field(default_factory=list)
    models: dict[str, ir.Model] = field(default_factory=dict)

    def table(self) -> str:
        """The candidates as a fixed-width table (latency ratio to the target's default fp32 program)."""
        head = (f"  {'candidate':<30} {'nodes':>6} {'median ms':>10} {'ratio':>7} {'worst cos':>10} {'mean cos':>10}  "
                f"budget  playoff ms")
        lines = [head]
        for r in self.rows:
            mark = "*" if r["name"] == self.winner["name"] else " "
            if r.get("error"):
                lines.append(f"{mark} {r['name']:<30} failed: {r['error'][:80]}")
                continue
            ms = "-" if r["median_ms"] is None else f"{r['median_ms']:.2f}"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            worst = "-" if r["worst_cosine"] is None else f"{r['worst_cosine']:.5f}"
            mean = "-" if r["mean_cosine"] is None else f"{r['mean_cosine']:.5f}"
            playoff = "" if r.get("playoff_ms") is None else f"{r['playoff_ms']:.2f}"
            budget = "ok " if r["within_budget"] else "OUT"
            lines.append(f"{mark} {r['name']:<30} {r['nodes'] if r['nodes'] is not None else '':>6} {ms:>10} "
                         f"{ratio:>7} {worst:>10} {mean:>10}  {budget}     {playoff:>10}")
        s = self.setup
        flags = ", ".join(s.get("cpu_flags", [])) or "none of " + "/".join(KEY_FLAGS)
        lines.append(f"  {'(cached decision) ' if self.cached else ''}batch {s['batch']}, seq {s['seq']}, "
                     f"{s['threads']} threads, {s['rounds']} interleaved rounds x {s['runs']} runs; "
                     f"budget worst cosine >= {s['min_cosine']}"
                     + (f", mean >= {s['min_mean_cosine']}" if s.get("min_mean_cosine") else "")
                     + f" on {s['calibration']}; CPU flags: {flags}")
        lines.append(f"  winner: {self.winner['name']}: {self.reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the cache entry and ``--report``)."""
        return {"winner": self.winner, "rows": self.rows, "reason": self.reason, "key": self.key,
                "cached": self.cached, "setup": self.setup}


# -- the key ------------------------------------------------------------------------------------


def host_cpu_flags() -> set[str]:
    """This host's CPU flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    return set(targets._host_flags())


def model_digest(model: ir.Model, path: str | os.PathLike[str] | None = None) -> str:
    """A hash of the model's content: its file (and external data beside it), else its serialized form."""
    h = hashlib.sha256()
    if path is not None and os.path.isfile(path):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        for v in model.graph.initializers.values():  # external data files are part of the content
            loc = getattr(v.const_value, "location", None)
            if isinstance(loc, str):
                h.update(loc.encode())
    else:
        src, _ = model_bytes_or_path(model)
        h.update(src if isinstance(src, bytes) else Path(src).read_bytes())
    return h.hexdigest()[:16]


def cache_key(model_hash: str, cpu_flags: set[str] | frozenset[str], fingerprint: str, settings: dict[str, Any]) -> str:
    """The decision's key: model content, host (CPU flags, machine, onnxruntime), compiler version, settings."""
    import onnxruntime as ort

    parts = {"model": model_hash, "flags": sorted(cpu_flags), "machine": platform.machine(),
             "onnxruntime": ort.__version__, "compiler": fingerprint, "settings": settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_dir() -> Path:
    """Where decisions live: ``$TFCOMPILE_CACHE_DIR/autotune``, else ``~/.cache/tfcompile/autotune``."""
    base = os.environ.get("TFCOMPILE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "tfcompile")
    return Path(base) / "autotune"


# -- candidates ---------------------------------------------------------------------------------


def _with_pass_options(pipeline: str, pass_name: str, options: dict[str, Any]) -> str | None:
    """``pipeline`` with ``options`` on its ``pass_name`` passes, or None when it has none."""
    items = parse_pipeline(pipeline)
    if not any(getattr(it, "name", "") == pass_name for it in items):
        return None
    return format_pipeline(with_options(items, pass_name, options))


#: fuse-attention's MultiHeadAttention form on three projections (also the split-QKV int8 candidate's)
SPLIT_QKV = {"form": "mha", "qkv": "split"}
#: fuse-attention's other forms (:attr:`~passes.fusions.attention.FuseAttentionPass.form`, ``qkv``):
#: (label, options, the contrib op the form needs or None)
ATTENTION_FORMS = (
    ("attention as MultiHeadAttention", {"form": "mha"}, "MultiHeadAttention"),
    ("MultiHeadAttention, split QKV", SPLIT_QKV, "MultiHeadAttention"),
    ("attention in standard ops", {"form": "standard"}, None),
)


def candidates(target: targets.Target) -> list[Candidate]:
    """The programs worth measuring on ``target``, from its capabilities (see the module docstring)."""
    base = target.pipeline
    out = [Candidate(f"fp32 (default, residual {target.residual_layer_norm})", base)]
    if target.supports("SkipLayerNormalization", MS):
        other = "skip" if target.residual_layer_norm == "sum" else "sum"
        alt = _with_pass_options(base, "fuse-layer-norm", {"residual": other})
        if alt is not None:
            out.append(Candidate(f"fp32, residual {other}", alt))
    # the other attention forms, where the target has contrib attention (else the standard form is the only one)
    split = None
    if target.supports("Attention", MS) or target.supports("MultiHeadAttention", MS):
        for label, opts, needs in ATTENTION_FORMS:
            alt = _with_pass_options(base, "fuse-attention", opts)
            if alt is not None and (needs is None or target.supports(needs, MS)):
                out.append(Candidate(f"fp32, {label}", alt))
                split = alt if opts is SPLIT_QKV else split
    if target.quantize_pipeline:
        out.append(Candidate("int8 dynamic (quantize)", f"{base},{target.quantize_pipeline}", quantized=True))
        if split is not None:  # each projection int8 or float on its own, not the layer's three together
            out.append(Candidate("int8 dynamic, MultiHeadAttention split QKV", f"{split},{target.quantize_pipeline}",
                                 quantized=True))
        for v in target.quantization.variants:
            out.append(Candidate(f"int8 dynamic ({v.name})", f"{base},{target.quantize_pipeline}", quantized=True,
                                 variant=v))
    if target.supports("MatMulNBits", MS):
        fallback = _with_pass_options(target.quantize_pipeline, "quantize", {"fallback": "nbits"})
        if fallback is not None:
            out.append(Candidate("int8 dynamic + MatMulNBits fallback", f"{base},{fallback}", quantized=True))
            static = _with_pass_options(fallback, "quantize", {"static": "on"})
            out.append(Candidate("int8 static scales + MatMulNBits fallback", f"{base},{static}", quantized=True))
        for bits in (8, 4):
            out.append(Candidate(f"weight-only int{bits} (MatMulNBits)",
                                 f"{base},quantize-weights{{bits={bits},block_size=32,accuracy_level=4}},dead-flow",
                                 quantized=True))
    return out


# -- the run ------------------------------------------------------------------------------------


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True)


def autotune(
    model: ir.Model,
    target: targets.Target,
    *,
    source: str | None = None,
    min_cosine: float = 0.999,
    min_mean_cosine: float = 0.0,
    budget_s: float = 300.0,
    options: dict[str, Any] | None = None,
    batch: int = 1,
    seq: int = 128,
    threads: int = 2,
    rounds: int = 10,
    runs: int = 5,
    max_calibration: int = 64,
    use_cache: bool = True,
    keep_models: bool = False,
    progress: Callable[[str], None] | None = None,
    show_bar: bool = False,
    candidate_list: list[Candidate] | None = None,
    runner_hook: Callable[[Candidate, Runner], Runner] | None = None,
    fingerprint: str | None = None,
    cpu_flags: set[str] | None = None,
    compiled: dict[str, Any] | None = None,
) -> AutotuneResult:
    """Measure the candidates on this host and return the fastest within the budget.

    Args:
        model: the model (not modified).
        target: the target whose capabilities give the candidates.
        source: the model's file, for the content hash and as the accuracy reference.
        min_cosine: the budget: worst calibration sample's cosine to the original.
        min_mean_cosine: a second bound beside it: the mean cosine over the calibration samples (0: none).
        budget_s: time allowed for compiling and measuring; candidates left when it runs out are
            skipped, and timing stops after 3 rounds once it is spent.
        options: the quantize pass's options (``calibration``, ``tokenizer``, ``texts``, ``exclude``...);
            also the calibration inputs of the accuracy check. ``margin`` defaults to ``cv-max`` here
            (see :class:`~passes.quantization.quantize.QuantizePass`).
        batch, seq: the timing input's shape.
        threads: onnxruntime intra-op threads while timing.
        rounds, runs: interleaved rounds, runs per candidate per round.
        use_cache: read and write the decision cache.
        keep_models: also return every compiled candidate (benchmarks).
        progress: callback for progress lines.
        show_bar: a tqdm progress bar on stderr over the trials.
        candidate_list: candidates instead of :func:`candidates` (tests).
        runner_hook: wraps each candidate's timed runner (tests: make one slower on purpose).
        fingerprint, cpu_flags: override the compiler fingerprint and host flags in the cache key (tests).
        compiled: a dict the caller keeps across calls: each candidate compiled and scored is kept in
            it, and a later call with the same model, candidate, budget, calibration and threads
            (any timing ``seq``) reuses it instead of compiling it again (benchmarks timing one model
            at several lengths). It holds every candidate's model in memory.

    Raises:
        PassError: no candidate compiled and held the budget.
    """
    from ..quantization._emit import copy_model
    from ..quantization.calibration import calibration_batches
    from ..quantization.sensitivity import Evaluator

    say = progress or (lambda msg: None)
    t_start = time.perf_counter()
    opts = dict(options or {})
    opts.setdefault("min_cosine", min_cosine)
    # The fastest of several forms that pass on calibration is the one whose calibration-to-held-out
    # gap was most underestimated (on MiniLM, 3 of 5 int8 forms missed the held-out budget with the
    # folds' mean gap): autotune's quantize passes tighten the budget by the larger fold's.
    opts.setdefault("margin", "cv-max")
    if min_mean_cosine > 0:
        opts.setdefault("min_mean_cosine", min_mean_cosine)
    # Activation scales are per call: calibrate and check accuracy at the batch being tuned for
    # (a padded batch of 8 shares each sentence's range with its padding, which batch 1 never does).
    opts.setdefault("calibration_batch", batch)
    cands = candidate_list if candidate_list is not None else candidates(target)
    flags = host_cpu_flags() if cpu_flags is None else set(cpu_flags)
    settings = {"target": target.name, "min_cosine": float(min_cosine), "min_mean_cosine": float(min_mean_cosine),
                "batch": batch, "seq": seq, "max_calibration": max_calibration,
                "threads": threads, "candidates": [c.spec() for c in cands],
                "calibration": {k: str(opts.get(k, "")) for k in ("calibration", "tokenizer", "texts", "exclude",
                                                                   "calibration_batch")},
                "options": sorted((k, str(v)) for k, v in opts.items())}
    digest, fingerprint = model_digest(model, source), fingerprint or compiler_fingerprint()
    key = cache_key(digest, flags, fingerprint, settings)
    # what a compiled candidate depends on: all of the key but the timing shape and the candidate list,
    # and the compiler's sources (in one process the code compiling is the code imported, even when
    # the files change under it)
    key_without_timing = cache_key(digest, flags, "",
                                   {k: v for k, v in settings.items() if k not in ("seq", "candidates")})
    folder = cache_dir() / key
    if use_cache and (folder / "decision.json").is_file() and (folder / "model.onnx").is_file():
        try:
            entry = json.loads((folder / "decision.json").read_text())
            tuned = ir.load(str(folder / "model.onnx"))
            say(f"autotune: cached decision {key} ({entry['winner']['name']})")
            return AutotuneResult(tuned, entry["winner"], entry["rows"], entry["reason"], key, True, entry["setup"])
        except (OSError, ValueError, KeyError, ir.IRError):
            pass  # a broken entry is measured again and rewritten

    ref_src: bytes | str = source if source is not None else model_bytes_or_path(model)[0]
    ref_sess = session(ref_src, threads, spinning=False)
    meta = ref_sess.get_inputs()
    calib = calibration_batches(model, meta, calibration=str(opts.get("calibration", "")),
                                tokenizer=str(opts.get("tokenizer", "")), texts=opts.get("texts", "") or "",
                                limit=max_calibration, batch=int(opts["calibration_batch"]))
    evaluator = Evaluator(ref_src, calib.batches, threads=threads)
    feeds = make_feeds(model, meta, batch=batch, seq=seq)

    trials = [Trial(c, runs_per_round=runs) for c in cands]
    runners: dict[int, Runner] = {}
    built: dict[int, tuple[ir.Model, list[Any]]] = {}
    bar = _progress_bar(len(cands) + 2 * rounds, "autotune", show_bar)
    try:
        for i, (c, tr) in enumerate(zip(cands, trials)):
            if i > 0 and time.perf_counter() - t_start > budget_s:
                tr.error = f"skipped: the {budget_s:.0f} s budget was spent"
                bar.update(1)
                continue
            t0 = time.perf_counter()
            memo_key = json.dumps([key_without_timing, c.spec()])
            try:
                if compiled is not None and memo_key in compiled:
                    say(f"autotune: {c.name} compiled by an earlier call")
                    trial, passes, score, tr.compile_s = compiled[memo_key]
                    src, _ = model_bytes_or_path(trial)
                else:
                    say(f"autotune: compiling {c.name}")
                    trial = copy_model(model)
                    manager = PassManager(with_options(parse_pipeline(c.pipeline), "quantize", dict(opts)), verify=True)
                    passes = manager.run(trial, PassContext(target=c.target_for(target)))
                    src, _ = model_bytes_or_path(trial)
                    score = evaluator.score(src)
                    tr.compile_s = time.perf_counter() - t0
                    if compiled is not None:
                        compiled[memo_key] = (trial, passes, score, tr.compile_s)
                run = _runner(src, threads)
                run(feeds)  # warm-up (and a model that does not run fails here, not in the timing)
                run(feeds)
            except Exception as e:  # a candidate that fails is a row that says so, never the winner
                tr.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                bar.update(1)
                continue
            tr.nodes = sum(1 for _ in trial.graph.all_nodes())
            tr.worst, tr.mean = score.worst, score.mean
            tr.ok = score.worst >= min_cosine and score.mean >= min_mean_cosine
            runners[i] = runner_hook(c, run) if runner_hook is not None else run
            built[i] = (trial, passes)
            bar.update(1)
            say(f"autotune: {c.name}: {tr.nodes} nodes, worst cosine {score.worst:.6f}, in {tr.compile_s:.1f} s")
        # one interleaved run over every candidate that compiled
        def spent() -> bool:
            return time.perf_counter() - t_start > budget_s

        done_rounds = _interleaved(runners, {i: trials[i].times for i in runners}, feeds, rounds, runs, spent, bar)
        for tr in trials:
            if tr.times:
                tr.median_ms = float(np.median(tr.times)) * 1e3
        contenders = _contenders(trials)
        if len(contenders) > 1:
            _interleaved({i: runners[i] for i in contenders}, {i: trials[i].playoff_times for i in contenders}, feeds,
                         rounds, runs, spent, bar)
            for i in contenders:
                trials[i].playoff_ms = float(np.median(trials[i].playoff_times)) * 1e3
    finally:
        bar.close()
    base = trials[0].median_ms if trials and trials[0].median_ms else None
    for tr in trials:
        if tr.median_ms is not None and base:
            tr.ratio = tr.median_ms / base
    ok = [i for i, tr in enumerate(trials) if tr.ok and tr.median_ms is not None]
    if not ok:
        why = "; ".join(f"{tr.candidate.name}: {tr.error or f'worst cosine {tr.worst:.6f}, mean {tr.mean:.6f}'}"
                        for tr in trials)
        mean = f", min_mean_cosine={min_mean_cosine}" if min_mean_cosine > 0 else ""
        raise PassError(f"autotune: no candidate holds the budget min_cosine={min_cosine}{mean}: {why}")
    played = [i for i in ok if trials[i].playoff_ms is not None]
    best = (min(played, key=lambda i: trials[i].playoff_ms) if played  # type: ignore[arg-type,return-value]
            else min(ok, key=lambda i: trials[i].median_ms))  # type: ignore[arg-type,return-value]
    reason = _reason(trials, best, min_cosine)
    winner_model, records = built[best]
    setup = {"batch": batch, "seq": seq, "threads": threads, "rounds": done_rounds, "runs": runs,
             "min_cosine": float(min_cosine), "min_mean_cosine": float(min_mean_cosine), "calibration": calib.source,
             "cpu_flags": sorted(f for f in flags if f in KEY_FLAGS), "seconds": round(time.perf_counter() - t_start, 2)}
    result = AutotuneResult(winner_model, trials[best].row(), [tr.row() for tr in trials], reason, key, False, setup,
                            records, {cands[i].name: m for i, (m, _) in built.items()} if keep_models else {})
    if use_cache:
        _store(folder, result)
    return result


def _runner(source: bytes | str, threads: int) -> Runner:
    """The bench module's timed session: ``threads`` intra-op threads, no spinning (the candidates
    take turns on the cores, and an idle spinning pool would slow the next one)."""
    sess = session(source, threads, spinning=False)
    names = [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}
    return lambda feeds: sess.run(names, {k: v for k, v in feeds.items() if k in inputs})


def _interleaved(runners: dict[int, Runner], times: dict[int, list[float]], feeds: dict[str, np.ndarray],
                 rounds: int, runs: int, spent: Callable[[], bool], bar: Any) -> int:
    """Round robin over ``runners``, ``runs`` timed runs each a round, into ``times``; returns the rounds done
    (at least 3, then no more once ``spent()``)."""
    done = 0
    for r in range(rounds):
        if r >= 3 and spent():
            break
        for i, run in runners.items():
            for _ in range(runs):
                t = time.perf_counter()
                run(feeds)
                times[i].append(time.perf_counter() - t)
        bar.update(1)
        done = r + 1
    return done if runners else 0


def _contenders(trials: list[Trial]) -> list[int]:
    """The candidates within the budget whose median is within :data:`PLAYOFF_WITHIN` of the fastest one's."""
    ok = sorted((i for i, tr in enumerate(trials) if tr.ok and tr.median_ms is not None),
                key=lambda i: trials[i].median_ms)  # type: ignore[arg-type,return-value]
    if not ok:
        return []
    fastest = trials[ok[0]].median_ms
    return [i for i in ok if trials[i].median_ms <= PLAYOFF_WITHIN * fastest][:PLAYOFF_SIZE]  # type: ignore[operator]


def _rounds_won(a: Trial, b: Trial, playoff: bool = False) -> tuple[int, int]:
    """In how many interleaved rounds ``a``'s median beat ``b``'s (a lead that holds in most rounds is not noise)."""
    ta, tb = (a.playoff_times, b.playoff_times) if playoff else (a.times, b.times)
    k = max(1, a.runs_per_round)
    n = min(len(ta), len(tb)) // k
    won = sum(np.median(ta[r * k:(r + 1) * k]) < np.median(tb[r * k:(r + 1) * k]) for r in range(n))
    return int(won), n


def _reason(trials: list[Trial], best: int, min_cosine: float) -> str:
    w = trials[best]
    others = [tr for i, tr in enumerate(trials) if i != best and tr.median_ms is not None]
    ok_others = [tr for tr in others if tr.ok]
    faster_out = [tr for tr in others if not tr.ok and tr.median_ms < w.median_ms]  # type: ignore[operator]
    ratio = "" if w.ratio is None else f", {w.ratio:.2f}x the default"
    played = [tr for tr in ok_others if tr.playoff_ms is not None]
    text, won, n = f"fastest within the budget ({w.median_ms:.2f} ms{ratio}, worst cosine {w.worst:.5f})", 0, 0
    if w.playoff_ms is not None and played:
        nxt = min(played, key=lambda tr: tr.playoff_ms)  # type: ignore[arg-type,return-value]
        behind = nxt.playoff_ms / w.playoff_ms  # type: ignore[operator]
        text = (f"fastest within the budget in a playoff of the {len(played) + 1} within {PLAYOFF_WITHIN:.1f}x of the "
                f"fastest ({w.playoff_ms:.2f} ms there, {w.median_ms:.2f} ms in the run over all{ratio}, worst cosine "
                f"{w.worst:.5f}); next: {nxt.candidate.name} at {behind:.2f}x the winner's time")
        won, n = _rounds_won(w, nxt, playoff=True)
    elif ok_others:
        nxt = min(ok_others, key=lambda tr: tr.median_ms)  # type: ignore[arg-type,return-value]
        text += f"; next within budget: {nxt.candidate.name} at {nxt.median_ms / w.median_ms:.2f}x the winner's time"  # type: ignore[operator]
        won, n = _rounds_won(w, nxt)
    if n:
        text += f", the winner faster in {won}/{n} rounds" + (" (within noise: measure again on a quieter host)"
                                                             if won < 0.75 * n else "")
    if faster_out:
        text += "; faster but outside the budget: " + ", ".join(
            f"{tr.candidate.name} (worst cosine {tr.worst:.5f}, mean {tr.mean:.5f})" for tr in faster_out)
    return text


def _store(folder: Path, result: AutotuneResult) -> None:
    """Write the decision atomically (a crash leaves no half entry)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        ir.save(result.model, str(folder / "model.onnx"))
        tmp = folder / f".decision.{os.getpid()}.json"
        tmp.write_text(json.dumps(result.to_dict(), indent=2))
        os.replace(tmp, folder / "decision.json")
    except OSError:
        pass  # an unwritable cache only costs the next compile its trials
