"""JWT issuing and verification (PyJWT, HS256 with a shared secret).

Three kinds of token (DESIGN.md section 6):

* ``service``: held by a service (the orchestrator); ``sub`` is the service name.
* ``worker``: returned by Register; ``sub`` and ``worker_id`` are the worker id.
* ``ticket``: returned by GenerateToken; bound to one ``ticket_id``, ``plan_id`` and
  ``attempt``; ``sub`` and ``worker_id`` are the worker running that attempt.

Every token carries ``iss``, ``aud``, ``sub``, ``iat``, ``exp`` and a random ``jti``;
``kind`` and ``scope`` (space-separated, as in RFC 8693) are ours. Only ticket tokens are
issued with scopes (the ticket service's ``ticket:update``, part of its documented token
format); no service decides on them. Verification turns every kind of bad token into
:class:`~hive_common.errors.Unauthenticated` with a clear message and a machine-readable
``details["reason"]``. Deciding what a valid token may do (PERMISSION_DENIED) is the
caller's business.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import jwt

from hive_common.errors import Unauthenticated

ALGORITHM = "HS256"
DEFAULT_AUDIENCE = "neuralhive"
DEFAULT_ISSUER = "hive-flow-c"
"""The ``iss`` every service signs with and accepts unless configured otherwise."""
MIN_SECRET_BYTES = 32
"""RFC 7518 section 3.2: an HS256 key must be at least 256 bits."""
CLOCK_SKEW_LEEWAY_SECONDS = 5.0
"""How far apart the clocks of a token's signer and its verifier may be: a token is
accepted up to this long after its ``exp``, and with an ``iat`` up to this far in the
future. Every service verifies with it (``TokenVerifier``'s default)."""

_REGISTERED_CLAIMS = ("iss", "aud", "sub", "iat", "exp", "jti")


class TokenKind(StrEnum):
    """Who holds a token; decides which claims it must carry."""

    SERVICE = "service"
    WORKER = "worker"
    TICKET = "ticket"


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """The verified content of a token."""

    kind: TokenKind
    subject: str
    issuer: str
    audience: str
    jti: str
    issued_at: datetime
    expires_at: datetime
    scopes: frozenset[str] = field(default_factory=frozenset)
    worker_id: str | None = None
    ticket_id: str | None = None
    plan_id: str | None = None
    attempt: int | None = None


def _secret_bytes(secret: str | bytes) -> bytes:
    key = secret.encode() if isinstance(secret, str) else secret
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"JWT secret must be at least {MIN_SECRET_BYTES} bytes for {ALGORITHM}")
    return key


def _require_text(name: str, value: str) -> str:
    if not value or not value.strip():
        raise ValueError(f"{name} must not be empty")
    return value


