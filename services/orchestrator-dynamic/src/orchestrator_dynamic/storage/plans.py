"""PlanRepository: the orchestrator's plans, task progress and plan ownership in PostgreSQL.

psycopg 3 on an ``AsyncConnectionPool``; driver errors never leave this module (they become
``Unavailable`` or ``Internal``). Times come from the injected clock, so every replica must
run an NTP-synchronised clock and lease TTLs must be far longer than any skew (tens of
seconds against milliseconds); the epoch check, not the clock, is what keeps a stale owner
from writing (see ``orchestrator_dynamic.domain.records``).

A lease-fenced write first locks the plan row and checks owner and epoch in the same
transaction; a concurrent claim (an UPDATE of that row) therefore waits for the write
to commit, or the write sees the new epoch and raises ``PlanOwnershipLost``. A lease that has
expired but was not claimed by anyone else still fences correctly and may keep writing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, TypeAlias

from psycopg import AsyncConnection
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from hive_common.errors import (
    AlreadyExists,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
)
from hive_common.postgres import DictPool, connection, database_errors
from hive_common.tokens import decode_token, encode_token
from orchestrator_dynamic.domain.clock import Clock, utc_now
from orchestrator_dynamic.domain.plan import Plan, Priority, plan_body_hash
from orchestrator_dynamic.domain.records import (
    PlanLease,
    PlanOwnershipLost,
    PlanPage,
    PlanSummary,
    StoredPlan,
)
from orchestrator_dynamic.domain.scheduler import (
    PlanStatus,
    RoundError,
    TicketState,
    TicketStatus,
)
from orchestrator_dynamic.domain.validation import is_valid_id

Pool: TypeAlias = DictPool
Connection: TypeAlias = AsyncConnection[DictRow]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


_SUMMARY_COLUMNS = """
    p.plan_id, p.intent_id, p.name, p.priority, p.task_count, p.status, p.error_message,
    p.created_at, p.updated_at,
    p.completed_at, p.settled_at, p.cancel_requested_at, p.owner_id, p.owner_lease_expires_at,
    p.counts
"""

_SELECT_SUMMARY = "SELECT " + _SUMMARY_COLUMNS + " FROM plans p"

_INSERT_PLAN = """
INSERT INTO plans (plan_id, intent_id, name, priority, body, body_hash, task_count, status,
                   counts, created_at, updated_at)
VALUES (%(plan_id)s, %(intent_id)s, %(name)s, %(priority)s, %(body)s, %(body_hash)s,
        %(task_count)s, 'PENDING', jsonb_build_object('PENDING', %(task_count)s::int),
        %(now)s, %(now)s)
ON CONFLICT (plan_id) DO NOTHING
RETURNING plan_id
"""

_INSERT_TASKS = """
INSERT INTO plan_tasks (plan_id, task_id, position, updated_at)
SELECT %(plan_id)s, t.task_id, t.position - 1, %(now)s
  FROM unnest(%(task_ids)s::text[]) WITH ORDINALITY AS t(task_id, position)
"""

_SELECT_TASKS = """
SELECT task_id, ticket_id, status, attempt, lost_runs, worker_id, error_message,
       lease_expires_at, ticket_version, backoff_until, backoff_attempt, updated_at
  FROM plan_tasks WHERE plan_id = %(plan_id)s ORDER BY position
"""

_LIST = (
    _SELECT_SUMMARY
    + """
 WHERE (%(after_created)s::timestamptz IS NULL
        OR (p.created_at, p.plan_id) < (%(after_created)s::timestamptz, %(after_plan)s::text))
   AND (cardinality(%(statuses)s::text[]) = 0 OR p.status = ANY(%(statuses)s::text[]))
 ORDER BY p.created_at DESC, p.plan_id DESC
 LIMIT %(limit)s
