"""The registry's one auth interceptor: who may call which RPC.

* Register: the service token, or the registration secret (``Bearer <secret>``) that
  operators hand to workers so they can join (DESIGN.md section 6: secrets from config).
* Heartbeat, Deregister (and draining, which is a Heartbeat flag): a worker token; the
  servicer then checks it names the request's worker_id (:func:`require_worker`),
  because an interceptor does not see request messages.
* DiscoverWorkers, ListWorkers, WatchWorkers: the service token.
* GetWorker: any valid token (service, worker or ticket).

Health and reflection need no token. Verified claims are kept in a contextvar for the
RPC's own task.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from typing import Any

from hive_common.auth import TokenClaims, TokenKind, bearer_token_from_metadata
from hive_common.errors import PermissionDenied
from hive_common.grpc_server import HandlerWrappingInterceptor, RpcCall
from service_registry.transport.authorization import Authorizer

SERVICE_PREFIX = "/neuralhive.registry.v1.ServiceRegistry/"

# None in the allowed kinds means "the registration secret is accepted".
_ANY = frozenset({TokenKind.SERVICE, TokenKind.WORKER, TokenKind.TICKET})
RULES: dict[str, frozenset[TokenKind | None]] = {
    "Register": frozenset({TokenKind.SERVICE, None}),
    "Heartbeat": frozenset({TokenKind.WORKER}),
    "Deregister": frozenset({TokenKind.WORKER}),
    "DiscoverWorkers": frozenset({TokenKind.SERVICE}),
    "ListWorkers": frozenset({TokenKind.SERVICE}),
    "WatchWorkers": frozenset({TokenKind.SERVICE}),
    "GetWorker": frozenset(_ANY),
}

_current_caller: ContextVar[TokenClaims | None] = ContextVar("registry_caller", default=None)


def current_caller() -> TokenClaims | None:
    """The verified token of the current RPC; None when it used the registration secret."""
    return _current_caller.get()


def require_worker(worker_id: str) -> None:
    """PERMISSION_DENIED unless the current caller is the worker ``worker_id`` itself."""
    claims = current_caller()
    if claims is None or claims.kind is not TokenKind.WORKER or claims.worker_id != worker_id:
        raise PermissionDenied(
            "a worker may only heartbeat, drain or deregister itself",
            details={"worker_id": worker_id},
        )


class RegistryAuthInterceptor(HandlerWrappingInterceptor):
    def __init__(self, *, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    def around(
        self, call: RpcCall, context: Any, request: Any
    ) -> AbstractAsyncContextManager[None]:
        return self._around(call)

    @asynccontextmanager
    async def _around(self, call: RpcCall) -> AsyncIterator[None]:
        if not call.method.startswith(SERVICE_PREFIX):
            yield  # health, reflection
            return
        method = call.method.removeprefix(SERVICE_PREFIX)
        allowed = RULES.get(method)
        if allowed is None:  # a method added to the contract but not to RULES: refuse
            raise PermissionDenied(f"no access rule for {method}")
        claims = self._authorizer.authorize(
            bearer_token_from_metadata(call.metadata), allowed, method
        )
        # Set in the RPC's own task context, which ends with the RPC: no reset (a response
        # stream closed early is finalized by asyncio in another context, where a reset
        # would raise).
        _current_caller.set(claims)
        yield
