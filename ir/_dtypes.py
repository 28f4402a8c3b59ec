"""Element types, numbered exactly as ONNX numbers them (``TensorProto.DataType``)."""

from __future__ import annotations

import enum

import numpy as np

from ._errors import UnknownDTypeError

__all__ = ["DataType"]


class DataType(enum.IntEnum):
    """Tensor element type. The integer values are ONNX's, so conversion is a cast."""

    UNDEFINED = 0
    FLOAT = 1
    UINT8 = 2
    INT8 = 3
    UINT16 = 4
    INT16 = 5
    INT32 = 6
    INT64 = 7
    STRING = 8
    BOOL = 9
    FLOAT16 = 10
    DOUBLE = 11
    UINT32 = 12
    UINT64 = 13
    COMPLEX64 = 14
    COMPLEX128 = 15
    BFLOAT16 = 16
    FLOAT8E4M3FN = 17
    FLOAT8E4M3FNUZ = 18
    FLOAT8E5M2 = 19
    FLOAT8E5M2FNUZ = 20
    UINT4 = 21
    INT4 = 22
    FLOAT4E2M1 = 23
    FLOAT8E8M0 = 24
    UINT2 = 25
    INT2 = 26
    FLOAT6E2M3 = 27
    FLOAT6E3M2 = 28

    @classmethod
    def from_int(cls, value: int, *, where: str = "") -> DataType:
        """Return the type numbered ``value``; raise :class:`UnknownDTypeError` naming ``where``."""
        try:
            return cls(value)
        except ValueError:
            at = f" in {where}" if where else ""
            raise UnknownDTypeError(f"unknown element type {value}{at}") from None

    @classmethod
    def from_numpy(cls, dtype: np.dtype | type) -> DataType:
        """Return the type of a numpy dtype (ml_dtypes types included)."""
        dtype = np.dtype(dtype)
        if dtype.kind in ("U", "S", "O"):
            return cls.STRING
        for dt, np_dt in _numpy_table().items():
            if np_dt == dtype:
                return dt
        raise UnknownDTypeError(f"numpy dtype {dtype} has no ONNX element type")

    def numpy(self) -> np.dtype:
        """The numpy dtype that holds one element (unpacked for 2- and 4-bit types)."""
        table = _numpy_table()
        if self not in table:
            raise UnknownDTypeError(f"element type {self.name} has no numpy equivalent")
        return table[self]

    @property
    def bitwidth(self) -> int:
        """Bits per element in ONNX's packed raw form."""
        if self in (DataType.UINT4, DataType.INT4, DataType.FLOAT4E2M1):
            return 4
        if self in (DataType.UINT2, DataType.INT2):
            return 2
        if self in (DataType.FLOAT6E2M3, DataType.FLOAT6E3M2):
            return 8  # stored one per byte
        return self.numpy().itemsize * 8

    @property
    def is_float(self) -> bool:
        """True for floating-point types of any width."""
        return self in _FLOATS

    @property
    def is_integer(self) -> bool:
        """True for signed and unsigned integer types."""
        return self in _INTS

    @property
    def short_name(self) -> str:
        """A short lowercase name used in the text form (``float32``, ``int64``...)."""
        return _SHORT.get(self, self.name.lower())

    @classmethod
    def from_short_name(cls, name: str) -> DataType:
        """Inverse of :attr:`short_name`."""
        for dt in cls:
            if dt.short_name == name:
                return dt
        raise UnknownDTypeError(f"unknown element type name {name!r}")


_FLOATS = {
    DataType.FLOAT, DataType.FLOAT16, DataType.DOUBLE, DataType.BFLOAT16, DataType.FLOAT8E4M3FN,
    DataType.FLOAT8E4M3FNUZ, DataType.FLOAT8E5M2, DataType.FLOAT8E5M2FNUZ, DataType.FLOAT4E2M1,
    DataType.FLOAT8E8M0, DataType.FLOAT6E2M3, DataType.FLOAT6E3M2,
}
_INTS = {
    DataType.UINT8, DataType.INT8, DataType.UINT16, DataType.INT16, DataType.INT32, DataType.INT64,
    DataType.UINT32, DataType.UINT64, DataType.UINT4, DataType.INT4, DataType.UINT2, DataType.INT2,
}
_SHORT = {
    DataType.FLOAT: "float32", DataType.DOUBLE: "float64", DataType.FLOAT16: "float16",
}

_TABLE: dict[DataType, np.dtype] | None = None


def _numpy_table() -> dict[DataType, np.dtype]:
    global _TABLE
    if _TABLE is None:
        table = {
            DataType.FLOAT: np.dtype(np.float32), DataType.UINT8: np.dtype(np.uint8),
            DataType.INT8: np.dtype(np.int8), DataType.UINT16: np.dtype(np.uint16),
            DataType.INT16: np.dtype(np.int16), DataType.INT32: np.dtype(np.int32),
            DataType.INT64: np.dtype(np.int64), DataType.STRING: np.dtype(object),
            DataType.BOOL: np.dtype(np.bool_), DataType.FLOAT16: np.dtype(np.float16),
            DataType.DOUBLE: np.dtype(np.float64), DataType.UINT32: np.dtype(np.uint32),
            DataType.UINT64: np.dtype(np.uint64), DataType.COMPLEX64: np.dtype(np.complex64),
            DataType.COMPLEX128: np.dtype(np.complex128),
        }
        try:
            import ml_dtypes

            for dt, name in [
                (DataType.BFLOAT16, "bfloat16"), (DataType.FLOAT8E4M3FN, "float8_e4m3fn"),
                (DataType.FLOAT8E4M3FNUZ, "float8_e4m3fnuz"), (DataType.FLOAT8E5M2, "float8_e5m2"),
                (DataType.FLOAT8E5M2FNUZ, "float8_e5m2fnuz"), (DataType.UINT4, "uint4"),
                (DataType.INT4, "int4"), (DataType.FLOAT4E2M1, "float4_e2m1fn"),
                (DataType.FLOAT8E8M0, "float8_e8m0fnu"), (DataType.UINT2, "uint2"),
                (DataType.INT2, "int2"), (DataType.FLOAT6E2M3, "float6_e2m3fn"),
                (DataType.FLOAT6E3M2, "float6_e3m2fn"),
            ]:
                if hasattr(ml_dtypes, name):
                    table[dt] = np.dtype(getattr(ml_dtypes, name))
        except ImportError:  # pragma: no cover - ml_dtypes ships with onnx
            pass
        _TABLE = table
    return _TABLE
