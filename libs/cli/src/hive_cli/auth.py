"""Credentials for the three HTTP APIs.

* The orchestrator takes an optional static API token (its ``HIVE_ORCHESTRATOR_API_TOKEN``);
  the CLI sends ``--api-token`` / ``HIVE_ORCHESTRATOR_API_TOKEN`` when set.
* The ticket service and the registry take a JWT *service* token. The CLI sends
  ``--token`` / ``HIVE_TOKEN`` when set; otherwise it signs a short-lived service token
  itself with ``HIVE_JWT_SECRET`` (the secret the services share, as in docker-compose),
  falling back to the public development secret the services also default to, so a local
  stack works with no set-up and a real deployment works once the secret is exported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hive_common.auth import DEFAULT_AUDIENCE, DEFAULT_ISSUER, TokenIssuer
from hive_common.config import DEVELOPMENT_JWT_SECRET

CLI_SUBJECT = "hive-cli"
MINTED_TOKEN_TTL_SECONDS = 900


class CredentialsError(ValueError):
    """The configured credentials cannot be used (e.g. a JWT secret that is too short)."""


@dataclass(frozen=True)
class Credentials:
    """Bearer tokens per service; ``None`` sends no ``Authorization`` header."""

    orchestrator_token: str | None
    service_token: str | None
    # Where the service token came from, for error hints: "flag", "env", "secret", "dev".
    service_token_source: str

    def orchestrator(self) -> Callable[[], str | None]:
        return lambda: self.orchestrator_token

    def service(self) -> Callable[[], str | None]:
        return lambda: self.service_token


def _checked(token: str, source: str) -> str:
    """``token`` if it can be sent in an ``Authorization`` header as is."""
    if not all(33 <= ord(c) <= 126 for c in token):
        raise CredentialsError(f"{source}: token must be printable ASCII without whitespace")
    return token


def resolve_credentials(
    *, token: str | None, api_token: str | None, env: Mapping[str, str]
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
        return Credentials(orchestrator_token, _checked(token, "--token"), "flag")
    if env.get("HIVE_TOKEN"):
        return Credentials(orchestrator_token, _checked(env["HIVE_TOKEN"], "HIVE_TOKEN"), "env")
    secret = env.get("HIVE_JWT_SECRET") or ""
    source = "secret" if secret else "dev"
    issuer_name = env.get("HIVE_JWT_ISSUER") or DEFAULT_ISSUER
    audience = env.get("HIVE_JWT_AUDIENCE") or DEFAULT_AUDIENCE
    try:
        issuer = TokenIssuer(
            secret=secret or DEVELOPMENT_JWT_SECRET, issuer=issuer_name, audience=audience
        )
        minted, _ = issuer.issue_service_token(
            service=CLI_SUBJECT, ttl_seconds=MINTED_TOKEN_TTL_SECONDS
        )
    except ValueError as exc:
        raise CredentialsError(f"cannot sign a service token with HIVE_JWT_SECRET: {exc}") from exc
    return Credentials(orchestrator_token, minted, source)


def auth_hint(credentials: Credentials) -> str:
    """One line telling the operator how to fix a 401/403."""
    if credentials.service_token_source == "dev":
        return (
            "the CLI signed its token with the development secret; export HIVE_JWT_SECRET "
            "(the services' JWT secret) or HIVE_TOKEN (a service token)"
        )
    if credentials.service_token_source == "secret":
        return "check that HIVE_JWT_SECRET matches the services' JWT secret"
    return "check the service token given with --token / HIVE_TOKEN"
