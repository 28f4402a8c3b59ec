"""Tokens of the IR's text form, and the token cursor the parser is built on.

:func:`tokenize` turns text into :class:`Token`\\ s (identifiers, ``%names``, strings, numbers,
punctuation); :class:`TokenStream` walks them with one-token lookahead and reports errors as
``line:column: message`` (:class:`ParseError`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from ._errors import IRError

__all__ = ["ParseError", "Token", "TokenStream", "tokenize"]


class ParseError(IRError):
    """The text is not in the IR's text form; the message starts with ``line:column``."""


# -- tokens ----------------------------------------------------------------------------------
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]*")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/:]*")
_NUMBER = re.compile(r"-?(?:\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+|inf(?![A-Za-z0-9_]))")
_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_PUNCT = ("->", "::", "(", ")", "[", "]", "<", ">", "{", "}", ",", "=", ";", "@", ":", "?")


class Token:
    """One token: ``kind``, its ``value`` and its offset ``pos`` in the text."""

    __slots__ = ("kind", "value", "pos")

    def __init__(self, kind: str, value: Any, pos: int) -> None:
        self.kind = kind  # "ident", "name" (%x), "str", "int", "float", "punct", "eof"
        self.value = value
        self.pos = pos

    def __repr__(self) -> str:
        if self.kind == "eof":
            return "end of input"
        if self.kind == "name":
            return f"%{self.value}"
        if self.kind == "str":
            return json.dumps(self.value)
        return repr(str(self.value))


def tokenize(text: str, err: Any) -> list[Token]:
    """The tokens of ``text``, ending with an ``eof`` token; ``err(pos, msg)`` builds the error raised."""
    toks: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
            continue
        if c == "%":
            if i + 1 < n and text[i + 1] == '"':
                m = _STRING.match(text, i + 1)
                if not m:
                    raise err(i + 1, "unterminated quoted name")
                toks.append(Token("name", json.loads(m.group()), i))
                i = m.end()
                continue
            m = _NAME.match(text, i + 1)
            if not m:
                raise err(i, "expected a value name after '%'")
            # A bare name never ends with ':' (the printer quotes those), so trailing colons
            # belong to what follows, as in "%x: float32".
            name = m.group().rstrip(":")
            toks.append(Token("name", name, i))
            i += 1 + len(name)
            continue
        if c == '"':
            m = _STRING.match(text, i)
            if not m:
                raise err(i, "unterminated string")
            try:
                toks.append(Token("str", json.loads(m.group()), i))
            except json.JSONDecodeError as e:
                raise err(i, f"bad string literal ({e.msg})") from None
            i = m.end()
            continue
        if c.isdigit() or (c == "-" and i + 1 < n and (text[i + 1].isdigit() or text.startswith("inf", i + 1))):
            m = _NUMBER.match(text, i)
            if m:
                s = m.group()
                is_float = any(ch in s for ch in ".eEi")
                toks.append(Token("float" if is_float else "int", float(s) if is_float else int(s), i))
                i = m.end()
                continue
        m = _IDENT.match(text, i)
        if m:
            toks.append(Token("ident", m.group(), i))
            i = m.end()
            continue
        for p in _PUNCT:
            if text.startswith(p, i):
                toks.append(Token("punct", p, i))
                i += len(p)
                break
        else:
            raise err(i, f"unexpected character {c!r}")
    toks.append(Token("eof", None, n))
    return toks


class TokenStream:
    """A cursor over the tokens of ``text`` with the helpers a recursive-descent parser needs."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = tokenize(text, self.error_at)
        self.k = 0

    # -- errors and token helpers -----------------------------------------------------------
    def error_at(self, pos: int, msg: str) -> ParseError:
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return ParseError(f"{line}:{col}: {msg}")

    def error(self, msg: str, tok: Token | None = None) -> ParseError:
        tok = tok or self.peek()
        return self.error_at(tok.pos, msg)

    def peek(self, ahead: int = 0) -> Token:
        return self.toks[min(self.k + ahead, len(self.toks) - 1)]

    def next(self) -> Token:
        t = self.toks[self.k]
        if t.kind != "eof":
            self.k += 1
        return t

    def at(self, kind: str, value: Any = None, ahead: int = 0) -> bool:
        t = self.peek(ahead)
        return t.kind == kind and (value is None or t.value == value)

    def accept(self, kind: str, value: Any = None) -> Token | None:
        if self.at(kind, value):
            return self.next()
        return None

    def expect(self, kind: str, value: Any = None, what: str = "") -> Token:
        if self.at(kind, value):
            return self.next()
        want = what or (repr(value) if value is not None else kind)
        raise self.error(f"expected {want}, found {self.peek()!r}")

    def punct(self, p: str) -> Token:
        return self.expect("punct", p)

    def keyword(self, word: str) -> Token:
        return self.expect("ident", word, what=f"'{word}'")

    def string(self) -> str:
        return self.expect("str", what="a quoted string").value

    def integer(self) -> int:
        return self.expect("int", what="an integer").value

    def ident_or_string(self, what: str) -> str:
        t = self.next()
        if t.kind in ("ident", "str"):
            return t.value
        raise self.error(f"expected {what}, found {t!r}", t)

    def comma_list(self, close: str, item: Any) -> list[Any]:
        items: list[Any] = []
        if self.accept("punct", close):
            return items
        while True:
            items.append(item())
            if self.accept("punct", close):
                return items
            self.punct(",")
