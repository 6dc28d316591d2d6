"""Which bearer token goes to which service."""

from __future__ import annotations

import jwt
import pytest

from hive_cli.auth import MINTED_TOKEN_TTL_SECONDS, CredentialsError, resolve_credentials
from hive_cli.exit_codes import ExitCode
from hive_common.auth import TokenKind, TokenVerifier
from hive_common.config import DEVELOPMENT_JWT_SECRET
from hive_common.errors import Unauthenticated

from .conftest import FakeServices

SECRET = "a-real-secret-of-at-least-thirty-two-bytes"


def test_explicit_token_wins_over_env_and_secret() -> None:
    env = {"HIVE_TOKEN": "env-token", "HIVE_JWT_SECRET": SECRET}
    assert resolve_credentials(token="flag", api_token=None, env=env).service()() == "flag"
    assert resolve_credentials(token=None, api_token=None, env=env).service()() == "env-token"


def test_minted_service_token_verifies_with_the_shared_secret() -> None:
    creds = resolve_credentials(token=None, api_token=None, env={"HIVE_JWT_SECRET": SECRET})
    assert creds.service_token_source == "secret"
    token = creds.service()()
    assert token is not None
    claims = TokenVerifier(secret=SECRET).verify(token)
    assert claims.kind is TokenKind.SERVICE
    assert claims.subject == "hive-cli"
    with pytest.raises(Unauthenticated):
        TokenVerifier(secret=DEVELOPMENT_JWT_SECRET).verify(token)


def test_without_configuration_the_development_secret_signs() -> None:
    creds = resolve_credentials(token=None, api_token=None, env={})
    assert creds.service_token_source == "dev"
    token = creds.service()()
    assert token is not None
    assert TokenVerifier(secret=DEVELOPMENT_JWT_SECRET).verify(token).kind is TokenKind.SERVICE


def test_a_minted_token_is_signed_again_before_it_expires() -> None:
    # One token per run expired after 15 minutes: a longer watch read no ticket history.
    now = [1_800_000_000.0]
    creds = resolve_credentials(
        token=None, api_token=None, env={"HIVE_JWT_SECRET": SECRET}, clock=lambda: now[0]
    )

    def expiry(token: str | None) -> int:
        assert token is not None
        claims = jwt.decode(token, options={"verify_signature": False})
        return int(claims["exp"])

    first = creds.service()()
    assert expiry(first) == now[0] + MINTED_TOKEN_TTL_SECONDS
    now[0] += 60
    assert creds.service()() == first  # not one per request
    for _ in range(10):  # 50 minutes
        now[0] += 300
        token = creds.service()()
        assert expiry(token) >= now[0] + 30, "a token about to expire (or expired) was sent"
    assert creds.service()() != first


def test_issuer_and_audience_follow_the_environment() -> None:
    env = {"HIVE_JWT_SECRET": SECRET, "HIVE_JWT_AUDIENCE": "other", "HIVE_JWT_ISSUER": "ops"}
    creds = resolve_credentials(token=None, api_token=None, env=env)
    token = creds.service()()
    assert token is not None
    claims = TokenVerifier(secret=SECRET, audience="other").verify(token)
    assert claims.issuer == "ops"


def test_short_secret_is_refused() -> None:
    with pytest.raises(CredentialsError, match="HIVE_JWT_SECRET"):
        resolve_credentials(token=None, api_token=None, env={"HIVE_JWT_SECRET": "short"})
    run = FakeServices().run("tickets", "list", env={"HIVE_JWT_SECRET": "short"})
    assert run.code == ExitCode.USAGE
    assert "HIVE_JWT_SECRET" in run.err


def test_each_service_gets_its_own_credential() -> None:
    services = FakeServices()
    services.on("GET", "/api/v1/plans", body={"plans": [], "next_page_token": ""})
    services.on("GET", "/api/v1/tickets", body={"tickets": [], "next_page_token": ""})
    services.on("GET", "/api/v1/workers", body={"workers": [], "next_page_token": ""})
    env = {"HIVE_TOKEN": "jwt-for-services", "HIVE_ORCHESTRATOR_API_TOKEN": "orch-api-token"}
    for argv in (["plan", "list"], ["tickets", "list"], ["workers", "list"]):
        assert services.run(*argv, env=env).code == ExitCode.OK
    sent = {r.url.path: r.headers.get("authorization") for r in services.requests}
    assert sent == {
        "/api/v1/plans": "Bearer orch-api-token",
        "/api/v1/tickets": "Bearer jwt-for-services",
        "/api/v1/workers": "Bearer jwt-for-services",
    }
    services.requests.clear()
    services.run("plan", "list", env={})
    assert "authorization" not in services.requests[0].headers
    services.run("plan", "list", "--api-token", "flag-token", env=env)
    assert services.requests[-1].headers["authorization"] == "Bearer flag-token"


@pytest.mark.parametrize(
    ("argv", "env", "source"),
    [
        (["--api-token", "tökén", "plan", "list"], {}, "--api-token"),
        (["plan", "list"], {"HIVE_ORCHESTRATOR_API_TOKEN": "a b"}, "HIVE_ORCHESTRATOR_API_TOKEN"),
        (["workers", "list"], {"HIVE_TOKEN": "tökén"}, "HIVE_TOKEN"),
        (["workers", "list"], {"HIVE_TOKEN": "a\nb"}, "HIVE_TOKEN"),
        (["--token", "x\ny", "workers", "list"], {}, "--token"),
    ],
)
def test_a_token_that_cannot_be_sent_is_a_usage_error(
    argv: list[str], env: dict[str, str], source: str
) -> None:
    services = FakeServices()
    run = services.run(*argv, env=env)
    assert run.code == ExitCode.USAGE, run.err
    assert f"{source}: token must be printable ASCII without whitespace" in run.err
    assert "internal error" not in run.err
    assert "unreachable" not in run.err
    assert services.requests == []
