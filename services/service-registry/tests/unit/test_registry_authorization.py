"""Authorizer: which token kinds and secrets each rule accepts (no I/O)."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from hive_common.auth import TokenClaims, TokenIssuer, TokenKind, TokenVerifier
from hive_common.errors import HiveError, PermissionDenied, Unauthenticated
from hive_common.grpc_server import RpcCall
from service_registry.transport.authorization import Authorizer
from service_registry.transport.grpc.auth import (
    RULES,
    SERVICE_PREFIX,
    RegistryAuthInterceptor,
    current_caller,
)

SECRET = "unit-test-jwt-secret-0123456789abcdef0123"
ISSUER = TokenIssuer(secret=SECRET, issuer="tests")


def authorizer(registration_secret: str | None = "bootstrap-secret") -> Authorizer:
    return Authorizer(
        verifier=TokenVerifier(secret=SECRET), registration_secret=registration_secret
    )


def token(kind: str) -> str:
    if kind == "service":
        return ISSUER.issue_service_token(service="orchestrator", ttl_seconds=60)[0]
    if kind == "worker":
        return ISSUER.issue_worker_token(worker_id="w-1", ttl_seconds=60)[0]
    return ISSUER.issue_ticket_token(
        worker_id="w-1", ticket_id="t", plan_id="p", attempt=0, ttl_seconds=60
    )[0]


# (rpc, token kind) -> allowed?
MATRIX = [
    ("Register", "service", True),
    ("Register", "worker", False),
    ("Register", "ticket", False),
    ("Heartbeat", "worker", True),
    ("Heartbeat", "service", False),
    ("Heartbeat", "ticket", False),
    ("Deregister", "worker", True),
    ("Deregister", "service", False),
    ("DiscoverWorkers", "service", True),
    ("DiscoverWorkers", "worker", False),
    ("ListWorkers", "service", True),
    ("ListWorkers", "ticket", False),
    ("WatchWorkers", "service", True),
    ("WatchWorkers", "worker", False),
    ("GetWorker", "service", True),
    ("GetWorker", "worker", True),
    ("GetWorker", "ticket", True),
]


@pytest.mark.parametrize(("rpc", "kind", "allowed"), MATRIX)
def test_token_kinds_per_rpc(rpc: str, kind: str, allowed: bool) -> None:
    if allowed:
        claims = authorizer().authorize(token(kind), RULES[rpc], rpc)
        assert claims is not None
        assert claims.kind is TokenKind(kind)
    else:
        with pytest.raises(PermissionDenied):
            authorizer().authorize(token(kind), RULES[rpc], rpc)


def test_every_rpc_has_a_rule() -> None:
    assert set(RULES) == {
        "Register",
        "Heartbeat",
        "Deregister",
        "DiscoverWorkers",
        "GetWorker",
        "ListWorkers",
        "WatchWorkers",
    }


def test_registration_secret_only_opens_register() -> None:
    assert authorizer().authorize("bootstrap-secret", RULES["Register"], "Register") is None
    for rpc in RULES:
        if rpc != "Register":
            with pytest.raises(Unauthenticated):
                authorizer().authorize("bootstrap-secret", RULES[rpc], rpc)
    with pytest.raises(Unauthenticated):
        authorizer().authorize("bootstrap-secreT", RULES["Register"], "Register")
    with pytest.raises(Unauthenticated):
        authorizer(None).authorize("bootstrap-secret", RULES["Register"], "Register")


_REGISTER_NEEDS = (
    "Register needs the registration secret (HIVE_REGISTRY_REGISTRATION_SECRET) or a service token"
)
_NO_SECRET = (
    "Register needs a service token (this registry has no registration secret: "
    "HIVE_REGISTRY_REGISTRATION_SECRET is unset)"
)
_HEARTBEAT_NEEDS = "Heartbeat needs a worker token (the one Register returns)"

# (rpc, what is sent, registration secret configured) -> (error, message, details)
REFUSALS: list[tuple[str, str | None, bool, type[HiveError], str, dict[str, str]]] = [
    (
        "Register",
        "worker",
        True,
        PermissionDenied,
        f"{_REGISTER_NEEDS}; a worker token is not enough",
        {"token_kind": "worker"},
    ),
    (
        "Register",
        "ticket",
        True,
        PermissionDenied,
        f"{_REGISTER_NEEDS}; a ticket token is not enough",
        {"token_kind": "ticket"},
    ),
    (
        "Register",
        "worker",
        False,
        PermissionDenied,
        f"{_NO_SECRET}; a worker token is not enough",
        {"token_kind": "worker"},
    ),
    (
        "Register",
        None,
        True,
        Unauthenticated,
        f"missing 'authorization: Bearer <token>': {_REGISTER_NEEDS}",
        {"reason": "missing"},
    ),
    (
        "Register",
        "wrong-secret",
        True,
        Unauthenticated,
        "not the registration secret (HIVE_REGISTRY_REGISTRATION_SECRET) nor a token",
        {"reason": "bad_registration_secret"},
    ),
    (
        "Register",
        "bootstrap-secret",
        False,
        Unauthenticated,
        "not a token, and this registry has no registration secret "
        "(HIVE_REGISTRY_REGISTRATION_SECRET is unset): Register needs a service token",
        {"reason": "no_registration_secret"},
    ),
    (
        "Heartbeat",
        "service",
        True,
        PermissionDenied,
        f"{_HEARTBEAT_NEEDS}, not a service token",
        {"token_kind": "service"},
    ),
    (
        "Heartbeat",
        "bootstrap-secret",
        True,
        Unauthenticated,
        f"the registration secret only opens Register: {_HEARTBEAT_NEEDS}",
        {"reason": "registration_secret"},
    ),
    (
        "Heartbeat",
        None,
        True,
        Unauthenticated,
        f"missing 'authorization: Bearer <token>': {_HEARTBEAT_NEEDS}",
        {"reason": "missing"},
    ),
    (
        "DiscoverWorkers",
        "worker",
        True,
        PermissionDenied,
        "DiscoverWorkers needs a service token, not a worker token",
        {"token_kind": "worker"},
    ),
    (
        "GetWorker",
        None,
        True,
        Unauthenticated,
        "missing 'authorization: Bearer <token>': GetWorker needs a service, ticket or worker "
        "token",
        {"reason": "missing"},
    ),
]


@pytest.mark.parametrize(
    ("rpc", "sent", "with_secret", "error", "message", "details"),
    REFUSALS,
    ids=[f"{r[0]}-{r[1]}-{'secret' if r[2] else 'no_secret'}" for r in REFUSALS],
)
def test_refusals_say_what_the_call_needs(
    rpc: str,
    sent: str | None,
    with_secret: bool,
    error: type[HiveError],
    message: str,
    details: dict[str, str],
) -> None:
    checks = authorizer("bootstrap-secret" if with_secret else None)
    credential = token(sent) if sent in ("service", "worker", "ticket") else sent

    with pytest.raises(error) as refused:
        checks.authorize(credential, RULES[rpc], rpc)

    assert refused.value.message == message
    assert refused.value.details == details


def test_missing_token_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated):
        authorizer().authorize(None, RULES["GetWorker"], "GetWorker")


def test_a_token_is_verified_once_and_its_kind_checked_every_time() -> None:
    verified: list[str] = []

    class Counting(TokenVerifier):
        def verify(self, token: str) -> TokenClaims:
            verified.append(token)
            return super().verify(token)

    checks = Authorizer(verifier=Counting(secret=SECRET), registration_secret=None)
    service = token("service")
    for _ in range(3):
        claims = checks.authorize(service, RULES["DiscoverWorkers"], "DiscoverWorkers")
        assert claims is not None
        assert claims.kind is TokenKind.SERVICE
        with pytest.raises(PermissionDenied):  # a cached token still gets its kind checked
            checks.authorize(service, RULES["Heartbeat"], "Heartbeat")
    assert verified == [service]


async def test_the_caller_is_set_for_the_rpc_and_a_stream_closed_elsewhere_ends_cleanly() -> None:
    interceptor = RegistryAuthInterceptor(authorizer=authorizer())
    call = RpcCall(
        method=f"{SERVICE_PREFIX}WatchWorkers",
        rpc_type="unary_stream",
        metadata=(("authorization", f"Bearer {token('service')}"),),
    )
    around = interceptor.around(call, None, None)

    async def enter() -> TokenClaims | None:
        await around.__aenter__()
        return current_caller()

    claims = await asyncio.create_task(enter(), context=contextvars.copy_context())
    assert claims is not None
    assert claims.kind is TokenKind.SERVICE
    assert current_caller() is None  # only the RPC's own context holds it
    # A response stream the server stopped reading is closed by asyncio's async generator
    # finalizer, in another context than the RPC's.
    closing = around.__aexit__(GeneratorExit, GeneratorExit(), None)
    await asyncio.create_task(closing, context=contextvars.copy_context())
