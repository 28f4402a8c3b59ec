"""Lazy tensors.

A :class:`Tensor` keeps a reference to where its bytes are (a numpy array, a raw little-endian
buffer, or a region of an external data file) and only builds a numpy array when a pass asks for
one. Emitting a tensor that was never touched copies its raw bytes, never through numpy; tensors in
external files are memory-mapped on demand and streamed when saved.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import numpy as np

from ._dtypes import DataType
from ._errors import IRError

__all__ = ["Tensor", "ExternalLocation", "release_mapped_pages"]


_MAPS: dict[tuple[str, int, int], tuple[mmap.mmap, memoryview]] = {}


def _mapped(path: str) -> memoryview:
    """One read-only memory map per external file, shared by all tensors that live in it."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    entry = _MAPS.get(key)
    if entry is None:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        entry = _MAPS[key] = (mm, memoryview(mm))
    return entry[1]


def release_mapped_pages() -> int:
    """Drop the pages of external data files that this process has read from its resident set.

    A weight read through its memory map (to quantize it, say) stays resident, counted in the
    process's RSS, until the map goes, and arrays keep the map alive. The pages are clean copies of
    the file, so the kernel is told it may drop them (``MADV_DONTNEED``): the arrays stay valid and a
    later read faults the same bytes back in, from the page cache or the file. Returns the bytes of
    mapped files advised.
    """
    total = 0
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None:  # not on this platform: nothing to do
        return 0
    for mm, _ in _MAPS.values():
        if len(mm):
            mm.madvise(advice)
            total += len(mm)
    return total


class ExternalLocation:
    """Where a tensor's bytes live in an external data file."""

    __slots__ = ("path", "offset", "length")

    def __init__(self, path: str, offset: int, length: int) -> None:
        self.path = path
        self.offset = offset
        self.length = length

    def __repr__(self) -> str:
        return f"ExternalLocation({self.path!r}, offset={self.offset}, length={self.length})"


