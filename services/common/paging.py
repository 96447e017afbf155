"""Opaque page tokens for list calls, and the bounds on page sizes."""

from __future__ import annotations

import base64
import binascii
import json

from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_OFFSET = 2**31 - 1


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", field="page_size")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def decode(token: str) -> int:
    """The offset a page token stands for; "" is the first page."""
    if not token:
        return 0
    try:
        offset = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))["offset"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeEncodeError):
        offset = None
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= MAX_OFFSET:
        raise InvalidArgument(
            "page_token is not one this service issued; pass the next_page_token of a previous "
            "response, or none for the first page",
            field="page_token",
        )
    return offset


def encode(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode("ascii")


def next_token(offset: int, size: int, returned: int) -> str:
    """The token of the next page, or "" when this page was the last."""
    return encode(offset + size) if returned > size else ""
