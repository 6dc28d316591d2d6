"""PlanRepository against a real, freshly migrated PostgreSQL database."""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from hive_common.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from hive_common.migrations import apply_migrations
from hive_testsupport.migrations import migrations_until, roll_back_migration
from orchestrator_dynamic.domain.plan import Plan, Priority, plan_body_hash
from orchestrator_dynamic.domain.records import PlanLease, PlanOwnershipLost
from orchestrator_dynamic.domain.scheduler import PlanStatus, TicketState, TicketStatus
from orchestrator_dynamic.domain.validation import PlanValidator, ValidPlan
from orchestrator_dynamic.storage import (
    MIGRATIONS_DIRECTORY,
    PlanRepository,
    Pool,
    open_pool,
)

pytestmark = pytest.mark.service

TTL = timedelta(seconds=30)
DROP_WATCH_CURSOR = "0002_drop_plans_watch_cursor"
TASK_COUNTS = "0003_plan_task_counts"
LOST_RUNS = "0004_plan_task_lost_runs"
ROUND_ERROR = "0005_plan_round_error"
S = TicketStatus


@dataclass
class FakeClock:
    """A fixed start time a test moves forward (to expire leases) without sleeping."""

    now: datetime = field(default_factory=lambda: datetime(2026, 11, 24, 12, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
async def migrated_dsn(postgres_dsn: str) -> str:
    await asyncio.to_thread(apply_migrations, dsn=postgres_dsn, directory=MIGRATIONS_DIRECTORY)
    return postgres_dsn


@pytest.fixture
async def pool(migrated_dsn: str) -> AsyncIterator[Pool]:
    p = open_pool(migrated_dsn, min_size=1, max_size=8)
    await p.open(wait=True)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def repo(pool: Pool, clock: FakeClock) -> PlanRepository:
    return PlanRepository(pool=pool, clock=clock)


def make_plan(plan_id: str = "plan-1", *, name: str = "release", cmd: str = "make") -> Plan:
    result = PlanValidator().validate(
        {
            "plan_id": plan_id,
            "intent_id": "intent-7",
            "name": name,
            "priority": "HIGH",
            "tasks": [
                {
                    "task_id": "build",
                    "task_type": "shell",
                    "required_capabilities": ["python"],
                    "parameters": {"cmd": cmd, "env": {"LANG": "é ü"}, "n": [1, 2.5, None]},
                    "timeout_seconds": 300,
                    "max_retries": 2,
                },
                {"task_id": "test", "task_type": "shell", "depends_on": ["build"]},
                {"task_id": "docs", "task_type": "echo"},
            ],
        }
    )
    assert isinstance(result, ValidPlan)
    return result.plan


async def create(repo: PlanRepository, plan_id: str = "plan-1", **kw: Any) -> Plan:
    plan = make_plan(plan_id, **kw)
    await repo.create(plan)  # hash computed by default
    return plan


# -- migrations ------------------------------------------------------------------------------


async def test_migrations_apply_once_and_then_find_nothing_to_do(postgres_dsn: str) -> None:
    first = await asyncio.to_thread(
        apply_migrations, dsn=postgres_dsn, directory=MIGRATIONS_DIRECTORY
    )
    second = await asyncio.to_thread(
        apply_migrations, dsn=postgres_dsn, directory=MIGRATIONS_DIRECTORY
    )

    assert first == ["0001_plans", DROP_WATCH_CURSOR, TASK_COUNTS, LOST_RUNS, ROUND_ERROR]
    assert second == []
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        cur = await conn.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_name LIKE 'plan%' ORDER BY 1"
        )
        assert [r[0] for r in await cur.fetchall()] == ["plan_tasks", "plans"]
    assert "watch_cursor" not in await plan_columns(postgres_dsn)


async def test_unused_watch_cursor_column_is_dropped_and_restored_by_the_rollback(
    postgres_dsn: str, tmp_path: Path
) -> None:
    # A database migrated before the column was dropped.
    only_first = migrations_until(MIGRATIONS_DIRECTORY, "0001_plans", into=tmp_path / "migrations")
    applied = await asyncio.to_thread(apply_migrations, dsn=postgres_dsn, directory=only_first)
    assert applied == ["0001_plans"]
    assert "watch_cursor" in await plan_columns(postgres_dsn)

    applied = await asyncio.to_thread(
        apply_migrations, dsn=postgres_dsn, directory=MIGRATIONS_DIRECTORY
    )
    assert applied == [DROP_WATCH_CURSOR, TASK_COUNTS, LOST_RUNS, ROUND_ERROR]
    assert "watch_cursor" not in await plan_columns(postgres_dsn)

    for migration in (ROUND_ERROR, LOST_RUNS, TASK_COUNTS, DROP_WATCH_CURSOR):
        await asyncio.to_thread(roll_back_migration, postgres_dsn, MIGRATIONS_DIRECTORY, migration)
    assert "watch_cursor" in await plan_columns(postgres_dsn)
    applied = await asyncio.to_thread(
        apply_migrations, dsn=postgres_dsn, directory=MIGRATIONS_DIRECTORY
    )
    assert applied == [DROP_WATCH_CURSOR, TASK_COUNTS, LOST_RUNS, ROUND_ERROR]


async def counted(dsn: str) -> dict[str, dict[str, int]]:
    """Plan id -> task count per status, counted over plan_tasks (what the summary held
    before migration 0003)."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT plan_id, status, count(*) FROM plan_tasks GROUP BY plan_id, status"
        )
        found: dict[str, dict[str, int]] = {}
        for plan_id, status, n in await cur.fetchall():
            found.setdefault(plan_id, {})[status] = n
        return found


async def test_task_counts_are_filled_in_for_existing_plans_and_rolled_back(
    postgres_dsn: str, tmp_path: Path
) -> None:
    before = migrations_until(MIGRATIONS_DIRECTORY, DROP_WATCH_CURSOR, into=tmp_path / "m")
    await asyncio.to_thread(apply_migrations, dsn=postgres_dsn, directory=before)
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        for plan_id, statuses in (
            ("a", ["COMPLETED", "RUNNING", "COMPLETED", "PENDING"]),
            ("b", ["PENDING"]),
        ):
            await conn.execute(
                "INSERT INTO plans (plan_id, priority, body, body_hash, task_count, "
                "created_at, updated_at) VALUES (%s, 'NORMAL', '{}', 'h', %s, now(), now())",
                (plan_id, len(statuses)),
            )
            for i, status in enumerate(statuses):
                await conn.execute(
                    "INSERT INTO plan_tasks (plan_id, task_id, position, status, updated_at) "
                    "VALUES (%s, %s, %s, %s, now())",
                    (plan_id, f"t{i}", i, status),
                )

    applied = await asyncio.to_thread(
        apply_migrations, dsn=postgres_dsn, directory=MIGRATIONS_DIRECTORY
    )

    assert applied == [TASK_COUNTS, LOST_RUNS, ROUND_ERROR]
    repo_pool = open_pool(postgres_dsn, min_size=1, max_size=1)
    await repo_pool.open(wait=True)
    try:
        repo = PlanRepository(pool=repo_pool)
        a, b = (await repo.get_summary("a")).counts, (await repo.get_summary("b")).counts
    finally:
        await repo_pool.close()
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        cur = await conn.execute("SELECT DISTINCT lost_runs FROM plan_tasks")
        assert await cur.fetchall() == [(0,)]  # existing tasks start with no lost runs
    assert (a["COMPLETED"], a["RUNNING"], a["PENDING"], a["FAILED"]) == (2, 1, 1, 0)
    assert (b["PENDING"], sum(b.values())) == (1, 1)
    for migration in (ROUND_ERROR, LOST_RUNS, TASK_COUNTS):
        await asyncio.to_thread(roll_back_migration, postgres_dsn, MIGRATIONS_DIRECTORY, migration)
    assert "counts" not in await plan_columns(postgres_dsn)
    assert await counted(postgres_dsn) == {
        "a": {"COMPLETED": 2, "RUNNING": 1, "PENDING": 1},
        "b": {"PENDING": 1},
    }


async def plan_columns(dsn: str) -> set[str]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = 'plans'"
        )
        return {r[0] for r in await cur.fetchall()}


# -- create / get ----------------------------------------------------------------------------


async def test_create_stores_plan_and_one_pending_row_per_task(
    repo: PlanRepository, clock: FakeClock
) -> None:
    plan = make_plan()

    stored, created = await repo.create(plan, body_hash=plan_body_hash(plan))

    assert created is True
    assert stored.plan == plan
    assert stored.body_hash == plan_body_hash(plan)
    s = stored.summary
    assert (s.plan_id, s.intent_id, s.name, s.status) == (
        "plan-1",
        "intent-7",
        "release",
        PlanStatus.PENDING,
    )
    assert (s.priority, s.task_count) == (Priority.HIGH, 3)
    assert s.created_at == s.updated_at == clock.now
    assert (s.completed_at, s.settled_at, s.cancel_requested_at, s.owner_id) == (None,) * 4
    assert s.counts == {
        "PENDING": 3,
        "ASSIGNED": 0,
        "RUNNING": 0,
        "COMPLETED": 0,
        "FAILED": 0,
        "CANCELLED": 0,
    }
    assert [t.task_id for t in stored.tasks] == ["build", "test", "docs"]
    assert all(
        (t.ticket_id, t.status, t.attempt, t.version, t.backoff_until)
        == (None, S.PENDING, 1, 0, None)
        for t in stored.tasks
    )
    assert await repo.get("plan-1") == stored


async def test_same_id_and_body_returns_the_existing_plan(
    repo: PlanRepository, clock: FakeClock
) -> None:
    plan = make_plan()
    first, _ = await repo.create(plan, body_hash=plan_body_hash(plan))
    clock.advance(5)

    again, created = await repo.create(make_plan(), body_hash=plan_body_hash(make_plan()))

    assert created is False
    assert again == first
    assert again.summary.created_at == first.summary.created_at


async def test_same_id_with_a_different_body_is_already_exists(repo: PlanRepository) -> None:
    original = await create(repo)
    changed = make_plan(cmd="make -j4")

    with pytest.raises(AlreadyExists) as info:
        await repo.create(changed, body_hash=plan_body_hash(changed))

    assert info.value.violations[0].field == "$.plan_id"
    assert info.value.details == {"plan_id": "plan-1"}
    assert (await repo.get("plan-1")).plan == original


async def test_concurrent_identical_submissions_create_once(pool: Pool) -> None:
    repos = [PlanRepository(pool=pool) for _ in range(6)]
    plan = make_plan()

    results = await asyncio.gather(*(r.create(plan, body_hash=plan_body_hash(plan)) for r in repos))

    assert sorted(created for _, created in results) == [False] * 5 + [True]
    assert len({stored.summary.created_at for stored, _ in results}) == 1


async def test_create_needs_a_plan_id(repo: PlanRepository) -> None:
    plan = make_plan()
    anonymous = Plan(tasks=plan.tasks)

    with pytest.raises(InvalidArgument):
        await repo.create(anonymous, body_hash=plan_body_hash(anonymous))


async def test_get_unknown_plan_is_not_found(repo: PlanRepository) -> None:
    with pytest.raises(NotFound):
        await repo.get("nope")
    with pytest.raises(NotFound):
        await repo.get_summary("nope")


async def test_large_plan_round_trips(repo: PlanRepository) -> None:
    n = 3000
    result = PlanValidator().validate(
        {
            "plan_id": "big",
            "tasks": [
                {
                    "task_id": f"t{i}",
                    "task_type": "echo",
                    "depends_on": [f"t{i // 2}"] if i else [],
                }
                for i in range(n)
            ],
        }
    )
    assert isinstance(result, ValidPlan)

    stored, created = await repo.create(result.plan, body_hash=plan_body_hash(result.plan))

    assert created
    assert stored.plan == result.plan
    assert [t.task_id for t in stored.tasks] == list(result.plan.task_ids())
    assert stored.summary.counts["PENDING"] == n


# -- listing ---------------------------------------------------------------------------------


async def test_list_pages_newest_first_with_a_keyset_cursor(
    repo: PlanRepository, clock: FakeClock
) -> None:
    created: list[tuple[datetime, str]] = []
    # Ids deliberately out of creation order; pairs share a created_at (tie on the id).
    for i, plan_id in enumerate(["p5", "p1", "p9", "p3", "p7", "p0", "p2"]):
        await create(repo, plan_id)
        created.append((clock.now, plan_id))
        if i % 2 == 1:
            clock.advance(1)

    seen: list[str] = []
    token: str | None = None
    pages = 0
    while True:
        page = await repo.list_plans(page_size=3, page_token=token)
        seen.extend(p.plan_id for p in page.plans)
        pages += 1
        token = page.next_page_token
        if token is None:
            break

    assert pages == 3
    assert seen == [plan_id for _, plan_id in sorted(created, reverse=True)]
    assert seen == ["p2", "p7", "p0", "p9", "p3", "p5", "p1"]


async def test_list_filters_by_status_and_reports_counts(repo: PlanRepository) -> None:
    for i in range(3):
        await create(repo, f"p{i}")
    await repo.request_cancel("p1")

    cancelled = await repo.list_plans(statuses=[PlanStatus.CANCELLED])
    pending = await repo.list_plans(statuses=[PlanStatus.PENDING, PlanStatus.RUNNING])

    assert [p.plan_id for p in cancelled.plans] == ["p1"]
    assert sorted(p.plan_id for p in pending.plans) == ["p0", "p2"]
    assert cancelled.next_page_token is None
    assert cancelled.plans[0].counts["PENDING"] == 3


async def test_list_of_nothing(repo: PlanRepository) -> None:
    page = await repo.list_plans()

    assert page.plans == ()
    assert page.next_page_token is None


@pytest.mark.parametrize(
    "token",
    [
        "garbage!",
        "e30",
        "eyJjIjogMX0",
        "eyJjIjoiMjAyNiIsInAiOjF9",
        base64.urlsafe_b64encode(b"[" * 1500).decode(),  # a RecursionError was a 500
    ],
)
async def test_list_rejects_foreign_page_tokens(repo: PlanRepository, token: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        await repo.list_plans(page_token=token)

    assert info.value.violations[0].field == "page_token"


async def test_list_rejects_negative_page_size(repo: PlanRepository) -> None:
    with pytest.raises(InvalidArgument):
        await repo.list_plans(page_size=-1)


# -- ownership -------------------------------------------------------------------------------


async def test_only_one_replica_holds_a_plan_until_its_lease_expires(
    repo: PlanRepository, clock: FakeClock
) -> None:
    await create(repo)

    a = await repo.claim("plan-1", owner_id="replica-a", ttl=TTL)
    b_early = await repo.claim("plan-1", owner_id="replica-b", ttl=TTL)

    assert a is not None
    assert (a.owner_id, a.epoch, a.expires_at) == ("replica-a", 1, clock.now + TTL)
    assert b_early is None
    assert (await repo.get_summary("plan-1")).owner_id == "replica-a"

    clock.advance(TTL.total_seconds())  # expiry is inclusive: at expires_at it is gone
    b = await repo.claim("plan-1", owner_id="replica-b", ttl=TTL)

    assert b is not None
    assert (b.owner_id, b.epoch) == ("replica-b", 2)
    assert await repo.renew_many([a], ttl=TTL) == []  # lost
    with pytest.raises(PlanOwnershipLost):
        await repo.set_status(a, status=PlanStatus.RUNNING)
    assert await repo.release(a) is False
    assert (await repo.get_summary("plan-1")).owner_id == "replica-b"


async def test_renewal_keeps_a_plan(repo: PlanRepository, clock: FakeClock) -> None:
    await create(repo)
    a = await repo.claim("plan-1", owner_id="replica-a", ttl=TTL)
    assert a is not None

    clock.advance(20)
    (renewed,) = await repo.renew_many([a], ttl=TTL)
    clock.advance(20)  # past the first expiry, within the renewed one

    assert renewed.expires_at == a.expires_at + timedelta(seconds=20)
    assert renewed.epoch == a.epoch
    assert await repo.claim("plan-1", owner_id="replica-b", ttl=TTL) is None


async def test_an_expired_unclaimed_lease_still_fences_correctly(
    repo: PlanRepository, clock: FakeClock
) -> None:
    await create(repo)
    a = await repo.claim("plan-1", owner_id="replica-a", ttl=TTL)
    assert a is not None
    clock.advance(60)

    summary = await repo.set_status(a, status=PlanStatus.RUNNING)
    (renewed,) = await repo.renew_many([a], ttl=TTL)

    assert summary.status is PlanStatus.RUNNING
    assert renewed.expires_at == clock.now + TTL


async def test_reclaiming_ones_own_plan_starts_a_new_epoch(repo: PlanRepository) -> None:
    await create(repo)
    first = await repo.claim("plan-1", owner_id="replica-a", ttl=TTL)
    second = await repo.claim("plan-1", owner_id="replica-a", ttl=TTL)

    assert first is not None
    assert second is not None
    assert second.epoch == first.epoch + 1
    with pytest.raises(PlanOwnershipLost):
        await repo.set_status(first, status=PlanStatus.RUNNING)
    await repo.set_status(second, status=PlanStatus.RUNNING)
    assert (await repo.get("plan-1")).summary.status is PlanStatus.RUNNING


async def test_a_new_owner_starts_without_the_failed_rounds_of_the_last(
    repo: PlanRepository,
) -> None:
    # The driver counts failed rounds in memory: a recorded failure outlived the replica
    # that recorded it (explain said ROUNDS_FAILING for good after a takeover).
    await create(repo, "p1")
    await create(repo, "p2")
    for plan_id in ("p1", "p2"):
        await repo.set_round_error(plan_id, "InvalidArgument: refused")
        assert await repo.round_error(plan_id) is not None
    assert await repo.claim("p1", owner_id="replica-a", ttl=TTL) is not None
    assert [lease.plan_id for lease in await repo.claim_unowned(owner_id="b", ttl=TTL)] == ["p2"]
    assert await repo.round_error("p1") is None
    assert await repo.round_error("p2") is None


async def test_concurrent_claims_have_one_winner(pool: Pool, clock: FakeClock) -> None:
    repo = PlanRepository(pool=pool, clock=clock)
    await create(repo)

    results = await asyncio.gather(
        *(
            PlanRepository(pool=pool, clock=clock).claim("plan-1", owner_id=f"r{i}", ttl=TTL)
            for i in range(8)
        )
    )

    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert (await repo.get_summary("plan-1")).owner_id == winners[0].owner_id


async def test_claim_unowned_splits_plans_between_replicas(pool: Pool, clock: FakeClock) -> None:
    repo = PlanRepository(pool=pool, clock=clock)
    for i in range(12):
        await create(repo, f"p{i:02d}")
    held = await repo.claim("p00", owner_id="other", ttl=TTL)
    assert held is not None

    batches = await asyncio.gather(
        *(
            PlanRepository(pool=pool, clock=clock).claim_unowned(owner_id=f"r{i}", ttl=TTL, limit=5)
            for i in range(3)
        )
    )

    claimed = [lease.plan_id for batch in batches for lease in batch]
    assert len(claimed) == len(set(claimed)) == 11
    assert "p00" not in claimed
    assert all(len(batch) <= 5 for batch in batches), [len(b) for b in batches]
    assert await repo.claim_unowned(owner_id="late", ttl=TTL) == []


async def test_claim_unowned_takes_expired_and_released_plans_oldest_first(
    repo: PlanRepository, clock: FakeClock
) -> None:
    await create(repo, "old")
    clock.advance(1)
    await create(repo, "mid")
    clock.advance(1)
    await create(repo, "new")
    old = await repo.claim("old", owner_id="dead", ttl=TTL)
    mid = await repo.claim("mid", owner_id="leaving", ttl=TTL)
    assert old is not None
    assert mid is not None
    assert await repo.release(mid) is True
    assert await repo.release(mid) is False  # already released

    first = await repo.claim_unowned(owner_id="r", ttl=TTL, limit=1)
    clock.advance(TTL.total_seconds())
    rest = await repo.claim_unowned(owner_id="r", ttl=TTL)

    assert [(lease.plan_id, lease.epoch) for lease in first] == [("mid", 2)]
    # After the TTL every lease above has expired, "mid"'s new one included.
    assert [(lease.plan_id, lease.epoch) for lease in rest] == [("mid", 3), ("new", 1), ("old", 2)]


async def test_renew_many_reports_lost_leases(repo: PlanRepository, clock: FakeClock) -> None:
    for pid in ("a", "b", "c"):
        await create(repo, pid)
    leases = await repo.claim_unowned(owner_id="r1", ttl=TTL)
    clock.advance(TTL.total_seconds())
    stolen = await repo.claim("b", owner_id="r2", ttl=TTL)
    assert stolen is not None

    renewed = await repo.renew_many(leases, ttl=TTL)

    assert [lease.plan_id for lease in renewed] == ["a", "c"]
    assert all(lease.expires_at == clock.now + TTL for lease in renewed)
    assert await repo.renew_many([], ttl=TTL) == []
    with pytest.raises(InvalidArgument):
        await repo.renew_many([leases[0], stolen], ttl=TTL)


async def test_settled_plans_cannot_be_claimed_and_are_not_resumed(
    repo: PlanRepository,
) -> None:
    await create(repo, "done")
    await create(repo, "live")
    lease = await repo.claim("done", owner_id="r", ttl=TTL)
    assert lease is not None
    await repo.set_status(lease, status=PlanStatus.COMPLETED, settled=True)
    await repo.release(lease)

    assert await repo.claim("done", owner_id="r", ttl=TTL) is None
    assert [lease.plan_id for lease in await repo.claim_unowned(owner_id="r", ttl=TTL)] == ["live"]


async def test_claim_of_unknown_plan_is_none(repo: PlanRepository) -> None:
    assert await repo.claim("nope", owner_id="r", ttl=TTL) is None


async def test_fenced_write_to_unknown_plan_is_not_found(
    repo: PlanRepository, clock: FakeClock
) -> None:
    ghost = PlanLease("ghost", "r", 1, clock.now)

    with pytest.raises(NotFound):
        await repo.set_status(ghost, status=PlanStatus.RUNNING)
    with pytest.raises(NotFound):
        await repo.update_tickets(ghost, [TicketState("build", "tk", S.RUNNING, version=2)])


# -- task progress -----------------------------------------------------------------------------


async def owned(repo: PlanRepository, plan_id: str = "plan-1") -> PlanLease:
    await create(repo, plan_id)
    lease = await repo.claim(plan_id, owner_id="r", ttl=TTL)
    assert lease is not None
    return lease


async def test_ticket_observations_apply_only_when_newer(
    repo: PlanRepository, clock: FakeClock
) -> None:
    lease = await owned(repo)
    lease_end = clock.now + timedelta(minutes=1)

    created = await repo.update_tickets(
        lease,
        [
            TicketState("build", "tk-build", S.PENDING, version=1),
            TicketState("test", "tk-test", S.PENDING, version=1),
        ],
    )
    running = await repo.update_tickets(
        lease,
        [
            TicketState(
                "build",
                "tk-build",
                S.RUNNING,
                worker_id="w1",
                lease_expires_at=lease_end,
                version=3,
            )
        ],
    )
    stale = await repo.update_tickets(
        lease, [TicketState("build", "tk-build", S.ASSIGNED, worker_id="w1", version=2)]
    )

    assert sorted(created) == ["build", "test"]
    assert running == ["build"]
    assert stale == []
    stored = (await repo.get("plan-1")).ticket_states()
    assert stored["build"].status is S.RUNNING
    assert (stored["build"].worker_id, stored["build"].lease_expires_at) == ("w1", lease_end)
    assert stored["build"].version == 3
    assert stored["test"].ticket_id == "tk-test"
    assert stored["docs"].ticket_id is None
    assert (await repo.get_summary("plan-1")).counts["RUNNING"] == 1


async def test_task_counts_follow_every_applied_change_and_only_those(
    repo: PlanRepository, migrated_dsn: str, clock: FakeClock
) -> None:
    leases = [await owned(repo, "plan-1"), await owned(repo, "plan-2")]
    rng = random.Random(7)
    versions: dict[tuple[str, str], int] = {}
    for _ in range(40):
        lease = rng.choice(leases)
        batch = []
        for task_id in rng.sample(["build", "test", "docs"], k=rng.randint(1, 3)):
            known = versions.get((lease.plan_id, task_id), 0)
            # Newer, a repeat or an older observation (not applied).
            version = max(1, known + rng.choice([-1, 0, 1, 1, 2]))
            versions[(lease.plan_id, task_id)] = max(known, version)
            status = rng.choice(list(S))
            worker = "w1" if status in (S.ASSIGNED, S.RUNNING) else None
            batch.append(
                TicketState(
                    task_id,
                    f"tk-{lease.plan_id}-{task_id}",
                    status,
                    worker_id=worker,
                    version=version,
                )
            )
        await repo.update_tickets(lease, batch)

        truth = await counted(migrated_dsn)
        for plan_id in ("plan-1", "plan-2"):
            summary = await repo.get_summary(plan_id)
            assert {k: v for k, v in summary.counts.items() if v} == truth[plan_id]
            assert sum(summary.counts.values()) == 3
    # A write refused for a lost lease changes no count either.
    before = (await repo.get_summary("plan-1")).counts
    clock.advance(TTL.total_seconds())
    assert await repo.claim("plan-1", owner_id="other", ttl=TTL) is not None
    with pytest.raises(PlanOwnershipLost):
        await repo.update_tickets(
            leases[0], [TicketState("build", "tk-plan-1-build", S.FAILED, version=99)]
        )
    assert (await repo.get_summary("plan-1")).counts == before


async def test_requeue_and_backoff_are_tied_to_the_attempt(
    repo: PlanRepository, clock: FakeClock
) -> None:
    lease = await owned(repo)
    await repo.update_tickets(
        lease,
        [TicketState("build", "tk", S.PENDING, attempt=2, error_message="exit 1", version=5)],
    )
    until = clock.now + timedelta(seconds=4)

    applied = await repo.start_backoffs(lease, {"build": (2, until), "test": (2, until)})
    stale = await repo.start_backoffs(lease, {"build": (1, until)})

    assert applied == ["build"]  # "test" is still on attempt 1
    assert stale == []
    build = (await repo.get("plan-1")).ticket_states()["build"]
    assert (build.attempt, build.backoff_until, build.backoff_attempt) == (2, until, 2)
    assert build.backoff_end() == until
    assert build.error_message == "exit 1"

    # The next re-queue makes that backoff meaningless for attempt 3.
    await repo.update_tickets(lease, [TicketState("build", "tk", S.PENDING, attempt=3, version=9)])
    build = (await repo.get("plan-1")).ticket_states()["build"]
    assert build.backoff_end() is None


async def test_progress_writes_need_the_current_lease(
    repo: PlanRepository, clock: FakeClock
) -> None:
    lease = await owned(repo)
    clock.advance(TTL.total_seconds())
    new = await repo.claim("plan-1", owner_id="r2", ttl=TTL)
    assert new is not None
    observation = [TicketState("build", "tk", S.RUNNING, version=2)]

    with pytest.raises(PlanOwnershipLost):
        await repo.update_tickets(lease, observation)
    with pytest.raises(PlanOwnershipLost):
        await repo.start_backoffs(lease, {"build": (1, clock.now)})

    assert (await repo.get("plan-1")).ticket_states()["build"].status is S.PENDING
    assert await repo.update_tickets(new, observation) == ["build"]


async def test_concurrent_owner_writes_to_one_plan_do_not_conflict(
    repo: PlanRepository, clock: FakeClock
) -> None:
    lease = await owned(repo)

    await asyncio.gather(
        *(
            write
            for v in range(1, 11)
            for write in (
                repo.update_tickets(lease, [TicketState("build", "tk", S.RUNNING, version=v)]),
                repo.set_status(lease, status=PlanStatus.RUNNING),
            )
        )
    )

    stored = await repo.get("plan-1")
    assert stored.ticket_states()["build"].version == 10
    assert stored.summary.status is PlanStatus.RUNNING


async def test_status_lifecycle_and_first_terminal_status_wins(
    repo: PlanRepository, clock: FakeClock
) -> None:
    lease = await owned(repo)
    clock.advance(1)

    running = await repo.set_status(lease, status=PlanStatus.RUNNING)
    clock.advance(1)
    failed = await repo.set_status(lease, status=PlanStatus.FAILED, error_message="task 'b' failed")
    failed_at = clock.now
    clock.advance(1)
    later = await repo.set_status(lease, status=PlanStatus.COMPLETED, settled=True)

    assert running.status is PlanStatus.RUNNING
    assert running.completed_at is None
    assert (failed.status, failed.error_message, failed.completed_at) == (
        PlanStatus.FAILED,
        "task 'b' failed",
        failed_at,
    )
    assert failed.settled_at is None
    assert (later.status, later.error_message, later.completed_at) == (
        PlanStatus.FAILED,
        "task 'b' failed",
        failed_at,
    )
    assert later.settled_at == clock.now
    assert later.updated_at == clock.now


async def test_cancel_request_marks_the_plan_cancelled_once(
    repo: PlanRepository, clock: FakeClock
) -> None:
    lease = await owned(repo)
    clock.advance(2)

    summary, changed = await repo.request_cancel("plan-1")
    again, changed_again = await repo.request_cancel("plan-1")
    owner_view = await repo.set_status(lease, status=PlanStatus.COMPLETED)

    assert changed is True
    assert (summary.status, summary.cancel_requested_at, summary.completed_at) == (
        PlanStatus.CANCELLED,
        clock.now,
        clock.now,
    )
    assert summary.error_message == "cancelled on request"
    assert summary.settled_at is None  # tickets still to cancel: the owner keeps driving
    assert changed_again is False
    assert again == summary
    assert owner_view.status is PlanStatus.CANCELLED


async def test_cancel_of_a_finished_plan_changes_nothing(repo: PlanRepository) -> None:
    lease = await owned(repo)
    await repo.set_status(lease, status=PlanStatus.COMPLETED, settled=True)

    summary, changed = await repo.request_cancel("plan-1")

    assert changed is False
    assert summary.status is PlanStatus.COMPLETED
    assert summary.cancel_requested_at is None


async def test_cancel_of_unknown_plan_is_not_found(repo: PlanRepository) -> None:
    with pytest.raises(NotFound):
        await repo.request_cancel("nope")


# -- failures ------------------------------------------------------------------------------------


async def test_unreachable_database_is_unavailable() -> None:
    dead = open_pool("postgresql://hive@127.0.0.1:9/none", min_size=0, timeout_seconds=0.5)
    await dead.open(wait=False)
    try:
        with pytest.raises(Unavailable):
            await PlanRepository(pool=dead).get("plan-1")
    finally:
        await dead.close()


async def test_a_plan_is_read_from_one_snapshot_while_its_tickets_change(
    repo: PlanRepository,
) -> None:
    # The plan row (with its task counts) and the task rows used to be read by two
    # statements under READ COMMITTED: a change committed between them made one answer
    # disagree with itself (counts RUNNING 4, while all its tickets were COMPLETED).
    lease = await owned(repo)
    stop = asyncio.Event()

    async def churn() -> None:
        version = 0
        statuses = [S.PENDING, S.ASSIGNED, S.RUNNING]
        while not stop.is_set():
            version += 1
            status = statuses[version % 3]
            worker = "w1" if status is not S.PENDING else None
            await repo.update_tickets(
                lease,
                [
                    TicketState(t, f"tk-{t}", status, worker_id=worker, version=version)
                    for t in ("build", "test", "docs")
                ],
            )

    writer = asyncio.create_task(churn())
    try:
        for _ in range(300):
            stored = await repo.get("plan-1")
            seen: dict[str, int] = {}
            for state in stored.tasks:
                seen[state.status.value] = seen.get(state.status.value, 0) + 1
            assert {k: v for k, v in stored.summary.counts.items() if v} == seen
    finally:
        stop.set()
        await writer