class Tensor:
    """A constant tensor whose data is loaded lazily.

    Build one from numpy with ``Tensor(array)``; lowering builds raw and external ones with
    :meth:`from_raw` and :meth:`from_external`.
    """

    __slots__ = ("dtype", "shape", "name", "doc_string", "metadata_props", "_array", "_raw", "_external")

    def __init__(
        self,
        array: np.ndarray | Any,
        *,
        dtype: DataType | None = None,
        name: str = "",
        doc_string: str = "",
    ) -> None:
        if not isinstance(array, np.ndarray):
            array = np.asarray(array)
        self.dtype = dtype if dtype is not None else DataType.from_numpy(array.dtype)
        self.shape: tuple[int, ...] = tuple(int(d) for d in array.shape)
        self.name = name
        self.doc_string = doc_string
        self.metadata_props: dict[str, str] = {}
        self._array: np.ndarray | None = array
        self._raw: bytes | memoryview | None = None
        self._external: ExternalLocation | None = None

    @classmethod
    def from_raw(
        cls, raw: bytes | memoryview, dtype: DataType, shape: tuple[int, ...], *, name: str = ""
    ) -> Tensor:
        """A tensor over ONNX ``raw_data`` bytes (little-endian; 4- and 2-bit types packed)."""
        t = cls.__new__(cls)
        t.dtype, t.shape, t.name, t.doc_string = dtype, tuple(shape), name, ""
        t.metadata_props = {}
        t._array, t._raw, t._external = None, raw, None
        expected = t._packed_nbytes()
        if len(raw) != expected:
            raise IRError(
                f"tensor {name!r}: {len(raw)} bytes of data for {dtype.name}{list(shape)}, "
                f"which needs {expected}"
            )
        return t

    @classmethod
    def from_external(
        cls, location: ExternalLocation, dtype: DataType, shape: tuple[int, ...], *, name: str = ""
    ) -> Tensor:
        """A tensor whose bytes are in an external file; nothing is read until needed."""
        t = cls.__new__(cls)
        t.dtype, t.shape, t.name, t.doc_string = dtype, tuple(shape), name, ""
        t.metadata_props = {}
        t._array, t._raw, t._external = None, None, location
        if location.length < 0:
            location.length = t._packed_nbytes()
        if not os.path.exists(location.path):
            raise IRError(f"tensor {name!r}: external data file {location.path} does not exist")
        size = os.path.getsize(location.path)
        if location.offset + location.length > size:
            raise IRError(
                f"tensor {name!r}: external data {location.path} is {size} bytes, "
                f"too short for offset {location.offset} + length {location.length}"
            )
        return t

    # -- properties -------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Size in bytes of the ONNX raw form."""
        if self.dtype == DataType.STRING:
            return sum(len(s) for s in self.numpy().ravel())
        return self._packed_nbytes()

    @property
    def external(self) -> ExternalLocation | None:
        """The external location of the tensor's bytes, if they live in a file.

        A tensor read as numpy stays backed by its file: tensors are never edited in place (passes
        replace them), so the array is a view of the same bytes and the location still holds them.
        """
        return self._external

    @property
    def is_loaded(self) -> bool:
        """True once the data exists as a numpy array."""
        return self._array is not None

    def _packed_nbytes(self) -> int:
        return (self.size * self.dtype.bitwidth + 7) // 8

    # -- data access ------------------------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """The data as a numpy array (read-only when it views a raw or mapped buffer)."""
        if self._array is None:
            self._array = self._decode(self.raw_bytes())
        return self._array

    def raw_bytes(self) -> bytes | memoryview:
        """The data in ONNX raw form, without numpy when the tensor is untouched."""
        if self._raw is not None:
            return self._raw
        if self._external is None:
            assert self._array is not None
            return self._encode(self._array)
        loc = self._external
        if loc.length == 0:
            return b""
        view = _mapped(loc.path)[loc.offset : loc.offset + loc.length]
        if len(view) != loc.length:  # the file shrank since the model was loaded
            raise IRError(
                f"tensor {self.name!r}: external data file {loc.path} is now too short "
                f"for offset {loc.offset} + length {loc.length}"
            )
        return view

    def _decode(self, raw: bytes | memoryview) -> np.ndarray:
        if self.dtype == DataType.STRING:
            raise IRError(f"tensor {self.name!r}: string tensors have no raw form")
        np_dtype = self.dtype.numpy()
        bits = self.dtype.bitwidth
        if bits < 8:
            packed = np.frombuffer(raw, dtype=np.uint8)
            per_byte = 8 // bits
            mask = (1 << bits) - 1
            parts = [(packed >> (bits * k)) & mask for k in range(per_byte)]
            unpacked = np.stack(parts, axis=-1).reshape(-1)[: self.size]
            if self.dtype.is_float:
                return unpacked.view(np_dtype).reshape(self.shape)
            vals = unpacked.astype(np.int8)
            if self.dtype in (DataType.INT4, DataType.INT2):
                half = 1 << (bits - 1)
                vals = (vals ^ half) - half
            return vals.astype(np_dtype).reshape(self.shape)
        arr = np.frombuffer(raw, dtype=np_dtype.newbyteorder("<"), count=self.size)
        return arr.reshape(self.shape)

    def _encode(self, arr: np.ndarray) -> bytes | memoryview:
        if self.dtype == DataType.STRING:
            raise IRError(f"tensor {self.name!r}: string tensors have no raw form")
        bits = self.dtype.bitwidth
        if bits < 8:
            flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8) & ((1 << bits) - 1)
            per_byte = 8 // bits
            pad = (-flat.size) % per_byte
            flat = np.concatenate([flat, np.zeros(pad, np.uint8)]).reshape(-1, per_byte)
            out = np.zeros(flat.shape[0], np.uint8)
            for k in range(per_byte):
                out |= (flat[:, k] << (bits * k)).astype(np.uint8)
            return out.tobytes()
        np_dtype = self.dtype.numpy().newbyteorder("<")
        if arr.dtype == np_dtype and arr.flags.c_contiguous and arr.dtype.kind in "biufc" and arr.size:
            # Already the raw form: a view, not a copy (tensors are never edited in place).
            return memoryview(arr.reshape(-1)).cast("B")
        return np.ascontiguousarray(arr, dtype=np_dtype).tobytes()

    def __repr__(self) -> str:
        return f"Tensor({self.dtype.short_name}{list(self.shape)}, name={self.name!r})"
