"""Opaque position tokens (page tokens, watch cursors): JSON in unpadded base64url, opaque
to clients but debuggable. A token comes back from clients, so decoding takes anything."""

from __future__ import annotations

import base64
import binascii
import json
import re

# Far beyond any token the services issue (a few hundred characters at most).
MAX_TOKEN_CHARS = 4096

# b64decode silently drops characters outside the alphabet (NUL included): check first.
_TOKEN = re.compile(r"[A-Za-z0-9_-]*")


def encode_token(value: object) -> str:
    raw = json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> object | None:
    """The JSON value of a token, or None for anything :func:`encode_token` did not make:
    too long, characters outside base64url, not UTF-8 JSON, or JSON nested too deep for
    the decoder (a RecursionError)."""
    if len(token) > MAX_TOKEN_CHARS or _TOKEN.fullmatch(token) is None:
        return None
    try:
        value: object = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        return None
    return value


__all__ = ["MAX_TOKEN_CHARS", "decode_token", "encode_token"]