"""
)

# One statement (one round trip, no BEGIN/COMMIT): the fence locks the plan row and, only
# if this lease still owns the plan, the observations are applied and the plan row touched.
# The caller tells "plan gone" and "lease lost" apart from the fence row it gets back.
_UPDATE_TICKETS = """
WITH fence AS (
    SELECT owner_id, owner_epoch FROM plans WHERE plan_id = %(plan_id)s FOR NO KEY UPDATE
),
owned AS (
    SELECT 1 FROM fence WHERE owner_id = %(owner_id)s AND owner_epoch = %(owner_epoch)s
),
changed AS (
    UPDATE plan_tasks t
       SET ticket_id = COALESCE(u.ticket_id, t.ticket_id),
           status = u.status,
           attempt = u.attempt,
           lost_runs = u.lost_runs,
           worker_id = u.worker_id,
           error_message = u.error_message,
           lease_expires_at = u.lease_expires_at,
           ticket_version = u.version,
           updated_at = %(now)s
      FROM unnest(%(task_ids)s::text[], %(ticket_ids)s::text[], %(statuses)s::text[],
                  %(attempts)s::int[], %(lost_runs)s::int[], %(worker_ids)s::text[],
                  %(errors)s::text[], %(leases)s::timestamptz[], %(versions)s::bigint[])
           AS u(task_id, ticket_id, status, attempt, lost_runs, worker_id, error_message,
                lease_expires_at, version)
     WHERE EXISTS (SELECT 1 FROM owned)
       AND t.plan_id = %(plan_id)s
       AND t.task_id = u.task_id
       AND (t.ticket_version < u.version OR (t.ticket_id IS NULL AND u.ticket_id IS NOT NULL))
    RETURNING t.task_id
),
touched AS (
    UPDATE plans SET updated_at = %(now)s
     WHERE plan_id = %(plan_id)s AND EXISTS (SELECT 1 FROM changed)
)
SELECT f.owner_id, f.owner_epoch, ARRAY(SELECT task_id FROM changed) AS changed FROM fence f
"""

# The plan row is touched too, as by every write of its tasks: WatchPlan polls the row.
_START_BACKOFFS = """
WITH changed AS (
    UPDATE plan_tasks t
       SET backoff_until = u.until, backoff_attempt = u.attempt, updated_at = %(now)s
      FROM unnest(%(task_ids)s::text[], %(attempts)s::int[], %(untils)s::timestamptz[])
           AS u(task_id, attempt, until)
     WHERE t.plan_id = %(plan_id)s AND t.task_id = u.task_id AND t.attempt = u.attempt
    RETURNING t.task_id
),
touched AS (
    UPDATE plans SET updated_at = %(now)s
     WHERE plan_id = %(plan_id)s AND EXISTS (SELECT 1 FROM changed)
)
SELECT task_id FROM changed
"""

# FOR NO KEY UPDATE, not FOR SHARE: the fenced transactions go on to update the plan row,
# and two share locks upgrading at once would deadlock.
_FENCE = """
SELECT owner_id, owner_epoch FROM plans WHERE plan_id = %(plan_id)s FOR NO KEY UPDATE
"""

_SET_STATUS = """
UPDATE plans
   SET status = CASE WHEN status IN ('COMPLETED', 'FAILED', 'CANCELLED') THEN status
                     ELSE %(status)s END,
       error_message = CASE WHEN status IN ('COMPLETED', 'FAILED', 'CANCELLED')
                            THEN error_message ELSE %(error_message)s END,
       completed_at = CASE
           WHEN status IN ('COMPLETED', 'FAILED', 'CANCELLED') THEN completed_at
           WHEN %(status)s IN ('COMPLETED', 'FAILED', 'CANCELLED') THEN %(now)s::timestamptz
           ELSE NULL END,
       settled_at = CASE WHEN %(settled)s THEN COALESCE(settled_at, %(now)s::timestamptz)
                         ELSE settled_at END,
       updated_at = %(now)s
 WHERE plan_id = %(plan_id)s
"""

_REQUEST_CANCEL = """
UPDATE plans
   SET cancel_requested_at = %(now)s, status = 'CANCELLED', completed_at = %(now)s,
       error_message = 'cancelled on request', updated_at = %(now)s
 WHERE plan_id = %(plan_id)s AND cancel_requested_at IS NULL
   AND status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED')
RETURNING plan_id
"""

_LEASE_COLUMNS = "plan_id, owner_id, owner_epoch, owner_lease_expires_at"

_CLAIM = f"""
UPDATE plans
   SET owner_id = %(owner_id)s, owner_epoch = owner_epoch + 1,
       owner_lease_expires_at = %(expires_at)s, round_error = NULL, round_failed_at = NULL
 WHERE plan_id = %(plan_id)s AND settled_at IS NULL
   AND (owner_id IS NULL OR owner_lease_expires_at <= %(now)s OR owner_id = %(owner_id)s)
