"""The orchestrator's own service token, minted locally with the shared JWT secret.

The orchestrator never mints ticket tokens: it has no channel to hand one to a worker.
A worker that sees its assignment calls GenerateToken itself (with its worker token).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from hive_common.auth import TokenIssuer
from orchestrator_dynamic.domain.clock import Clock, utc_now


class ServiceTokenProvider:
    """A ``TokenProvider`` for the typed clients: one service token, re-issued once it has
    less than a fifth of its lifetime left."""

    def __init__(
        self,
        *,
        issuer: TokenIssuer,
        service: str,
        ttl_seconds: int,
        clock: Clock = utc_now,
    ) -> None:
        self._issuer = issuer
        self._service = service
        self._ttl = ttl_seconds
        self._clock = clock
        self._token: str | None = None
        self._refresh_at: datetime | None = None

    def __call__(self) -> str:
        now = self._clock()
        if self._token is None or self._refresh_at is None or now >= self._refresh_at:
            token, claims = self._issuer.issue_service_token(
                service=self._service, ttl_seconds=self._ttl
            )
            self._token = token
            self._refresh_at = claims.expires_at - timedelta(seconds=self._ttl / 5)
        return self._token
