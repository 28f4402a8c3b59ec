"""Parse the text form printed by :mod:`ir._printer` back into IR objects.

The parser is the printer's inverse: for every model ``m``,
``print_model(parse_model(print_model(m, full_tensors=True)), full_tensors=True)`` is the text it
started from. Tensors the printer elided to a ``sha256:`` digest cannot be read back; print with
``full_tensors=True`` to get text that parses.

Example::

    text = ir.print_model(model, full_tensors=True)
    again = ir.parse_model(text)
    assert ir.structurally_equal(model, again)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._core import Attr, AttrType, Function, Graph, Model, Node, Value
from ._dtypes import DataType
from ._errors import IRError
from ._lexer import ParseError, Token, TokenStream
from ._tensor import Tensor
from ._types import (
    MapType, OpaqueType, OptionalType, SequenceType, SparseTensorType, TensorType, Type,
)

__all__ = ["ParseError", "parse_model", "parse_graph"]


# -- parser ----------------------------------------------------------------------------------
class _Scope:
    """Names visible in one graph, plus forward references waiting for a definition."""

    def __init__(self, outer: _Scope | None) -> None:
        self.outer = outer
        self.values: dict[str, Value] = {}


class _Parser(TokenStream):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        # Forward references of the graph tree being parsed: name -> (placeholder, first use).
        self.forward: dict[str, tuple[Value, int]] = {}

    # -- model ------------------------------------------------------------------------------
    def model(self) -> Model:
        self.keyword("model")
        self.keyword("ir_version")
        ir_version = self.integer()
        self.keyword("producer")
        producer_name, producer_version = self.string(), self.string()
        self.keyword("domain")
        domain = self.string()
        self.keyword("version")
        model_version = self.integer()
        doc = ""
        if self.accept("ident", "doc"):
            doc = self.string()
        opsets: dict[str, int] = {}
        while self.accept("ident", "opset"):
            key = self.string()
            opsets[key] = self.integer()
        meta: dict[str, str] = {}
        while self.accept("ident", "meta"):
            key = self.string()
            meta[key] = self.string()
        functions = []
        while self.at("ident", "function"):
            functions.append(self.function())
        graph = self.root_graph()
        m = Model(
            graph, ir_version=ir_version, opset_imports=opsets, producer_name=producer_name,
            producer_version=producer_version, domain=domain, model_version=model_version,
            doc_string=doc, functions=functions,
        )
        m.metadata_props = meta
        self.expect("eof", what="end of input")
        return m

    def function(self) -> Function:
        self.keyword("function")
        domain, name = self.string(), self.string()
        overload = ""
        if self.accept("ident", "overload"):
            overload = self.string()
        opsets: dict[str, int] = {}
        while self.accept("ident", "opset"):
            key = self.string()
            opsets[key] = self.integer()
        attrs: list[str] = []
        if self.accept("ident", "attrs"):
            self.punct("[")
            attrs = self.comma_list("]", self.string)
        defaults: list[Attr] = []
        if self.accept("ident", "defaults"):
            self.punct("<")
            defaults = self.comma_list(">", lambda: self.attribute(None))
        doc = ""
        if self.accept("ident", "doc"):
            doc = self.string()
        graph = self.root_graph()
        return Function(
            domain, name, graph, attributes=attrs, attribute_defaults=defaults,
            opset_imports=opsets, overload=overload, doc_string=doc,
        )

    def root_graph(self) -> Graph:
        saved, self.forward = self.forward, {}
        g = self.graph(None)
        if self.forward:
            name, (_, pos) = next(iter(self.forward.items()))
            raise self.error_at(pos, f"value %{name} is read but never defined")
        self.forward = saved
        return g

    # -- graphs -----------------------------------------------------------------------------
    def graph(self, outer: _Scope | None) -> Graph:
        self.keyword("graph")
        g = Graph(name=self.string())
        scope = _Scope(outer)
        self.punct("(")
        for tok, name, typ in self.comma_list(")", self.decl):
            v = self.define(scope, name, tok)
            v.type = typ
            g.add_input(v)
        self.punct("->")
        self.punct("(")
        outputs = self.comma_list(")", self.decl)
        self.punct("{")
        if self.at("ident", "doc") and self.at("str", ahead=1):
            self.next()
            g.doc_string = self.string()
        while self.at("ident", "meta") and self.at("str", ahead=1):
            self.next()
            key = self.string()
            g.metadata_props[key] = self.string()
        while self.at("ident", "init") and self.at("name", ahead=1):
            self.initializer(g, scope)
        while not self.accept("punct", "}"):
            if self.at("eof"):
                raise self.error("unexpected end of input inside a graph (missing '}')")
            g.append(self.node(scope))
        for tok, name, typ in outputs:
            v = self.lookup(scope, name, tok)
            if v.type is None:  # an outer value returned by a subgraph keeps its own type
                v.type = typ
            g.outputs.append(v)
        return g

    def decl(self) -> tuple[Token, str, Type | None]:
        tok = self.expect("name", what="a value like %x")
        self.punct(":")
        return tok, tok.value, self.type()

    def define(self, scope: _Scope, name: str, tok: Token) -> Value:
        if name in scope.values:
            raise self.error(f"value %{name} is defined twice", tok)
        pending = self.forward.pop(name, None)
        v = pending[0] if pending is not None else Value(name)
        scope.values[name] = v
        return v

    def lookup(self, scope: _Scope, name: str, tok: Token) -> Value:
        s: _Scope | None = scope
        while s is not None:
            v = s.values.get(name)
            if v is not None:
                return v
            s = s.outer
        pending = self.forward.get(name)
        if pending is None:
            # Read before its definition (the graph was printed out of order): a placeholder
            # becomes the definition when it appears.
            pending = self.forward[name] = (Value(name), tok.pos)
        return pending[0]

    def initializer(self, g: Graph, scope: _Scope) -> None:
        self.keyword("init")
        tok, name, typ = self.decl()
        self.punct("=")
        tensor = self.tensor()
        existing = scope.values.get(name)
        if existing is not None and existing.is_graph_input():
            # An input with a default value: one value, both an input and an initializer.
            existing.const_value = tensor
            g.initializers[name] = existing
            return
        v = self.define(scope, name, tok)
        v.const_value = tensor
        g.add_initializer(v)
        v.type = typ

    def node(self, scope: _Scope) -> Node:
        start = self.peek()
        outputs: list[Value | None] = []
        out_types: list[Type | None] = []
        if self.at("name") or (self.at("ident", "_") and self.peek(1).kind == "punct" and self.peek(1).value in ",="):
            while True:
                if self.accept("ident", "_"):
                    outputs.append(None)
                    out_types.append(None)
                else:
                    tok = self.expect("name", what="an output like %y or _")
                    typ = None
                    if self.accept("punct", ":"):
                        typ = self.type()
                    v = self.define(scope, tok.value, tok)
                    outputs.append(v)
                    out_types.append(typ)
                if not self.accept("punct", ","):
                    break
            self.punct("=")
        domain = ""
        op = self.ident_or_string("an operator name")
        if self.accept("punct", "::"):
            domain, op = op, self.ident_or_string("an operator name")
        overload = ""
        if self.accept("punct", ":"):
            overload = self.string()
        attrs: list[Attr] = []
        if self.accept("punct", "<"):
            attrs = self.comma_list(">", lambda: self.attribute(scope))
        self.punct("(")

        def input_() -> Value | None:
            if self.accept("ident", "_"):
                return None
            tok = self.expect("name", what="an input like %x or _")
            return self.lookup(scope, tok.value, tok)

        inputs = self.comma_list(")", input_)
        for v, typ in zip(outputs, out_types):
            if v is not None:
                v.type = typ
        try:
            node = Node(op, inputs, attrs, domain=domain, outputs=outputs, overload=overload)
        except IRError as e:
            raise self.error(str(e), start) from None
        while True:
            if self.at("ident", "name") and self.at("str", ahead=1):
                self.next()
                node.name = self.string()
            elif self.at("ident", "doc") and self.at("str", ahead=1):
                self.next()
                node.doc_string = self.string()
            elif self.at("ident", "meta") and self.at("str", ahead=1) and self.at("str", ahead=2):
                self.next()
                key = self.string()
                node.metadata_props[key] = self.string()
            else:
                return node

    # -- attributes -------------------------------------------------------------------------
    def attribute(self, scope: _Scope | None) -> Attr:
        tok = self.next()
        if tok.kind == "ident":
            name = tok.value
        elif tok.kind == "str":
            name = tok.value
        else:
            raise self.error(f"expected an attribute name, found {tok!r}", tok)
        # Attribute names may hold ":" like value names; the tokenizer splits them at ':'.
        while self.at("punct", ":") or self.at("punct", "::"):
            sep = self.next().value
            name += sep + self.ident_or_string("the rest of an attribute name")
        self.punct("=")
        if self.accept("punct", "@"):
            ref = self.ref_name()
            kind = AttrType.UNDEFINED
            if self.accept("punct", "("):
                word = self.expect("ident", what="an attribute kind").value
                try:
                    kind = AttrType[word.upper()]
                except KeyError:
                    raise self.error(f"unknown attribute kind {word!r}") from None
                self.punct(")")
            return Attr(name, kind, None, ref_attr_name=ref)
        kind, value = self.attr_value(scope)
        return Attr(name, kind, value)

    def ref_name(self) -> str:
        t = self.next()
        if t.kind not in ("ident", "str"):
            raise self.error(f"expected an attribute name after '@', found {t!r}", t)
        name = t.value
        if t.kind == "ident":
            while (self.at("punct", ":") or self.at("punct", "::")) and self.at("ident", ahead=1):
                name += self.next().value + self.next().value
        return name

    def attr_value(self, scope: _Scope | None) -> tuple[AttrType, Any]:
        t = self.peek()
        if t.kind == "int":
            return AttrType.INT, self.next().value
        if t.kind == "float":
            return AttrType.FLOAT, self.next().value
        if t.kind == "str":
            return AttrType.STRING, self.next().value
        if t.kind != "ident":
            raise self.error(f"expected an attribute value, found {t!r}")
        word = t.value
        if word in ("nan", "inf"):
            self.next()
            return AttrType.FLOAT, float(word)
        if word == "graph":
            if scope is None:
                raise self.error("a graph attribute cannot appear here")
            return AttrType.GRAPH, self.graph(scope)
        self.next()
        if word == "ints":
            self.punct("[")
            return AttrType.INTS, self.comma_list("]", self.integer)
        if word == "floats":
            self.punct("[")
            return AttrType.FLOATS, self.comma_list("]", self.float_)
        if word == "strings":
            self.punct("[")
            return AttrType.STRINGS, self.comma_list("]", self.string)
        if word == "tensor":
            return AttrType.TENSOR, self.tensor()
        if word == "tensors":
            self.punct("[")
            return AttrType.TENSORS, self.comma_list("]", self.tensor)
        if word == "graphs":
            if scope is None:
                raise self.error("a graph attribute cannot appear here")
            self.punct("[")
            return AttrType.GRAPHS, self.comma_list("]", lambda: self.graph(scope))
        if word == "type":
            return AttrType.TYPE_PROTO, self.type()
        if word == "types":
            self.punct("[")
            return AttrType.TYPE_PROTOS, self.comma_list("]", self.type)
        if word == "sparse":
            return AttrType.SPARSE_TENSOR, self.sparse()
        if word == "sparses":
            self.punct("[")
            return AttrType.SPARSE_TENSORS, self.comma_list("]", self.sparse)
        if word == "undefined":
            return AttrType.UNDEFINED, None
        raise self.error(f"unknown attribute value {word!r}", t)

    def float_(self) -> float:
        t = self.next()
        if t.kind in ("float", "int"):
            return float(t.value)
        if t.kind == "ident" and t.value in ("nan", "inf"):
            return float(t.value)
        raise self.error(f"expected a number, found {t!r}", t)

    def sparse(self) -> tuple[Tensor, Tensor, list[int]]:
        self.punct("{")
        values = self.tensor()
        self.punct(";")
        indices = self.tensor()
        self.punct(";")
        self.keyword("ints")
        self.punct("[")
        dims = self.comma_list("]", self.integer)
        self.punct("}")
        return values, indices, dims

    # -- types and tensors ------------------------------------------------------------------
    def dtype(self) -> DataType:
        t = self.expect("ident", what="an element type like float32")
        try:
            return DataType.from_short_name(t.value)
        except IRError:
            raise self.error(f"unknown element type {t.value!r}", t) from None

    def shape(self) -> tuple[int | str | None, ...] | None:
        if not self.accept("punct", "["):
            return None

        def dim() -> int | str | None:
            t = self.next()
            if t.kind == "int":
                return t.value
            if t.kind in ("ident", "str"):
                return t.value
            if t.kind == "punct" and t.value == "?":
                return None
            raise self.error(f"expected a dimension, found {t!r}", t)

        return tuple(self.comma_list("]", dim))

    def type(self) -> Type | None:
        if self.accept("punct", "?"):
            return None
        t = self.peek()
        if t.kind == "ident" and t.value in ("sparse", "seq", "optional", "map", "opaque") and self.at("punct", "<", 1):
            self.next()
            self.punct("<")
            result: Type
            if t.value == "sparse":
                dt = self.dtype()
                result = SparseTensorType(dt, self.shape())
            elif t.value == "seq":
                result = SequenceType(self.type())
            elif t.value == "optional":
                result = OptionalType(self.type())
            elif t.value == "map":
                key = self.dtype()
                self.punct(",")
                result = MapType(key, self.type())
            else:
                domain = self.string()
                self.punct(",")
                result = OpaqueType(domain, self.string())
            self.punct(">")
            return result
        dt = self.dtype()
        return TensorType(dt, self.shape())

    def tensor(self) -> Tensor:
        head = self.peek()
        dtype = self.dtype()
        self.punct("[")
        shape = tuple(self.comma_list("]", self.integer))
        if self.at("ident", "sha256"):
            raise self.error(
                "tensor data was elided to a sha256 digest and cannot be parsed back; "
                "print the model with full_tensors=True"
            )
        self.punct("[")
        items = self.comma_list("]", lambda: self.scalar(dtype))
        size = 1
        for d in shape:
            size *= d
        if len(items) != size:
            raise self.error(f"tensor {dtype.short_name}{list(shape)} needs {size} values, got {len(items)}", head)
        try:
            arr = _array(items, dtype, shape)
        except (IRError, ValueError, TypeError, OverflowError) as e:
            raise self.error(f"cannot build a {dtype.short_name} tensor from these values ({e})", head) from None
        return Tensor(arr, dtype=dtype)

    def scalar(self, dtype: DataType) -> Any:
        if dtype.is_float and dtype not in (DataType.COMPLEX64, DataType.COMPLEX128):
            return self.float_()
        t = self.next()
        if dtype == DataType.STRING:
            if t.kind != "str":
                raise self.error(f"expected a quoted string, found {t!r}", t)
            return t.value
        if dtype == DataType.BOOL:
            if t.kind == "ident" and t.value in ("true", "false"):
                return t.value == "true"
            raise self.error(f"expected true or false, found {t!r}", t)
        if dtype in (DataType.COMPLEX64, DataType.COMPLEX128):
            if not (t.kind == "punct" and t.value == "("):
                raise self.error(f"expected a complex number like (1.0,2.0), found {t!r}", t)
            re_ = self.float_()
            self.punct(",")
            im = self.float_()
            self.punct(")")
            return complex(re_, im)
        if t.kind != "int":
            raise self.error(f"expected an integer, found {t!r}", t)
        return t.value


def _array(items: list[Any], dtype: DataType, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == DataType.STRING:
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    np_dtype = dtype.numpy()
    if dtype.is_float:
        # Through float64 so every printed value (repr of the element as a double) is exact.
        return np.array(items, dtype=np.float64).astype(np_dtype).reshape(shape)
    if dtype in (DataType.COMPLEX64, DataType.COMPLEX128, DataType.BOOL):
        return np.array(items, dtype=np_dtype).reshape(shape)
    wide = np.array(items, dtype=np.uint64 if dtype == DataType.UINT64 else np.int64)
    return wide.astype(np_dtype).reshape(shape)


def parse_model(text: str) -> Model:
    """Parse the text form of a model (as printed by :func:`ir.print_model`).

    Args:
        text: the printed model; print it with ``full_tensors=True`` so every tensor's data is
            in the text.

    Returns:
        A new model whose printed form equals ``text`` (up to whitespace).

    Raises:
        ParseError: the text is malformed; the message starts with ``line:column``.
        IRError: a tensor was printed as a digest and its data is not in the text.
    """
    return _Parser(text).model()


def parse_graph(text: str) -> Graph:
    """Parse the text form of one graph (as printed by :func:`ir.print_graph`).

    Every value the graph reads must be defined in the text: a subgraph printed on its own
    that reads outer-scope values does not parse.

    Raises:
        ParseError: the text is malformed; the message starts with ``line:column``.
        IRError: a tensor was printed as a digest and its data is not in the text.
    """
    p = _Parser(text)
    g = p.root_graph()
    p.expect("eof", what="end of input")
    return g
