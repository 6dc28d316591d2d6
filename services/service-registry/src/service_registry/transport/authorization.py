"""Token checks shared by the gRPC interceptor and the HTTP routes."""

from __future__ import annotations

import hmac

from hive_common.auth import TokenClaims, TokenKind, TokenVerifier, VerifiedTokenCache
from hive_common.errors import PermissionDenied, Unauthenticated


class Authorizer:
    """Checks one bearer token against the allowed kinds (shared by gRPC and HTTP)."""

    def __init__(self, *, verifier: TokenVerifier, registration_secret: str | None) -> None:
        # Workers and the orchestrator send the same token on every call.
        self._tokens = VerifiedTokenCache(verifier=verifier)
        self._secret = registration_secret.encode() if registration_secret else None

    def authorize(
        self, token: str | None, allowed: frozenset[TokenKind | None], action: str
    ) -> TokenClaims | None:
        if token is None:
            raise Unauthenticated(
                "missing 'authorization: Bearer <token>'", details={"reason": "missing"}
            )
        if (
            None in allowed
            and self._secret is not None
            and hmac.compare_digest(token.encode(), self._secret)
        ):
            return None
        try:
            claims = self._tokens.verify(token)
        except Unauthenticated as exc:
            if None in allowed and exc.details.get("reason") == "malformed":
                # Not a JWT at all: what a worker with a wrong secret sends.
                raise Unauthenticated(
                    "not the registration secret (nor a token)",
                    details={"reason": "bad_registration_secret"},
                ) from exc
            raise
        if claims.kind not in allowed:
            kinds = sorted(k.value for k in allowed if k is not None)
            raise PermissionDenied(
                f"{action} needs a {' or '.join(kinds)} token, not a {claims.kind.value} token",
                details={"token_kind": claims.kind.value},
            )
        return claims
