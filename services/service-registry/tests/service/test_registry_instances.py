"""One live process per worker name: Register's instance_id (migration 0004).

Two processes under one name used to get the same worker_id and both ran every
assignment; now a second *live* instance is refused (ALREADY_EXISTS), while the same
process re-registering, a restart after a crash (its old registration silent past the
unhealthy window) and clients that send no instance_id (among themselves) keep working.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psycopg
import pytest

from hive_common.errors import AlreadyExists
from hive_common.grpc_errors import from_rpc_error
from hive_common.migrations import apply_migrations
from hive_testsupport.migrations import migrations_until, roll_back_migration
from neuralhive.registry.v1 import registry_service_pb2 as pb
from service_registry.app import MIGRATIONS_DIR

if TYPE_CHECKING:  # conftest is not importable at run time (import mode importlib)
    from conftest import Registry, StartRegistry

pytestmark = pytest.mark.service

INSTANCE_ID = "0004_workers_instance_id"


async def refusal(registry: Registry, name: str, instance_id: str) -> AlreadyExists:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await registry.register(name, instance_id=instance_id)
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
    error = from_rpc_error(exc.value)
    assert isinstance(error, AlreadyExists)
    return error


async def listed(registry: Registry) -> list[tuple[str, str]]:
    response = await registry.stub.ListWorkers(
        pb.ListWorkersRequest(), metadata=registry.service_md
    )
    return [(w.name, w.worker_id) for w in response.workers]


async def test_a_second_live_instance_of_a_name_is_refused(registry: Registry) -> None:
    first = await registry.register("host-1", instance_id="proc-a")
    worker_id = first.worker.worker_id
    registry.clock.advance(1.2)

    error = await refusal(registry, "host-1", "proc-b")

    assert error.message.startswith(
        "worker name 'host-1' is held by a running instance (last heartbeat 1.2 s ago): "
        "give this worker another name (--name), or stop the other one"
    )
    assert error.details["reason"] == "WORKER_NAME_IN_USE"
    assert error.details["name"] == "host-1"
    assert float(error.details["retry_after_seconds"]) == pytest.approx(13.8)
    assert float(error.details["unhealthy_after_seconds"]) == 15.0
    # Nothing changed: the holder keeps its registration and heartbeats on.
    assert await listed(registry) == [("host-1", worker_id)]
    registry.clock.advance(10)
    await registry.heartbeat(worker_id, in_flight=0)
    registry.clock.advance(10)  # 21.2 s after the first refusal, but the holder is live
    await refusal(registry, "host-1", "proc-b")
    # A draining holder is live too.
    await registry.heartbeat(worker_id, in_flight=0, draining=True)
    await refusal(registry, "host-1", "proc-b")
    metrics = (await registry.http.get("/metrics")).text
    assert 'hive_registry_registrations_total{result="name_in_use"} 3.0' in metrics
    # Another namespace is another name.
    elsewhere = await registry.register("host-1", namespace="batch", instance_id="proc-b")
    assert elsewhere.worker.worker_id != worker_id
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await registry.register("host-1", namespace="batch", instance_id="proc-c")
    assert "worker name 'host-1' in namespace 'batch' is held" in (exc.value.details() or "")


async def test_the_same_instance_registers_again_under_its_worker_id(
    start_registry: StartRegistry,
) -> None:
    registry = await start_registry()
    first = await registry.register("host-1", instance_id="proc-a", max_concurrent=2)
    registry.clock.advance(3)
    again = await registry.register("host-1", instance_id="proc-a", max_concurrent=4)
    assert again.worker.worker_id == first.worker.worker_id
    assert again.worker.max_concurrent == 4
    # ... also after a registry restart (the instance id is stored).
    await registry.app.stop(0)
    restarted = await start_registry()
    after_restart = await restarted.register("host-1", instance_id="proc-a")
    assert after_restart.worker.worker_id == first.worker.worker_id


async def test_a_restart_after_a_crash_takes_the_name_over_once_the_old_one_is_silent(
    registry: Registry,
) -> None:
    watch = await registry.open_watch()
    crashed = await registry.register("host-1", instance_id="proc-a")
    worker_id = crashed.worker.worker_id
    registry.clock.advance(15)  # exactly the unhealthy window: still counted live
    error = await refusal(registry, "host-1", "proc-b")
    assert float(error.details["retry_after_seconds"]) == 0.0
    registry.clock.advance(0.5)

    restarted = await registry.register("host-1", instance_id="proc-b")

    # A new identity: the old one ends (EXPIRED: its tickets are handed back), so the old
    # process, were it only paused, cannot wake up holding the new one's assignments (it
    # kept the same id, and both processes ran every task).
    assert restarted.worker.worker_id != worker_id
    assert restarted.worker.status == pb.WORKER_STATUS_HEALTHY
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await registry.heartbeat(worker_id)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert await registry.next_events(watch, 3) == [
        ("WORKER_EVENT_TYPE_REGISTERED", "host-1"),
        ("WORKER_EVENT_TYPE_EXPIRED", "host-1"),
        ("WORKER_EVENT_TYPE_REGISTERED", "host-1"),
    ]
    watch.cancel()
    # The name is now the new process's: the old one, were it to come back, is refused.
    registry.clock.advance(1)
    await refusal(registry, "host-1", "proc-a")


async def test_a_deregistered_name_is_free_at_once(registry: Registry) -> None:
    first = await registry.register("host-1", instance_id="proc-a")
    await registry.stub.Deregister(
        pb.DeregisterRequest(worker_id=first.worker.worker_id),
        metadata=registry.worker_md(first.worker.worker_id),
    )
    second = await registry.register("host-1", instance_id="proc-b")
    assert second.worker.worker_id != first.worker.worker_id


async def test_registrations_without_an_instance_id_are_idempotent_among_themselves(
    registry: Registry,
) -> None:
    # Older workers and the discovery bench send no instance_id: idempotent as before.
    first = await registry.register("host-1")
    again = await registry.register("host-1")
    assert again.worker.worker_id == first.worker.worker_id
    # A live holder of unknown instance: a new instance must wait for it to lapse.
    await refusal(registry, "host-1", "proc-a")


async def test_leaving_the_instance_id_out_does_not_take_a_live_instance_over(
    registry: Registry,
) -> None:
    # Was accepted: same worker_id, a worker token for it, the holder's instance erased,
    # so whoever had the registration secret received the running worker's assignments.
    holder = await registry.register("host-2", instance_id="proc-a")
    registry.clock.advance(1)
    refused = await refusal(registry, "host-2", "")
    assert refused.details["reason"] == "WORKER_NAME_IN_USE"
    # Nothing changed: the holder registers again as itself.
    again = await registry.register("host-2", instance_id="proc-a")
    assert again.worker.worker_id == holder.worker.worker_id
    # Once the holder is silent past the unhealthy window the name is free again.
    registry.clock.advance(20)
    taken_over = await registry.register("host-2")
    assert taken_over.worker.worker_id != holder.worker.worker_id


async def test_an_invalid_instance_id_is_invalid_argument(registry: Registry) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await registry.register("host-1", instance_id="no spaces")
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in from_rpc_error(exc.value).violations] == ["instance_id"]


@pytest.mark.parametrize("held_before", [False, True])
async def test_of_instances_registering_at_once_exactly_one_wins(
    start_registry: StartRegistry, held_before: bool
) -> None:
    first = await start_registry()
    second = await start_registry()
    names = [f"host-{i}" for i in range(5)]
    if held_before:  # crashed holders, silent past the window: the update path races
        for name in names:
            await first.register(name, instance_id="crashed")
        first.clock.advance(16)
    replicas = [first, second, first, second]
    results = await asyncio.gather(
        *(
            replica.register(name, instance_id=f"proc-{i}")
            for name in names
            for i, replica in enumerate(replicas)
        ),
        return_exceptions=True,
    )
    for n, name in enumerate(names):
        outcomes = results[n * len(replicas) : (n + 1) * len(replicas)]
        won = [r for r in outcomes if isinstance(r, pb.RegisterResponse)]
        lost = [r for r in outcomes if not isinstance(r, pb.RegisterResponse)]
        assert len(won) == 1, (name, outcomes)
        assert all(
            isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.ALREADY_EXISTS
            for r in lost
        ), lost
    assert len(await listed(first)) == len(names)


async def test_migration_adds_instance_id_and_rolls_back(postgres_dsn: str, tmp_path: Path) -> None:
    before = migrations_until(
        MIGRATIONS_DIR, "0003_workers_gin_without_pending_list", into=tmp_path / "m"
    )
    await asyncio.to_thread(apply_migrations, dsn=postgres_dsn, directory=before)
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO workers (worker_id, namespace, name, capabilities, max_concurrent, "
            "registered_at, last_heartbeat_at, rank_key, tiebreak) VALUES "
            "(gen_random_uuid(), 'default', 'old', '{python}', 1, now(), now(), 0, 0)"
        )

    applied = await asyncio.to_thread(apply_migrations, dsn=postgres_dsn, directory=MIGRATIONS_DIR)

    assert applied == [INSTANCE_ID]
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT name, instance_id FROM workers")
        assert await cur.fetchall() == [("old", "")]
    await asyncio.to_thread(roll_back_migration, postgres_dsn, MIGRATIONS_DIR, INSTANCE_ID)
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_name = 'workers' AND column_name = 'instance_id'"
        )
        assert await cur.fetchone() == (0,)
        cur = await conn.execute("SELECT name FROM workers")
        assert await cur.fetchall() == [("old",)]
