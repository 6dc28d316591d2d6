"""Register / heartbeat / unhealthy / recover / expire, draining, deregister, watch, restart."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest

from hive_common.errors import HiveError
from hive_common.grpc_errors import from_rpc_error
from hive_common.postgres import LOCK_TIMEOUT_MS
from hive_testsupport.outage import UnreachablePool
from neuralhive.registry.v1 import registry_service_pb2 as pb

if TYPE_CHECKING:  # conftest is not importable at run time (import mode importlib)
    from conftest import Registry, StartRegistry

pytestmark = pytest.mark.service

HEALTHY = pb.WORKER_STATUS_HEALTHY
UNHEALTHY = pb.WORKER_STATUS_UNHEALTHY
DRAINING = pb.WORKER_STATUS_DRAINING


async def get_status(registry: Registry, worker_id: str) -> int:
    response = await registry.stub.GetWorker(
        pb.GetWorkerRequest(worker_id=worker_id), metadata=registry.service_md
    )
    return int(response.worker.status)


async def test_register_is_idempotent_on_namespace_and_name(registry: Registry) -> None:
    first = await registry.register(
        "host-1", capabilities=["python", "gpu"], labels={"zone": "a"}, version="1.0"
    )
    assert first.worker.worker_id
    assert first.token
    assert first.heartbeat_interval_seconds == 5
    assert first.token_expires_at.seconds > 0
    assert first.worker.namespace == "default"
    assert list(first.worker.capabilities) == ["gpu", "python"]
    assert first.worker.status == HEALTHY

    registry.clock.advance(2)
    again = await registry.register(
        "host-1", capabilities=["python"], max_concurrent=8, version="1.1"
    )
    assert again.worker.worker_id == first.worker.worker_id
    assert again.worker.max_concurrent == 8
    assert list(again.worker.capabilities) == ["python"]
    assert again.worker.registered_at == first.worker.registered_at

    other_ns = await registry.register("host-1", namespace="batch")
    assert other_ns.worker.worker_id != first.worker.worker_id

    # The service token may register too.
    by_service = await registry.stub.Register(
        pb.RegisterRequest(name="host-2", capabilities=["x"], max_concurrent=1),
        metadata=registry.service_md,
    )
    assert by_service.worker.worker_id


async def test_health_timeline_with_watch_events_in_order(registry: Registry) -> None:
    watch = await registry.open_watch()
    worker_id = (await registry.register("w1")).worker.worker_id

    # On time: stays healthy.
    registry.clock.advance(5)
    assert (await registry.heartbeat(worker_id, in_flight=1)).worker.status == HEALTHY
    registry.clock.advance(15)  # exactly 3 intervals: still healthy
    assert await get_status(registry, worker_id) == HEALTHY
    await registry.sweep()

    # Missed 3 intervals: UNHEALTHY (immediately on reads, announced by the sweeper).
    registry.clock.advance(1)
    assert await get_status(registry, worker_id) == UNHEALTHY
    result = await registry.sweep()
    assert [w.name for w in result.unhealthy] == ["w1"]
    assert (await registry.sweep()).unhealthy == []  # announced once

    # Recovers on its next heartbeat.
    registry.clock.advance(10)
    assert (await registry.heartbeat(worker_id, in_flight=0)).worker.status == HEALTHY

    # Silent past the TTL: the sweeper expires it; heartbeats then get NOT_FOUND.
    registry.clock.advance(61)
    result = await registry.sweep()
    assert [w.name for w in result.expired] == ["w1"]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await registry.heartbeat(worker_id, in_flight=0)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await get_status(registry, worker_id)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND

    # It must register again, and gets a new identity.
    again = await registry.register("w1")
    assert again.worker.worker_id != worker_id

    assert await registry.next_events(watch, 5) == [
        ("WORKER_EVENT_TYPE_REGISTERED", "w1"),
        ("WORKER_EVENT_TYPE_UNHEALTHY", "w1"),
        ("WORKER_EVENT_TYPE_UPDATED", "w1"),
        ("WORKER_EVENT_TYPE_EXPIRED", "w1"),
        ("WORKER_EVENT_TYPE_REGISTERED", "w1"),
    ]
    watch.cancel()


async def test_expired_but_not_swept_worker_is_expired_on_contact(registry: Registry) -> None:
    watch = await registry.open_watch()
    old = (await registry.register("w1")).worker.worker_id
    registry.clock.advance(61)  # no sweep: the heartbeat itself notices
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await registry.heartbeat(old, in_flight=0)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND

    lagging = (await registry.register("w2")).worker.worker_id
    registry.clock.advance(61)
    again = await registry.register("w2")  # registering the expired name: new identity
    assert again.worker.worker_id != lagging
    assert await registry.next_events(watch, 5) == [
        ("WORKER_EVENT_TYPE_REGISTERED", "w1"),
        ("WORKER_EVENT_TYPE_EXPIRED", "w1"),
        ("WORKER_EVENT_TYPE_REGISTERED", "w2"),
        ("WORKER_EVENT_TYPE_EXPIRED", "w2"),
        ("WORKER_EVENT_TYPE_REGISTERED", "w2"),
    ]
    watch.cancel()


async def test_mass_expiry_is_visible(registry: Registry) -> None:
    for i in range(4):
        await registry.register(f"w{i}")
    survivor = (await registry.register("survivor")).worker.worker_id
    registry.clock.advance(60)
    await registry.heartbeat(survivor, in_flight=0)
    registry.clock.advance(5)
    result = await registry.sweep()
    assert sorted(w.name for w in result.expired) == ["w0", "w1", "w2", "w3"]
    metrics = (await registry.http.get("/metrics")).text
    assert 'hive_registry_mass_transitions_total{transition="expired"} 1.0' in metrics
    assert 'hive_registry_worker_events_total{type="EXPIRED"} 4.0' in metrics
    assert 'hive_registry_workers{status="HEALTHY"} 1.0' in metrics


async def test_draining_is_sticky_and_cleared_by_registering_again(registry: Registry) -> None:
    watch = await registry.open_watch()
    worker_id = (await registry.register("w1")).worker.worker_id
    drained = await registry.heartbeat(worker_id, in_flight=2, draining=True)
    assert drained.worker.status == DRAINING
    registry.clock.advance(3)
    still = await registry.heartbeat(worker_id, in_flight=1, draining=False)
    assert still.worker.status == DRAINING
    found = await registry.stub.DiscoverWorkers(
        pb.DiscoverWorkersRequest(required_capabilities=["python"]), metadata=registry.service_md
    )
    assert list(found.workers) == []

    again = await registry.register("w1")
    assert again.worker.worker_id == worker_id
    assert again.worker.status == HEALTHY
    assert await registry.next_events(watch, 3) == [
        ("WORKER_EVENT_TYPE_REGISTERED", "w1"),
        ("WORKER_EVENT_TYPE_DRAINING", "w1"),
        ("WORKER_EVENT_TYPE_UPDATED", "w1"),
    ]
    watch.cancel()


async def test_deregister_removes_and_is_idempotent(registry: Registry) -> None:
    watch = await registry.open_watch()
    worker_id = (await registry.register("w1")).worker.worker_id
    md = registry.worker_md(worker_id)
    await registry.stub.Deregister(pb.DeregisterRequest(worker_id=worker_id), metadata=md)
    await registry.stub.Deregister(pb.DeregisterRequest(worker_id=worker_id), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await get_status(registry, worker_id)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await registry.heartbeat(worker_id, in_flight=0)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    assert await registry.next_events(watch, 2) == [
        ("WORKER_EVENT_TYPE_REGISTERED", "w1"),
        ("WORKER_EVENT_TYPE_DEREGISTERED", "w1"),
    ]
    watch.cancel()


async def test_watch_filters_by_namespace(registry: Registry) -> None:
    watch = await registry.open_watch(namespace="batch")
    await registry.register("a", namespace="default")
    await registry.register("b", namespace="batch")
    await registry.register("c", namespace="default")
    await registry.register("d", namespace="batch")
    assert await registry.next_events(watch, 2) == [
        ("WORKER_EVENT_TYPE_REGISTERED", "b"),
        ("WORKER_EVENT_TYPE_REGISTERED", "d"),
    ]
    watch.cancel()


async def test_a_heartbeat_racing_another_write_is_decided_again_on_the_written_row(
    registry: Registry, postgres_dsn: str
) -> None:
    worker_id = (await registry.register("w1")).worker.worker_id
    watch = await registry.open_watch()
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as other:
        # What the sweeper writes, not committed yet: the worker was announced UNHEALTHY.
        await other.execute(
            "UPDATE workers SET marked_unhealthy = true WHERE worker_id = %s", (worker_id,)
        )
        beat = asyncio.create_task(registry.heartbeat(worker_id, in_flight=2))
        await asyncio.sleep(0.3)  # it read the row as committed and waits for the lock
        assert not beat.done()
        await other.commit()
    assert (await beat).worker.in_flight == 2
    # Decided again on the row as written: the recovery is published.
    assert await registry.next_events(watch, 1) == [("WORKER_EVENT_TYPE_UPDATED", "w1")]
    watch.cancel()


async def test_heartbeat_counters_are_cumulative(registry: Registry) -> None:
    worker_id = (await registry.register("w1")).worker.worker_id
    r = await registry.heartbeat(worker_id, in_flight=3, succeeded_total=10, failed_total=2)
    assert (r.worker.in_flight, r.worker.succeeded_total, r.worker.failed_total) == (3, 10, 2)
    r = await registry.heartbeat(worker_id, in_flight=1)  # absent counters: unchanged
    assert (r.worker.in_flight, r.worker.succeeded_total, r.worker.failed_total) == (1, 10, 2)


async def test_restart_keeps_registrations(start_registry: StartRegistry) -> None:
    first = await start_registry()
    registered = await first.register("w1", labels={"zone": "a"})
    worker_id = registered.worker.worker_id
    await first.heartbeat(worker_id, in_flight=2, succeeded_total=5)
    await first.app.stop(0)

    second = await start_registry()
    got = await second.stub.GetWorker(
        pb.GetWorkerRequest(worker_id=worker_id), metadata=second.service_md
    )
    assert got.worker.name == "w1"
    assert got.worker.in_flight == 2
    assert got.worker.succeeded_total == 5
    assert dict(got.worker.labels) == {"zone": "a"}
    # The token from before the restart still works.
    response = await second.stub.Heartbeat(
        pb.HeartbeatRequest(worker_id=worker_id, in_flight=0),
        metadata=(("authorization", f"Bearer {registered.token}"),),
    )
    assert response.worker.status == HEALTHY


async def test_invalid_registration_reports_every_field(registry: Registry) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await registry.stub.Register(
            pb.RegisterRequest(
                name="bad name",
                namespace="UPPER",
                capabilities=["ok", "no spaces"],
                labels={"bad key": "v"},
                max_concurrent=0,
            ),
            metadata=registry.secret_md,
        )
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(exc.value)
    assert {v.field for v in error.violations} == {
        "name",
        "namespace",
        "capabilities[1]",
        "labels[bad key]",
        "max_concurrent",
    }
    listed = await registry.stub.ListWorkers(pb.ListWorkersRequest(), metadata=registry.service_md)
    assert list(listed.workers) == []


NUL = "\x00"


async def test_nul_and_forged_page_tokens_are_invalid_argument(registry: Registry) -> None:
    # PostgreSQL cannot store NUL: these used to reach it and come back INTERNAL.
    forged = base64.urlsafe_b64encode(json.dumps(["default", f"a{NUL}"]).encode()).decode()
    calls = [
        (
            registry.stub.Register(
                pb.RegisterRequest(
                    name="w1", capabilities=["python"], max_concurrent=1, version=f"v{NUL}1"
                ),
                metadata=registry.secret_md,
            ),
            "version",
        ),
        (
            registry.stub.Register(
                pb.RegisterRequest(
                    name="w1", capabilities=["python"], max_concurrent=1, labels={"k": f"a{NUL}"}
                ),
                metadata=registry.secret_md,
            ),
            "labels[k]",
        ),
        (
            registry.stub.DiscoverWorkers(
                pb.DiscoverWorkersRequest(label_selector={"k": f"a{NUL}"}),
                metadata=registry.service_md,
            ),
            "label_selector[k]",
        ),
        (
            registry.stub.ListWorkers(
                pb.ListWorkersRequest(page_token=forged.rstrip("=")),
                metadata=registry.service_md,
            ),
            "page_token",
        ),
    ]
    for call, field in calls:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
        assert [v.field for v in from_rpc_error(exc.value).violations] == [field]
    listed = await registry.stub.ListWorkers(pb.ListWorkersRequest(), metadata=registry.service_md)
    assert list(listed.workers) == []


async def test_long_invalid_label_keys_are_invalid_argument(registry: Registry) -> None:
    # The violations travel in a trailer that clients refuse beyond 16 KiB (the call then
    # failed with RESOURCE_EXHAUSTED "Stream removed"): echoed keys are shortened.
    huge_key = "k" * 20_000 + "-"
    many_keys = {f"k{i:02d}" + "_" * 600 + "-": "v" for i in range(32)}
    for labels in ({huge_key: "v"}, many_keys):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await registry.register("w1", labels=labels)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
        violations = from_rpc_error(exc.value).violations
        assert all(len(v.field) <= len("labels[]") + 65 for v in violations)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await registry.stub.DiscoverWorkers(
            pb.DiscoverWorkersRequest(label_selector={huge_key: "v"}),
            metadata=registry.service_md,
        )
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
    assert [v.field for v in from_rpc_error(exc.value).violations] == [
        "label_selector[" + "k" * 64 + "\u2026]"
    ]


async def test_expiry_on_contact_is_counted(registry: Registry) -> None:
    by_heartbeat = (await registry.register("w1")).worker.worker_id
    by_deregister = (await registry.register("w2")).worker.worker_id
    registry.clock.advance(61)  # no sweep: the calls themselves expire the workers
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await registry.heartbeat(by_heartbeat, in_flight=0)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    await registry.stub.Deregister(
        pb.DeregisterRequest(worker_id=by_deregister), metadata=registry.worker_md(by_deregister)
    )
    metrics = (await registry.http.get("/metrics")).text
    assert 'hive_registry_worker_events_total{type="EXPIRED"} 2.0' in metrics
    assert 'hive_registry_worker_events_total{type="DEREGISTERED"} 0.0' in metrics
    assert 'hive_registry_heartbeats_total{outcome="not_found"} 1.0' in metrics


async def test_invalid_watch_namespace(registry: Registry) -> None:
    call = registry.stub.WatchWorkers(
        pb.WatchWorkersRequest(namespace="BAD"), metadata=registry.service_md
    )
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call.read()
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details() == "invalid watch request"
    assert [v.field for v in from_rpc_error(exc.value).violations] == ["namespace"]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"worker_id": "not-a-uuid"}, "worker_id"),
        ({"in_flight": -1}, "in_flight"),
    ],
)
async def test_invalid_heartbeat(
    registry: Registry, request_fields: dict[str, Any], field: str
) -> None:
    worker_id = (await registry.register("w1")).worker.worker_id
    fields = {"worker_id": worker_id, "in_flight": 0, **request_fields}
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await registry.stub.Heartbeat(
            pb.HeartbeatRequest(**fields), metadata=registry.worker_md(worker_id)
        )
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in from_rpc_error(exc.value).violations] == [field]


async def test_two_replicas_sweep_each_worker_once(start_registry: StartRegistry) -> None:
    first = await start_registry()
    second = await start_registry()
    watch = await first.open_watch()
    for i in range(6):
        await first.register(f"w{i}")
    first.clock.advance(61)
    a, b = await asyncio.gather(first.sweep(), second.sweep())
    expired = sorted(w.name for w in a.expired + b.expired)
    assert expired == [f"w{i}" for i in range(6)]
    events = await first.next_events(watch, 12)
    assert sorted(events[6:]) == [("WORKER_EVENT_TYPE_EXPIRED", f"w{i}") for i in range(6)]
    # Nothing more: no worker was expired twice.
    third = await second.register("late")
    assert await first.next_events(watch, 1) == [("WORKER_EVENT_TYPE_REGISTERED", "late")]
    assert third.worker.worker_id
    watch.cancel()


async def test_concurrent_registrations_of_one_name_agree(start_registry: StartRegistry) -> None:
    first = await start_registry()
    second = await start_registry()
    watch = await first.open_watch()
    responses = await asyncio.gather(
        *(replica.register("same") for replica in (first, second, first, second))
    )
    assert len({r.worker.worker_id for r in responses}) == 1
    events = await first.next_events(watch, 4)
    assert (
        sorted(events)
        == [("WORKER_EVENT_TYPE_REGISTERED", "same")] + [("WORKER_EVENT_TYPE_UPDATED", "same")] * 3
    )
    watch.cancel()


async def test_a_registry_down_longer_than_the_ttl_expires_no_worker(
    start_registry: StartRegistry,
) -> None:
    # Its own silence is not the workers': started again after 90 s (TTL 60 s), the
    # registry used to expire every worker in its first sweep, and their heartbeats got
    # NOT_FOUND (a new worker id each, their tickets handed back as lost).
    first = await start_registry()
    worker_id = (await first.register("w1")).worker.worker_id
    await first.app.stop(0)
    first.clock.advance(90)

    second = await start_registry()
    assert (await second.sweep()).expired == []
    response = await second.heartbeat(worker_id)
    assert response.worker.worker_id == worker_id
    assert response.worker.status == HEALTHY
    # Silent for a TTL from then on, it expires as usual.
    second.clock.advance(61)
    assert [w.name for w in (await second.sweep()).expired] == ["w1"]


async def test_a_database_outage_longer_than_the_ttl_expires_no_worker(
    registry: Registry,
) -> None:
    w1 = (await registry.register("w1")).worker.worker_id
    repository = registry.app.repository
    pool, repository._pool = repository._pool, UnreachablePool()  # type: ignore[assignment]
    with pytest.raises(HiveError):
        await registry.sweep()  # the outage begins: heartbeats cannot be recorded
    registry.clock.advance(90)
    repository._pool = pool  # the database answers again
    assert (await registry.sweep()).expired == []
    assert (await registry.heartbeat(w1)).worker.worker_id == w1
    registry.clock.advance(61)
    assert [w.name for w in (await registry.sweep()).expired] == ["w1"]


@contextlib.asynccontextmanager
async def workers_locked(dsn: str) -> AsyncIterator[None]:
    """The workers table locked by another session (no error, only silence) meanwhile."""
    async with await psycopg.AsyncConnection.connect(dsn) as locker:
        await locker.execute("LOCK TABLE workers IN ACCESS EXCLUSIVE MODE")
        yield
        await locker.rollback()


async def heartbeat_refused(registry: Registry, worker_id: str, *, deadline: float) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await registry.stub.Heartbeat(
            pb.HeartbeatRequest(worker_id=worker_id),
            metadata=registry.worker_md(worker_id),
            timeout=deadline,
        )
    return refused.value


async def test_a_table_locked_longer_than_the_ttl_expires_no_worker(
    registry: Registry, postgres_dsn: str
) -> None:
    # A lock on the workers table (no error, only silence) held past the TTL: heartbeats
    # waited for as long as the lock lasted (past their deadlines), and once it went every
    # worker expired (new worker ids, running tasks handed back and run twice).
    w1 = (await registry.register("w1")).worker.worker_id
    async with workers_locked(postgres_dsn):
        started = time.monotonic()
        refused = await heartbeat_refused(registry, w1, deadline=30)
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < LOCK_TIMEOUT_MS / 1000 + 3
        registry.clock.advance(90)
    assert (await registry.sweep()).expired == []
    assert (await registry.heartbeat(w1)).worker.worker_id == w1


async def test_a_call_given_up_at_once_does_not_put_off_expiry(
    registry: Registry, postgres_dsn: str
) -> None:
    # Any cancelled call counted as the database hanging: a client giving up (or being
    # killed) over and over kept every silent worker from ever expiring.
    w1 = uuid.UUID((await registry.register("w1")).worker.worker_id)
    assert (await registry.sweep()).expired == []  # heard from now on
    async with workers_locked(postgres_dsn):
        reading = asyncio.create_task(registry.app.repository.get(w1, now=registry.clock.now()))
        await asyncio.sleep(0.2)
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
    registry.clock.advance(61)
    assert [w.name for w in (await registry.sweep()).expired] == ["w1"]


async def test_a_stop_ends_the_open_watches_instead_of_waiting_out_its_grace(
    registry: Registry,
) -> None:
    # The stop used to wait for every WatchWorkers stream (they never end on their own)
    # until its grace period was over: 10 s by default for each restart of the registry.
    watch = await registry.open_watch()
    async with asyncio.timeout(30):  # a bound against hanging; the grace is far longer
        await registry.app.stop(3600)
        assert await watch.read() == grpc.aio.EOF
    assert await watch.code() == grpc.StatusCode.OK
