"""The framing of capture messages (stream MLMESH_CAPTURE), shared by the runtime that writes
them and the collector that reads them.

A capture message is one line of JSON, the header, then a binary body that the header's records
describe: each record says how many bytes of the body are its own (`bytes`), in record order.
The header never holds a raw newline (JSON escapes it inside strings), so the first newline ends it.
"""

from __future__ import annotations

from typing import Any

HEADER_END = b"\n"


class MalformedFrame(ValueError):
    """A capture message without a header line."""


def frame(header: bytes, body: list[Any]) -> bytes:
    """A capture message of `header` (JSON without a raw newline) and the parts of its body
    (bytes-like: bytes, or arrays' memory, copied once into the message here)."""
    return b"".join([header, HEADER_END, *body])


def split(payload: bytes) -> tuple[bytes, memoryview]:
    """(header, body) of a capture message; the body is a view into `payload`, not a copy."""
    end = payload.find(HEADER_END)
    if end < 0:
        raise MalformedFrame("no header line: a capture message is a line of JSON, then the binary body")
    return payload[:end], memoryview(payload)[end + 1 :]
