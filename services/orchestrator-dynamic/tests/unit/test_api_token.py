"""The API-token check both transports share (HTTP headers, gRPC metadata)."""

from __future__ import annotations

import pytest

from hive_common.errors import Unauthenticated
from orchestrator_dynamic.transport.auth import check_api_token

TOKEN = "s3cret-token-for-tests"


def test_without_a_configured_token_every_request_passes() -> None:
    check_api_token([], None)
    check_api_token([("authorization", "Bearer anything")], None)


def test_the_right_token_passes_in_any_case_of_scheme_and_header() -> None:
    check_api_token([("authorization", f"Bearer {TOKEN}")], TOKEN)
    check_api_token([("Authorization", f"bearer {TOKEN}".encode())], TOKEN)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("Authorization", "missing or wrong API token (Authorization: Bearer <token>)"),
        ("authorization", "missing or wrong API token (authorization: Bearer <token>)"),
    ],
)
@pytest.mark.parametrize("metadata", [[], [("authorization", "Bearer nope")]])
def test_a_missing_or_wrong_token_is_refused(
    header: str, message: str, metadata: list[tuple[str, str]]
) -> None:
    with pytest.raises(Unauthenticated) as raised:
        check_api_token(metadata, TOKEN, header=header)
    assert raised.value.message == message


def test_two_entries_or_another_scheme_are_refused() -> None:
    for metadata, message in (
        (
            [("authorization", "Bearer nope"), ("authorization", f"Bearer {TOKEN}")],
            "more than one authorization header",
        ),
        ([("authorization", f"Basic {TOKEN}")], "authorization header must be 'Bearer <token>'"),
    ):
        with pytest.raises(Unauthenticated) as raised:
            check_api_token(metadata, TOKEN)
        assert raised.value.message == message
