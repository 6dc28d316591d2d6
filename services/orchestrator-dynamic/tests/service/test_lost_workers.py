"""A worker the registry expires hands its tickets back at once (DESIGN §6: "removed
after a longer TTL; its assigned tickets return to PENDING"), not when their leases end;
also when no orchestrator saw it expire."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from hive_common.auth import DEFAULT_ISSUER, TokenIssuer
from hive_common.clients import RegistryClient
from hive_common.grpc_client import create_channel
from service_registry.config import RegistrySettings

if TYPE_CHECKING:  # conftest is not importable at run time (import mode importlib)
    from conftest import Flow

pytestmark = pytest.mark.service


@pytest.fixture
def registry_settings(registry_settings: RegistrySettings) -> RegistrySettings:
    # A registry that expires a silent worker within seconds.
    return registry_settings.model_copy(
        update={
            "heartbeat_interval_seconds": 1,
            "unhealthy_after_missed_heartbeats": 1,
            "expire_after_seconds": 3,
            "sweep_interval_seconds": 0.2,
        }
    )


async def hang_on_a_doomed_worker(flow: Flow, plan_id: str) -> Any:
    """Submit a one-task plan whose task hangs on worker "doomed"; the worker once it runs."""
    doomed = await flow.start_worker("doomed", ["python"])
    started = asyncio.Event()

    async def hang(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        started.set()
        await asyncio.Event().wait()  # never finishes: the worker dies first
        return {}

    doomed.add_task("job", hang)
    task = {
        "task_id": "job",
        "task_type": "job",
        "required_capabilities": ["python"],
        # Leases as long as the defaults: only a lost worker can bring the ticket back.
        "timeout_seconds": 3600,
        # No retries (the default): losing the worker must not use one (it failed the plan).
    }
    assert (await flow.submit({"plan_id": plan_id, "tasks": [task]})).status_code == 202
    async with asyncio.timeout(60):
        await started.wait()
    return doomed


async def assert_ran_on_a_survivor(flow: Flow, plan_id: str, survivor: Any) -> None:
    final = await flow.wait_settled(plan_id)
    assert final["status"] == "COMPLETED", final
    job = flow.tasks(final)["job"]
    assert job["attempt"] == 2
    assert job["worker_id"] == survivor.worker_id
    assert job["lost_runs"] == 1  # attempt 1 ended with its worker: no retry used
    explained = await flow.client().get(f"/api/v1/plans/{plan_id}/tasks/job/explain")
    assert (explained.json()["attempt"], explained.json()["max_attempts"]) == (2, 2)


async def start_survivor(flow: Flow) -> Any:
    survivor = await flow.start_worker("survivor", ["python"])

    async def done(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {"ran_on": "survivor", "attempt": ctx.attempt}

    survivor.add_task("job", done)
    return survivor


async def test_the_tickets_of_an_expired_worker_run_elsewhere_without_waiting_for_leases(
    flow: Flow,
) -> None:
    await flow.start_orchestrator(assign_lease_seconds=3600)
    doomed = await hang_on_a_doomed_worker(flow, "orphan")
    await flow.kill_worker(doomed)
    survivor = await start_survivor(flow)
    await assert_ran_on_a_survivor(flow, "orphan", survivor)


async def test_a_replica_taking_a_plan_over_hands_back_the_tickets_of_a_worker_gone_meanwhile(
    flow: Flow, registry_settings: RegistrySettings
) -> None:
    # The worker expires while no orchestrator runs, so no replica sees the EXPIRED event:
    # the one taking the plan over finds the worker gone when it reads the plan's tickets.
    first = await flow.start_orchestrator(assign_lease_seconds=3600)
    doomed = await hang_on_a_doomed_worker(flow, "orphan-taken-over")
    await flow.stop_orchestrator(first)
    await flow.kill_worker(doomed)
    dsn = registry_settings.postgres_dsn.get_secret_value()

    async def expired() -> bool:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM workers WHERE worker_id = %s", (doomed.worker_id,)
            )
            row = await cur.fetchone()
            return row is not None and row[0] == 0

    await flow.wait_for(expired, what="the registry expiring the killed worker")
    survivor = await start_survivor(flow)
    await flow.start_orchestrator(assign_lease_seconds=3600)
    await assert_ran_on_a_survivor(flow, "orphan-taken-over", survivor)


async def test_the_tickets_of_a_worker_that_deregistered_holding_them_run_elsewhere(
    flow: Flow,
) -> None:
    # A worker deregisters with a ticket still on it (a draining worker does not start
    # the assignments it receives). The ticket used to wait out its lease. No resync within the test
    # (it would find the worker gone too): only the DEREGISTERED event can bring it back.
    await flow.start_orchestrator(assign_lease_seconds=3600, resync_interval_seconds=3600)
    doomed = await hang_on_a_doomed_worker(flow, "left-behind")
    await flow.kill_worker(doomed)
    token, _ = TokenIssuer(secret=flow.jwt_secret, issuer=DEFAULT_ISSUER).issue_worker_token(
        worker_id=doomed.worker_id, ttl_seconds=60
    )
    async with RegistryClient(
        channel=create_channel(flow.registry_target), owns_channel=True
    ) as registry:
        await registry.deregister(worker_id=doomed.worker_id, token=token)
    survivor = await start_survivor(flow)
    await assert_ran_on_a_survivor(flow, "left-behind", survivor)
