"""Token issuing, verification and every refusal."""

from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest

from hive_common.auth import (
    CLOCK_SKEW_LEEWAY_SECONDS,
    TokenClaims,
    TokenIssuer,
    TokenKind,
    TokenVerifier,
    bearer_token_from_metadata,
)
from hive_common.errors import Unauthenticated

SECRET = "s" * 32
OTHER_SECRET = "o" * 32


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer(secret=SECRET, issuer="execution-ticket-service")


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(secret=SECRET, audience="neuralhive", leeway_seconds=0)


def _refused(verifier: TokenVerifier, token: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as raised:
        verifier.verify(token)
    return raised.value


def _raw(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def _payload(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": "svc",
        "aud": "neuralhive",
        "sub": "w-1",
        "iat": now,
        "exp": now + 60,
        "jti": str(uuid.uuid4()),
        "kind": "worker",
        "worker_id": "w-1",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def test_service_token_round_trip(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token, issued = issuer.issue_service_token(service="orchestrator-dynamic", ttl_seconds=300)
    claims = verifier.verify(token)
    assert claims == issued
    assert claims.kind is TokenKind.SERVICE
    assert claims.subject == "orchestrator-dynamic"
    assert claims.issuer == "execution-ticket-service"
    assert claims.audience == "neuralhive"
    assert claims.scopes == frozenset()
    assert (claims.worker_id, claims.ticket_id, claims.plan_id, claims.attempt) == (
        None,
        None,
        None,
        None,
    )
    assert (claims.expires_at - claims.issued_at).total_seconds() == 300
    assert claims.issued_at.tzinfo is UTC


def test_worker_token_round_trip(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token, issued = issuer.issue_worker_token(worker_id="w-1", ttl_seconds=60)
    claims = verifier.verify(token)
    assert claims == issued
    assert claims.kind is TokenKind.WORKER
    assert claims.subject == claims.worker_id == "w-1"
    assert claims.scopes == frozenset()


def test_ticket_token_round_trip(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token, issued = issuer.issue_ticket_token(
        worker_id="w-1",
        ticket_id="t-1",
        plan_id="p-1",
        attempt=2,
        ttl_seconds=60,
        scopes=["ticket:update", "ticket:read"],
    )
    claims = verifier.verify(token)
    assert claims == issued
    assert claims.kind is TokenKind.TICKET
    assert claims.scopes == frozenset({"ticket:update", "ticket:read"})
    assert (claims.worker_id, claims.ticket_id, claims.plan_id, claims.attempt) == (
        "w-1",
        "t-1",
        "p-1",
        2,
    )


def test_token_carries_the_registered_claims(issuer: TokenIssuer) -> None:
    token, claims = issuer.issue_worker_token(worker_id="w-1", ttl_seconds=60)
    payload = jwt.decode(token, options={"verify_signature": False})
    assert set(payload) >= {"iss", "aud", "sub", "iat", "exp", "jti", "kind", "scope"}
    assert uuid.UUID(payload["jti"]).version == 4
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    other, _ = issuer.issue_worker_token(worker_id="w-1", ttl_seconds=60)
    assert jwt.decode(other, options={"verify_signature": False})["jti"] != claims.jti


def test_malformed_token_is_refused(verifier: TokenVerifier) -> None:
    for garbage in ("", "not-a-jwt", "a.b.c", "x" * 300):
        error = _refused(verifier, garbage)
        assert error.details == {"reason": "malformed"}
        assert "malformed" in error.message


def test_bad_signature_is_refused(verifier: TokenVerifier) -> None:
    forged, _ = TokenIssuer(secret=OTHER_SECRET, issuer="evil").issue_service_token(
        service="orchestrator-dynamic", ttl_seconds=60
    )
    error = _refused(verifier, forged)
    assert error.details == {"reason": "bad_signature"}


def test_tokens_of_an_accepted_secret_are_valid_and_checked_like_any() -> None:
    # A secret being rotated: tokens signed with it are valid, and what they say is checked.
    rotating = TokenVerifier(secret=SECRET, accepted_secrets=[OTHER_SECRET])
    other = TokenIssuer(secret=OTHER_SECRET, issuer="svc")
    token, _ = other.issue_worker_token(worker_id="w-1", ttl_seconds=60)
    assert rotating.verify(token).worker_id == "w-1"
    own, _ = TokenIssuer(secret=SECRET, issuer="svc").issue_worker_token(
        worker_id="w-2", ttl_seconds=60
    )
    assert rotating.verify(own).worker_id == "w-2"
    past = TokenIssuer(secret=OTHER_SECRET, issuer="svc", clock=lambda: time.time() - 3600)
    expired, _ = past.issue_worker_token(worker_id="w-1", ttl_seconds=60)
    assert _refused(rotating, expired).details == {"reason": "expired"}
    third, _ = TokenIssuer(secret="t" * 32, issuer="svc").issue_worker_token(
        worker_id="w-1", ttl_seconds=60
    )
    assert _refused(rotating, third).details == {"reason": "bad_signature"}
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenVerifier(secret=SECRET, accepted_secrets=["short"])


def test_tampered_payload_is_refused(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token, _ = issuer.issue_worker_token(worker_id="w-1", ttl_seconds=60)
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["worker_id"] = claims["sub"] = "w-2"
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    error = _refused(verifier, f"{header}.{forged_payload}.{signature}")
    assert error.details == {"reason": "bad_signature"}


def test_alg_none_is_refused(verifier: TokenVerifier) -> None:
    unsigned = jwt.encode(_payload(), key=None, algorithm="none")
    error = _refused(verifier, unsigned)
    assert error.details == {"reason": "bad_algorithm"}


def test_expired_token_is_refused(verifier: TokenVerifier) -> None:
    past = TokenIssuer(secret=SECRET, issuer="svc", clock=lambda: time.time() - 3600)
    token, claims = past.issue_worker_token(worker_id="w-1", ttl_seconds=60)
    assert claims.expires_at < datetime.now(UTC)
    error = _refused(verifier, token)
    assert error.details == {"reason": "expired"}
    assert "expired" in error.message


def test_leeway_tolerates_small_skew() -> None:
    past = TokenIssuer(secret=SECRET, issuer="svc", clock=lambda: time.time() - 70)
    token, _ = past.issue_worker_token(worker_id="w-1", ttl_seconds=60)
    lenient = TokenVerifier(secret=SECRET, audience="neuralhive", leeway_seconds=600)
    assert lenient.verify(token).worker_id == "w-1"


def test_services_accept_a_token_up_to_the_clock_skew_leeway_after_its_exp() -> None:
    """What the READMEs document: every service verifies with the default leeway."""
    assert CLOCK_SKEW_LEEWAY_SECONDS == 5
    default = TokenVerifier(secret=SECRET, audience="neuralhive")
    now = time.time()
    just_expired = _raw(_payload(iat=int(now) - 63, exp=int(now) - 3))
    long_expired = _raw(_payload(iat=int(now) - 68, exp=int(now) - 8))
    slightly_early = _raw(_payload(iat=int(now) + 3, exp=int(now) + 60))
    assert default.verify(just_expired).worker_id == "w-1"
    assert default.verify(slightly_early).worker_id == "w-1"
    assert _refused(default, long_expired).details == {"reason": "expired"}


def test_token_from_the_future_is_refused(verifier: TokenVerifier) -> None:
    future = TokenIssuer(secret=SECRET, issuer="svc", clock=lambda: time.time() + 3600)
    token, _ = future.issue_worker_token(worker_id="w-1", ttl_seconds=60)
    assert _refused(verifier, token).details == {"reason": "not_yet_valid"}


def test_wrong_audience_is_refused(verifier: TokenVerifier) -> None:
    other = TokenIssuer(secret=SECRET, issuer="svc", audience="someone-else")
    token, _ = other.issue_worker_token(worker_id="w-1", ttl_seconds=60)
    error = _refused(verifier, token)
    assert error.details == {"reason": "wrong_audience"}
    assert "neuralhive" in error.message


def test_untrusted_issuer_is_refused(issuer: TokenIssuer) -> None:
    strict = TokenVerifier(
        secret=SECRET, audience="neuralhive", leeway_seconds=0, issuers=["service-registry"]
    )
    token, _ = issuer.issue_worker_token(worker_id="w-1", ttl_seconds=60)
    assert _refused(strict, token).details == {"reason": "wrong_issuer"}


@pytest.mark.parametrize("claim", ["iss", "aud", "sub", "iat", "exp", "jti"])
def test_missing_registered_claim_is_refused(verifier: TokenVerifier, claim: str) -> None:
    error = _refused(verifier, _raw(_payload(**{claim: None})))
    assert error.details == {"reason": "missing_claim"}
    assert repr(claim) in error.message


@pytest.mark.parametrize("claim", ["worker_id", "ticket_id", "plan_id", "attempt"])
def test_ticket_token_without_binding_claim_is_refused(verifier: TokenVerifier, claim: str) -> None:
    payload = _payload(kind="ticket", ticket_id="t-1", plan_id="p-1", attempt=0)
    del payload[claim]
    error = _refused(verifier, _raw(payload))
    assert error.details == {"reason": "missing_claim"}
    assert repr(claim) in error.message


def test_worker_token_without_worker_id_is_refused(verifier: TokenVerifier) -> None:
    error = _refused(verifier, _raw(_payload(worker_id=None)))
    assert error.details == {"reason": "missing_claim"}


@pytest.mark.parametrize("kind", [None, "admin", "", 3, ["worker"]])
def test_unknown_kind_is_refused(verifier: TokenVerifier, kind: object) -> None:
    error = _refused(verifier, _raw(_payload(kind=kind)))
    assert error.details == {"reason": "unknown_kind"}


@pytest.mark.parametrize(
    "overrides",
    [
        {"sub": "w-2"},  # subject and worker_id disagree
        {"sub": ""},
        {"worker_id": 7},
        {"scope": ["a", "b"]},
        {"kind": "ticket", "ticket_id": "t", "plan_id": "p", "attempt": "1"},
        {"kind": "ticket", "ticket_id": "t", "plan_id": "p", "attempt": -1},
        {"kind": "ticket", "ticket_id": "t", "plan_id": "p", "attempt": True},
    ],
    ids=repr,
)
def test_ill_typed_claims_are_refused(verifier: TokenVerifier, overrides: dict[str, Any]) -> None:
    with pytest.raises(Unauthenticated):
        verifier.verify(_raw(_payload(**overrides)))


def test_foreign_token_with_right_secret_is_claims_checked(verifier: TokenVerifier) -> None:
    # Signed with our secret and valid registered claims but no kind: still refused.
    error = _refused(verifier, _raw(_payload(kind=None, worker_id=None)))
    assert error.details == {"reason": "unknown_kind"}


@pytest.mark.parametrize(
    "call",
    [
        lambda i: i.issue_service_token(service="", ttl_seconds=60),
        lambda i: i.issue_service_token(service="svc", ttl_seconds=0),
        lambda i: i.issue_ticket_token(
            worker_id="w", ticket_id="t", plan_id="p", attempt=0, ttl_seconds=60, scopes=["a b"]
        ),
        lambda i: i.issue_worker_token(worker_id=" ", ttl_seconds=60),
        lambda i: i.issue_ticket_token(
            worker_id="w", ticket_id="t", plan_id="p", attempt=-1, ttl_seconds=60
        ),
        lambda i: i.issue_ticket_token(
            worker_id="w", ticket_id="", plan_id="p", attempt=0, ttl_seconds=60
        ),
    ],
)
def test_issuer_rejects_nonsense(issuer: TokenIssuer, call: Any) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        call(issuer)


def test_short_secret_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenIssuer(secret="short", issuer="svc")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenVerifier(secret=b"short", audience="neuralhive", leeway_seconds=0)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (None, None),
        ((), None),
        ((("x-request-id", "r"),), None),
        ((("authorization", "Bearer abc.def.ghi"),), "abc.def.ghi"),
        ((("authorization", "bearer abc"),), "abc"),
        ((("authorization", "BEARER   abc  "),), "abc"),
        ((("Authorization", "Bearer abc"),), "abc"),
        ((("authorization", b"Bearer abc"),), "abc"),
    ],
)
def test_bearer_token_from_metadata(
    metadata: tuple[tuple[str, str | bytes], ...] | None, expected: str | None
) -> None:
    assert bearer_token_from_metadata(metadata) == expected


@pytest.mark.parametrize(
    "value", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "abc", "Bearer a b", "Token abc"]
)
def test_malformed_authorization_header_is_refused(value: str) -> None:
    with pytest.raises(Unauthenticated) as raised:
        bearer_token_from_metadata((("authorization", value),))
    assert raised.value.details == {"reason": "malformed_header"}


def test_repeated_authorization_header_is_refused() -> None:
    with pytest.raises(Unauthenticated):
        bearer_token_from_metadata((("authorization", "Bearer a"), ("authorization", "Bearer b")))


def test_verify_metadata(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token, issued = issuer.issue_worker_token(worker_id="w-1", ttl_seconds=60)
    claims: TokenClaims = verifier.verify_metadata((("authorization", f"Bearer {token}"),))
    assert claims == issued
    with pytest.raises(Unauthenticated) as raised:
        verifier.verify_metadata((("x-request-id", "r"),))
    assert raised.value.details == {"reason": "missing"}


@pytest.mark.parametrize(
    "overrides", [{"exp": 10**20}, {"exp": 1e300}, {"iat": -(10**20)}], ids=repr
)
def test_dates_beyond_any_calendar_are_refused(
    verifier: TokenVerifier, overrides: dict[str, Any]
) -> None:
    # Well signed and accepted by PyJWT, but no datetime holds them (was INTERNAL / 500).
    error = _refused(verifier, _raw(_payload(**overrides)))
    assert error.details == {"reason": "invalid"}
    assert "out of range" in error.message
