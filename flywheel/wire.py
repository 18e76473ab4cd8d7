"""Numpy arrays in msgpack, as openpi's websocket protocol carries them (``openpi_client.msgpack_numpy``).

msgpack, not pickle: a message from the network must not be able to run code when it is read, and msgpack maps onto
the nested dicts of arrays, strings and numbers that observations and actions are.

On the wire an array is a map with binary-string keys::

    {b"__ndarray__": True, b"data": <raw bytes, C order>, b"dtype": "<f4", b"shape": [8, 3]}

and a numpy scalar ``{b"__npgeneric__": True, b"data": <its Python value>, b"dtype": "<f4"}``. The keys must be
binary strings (msgpack's bin type): openpi's reader looks them up as ``bytes``. Reading here accepts text keys too.
Object, void and complex arrays are refused both ways (an object array's bytes would be pointers).
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

_REFUSED_KINDS = ("O", "V", "c")


def _encode(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _REFUSED_KINDS:
        raise ValueError(f"cannot send a numpy {obj.dtype} value: only numbers, booleans and byte strings travel")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send a {type(obj).__name__} over the wire (numbers, strings, bytes, lists, dicts and "
                    f"numpy arrays can)")


def _field(obj: dict, name: str) -> Any:
    key = name.encode()
    return obj[key] if key in obj else obj[name]


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj or "__ndarray__" in obj:
        dtype = np.dtype(_field(obj, "dtype"))
        if dtype.kind in _REFUSED_KINDS:
            raise ValueError(f"an array of dtype {dtype} arrived: only numbers, booleans and byte strings are read")
        shape = tuple(int(n) for n in _field(obj, "shape"))
        return np.frombuffer(_field(obj, "data"), dtype=dtype).reshape(shape)  # read-only: a view of the message
    if b"__npgeneric__" in obj or "__npgeneric__" in obj:
        return np.dtype(_field(obj, "dtype")).type(_field(obj, "data"))
    return obj


def packb(obj: Any) -> bytes:
    """``obj`` (dicts, lists, numbers, strings, numpy arrays and scalars, nested) as one msgpack message."""
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """A message ``packb`` (or openpi's packer) wrote. Arrays come back read-only, as views of ``data``."""
    return msgpack.unpackb(data, object_hook=_decode, raw=False)
