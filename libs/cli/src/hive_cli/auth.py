"""Credentials for the three HTTP APIs.

* The orchestrator takes an optional static API token (its ``HIVE_ORCHESTRATOR_API_TOKEN``);
  the CLI sends ``--api-token`` / ``HIVE_ORCHESTRATOR_API_TOKEN`` when set.
* The ticket service and the registry take a JWT *service* token. The CLI sends
  ``--token`` / ``HIVE_TOKEN`` when set; otherwise it signs a short-lived service token
  itself (and again before it expires) with ``HIVE_JWT_SECRET`` (the secret the services
  share, as in docker-compose), falling back to the public development secret the services
  also default to, so a local stack works with no set-up and a real deployment works once
  the secret is exported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hive_common.auth import (
    BEARER_TOKEN_RULE,
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    TokenIssuer,
    is_bearer_token,
)
from hive_common.config import DEVELOPMENT_JWT_SECRET

CLI_SUBJECT = "hive-cli"
MINTED_TOKEN_TTL_SECONDS = 900
# A minted token is signed again when it has less than this left to live: a watch outlasts
# one token, and a token must still be valid when the service checks it.
MINTED_TOKEN_RENEW_SECONDS = 60


class CredentialsError(ValueError):
    """The configured credentials cannot be used (e.g. a JWT secret that is too short)."""


class MintedToken:
    """A service token the CLI signs itself, signed anew shortly before it expires (the
    first one at once, so a secret that cannot sign is reported before any request)."""

    def __init__(self, issuer: TokenIssuer, *, clock: Callable[[], float] = time.time) -> None:
        self._issuer = issuer
        self._clock = clock
        self._token, self._expires_at = self._mint()

    def _mint(self) -> tuple[str, float]:
        token, claims = self._issuer.issue_service_token(
            service=CLI_SUBJECT, ttl_seconds=MINTED_TOKEN_TTL_SECONDS
        )
        return token, claims.expires_at.timestamp()

    def __call__(self) -> str:
        if self._clock() >= self._expires_at - MINTED_TOKEN_RENEW_SECONDS:
            self._token, self._expires_at = self._mint()
        return self._token


@dataclass(frozen=True)
class Credentials:
    """Bearer tokens per service; ``None`` sends no ``Authorization`` header."""

    orchestrator_token: str | None
    # The service token to send now: a given one, or a :class:`MintedToken`.
    service_token_provider: Callable[[], str | None]
    # Where the service token came from, for error hints: "flag", "env", "secret", "dev".
    service_token_source: str

    def orchestrator(self) -> Callable[[], str | None]:
        return lambda: self.orchestrator_token

    def service(self) -> Callable[[], str | None]:
        return self.service_token_provider


def _checked(token: str, source: str) -> str:
    """``token`` if it can be sent in an ``Authorization`` header as is."""
    if not is_bearer_token(token):
        raise CredentialsError(f"{source}: token must be {BEARER_TOKEN_RULE}")
    return token


def _given(token: str) -> Callable[[], str | None]:
    return lambda: token


def resolve_credentials(
    *,
    token: str | None,
    api_token: str | None,
    env: Mapping[str, str],
    clock: Callable[[], float] = time.time,
) -> Credentials:
    """Tokens from flags, then the environment, then a token signed with the JWT secret.
    ``CredentialsError`` for a token that is not printable ASCII without whitespace."""
    orchestrator_token: str | None = None
    if api_token:
        orchestrator_token = _checked(api_token, "--api-token")
    elif env.get("HIVE_ORCHESTRATOR_API_TOKEN"):
        orchestrator_token = _checked(
            env["HIVE_ORCHESTRATOR_API_TOKEN"], "HIVE_ORCHESTRATOR_API_TOKEN"
        )
    if token:
        return Credentials(orchestrator_token, _given(_checked(token, "--token")), "flag")
    if env.get("HIVE_TOKEN"):
        given = _checked(env["HIVE_TOKEN"], "HIVE_TOKEN")
        return Credentials(orchestrator_token, _given(given), "env")
    secret = env.get("HIVE_JWT_SECRET") or ""
    source = "secret" if secret else "dev"
    issuer_name = env.get("HIVE_JWT_ISSUER") or DEFAULT_ISSUER
    audience = env.get("HIVE_JWT_AUDIENCE") or DEFAULT_AUDIENCE
    try:
        issuer = TokenIssuer(
            secret=secret or DEVELOPMENT_JWT_SECRET,
            issuer=issuer_name,
            audience=audience,
            clock=clock,
        )
        minted = MintedToken(issuer, clock=clock)
    except ValueError as exc:
        raise CredentialsError(f"cannot sign a service token with HIVE_JWT_SECRET: {exc}") from exc
    return Credentials(orchestrator_token, minted, source)


def auth_hint(credentials: Credentials, service: str) -> str:
    """One line telling the operator how to fix a 401/403 from ``service``: the
    orchestrator checks its API token, the ticket service and registry a service token."""
    if service == "orchestrator":
        if credentials.orchestrator_token is None:
            return (
                "the orchestrator requires its API token: set --api-token or "
                "HIVE_ORCHESTRATOR_API_TOKEN (the orchestrator's HIVE_ORCHESTRATOR_API_TOKEN)"
            )
        return (
            "check the API token given with --api-token / HIVE_ORCHESTRATOR_API_TOKEN "
            "against the orchestrator's HIVE_ORCHESTRATOR_API_TOKEN"
        )
    if credentials.service_token_source == "dev":
        return (
            "the CLI signed its token with the development secret; export HIVE_JWT_SECRET "
            "(the services' JWT secret) or HIVE_TOKEN (a service token)"
        )
    if credentials.service_token_source == "secret":
        return "check that HIVE_JWT_SECRET matches the services' JWT secret"
    return "check the service token given with --token / HIVE_TOKEN"