class TokenIssuer:
    """Signs tokens for one issuer (a service name) and audience."""

    def __init__(
        self,
        *,
        secret: str | bytes,
        issuer: str,
        audience: str = DEFAULT_AUDIENCE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = _secret_bytes(secret)
        self._issuer = _require_text("issuer", issuer)
        self._audience = _require_text("audience", audience)
        self._clock = clock

    def issue_service_token(self, *, service: str, ttl_seconds: int) -> tuple[str, TokenClaims]:
        """A token for ``service`` (``sub`` = service name)."""
        return self._issue(
            kind=TokenKind.SERVICE,
            subject=_require_text("service", service),
            ttl_seconds=ttl_seconds,
            scopes=(),
        )

    def issue_worker_token(self, *, worker_id: str, ttl_seconds: int) -> tuple[str, TokenClaims]:
        """A token for a registered worker (``sub`` = ``worker_id``)."""
        _require_text("worker_id", worker_id)
        return self._issue(
            kind=TokenKind.WORKER,
            subject=worker_id,
            ttl_seconds=ttl_seconds,
            scopes=(),
            worker_id=worker_id,
        )

    def issue_ticket_token(
        self,
        *,
        worker_id: str,
        ticket_id: str,
        plan_id: str,
        attempt: int,
        ttl_seconds: int,
        scopes: Iterable[str] = (),
    ) -> tuple[str, TokenClaims]:
        """A token for one attempt of one ticket, held by ``worker_id``."""
        _require_text("worker_id", worker_id)
        _require_text("ticket_id", ticket_id)
        _require_text("plan_id", plan_id)
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
            raise ValueError("attempt must be a non-negative integer")
        return self._issue(
            kind=TokenKind.TICKET,
            subject=worker_id,
            ttl_seconds=ttl_seconds,
            scopes=scopes,
            worker_id=worker_id,
            ticket_id=ticket_id,
            plan_id=plan_id,
            attempt=attempt,
        )

    def _issue(
        self,
        *,
        kind: TokenKind,
        subject: str,
        ttl_seconds: int,
        scopes: Iterable[str],
        worker_id: str | None = None,
        ticket_id: str | None = None,
        plan_id: str | None = None,
        attempt: int | None = None,
    ) -> tuple[str, TokenClaims]:
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        scope_set = frozenset(scopes)
        if any(not s or " " in s for s in scope_set):
            raise ValueError("scopes must be non-empty and contain no spaces")
        # Whole seconds: JWT NumericDate, so the returned claims equal the verified ones.
        issued = int(self._clock())
        claims = TokenClaims(
            kind=kind,
            subject=subject,
            issuer=self._issuer,
            audience=self._audience,
            jti=str(uuid.uuid4()),
            issued_at=datetime.fromtimestamp(issued, UTC),
            expires_at=datetime.fromtimestamp(issued + int(ttl_seconds), UTC),
            scopes=scope_set,
            worker_id=worker_id,
            ticket_id=ticket_id,
            plan_id=plan_id,
            attempt=attempt,
        )
        payload: dict[str, Any] = {
            "iss": claims.issuer,
            "aud": claims.audience,
            "sub": claims.subject,
            "iat": issued,
            "exp": issued + int(ttl_seconds),
            "jti": claims.jti,
            "kind": kind.value,
            "scope": " ".join(sorted(scope_set)),
        }
        for name, value in (
            ("worker_id", worker_id),
            ("ticket_id", ticket_id),
            ("plan_id", plan_id),
            ("attempt", attempt),
        ):
            if value is not None:
                payload[name] = value
        return jwt.encode(payload, self._key, algorithm=ALGORITHM), claims


def _refuse(reason: str, message: str) -> Unauthenticated:
    return Unauthenticated(message, details={"reason": reason})


_KINDS_BY_VALUE: dict[str, TokenKind] = {k.value: k for k in TokenKind}

_REQUIRED_BY_KIND: dict[TokenKind, tuple[str, ...]] = {
    TokenKind.SERVICE: (),
    TokenKind.WORKER: ("worker_id",),
    TokenKind.TICKET: ("worker_id", "ticket_id", "plan_id", "attempt"),
}


class TokenVerifier:
    """Verifies tokens signed with the shared secret for one audience.

    ``issuers``, when given, restricts which ``iss`` values are accepted.
    ``leeway_seconds`` (:data:`CLOCK_SKEW_LEEWAY_SECONDS`) tolerates clock skew on ``exp``
    and ``iat``. Tokens signed with one of ``accepted_secrets`` are valid too (a secret
    being rotated in or out; only ``secret`` signs).
    """

    def __init__(
        self,
        *,
        secret: str | bytes,
        audience: str = DEFAULT_AUDIENCE,
        leeway_seconds: float = CLOCK_SKEW_LEEWAY_SECONDS,
        issuers: Iterable[str] | None = None,
        accepted_secrets: Iterable[str | bytes] = (),
    ) -> None:
        if leeway_seconds < 0:
            raise ValueError("leeway_seconds must not be negative")
        self._keys = (_secret_bytes(secret), *map(_secret_bytes, accepted_secrets))
        self._audience = _require_text("audience", audience)
        self._leeway = leeway_seconds
        self._issuers = frozenset(issuers) if issuers is not None else None

    def verify(self, token: str) -> TokenClaims:
        """The claims of ``token``; :class:`Unauthenticated` for any bad token."""
        payload = self._decode(token)
        return self._claims(payload)

    def verify_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> TokenClaims:
        """Verify the bearer token of gRPC invocation metadata; a missing token is refused."""
        token = bearer_token_from_metadata(metadata)
        if token is None:
            raise _refuse("missing", "missing 'authorization: Bearer <token>' metadata")
        return self.verify(token)

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            payload = self._decode_with_any_key(token)
        except jwt.ExpiredSignatureError as exc:
            raise _refuse("expired", "token has expired") from exc
        except jwt.InvalidSignatureError as exc:
            raise _refuse("bad_signature", "token signature is invalid") from exc
        except jwt.InvalidAlgorithmError as exc:
            raise _refuse("bad_algorithm", f"token algorithm is not {ALGORITHM}") from exc
        except jwt.InvalidAudienceError as exc:
            raise _refuse(
                "wrong_audience", f"token is not meant for audience {self._audience!r}"
            ) from exc
        except jwt.MissingRequiredClaimError as exc:
            raise _refuse("missing_claim", f"token lacks the {exc.claim!r} claim") from exc
        except jwt.ImmatureSignatureError as exc:
            raise _refuse("not_yet_valid", "token is issued in the future") from exc
        except jwt.DecodeError as exc:
            raise _refuse("malformed", "token is malformed") from exc
        except jwt.InvalidTokenError as exc:
            raise _refuse("invalid", f"token is invalid: {exc}") from exc
        return payload

    def _decode_with_any_key(self, token: str) -> dict[str, Any]:
        """The payload of ``token`` checked with the first key that signed it (the signing
        secret first); PyJWT's errors as they are."""
        *others, last = self._keys
        for key in others:
            try:
                return self._decode_with(token, key)
            except jwt.InvalidSignatureError:
                continue
        return self._decode_with(token, last)

    def _decode_with(self, token: str, key: bytes) -> dict[str, Any]:
        payload: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=self._audience,
            leeway=self._leeway,
            options={"require": list(_REGISTERED_CLAIMS), "verify_iss": False},
        )
        return payload

    def _claims(self, payload: dict[str, Any]) -> TokenClaims:
        issuer = payload["iss"]
        if not isinstance(issuer, str):
            raise _refuse("invalid", "token issuer must be a string")
        if self._issuers is not None and issuer not in self._issuers:
            raise _refuse("wrong_issuer", f"token issuer {issuer!r} is not trusted")
        raw_kind = payload.get("kind")
        if not isinstance(raw_kind, str) or raw_kind not in _KINDS_BY_VALUE:
            raise _refuse("unknown_kind", f"token kind {raw_kind!r} is unknown")
        kind = _KINDS_BY_VALUE[raw_kind]
        for name in _REQUIRED_BY_KIND[kind]:
            if payload.get(name) is None:
                raise _refuse("missing_claim", f"{kind} token lacks the {name!r} claim")
        subject = payload["sub"]
        jti = payload["jti"]
        scope = payload.get("scope", "")
        attempt = payload.get("attempt")
        text_claims = {
            "sub": subject,
            "jti": jti,
            "scope": scope,
            **{n: payload.get(n) for n in ("worker_id", "ticket_id", "plan_id")},
        }
        for name, value in text_claims.items():
            if value is not None and not isinstance(value, str):
                raise _refuse("invalid", f"token claim {name!r} must be a string")
        if not subject:
            raise _refuse("invalid", "token subject is empty")
        if attempt is not None and (
            isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0
        ):
            raise _refuse("invalid", "token claim 'attempt' must be a non-negative integer")
        if kind is not TokenKind.SERVICE and payload["worker_id"] != subject:
            raise _refuse("invalid", f"{kind} token subject does not match its worker_id")
        return TokenClaims(
            kind=kind,
            subject=subject,
            issuer=issuer,
            audience=self._audience,
            jti=jti,
            issued_at=_instant(payload["iat"], "iat"),
            expires_at=_instant(payload["exp"], "exp"),
            scopes=frozenset(scope.split()),
            worker_id=payload.get("worker_id"),
            ticket_id=payload.get("ticket_id"),
            plan_id=payload.get("plan_id"),
            attempt=attempt,
        )