RETURNING {_LEASE_COLUMNS}
"""

# MATERIALIZED: the candidate set is computed and locked exactly once; re-evaluated as a
# join under concurrent updates, a LIMIT subquery can yield more rows than the limit.
_CLAIM_UNOWNED = """
WITH candidates AS MATERIALIZED (
    SELECT plan_id FROM plans
     WHERE settled_at IS NULL
       AND (owner_id IS NULL OR owner_lease_expires_at <= %(now)s)
     ORDER BY created_at, plan_id
     LIMIT %(limit)s
     FOR UPDATE SKIP LOCKED
)
UPDATE plans p
   SET owner_id = %(owner_id)s, owner_epoch = p.owner_epoch + 1,
       owner_lease_expires_at = %(expires_at)s, round_error = NULL, round_failed_at = NULL
  FROM candidates c
 WHERE p.plan_id = c.plan_id
RETURNING p.plan_id, p.owner_id, p.owner_epoch, p.owner_lease_expires_at
"""

_RENEW = f"""
UPDATE plans p
   SET owner_lease_expires_at = %(expires_at)s
  FROM unnest(%(plan_ids)s::text[], %(epochs)s::bigint[]) AS l(plan_id, epoch)
 WHERE p.plan_id = l.plan_id AND p.owner_id = %(owner_id)s AND p.owner_epoch = l.epoch
RETURNING {", ".join("p." + c.strip() for c in _LEASE_COLUMNS.split(","))}
"""

_RELEASE = """
UPDATE plans SET owner_id = NULL, owner_lease_expires_at = NULL
 WHERE plan_id = %(plan_id)s AND owner_id = %(owner_id)s AND owner_epoch = %(epoch)s
