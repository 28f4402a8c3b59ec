"""Pipeline strings, parsed in one place.

Grammar::

    pipeline := element ("," element)*
    element  := NAME options? | "fixpoint" options? "(" pipeline ")"
    options  := "{" [KEY "=" VALUE ("," KEY "=" VALUE)*] "}"

``fixpoint(simplify,fold-constants)`` repeats its passes until none changes the model (with an
iteration cap, ``fixpoint{max=8}(...)``). Option values are converted to the type of the pass's
dataclass field: ``true``/``false`` for booleans, numbers, strings, ``a:b:c`` for tuples.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, Union

from .base import Pass, PassError
from .registry import get_pass_class

__all__ = ["Fixpoint", "Pipeline", "parse_pipeline", "format_pipeline", "with_options"]


@dataclass(frozen=True)
class Fixpoint:
    """Run ``items`` repeatedly until an iteration changes nothing (at most ``max_iterations``)."""

    items: tuple[PipelineItem, ...]
    max_iterations: int = 8


PipelineItem = Union[Pass, Fixpoint]
Pipeline = list[PipelineItem]

_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_\-]*)|(?P<punct>[,{}()=]))")


def parse_pipeline(text: str) -> Pipeline:
    """Parse a pipeline string into pass instances.

    Raises:
        PassError: naming the position and the problem (unknown pass, unknown option, bad value).
    """
    p = _Parser(text)
    items = p.pipeline()
    p.skip_ws()
    if p.pos != len(text):
        p.fail("expected ',' or the end of the pipeline")
    return items


def format_pipeline(items: Pipeline) -> str:
    """The canonical string of a parsed pipeline (parses back to an equal pipeline)."""
    out = []
    for it in items:
        if isinstance(it, Fixpoint):
            opt = "" if it.max_iterations == 8 else f"{{max={it.max_iterations}}}"
            out.append(f"fixpoint{opt}({format_pipeline(list(it.items))})")
        else:
            out.append(it.spec())
    return ",".join(out)


def with_options(items: Pipeline, pass_name: str, options: dict[str, Any]) -> Pipeline:
    """``items`` with ``options`` set on every pass named ``pass_name`` (inside fixpoints too).

    The options are that pass's typed dataclass fields; strings are converted as in a pipeline
    string, other values are taken as given.

    Raises:
        PassError: the pass has no such option, or a value does not convert.
    """
    out: Pipeline = []
    for it in items:
        if isinstance(it, Fixpoint):
            out.append(dataclasses.replace(it, items=tuple(with_options(list(it.items), pass_name, options))))
        elif it.name == pass_name and options:
            fields = {f.name for f in dataclasses.fields(it)}
            hints = typing.get_type_hints(type(it))
            kwargs: dict[str, Any] = {}
            for key, value in options.items():
                if key not in fields:
                    raise PassError(f"pass {pass_name!r} has no option {key!r} (options: {', '.join(sorted(fields))})")
                if isinstance(value, list):
                    value = tuple(value)
                try:
                    kwargs[key] = _convert(value, hints.get(key, str)) if isinstance(value, str) else value
                except (TypeError, ValueError) as e:
                    raise PassError(f"option {key!r} of pass {pass_name!r}: {e}") from None
            out.append(dataclasses.replace(it, **kwargs))
        else:
            out.append(it)
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, message: str) -> typing.NoReturn:
        raise PassError(f"bad pipeline {self.text!r} at column {self.pos + 1}: {message}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            self.fail(f"expected {ch!r}")
        self.pos += 1

    def name(self) -> str:
        self.skip_ws()
        m = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*").match(self.text, self.pos)
        if not m:
            self.fail("expected a pass name")
        self.pos = m.end()
        return m.group(0)

    def pipeline(self) -> Pipeline:
        items = [self.element()]
        while self.peek() == ",":
            self.pos += 1
            items.append(self.element())
        return items

    def element(self) -> PipelineItem:
        start = self.pos
        name = self.name()
        opts = self.options() if self.peek() == "{" else {}
        if name == "fixpoint":
            unknown = set(opts) - {"max"}
            if unknown:
                self.fail(f"fixpoint takes only 'max', not {sorted(unknown)}")
            self.expect("(")
            inner = self.pipeline()
            self.expect(")")
            try:
                limit = int(opts.get("max", 8))
            except ValueError:
                self.fail(f"fixpoint max must be an integer, got {opts['max']!r}")
            return Fixpoint(tuple(inner), limit)
        try:
            cls = get_pass_class(name)
        except PassError as e:
            self.pos = start
            self.fail(str(e))
        return _instantiate(cls, opts, self)

    def options(self) -> dict[str, str]:
        self.expect("{")
        opts: dict[str, str] = {}
        if self.peek() == "}":
            self.pos += 1
            return opts
        while True:
            key = self.name()
            self.expect("=")
            self.skip_ws()
            m = re.compile(r"[^,{}()=]*").match(self.text, self.pos)
            assert m is not None
            self.pos = m.end()
            if key in opts:
                self.fail(f"option {key!r} is given twice")
            opts[key] = m.group(0).strip()
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("}")
            return opts


def _instantiate(cls: type[Pass], opts: dict[str, str], p: _Parser) -> Pass:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, raw in opts.items():
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            p.fail(f"pass {cls.name!r} has no option {key!r} (options: {known})")
        try:
            kwargs[key] = _convert(raw, hints.get(key, str))
        except (TypeError, ValueError) as e:
            p.fail(f"option {key!r} of pass {cls.name!r}: {e}")
    return cls(**kwargs)


def _convert(raw: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw.lower() in ("none", "") and len(args) < len(typing.get_args(tp)):
            return None
        last: Exception | None = None
        for a in args:
            try:
                return _convert(raw, a)
            except (TypeError, ValueError) as e:
                last = e
        raise ValueError(str(last))
    if tp is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {raw!r}")
    if tp is int:
        return int(raw)
    if tp is float:
        return float(raw)
    if origin is tuple:
        args = typing.get_args(tp)
        elem = args[0] if args else str
        parts = [x for x in raw.split(":") if x]
        return tuple(_convert(x, elem) for x in parts)
    if tp is str:
        return raw
    raise TypeError(f"unsupported option type {tp}")
