"""A worker the registry expires hands its tickets back at once (DESIGN §6: "removed
after a longer TTL; its assigned tickets return to PENDING"), not when their leases end."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest

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


async def test_the_tickets_of_an_expired_worker_run_elsewhere_without_waiting_for_leases(
    flow: Flow,
) -> None:
    # Leases as long as the defaults: only the registry's expiry can bring the ticket back.
    await flow.start_orchestrator(assign_lease_seconds=3600)
    doomed = await flow.start_worker("doomed", ["python"])
    started = asyncio.Event()

    async def hang(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        started.set()
        await asyncio.Event().wait()  # never finishes: the worker dies first
        return {}

    doomed.add_task("job", hang)
    plan = {
        "plan_id": "orphan",
        "tasks": [
            {
                "task_id": "job",
                "task_type": "job",
                "required_capabilities": ["python"],
                "timeout_seconds": 3600,
                "max_retries": 1,
            }
        ],
    }
    assert (await flow.submit(plan)).status_code == 202
    async with asyncio.timeout(60):
        await started.wait()

    await flow.kill_worker(doomed)

    survivor = await flow.start_worker("survivor", ["python"])

    async def done(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {"ran_on": "survivor", "attempt": ctx.attempt}

    survivor.add_task("job", done)
    final = await flow.wait_settled("orphan")
    assert final["status"] == "COMPLETED", final
    job = flow.tasks(final)["job"]
    assert job["attempt"] == 2
    assert job["worker_id"] == survivor.worker_id
