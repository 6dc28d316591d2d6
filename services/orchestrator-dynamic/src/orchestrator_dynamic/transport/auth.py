"""The orchestrator's optional static API token, checked the same way by both APIs."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from hive_common.auth import bearer_token_from_metadata
from hive_common.errors import Unauthenticated


def check_api_token(
    metadata: Iterable[tuple[str, str | bytes]] | None,
    expected: str | None,
    *,
    header: str = "Authorization",
) -> None:
    """Refuse (``Unauthenticated``) a request whose ``metadata`` (gRPC metadata or HTTP
    headers, every entry) lacks ``authorization: Bearer <expected>``; ``expected`` None
    means no token is configured: every request passes. Two authorization entries, or
    another scheme, are refused (``bearer_token_from_metadata``'s rules). ``header`` is
    the header's name as the message shows it to the caller."""
    if expected is None:
        return
    token = bearer_token_from_metadata(metadata) or ""
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthenticated(f"missing or wrong API token ({header}: Bearer <token>)")