RETURNING plan_id
"""


class PlanRepository:
    """Plans, their tasks' last known ticket states, and plan ownership leases."""

    def __init__(self, *, pool: Pool, clock: Clock = utc_now) -> None:
        self._pool = pool
        self._clock = clock

    # -- plumbing ----------------------------------------------------------------------

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        async with database_errors("orchestrator database"), connection(self._pool) as conn:
            yield conn

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Connection]:
        async with self._connection() as conn, conn.transaction():
            yield conn

    @classmethod
    async def _check_lease(cls, conn: Connection, lease: PlanLease) -> None:
        cur = await conn.execute(_FENCE, {"plan_id": lease.plan_id})
        cls._check_fence(lease, await cur.fetchone())

    @staticmethod
    def _check_fence(lease: PlanLease, row: dict[str, Any] | None) -> None:
        """The plan row's owner and epoch (locked by a fence) must be ``lease``'s."""
        if row is None:
            raise NotFound(f"plan {lease.plan_id!r} not found", details={"plan_id": lease.plan_id})
        if row["owner_id"] != lease.owner_id or row["owner_epoch"] != lease.epoch:
            raise PlanOwnershipLost(
                f"plan {lease.plan_id!r} is no longer driven by {lease.owner_id!r} "
                f"(epoch {lease.epoch})",
                details={
                    "plan_id": lease.plan_id,
                    "owner_id": row["owner_id"],
                    "epoch": row["owner_epoch"],
                },
            )

    # -- plans -------------------------------------------------------------------------

    async def create(self, plan: Plan, *, body_hash: str | None = None) -> tuple[StoredPlan, bool]:
        """Store a new plan (``plan.plan_id`` must be set) with one PENDING row per task.

        Idempotent: if the plan id exists with the same ``body_hash`` (default:
        ``plan_body_hash(plan)``) the stored plan is returned with ``created=False``; with a
        different hash it is ``AlreadyExists`` and nothing changes.
        """
        if plan.plan_id is None:
            raise InvalidArgument(
                "a plan needs a plan_id to be stored",
                violations=[FieldViolation("$.plan_id", "is required")],
            )
        if body_hash is None:
            body_hash = plan_body_hash(plan)
        now = self._clock()
        async with self._transaction() as conn:
            cur = await conn.execute(
                _INSERT_PLAN,
                {
                    "plan_id": plan.plan_id,
                    "intent_id": plan.intent_id,
                    "name": plan.name,
                    "priority": plan.priority.value,
                    "body": Jsonb(plan.to_json()),
                    "body_hash": body_hash,
                    "task_count": len(plan.tasks),
                    "now": now,
                },
            )
            created = await cur.fetchone() is not None
            if created:
                await conn.execute(
                    _INSERT_TASKS,
                    {"plan_id": plan.plan_id, "task_ids": list(plan.task_ids()), "now": now},
                )
            stored = await self._load(conn, plan.plan_id)
        if stored is None:  # pragma: no cover - inserted or conflicting row exists
            raise Internal(f"plan {plan.plan_id!r} vanished while being created")
        if not created and stored.body_hash != body_hash:
            raise AlreadyExists(
                f"plan {plan.plan_id!r} already exists with a different body",
                violations=[
                    FieldViolation(
                        "$.plan_id", "a plan with this id and a different body already exists"
                    )
                ],
                details={"plan_id": plan.plan_id},
            )
        return stored, created

    async def get(self, plan_id: str) -> StoredPlan:
        """The plan with its task states; ``NotFound`` if there is none."""
        async with self._transaction() as conn:
            # One snapshot for the plan row (its task counts) and the task rows: under
            # READ COMMITTED each statement has its own, and an answer could disagree
            # with itself.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            stored = await self._load(conn, plan_id)
        if stored is None:
            raise NotFound(f"plan {plan_id!r} not found", details={"plan_id": plan_id})
        return stored

    async def get_summary(self, plan_id: str) -> PlanSummary:
        async with self._connection() as conn:
            cur = await conn.execute(
                _SELECT_SUMMARY + " WHERE p.plan_id = %(plan_id)s", {"plan_id": plan_id}
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"plan {plan_id!r} not found", details={"plan_id": plan_id})
        return _summary(row)

    async def _load(self, conn: Connection, plan_id: str) -> StoredPlan | None:
        cur = await conn.execute(
            "SELECT " + _SUMMARY_COLUMNS + ", p.body, p.body_hash "
            "FROM plans p WHERE p.plan_id = %(plan_id)s",
            {"plan_id": plan_id},
        )
        row = await cur.fetchone()
        if row is None:
            return None
        cur = await conn.execute(_SELECT_TASKS, {"plan_id": plan_id})
        tasks = tuple(_ticket_state(r) for r in await cur.fetchall())
        plan = Plan.from_json(row["body"]).with_plan_id(plan_id)
        return StoredPlan(
            summary=_summary(row),
            plan=plan,
            body_hash=row["body_hash"],
            tasks=tasks,
        )

    async def list_plans(
        self,
        *,
        page_size: int = 0,
        page_token: str | None = None,
        statuses: Collection[PlanStatus] = (),
    ) -> PlanPage:
        """Plans newest first; ``page_token`` is the previous page's ``next_page_token``.
        ``page_size`` 0 means the default; larger than the maximum is capped."""
        if page_size < 0:
            raise InvalidArgument(
                "page_size must not be negative",
                violations=[FieldViolation("page_size", "must not be negative")],
            )
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after_created, after_plan = (None, None)
        if page_token:
            after_created, after_plan = _decode_token(page_token)
        async with self._connection() as conn:
            cur = await conn.execute(
                _LIST,
                {
                    "after_created": after_created,
                    "after_plan": after_plan,
                    "statuses": [s.value for s in statuses],
                    "limit": limit + 1,
                },
            )
            rows = await cur.fetchall()
        plans = tuple(_summary(r) for r in rows[:limit])
        next_token = (
            _encode_token(plans[-1].created_at, plans[-1].plan_id) if len(rows) > limit else None
        )
        return PlanPage(plans=plans, next_page_token=next_token)

    async def request_cancel(self, plan_id: str) -> tuple[PlanSummary, bool]:
        """Record a cancel request and mark the plan CANCELLED at once (the owner then
        cancels its tickets). Returns the plan and whether this call changed it: a plan that
        is already terminal or already being cancelled is left as it is."""
        now = self._clock()
        async with self._connection() as conn:
            cur = await conn.execute(_REQUEST_CANCEL, {"plan_id": plan_id, "now": now})
            changed = await cur.fetchone() is not None
        return await self.get_summary(plan_id), changed

    async def cancel_requested(self, plan_ids: Sequence[str]) -> set[str]:
        """Which of these plans a cancel was requested for (through any replica)."""
        if not plan_ids:
            return set()
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT plan_id FROM plans"
                " WHERE plan_id = ANY(%(plan_ids)s) AND cancel_requested_at IS NOT NULL",
                {"plan_ids": list(plan_ids)},
            )
            return {row["plan_id"] for row in await cur.fetchall()}

    async def round_error(self, plan_id: str) -> RoundError | None:
        """Why the plan's scheduling rounds keep failing, if they do."""
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT round_error, round_failed_at FROM plans WHERE plan_id = %(plan_id)s",
                {"plan_id": plan_id},
            )
            row = await cur.fetchone()
        if row is None or row["round_error"] is None:
            return None
        return RoundError(message=row["round_error"], failed_at=row["round_failed_at"])

    async def set_round_error(self, plan_id: str, message: str | None) -> None:
        """Record why the plan's last scheduling round failed (None: it no longer does)."""
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE plans SET round_error = %(message)s,"
                " round_failed_at = CASE WHEN %(message)s::text IS NULL THEN NULL ELSE %(now)s END"
                " WHERE plan_id = %(plan_id)s",
                {"plan_id": plan_id, "message": message, "now": self._clock()},
            )

    # -- owner-only writes -------------------------------------------------------------

    async def update_tickets(self, lease: PlanLease, tickets: Sequence[TicketState]) -> list[str]:
        """Store observed ticket states; an observation is applied only if its ``version``
        is newer than the stored one (or it is the first with a ticket id). Returns the
        task ids that changed."""
        if not tickets:
            return []
        params: dict[str, Any] = {
            "plan_id": lease.plan_id,
            "now": self._clock(),
            "task_ids": [t.task_id for t in tickets],
            "ticket_ids": [t.ticket_id for t in tickets],
            "statuses": [t.status.value for t in tickets],
            "attempts": [t.attempt for t in tickets],
            "lost_runs": [t.lost_runs for t in tickets],
            "worker_ids": [t.worker_id for t in tickets],
            "errors": [t.error_message for t in tickets],
            "leases": [t.lease_expires_at for t in tickets],
            "versions": [t.version for t in tickets],
            "owner_id": lease.owner_id,
            "owner_epoch": lease.epoch,
        }
        async with self._connection() as conn:
            cur = await conn.execute(_UPDATE_TICKETS, params)
            fence = await cur.fetchone()
        self._check_fence(lease, fence)
        assert fence is not None
        return list(fence["changed"])

    async def start_backoffs(
        self, lease: PlanLease, backoffs: Mapping[str, tuple[int, datetime]]
    ) -> list[str]:
        """Persist retry backoffs: task id -> (attempt, until). A backoff is stored only if
        the task is still on that attempt. Returns the task ids updated."""
        if not backoffs:
            return []
        items = list(backoffs.items())
        async with self._transaction() as conn:
            await self._check_lease(conn, lease)
            cur = await conn.execute(
                _START_BACKOFFS,
                {
                    "plan_id": lease.plan_id,
                    "now": self._clock(),
                    "task_ids": [task_id for task_id, _ in items],
                    "attempts": [attempt for _, (attempt, _) in items],
                    "untils": [until for _, (_, until) in items],
                },
            )
            return [r["task_id"] for r in await cur.fetchall()]

    async def set_status(
        self,
        lease: PlanLease,
        *,
        status: PlanStatus,
        error_message: str | None = None,
        settled: bool = False,
    ) -> PlanSummary:
        """Store the aggregated plan status. A terminal status is final: once a plan is
        COMPLETED, FAILED or CANCELLED a different status is ignored (the first terminal
        status wins, e.g. a cancel request racing the last completion). ``settled`` marks
        that every ticket is terminal; it is never unset."""
        async with self._transaction() as conn:
            await self._check_lease(conn, lease)
            await conn.execute(
                _SET_STATUS,
                {
                    "plan_id": lease.plan_id,
                    "status": status.value,
                    "error_message": error_message,
                    "settled": settled,
                    "now": self._clock(),
                },
            )
        return await self.get_summary(lease.plan_id)

    # -- ownership ---------------------------------------------------------------------

    async def claim(self, plan_id: str, *, owner_id: str, ttl: timedelta) -> PlanLease | None:
        """Take ownership of one unsettled plan if nobody else holds a live lease on it
        (re-claiming one's own plan starts a new epoch). None if another owner holds it,
        the plan is settled, or it does not exist."""
        now = self._clock()
        async with self._connection() as conn:
            cur = await conn.execute(
                _CLAIM,
                {"plan_id": plan_id, "owner_id": owner_id, "now": now, "expires_at": now + ttl},
            )
            row = await cur.fetchone()
        return _lease(row) if row else None

    async def claim_unowned(
        self, *, owner_id: str, ttl: timedelta, limit: int = 100
    ) -> list[PlanLease]:
        """Take ownership of up to ``limit`` unsettled plans that nobody holds (never held,
        released, or lease expired), oldest first. Replicas calling this together get
        disjoint sets (``FOR UPDATE SKIP LOCKED``)."""
        now = self._clock()
        async with self._connection() as conn:
            cur = await conn.execute(
                _CLAIM_UNOWNED,
                {"owner_id": owner_id, "now": now, "expires_at": now + ttl, "limit": limit},
            )
            return sorted((_lease(r) for r in await cur.fetchall()), key=lambda x: x.plan_id)

    async def renew_many(self, leases: Sequence[PlanLease], *, ttl: timedelta) -> list[PlanLease]:
        """Extend several leases of one owner in one statement; returns the renewed ones
        (a lease missing from the result was lost)."""
        if not leases:
            return []
        owners = {lease.owner_id for lease in leases}
        if len(owners) != 1:
            raise InvalidArgument("renew_many takes the leases of one owner")
        now = self._clock()
        async with self._connection() as conn:
            cur = await conn.execute(
                _RENEW,
                {
                    "owner_id": owners.pop(),
                    "plan_ids": [lease.plan_id for lease in leases],
                    "epochs": [lease.epoch for lease in leases],
                    "expires_at": now + ttl,
                },
            )
            return sorted((_lease(r) for r in await cur.fetchall()), key=lambda x: x.plan_id)

    async def release(self, lease: PlanLease) -> bool:
        """Give a plan up (e.g. on shutdown) so another replica can claim it at once.
        False if the lease was not the current one anyway."""
        async with self._connection() as conn:
            cur = await conn.execute(
                _RELEASE,
                {"plan_id": lease.plan_id, "owner_id": lease.owner_id, "epoch": lease.epoch},
            )
            return await cur.fetchone() is not None


