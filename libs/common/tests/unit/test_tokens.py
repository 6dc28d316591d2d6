"""Opaque position tokens: what comes back from a client decodes to a value or to None."""

from __future__ import annotations

import base64

import pytest

from hive_common.tokens import MAX_TOKEN_CHARS, decode_token, encode_token


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_round_trip() -> None:
    for value in ({"v": 1, "after": 42}, ["default", "w1"], {"c": "2026-12-06", "p": "é"}):
        token = encode_token(value)
        assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        assert decode_token(token) == value


@pytest.mark.parametrize(
    "token",
    [
        "garbage!",  # outside the alphabet
        encode_token([1]) + "\x00",  # b64decode would drop the NUL
        _b64(b"\xff\xfe"),  # not UTF-8
        _b64(b"{"),  # not JSON
        _b64(b"[" * 1500),  # nested beyond the decoder: a RecursionError (was a 500)
        _b64(b'{"a":' * 1500),
        "A" * (MAX_TOKEN_CHARS + 1),
    ],
)
def test_anything_else_is_none(token: str) -> None:
    assert decode_token(token) is None
