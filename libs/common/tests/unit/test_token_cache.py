"""VerifiedTokenCache: verified claims served until the token expires, bounded."""

import time

import pytest

from hive_common.auth import TokenClaims, TokenIssuer, TokenVerifier, VerifiedTokenCache
from hive_common.errors import Unauthenticated

SECRET = "s" * 32
AUDIENCE = "tickets-test"


class CountingVerifier(TokenVerifier):
    def __init__(self) -> None:
        super().__init__(secret=SECRET, audience=AUDIENCE, leeway_seconds=0)
        self.calls = 0

    def verify(self, token: str) -> TokenClaims:
        self.calls += 1
        return super().verify(token)


def _issuer(issued_at_offset: float = 0.0) -> TokenIssuer:
    return TokenIssuer(
        secret=SECRET,
        issuer="test",
        audience=AUDIENCE,
        clock=lambda: time.time() + issued_at_offset,
    )


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_a_verified_token_is_served_from_the_cache() -> None:
    verifier = CountingVerifier()
    cache = VerifiedTokenCache(verifier=verifier)
    token, _ = _issuer().issue_worker_token(worker_id="w-1", ttl_seconds=600)
    first = cache.verify_metadata(_bearer(token))
    second = cache.verify_metadata(_bearer(token))
    assert first == second
    assert first.worker_id == "w-1"
    assert verifier.calls == 1


def test_bad_and_missing_tokens_are_refused_and_not_cached() -> None:
    verifier = CountingVerifier()
    cache = VerifiedTokenCache(verifier=verifier)
    token, _ = _issuer().issue_worker_token(worker_id="w-1", ttl_seconds=600)
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            cache.verify_metadata(_bearer(tampered))
    assert verifier.calls == 2
    assert len(cache) == 0
    with pytest.raises(Unauthenticated):
        cache.verify_metadata([])


def test_an_expired_cached_token_is_refused() -> None:
    verifier = CountingVerifier()  # no leeway: refused as soon as exp has passed
    cache = VerifiedTokenCache(verifier=verifier)
    # Issued 59 s ago with a 60 s lifetime: expires within the next second.
    token, claims = _issuer(-59).issue_worker_token(worker_id="w-1", ttl_seconds=60)
    assert cache.verify(token) == claims
    assert len(cache) == 1
    while time.time() < claims.expires_at.timestamp() + 0.05:
        time.sleep(0.05)
    with pytest.raises(Unauthenticated) as refused:
        cache.verify(token)
    assert refused.value.details["reason"] == "expired"
    assert len(cache) == 0


def test_the_cache_is_bounded_and_evicts_the_least_recently_used() -> None:
    verifier = CountingVerifier()
    cache = VerifiedTokenCache(verifier=verifier, max_entries=2)
    issuer = _issuer()
    a, b, c = (issuer.issue_worker_token(worker_id=f"w-{n}", ttl_seconds=600)[0] for n in "abc")
    cache.verify(a)
    cache.verify(b)
    cache.verify(a)  # a is now the most recently used
    cache.verify(c)  # evicts b
    assert len(cache) == 2
    calls = verifier.calls
    cache.verify(a)
    assert verifier.calls == calls
    cache.verify(b)
    assert verifier.calls == calls + 1
