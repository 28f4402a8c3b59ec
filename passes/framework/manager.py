"""The pass manager: runs a pipeline with verification, timing, IR printing and crash reproducers."""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, TextIO

import ir


from .base import Pass, PassContext, PassError, PassResult
from .pipeline import Fixpoint, Pipeline, PipelineItem, format_pipeline, parse_pipeline

__all__ = ["PassManager", "PassRecord"]



@dataclass
class PassRecord:
    """One run of one pass: its pipeline spec, time, and what it did."""

    spec: str
    seconds: float
    modified: bool
    stats: dict[str, int] = field(default_factory=dict)
    #: The pass's report table (:attr:`PassResult.rows`).
    rows: list[dict[str, Any]] = field(default_factory=list)


class PassManager:
    """Runs a pipeline over a model.

    Args:
        pipeline: a pipeline string or parsed pipeline.
        verify: run :func:`ir.verify` after every pass.
        check_modified: compare the printed IR before and after each pass with the pass's
            ``modified`` flag and fail on a mismatch (on in tests).
        print_ir_after_change: print the IR after each pass that changed it.
        reproducer_dir: where to write a reproducer when a pass crashes (default: a temp dir).
        out: stream for printed IR.
    """

    def __init__(
        self,
        pipeline: str | Pipeline,
        *,
        verify: bool = True,
        check_modified: bool = False,
        print_ir_after_change: bool = False,
        reproducer_dir: str | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.pipeline: Pipeline = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
        self.verify = verify
        self.check_modified = check_modified
        self.print_ir_after_change = print_ir_after_change
        self.reproducer_dir = reproducer_dir
        self.out = out or sys.stderr
        self.records: list[PassRecord] = []
        # The snapshot taken before the last pass, while that pass left the model unchanged: the
        # model it shows is still the model, so the next pass reuses it instead of emitting again.
        self._unchanged: tuple[ir.Model, ir.Snapshot | None] | None = None
        self._verified: ir.Model | None = None  # the model, when verified as it is now

    @property
    def spec(self) -> str:
        """The pipeline as a string."""
        return format_pipeline(self.pipeline)

    def run(self, model: ir.Model, ctx: PassContext | None = None) -> list[PassRecord]:
        """Run the pipeline over ``model`` in place and return one record per pass run.

        Raises:
            PassError: a pass failed, or left the IR invalid; the message names the pass, the
                passes that already ran, and the reproducer file.
        """
        ctx = ctx or PassContext()
        self.records = []
        self._unchanged = self._verified = None
        self._run_items(self.pipeline, model, ctx)
        return self.records

    def _run_items(self, items: Pipeline | tuple[PipelineItem, ...], model: ir.Model, ctx: PassContext) -> bool:
        modified = False
        for item in items:
            if isinstance(item, Fixpoint):
                for i in range(item.max_iterations):
                    if not self._run_items(item.items, model, ctx):
                        break
                    modified = True
                else:
                    ctx.note("pass-manager", "fixpoint", f"still changing after {item.max_iterations} iterations")
            else:
                modified |= self._run_pass(item, model, ctx)
        return modified

    def _run_pass(self, p: Pass, model: ir.Model, ctx: PassContext) -> bool:
        snapshot = self._snapshot(model)
        verified, self._verified = self._verified is model, None
        self._unchanged = None
        before = ir.print_model(model) if self.check_modified else None
        ctx.report_progress(f"running {p.spec()}")
        start = time.perf_counter()
        try:
            result = p.run(model, ctx)
            if not isinstance(result, PassResult):
                raise PassError(f"pass {p.name!r} returned {type(result).__name__}, not a PassResult")
            if self.verify and (result.modified or not verified):
                ir.verify(model)  # a model no pass changed since it was verified is not verified again
        except Exception as e:  # a crash, or an invalid IR left behind
            raise self._failure(p, e, snapshot) from e
        seconds = time.perf_counter() - start
        if before is not None:
            changed = ir.print_model(model) != before
            if changed != result.modified:
                raise PassError(
                    f"pass {p.name!r} reported modified={result.modified} but the IR "
                    f"{'changed' if changed else 'did not change'}"
                )
        self.records.append(PassRecord(p.spec(), seconds, result.modified, dict(result.stats), list(result.rows)))
        if not result.modified:
            self._unchanged = (model, snapshot)
        if self.verify:
            self._verified = model
        if self.print_ir_after_change and result.modified:
            print(f"// ----- IR after {p.spec()} -----", file=self.out)
            print(ir.print_model(model), file=self.out)
        return result.modified

    def _snapshot(self, model: ir.Model) -> ir.Snapshot | None:
        """The model before a pass, for a reproducer should it fail (the last one while unchanged)."""
        if self._unchanged is not None and self._unchanged[0] is model:
            return self._unchanged[1]
        try:
            return ir.Snapshot(model)
        except Exception:  # an unemittable model is reported by the pass that made it so
            return None

    def _failure(self, p: Pass, e: Exception, snapshot: ir.Snapshot | None) -> PassError:
        ran = ", ".join(r.spec for r in self.records) or "none"
        where = path = ""
        if snapshot is not None:
            folder = self.reproducer_dir or tempfile.mkdtemp(prefix="passes-repro-")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"reproducer-{p.name}.onnx")
            snapshot.save(path)
            with open(path + ".pipeline", "w") as f:
                f.write(format_pipeline([p]) + "\n")
            with open(path + ".traceback", "w") as f:
                f.write("".join(traceback.format_exception(e)))
            where = f"; reproducer: {path} (run: python -m passes.compile {path} --pipeline '{p.spec()}')"
        kind = "left an invalid IR" if isinstance(e, ir.VerificationError) else "failed"
        return PassError(f"pass {p.name!r} {kind}: {e}; passes already run: {ran}{where}", pass_name=p.name,
                         reproducer=path)
