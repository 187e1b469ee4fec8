"""The Open Inference Protocol's tensor codec: a request body split into its JSON header and binary part (the binary
tensor data extension, gzip or deflate), BYTES elements read from JSON ``data`` or from binary, and output tensors
written as JSON ``data`` or as binary. No knowledge of the model or of the routes."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import numpy as np

from .errors import ServiceError

HEADER = b"inference-header-content-length"


def bad(message: str) -> ServiceError:
    return ServiceError(400, "bad_request", message)


def split(headers: Sequence[tuple[bytes, bytes]], raw: bytes, limit: int) -> tuple[bytes, bytes]:
    """The JSON header and the binary part of a body, inflated first if the client compressed it (at most
    ``limit`` bytes inflated: 413 beyond, so a small bomb stays small)."""
    length, encoding = None, b""
    for name, value in headers:
        if name == HEADER:
            if not value.isdigit() or len(value) > 18:
                raise bad(f"Inference-Header-Content-Length must be a byte count, got {value[:20]!r}")
            length = int(value)
        elif name == b"content-encoding":
            encoding = value.lower()
    if encoding in (b"gzip", b"deflate"):
        inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == b"gzip" else 0))
        try:
            raw = inflater.decompress(raw, limit + 1)
        except zlib.error as error:
            raise bad(f"body is not valid {encoding.decode()} ({error})") from None
        if len(raw) > limit or inflater.unconsumed_tail:
            raise ServiceError(413, "body_too_large", f"request body inflates past {limit} bytes")
    elif encoding not in (b"", b"identity"):
        raise ServiceError(415, "unsupported_encoding", f"Content-Encoding {encoding.decode()!r} is not supported")
    if length is None:
        return raw, b""
    if length > len(raw):
        raise bad(f"Inference-Header-Content-Length is {length}, but the body has only {len(raw)} bytes")
    return raw[:length], raw[length:]


def flatten(data, depth: int) -> list | None:
    """A JSON tensor's elements in row-major order (the protocol allows nested lists), or None when ``data`` is not a
    list or nests deeper than ``depth`` (its shape's rank). Iterative: any nesting the JSON parser accepts is
    answered 400, never a recursion error."""
    if not isinstance(data, list):
        return None
    out: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) >= depth:
                    return None
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def unpack_bytes(data: bytes, count: int, name: str) -> list[bytes]:
    """``count`` BYTES elements: each a 4-byte little-endian length, then that many bytes; nothing left over."""
    elements, position = [], 0
    for index in range(count):
        if position + 4 > len(data):
            raise bad(f"input {name!r}: binary data ends inside element {index}'s length")
        (size,) = struct.unpack_from("<I", data, position)
        position += 4
        if position + size > len(data):
            raise bad(f"input {name!r}: element {index} declares {size} bytes, only {len(data) - position} remain")
        elements.append(data[position:position + size])
        position += size
    if position != len(data):
        raise bad(f"input {name!r}: {len(data) - position} bytes after its {count} elements")
    return elements


def pack_bytes(values: Sequence[str]) -> bytes:
    parts = []
    for value in values:
        encoded = value.encode()
        parts += [struct.pack("<I", len(encoded)), encoded]
    return b"".join(parts)


def output(name: str, datatype: str, shape: list[int], values: list, binary: bool) -> tuple[dict, bytes]:
    """One output tensor: its JSON (with ``data``, or ``binary_data_size`` when ``binary``) and its binary part.
    ``values``: rows of floats for FP32, strings for BYTES."""
    tensor = {"name": name, "datatype": datatype, "shape": shape}
    if binary:
        blob = np.asarray(values, np.float32).tobytes() if datatype == "FP32" else pack_bytes(values)
        tensor["parameters"] = {"binary_data_size": len(blob)}
        return tensor, blob
    tensor["data"] = [p for row in values for p in row] if datatype == "FP32" else values
    return tensor, b""
