"""Every auth refusal of the registry (gRPC and HTTP)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from hive_common.auth import TokenIssuer
from neuralhive.registry.v1 import registry_service_pb2 as pb

if TYPE_CHECKING:  # conftest is not importable at run time (import mode importlib)
    from conftest import Registry, StartRegistry

pytestmark = pytest.mark.service

JWT_SECRET = "registry-service-tests-secret-0123456789abcdef"  # as in conftest
OTHER_SECRET = "some-other-secret-that-nobody-trusts-0123456789"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


def md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def call(registry: Registry, method: str, request: Any, metadata: Any) -> Any:
    rpc = getattr(registry.stub, method)
    if method == "WatchWorkers":
        stream = rpc(request, metadata=metadata)
        try:
            return await stream.read()
        finally:
            stream.cancel()
    return await rpc(request, metadata=metadata)


async def expect(code: grpc.StatusCode, coro: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await coro
    assert exc.value.code() == code, exc.value.details()


def requests_for(worker_id: str) -> dict[str, Any]:
    return {
        "Register": pb.RegisterRequest(name="x", capabilities=["python"], max_concurrent=1),
        "Heartbeat": pb.HeartbeatRequest(worker_id=worker_id),
        "Deregister": pb.DeregisterRequest(worker_id=worker_id),
        "DiscoverWorkers": pb.DiscoverWorkersRequest(),
        "GetWorker": pb.GetWorkerRequest(worker_id=worker_id),
        "ListWorkers": pb.ListWorkersRequest(),
        "WatchWorkers": pb.WatchWorkersRequest(),
    }


@pytest.mark.parametrize(
    "method",
    [
        "Register",
        "Heartbeat",
        "Deregister",
        "DiscoverWorkers",
        "GetWorker",
        "ListWorkers",
        "WatchWorkers",
    ],
)
async def test_bad_tokens_are_unauthenticated(registry: Registry, method: str) -> None:
    worker_id = (await registry.register("w1")).worker.worker_id
    tokens: dict[str, Callable[[], Any]] = {
        "missing": lambda: (),
        "not a jwt": lambda: md("abc.def"),
        "expired": lambda: md(
            TokenIssuer(
                secret=JWT_SECRET, issuer="hive-flow-c", clock=lambda: time.time() - 3600
            ).issue_worker_token(worker_id=worker_id, ttl_seconds=60)[0]
        ),
        "other secret": lambda: md(
            TokenIssuer(secret=OTHER_SECRET, issuer="hive-flow-c").issue_service_token(
                service="orchestrator", ttl_seconds=60
            )[0]
        ),
        "other issuer": lambda: md(
            TokenIssuer(secret=JWT_SECRET, issuer="elsewhere").issue_service_token(
                service="orchestrator", ttl_seconds=60
            )[0]
        ),
        "other audience": lambda: md(
            TokenIssuer(
                secret=JWT_SECRET, issuer="hive-flow-c", audience="elsewhere"
            ).issue_service_token(service="orchestrator", ttl_seconds=60)[0]
        ),
    }
    request = requests_for(worker_id)[method]
    for make_metadata in tokens.values():
        await expect(UNAUTHENTICATED, call(registry, method, request, make_metadata()))


@pytest.mark.parametrize(
    ("method", "holder"),
    [
        ("Register", "worker"),
        ("Register", "ticket"),
        ("Heartbeat", "service"),
        ("Heartbeat", "other worker"),
        ("Heartbeat", "ticket"),
        ("Deregister", "service"),
        ("Deregister", "other worker"),
        ("DiscoverWorkers", "worker"),
        ("DiscoverWorkers", "ticket"),
        ("ListWorkers", "worker"),
        ("WatchWorkers", "worker"),
    ],
)
async def test_wrong_holder_is_permission_denied(
    registry: Registry, method: str, holder: str
) -> None:
    worker_id = (await registry.register("w1")).worker.worker_id
    other_id = (await registry.register("w2")).worker.worker_id
    issuer = registry.issuer
    tokens: dict[str, Callable[[], Any]] = {
        "service": lambda: registry.service_md,
        "worker": lambda: registry.worker_md(worker_id),
        "other worker": lambda: registry.worker_md(other_id),
        "ticket": lambda: md(
            issuer.issue_ticket_token(
                worker_id=worker_id, ticket_id="t1", plan_id="p1", attempt=1, ttl_seconds=60
            )[0]
        ),
    }
    request = requests_for(worker_id)[method]
    await expect(DENIED, call(registry, method, request, tokens[holder]()))
    # Nothing changed: the worker is still there, healthy, not draining.
    got = await registry.stub.GetWorker(
        pb.GetWorkerRequest(worker_id=worker_id), metadata=registry.service_md
    )
    assert got.worker.status == pb.WORKER_STATUS_HEALTHY


async def test_draining_another_worker_is_denied(registry: Registry) -> None:
    worker_id = (await registry.register("w1")).worker.worker_id
    other_id = (await registry.register("w2")).worker.worker_id
    await expect(
        DENIED,
        registry.stub.Heartbeat(
            pb.HeartbeatRequest(worker_id=worker_id, draining=True),
            metadata=registry.worker_md(other_id),
        ),
    )
    got = await registry.stub.GetWorker(
        pb.GetWorkerRequest(worker_id=worker_id), metadata=registry.service_md
    )
    assert got.worker.status == pb.WORKER_STATUS_HEALTHY


async def test_get_worker_accepts_any_valid_token(registry: Registry) -> None:
    worker_id = (await registry.register("w1")).worker.worker_id
    other_id = (await registry.register("w2")).worker.worker_id
    ticket = registry.issuer.issue_ticket_token(
        worker_id=other_id, ticket_id="t", plan_id="p", attempt=0, ttl_seconds=60
    )[0]
    for metadata in (registry.service_md, registry.worker_md(other_id), md(ticket)):
        got = await registry.stub.GetWorker(
            pb.GetWorkerRequest(worker_id=worker_id), metadata=metadata
        )
        assert got.worker.name == "w1"


async def test_registration_secret(start_registry: StartRegistry) -> None:
    registry: Registry = await start_registry()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await registry.stub.Register(
            pb.RegisterRequest(name="w", capabilities=["x"], max_concurrent=1),
            metadata=md("wrong-registration-secret"),
        )
    assert refused.value.code() == UNAUTHENTICATED
    # Was "token is malformed": the worker sent a secret, not a token.
    assert refused.value.details() == (
        "not the registration secret (HIVE_REGISTRY_REGISTRATION_SECRET) nor a token"
    )
    # Where the secret is no use, a malformed token is still called that.
    await expect(
        UNAUTHENTICATED,
        registry.stub.ListWorkers(pb.ListWorkersRequest(), metadata=md("wrong-secret")),
    )
    # A worker token is refused naming what Register takes: the secret first.
    worker_id = (await registry.register("w1")).worker.worker_id
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await registry.stub.Register(
            pb.RegisterRequest(name="w", capabilities=["x"], max_concurrent=1),
            metadata=registry.worker_md(worker_id),
        )
    assert denied.value.code() == DENIED
    assert denied.value.details() == (
        "Register needs the registration secret (HIVE_REGISTRY_REGISTRATION_SECRET) or a "
        "service token; a worker token is not enough"
    )
    await registry.app.stop(0)

    # Without a configured secret, only the service token registers.
    closed: Registry = await start_registry(registration_secret=None)
    await expect(
        UNAUTHENTICATED,
        closed.stub.Register(
            pb.RegisterRequest(name="w", capabilities=["x"], max_concurrent=1),
            metadata=closed.secret_md,
        ),
    )
    ok = await closed.stub.Register(
        pb.RegisterRequest(name="w", capabilities=["x"], max_concurrent=1),
        metadata=closed.service_md,
    )
    assert ok.worker.name == "w"


@pytest.mark.parametrize(
    ("path", "holder", "status"),
    [
        ("/api/v1/workers", None, 401),
        ("/api/v1/workers", "garbage", 401),
        ("/api/v1/workers", "worker", 403),
        ("/api/v1/workers/{id}", None, 401),
        ("/api/v1/workers/{id}", "garbage", 401),
    ],
)
async def test_http_refusals(
    registry: Registry, path: str, holder: str | None, status: int
) -> None:
    worker_id = (await registry.register("w1")).worker.worker_id
    headers = {}
    if holder == "garbage":
        headers["authorization"] = "Bearer nope"
    elif holder == "worker":
        headers["authorization"] = dict(registry.worker_md(worker_id))["authorization"]
    response = await registry.http.get(path.replace("{id}", worker_id), headers=headers)
    assert response.status_code == status
    code = "UNAUTHENTICATED" if status == 401 else "PERMISSION_DENIED"
    assert response.json()["error"]["code"] == code


async def test_http_refuses_two_authorization_headers(registry: Registry) -> None:
    # As gRPC does: the first used to win silently.
    service = dict(registry.service_md)["authorization"]
    for values in ([service, "Bearer nope"], [service, service]):
        response = await registry.http.get(
            "/api/v1/workers", headers=[("authorization", v) for v in values]
        )
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["code"] == "UNAUTHENTICATED"
        assert error["message"] == "more than one authorization header"
    one = await registry.http.get("/api/v1/workers", headers=[("authorization", service)])
    assert one.status_code == 200
