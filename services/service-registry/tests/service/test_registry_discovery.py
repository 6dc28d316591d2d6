"""DiscoverWorkers ranking (table-driven) and every filter of discovery and listing."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest
from structlog.testing import capture_logs

from hive_common.grpc_errors import from_rpc_error
from neuralhive.registry.v1 import registry_service_pb2 as pb

if TYPE_CHECKING:  # conftest is not importable at run time (import mode importlib)
    from conftest import Registry

pytestmark = pytest.mark.service


async def discover(registry: Registry, **fields: Any) -> list[pb.RankedWorker]:
    response = await registry.stub.DiscoverWorkers(
        pb.DiscoverWorkersRequest(**fields), metadata=registry.service_md
    )
    return list(response.workers)


async def setup_workers(registry: Registry, workers: dict[str, dict[str, Any]]) -> None:
    """Register every worker at t0, then heartbeat each at its own offset (seconds)."""
    start = registry.clock.now()
    ids = {}
    for name, spec in workers.items():
        response = await registry.register(
            name,
            capabilities=spec.get("capabilities", ["python"]),
            labels=spec.get("labels", {}),
            namespace=spec.get("namespace", ""),
            max_concurrent=spec.get("max_concurrent", 4),
        )
        ids[name] = response.worker.worker_id
    for name, spec in sorted(workers.items(), key=lambda item: item[1].get("at", 0)):
        registry.clock.set(start + timedelta(seconds=spec.get("at", 0)))
        await registry.heartbeat(
            ids[name],
            in_flight=spec.get("in_flight", 0),
            succeeded_total=spec.get("succeeded", 0),
            failed_total=spec.get("failed", 0),
            draining=spec.get("draining", False),
        )
    registry.clock.set(start + timedelta(seconds=10))


RANKING_CASES: list[tuple[str, dict[str, dict[str, Any]], dict[str, Any], list[str]]] = [
    (
        "spare capacity first",
        {"busy": {"in_flight": 3}, "idle": {}, "half": {"in_flight": 2}},
        {},
        ["idle", "half", "busy"],
    ),
    (
        "spare capacity is relative to max_concurrent",
        {"big": {"max_concurrent": 10, "in_flight": 5}, "small": {"max_concurrent": 2}},
        {},
        ["small", "big"],
    ),
    (
        "recent success rate",
        {
            "flaky": {"succeeded": 2, "failed": 8},
            "solid": {"succeeded": 9, "failed": 1},
            "new": {},
        },
        {},
        ["new", "solid", "flaky"],
    ),
    (
        "heartbeat freshness",
        {"stale": {"at": 0}, "fresh": {"at": 9}, "middle": {"at": 5}},
        {},
        ["fresh", "middle", "stale"],
    ),
    (
        "full, draining and unhealthy are left out",
        {
            "ok": {"at": 9},
            "full": {"in_flight": 4, "at": 9},
            "draining": {"draining": True, "at": 9},
            "silent": {"at": -10},  # last heartbeat 20 s before the query: unhealthy
        },
        {},
        ["ok"],
    ),
    (
        "include_full adds full workers, never draining or unhealthy ones",
        {
            "ok": {"at": 9},
            "full": {"in_flight": 4, "at": 9},
            "draining": {"draining": True, "at": 9},
            "silent": {"at": -10},
        },
        {"include_full": True},
        ["ok", "full"],
    ),
    (
        "max_results keeps the best",
        {"w1": {"in_flight": 1}, "w2": {}, "w3": {"in_flight": 2}, "w4": {"in_flight": 3}},
        {"max_results": 2},
        ["w2", "w1"],
    ),
]


@pytest.mark.parametrize(
    ("workers", "request_fields", "expected"),
    [case[1:] for case in RANKING_CASES],
    ids=[case[0] for case in RANKING_CASES],
)
async def test_ranking(
    registry: Registry,
    workers: dict[str, dict[str, Any]],
    request_fields: dict[str, Any],
    expected: list[str],
) -> None:
    await setup_workers(registry, workers)
    ranked = await discover(registry, required_capabilities=["python"], **request_fields)
    assert [r.worker.name for r in ranked] == expected
    scores = [r.score for r in ranked]
    assert scores == sorted(scores, reverse=True)
    for r in ranked:
        assert r.spare_capacity == r.worker.max_concurrent - r.worker.in_flight
        assert r.worker.status == pb.WORKER_STATUS_HEALTHY


async def test_equal_workers_have_a_deterministic_order(registry: Registry) -> None:
    await setup_workers(registry, {f"w{i}": {} for i in range(8)})
    first = [r.worker.name for r in await discover(registry, required_capabilities=["python"])]
    second = [r.worker.name for r in await discover(registry, required_capabilities=["python"])]
    assert first == second
    assert sorted(first) == [f"w{i}" for i in range(8)]


async def test_discovery_filters(registry: Registry) -> None:
    await setup_workers(
        registry,
        {
            "py": {"capabilities": ["python"], "labels": {"zone": "a"}},
            "py-gpu": {"capabilities": ["python", "gpu"], "labels": {"zone": "a", "tier": "1"}},
            "gpu": {"capabilities": ["gpu"], "labels": {"zone": "b"}},
            "batch-py": {"capabilities": ["python"], "namespace": "batch"},
        },
    )

    async def names(**fields: Any) -> set[str]:
        return {r.worker.name for r in await discover(registry, **fields)}

    assert await names(required_capabilities=["python"]) == {"py", "py-gpu"}
    assert await names(required_capabilities=["python", "gpu"]) == {"py-gpu"}
    assert await names(required_capabilities=["rust"]) == set()
    assert await names() == {"py", "py-gpu", "gpu"}  # no requirement: any live worker
    assert await names(label_selector={"zone": "a"}) == {"py", "py-gpu"}
    assert await names(label_selector={"zone": "a", "tier": "1"}) == {"py-gpu"}
    assert await names(label_selector={"zone": "c"}) == set()
    assert await names(namespace="batch") == {"batch-py"}
    assert await names(namespace="default", required_capabilities=["gpu"]) == {"py-gpu", "gpu"}


async def test_in_flight_above_capacity_is_accepted_and_counts_as_full(registry: Registry) -> None:
    # A worker may hold more than max_concurrent for a while (attempts the ticket service
    # has moved on, a re-registration with a lower capacity) or report it by mistake:
    # refusing its heartbeats would make it UNHEALTHY. It is shown as reported, discovered
    # as full, and the first heartbeat over capacity is logged.
    await setup_workers(registry, {"over": {"in_flight": 3}, "full": {"in_flight": 4}})
    over_id = next(
        r.worker.worker_id
        for r in await discover(registry, include_full=True)
        if r.worker.name == "over"
    )

    with capture_logs() as logs:
        first = await registry.heartbeat(over_id, in_flight=999)
        again = await registry.heartbeat(over_id, in_flight=998)

    assert first.worker.in_flight == 999
    assert again.worker.in_flight == 998
    assert again.worker.status == pb.WORKER_STATUS_HEALTHY
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [(e["event"], e["in_flight"], e["max_concurrent"]) for e in warnings] == [
        ("worker reports more tasks in flight than its max_concurrent", 999, 4)
    ]
    assert warnings[0]["worker_id"] == over_id
    assert await discover(registry) == []
    ranked = {r.worker.name: r for r in await discover(registry, include_full=True)}
    assert ranked["over"].spare_capacity == 0
    assert ranked["over"].worker.in_flight == 998
    # Ranked as a full worker, not below one (the same spare term; it heartbeated later).
    assert ranked["over"].score >= ranked["full"].score


async def test_max_results_default_and_cap(start_registry: Any) -> None:
    registry: Registry = await start_registry(default_max_results=3, max_results_cap=5)
    await setup_workers(registry, {f"w{i}": {} for i in range(7)})
    assert len(await discover(registry)) == 3
    assert len(await discover(registry, max_results=2)) == 2
    assert len(await discover(registry, max_results=1000)) == 5
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await discover(registry, max_results=-1)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def list_names(registry: Registry, **fields: Any) -> list[str]:
    response = await registry.stub.ListWorkers(
        pb.ListWorkersRequest(**fields), metadata=registry.service_md
    )
    return [w.name for w in response.workers]


async def test_list_filters_and_pages(registry: Registry) -> None:
    await setup_workers(
        registry,
        {
            "a-healthy": {"capabilities": ["python"], "at": 9},
            "b-draining": {"capabilities": ["python"], "draining": True, "at": 9},
            "c-silent": {"capabilities": ["gpu"], "at": -10},
            "d-other-ns": {"namespace": "batch", "at": 9},
        },
    )
    assert await list_names(registry) == ["d-other-ns", "a-healthy", "b-draining", "c-silent"]
    assert await list_names(registry, namespace="default") == [
        "a-healthy",
        "b-draining",
        "c-silent",
    ]
    assert await list_names(registry, capability="gpu") == ["c-silent"]
    assert await list_names(registry, statuses=[pb.WORKER_STATUS_UNHEALTHY]) == ["c-silent"]
    assert await list_names(registry, statuses=[pb.WORKER_STATUS_DRAINING]) == ["b-draining"]
    assert await list_names(
        registry, statuses=[pb.WORKER_STATUS_HEALTHY, pb.WORKER_STATUS_DRAINING]
    ) == ["d-other-ns", "a-healthy", "b-draining"]

    seen: list[str] = []
    token = ""
    while True:
        response = await registry.stub.ListWorkers(
            pb.ListWorkersRequest(page_size=3, page_token=token), metadata=registry.service_md
        )
        seen.extend(w.name for w in response.workers)
        token = response.next_page_token
        if not token:
            break
    assert seen == ["d-other-ns", "a-healthy", "b-draining", "c-silent"]

    for bad in (
        {"statuses": [pb.WORKER_STATUS_UNSPECIFIED]},
        {"page_token": "garbage!"},
        {"page_size": -1},
        {"namespace": "Not Valid"},
    ):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await list_names(registry, **bad)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Every violation at once, as over HTTP (a bad status used to hide the others).
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await list_names(registry, statuses=[99], namespace="BAD", capability="a b", page_size=-1)
    refused = from_rpc_error(exc.value)
    assert [v.field for v in refused.violations] == [
        "statuses[0]",
        "namespace",
        "capability",
        "page_size",
    ]


async def test_a_registration_burst_refreshes_the_planner_statistics(
    registry: Registry, postgres_dsn: str
) -> None:
    # Discovery's plan depends on statistics that know how many workers exist: the
    # registry analyses the table after 64 new workers, then whenever it about doubled
    # (autovacuum, set to 100 + 2% changed rows, would not have run yet).
    async def estimated_rows() -> float:
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT reltuples FROM pg_class WHERE oid = 'workers'::regclass"
            )
            row = await cur.fetchone()
        assert row is not None
        return float(row[0])

    for n in range(63):
        await registry.register(f"w{n}")
    assert await estimated_rows() < 0  # never analysed
    await registry.register("w63")
    assert await estimated_rows() == 64
    for n in range(64, 127):
        await registry.register(f"w{n}")
    assert await estimated_rows() == 64
    await registry.register("w127")
    assert await estimated_rows() == 128
    # Registering again (same names) adds no worker and does not count.
    for n in range(64):
        await registry.register(f"w{n}")
    assert await estimated_rows() == 128
    assert len(await discover(registry, required_capabilities=["python"], max_results=100)) == 100


async def test_one_statement_is_one_round_trip(registry: Registry) -> None:
    # Without autocommit psycopg wraps every statement in BEGIN ... COMMIT: three round
    # trips per discovery (~13 % of the registry's CPU per call). Work of several
    # statements opens its transaction explicitly (WorkerRepository._transaction).
    async with registry.app.pool.connection() as conn:
        assert conn.autocommit
        await conn.execute("SELECT 1")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert len(await discover(registry, required_capabilities=["python"])) == 0


async def test_registrations_and_heartbeats_leave_no_pending_gin_entries(
    registry: Registry, postgres_dsn: str
) -> None:
    # Discovery's GIN indexes (capabilities, labels) have no pending list (migration
    # 0003): every write is in the index at once, so no search scans a list of recent
    # entries (which slowed the label lookup 20x at 10,000 workers).
    ids = [
        (
            await registry.register(f"w{n}", capabilities=["python", f"c{n}"], labels={"n": str(n)})
        ).worker.worker_id
        for n in range(40)
    ]
    for worker_id in ids:
        await registry.heartbeat(worker_id, in_flight=1)
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        for index in ("workers_capabilities_idx", "workers_labels_idx"):
            cur = await conn.execute("SELECT gin_clean_pending_list(%s::regclass)", (index,))
            assert await cur.fetchone() == (0,), index  # no pending page to merge
    found = await discover(registry, required_capabilities=["c7"], label_selector={"n": "7"})
    assert [w.worker.name for w in found] == ["w7"]
