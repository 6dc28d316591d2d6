"""Token checks shared by the gRPC interceptor and the HTTP routes."""

from __future__ import annotations

import hmac

from hive_common.auth import TokenClaims, TokenKind, TokenVerifier, VerifiedTokenCache
from hive_common.errors import PermissionDenied, Unauthenticated

SECRET_SETTING = "HIVE_REGISTRY_REGISTRATION_SECRET"
"""Where an operator sets the registration secret, named in refusals."""


class Authorizer:
    """Checks one bearer token against the allowed kinds (shared by gRPC and HTTP).

    ``None`` among the allowed kinds admits the registration secret. Every refusal says
    what the call needs (the registration secret where it would do, and whether this
    registry has one), so a caller with the wrong credential learns which one to use.
    """

    def __init__(self, *, verifier: TokenVerifier, registration_secret: str | None) -> None:
        # Workers and the orchestrator send the same token on every call.
        self._tokens = VerifiedTokenCache(verifier=verifier)
        self._secret = registration_secret.encode() if registration_secret else None

    def authorize(
        self, token: str | None, allowed: frozenset[TokenKind | None], action: str
    ) -> TokenClaims | None:
        if token is None:
            raise Unauthenticated(
                f"missing 'authorization: Bearer <token>': {self._needs(allowed, action)}",
                details={"reason": "missing"},
            )
        is_secret = self._secret is not None and hmac.compare_digest(token.encode(), self._secret)
        if is_secret and None in allowed:
            return None
        try:
            claims = self._tokens.verify(token)
        except Unauthenticated as exc:
            if exc.details.get("reason") != "malformed":
                raise
            if is_secret:
                # What a worker sends when it uses the secret for everything.
                raise Unauthenticated(
                    f"the registration secret only opens Register: {self._needs(allowed, action)}",
                    details={"reason": "registration_secret"},
                ) from exc
            if None in allowed:
                # Not a JWT at all: what a worker with a wrong (or no usable) secret sends.
                if self._secret is None:
                    raise Unauthenticated(
                        "not a token, and this registry has no registration secret "
                        f"({SECRET_SETTING} is unset): {action} needs a service token",
                        details={"reason": "no_registration_secret"},
                    ) from exc
                raise Unauthenticated(
                    f"not the registration secret ({SECRET_SETTING}) nor a token",
                    details={"reason": "bad_registration_secret"},
                ) from exc
            raise
        if claims.kind not in allowed:
            needs = self._needs(allowed, action)
            kind = claims.kind.value
            raise PermissionDenied(
                f"{needs}; a {kind} token is not enough"
                if None in allowed
                else f"{needs}, not a {kind} token",
                details={"token_kind": kind},
            )
        return claims

    def _needs(self, allowed: frozenset[TokenKind | None], action: str) -> str:
        """What ``action`` needs, e.g. "Heartbeat needs a worker token (...)"."""
        kinds = sorted(k.value for k in allowed if k is not None)
        spelled = kinds[-1] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"
        token = f"a {spelled} token"
        if kinds == [TokenKind.WORKER.value]:
            token += " (the one Register returns)"
        if None not in allowed:
            return f"{action} needs {token}"
        if self._secret is None:
            return (
                f"{action} needs {token} (this registry has no registration secret: "
                f"{SECRET_SETTING} is unset)"
            )
        return f"{action} needs the registration secret ({SECRET_SETTING}) or {token}"
