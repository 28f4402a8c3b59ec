"""What a pass is: a frozen dataclass with a kebab-case ``name`` and ``run(model, ctx)``."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import ir

if TYPE_CHECKING:
    from targets import Target

__all__ = ["Pass", "PassResult", "PassContext", "PassError", "Diagnostic", "ProgressBar", "BarFactory"]


class PassError(Exception):
    """An error a user can act on: a bad pipeline, an unknown pass or option, a pass that failed.

    Attributes:
        pass_name: the pass that failed, when the pass manager raised this for a pass.
        reproducer: the reproducer file the pass manager wrote for it ("" when none).
    """

    def __init__(self, message: str, *, pass_name: str = "", reproducer: str = "") -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.reproducer = reproducer


@dataclass
class PassResult:
    """What one run of a pass did.

    Attributes:
        modified: whether the model changed (recorded by the :class:`~passes.Rewriter`, not claimed).
        stats: counters for the report, e.g. ``{"fused Attention": 6}``.
        rows: a table for the report, one dict per decision (the quantize pass's per-op choices).
    """

    modified: bool
    stats: Counter[str] = field(default_factory=Counter)
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Diagnostic:
    """A note for the user, e.g. why a fusion did not fire at a node."""

    pass_name: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.pass_name}: at {self.node}: {self.message}"


class ProgressBar(Protocol):
    """What a pass may do with a progress bar (tqdm's names: a tqdm bar is one)."""

    def update(self, n: int = 1) -> Any:
        """Advance by ``n`` steps."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> Any:
        """Show ``s`` after the bar (e.g. the current score)."""

    def close(self) -> Any:
        """Remove the bar."""


#: ``factory(total=..., desc=...)`` -> a :class:`ProgressBar` (e.g. a tqdm on stderr).
BarFactory = Callable[..., ProgressBar]


class _NullBar:
    """The bar when none is shown: every call does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar:
    """A context-managed :class:`ProgressBar` that closes its bar on exit, errors included."""

    __slots__ = ("_bar",)

    def __init__(self, bar: ProgressBar) -> None:
        self._bar = bar

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._bar.set_postfix_str(s, refresh=refresh)

    def close(self) -> None:
        self._bar.close()


@dataclass
class PassContext:
    """What passes may read besides the model: the target, user options, and a place for notes.

    Attributes:
        target: the hardware target profile (passes read its capabilities, never its name).
        static_shapes: symbolic dimension bindings, e.g. ``{"batch": 1, "seq": 128}``.
        explain: collect near-miss diagnostics (why a fusion did not fire).
        diagnostics: notes collected by passes.
        progress: optional callback ``progress(message)`` for long work.
        progress_bar: optional factory ``progress_bar(total=..., desc=...)`` of progress bars
            (:data:`BarFactory`; the command line sets a tqdm on stderr when it is a terminal);
            passes ask for one with :meth:`bar`, never import tqdm themselves.

    A pass's own settings (a budget, calibration files) are its typed dataclass fields, set in the
    pipeline string or with :func:`passes.framework.pipeline.with_options`; what it decided comes
    back in its :class:`PassResult`. The context holds only what every pass may read.
    """

    target: Target | None = None
    static_shapes: dict[str, int] = field(default_factory=dict)
    explain: bool = False
    diagnostics: list[Diagnostic] = field(default_factory=list)
    progress: Any = None
    progress_bar: BarFactory | None = None

    def note(self, pass_name: str, node: ir.Node | str, message: str) -> None:
        """Record a diagnostic about ``node``."""
        label = node.label() if isinstance(node, ir.Node) else node
        self.diagnostics.append(Diagnostic(pass_name, label, message))

    def report_progress(self, message: str) -> None:
        """Tell the user about long work, when a progress callback is set."""
        if self.progress is not None:
            self.progress(message)

    def bar(self, total: int, desc: str) -> _Bar:
        """A progress bar over ``total`` steps of long work, for a ``with`` block.

        Without a :attr:`progress_bar` factory (tests, no terminal, ``--quiet``) it does nothing::

            with ctx.bar(len(ops), "quantize: ops alone") as bar:
                for op in ops:
                    measure(op)
                    bar.update()
        """
        if self.progress_bar is None:
            return _Bar(_NullBar())
        return _Bar(self.progress_bar(total=total, desc=desc))


@dataclass(frozen=True)
class Pass:
    """Base class of passes: subclass as a frozen dataclass, set ``name``, implement :meth:`run`.

    Options are the dataclass fields; pipeline strings set them by name
    (``quantize{per_channel=true}``). A pass keeps no state between runs.

    Example::

        @register_pass
        @dataclass(frozen=True)
        class DropIdentityPass(Pass):
            name: ClassVar[str] = "drop-identity"

            def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
                rw = Rewriter()
                for node in model.graph:
                    if node.op_type == "Identity" and not node.outputs[0].is_graph_output():
                        rw.replace_all_uses_with(node.outputs[0], node.inputs[0])
                        rw.erase(node)
                return rw.result()
    """

    name: ClassVar[str] = ""
    #: One line shown by ``--list-passes``.
    summary: ClassVar[str] = ""

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        """Rewrite ``model`` in place and say whether it changed."""
        raise NotImplementedError

    def spec(self) -> str:
        """This pass as a pipeline element, with the options that differ from the defaults."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            if value != default:
                parts.append(f"{f.name}={_format_option(value)}")
        return self.name + ("{" + ",".join(parts) + "}" if parts else "")


def _format_option(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ":".join(str(v) for v in value)
    return str(value)