# -- row mapping --------------------------------------------------------------------------


def _summary(row: Mapping[str, Any]) -> PlanSummary:
    counts = {status.value: 0 for status in TicketStatus}
    counts.update({k: int(v) for k, v in row["counts"].items()})
    return PlanSummary(
        plan_id=row["plan_id"],
        intent_id=row["intent_id"],
        name=row["name"],
        priority=Priority(row["priority"]),
        task_count=row["task_count"],
        status=PlanStatus(row["status"]),
        error_message=row["error_message"],
        counts=counts,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        completed_at=row["completed_at"],
        settled_at=row["settled_at"],
        cancel_requested_at=row["cancel_requested_at"],
        owner_id=row["owner_id"],
        owner_lease_expires_at=row["owner_lease_expires_at"],
    )


def _ticket_state(row: Mapping[str, Any]) -> TicketState:
    return TicketState(
        task_id=row["task_id"],
        ticket_id=row["ticket_id"],
        status=TicketStatus(row["status"]),
        attempt=row["attempt"],
        lost_runs=row["lost_runs"],
        worker_id=row["worker_id"],
        error_message=row["error_message"],
        lease_expires_at=row["lease_expires_at"],
        backoff_until=row["backoff_until"],
        backoff_attempt=row["backoff_attempt"],
        version=row["ticket_version"],
        updated_at=row["updated_at"],
    )


def _lease(row: Mapping[str, Any]) -> PlanLease:
    return PlanLease(
        plan_id=row["plan_id"],
        owner_id=row["owner_id"],
        epoch=row["owner_epoch"],
        expires_at=row["owner_lease_expires_at"],
    )


def _encode_token(created_at: datetime, plan_id: str) -> str:
    return encode_token({"c": created_at.isoformat(), "p": plan_id})


def _decode_token(token: str) -> tuple[datetime, str]:
    try:
        body = decode_token(token)
        if not isinstance(body, dict):
            raise ValueError("not a token")
        created_at = datetime.fromisoformat(body["c"])
        plan_id = body["p"]
        # Every plan id has the id form; another string (e.g. with NUL, which PostgreSQL
        # text cannot hold) was not issued here.
        if not isinstance(plan_id, str) or not is_valid_id(plan_id) or created_at.tzinfo is None:
            raise ValueError("bad token content")
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidArgument(
            "page_token is not a token this service issued",
            violations=[FieldViolation("page_token", "malformed or foreign page token")],
        ) from exc
    return created_at, plan_id