def _instant(value: Any, name: str) -> datetime:
    """A NumericDate claim as a datetime; PyJWT checked it is a number, not that a
    datetime can hold it (``exp: 1e300`` is a well-formed, signed, useless token)."""
    try:
        return datetime.fromtimestamp(int(value), UTC)
    except (OverflowError, OSError, ValueError):
        raise _refuse("invalid", f"token claim {name!r} is out of range") from None


BEARER_TOKEN_RULE = "printable ASCII without whitespace"
"""What a token must be to be sent as ``Authorization: Bearer <token>`` as it is."""


def is_bearer_token(token: str) -> bool:
    """True if ``token`` can be sent as ``Authorization: Bearer <token>`` and read back
    whole (:data:`BEARER_TOKEN_RULE`): a space splits it, another character is not sent
    as it is. The rule of every token a client sends and a service is configured with."""
    return bool(token) and all(33 <= ord(c) <= 126 for c in token)


def bearer_token_from_metadata(
    metadata: Iterable[tuple[str, str | bytes]] | None,
) -> str | None:
    """The token of the ``authorization: Bearer <jwt>`` entry of gRPC metadata.

    ``None`` when there is no ``authorization`` entry; :class:`Unauthenticated` when the
    entry is repeated, uses another scheme (the scheme is case-insensitive) or has no
    token.
    """
    values = [value for key, value in (metadata or ()) if key.lower() == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise _refuse("malformed_header", "more than one authorization header")
    raw = values[0]
    header = raw.decode("ascii", errors="replace") if isinstance(raw, bytes) else raw
    parts = header.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise _refuse("malformed_header", "authorization header must be 'Bearer <token>'")
    return parts[1]


class VerifiedTokenCache:
    """Verified claims by token string, until the token's expiry; a bounded LRU.

    Clients send the same token on every call, and decoding and checking an HS256 JWT
    was a large part of a small RPC's CPU time. A token is only ever cached after the
    verifier accepted it, and is served from the cache only before its ``exp``: after
    that the verifier decides again (and refuses it once its leeway has passed too).
    """

    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._verifier = verifier
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[TokenClaims, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def verify_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> TokenClaims:
        """As :meth:`TokenVerifier.verify_metadata`, from the cache when possible."""
        token = bearer_token_from_metadata(metadata)
        if token is None:
            return self._verifier.verify_metadata(metadata)  # refuses: missing token
        return self.verify(token)

    def verify(self, token: str) -> TokenClaims:
        """As :meth:`TokenVerifier.verify`, from the cache when possible."""
        now = self._clock()
        cached = self._entries.get(token)
        if cached is not None:
            claims, expires_at = cached
            if now < expires_at:
                self._entries.move_to_end(token)
                return claims
            del self._entries[token]
        claims = self._verifier.verify(token)
        expires_at = claims.expires_at.timestamp()
        if now < expires_at:
            self._entries[token] = (claims, expires_at)
            if len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return claims


__all__ = [
    "ALGORITHM",
    "BEARER_TOKEN_RULE",
    "DEFAULT_AUDIENCE",
    "MIN_SECRET_BYTES",
    "TokenClaims",
    "TokenIssuer",
    "TokenKind",
    "TokenVerifier",
    "VerifiedTokenCache",
    "bearer_token_from_metadata",
    "is_bearer_token",
]
