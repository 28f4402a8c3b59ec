"""Models and model-local functions, and their opset imports.

Opset imports are keyed by domain with the IR's one spelling of the default domain: ``""``. An
:class:`OpsetImports` mapping stores ``"ai.onnx"`` as ``""`` on every write and read, so
``model.opset_imports[""]`` is the standard opset whatever the source model wrote.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._attr import Attr
from ._graph import Graph
from ._node import normalize_domain

__all__ = ["Function", "Model", "OpsetImports"]


class OpsetImports(dict):  # type: ignore[type-arg]
    """``{domain: version}`` where ``"ai.onnx"`` and ``""`` are one key, stored as ``""``."""

    def __init__(self, items: Mapping[str, int] | Iterable[tuple[str, int]] = (), **kw: int) -> None:
        super().__init__()
        self.update(items, **kw)

    def __setitem__(self, domain: str, version: int) -> None:
        super().__setitem__(normalize_domain(domain), version)

    def __getitem__(self, domain: str) -> int:
        return super().__getitem__(normalize_domain(domain))

    def __delitem__(self, domain: str) -> None:
        super().__delitem__(normalize_domain(domain))

    def __contains__(self, domain: object) -> bool:
        return super().__contains__(normalize_domain(domain) if isinstance(domain, str) else domain)

    def get(self, domain: str, default: Any = None) -> Any:  # type: ignore[override]
        """The version imported for ``domain``, or ``default``."""
        return super().get(normalize_domain(domain), default)

    def pop(self, domain: str, *default: Any) -> Any:  # type: ignore[override]
        """Remove ``domain`` and return its version (or ``default``)."""
        return super().pop(normalize_domain(domain), *default)

    def setdefault(self, domain: str, version: int) -> int:  # type: ignore[override]
        """The version of ``domain``, importing ``version`` first when absent."""
        return super().setdefault(normalize_domain(domain), version)

    def update(self, items: Any = (), **kw: int) -> None:  # type: ignore[override]
        """Import every ``(domain, version)`` of ``items`` and ``kw``."""
        pairs = items.items() if isinstance(items, Mapping) else items
        for domain, version in pairs:
            self[domain] = version
        for domain, version in kw.items():
            self[domain] = version

    def __ior__(self, items: Any) -> OpsetImports:  # type: ignore[override,misc]
        self.update(items)
        return self


class Function:
    """A model-local function: a graph body plus domain, name, attribute names and opset imports."""

    __slots__ = (
        "_domain", "name", "overload", "graph", "attributes", "attribute_defaults",
        "_opset_imports", "doc_string", "metadata_props",
    )

    def __init__(
        self,
        domain: str,
        name: str,
        graph: Graph,
        *,
        attributes: Sequence[str] = (),
        attribute_defaults: Sequence[Attr] = (),
        opset_imports: dict[str, int] | None = None,
        overload: str = "",
        doc_string: str = "",
    ) -> None:
        self.domain = domain
        self.name = name
        self.overload = overload
        self.graph = graph
        self.attributes = list(attributes)
        self.attribute_defaults = list(attribute_defaults)
        self.opset_imports = opset_imports or {}
        self.doc_string = doc_string
        self.metadata_props: dict[str, str] = {}

    @property
    def domain(self) -> str:
        """The domain call sites name (``"ai.onnx"`` is stored as ``""``, as for nodes)."""
        return self._domain

    @domain.setter
    def domain(self, value: str) -> None:
        self._domain = normalize_domain(value)

    @property
    def opset_imports(self) -> OpsetImports:
        """The body's ``{domain: version}`` imports (``""`` is the default domain)."""
        return self._opset_imports

    @opset_imports.setter
    def opset_imports(self, value: Mapping[str, int]) -> None:
        self._opset_imports = OpsetImports(value)

    def __repr__(self) -> str:
        return f"Function({self.domain}::{self.name})"


class Model:
    """A model: its main graph, opset imports, metadata and local functions."""

    __slots__ = (
        "graph", "ir_version", "_opset_imports", "producer_name", "producer_version", "domain",
        "model_version", "doc_string", "metadata_props", "functions", "extra",
    )

    def __init__(
        self,
        graph: Graph,
        *,
        ir_version: int = 10,
        opset_imports: dict[str, int] | None = None,
        producer_name: str = "",
        producer_version: str = "",
        domain: str = "",
        model_version: int = 0,
        doc_string: str = "",
        functions: Sequence[Function] = (),
    ) -> None:
        self.graph = graph
        self.ir_version = ir_version
        self.opset_imports = opset_imports if opset_imports is not None else {"": 17}
        self.producer_name = producer_name
        self.producer_version = producer_version
        self.domain = domain
        self.model_version = model_version
        self.doc_string = doc_string
        self.metadata_props: dict[str, str] = {}
        self.functions: list[Function] = list(functions)
        #: Opaque fields carried through unchanged (e.g. training info).
        self.extra: dict[str, Any] = {}

    @property
    def opset_imports(self) -> OpsetImports:
        """The model's ``{domain: version}`` imports (``""`` is the default domain)."""
        return self._opset_imports

    @opset_imports.setter
    def opset_imports(self, value: Mapping[str, int]) -> None:
        self._opset_imports = OpsetImports(value)

    def opset(self, domain: str = "") -> int | None:
        """The imported opset version of ``domain`` (``"ai.onnx"`` and ``""`` are the same)."""
        return self._opset_imports.get(domain)

    def __str__(self) -> str:
        from ._printer import print_model

        return print_model(self)

    def __repr__(self) -> str:
        return f"Model({self.graph.name!r}, opsets={self.opset_imports})"
